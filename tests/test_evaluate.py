"""Metrics and protocols: ROC AUC, EER, thresholds, Wilson intervals, one-shot episodes and Lake's runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from siamese_omniglot.data import ImageSet, LakeRuns, load_folder, load_lake_runs, sample_episodes
from siamese_omniglot.data.pairs import Pairs
from siamese_omniglot.evaluate import (
    best_threshold,
    binomial_interval,
    embed_pixels,
    episode_logits,
    equal_error_rate,
    lake_runs_accuracy,
    one_shot_accuracy,
    pair_logits,
    pair_metrics,
    roc_auc,
    roc_curve,
)
from siamese_omniglot.models import SiameseNetwork, build_model

CPU = torch.device("cpu")


def distance_model(sign: float) -> SiameseNetwork:
    """A fast model whose logit is ``sign`` × the L1 distance of the two embeddings."""
    torch.manual_seed(0)
    model = build_model("fast").eval()
    with torch.no_grad():
        model.head.weight.fill_(sign)
        model.head.bias.zero_()
    return model


def brute_force_auc(scores: list[int], same: list[bool]) -> float:
    positives = [s for s, y in zip(scores, same, strict=True) if y]
    negatives = [s for s, y in zip(scores, same, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=2, max_size=40))
def test_roc_auc_equals_pairwise_count_with_ties(items: list[tuple[int, bool]]) -> None:
    scores, same = [s for s, _ in items], [y for _, y in items]
    auc = roc_auc(torch.tensor(scores, dtype=torch.float32), torch.tensor(same))
    if all(same) or not any(same):
        assert math.isnan(auc)
    else:
        assert auc == pytest.approx(brute_force_auc(scores, same), abs=1e-12)


@pytest.mark.parametrize(
    ("scores", "same", "eer", "threshold"),
    [
        # separable: no errors; the threshold falls midway between the classes
        ([0.1, 0.2, 0.8, 0.9], [False, False, True, True], 0.0, 0.5),
        # one different pair (0.7) outscores two same pairs: FA = FR = 1/3 at t = 0.6; best accuracy at t = 0.4
        ([0.9, 0.6, 0.4, 0.7, 0.3, 0.2], [True, True, True, False, False, False], 1 / 3, 0.35),
        # inverted: EER 1; no threshold beats accepting everything (half right)
        ([0.1, 0.2, 0.8, 0.9], [True, True, False, False], 1.0, 0.1),
    ],
)
def test_equal_error_rate_and_best_threshold(scores: list, same: list, eer: float, threshold: float) -> None:
    scores_t, same_t = torch.tensor(scores), torch.tensor(same)
    assert equal_error_rate(scores_t, same_t) == pytest.approx(eer)
    assert best_threshold(scores_t, same_t) == pytest.approx(threshold, abs=1e-6)


def test_the_best_threshold_stays_a_score_where_accepting_every_pair_is_best() -> None:
    """The midpoint below the lowest score fell under 0 here: a threshold that checkpoints refuse."""
    assert best_threshold(torch.tensor([1e-8, 1e-8, 0.8, 0.9]), torch.tensor([True, True, False, False])) == 0.0


def brute_force_rates(scores: list[int], same: list[bool], threshold: int) -> tuple[float, float]:
    """False-accept and false-reject rates of ``score ≥ threshold``, counted pair by pair."""
    accepted = [s >= threshold for s in scores]
    different = [a for a, y in zip(accepted, same, strict=True) if not y]
    alike = [not a for a, y in zip(accepted, same, strict=True) if y]
    return sum(different) / max(len(different), 1), sum(alike) / max(len(alike), 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=2, max_size=40))
def test_the_roc_curve_counts_every_threshold_with_ties(items: list[tuple[int, bool]]) -> None:
    scores, same = [s for s, _ in items], [y for _, y in items]
    fpr, tpr = roc_curve(torch.tensor(scores, dtype=torch.float64), torch.tensor(same))
    thresholds = sorted(set(scores), reverse=True)  # the curve's inner points, from the highest threshold down
    for i, threshold in enumerate(thresholds, start=1):
        false_accept, false_reject = brute_force_rates(scores, same, threshold)
        assert float(fpr[i]) == pytest.approx(false_accept, abs=1e-12)
        assert float(tpr[i]) == pytest.approx(1 - false_reject, abs=1e-12)


def test_thresholds_and_error_rates_scale_to_millions_of_pairs() -> None:
    """One distinct score per pair: a threshold × pair table would take terabytes."""
    generator = torch.Generator().manual_seed(4)
    same = torch.arange(2_000_000) % 2 == 0
    scores = torch.rand(2_000_000, generator=generator, dtype=torch.float64) + same  # separable at 1
    assert equal_error_rate(scores, same) == 0
    assert best_threshold(scores, same) == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3 (Wilson)
    [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        (8, 10, 0.4902, 0.9433),
        (10, 10, 0.7225, 1.0),
    ],
)
def test_binomial_interval_matches_wilson(successes: int, trials: int, low: float, high: float) -> None:
    assert binomial_interval(successes, trials) == pytest.approx((low, high), abs=5e-5)


def test_binomial_interval_of_no_trials_is_nan() -> None:
    assert all(math.isnan(x) for x in binomial_interval(0, 0))


def test_pair_metrics_on_hand_made_logits() -> None:
    logits = torch.tensor([2.0, 0.5, -1.0, 1.0, -2.0, -0.5])
    same = torch.tensor([True, True, True, False, False, False])
    metrics = pair_metrics(logits, same, threshold=0.5)
    expected_loss = sum(math.log1p(math.exp(-x)) for x in (2.0, 0.5, -1.0)) + sum(
        math.log1p(math.exp(x)) for x in (1.0, -2.0, -0.5)
    )
    assert metrics.pairs == 6
    assert metrics.accuracy == 4 / 6  # exact, not float32; decided same: 2.0, 0.5 (right), 1.0 (wrong); -1.0 missed
    assert metrics.roc_auc == pytest.approx(6 / 9)
    assert metrics.eer == pytest.approx(1 / 3)
    assert metrics.loss == pytest.approx(expected_loss / 6, rel=1e-6)
    assert metrics.threshold == 0.5
    assert pair_metrics(logits, same, threshold=0.8).accuracy == 4 / 6  # sigmoid(2) ≥ 0.8 only
    assert metrics.to_dict()["roc_auc"] == metrics.roc_auc


@pytest.fixture(scope="module")
def evaluation_images(mini_evaluation: Path) -> ImageSet:
    return load_folder(mini_evaluation)


@pytest.mark.parametrize(("sign", "accuracy"), [(-1.0, 1.0), (1.0, 0.0)])
def test_one_shot_accuracy_with_class_embeddings(evaluation_images: ImageSet, sign: float, accuracy: float) -> None:
    """One-hot class embeddings: the right candidate is at distance 0, every other at distance 2."""
    model = distance_model(sign)
    embeddings = F.one_hot(evaluation_images.labels, model.embedding_dim).float()
    episodes = sample_episodes(evaluation_images, way=5, shot=2, trials=200, seed=0)
    result = one_shot_accuracy(model, embeddings, episodes)
    assert (result.way, result.shot, result.trials) == (5, 2, 200)
    assert result.accuracy == accuracy
    assert (result.ci_low, result.ci_high) == pytest.approx(binomial_interval(int(accuracy * 200), 200))


def test_one_shot_accuracy_is_chance_when_embeddings_carry_no_information(evaluation_images: ImageSet) -> None:
    """All scores tie, so the first candidate is always chosen: right exactly when the answer is 0."""
    model = distance_model(-1.0)
    episodes = sample_episodes(evaluation_images, way=5, shot=1, trials=400, seed=1)
    result = one_shot_accuracy(model, torch.zeros(len(evaluation_images), model.embedding_dim), episodes)
    assert result.accuracy == pytest.approx(float((episodes.answers == 0).float().mean()))
    assert result.ci_low < 1 / 5 < result.ci_high


class GatherRecorder(torch.Tensor):
    """Embeddings that record the shape of every gather from them."""

    gathered: list[tuple[int, ...]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # torch's protocol
        result = super().__torch_function__(func, types, args, kwargs or {})
        if func is torch.Tensor.__getitem__:
            cls.gathered.append(tuple(result.shape))
        return result


def test_episode_logits_gather_a_chunk_of_trials_at_a_time(evaluation_images: ImageSet) -> None:
    """All 600 trials' support embeddings at once take T·N·K·D floats: 22 GB for 10 million 20-way trials."""
    model = distance_model(-1.0)
    embeddings = torch.randn(len(evaluation_images), model.embedding_dim, generator=torch.Generator().manual_seed(3))
    episodes = sample_episodes(evaluation_images, way=5, shot=2, trials=600, seed=0)
    GatherRecorder.gathered = []
    logits = episode_logits(model, embeddings.as_subclass(GatherRecorder), episodes)
    assert max(shape[0] for shape in GatherRecorder.gathered) == 256
    support, queries = embeddings[episodes.support], embeddings[episodes.queries][:, None, None, :]
    torch.testing.assert_close(logits.as_subclass(torch.Tensor), -(support - queries).abs().sum(-1).mean(-1))


@pytest.fixture(scope="module")
def lake_runs(shared_omniglot: Path) -> LakeRuns:
    return load_lake_runs(shared_omniglot / "all_runs.zip")


def test_lake_runs_have_the_official_shape(lake_runs: LakeRuns) -> None:
    assert lake_runs.training.shape == (20, 20, 105, 105)
    assert lake_runs.test.shape == (20, 20, 105, 105)
    assert sorted(lake_runs.answers[0].tolist()) == list(range(20))  # each class is asked once per run


@pytest.mark.parametrize(("sign", "accuracy"), [(-1.0, 1.0), (1.0, 0.0)])
def test_lake_runs_accuracy_when_each_test_image_is_its_training_image(
    lake_runs: LakeRuns, sign: float, accuracy: float
) -> None:
    """Test images replaced by copies of the right training images: distance 0 to the answer only."""
    answers = torch.stack([torch.randperm(20, generator=torch.Generator().manual_seed(r)) for r in range(20)])
    copies = LakeRuns(lake_runs.training, lake_runs.training[torch.arange(20)[:, None], answers], answers)
    result = lake_runs_accuracy(distance_model(sign), copies, CPU)
    assert (result.way, result.shot, result.trials) == (20, 1, 400)
    assert result.accuracy == accuracy


def test_embed_pixels_uses_eval_mode_and_restores_training(lake_runs: LakeRuns) -> None:
    model = distance_model(-1.0).train()
    pixels = lake_runs.training[0]
    whole = embed_pixels(model, pixels, CPU)
    in_chunks = embed_pixels(model, pixels, CPU, batch_size=3)
    assert model.training
    assert whole.shape == (20, model.embedding_dim)
    torch.testing.assert_close(whole, in_chunks)  # batch norm used running statistics, not batch ones


def test_embed_pixels_reports_the_images_done_after_each_batch(lake_runs: LakeRuns) -> None:
    model = distance_model(-1.0)
    told: list[tuple[str, int, int]] = []
    embeddings = embed_pixels(model, lake_runs.training[0], CPU, batch_size=8, progress=lambda *t: told.append(t))
    assert told == [("embed images", 8, 20), ("embed images", 16, 20), ("embed images", 20, 20)]
    torch.testing.assert_close(embeddings, embed_pixels(model, lake_runs.training[0], CPU))


def test_roc_curve_runs_from_origin_to_corner_and_encloses_the_auc() -> None:
    generator = torch.Generator().manual_seed(3)
    same = torch.arange(300) % 3 == 0
    scores = torch.randn(300, generator=generator) + same.float()
    fpr, tpr = roc_curve(scores, same)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert bool((fpr.diff() >= 0).all() and (tpr.diff() >= 0).all())
    area = float(((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2).sum())  # trapezoids: ties count ½
    assert area == pytest.approx(roc_auc(scores, same), abs=1e-9)


def test_pair_logits_in_chunks_match_one_pass() -> None:
    model = distance_model(-1.0)
    embeddings = torch.randn(12, model.embedding_dim, generator=torch.Generator().manual_seed(2))
    first, second = torch.arange(12), torch.arange(12).roll(5)
    pairs = Pairs(first, second, first % 2 == 0)
    expected = -(embeddings[first] - embeddings[second]).abs().sum(1)
    torch.testing.assert_close(pair_logits(model, embeddings, pairs, chunk=5), expected)
    torch.testing.assert_close(pair_logits(model, embeddings, pairs), expected)


@pytest.mark.parametrize(("scores", "same"), [
    ([], []),  # an IndexError from the sweep before
    ([0.2, 0.9], [True, True]),  # no different pair: an EER of 0.0 before
    ([0.2, 0.9], [False, False]),  # no same pair: 0.5 before
    ([math.nan, math.nan, 0.9, 0.8], [True, True, False, False]),  # NaN sorted above all: ROC AUC 1.0 before
], ids=["empty", "all-same", "all-different", "nan-scores"])
def test_rates_that_mean_nothing_are_nan(scores: list, same: list) -> None:
    scores, same = torch.tensor(scores, dtype=torch.float64), torch.tensor(same, dtype=torch.bool)
    assert math.isnan(roc_auc(scores, same)) and math.isnan(equal_error_rate(scores, same))
    metrics = pair_metrics(scores, same, 0.5)
    assert math.isnan(metrics.roc_auc) and math.isnan(metrics.eer) and metrics.pairs == len(same)


def test_no_trials_score_nan_not_a_division_by_zero() -> None:
    from siamese_omniglot.data import Episodes

    none = Episodes(torch.zeros(0, 5, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                    torch.zeros(0, dtype=torch.long))
    model = build_model("fast")
    result = one_shot_accuracy(model, torch.zeros(4, model.embedding_dim), none)
    assert result.trials == 0 and math.isnan(result.accuracy) and math.isnan(result.ci_low)
