"""Reliability: crash-safe training, exact resume, non-finite losses, and hostile inputs at the command line.

Most command lines here run the real ``siamese`` entry point (``cli.main`` with ``sys.argv`` set) in a
forked child process: the same code, exit codes and output streams as the console script, without
paying for a fresh interpreter and ``import torch`` each time (20+ kills would otherwise take minutes).
A few go through the installed console script itself.
"""

from __future__ import annotations

import http.server
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_omniglot import train as train_module
from siamese_omniglot.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from siamese_omniglot.config import preset
from siamese_omniglot.data import ImageSet, decode_image, load_folder, read_image
from siamese_omniglot.data import omniglot as omniglot_module
from siamese_omniglot.data.omniglot import BACKGROUND, fetch_archive, find_split, load_split
from siamese_omniglot.data.pairs import seeded_generator
from siamese_omniglot.errors import ConfigError, DataError, OutputError
from siamese_omniglot.models import build_model
from siamese_omniglot.stdout import READER_GONE
from siamese_omniglot.train import Trainer, warm_cosine

CPU = torch.device("cpu")
SIAMESE = shutil.which("siamese") or str(Path(sys.executable).parent / "siamese")
RUN_FILES = {"config.json", "metrics.jsonl", "epoch_loss.txt", "epoch_val_loss.txt", "epoch_loss.png", "best.pt",
             "last.pt", "dllogger.json"}
TIMING_KEYS = {"seconds", "pairs_per_s", "images_per_s"}


# --- running the command line -----------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """How one command line ended."""

    code: int
    stdout: str
    stderr: str


def _cli_child(argv: list[str], stdout: str, stderr: str, cwd: str) -> None:
    """Body of a forked child: the console script's ``main()`` with its output sent to two files."""
    os.chdir(cwd)
    for name in [k for k in os.environ if k.startswith("SIAMESE_")]:
        del os.environ[name]
    out, err = open(stdout, "w"), open(stderr, "w")  # noqa: SIM115 (closed when the child exits)
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.stdout, sys.stderr = out, err
    logging.getLogger("siamese_omniglot").handlers.clear()  # the CLI adds its own on the new stderr
    torch.set_num_threads(1)
    sys.argv = ["siamese", *argv]
    from siamese_omniglot.__main__ import main

    try:
        main()
    finally:
        out.flush()
        err.flush()


def start_cli(*args: object, cwd: Path, logs: Path) -> multiprocessing.Process:
    """Start ``siamese *args`` in a forked child; its stdout and stderr go to ``logs``.out / .err."""
    context = multiprocessing.get_context("fork")
    argv = [str(a) for a in args]
    child = context.Process(target=_cli_child, args=(argv, f"{logs}.out", f"{logs}.err", str(cwd)), daemon=True)
    child.start()
    return child


def run_cli(*args: object, cwd: Path, timeout_s: float = 300) -> Run:
    """Run ``siamese *args`` to the end in a forked child (see the module docstring)."""
    logs = cwd / f".cli-{time.monotonic_ns()}"
    child = start_cli(*args, cwd=cwd, logs=logs)
    child.join(timeout_s)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"siamese {' '.join(map(str, args))} ran past {timeout_s} s")
    result = Run(child.exitcode, Path(f"{logs}.out").read_text(), Path(f"{logs}.err").read_text())
    Path(f"{logs}.out").unlink()
    Path(f"{logs}.err").unlink()
    return result


def console_env() -> dict[str, str]:
    """This process's environment for the installed ``siamese``: no ``SIAMESE_*`` setting, one thread."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SIAMESE_")} | {"OMP_NUM_THREADS": "1"}


def run_console_script(*args: object, cwd: Path) -> Run:
    """The installed ``siamese`` console script, in a fresh interpreter."""
    env = console_env()
    done = subprocess.run([SIAMESE, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
    return Run(done.returncode, done.stdout, done.stderr)


def assert_refused(run: Run, message: str) -> str:
    """Exit code 2, nothing on stdout, and exactly one stderr line: ``error: …message…``. Returns the line."""
    assert "Traceback" not in run.stdout + run.stderr, run.stderr
    assert run.code == 2, run.stderr
    assert run.stdout == ""
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    return lines[0]


def assert_fails_once_started(run: Run, message: str) -> str:
    """A failure after training began: exit 2, progress lines allowed, one ``error:`` line, last."""
    assert "Traceback" not in run.stdout + run.stderr, run.stderr
    assert run.code == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], run.stderr
    assert run.stderr.rstrip().splitlines()[-1] == errors[0]
    return errors[0]


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _warm_imports() -> None:
    """Import here, once, what a training command imports lazily, so that forked children start in
    a fraction of a second (the first optimizer alone imports torch._dynamo: seconds)."""
    import siamese_omniglot.cli  # noqa: F401
    import siamese_omniglot.distributed  # noqa: F401
    import siamese_omniglot.dllog  # noqa: F401

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def copy_tree(source: Path, target: Path, alphabets: int, characters: int, drawers: int) -> Path:
    for alphabet in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))[:alphabets]:
        for character in sorted(alphabet.iterdir())[:characters]:
            folder = target / alphabet.name / character.name
            folder.mkdir(parents=True)
            for image in sorted(character.glob("*.png"))[:drawers]:
                shutil.copy(image, folder / image.name)
    return target


@pytest.fixture(scope="module")
def tiny_tree(mini_background: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real alphabet, 6 characters × 10 drawings: 4 characters to train on (5 steps of 8), 2 held out."""
    tree = copy_tree(mini_background, tmp_path_factory.mktemp("tiny") / "tree", 1, 6, 10)
    load_folder(tree)  # decode once: every run below starts from the cache
    return tree


@pytest.fixture(scope="module")
def small(tiny_tree: Path) -> ImageSet:
    return load_folder(tiny_tree)


@pytest.fixture(scope="module")
def drawing(mini_evaluation: Path) -> Path:
    return sorted(mini_evaluation.glob("*/*/*.png"))[0]


def model_state(**config) -> dict:
    torch.manual_seed(0)
    model = build_model("fast", **config)
    return {"model_config": model.config.to_dict(), "model": model.state_dict(), "threshold": 0.5}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained model's checkpoint: enough for compare and eval to run."""
    return save_checkpoint(model_state(), tmp_path_factory.mktemp("weights") / "model.pt")


@contextmanager
def mounted_tmpfs(where: Path, options: str):
    """A tmpfs mounted at ``where`` (skips the test where mounting is not allowed)."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}); needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


TRAIN = ("train", "--device", "cpu", "--batch-size", 8, "--log-every", 1)


# --- crash safety: SIGKILL at random moments ------------------------------------------------------


def model_tensors(state: dict) -> dict[str, torch.Tensor]:
    tensors = dict(state["model"])
    classifier = state["training"]["classifier"] or {}
    tensors |= {f"classifier.{k}": v for k, v in classifier.items()}
    for index, buffers in state["training"]["optimizer"]["state"].items():
        tensors |= {f"optimizer.{index}.{k}": v for k, v in buffers.items() if isinstance(v, torch.Tensor)}
    return tensors


def assert_same_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert found.keys() == expected.keys()
    different = [name for name, tensor in found.items() if not torch.equal(tensor, expected[name])]
    assert different == [], f"not bitwise equal: {different[:5]}"


def metrics_without_timing(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def check_run_folder(out: Path, last_step: int) -> int:
    """After a kill: every checkpoint loads, last.pt never goes back, the logs parse; returns last.pt's step."""
    if not out.exists():  # killed before it made the folder
        assert last_step == 0
        return 0
    for path in out.iterdir():
        assert path.name in RUN_FILES or path.name.startswith("."), f"unexpected file {path.name}"
    for name in ("best.pt", "last.pt"):
        if (out / name).exists():
            load_checkpoint(out / name)  # raises on a torn or partial file
    if not (out / "last.pt").exists():
        assert last_step == 0, "last.pt vanished"
        return 0
    step = load_checkpoint(out / "last.pt")["training"]["step"]
    assert step >= last_step
    if (out / "metrics.jsonl").exists():
        [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return step


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tiny_tree: Path, tmp_path: Path) -> None:
    """20 SIGKILLs at random moments of training runs (start-up, steps, validation, checkpoint and log
    writes): after each, every checkpoint loads and ``--resume`` continues from ``last.pt``; each run, once
    finished, has the weights, optimizer state, best checkpoint and metrics of a run never killed."""
    epochs, kills_wanted, budget_s = 16, 20, 150
    options = [*TRAIN, "--data", tiny_tree, "--epochs", epochs]
    reference = start_cli(*options, "--out", tmp_path / "reference", cwd=tmp_path, logs=tmp_path / "reference")
    try:
        runs = kill_and_resume(options, tiny_tree, tmp_path, epochs, kills_wanted, budget_s)
        reference.join(120)
    finally:
        if reference.is_alive():
            reference.kill()
            reference.join()
    assert reference.exitcode == 0, Path(f"{tmp_path / 'reference'}.err").read_text()
    for out in runs:
        for name in ("last.pt", "best.pt"):
            found, expected = load_checkpoint(out / name), load_checkpoint(tmp_path / "reference" / name)
            assert found["training"]["step"] == expected["training"]["step"]
            assert found["threshold"] == expected["threshold"]
            assert_same_tensors(model_tensors(found), model_tensors(expected))
        assert load_checkpoint(out / "last.pt")["training"]["step"] == epochs * 5
        assert metrics_without_timing(out / "metrics.jsonl") == metrics_without_timing(
            tmp_path / "reference" / "metrics.jsonl")
        assert len((out / "epoch_loss.txt").read_text().splitlines()) == epochs


def _signature(path: Path) -> tuple[int, int] | None:
    """Identity of the file at ``path`` (each atomic save makes a new inode), or None when absent."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _wait_for_saves(child: multiprocessing.Process, path: Path, saves: int) -> None:
    """Until ``child`` has replaced ``path`` ``saves`` times (or died)."""
    seen = _signature(path)
    while saves > 0 and child.is_alive():
        time.sleep(0.005)
        now = _signature(path)
        if now != seen:
            seen, saves = now, saves - 1


def kill_and_resume(options: list, tiny_tree: Path, tmp_path: Path, epochs: int, kills_wanted: int,
                    budget_s: float) -> list[Path]:
    """Start, SIGKILL at a random moment, check the folder, resume; then let one life finish the run.

    Each life lets 0, 1 or 2 checkpoints be written (probabilities .5, .4, .1; never the run's last two)
    and then dies at a uniformly random moment within 0.9 of an epoch's length: during start-up (data,
    model, restoring), steps, validation, or the writing of checkpoints and logs. A life that finishes
    its run before the kill lands (a busy machine slows the epoch measured first) ends that run, and
    the next life starts another in a new folder; one killed after its last step, in the run's closing work, is
    resumed like any other. Returns the finished run folders.
    """
    runs = [tmp_path / "killed-0"]
    rng = random.Random(0)
    kills, last_step, started = 0, 0, time.monotonic()
    steps_when_killed = []
    epoch_s = None  # measured in the first life, between its first two checkpoints
    while kills < kills_wanted:
        assert time.monotonic() - started < budget_s, f"only {kills} kills in {budget_s} s"
        out = runs[-1]
        if (out / "last.pt").exists():
            args = [*TRAIN[:3], "--resume", out / "last.pt", "--data", tiny_tree]
        else:
            args = [*options, "--out", out]
        child = start_cli(*args, cwd=tmp_path, logs=tmp_path / f"life-{kills}")
        if epoch_s is None:
            _wait_for_saves(child, out / "last.pt", 1)
            first = time.monotonic()
            _wait_for_saves(child, out / "last.pt", 1)
            epoch_s = time.monotonic() - first
        else:
            epochs_left = epochs - last_step // 5
            saves = min(rng.choices([0, 1, 2], weights=[5, 4, 1])[0], max(epochs_left - 2, 0))
            _wait_for_saves(child, out / "last.pt", saves)
        child.join(rng.uniform(0, 0.9 * epoch_s))
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
        child.join()
        if child.exitcode == 0:  # it finished first
            assert load_checkpoint(out / "last.pt")["training"]["step"] == epochs * 5
            runs.append(tmp_path / f"killed-{len(runs)}")
            last_step = 0
            continue
        assert child.exitcode == -signal.SIGKILL, Path(f"{tmp_path / f'life-{kills}'}.err").read_text()
        kills += 1
        last_step = check_run_folder(out, last_step)
        steps_when_killed.append(last_step)
    assert len(set(steps_when_killed)) > 3, f"kills did not land across the run: {steps_when_killed}"

    # and a last life, left alone, resumes from what the last kill left and finishes the run
    if last_step:
        resumed = run_cli(*TRAIN[:3], "--resume", runs[-1] / "last.pt", "--data", tiny_tree, cwd=tmp_path)
    else:  # the last kill came before the first checkpoint of a run
        resumed = run_cli(*options, "--out", runs[-1], cwd=tmp_path)
    assert resumed.code == 0, resumed.stderr
    assert f"last checkpoint: {runs[-1] / 'last.pt'}" in resumed.stdout
    if last_step < epochs * 5:
        assert f"step {last_step + 1}/{epochs * 5} " in resumed.stderr  # it went on from the checkpoint's step
    else:  # the last kill came after the last step, in the run's closing work: resuming only finishes that
        assert f"/{epochs * 5} " not in resumed.stderr
    return runs


def test_a_crash_between_last_and_best_is_repaired_on_resume(small: ImageSet, tmp_path: Path) -> None:
    config = preset("fast", max_steps=5, batch_size=8, val_pairs=50, views=1)  # one epoch: last.pt is the best
    Trainer(config, small, tmp_path, CPU).fit()
    logs = {name: (tmp_path / name).read_text() for name in ("metrics.jsonl", "epoch_loss.txt")}
    (tmp_path / "best.pt").unlink()  # the crash came after last.pt was written, before best.pt
    with (tmp_path / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"epoch": 2, "step"')  # and cut a later line short
    Trainer(config, small, tmp_path, CPU).fit(resume=tmp_path / "last.pt")
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert best["training"]["step"] == last["training"]["step"] == 5
    assert_same_tensors(model_tensors(best), model_tensors(last))
    assert {name: (tmp_path / name).read_text() for name in logs} == logs


# --- exact resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["classify", "pair"])
def test_stop_after_and_resume_is_bitwise_equal_to_an_unpaused_run(
    small: ImageSet, tmp_path: Path, objective: str
) -> None:
    """Paused mid-epoch twice (``stop_after``), under the full warm-up + cosine schedule: the final weights,
    classifier, momentum buffers, learning rate and random streams equal an unpaused run's, bit for bit."""
    config = preset("fast", objective=objective, epochs=3, batch_size=8, val_pairs=50, log_every=2)
    assert config.warmup_fraction > 0 and config.min_lr_fraction < 1  # a schedule that a changed length would move
    whole = Trainer(config, small, tmp_path / "whole", CPU)
    whole.fit()
    out = tmp_path / "paused"
    first = Trainer(config, small, out, CPU)
    first.fit(stop_after=3)
    assert (first.step, first.total_steps) == (3, 15)
    assert load_checkpoint(out / "last.pt")["training"]["step"] == 3
    second = Trainer(config, small, out, CPU)
    second.fit(resume=out / "last.pt", stop_after=12)
    assert second.step == 12
    last = Trainer(config, small, out, CPU)
    result = last.fit(resume=out / "last.pt")
    assert last.step == 15 and result.history[-1].step == 15
    assert_same_tensors(model_tensors(load_checkpoint(out / "last.pt")),
                        model_tensors(load_checkpoint(tmp_path / "whole" / "last.pt")))
    assert last.optimizer.param_groups[0]["lr"] == whole.optimizer.param_groups[0]["lr"]
    assert result.history[-1].val_roc_auc == whole.history[-1].val_roc_auc
    # the pauses' validations chose nothing: best.pt and the averaged epochs are the unpaused run's
    assert [entry["epoch"] for entry in last.top_epochs] == [entry["epoch"] for entry in whole.top_epochs]
    assert_same_tensors(model_tensors(load_checkpoint(out / "best.pt")),
                        model_tensors(load_checkpoint(tmp_path / "whole" / "best.pt")))
    # each epoch's loss is over all its steps: an epoch a pause cut had its last part's alone before
    unpaused = [m.train_loss for m in whole.history]
    assert [m.train_loss for m in result.history if not m.paused] == unpaused


@pytest.mark.parametrize("at", ["mid-epoch", "epoch-end"])
def test_a_snapshot_taken_during_an_epoch_resumes_exactly(small: ImageSet, tmp_path: Path, at: str) -> None:
    config = preset("fast", epochs=2, batch_size=8, val_pairs=50, log_every=1, views=1)
    whole = Trainer(config, small, tmp_path / "whole", CPU)
    whole.fit()
    snapshot = tmp_path / "snapshot.pt"
    paused = Trainer(config, small, tmp_path / "first", CPU)
    step = 3 if at == "mid-epoch" else paused.steps_per_epoch  # from on_progress, before the epoch closes
    assert step < paused.steps_per_epoch or at == "epoch-end"
    paused.on_progress = lambda progress: paused.step == step and paused.save_snapshot(snapshot)
    paused.fit()
    assert load_checkpoint(snapshot)["training"]["generators"][0] is not None  # None before: a repeated epoch start
    resumed = Trainer(config, small, tmp_path / "resumed", CPU)
    result = resumed.fit(resume=snapshot)
    assert_same_tensors(model_tensors(load_checkpoint(tmp_path / "resumed" / "last.pt")),
                        model_tensors(load_checkpoint(tmp_path / "whole" / "last.pt")))
    # at an epoch's end the resumed epoch had no step left: it was logged with a loss and throughput of 0.0
    assert [m.train_loss for m in result.history] == [m.train_loss for m in whole.history]
    assert all(m.images_per_s > 0 for m in result.history)


def test_a_snapshot_that_cannot_be_written_is_an_output_error(small: ImageSet, tmp_path: Path) -> None:
    trainer = Trainer(preset("fast", max_steps=2, batch_size=8, val_pairs=50, views=1), small, tmp_path / "run", CPU)
    trainer.fit()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OutputError, match="a-file/snapshot.pt: cannot write"):  # a bare NotADirectoryError before
        trainer.save_snapshot(tmp_path / "a-file" / "snapshot.pt")


def test_a_snapshot_of_a_restored_pause_keeps_its_stream(small: ImageSet, tmp_path: Path) -> None:
    config = preset("fast", epochs=2, batch_size=8, val_pairs=50, views=1)
    Trainer(config, small, tmp_path, CPU).fit(stop_after=3)  # mid-epoch: last.pt holds the epoch's stream
    paused = load_checkpoint(tmp_path / "last.pt")["training"]["generators"][0]
    restored = Trainer(config, small, tmp_path, CPU)
    restored.on_start = lambda: restored.save_snapshot(tmp_path / "snapshot.pt")  # restored, nothing trained yet
    restored.fit(resume=tmp_path / "last.pt", stop_after=4)
    assert torch.equal(load_checkpoint(tmp_path / "snapshot.pt")["training"]["generators"][0], paused)


def test_a_pause_resumed_on_another_kind_of_device_draws_new_pair_streams(
    small: ImageSet, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = preset("fast", max_steps=6, batch_size=8, val_pairs=50, views=1)
    Trainer(config, small, tmp_path, CPU).fit(stop_after=3)
    state = load_checkpoint(tmp_path / "last.pt")
    state["training"]["generators"] = [torch.zeros(16, dtype=torch.uint8)]  # a CUDA generator's (seed, offset)
    save_checkpoint(state, tmp_path / "last.pt")
    seeded: list[tuple[int, ...]] = []
    monkeypatch.setattr(train_module, "seeded_generator", lambda *keys, device: seeded.append(keys) or
                        seeded_generator(*keys, device=device))
    with caplog.at_level(logging.WARNING):
        result = Trainer(config, small, tmp_path, CPU).fit(resume=tmp_path / "last.pt")  # a RuntimeError before
    assert result.history[-1].step == 6
    assert "resuming on cpu a run paused on another kind of device: new pair streams from here on" in caplog.text
    # new indeed: not the paused epoch's first draws again, which its first three steps had used
    assert (config.seed, 0, 0) not in seeded and (config.seed, 0, 0, 3) in seeded


def test_an_extended_run_takes_its_next_step_at_the_new_schedules_rate(small: ImageSet, tmp_path: Path) -> None:
    short = preset("fast", max_steps=6, batch_size=8, val_pairs=50, views=1)
    Trainer(short, small, tmp_path, CPU).fit()  # ended: its optimizer holds the schedule's final, smallest rate
    longer = replace(short, max_steps=20)
    trainer = Trainer(longer, small, tmp_path, CPU)
    rates: list[float] = []
    trainer.on_start = lambda: rates.append(trainer.optimizer.param_groups[0]["lr"])  # restored, nothing trained
    trainer.fit(resume=tmp_path / "last.pt", stop_after=7)
    base = longer.lr * 8 / 64
    expected = base * warm_cosine(6, 20, longer.warmup_fraction, longer.min_lr_fraction)
    assert rates == [pytest.approx(expected)]
    assert rates[0] > 10 * base * warm_cosine(6, 6, short.warmup_fraction, short.min_lr_fraction)  # not the old end


@pytest.mark.parametrize("average_best", [1, 2])
def test_a_lone_last_pt_resumed_elsewhere_gets_a_best_pt(small: ImageSet, tmp_path: Path, average_best: int) -> None:
    config = preset("fast", epochs=3, batch_size=8, val_pairs=50, views=1, average_best=average_best)
    Trainer(config, small, tmp_path / "whole", CPU).fit()
    (tmp_path / "src").mkdir()
    shutil.copy(tmp_path / "whole" / "last.pt", tmp_path / "src" / "last.pt")  # without the best.pt beside it
    result = Trainer(config, small, tmp_path / "new", CPU).fit(resume=tmp_path / "src" / "last.pt")
    best = load_checkpoint(result.best_checkpoint)  # the run failed at its end before: "no such checkpoint"
    expected = load_checkpoint(tmp_path / ("whole/best.pt" if average_best == 2 else "src/last.pt"))
    # average_best 2: the checkpoint keeps the best epochs' weights, so the finished run's best.pt comes back;
    # average_best 1: only the resumed state is left to start from
    assert_same_tensors(best["model"], expected["model"])
    assert best["threshold"] == expected["threshold"]


def test_a_resumed_run_removes_the_temporary_files_of_killed_saves(small: ImageSet, tmp_path: Path) -> None:
    config = preset("fast", max_steps=4, batch_size=8, val_pairs=50, views=1)
    Trainer(config, small, tmp_path, CPU).fit(stop_after=2)
    stale = [tmp_path / ".last.pt.k1ll3d.tmp", tmp_path / ".best.pt.x9.tmp"]  # as a SIGKILL before the rename leaves
    for path in stale:
        path.write_bytes(b"part of a checkpoint")
    (tmp_path / ".notes.tmp").write_text("not ours")
    Trainer(config, small, tmp_path, CPU).fit(resume=tmp_path / "last.pt")
    assert not any(path.exists() for path in stale)
    assert (tmp_path / ".notes.tmp").exists()


def test_a_checkpoint_whose_history_has_keys_of_a_later_version_resumes(small: ImageSet, tmp_path: Path) -> None:
    config = preset("fast", max_steps=6, batch_size=8, val_pairs=50, views=1)
    Trainer(config, small, tmp_path, CPU).fit(stop_after=3)
    state = load_checkpoint(tmp_path / "last.pt")
    state["training"]["history"] = [m | {"val_top5": 0.99} for m in state["training"]["history"]]
    save_checkpoint(state, tmp_path / "last.pt")
    result = Trainer(config, small, tmp_path, CPU).fit(resume=tmp_path / "last.pt")  # a TypeError before
    assert result.history[-1].step == 6


def test_a_resumed_run_rewrites_config_json_with_its_settings(small: ImageSet, tmp_path: Path) -> None:
    config = preset("fast", max_steps=4, batch_size=8, val_pairs=50, views=1)
    Trainer(config, small, tmp_path, CPU).fit()
    Trainer(replace(config, max_steps=6), small, tmp_path, CPU).fit(resume=tmp_path / "last.pt")
    assert json.loads((tmp_path / "config.json").read_text())["train"]["max_steps"] == 6  # kept 4 before


def test_stop_after_a_step_already_taken_is_refused(small: ImageSet, tmp_path: Path) -> None:
    config = preset("fast", epochs=1, batch_size=8, val_pairs=50)
    Trainer(config, small, tmp_path, CPU).fit(stop_after=3)
    with pytest.raises(ConfigError, match="stop after step 2: the run is already at step 3"):
        Trainer(config, small, tmp_path, CPU).fit(resume=tmp_path / "last.pt", stop_after=2)


def test_cli_stop_after_pauses_and_resume_finishes_like_an_unpaused_run(tiny_tree: Path, tmp_path: Path) -> None:
    options = [*TRAIN, "--data", tiny_tree, "--epochs", 2]
    whole = run_cli(*options, "--out", tmp_path / "whole", cwd=tmp_path)
    assert whole.code == 0, whole.stderr
    paused = run_cli(*options, "--out", tmp_path / "paused", "--stop-after", 7, cwd=tmp_path)
    assert paused.code == 0, paused.stderr
    last = tmp_path / "paused" / "last.pt"
    assert paused.stdout.splitlines()[-1] == f"paused at step 7 of 10; continue with: siamese train --resume {last}"
    assert "step 7/10 epoch 2" in paused.stderr  # the schedule still spans 10 steps
    resumed = run_cli(*TRAIN[:3], "--resume", last, "--data", tiny_tree, cwd=tmp_path)
    assert resumed.code == 0, resumed.stderr
    assert f"→ {tmp_path / 'paused'}, resumed at step 7 of 10\n" in resumed.stderr  # a fresh run's line before
    assert "paused at" not in resumed.stdout
    assert_same_tensors(model_tensors(load_checkpoint(last)),
                        model_tensors(load_checkpoint(tmp_path / "whole" / "last.pt")))
    again = run_cli(*TRAIN[:3], "--resume", last, "--data", tiny_tree, cwd=tmp_path)
    assert again.code == 0, again.stderr
    assert f": {last} is at its last step (10), nothing to train\n" in again.stderr


def test_a_pause_names_the_best_epoch_so_far_and_one_before_the_first_epoch_ends_none(
    tiny_tree: Path, tmp_path: Path
) -> None:
    options = [*TRAIN, "--data", tiny_tree, "--epochs", 2]
    whole = run_cli(*options, "--out", tmp_path / "whole", cwd=tmp_path)
    assert whole.code == 0, whole.stderr
    later = run_cli(*options, "--out", tmp_path / "later", "--stop-after", 7, cwd=tmp_path)  # epoch 1 ended at step 5
    best = load_checkpoint(tmp_path / "later" / "best.pt")
    assert best["training"]["step"] == 5
    # the line described the pause's validation at step 7 before, a threshold best.pt does not hold
    assert f"at threshold {best['threshold']:.4f})" in later.stdout.splitlines()[0]
    early = run_cli(*options, "--out", tmp_path / "early", "--stop-after", 3, cwd=tmp_path)
    assert early.code == 0, early.stderr
    assert early.stdout.splitlines()[0] == "no best checkpoint yet: the first epoch ends after the pause"
    assert not (tmp_path / "early" / "best.pt").exists()  # the line named it all the same before
    resumed = run_cli(*TRAIN[:3], "--resume", tmp_path / "early" / "last.pt", "--data", tiny_tree, cwd=tmp_path)
    assert resumed.code == 0, resumed.stderr
    assert "was missing" not in resumed.stderr  # the pause's state became best.pt, with a warning, before
    assert_same_tensors(model_tensors(load_checkpoint(tmp_path / "early" / "best.pt")),
                        model_tensors(load_checkpoint(tmp_path / "whole" / "best.pt")))


@pytest.mark.parametrize("command", ["train", "train-from-inside", "eval", "train-in-an-omniglot-split"])
def test_outputs_inside_the_data_s_image_folders_are_refused(tiny_tree: Path, tmp_path: Path, command: str) -> None:
    tree = shutil.copytree(tiny_tree, tmp_path / "tree")
    split = shutil.copytree(tiny_tree, tmp_path / "omniglot" / "images_background")  # an extracted split
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args, cwd, option = {
        "train": ([*TRAIN, "--data", tree, "--out", tree / "run"], tmp_path, "--out"),
        "train-from-inside": ([*TRAIN, "--data", "."], tree, "--out"),  # the default --out: ./logs/<time>
        "eval": (["eval", "--data", tree, "--device", "cpu", "--plot", tree / "plots"], tmp_path, "--plot"),
        "train-in-an-omniglot-split": ([*TRAIN, "--data", split.parent, "--out", split / "run"], tmp_path, "--out"),
    }[command]
    run = run_cli(*args, cwd=cwd)
    # a run folder there became a class of the tree ("1 class(es) have fewer than 2 images: logs/…"), pictures a
    # character "plots/…" of their own
    assert_refused(run, f"whose next load would read its files as images; choose {option} outside it")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if ".cli-" not in p.name) == before


def test_a_hidden_folder_inside_a_custom_tree_may_hold_a_run(tiny_tree: Path, tmp_path: Path) -> None:
    tree = shutil.copytree(tiny_tree, tmp_path / "tree")
    run = run_cli(*TRAIN, "--data", tree, "--out", tree / ".runs" / "first", "--max-steps", 2, cwd=tmp_path)
    assert run.code == 0, run.stderr  # never read as images: every hidden file and folder is skipped
    assert len(load_folder(tree)) == len(load_folder(tiny_tree))


# --- non-finite loss ---------------------------------------------------------------------------------


def test_a_diverging_run_stops_at_the_next_log_interval(tiny_tree: Path, tmp_path: Path) -> None:
    run = run_cli(*TRAIN, "--data", tiny_tree, "--out", tmp_path / "run", "--lr", "1e30", cwd=tmp_path)
    line = assert_fails_once_started(run, "the loss became nan by step 2; no checkpoint had been saved yet")
    assert line.endswith("— lower --lr")  # and "or turn off --amp" before, which was off
    assert "step 1/" in run.stderr  # step 1 was still finite, and reported
    assert not list((tmp_path / "run").glob("*.pt")) and not list((tmp_path / "run").glob(".*tmp"))


@pytest.mark.parametrize(("amp", "advice"), [(False, "lower --lr"), (True, "lower --lr or pass --no-amp")])
def test_divergence_between_log_intervals_is_caught_before_saving(
    small: ImageSet, tmp_path: Path, amp: bool, advice: str
) -> None:
    """Progress is logged every 1,000 steps, the epoch ends at step 5: the epoch's end checks the loss."""
    from siamese_omniglot.errors import TrainingError

    config = preset("fast", epochs=2, batch_size=8, val_pairs=50, log_every=1000, lr=1e30, amp=amp)
    told = f"stopped being finite by step 5; no checkpoint had been saved yet — {advice}$"
    with pytest.raises(TrainingError, match=told):
        Trainer(config, small, tmp_path, CPU).fit()
    assert not list(tmp_path.glob("*.pt"))


def test_divergence_keeps_the_last_good_checkpoint(tiny_tree: Path, tmp_path: Path) -> None:
    """A run paused after one good epoch, then resumed with its learning rate raised 1e30-fold in the
    checkpoint's settings: the resumed run fails naming the step, and last.pt is left as it was, byte for byte."""
    out = tmp_path / "run"
    good = run_cli(*TRAIN, "--data", tiny_tree, "--out", out, "--epochs", 3, "--stop-after", 5, cwd=tmp_path)
    assert good.code == 0, good.stderr
    state = load_checkpoint(out / "last.pt")
    state["train_config"]["lr"] *= 1e30  # a resumed run takes its rate from its settings, at the step reached
    save_checkpoint(state, out / "last.pt")
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt")}
    run = run_cli(*TRAIN[:3], "--resume", out / "last.pt", "--data", tiny_tree, cwd=tmp_path)
    assert_fails_once_started(run, "the loss became nan by step 7; the last good checkpoint is kept")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert load_checkpoint(out / "last.pt")["training"]["step"] == 5


# --- hostile images: compare ----------------------------------------------------------------------------


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` × ``height`` pixels in a few dozen bytes (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")



@pytest.mark.parametrize(("width", "height"), [(0, 8), (8, 0), (0, 0)])
def test_a_png_header_of_zero_size_is_refused(width: int, height: int) -> None:
    """Refused when opened (Pillow 12 and 13 alike): a DataError, never a crash in the canvas fitting."""
    with pytest.raises(DataError, match=r"^zero\.png: not a readable image \("):
        decode_image(header_only_png(width, height), "zero.png")

def refused_images(folder: Path, drawing: Path) -> dict[str, tuple[Path, str]]:
    """Files compare must refuse: path and the message's key words."""
    data = drawing.read_bytes()
    (folder / "folder.png").mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "text.png").write_text("this is a text file, not a picture\n")
    (folder / "bomb.png").write_bytes(header_only_png(20_000, 20_000))
    return {
        "missing": (folder / "missing.png", "no such file"),
        "directory": (folder / "folder.png", "is a directory, not an image file"),
        "empty": (folder / "empty.png", "empty file"),
        "truncated": (folder / "truncated.png", "not a readable image"),
        "text": (folder / "text.png", "not a readable image"),
        "bomb-20000x20000": (folder / "bomb.png", "image too large (more than 64,000,000 pixels)"),
    }


def accepted_images(folder: Path, drawing: Path) -> dict[str, tuple[Path, int]]:
    """The same drawing in other modes and containers: path and the largest pixel difference allowed."""
    with Image.open(drawing) as image:
        gray = image.convert("L")
    ink = Image.eval(gray, lambda v: 255 - v)
    black = Image.new("L", gray.size, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: store it turned the other way
    variants = {
        "sixteen-bit.png": (Image.fromarray(np.asarray(gray).astype(np.uint16) * 257), {}),
        "rgba.png": (Image.merge("RGBA", [black, black, black, ink]), {}),
        "palette.png": (gray.convert("P"), {}),
        "cmyk.jpg": (Image.merge("CMYK", [black, black, black, ink]), {"quality": 100}),
        "exif-rotated.png": (gray.transpose(Image.Transpose.ROTATE_90), {"exif": exif.tobytes()}),
        "字符 ünïcødé.png": (gray, {}),
    }
    found = {}
    for name, (image, options) in variants.items():
        image.save(folder / name, **options)
        found[name] = (folder / name, 60 if name.endswith(".jpg") else 0)
    return found


@pytest.fixture(scope="module")
def image_files(drawing: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("images")
    return {"refused": refused_images(folder, drawing), "accepted": accepted_images(folder, drawing)}


def test_odd_modes_decode_to_the_same_drawing(image_files: dict, drawing: Path) -> None:
    plain = read_image(drawing).astype(int)
    for name, (path, tolerance) in image_files["accepted"].items():
        difference = np.abs(read_image(path).astype(int) - plain)
        assert difference.max() <= tolerance, name
        assert difference.mean() < 1, name


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "truncated", "text", "bomb-20000x20000"])
def test_compare_refuses_unreadable_images(case: str, image_files: dict, drawing: Path, weights: Path,
                                           tmp_path: Path) -> None:
    path, message = image_files["refused"][case]
    run = run_cli("compare", drawing, path, "--checkpoint", weights, "--device", "cpu", cwd=tmp_path)
    assert assert_refused(run, message).startswith(f"error: {path}: ")


def test_compare_accepts_odd_modes_as_the_same_drawing(image_files: dict, drawing: Path, weights: Path,
                                                       tmp_path: Path) -> None:
    def score(path: Path) -> float:
        run = run_cli("compare", drawing, path, "--checkpoint", weights, "--device", "cpu", "--json", cwd=tmp_path)
        assert run.code == 0 and run.stderr == "", (path.name, run.stderr)
        return json.loads(run.stdout)["score"]

    itself = score(drawing)
    for name, (path, tolerance) in image_files["accepted"].items():
        if tolerance == 0:  # the same pixels, so the same embedding and score
            assert score(path) == itself, name
        else:
            assert abs(score(path) - itself) < 0.05, name


def test_compare_bomb_through_the_console_script(image_files: dict, drawing: Path, weights: Path,
                                                 tmp_path: Path) -> None:
    path, message = image_files["refused"]["bomb-20000x20000"]
    started = time.monotonic()
    run = run_console_script("compare", drawing, path, "--checkpoint", weights, "--device", "cpu", cwd=tmp_path)
    assert_refused(run, message)
    assert time.monotonic() - started < 120  # refused from the header, never decoded


# --- hostile checkpoints: compare, eval, train --resume -------------------------------------------------


class Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def hostile_checkpoints(folder: Path, weights: Path) -> dict[str, tuple[Path, str]]:
    data = weights.read_bytes()
    (folder / "folder.pt").mkdir()
    (folder / "empty.pt").write_bytes(b"")
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    (folder / "text.pt").write_text("not a checkpoint\n")
    torch.save(model_state() | {"format_version": FORMAT_VERSION, "x": Payload(folder / "payload-ran")},
               folder / "pickle.pt")
    save_checkpoint(model_state() | {"format_version": FORMAT_VERSION + 1}, folder / "newer.pt")
    save_checkpoint(model_state() | {"format_version": "1"}, folder / "version-text.pt")
    other = model_state(width=8, blocks=2)
    save_checkpoint(model_state() | {"model": other["model"]}, folder / "other-weights.pt")
    save_checkpoint(model_state() | {"model_config": {**other["model_config"], "backbone": "resnet"}},
                    folder / "other-backbone.pt")
    save_checkpoint(model_state() | {"model_config": {**other["model_config"], "layers": 3}},
                    folder / "newer-config.pt")
    return {
        "missing": (folder / "missing.pt", "no such checkpoint"),
        "directory": (folder / "folder.pt", "is a directory, not a checkpoint file"),
        "empty": (folder / "empty.pt", "not a readable checkpoint"),
        "truncated": (folder / "truncated.pt", "not a readable checkpoint"),
        "text": (folder / "text.pt", "not a readable checkpoint"),
        "pickled-code": (folder / "pickle.pt", "refused: it holds objects other than tensors and plain values"),
        "newer-format": (folder / "newer.pt", f"checkpoint format {FORMAT_VERSION + 1} is newer than this version"),
        "version-not-a-number": (folder / "version-text.pt", "format_version has the wrong type"),
        "other-model-weights": (folder / "other-weights.pt",
                                'weights do not fit its model config (Missing key(s) in state_dict: "embedding.'),
        "unknown-backbone": (folder / "other-backbone.pt", "its model config cannot be built (unknown backbone"),
        "newer-model-setting": (folder / "newer-config.pt", "unknown model settings ['layers']"),
    }


@pytest.fixture(scope="module")
def checkpoints(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("checkpoints")
    return folder, hostile_checkpoints(folder, weights)


CHECKPOINT_CASES = ["missing", "directory", "empty", "truncated", "text", "pickled-code", "newer-format",
                    "version-not-a-number", "other-model-weights", "unknown-backbone", "newer-model-setting"]


@pytest.mark.parametrize("command", ["compare", "eval"])
@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_hostile_checkpoints_are_refused(case: str, command: str, checkpoints: tuple[Path, dict], drawing: Path,
                                         mini_evaluation: Path, tmp_path: Path) -> None:
    folder, cases = checkpoints
    path, message = cases[case]
    if command == "compare":
        run = run_cli("compare", drawing, drawing, "--checkpoint", path, "--device", "cpu", cwd=tmp_path)
    else:
        run = run_cli("eval", path, "--data", mini_evaluation, "--device", "cpu", cwd=tmp_path)
    assert assert_refused(run, message).startswith(f"error: {path}: ")
    assert not (folder / "payload-ran").exists()


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "pickled-code", "newer-format"])
def test_hostile_checkpoints_are_refused_by_resume(case: str, checkpoints: tuple[Path, dict], tiny_tree: Path,
                                                   tmp_path: Path) -> None:
    folder, cases = checkpoints
    path, message = cases[case]
    assert_refused(run_cli(*TRAIN[:3], "--resume", path, "--data", tiny_tree, cwd=tmp_path), message)
    assert not (folder / "payload-ran").exists()


def test_resume_from_weights_without_training_state_is_refused(weights: Path, tiny_tree: Path,
                                                               tmp_path: Path) -> None:
    run = run_cli(*TRAIN[:3], "--resume", weights, "--data", tiny_tree, cwd=tmp_path)
    assert_refused(run, "holds no training settings; cannot resume from it")


# --- hostile data: train and eval ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def damaged_tree(tiny_tree: Path, drawing: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tree under a non-ASCII name, with four bad files among its 60 good ones."""
    root = tmp_path_factory.mktemp("damaged") / "données ü"
    shutil.copytree(tiny_tree, root, ignore=shutil.ignore_patterns(".*"))
    classes = sorted(p for p in root.glob("*/*") if p.is_dir())
    data = drawing.read_bytes()
    (classes[0] / "truncated.png").write_bytes(data[: len(data) // 3])
    (classes[1] / "text.png").write_text("not an image\n")
    (classes[2] / "empty.png").write_bytes(b"")
    (classes[3] / "bomb.png").write_bytes(header_only_png(20_000, 20_000))
    return root


def test_train_lists_every_bad_image_when_indexing(damaged_tree: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    run = run_cli(*TRAIN, "--data", damaged_tree, "--out", tmp_path / "run", cwd=tmp_path)
    line = assert_refused(run, f"{damaged_tree}: 4 of 64 images cannot be read: ")
    for name in ("truncated.png: not a readable image", "text.png: not a readable image", "empty.png: not a "
                 "readable image", "bomb.png: image too large"):
        assert name in line
    assert line.endswith("fix or remove them, or skip them with --skip-bad-images")
    assert time.monotonic() - started < 60  # found while indexing, before any training
    assert not (tmp_path / "run").exists()


def test_train_skips_bad_images_when_asked(damaged_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = run_cli(*TRAIN, "--data", damaged_tree, "--out", out, "--skip-bad-images", "--stop-after", 1, cwd=tmp_path)
    assert run.code == 0, run.stderr
    warning = next(line for line in run.stderr.splitlines() if line.startswith("WARNING"))
    assert "skipping 4 unreadable images" in warning and "bomb.png" in warning
    assert load_checkpoint(out / "last.pt")["training"]["step"] == 1
    assert not list((damaged_tree / ".siamese-cache").glob("*")), "a set with skipped images must not be cached"


def test_skipping_can_leave_a_class_out(tiny_tree: Path, tmp_path: Path) -> None:
    from siamese_omniglot.data.folders import decode_index, index_paths

    paths = sorted(p.relative_to(tiny_tree).as_posix() for p in tiny_tree.rglob("*.png"))
    bad = set(paths[1:10])  # 9 of the first class's 10 drawings

    def read(relative: str) -> bytes:
        return b"garbage" if relative in bad else (tiny_tree / relative).read_bytes()

    index = index_paths(paths, "tree")
    with pytest.raises(DataError, match=r"tree: 9 of 60 images cannot be read: .*; … and 4 more; fix or remove"):
        decode_index(index, read, source="tree")
    images = decode_index(index, read, skip_bad=True, source="tree")
    assert images.num_classes == 5 and len(images) == 50
    assert index.class_names[0] not in images.class_names


@pytest.mark.parametrize("command", ["train", "eval"])
def test_data_that_is_a_file_or_missing_is_refused(command: str, weights: Path, drawing: Path,
                                                   tmp_path: Path) -> None:
    empty_mirror = tmp_path / "mirror"
    empty_mirror.mkdir()
    head = [*TRAIN, "--out", tmp_path / "run"] if command == "train" else ["eval", weights, "--device", "cpu"]
    assert_refused(run_cli(*head, "--data", drawing, cwd=tmp_path), "is a file; --data must name a folder")
    missing = tmp_path / "no" / "such" / "folder"
    split = "images_background.zip" if command == "train" else "images_evaluation.zip"
    run = run_cli(*head, "--data", missing, "--mirror", empty_mirror, cwd=tmp_path)
    assert_refused(run, f"mirror {empty_mirror} has no {split}")
    assert not (tmp_path / "no").exists()  # the folders made for a failed download are removed again


def test_eval_lists_bad_images_and_reads_non_ascii_paths(damaged_tree: Path, weights: Path, mini_evaluation: Path,
                                                         tmp_path: Path) -> None:
    run = run_cli("eval", weights, "--data", damaged_tree, "--device", "cpu", cwd=tmp_path)
    assert_refused(run, "4 of 64 images cannot be read")
    unicode_data = tmp_path / "évaluation 字"
    copy_tree(mini_evaluation, unicode_data, 1, 6, 4)
    run = run_cli("eval", weights, "--data", unicode_data, "--way", 3, "--trials", 10, "--pairs", 10,
                  "--device", "cpu", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert json.loads(run.stdout)["verification"]["pairs"] == 20
    assert_refused(run_cli("eval", weights, "--data", unicode_data, "--runs", tmp_path / "nope.zip", "--device",
                           "cpu", cwd=tmp_path), "no such file or folder (expected Lake's all_runs.zip)")


def test_eval_skips_bad_images_when_asked(damaged_tree: Path, weights: Path, tmp_path: Path) -> None:
    run = run_cli("eval", weights, "--data", damaged_tree, "--skip-bad-images", "--way", 3, "--trials", 10,
                  "--pairs", 10, "--device", "cpu", "--json", cwd=tmp_path)  # "No such option" before
    assert run.code == 0, run.stderr
    assert "skipping 4 unreadable images" in run.stderr
    assert json.loads(run.stdout)["one_shot"]["trials"] == 10


# --- outputs that cannot be written ---------------------------------------------------------------------


def test_train_on_data_too_small_to_split_leaves_no_run_folder(mini_background: Path, tmp_path: Path) -> None:
    tree = copy_tree(mini_background, tmp_path / "two", 1, 2, 4)
    run = run_cli(*TRAIN, "--data", tree, "--out", tmp_path / "run", cwd=tmp_path)
    assert_refused(run, "2 classes are too few to hold out validation classes")
    assert not (tmp_path / "run").exists()


def test_train_resume_refuses_the_folder_of_another_run(tiny_tree: Path, tmp_path: Path) -> None:
    first = run_cli(*TRAIN, "--data", tiny_tree, "--out", tmp_path / "first", "--max-steps", 2, cwd=tmp_path)
    assert first.code == 0, first.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "best.pt").write_bytes(b"another run's checkpoint")
    run = run_cli(*TRAIN[:3], "--resume", tmp_path / "first" / "last.pt", "--data", tiny_tree, "--out", other,
                  cwd=tmp_path)
    assert_refused(run, f"{other}: already holds checkpoints")
    assert [p.name for p in other.iterdir()] == ["best.pt"]
    assert (other / "best.pt").read_bytes() == b"another run's checkpoint"


def test_train_resume_refused_after_start_up_leaves_no_new_folder(tiny_tree: Path, tmp_path: Path) -> None:
    first = run_cli(*TRAIN, "--data", tiny_tree, "--out", tmp_path / "first", "--max-steps", 2, cwd=tmp_path)
    assert first.code == 0, first.stderr
    run = run_cli(*TRAIN[:3], "--resume", tmp_path / "first" / "last.pt", "--data", tiny_tree, "--out",
                  tmp_path / "new", "--stop-after", 1, cwd=tmp_path)
    assert_refused(run, "stop after step 1: the run is already at step 2")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--seed", 2**64], f"invalid setting seed={2**64}: must fit in 64 bits"),
        (["--lr", "inf"], "invalid setting lr=inf: must be a finite number > 0"),
        (["--pretrained"], "pretrained weights exist only for the vgg16 network (preset seed), not 'fast'"),
        (["--batch-size", 100_000], "batch size 100000 exceeds the"),
    ],
    ids=["seed-beyond-64-bits", "infinite-lr", "pretrained-fast", "batch-beyond-the-data"],
)
def test_train_refuses_settings_it_cannot_honour(options: list, message: str, tiny_tree: Path,
                                                 tmp_path: Path) -> None:
    run = run_cli(*TRAIN, "--data", tiny_tree, "--out", tmp_path / "run", *options, cwd=tmp_path)
    assert_refused(run, message)
    assert not (tmp_path / "run").exists()


def test_resume_refuses_an_end_before_the_step_reached(tiny_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    paused = run_cli(*TRAIN, "--data", tiny_tree, "--out", out, "--epochs", 2, "--stop-after", 3, cwd=tmp_path)
    assert paused.code == 0, paused.stderr
    before = {path.name: path.read_bytes() for path in out.glob("*.pt")}
    run = run_cli(*TRAIN[:3], "--resume", out / "last.pt", "--data", tiny_tree, "--max-steps", 2, cwd=tmp_path)
    assert_refused(run, "the run is already at step 3, past its last step 2 (epochs 2, max steps 2)")
    assert {path.name: path.read_bytes() for path in out.glob("*.pt")} == before


@pytest.mark.parametrize("pause", [[], ["--stop-after", 1]], ids=["ended", "paused"])
def test_resume_refuses_more_epochs_that_the_kept_step_limit_would_not_train(tiny_tree: Path, tmp_path: Path,
                                                                           pause: list) -> None:
    out = tmp_path / "run"
    ended = run_cli(*TRAIN, "--data", tiny_tree, "--out", out, "--epochs", 1, "--max-steps", 2, *pause, cwd=tmp_path)
    assert ended.code == 0, ended.stderr
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    # before: it ended at step 2 all the same (ended: with no step taken and the old result printed again), exit
    # code 0, config.json saying 3 epochs
    run = run_cli(*TRAIN[:3], "--resume", out / "last.pt", "--data", tiny_tree, "--epochs", 3, cwd=tmp_path)
    assert_refused(run, "--epochs 3: the run's max steps 2, which a resume keeps, end it at step 2 first; pass a "
                        "larger --max-steps too")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    longer = run_cli(*TRAIN[:3], "--resume", out / "last.pt", "--data", tiny_tree, "--epochs", 3, "--max-steps", 3,
                     cwd=tmp_path)
    assert longer.code == 0, longer.stderr


def test_resume_with_more_epochs_trains_on_where_the_epochs_ended_the_run(small: ImageSet, tiny_tree: Path,
                                                                           tmp_path: Path) -> None:
    per_epoch = Trainer(preset("fast", batch_size=8), small, tmp_path / "unused", CPU).steps_per_epoch
    assert per_epoch > 1
    out = tmp_path / "run"
    ended = run_cli(*TRAIN, "--data", tiny_tree, "--out", out, "--epochs", 1, "--max-steps", per_epoch + 1,
                    cwd=tmp_path)
    assert ended.code == 0, ended.stderr
    assert load_checkpoint(out / "last.pt")["training"]["step"] == per_epoch  # its epoch, not its limit, ended it
    # more epochs train on to the kept limit: refused for a while, as though the limit had ended the run
    run = run_cli(*TRAIN[:3], "--resume", out / "last.pt", "--data", tiny_tree, "--epochs", 2, cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert load_checkpoint(out / "last.pt")["training"]["step"] == per_epoch + 1


def test_resume_reports_progress_at_a_new_interval(tiny_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    paused = run_cli(*TRAIN, "--data", tiny_tree, "--out", out, "--epochs", 1, "--log-every", 100, "--stop-after", 1,
                     cwd=tmp_path)
    assert paused.code == 0, paused.stderr
    resumed = run_cli(*TRAIN[:3], "--resume", out / "last.pt", "--data", tiny_tree, "--log-every", 1, cwd=tmp_path)
    assert resumed.code == 0, resumed.stderr
    assert [f"step {step}/5" in resumed.stderr for step in range(2, 6)] == [True] * 4
    lines = [line for line in resumed.stderr.splitlines() if line.startswith("step ")]
    # the time left, from the steps timed since the first report, up to the last
    assert [line.endswith(" left") for line in lines] == [False, True, True, False], lines


def test_eval_refuses_sizes_beyond_memory(weights: Path, tmp_path: Path) -> None:
    run = run_cli("eval", weights, "--pairs", 10**8, "--device", "cpu", cwd=tmp_path)
    assert_refused(run, "--pairs 100000000: at most 10,000,000 same and different pairs each fit in memory")
    run = run_cli("eval", weights, "--trials", 10**5, "--way", 20, "--shot", 6, "--device", "cpu", cwd=tmp_path)
    assert_refused(run, "--trials 100000 × --way 20 × --shot 6: at most 10,000,000 support images in all fit in memory")


def test_train_refuses_an_out_folder_under_a_file(tiny_tree: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    run = run_cli(*TRAIN, "--data", tiny_tree, "--out", tmp_path / "file" / "run", cwd=tmp_path)
    assert_refused(run, "cannot write there (Not a directory)")


def test_train_refuses_a_read_only_out_folder(tiny_tree: Path, tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "read-only", "ro,size=64k") as folder:
        run = run_cli(*TRAIN, "--data", tiny_tree, "--out", folder / "run", cwd=tmp_path)
        assert_refused(run, "cannot write there (Read-only file system)")


@pytest.mark.parametrize(("size", "written"), [("256k", set()), ("4800k", {"last.pt"})],
                         ids=["no-room-for-a-checkpoint", "room-for-one"])
def test_train_on_a_full_disk_fails_cleanly(tiny_tree: Path, tmp_path: Path, size: str, written: set) -> None:
    """A checkpoint takes about 3.2 MB: on a 256 kB disk none fits, on a 4.8 MB one last.pt fits and best.pt
    does not. Either way: one error line, exit 2, no partial or temporary file, what was written loads."""
    with mounted_tmpfs(tmp_path / "disk", f"size={size}") as disk:
        out = disk / "run"
        run = run_cli(*TRAIN, "--data", tiny_tree, "--out", out, cwd=tmp_path)
        line = assert_fails_once_started(run, "cannot write (No space left on device)")
        assert (f"{out / 'best.pt'}" if written else f"{out / 'last.pt'}") in line
        assert {p.name for p in out.glob("*.pt")} == written
        for name in written:
            assert load_checkpoint(out / name)["training"]["step"] == 5
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def siamese_into(stdout: int | None, *args: object, cwd: Path, close_after_a_line: bool = False) -> Run:
    """The installed ``siamese`` with standard output on descriptor ``stdout`` (``None``: closed), or on a pipe
    whose reader closes it after the first line (``close_after_a_line``)."""
    env = console_env()
    command = [SIAMESE, *map(str, args)]
    if close_after_a_line:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env)
        first = child.stdout.readline()
        child.stdout.close()
        stderr = child.stderr.read().decode()
        return Run(child.wait(timeout=600), first.decode(), stderr)
    if stdout is None:
        command = ["sh", "-c", 'exec "$@" 1>&-', "sh", *command]
    done = subprocess.run(command, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=600, cwd=cwd, env=env)
    return Run(done.returncode, "", done.stderr)


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_result_standard_output_cannot_take_is_one_error_line(
    drawing: Path, weights: Path, tmp_path: Path, as_json: bool
) -> None:
    compare = ("compare", drawing, drawing, "--checkpoint", weights, "--device", "cpu", *(["--json"] * as_json))
    full = os.open("/dev/full", os.O_WRONLY)
    try:  # a traceback ending in "OSError: [Errno 28]" and exit code 1 before
        assert_refused(siamese_into(full, *compare, cwd=tmp_path),
                       "standard output: cannot write the result (No space left on device)")
    finally:
        os.close(full)
    # the result was dropped with exit code 0 before
    assert_refused(siamese_into(None, *compare, cwd=tmp_path), "standard output is closed")


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(drawing: Path, weights: Path, tmp_path: Path) -> None:
    """``siamese classify … | head -1``: exit code 1 from Rich before, which no document named."""
    for name in ("a", "b"):
        (tmp_path / "support" / name).mkdir(parents=True)
        shutil.copy(drawing, tmp_path / "support" / name / "one.png")
    queries = [drawing] * 2000  # more lines than the pipe holds
    run = siamese_into(None, "classify", *queries, "--support", tmp_path / "support", "--checkpoint", weights,
                       "--device", "cpu", "--no-cache", cwd=tmp_path, close_after_a_line=True)
    assert run.code == READER_GONE == 141
    assert run.stdout == f"{drawing}\n"
    assert run.stderr.startswith("support ") and len(run.stderr.splitlines()) == 1, run.stderr


def test_names_reach_standard_output_as_they_are_under_any_encoding(
    drawing: Path, weights: Path, tmp_path: Path
) -> None:
    """Rich read ``:smile:`` in a name as an emoji, and a strict standard output refused a name's undecodable bytes
    with a traceback."""
    for name in ("c:smile:", "d"):
        (tmp_path / "support" / name).mkdir(parents=True)
        shutil.copy(drawing, tmp_path / "support" / name / "one.png")
    query = Path(os.fsdecode(bytes(tmp_path) + b"/q:smile:\xe9.png"))
    shutil.copy(drawing, query)
    env = console_env()
    classify = [SIAMESE, "classify", query, "--support", tmp_path / "support", "--checkpoint", weights, "--device",
                "cpu", "--no-cache", "-k", "2"]
    shown = subprocess.run(classify, capture_output=True, env=env | {"PYTHONIOENCODING": "utf-8:strict"}, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr.decode()
    lines = shown.stdout.decode("utf-8").splitlines()
    assert lines[0] == f"{tmp_path}/q:smile:\\xe9.png"  # as error messages show such bytes
    assert {line.split()[1] for line in lines[1:]} == {"c:smile:", "d"}
    as_json = subprocess.run([*classify, "--json"], capture_output=True, env=env, cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr.decode()
    report = json.loads(as_json.stdout.decode("utf-8"))
    assert report["results"][0]["query"] == str(query)
    assert {match["class"] for match in report["results"][0]["matches"]} == {"c:smile:", "d"}


# --- downloads and archives -----------------------------------------------------------------------------


class _ShortBody(http.server.BaseHTTPRequestHandler):
    """Promises 10,000 bytes and sends 4,000, then hangs up: a dropped connection."""

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        self.send_response(200)
        self.send_header("Content-Length", "10000")
        self.end_headers()
        self.wfile.write(b"PK" + bytes(3998))
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


def test_a_dropped_download_is_never_taken_as_complete(tmp_path: Path) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _ShortBody)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        mirror = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(DataError, match=r"download of images_background.zip stopped after 4,000 of 10,000 bytes"):
            fetch_archive("images_background.zip", tmp_path, mirror)
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    assert list(tmp_path.iterdir()) == []  # neither the archive nor its .part file


def test_an_interrupted_download_leaves_no_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "images_background.zip").write_bytes(b"PK" + bytes(3 << 20))
    real_copy = omniglot_module._copy_stream

    def interrupted(source, sink, total, what, progress):
        sink.write(source.read(1 << 20))
        raise KeyboardInterrupt  # Ctrl-C halfway

    monkeypatch.setattr(omniglot_module, "_copy_stream", interrupted)
    root = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        fetch_archive("images_background.zip", root, str(mirror))
    assert not root.exists() or list(root.iterdir()) == []
    # a .part file that a killed process left behind is never mistaken for the archive
    root.mkdir(exist_ok=True)
    (root / ".images_background.zip.x1y2.part").write_bytes(b"PK half")
    assert find_split(root, BACKGROUND) is None
    monkeypatch.setattr(omniglot_module, "_copy_stream", real_copy)
    assert fetch_archive("images_background.zip", root, str(mirror)).read_bytes() == b"PK" + bytes(3 << 20)


@pytest.mark.parametrize(
    "entry",
    ["../evil.png", "/tmp/evil.png", "images_background/../../evil.png", "C:/evil.png", "..\\evil.png",
     "\\evil.png", "images_background/a/b/../../../../evil.png"],
)
def test_archive_entries_that_escape_are_refused(entry: str, tmp_path: Path, drawing: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    with zipfile.ZipFile(root / "images_background.zip", "w") as archive:
        archive.writestr("images_background/Alphabet/character01/a.png", drawing.read_bytes())
        archive.writestr(entry, drawing.read_bytes())
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    with pytest.raises(DataError, match="refusing unsafe archive entry .* points outside the archive"):
        load_split("background", root, download=False)
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip"]


# --- the data cache on a full disk ---------------------------------------------------------------------


def test_a_cache_that_cannot_be_written_leaves_no_partial_file(tiny_tree: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(tiny_tree, tree, ignore=shutil.ignore_patterns(".*"))

    def full_disk(file, **arrays):
        file.write(b"PK\x03\x04 a partial cache")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with caplog.at_level(logging.WARNING):
        images = load_folder(tree)
    assert len(images) == 60
    assert "cannot write cache" in caplog.text and "No space left on device" in caplog.text
    assert list((tree / ".siamese-cache").iterdir()) == []
