"""The benchmarks' measuring code on small real subsets (full-size runs never happen in tests)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from datetime import date
from pathlib import Path

import pytest
import torch

import siamese_omniglot as so
from siamese_omniglot.evaluate import binomial_interval, embed_pixels

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # as when the script runs: its folder comes first
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def test_accuracy_report_has_every_protocol_with_its_trial_count(tiny_checkpoint, mini_evaluation, shared_omniglot):
    accuracy = _load("accuracy")
    evaluation = so.load_evaluation_set(mini_evaluation)
    runs = so.load_lake_runs(shared_omniglot / "all_runs.zip")
    report = accuracy.evaluate_checkpoint(tiny_checkpoint, evaluation, runs, torch.device("cpu"), 0, 60, ways=(5, 3),
                                          drawer_runs=12)
    assert report["lake_runs"]["trials"] == 400
    assert report["drawer_runs"]["trials"] == 60 and report["drawer_runs"]["runs"] == 12  # 12 runs of 5 trials
    assert report["way5"]["trials"] == report["way3"]["trials"] == 60
    assert report["verification"]["pairs"] == report["verification_any"]["pairs"] == 120
    same, anywhere = report["verification"], report["verification_any"]
    assert (same["negatives"], anywhere["negatives"]) == ("same alphabet", "any alphabet")
    figures = ("accuracy", "roc_auc", "eer", "loss")
    assert [same[k] for k in figures] != [anywhere[k] for k in figures]  # other different pairs
    for key in ("lake_runs", "drawer_runs", "way5", "way3"):
        result = report[key]
        assert 0 <= result["ci_low"] <= result["accuracy"] <= result["ci_high"] <= 1
    # a trained model beats chance on 3-way trials of unseen alphabets
    assert report["way3"]["accuracy"] > 1 / 3
    again = accuracy.evaluate_checkpoint(tiny_checkpoint, evaluation, runs, torch.device("cpu"), 0, 60, ways=(5, 3),
                                         drawer_runs=12)
    assert again == report  # seeded


def test_drawer_runs_are_resampled_whole_where_trials_are_not_independent(tiny_checkpoint, mini_evaluation,
                                                                         shared_omniglot):
    accuracy = _load("accuracy")
    evaluation = so.load_evaluation_set(mini_evaluation)
    runs = so.load_lake_runs(shared_omniglot / "all_runs.zip")
    report = accuracy.evaluate_checkpoint(tiny_checkpoint, evaluation, runs, torch.device("cpu"), 0, 60, ways=(5, 3),
                                          drawer_runs=40)
    drawer = report["drawer_runs"]
    assert drawer["interval"] == "runs resampled" and drawer["trials"] == 200
    assert drawer["ci_low"] <= drawer["accuracy"] <= drawer["ci_high"]
    # before: a Wilson interval over the 200 trials, as though each were drawn alone
    wilson = binomial_interval(round(drawer["accuracy"] * 200), 200)
    assert (drawer["ci_low"], drawer["ci_high"]) != pytest.approx(wilson, abs=1e-6)


def test_results_row_quotes_the_measured_figures():
    accuracy = _load("accuracy")
    result = {"accuracy": 0.9, "ci_low": 0.88, "ci_high": 0.92}
    report = {
        "date": "2026-11-29", "preset": "fast", "device": "cpu", "train_minutes": 12.34, "command": "python x",
        "lake_runs": {"accuracy": 0.9125}, "drawer_runs": result, "way20": result, "way5": result,
        "verification": {"roc_auc": 0.98765, "eer": 0.05}, "verification_any": {"roc_auc": 0.995, "eer": 0.025},
        "snapshots": {5: 0.8, 10: 0.85},
    }
    row = accuracy.results_row(report)
    assert row.startswith("| 2026-11-29 | `fast` | cpu | 12.3 min | **91.2%** |")
    assert "90.0% (88.0%–92.0%)" in row and "5 min: 80.0%, 10 min: 85.0%" in row
    assert "0.9877 / 5.0% (any alphabet: 0.9950 / 2.5%)" in row
    assert row.count("|") == 12
    report["reference_protocol"] = {"accuracy": 0.975, "pairs": 2000, "threshold": 0.5}
    assert accuracy.reference_row(report).startswith(
        "| 2026-11-29 | `fast` | cpu | 12.3 min | **97.5%** (2000 pairs, threshold 0.500) | 91.2% |"
    )
    # trained on every background alphabet: its accuracy row must not pass for the preset's usual training
    assert accuracy.results_row(report).startswith("| 2026-11-29 | `fast`, 90/10 image split | cpu |")


def test_insert_row_goes_under_its_heading(tmp_path):
    table = _load("results_table")
    page = tmp_path / "results.md"
    page.write_text("# R\n\n## A\n\n| a |\n| --- |\n| 1 |\n\n## B\n\n| b |\n| --- |\n")
    table.insert_row(page, "## A", "| 2 |")
    table.insert_row(page, "## B", "| x |")
    assert page.read_text() == "# R\n\n## A\n\n| a |\n| --- |\n| 1 |\n| 2 |\n\n## B\n\n| b |\n| --- |\n| x |\n"
    with pytest.raises(SystemExit, match="no heading"):
        table.insert_row(page, "## C", "| y |")


def test_throughput_benchmark_reports_sane_rates(mini_background):
    command = [sys.executable, str(BENCHMARKS / "throughput.py"), "--data", str(mini_background), "--device", "cpu",
               "--batch-size", "16", "--warmup", "3", "--steps", "5", "--repeats", "3", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["images_per_step"] == 16
    assert report["pipeline_images_per_s"] > 0 and report["model_only_images_per_s"] > 0
    assert report["pipeline_pairs_per_s"] == pytest.approx(report["pipeline_images_per_s"] / 2)
    assert report["pipeline_efficiency"] == pytest.approx(
        report["pipeline_images_per_s"] / report["model_only_images_per_s"]
    )
    assert 0 < report["pipeline_efficiency"] < 2


@pytest.fixture(scope="module")
def zipped_background(mini_background: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mini tree as a zip in Omniglot's archive layout (``images_background/<alphabet>/<character>/``)."""
    zipped = tmp_path_factory.mktemp("zipped") / "images_background.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        for path in sorted(mini_background.rglob("*.png")):
            archive.write(path, "images_background/" + path.relative_to(mini_background).as_posix())
    return zipped


def test_png_items_decode_real_drawings_as_ink(zipped_background: Path) -> None:
    throughput = _load("throughput")
    archive = zipped_background
    pairs = throughput.PngItems(archive, 28, items=4, pairs=True)
    first, second, same = pairs[1]  # odd items are same-class pairs
    assert first.shape == second.shape == (1, 28, 28) and same.item() == 1.0
    assert first.min() >= 0 and first.max() <= 1 and first.mean() < 0.5  # ink on an empty page
    image, label = throughput.PngItems(archive, 28, items=4, pairs=False)[0]
    assert image.shape == (1, 28, 28) and 0 <= label.item() < 48


@pytest.mark.parametrize("preset", ["fast", "koch"])
def test_throughput_benchmark_times_the_dataloader_pipeline_too(
    mini_background: Path, zipped_background: Path, preset: str
) -> None:
    command = [sys.executable, str(BENCHMARKS / "throughput.py"), "--data", str(mini_background), "--device", "cpu",
               "--archive", str(zipped_background),
               "--preset", preset, "--batch-size", "4", "--warmup", "1", "--steps", "2", "--repeats", "1",
               "--workers", "0", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["images_per_step"] == (4 if preset == "fast" else 16)
    assert report["dataloader_images_per_s"] > 0 and report["workers"] == 0
    assert report["dataloader_pairs_per_s"] == pytest.approx(report["dataloader_images_per_s"] / 2)


def test_eval_speed_times_the_installed_command_and_writes_its_row(mini_evaluation: Path, tmp_path: Path) -> None:
    page = tmp_path / "results.md"
    page.write_text("# R\n\n## Evaluation speed\n\n| a |\n| --- |\n")
    command = [sys.executable, str(BENCHMARKS / "eval_speed.py"), "--data", str(mini_evaluation), "--trials", "30",
               "--way", "5", "--pairs", "10", "--repeats", "1", "--json", "--results", str(page)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["seconds"] == report["all_seconds"][0] > 0
    assert (report["one_shot"]["trials"], report["one_shot"]["way"], report["pairs"]) == (30, 5, 20)
    assert 0.2 < report["one_shot"]["accuracy"] <= 1  # the bundled model beats chance on unseen alphabets
    row = page.read_text().splitlines()[-1]
    assert row.startswith(f"| {date.today().isoformat()} | bundled `fast` | cpu, ")
    assert f"| 30 × 5-way + 20 pairs | **{report['seconds']:.1f} s** |" in row


def test_eval_speed_reports_a_failing_command_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a data root")
    data = tmp_path / "notes.txt"
    command = [sys.executable, str(BENCHMARKS / "eval_speed.py"), "--data", str(data), "--repeats", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 1
    assert "eval --device cpu" in done.stderr and "failed (2)" in done.stderr and "Traceback" not in done.stderr


def _runs_from(evaluation: so.ImageSet, pairs: list[tuple[int, int]]) -> so.LakeRuns:
    """3-way runs in Lake's design built from ``evaluation``, one per (support drawer, query drawer) in ``pairs``:
    all but the last share the first alphabet's first 3 characters; the last uses the second alphabet's."""
    class_start, _ = evaluation.class_ranges()
    group_start, _ = evaluation.group_ranges()
    groups = [0] * (len(pairs) - 1) + [1]
    characters = torch.stack([group_start[g] + torch.arange(3) for g in groups])  # [R, 3]
    answers = torch.tensor([[2, 0, 1], [1, 2, 0], [0, 2, 1]][: len(pairs)])
    drawers = torch.tensor(pairs)
    training = class_start[characters] + drawers[:, :1]
    test = class_start[characters.gather(1, answers)] + drawers[:, 1:]
    pixels = evaluation.pixels
    return so.LakeRuns(training=pixels[training], test=pixels[test], answers=answers)


def test_official_runs_are_located_with_their_design(mini_evaluation):
    official = _load("official_runs")
    evaluation = so.load_evaluation_set(mini_evaluation)
    runs = _runs_from(evaluation, [(4, 1), (1, 4), (4, 1)])
    design = official.locate_runs(runs, evaluation)
    assert torch.equal(evaluation.pixels[design.training], runs.training)
    assert torch.equal(evaluation.pixels[design.test], runs.test)
    assert design.pairs.tolist() == [[4, 1], [1, 4], [4, 1]]
    assert design.character_sets.tolist() == [0, 0, 1]  # the first two runs share their characters
    assert design.alphabets == tuple(sorted(evaluation.group_names[:2]))
    assert design.drawers == (1, 4)
    subset = official.design_subset(evaluation, design)
    assert subset.group_names == design.alphabets and len(subset) == 2 * 6 * 2  # 2 alphabets × 6 characters × 2


def test_official_runs_must_all_be_found(mini_evaluation):
    official = _load("official_runs")
    evaluation = so.load_evaluation_set(mini_evaluation)
    runs = _runs_from(evaluation, [(4, 1), (1, 4)])
    runs.training[0, 0, 50, 50] = 255 - runs.training[0, 0, 50, 50]  # one pixel differs: not an Omniglot image
    with pytest.raises(SystemExit, match="1 run images are not in the evaluation set"):
        official.locate_runs(runs, evaluation)


def test_official_runs_must_each_have_one_support_and_one_query_drawer(mini_evaluation):
    official = _load("official_runs")
    evaluation = so.load_evaluation_set(mini_evaluation)
    runs = _runs_from(evaluation, [(4, 1), (1, 4)])
    class_start, _ = evaluation.class_ranges()
    group_start, _ = evaluation.group_ranges()
    runs.test[0, 0] = evaluation.pixels[class_start[group_start[0] + 2] + 3]  # its character, by drawer 3, not 1
    # before: the run's drawer pair read off its first images, the rest assumed alike
    with pytest.raises(SystemExit, match="come from several drawers"):
        official.locate_runs(runs, evaluation)


def test_the_accuracy_benchmark_refuses_a_custom_tree(mini_background):
    command = [sys.executable, str(BENCHMARKS / "accuracy.py"), "--data", str(mini_background), "--runs", "x.zip",
               "--device", "cpu", "--max-steps", "1", "--results", ""]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    # before: it trained on the tree and then "tested" on the same images
    assert done.returncode == 2 and "not Omniglot; the protocols test on its evaluation alphabets" in done.stderr


def test_other_drawer_pairs_leave_out_each_runs_own_pair(tiny_checkpoint, mini_evaluation):
    official = _load("official_runs")
    evaluation = so.load_evaluation_set(mini_evaluation)
    design = official.locate_runs(_runs_from(evaluation, [(4, 1), (1, 4)]), evaluation)
    model = so.Verifier.from_checkpoint(tiny_checkpoint, "cpu").model
    embeddings = embed_pixels(model, evaluation.pixels, torch.device("cpu"))
    accuracy = official.other_drawer_pairs(model, embeddings, evaluation, design)  # pairs (1, 4), (4, 1)
    assert torch.isnan(accuracy[0, 1]) and torch.isnan(accuracy[1, 0])  # each run's own pair
    class_start, _ = evaluation.class_ranges()
    first = class_start[evaluation.labels[design.training[0]]]  # run 0's characters, drawn by drawer 1 and 4
    logits = model.score_embeddings(embeddings[first + 4][:, None], embeddings[first + 1][None])
    assert float(accuracy[0, 0]) == pytest.approx(float((logits.argmax(1) == torch.arange(3)).float().mean()))


def test_official_runs_report_agrees_with_the_official_scorer(tiny_checkpoint, mini_evaluation):
    official = _load("official_runs")
    evaluation = so.load_evaluation_set(mini_evaluation)
    runs = _runs_from(evaluation, [(3, 7), (7, 3), (3, 7)])
    report = official.compare(tiny_checkpoint, evaluation, runs, torch.device("cpu"), seed=0, fresh=5)
    model = so.Verifier.from_checkpoint(tiny_checkpoint, "cpu").model
    assert report["official"]["accuracy"] == pytest.approx(so.lake_runs_accuracy(model, runs, "cpu").accuracy)
    low, high = report["official"]["run_ci"]
    assert low <= report["official"]["accuracy"] <= high
    assert (report["drawers"], report["runs"], report["character_sets"]) == ([4, 8], 3, 2)
    assert 0 <= report["other_drawer_pairs"] <= 1
    for fresh in (report["fresh_same_design"], report["fresh_all"]):
        assert fresh["trials"] == 5 * 3  # 5 fresh 3-way runs
        assert fresh["run_ci"][0] <= fresh["accuracy"] <= fresh["run_ci"][1]
    row = official.results_row(report | {"date": "2026-11-29", "checkpoint": "x", "device": "cpu", "command": "y"})
    assert row.startswith("| 2026-11-29 | x | cpu | **") and row.count("|") == 9


def test_run_bootstrap_resamples_whole_runs_and_clusters_of_runs():
    official = _load("official_runs")
    assert official.run_bootstrap(torch.ones(20, 20, dtype=torch.bool)) == (1.0, 1.0)
    halves = torch.zeros(20, 20, dtype=torch.bool)
    halves[:10] = True  # ten perfect runs, ten failed ones: the mean swings with the runs drawn
    low, high = official.run_bootstrap(halves)
    assert low < 0.35 and high > 0.65  # resampling single trials would give about 0.45–0.55
    pairs = torch.arange(20) // 2  # runs 2k and 2k + 1 share everything: ten independent units, not twenty
    clustered = official.run_bootstrap(halves, pairs)
    assert clustered[0] < low and high < clustered[1]
