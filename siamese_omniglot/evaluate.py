"""Evaluation protocols and metrics. Every image is embedded once; trials are scored from embeddings.

Protocols:

- **pair verification**: balanced same/different pairs; accuracy at a threshold, ROC AUC, EER.
- **N-way K-shot**: within-alphabet one-shot classification: the query goes to the candidate class
  whose support images score highest (mean logit over the K shots).
- **Lake's official runs**: 20 runs × 20 trials of 20-way within-alphabet 1-shot classification
  (Lake et al. 2015, ``all_runs.zip``); the figure is the mean accuracy over the 400 trials.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .data.episodes import Episodes, LakeRuns
from .data.images import to_ink
from .data.pairs import Pairs
from .models import SiameseNetwork

if TYPE_CHECKING:  # the download and cache module, for a type alone
    from .data.omniglot import ProgressFn


@torch.no_grad()
def embed_pixels(
    model: SiameseNetwork,
    pixels: torch.Tensor,
    device: torch.device,
    batch_size: int = 128,
    views: int | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Embeddings [N, D] (float32, on ``device``) of uint8 images [N, H, W], in eval mode, each averaged over
    ``views`` shifted views (default: the model's own). ``progress(what, done, total)`` is told the images done
    after each batch."""
    was_training = model.training
    model.eval()
    parts = []
    try:
        for chunk in pixels.split(batch_size):
            parts.append(model.embed(to_ink(chunk.to(device, non_blocking=True)), views).float())
            if progress is not None:
                progress("embed images", min(len(parts) * batch_size, len(pixels)), len(pixels))
    finally:
        model.train(was_training)
    return torch.cat(parts) if parts else torch.empty(0, model.embedding_dim, device=device)


@torch.no_grad()
def pair_logits(
    model: SiameseNetwork, embeddings: torch.Tensor, pairs: Pairs, chunk: int = 8192
) -> torch.Tensor:
    """Same-class logits of index pairs into ``embeddings``, ``chunk`` pairs at a time (memory stays bounded)."""
    pairs = pairs.to(embeddings.device)
    chunks = zip(pairs.first.split(chunk), pairs.second.split(chunk), strict=True)
    parts = [model.score_embeddings(embeddings[first], embeddings[second]).float() for first, second in chunks]
    return torch.cat(parts) if parts else torch.empty(0, device=embeddings.device)


def roc_auc(scores: torch.Tensor, same: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a same pair outscores a different one (ties ½); NaN where it
    means nothing (no same or no different pair, a NaN score)."""
    scores, same = scores.double().cpu(), same.bool().cpu()
    if not _rankable(scores, same):
        return float("nan")
    positives, negatives = int(same.sum()), int((~same).sum())
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average the ranks of tied scores
    unique, inverse = torch.unique(scores, return_inverse=True)
    rank_sum = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.bincount(inverse, minlength=len(unique)).double()
    ranks = (rank_sum / counts)[inverse]
    return float((ranks[same].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _rankable(scores: torch.Tensor, same: torch.Tensor) -> bool:
    """Whether rates of ``scores`` mean anything: same and different pairs both present, and no NaN score (which
    sorts above every other)."""
    return bool(same.any()) and not bool(same.all()) and not bool(scores.isnan().any())


def _sweep(scores: torch.Tensor, same: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thresholds (each distinct score) with the false-accept and false-reject rates of ``score ≥ t``."""
    scores, same = scores.double().cpu(), same.bool().cpu()
    thresholds, inverse = torch.unique(scores, return_inverse=True)  # ascending
    # pairs scoring at or above each threshold: counts per distinct score, summed from the top (O(n log n))
    different_above = _count_from_top(inverse[~same], len(thresholds))
    same_above = _count_from_top(inverse[same], len(thresholds))
    positives = int(same.sum())
    false_accept = different_above / max(len(same) - positives, 1)
    false_reject = (positives - same_above) / max(positives, 1)
    return thresholds, false_accept, false_reject


def _count_from_top(bins: torch.Tensor, size: int) -> torch.Tensor:
    """For each bin ``i`` of ``size``, how many of ``bins`` are ``≥ i`` (float64)."""
    return torch.bincount(bins, minlength=size).flip(0).cumsum(0).flip(0).double()


def equal_error_rate(scores: torch.Tensor, same: torch.Tensor) -> float:
    """The error rate where false accepts and false rejects are equal (closest threshold); NaN where it means
    nothing (no same or no different pair, a NaN score)."""
    if not _rankable(scores, same.bool()):
        return float("nan")
    _, false_accept, false_reject = _sweep(scores, same)
    i = int((false_accept - false_reject).abs().argmin())
    return float((false_accept[i] + false_reject[i]) / 2)


def roc_curve(scores: torch.Tensor, same: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """False-positive and true-positive rates of ``score ≥ t`` for every threshold, from (0, 0) to (1, 1)."""
    _, false_accept, false_reject = _sweep(scores, same)
    # thresholds rise, so the rates fall: reverse them, and close the curve at both ends
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    return torch.cat([zero, false_accept.flip(0), one]), torch.cat([zero, (1 - false_reject).flip(0), one])


def best_threshold(scores: torch.Tensor, same: torch.Tensor) -> float:
    """The score threshold with the highest accuracy of ``score ≥ threshold`` on balanced pairs.

    Returns the midpoint between the best threshold and the next lower score, so that new scores
    near the boundary are not decided by a single calibration example.
    """
    thresholds, false_accept, false_reject = _sweep(scores, same)
    i = int((false_accept + false_reject).argmin())
    lower = thresholds[i - 1] if i > 0 else thresholds[i] - 1e-6
    return max(0.0, float((thresholds[i] + lower) / 2))  # a score, as a checkpoint's threshold must be


def binomial_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% by default) for a proportion."""
    if trials == 0:
        return (float("nan"), float("nan"))
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class PairMetrics:
    """Verification figures on balanced pairs; ``accuracy`` is at ``threshold`` on the score."""

    pairs: int
    accuracy: float
    roc_auc: float
    eer: float
    loss: float
    threshold: float

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)


def pair_metrics(logits: torch.Tensor, same: torch.Tensor, threshold: float) -> PairMetrics:
    """Accuracy at ``threshold`` (on sigmoid scores), ROC AUC, EER and BCE loss of pair logits."""
    logits, same = logits.float().cpu(), same.bool().cpu()
    scores = torch.sigmoid(logits)
    decided = scores >= threshold
    count = int(same.numel())
    return PairMetrics(
        pairs=count,
        accuracy=int((decided == same).sum()) / count if count else float("nan"),  # a ratio of counts, exact
        roc_auc=roc_auc(logits, same),
        eer=equal_error_rate(logits, same),
        loss=float(F.binary_cross_entropy_with_logits(logits, same.float())),
        threshold=threshold,
    )


@dataclass(frozen=True)
class OneShotResult:
    """Accuracy of N-way K-shot classification with a 95% Wilson interval."""

    protocol: str
    way: int
    shot: int
    trials: int
    accuracy: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)


def _result(protocol: str, correct: torch.Tensor, way: int, shot: int) -> OneShotResult:
    hits, trials = int(correct.sum()), int(correct.numel())
    low, high = binomial_interval(hits, trials)
    return OneShotResult(protocol, way, shot, trials, hits / trials if trials else float("nan"), low, high)


@torch.no_grad()
def episode_logits(model: SiameseNetwork, embeddings: torch.Tensor, episodes: Episodes) -> torch.Tensor:
    """Candidate logits [T, N] of N-way K-shot episodes: each candidate's mean logit over its K shots (CPU)."""
    device = embeddings.device
    # gathered a chunk of trials at a time: all of them at once take T·N·K·D floats
    chunks = zip(episodes.queries.to(device).split(256), episodes.support.to(device).split(256), strict=True)
    return torch.cat([
        model.score_embeddings(embeddings[queries][:, None, None, :], embeddings[support]).float().mean(-1)
        for queries, support in chunks  # [t, 1, 1, D] against [t, N, K, D]
    ]).cpu()


def hardest_episodes(logits: torch.Tensor, answers: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` trials whose best wrong candidate beats the true one by the most.

    The margin ``max(wrong logits) − true logit`` is positive for errors, so errors come first, then the
    closest correct calls.
    """
    logits = logits.float().cpu()
    rows = torch.arange(len(logits))
    true = logits[rows, answers]
    wrong = logits.clone()
    wrong[rows, answers] = -torch.inf
    return (wrong.max(1).values - true).argsort(descending=True, stable=True)[:count]


@torch.no_grad()
def one_shot_accuracy(model: SiameseNetwork, embeddings: torch.Tensor, episodes: Episodes) -> OneShotResult:
    """Score N-way K-shot episodes sampled from the images behind ``embeddings``."""
    trials, way, shot = episodes.support.shape
    correct = episode_logits(model, embeddings, episodes).argmax(1) == episodes.answers
    return _result("within-alphabet episodes", correct, way, shot)


@torch.no_grad()
def lake_runs_accuracy(model: SiameseNetwork, runs: LakeRuns, device: torch.device) -> OneShotResult:
    """Accuracy on Lake et al.'s official 20-way 1-shot runs (400 trials for ``all_runs.zip``)."""
    num_runs, way = runs.training.shape[:2]
    training = embed_pixels(model, runs.training.flatten(0, 1), device).view(num_runs, 1, way, -1)
    test = embed_pixels(model, runs.test.flatten(0, 1), device).view(num_runs, -1, 1, training.shape[-1])
    logits = model.score_embeddings(test, training).float()  # [R, tests, way]
    correct = (logits.argmax(-1).cpu() == runs.answers).flatten()
    return _result("Lake et al. 2015 official runs", correct, way, 1)
