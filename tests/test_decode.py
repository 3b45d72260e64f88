"""Decoding: threshold -> segments (max 4 layers), beam search over ops, the release's top-k
(hand-worked cases and an independent re-implementation of the release's decoder)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polar.decode import DecodeConfig, beam_search_ops, decode_programs, runnable_programs, segment_boundaries
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


def test_all_skip_beam_keeps_its_slot_and_deployment_falls_back_to_full_depth():
    """Beams: skip+skip .72 -> [], skip+keep .135 -> [2,3], keep+skip .04 -> [0,1], keep+keep.
    The release evaluates the empty program as a wrong answer in its slot; a program that must
    run (``polar run``) takes the best non-empty one, else the full depth."""
    seg = torch.tensor([5.0, -5, 5, -5])
    ops = torch.zeros(4, 3)
    ops[0] = logits_from_probs([0.9, 0.05, 0.05])
    ops[2] = logits_from_probs([0.8, 0.15, 0.05])
    cands = decode_programs(seg, ops, DecodeConfig(beam_size=4, top_k_ops=2))
    assert [c.program for c in cands] == [[], [2, 3], [0, 1], [0, 1, 2, 3]]
    assert [c.program for c in decode_programs(seg, ops, DecodeConfig(beam_size=4, top_k_paths=2))] == [[], [2, 3]]
    assert runnable_programs(cands, 4, top_k=2) == [[2, 3], [0, 1]]
    only = decode_programs(seg, ops, DecodeConfig(beam_size=1, top_k_ops=1))
    assert [c.program for c in only] == [[]] and runnable_programs(only, 4, top_k=1) == [[0, 1, 2, 3]]


def test_a_length_penalty_of_zero_or_below_leaves_the_beam_order():
    """The release reranks only when len_penalty > 0 (the flag's help: "<= 0: off")."""
    seg = torch.tensor([5.0, -5, 5, -5, -5, -5])
    ops = torch.zeros(6, 3)
    ops[0] = logits_from_probs([0.1, 0.6, 0.3])
    ops[2] = logits_from_probs([0.5, 0.4, 0.1])
    plain = [c.program for c in decode_programs(seg, ops, DecodeConfig(beam_size=3))]
    assert [c.program for c in decode_programs(seg, ops, DecodeConfig(beam_size=3, len_penalty=-0.5))] == plain


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
        assert all(0 <= x < depth for x in c.program)
        assert all(1 <= s.size <= MAX_SEGMENT_SIZE for s in c.segments)
        assert not c.program or path_to_segments(c.program, depth) is not None
    ranks = [c.rank_score for c in cands]
    assert ranks == sorted(ranks, reverse=True)


def test_fallback_segments_respect_max_size():
    seg, ops = torch.full((9,), -9.0), torch.zeros(9, 3)
    ops[:, 0] = 9.0  # every segment wants to skip
    (cand,) = decode_programs(seg, ops, DecodeConfig(beam_size=1, top_k_ops=1))
    assert cand.program == [] and [s.size for s in cand.segments] == [4, 4, 1]
    assert runnable_programs([cand], 9, top_k=1) == [list(range(9))]


# --------------------------------------------------------------------------- against the release


def release_top_k(seg_logits, op_logits, config):
    """The release's decoder and its top-k selection (``decode_polar_to_actions``,
    ``actions_to_path``, the rerank and slice of ``evaluate_polar``), re-implemented here on
    plain lists: the programs of the first ``top_k_paths`` beams, empty ones included."""
    probs = torch.sigmoid(seg_logits).tolist()
    log_probs = torch.log_softmax(op_logits, dim=-1).tolist()
    depth = len(probs)
    starts = [0] + [i for i in range(1, depth) if probs[i] >= config.seg_threshold]
    bounds = []
    for index, start in enumerate(starts):  # split runs longer than 4 layers
        end = starts[index + 1] if index + 1 < len(starts) else depth
        while start < end:
            bounds.append((start, min(start + MAX_SEGMENT_SIZE, end)))
            start = bounds[-1][1]
    beams = [([], 0.0)]
    for start, end in bounds:
        row = log_probs[start]
        tried = sorted(range(3), key=lambda op: row[op], reverse=True)[: config.top_k_ops]
        layers = list(range(start, end))
        grown = [(program + {0: [], 1: layers, 2: layers * 2}[op], score + row[op])
                 for program, score in beams for op in tried]
        grown.sort(key=lambda beam: beam[1], reverse=True)
        beams = grown[: config.beam_size]
    if config.len_penalty > 0:
        beams = sorted(beams, key=lambda beam: beam[1] - config.len_penalty * len(beam[0]), reverse=True)
    return [program for program, _ in beams[: config.top_k_paths]]


def test_top_k_equals_the_release_decoder_on_random_logits():
    """Random logits (skip-heavy ones too, so empty programs occur), random settings."""
    gen = torch.Generator().manual_seed(11)
    rng = __import__("random").Random(11)
    empties = 0
    for _ in range(400):
        depth = rng.choice([3, 6, 12, 28, 36])
        scale = rng.choice([0.5, 2.0, 6.0])
        seg = torch.randn(depth, generator=gen) * scale
        ops = torch.randn(depth, 3, generator=gen) * scale
        if rng.random() < 0.3:
            ops[:, 0] += 4.0
        config = DecodeConfig(rng.choice([0.3, 0.5, 0.7, 0.8]), rng.choice([1, 2, 5, 8]), rng.choice([1, 2, 3]),
                              rng.choice([1, 3, 5]), rng.choice([0.0, -0.1, 0.05, 0.5]))
        ours = [c.program for c in decode_programs(seg, ops, config)]
        assert ours == release_top_k(seg, ops, config), config
        empties += [] in ours
    assert empties > 20
