"""Decoding: threshold -> segments (max 4 layers), beam search over ops, distinct programs."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polar.decode import DecodeConfig, beam_search_ops, decode_programs, segment_boundaries
from polar.programs import MAX_SEGMENT_SIZE, Segment, path_to_segments


def logits_from_probs(rows):
    return torch.log(torch.tensor(rows, dtype=torch.float32))


def test_boundaries_threshold_layer_zero_and_split():
    # only layer 7 passes the threshold; layer 0 always starts; 0..6 (7 layers) splits 4 + 3
    seg = torch.tensor([-9.0, -9, -9, -9, -9, -9, -9, 0.1, -9, -9])
    sizes = [(s.start, s.size) for s in segment_boundaries(seg, 0.5)]
    assert sizes == [(0, 4), (4, 3), (7, 3)]
    # threshold is inclusive: sigmoid(0) = 0.5 starts a segment at 0.5
    assert [s.start for s in segment_boundaries(torch.zeros(3), 0.5)] == [0, 1, 2]


def test_hand_worked_beam():
    """Segments A=[0,1], B=[2..5]. A: skip .1 keep .6 repeat .3; B: skip .5 keep .4 repeat .1.
    top_k_ops=2 -> A tries keep, repeat; B tries skip, keep. Products: keep+skip .30,
    keep+keep .24, repeat+skip .15, repeat+keep .12; beam_size=3 drops the last."""
    seg = torch.tensor([5.0, -5, 5, -5, -5, -5])
    ops = torch.zeros(6, 3)
    ops[0] = logits_from_probs([0.1, 0.6, 0.3])
    ops[2] = logits_from_probs([0.5, 0.4, 0.1])
    config = DecodeConfig(beam_size=3, top_k_ops=2, top_k_paths=5)
    cands = decode_programs(seg, ops, config)
    assert [c.program for c in cands] == [[0, 1], [0, 1, 2, 3, 4, 5], [0, 1, 0, 1]]
    assert [round(math.exp(c.score), 4) for c in cands] == [0.30, 0.24, 0.15]
    assert cands[0].segments == (Segment(0, 2, 1), Segment(2, 4, 0))
    # len_penalty 0.5: ranks by log p - 0.5 * length: -2.20, -4.43 (len 6), -3.90 (len 4)
    cands = decode_programs(seg, ops, DecodeConfig(beam_size=3, top_k_ops=2, len_penalty=0.5))
    assert [c.program for c in cands] == [[0, 1], [0, 1, 0, 1], [0, 1, 2, 3, 4, 5]]
    # top_k_paths cuts the list
    assert len(decode_programs(seg, ops, DecodeConfig(beam_size=3, top_k_paths=2))) == 2


def test_all_skip_program_is_dropped_and_fallback_is_full_depth():
    seg = torch.tensor([5.0, -5, 5, -5])
    ops = torch.zeros(4, 3)
    ops[0] = logits_from_probs([0.9, 0.05, 0.05])
    ops[2] = logits_from_probs([0.8, 0.15, 0.05])
    cands = decode_programs(seg, ops, DecodeConfig(beam_size=4, top_k_ops=2))
    assert [] not in [c.program for c in cands]
    assert cands[0].program == [2, 3]  # skip A (0.9) + keep B (0.15) beats keep A + skip B
    only = decode_programs(seg, ops, DecodeConfig(beam_size=1, top_k_ops=1))
    assert [c.program for c in only] == [[0, 1, 2, 3]]


def test_beam_search_ops_ties_are_deterministic():
    beams = beam_search_ops([[0.0, 0.0, -1.0]], beam_size=2, top_k_ops=3)
    assert beams == [(0.0, (0,)), (0.0, (1,))]


@settings(max_examples=60, deadline=None)
@given(
    depth=st.integers(1, 12),
    seed=st.integers(0, 10_000),
    beam=st.integers(1, 6),
    k_ops=st.integers(1, 3),
    k_paths=st.integers(1, 6),
)
def test_decoded_programs_are_distinct_valid_and_parse_back(depth, seed, beam, k_ops, k_paths):
    gen = torch.Generator().manual_seed(seed)
    seg, ops = torch.randn(depth, generator=gen) * 3, torch.randn(depth, 3, generator=gen) * 3
    cands = decode_programs(seg, ops, DecodeConfig(beam_size=beam, top_k_ops=k_ops, top_k_paths=k_paths))
    programs = [tuple(c.program) for c in cands]
    assert 1 <= len(programs) <= k_paths and len(set(programs)) == len(programs)
    for c in cands:
        assert c.program and all(0 <= x < depth for x in c.program)
        assert all(1 <= s.size <= MAX_SEGMENT_SIZE for s in c.segments)
        assert path_to_segments(c.program, depth) is not None
    ranks = [c.rank_score for c in cands]
    assert ranks == sorted(ranks, reverse=True)


def test_fallback_segments_respect_max_size():
    seg, ops = torch.full((9,), -9.0), torch.zeros(9, 3)
    ops[:, 0] = 9.0  # every segment wants to skip
    (cand,) = decode_programs(seg, ops, DecodeConfig(beam_size=1, top_k_ops=1))
    assert cand.program == list(range(9)) and [s.size for s in cand.segments] == [4, 4, 1]
