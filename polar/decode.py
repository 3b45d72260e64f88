"""Predictor outputs -> top-k programs.

Segment boundaries come from thresholding the segment-start logits (layer 0 always starts a
segment; runs longer than 4 layers are split, as in training targets). With the boundaries fixed,
each segment chooses an op; a beam search over ops keeps the ``beam_size`` best op sequences by
summed log-probability, trying the ``top_k_ops`` likeliest ops of each segment. As in the release
(``decode_polar_to_actions`` and ``evaluate_polar``), finished beams are reranked by
``score - len_penalty * program_length`` only when ``len_penalty > 0`` and the first
``top_k_paths`` beams are the candidates. A beam that skips every layer keeps its slot as an
empty program: the release scores it 0 without running it, and a lower beam does not take its
place. Deployment needs a program that runs, so :func:`runnable_programs` drops empty ones and
falls back to the full-depth program.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polar.programs import Program, Segment, full_program, segments_from_starts, segments_to_path


@dataclass(frozen=True)
class DecodeConfig:
    """The release's decoding flags, same names and defaults."""

    seg_threshold: float = 0.5
    beam_size: int = 5
    top_k_ops: int = 2
    top_k_paths: int = 5
    len_penalty: float = 0.0


@dataclass(frozen=True)
class Candidate:
    """One decoded program with its beam score (sum of op log-probs) and ranking score."""

    program: Program
    score: float
    rank_score: float
    segments: tuple[Segment, ...]


def segment_boundaries(seg_logits: torch.Tensor, threshold: float) -> list[Segment]:
    """Segments (op left as -1) whose starts are layer 0 plus every layer with p >= threshold."""
    # compared in double precision, as the release compares ``sigmoid(...).tolist()`` with the flag
    starts = (torch.sigmoid(seg_logits.float()).double() >= threshold).tolist()
    return segments_from_starts(starts, [-1] * len(starts))


def beam_search_ops(
    op_log_probs: list[list[float]], beam_size: int, top_k_ops: int
) -> list[tuple[float, tuple[int, ...]]]:
    """Best op sequences (score, ops), one op per segment; ``op_log_probs[s][op]``.

    Ties keep the order in which beams and ops were tried (the release's stable sort: parent
    beam first, then the op's rank, equal log-probs in op order), so decoding is deterministic.
    """
    beams: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
    for log_probs in op_log_probs:
        ranked_ops = sorted(range(len(log_probs)), key=lambda op: (-log_probs[op], op))[:top_k_ops]
        grown = [(score + log_probs[op], ops + (op,)) for score, ops in beams for op in ranked_ops]
        grown.sort(key=lambda beam: -beam[0])
        beams = grown[:beam_size]
    return beams


def decode_programs(
    seg_logits: torch.Tensor, op_logits: torch.Tensor, config: DecodeConfig = DecodeConfig()
) -> list[Candidate]:
    """The release's top-``top_k_paths`` candidates for one question from ``seg_logits [D]`` and
    ``op_logits [D, 3]``, best first; a candidate's program is empty when its beam skips every
    layer. Distinct beams always give distinct programs (a program determines each segment's op).
    """
    boundaries = segment_boundaries(seg_logits, config.seg_threshold)
    log_probs = torch.log_softmax(op_logits.float(), dim=-1)
    per_segment = [log_probs[seg.start].tolist() for seg in boundaries]
    beams = beam_search_ops(per_segment, config.beam_size, config.top_k_ops)
    rerank = config.len_penalty > 0  # the release ignores a penalty of 0 or below
    candidates: list[Candidate] = []
    for score, ops in beams:
        segments = tuple(Segment(s.start, s.size, op) for s, op in zip(boundaries, ops))
        program = segments_to_path(segments)
        rank = score - config.len_penalty * len(program) if rerank else score
        candidates.append(Candidate(program, score, rank, segments))
    if rerank:
        candidates.sort(key=lambda c: -c.rank_score)  # stable: equal ranks keep the beam order
    return candidates[: config.top_k_paths]


def runnable_programs(candidates: list[Candidate], depth: int, top_k: int) -> list[Program]:
    """The best ``top_k`` programs that can run: empty ones left out, and the full-depth program
    when nothing else is left (deployment must answer; evaluation keeps the empty slots)."""
    programs = [c.program for c in candidates if c.program][:top_k]
    return programs or [full_program(depth)]


def decode_batch(
    seg_logits: torch.Tensor, op_logits: torch.Tensor, config: DecodeConfig = DecodeConfig()
) -> list[list[Candidate]]:
    """:func:`decode_programs` for every row of a batch."""
    return [decode_programs(s, o, config) for s, o in zip(seg_logits.cpu(), op_logits.cpu())]


@torch.no_grad()
def predict_candidates(
    model, features: list[torch.Tensor], config: DecodeConfig = DecodeConfig(), batch_size: int = 64
) -> list[list[Candidate]]:
    """Run the predictor over precomputed question features and decode each question."""
    from polar.predictor import pad_features

    model.eval()
    device = next(model.parameters()).device
    out: list[list[Candidate]] = []
    for i in range(0, len(features), batch_size):
        batch, mask = pad_features(features[i : i + batch_size])
        seg, ops = model(batch.to(device), mask.to(device))
        out.extend(decode_batch(seg, ops, config))
    return out


def predict_programs(
    checkpoint_path: str,
    questions: list[str],
    runner=None,
    top_k: int = 1,
    decode: DecodeConfig | None = None,
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
) -> list[list[Program]]:
    """The deployable path: question texts -> top-``top_k`` programs each, from a checkpoint.

    ``runner`` (a ``ProgramRunner``) supplies the model depth check and, for checkpoints trained
    on the ``self`` encoder, the token states. ``trust_remote_code`` is the caller's choice for
    the encoder the checkpoint names (a checkpoint cannot grant it).
    """
    from dataclasses import replace

    from polar.encoders import build_encoder, encode_cached
    from polar.predictor import load_checkpoint

    depth = None if runner is None else int(runner.num_layers)
    checkpoint = load_checkpoint(checkpoint_path, num_layers=depth)
    device = None if runner is None else str(runner.device)
    encoder = build_encoder(checkpoint.encoder, runner=runner, device=device, trust_remote_code=trust_remote_code)
    features = encode_cached(encoder, list(questions), cache_dir)
    config = decode or DecodeConfig()
    config = replace(config, top_k_paths=max(config.beam_size, top_k))  # every beam: empty ones are skipped
    return [runnable_programs(cands, checkpoint.num_layers, top_k)
            for cands in predict_candidates(checkpoint.model, features, config)]
