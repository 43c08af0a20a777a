"""The installed ``siamese`` command, run as a subprocess: help, train, eval, compare and its error lines."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SIAMESE = shutil.which("siamese") or str(Path(sys.executable).parent / "siamese")


def siamese(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """Run the console script in ``cwd`` with no SIAMESE_* settings inherited, on one CPU thread.

    One thread: these tiny models gain nothing from more, and on a busy two-core runner several
    spinning OpenMP threads make a training step ten times slower.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIAMESE_")} | {"OMP_NUM_THREADS": "1"}
    command = [SIAMESE, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def trained(
    mini_background: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess, Path]:
    """One short CLI training run, shared by the tests below (its folder name holds Rich markup brackets)."""
    work = tmp_path_factory.mktemp("cli")
    out = work / "run[v1]"
    options = ["--max-steps", "20", "--batch-size", "32", "--device", "cpu"]
    result = siamese("train", "--data", mini_background, "--out", out, *options, cwd=work)
    return result, out


@pytest.fixture(scope="module")
def checkpoint(trained: tuple[subprocess.CompletedProcess, Path]) -> Path:
    result, out = trained
    assert result.returncode == 0, result.stderr
    return out / "best.pt"


@pytest.fixture(scope="module")
def image_pair(mini_evaluation: Path) -> tuple[Path, Path]:
    first, second = sorted(mini_evaluation.glob("*/*/*.png"))[:2]
    return first, second


@pytest.mark.parametrize(
    "command", [[SIAMESE], [sys.executable, "-m", "siamese_omniglot"]], ids=["console-script", "python-m"]
)
def test_help_lists_the_commands(command: list[str], tmp_path: Path) -> None:
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name, summary in [
        ("train", "Train a Siamese network"),
        ("eval", "Evaluate on alphabets never seen"),
        ("compare", "Say whether two images show the same"),
    ]:
        assert f" {name} " in result.stdout and summary in result.stdout


def test_version_is_the_installed_distribution_s(tmp_path: Path) -> None:
    from importlib.metadata import version

    result = siamese("--version", cwd=tmp_path)
    told = f"siamese-omniglot {version('siamese-omniglot')}\n"
    assert (result.returncode, result.stdout, result.stderr) == (0, told, "")


def _run_logging_imports(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, set[str], list[str]]:
    """``python -X importtime -m siamese_omniglot ARGS``: the run, the modules it imported (from the log on standard
    error) and the rest of its standard error."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "siamese_omniglot", *args],
                            capture_output=True, text=True, timeout=120, cwd=cwd)
    log = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    told = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    return result, {line.rsplit("|", 1)[-1].strip() for line in log}, told


def test_help_answers_without_loading_torch(tmp_path: Path) -> None:
    """Torch takes seconds to import; --version and every --help answer without it, so they answer at once."""
    from siamese_omniglot.cli import app

    commands = [command.name or command.callback.__name__ for command in app.registered_commands]
    for args in [["--version"], ["--help"], *([name, "--help"] for name in commands)]:
        result, imported, _ = _run_logging_imports(args, tmp_path)
        assert result.returncode == 0 and ("Usage:" in result.stdout or args == ["--version"]), result.stderr[-2000:]
        assert "siamese_omniglot.cli" in imported and "torch" not in imported, args


@pytest.mark.parametrize(("args", "told"), [
    (["compare", "a.png", "b.png", "--device", "gpu"],
     "error: unknown device 'gpu': use auto, cpu, cuda, cuda:N, sdaa or sdaa:N"),
    (["train", "--preset", "fsat"], "error: unknown preset 'fsat': choose one of fast, wide, koch, seed"),
], ids=["device", "preset"])
def test_a_misspelt_device_or_preset_is_refused_before_torch_loads(args: list[str], told: str, tmp_path: Path) -> None:
    result, imported, lines = _run_logging_imports(args, tmp_path)
    assert (result.returncode, result.stdout, lines) == (2, "", [told])
    assert "torch" not in imported  # seconds of loading, to be told of a typo, before


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches /proc/<pid>/maps for torch's library")
@pytest.mark.parametrize(("command", "rank", "told"), [
    ("compare", None, "interrupted\n"),
    ("train", "1", ""),  # a training job's rank 1: rank 0 tells it
], ids=["compare", "train-rank-1"])
def test_ctrl_c_while_torch_loads_is_one_line(
    command: str, rank: str | None, told: str, image_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """Ctrl-C during the seconds torch takes to load gave a KeyboardInterrupt traceback from the package import."""
    args = [*image_pair] if command == "compare" else ["--data", tmp_path / "data", "--out", tmp_path / "run"]
    env = os.environ | ({} if rank is None else {"WORLD_SIZE": "2", "RANK": rank})
    process = subprocess.Popen([SIAMESE, command, *args, "--device", "cpu"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 60
    while "libtorch" not in maps.read_text():  # torch's C++ library is mapped: torch is loading
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert (process.returncode, out, err) == (130, "", told)


INTERRUPT_WHILE_IMPORTING = """\
import os, signal, sys


class InterruptWhileImporting:
    \"\"\"Sends this process a Ctrl-C (SIGINT) when {module} starts to be imported.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)


sys.meta_path.insert(0, InterruptWhileImporting())
"""


@pytest.mark.parametrize(("rank", "told"), [(None, "interrupted\n"), ("1", "")], ids=["alone", "rank-1"])
def test_ctrl_c_while_the_command_line_loads_is_one_line(rank: str | None, told: str, tmp_path: Path) -> None:
    """Ctrl-C in the first tenths of a second, while typer and rich import, gave a KeyboardInterrupt traceback."""
    (tmp_path / "sitecustomize.py").write_text(INTERRUPT_WHILE_IMPORTING.format(module="typer"))
    env = os.environ | {"PYTHONPATH": str(tmp_path)} | ({} if rank is None else {"WORLD_SIZE": "2", "RANK": rank})
    for command in ([SIAMESE], [sys.executable, "-m", "siamese_omniglot"]):
        result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, env=env)
        assert (result.returncode, result.stdout, result.stderr) == (130, "", told), command


def test_train_writes_a_run(trained: tuple[subprocess.CompletedProcess, Path]) -> None:
    result, out = trained
    assert result.returncode == 0, result.stderr
    expected = {
        "config.json",
        "metrics.jsonl",
        "epoch_loss.txt",
        "epoch_val_loss.txt",
        "epoch_loss.png",
        "best.pt",
        "last.pt",
    }
    assert expected <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())["train"]
    assert (config["preset"], config["max_steps"], config["batch_size"]) == ("fast", 20, 32)
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert line["step"] == 20
    assert torch.load(out / "last.pt", weights_only=True)["training"]["step"] == 20
    assert "step 20/20 epoch 1: loss" in result.stderr
    assert "epoch 1 step 20: train loss" in result.stderr
    # whole lines, so that scripts can read them: the paths verbatim and no wrapping at the pipe's width
    best_line, views_line, last_line = result.stdout.splitlines()
    assert best_line.startswith(f"best checkpoint: {out / 'best.pt'} (val 1-shot 0.")
    metrics = torch.load(out / "best.pt", weights_only=True)["metrics"]  # calibrated for 5 views at the end
    assert views_line == (
        f"with 5 views per image: val 1-shot {metrics['one_shot']:.4f}, val ROC AUC {metrics['roc_auc']:.4f}, "
        f"val accuracy {metrics['accuracy']:.4f} at threshold {metrics['threshold']:.4f}"
    )
    assert last_line == f"last checkpoint: {out / 'last.pt'}"


def test_eval_prints_json(checkpoint: Path, mini_evaluation: Path, shared_omniglot: Path, tmp_path: Path) -> None:
    runs = shared_omniglot / "all_runs.zip"
    options = ["--way", "5", "--trials", "50", "--pairs", "50", "--device", "cpu", "--json"]
    result = siamese("eval", checkpoint, "--data", mini_evaluation, "--runs", runs, *options, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"checkpoint", "verification", "one_shot", "lake_runs"}
    verification, one_shot, lake = report["verification"], report["one_shot"], report["lake_runs"]
    assert verification["pairs"] == 100
    assert verification["threshold"] == torch.load(checkpoint, weights_only=True)["threshold"]
    assert (one_shot["way"], one_shot["shot"], one_shot["trials"]) == (5, 1, 50)
    assert (lake["way"], lake["shot"], lake["trials"]) == (20, 1, 400)
    for accuracy in (verification["accuracy"], verification["roc_auc"], one_shot["accuracy"], lake["accuracy"]):
        assert 0 <= accuracy <= 1
    for trials in (one_shot, lake):
        assert trials["ci_low"] <= trials["accuracy"] <= trials["ci_high"]
    assert verification["negatives"] == "same alphabet"
    anywhere = siamese("eval", checkpoint, "--data", mini_evaluation, *options, "--negatives", "any", cwd=tmp_path)
    assert anywhere.returncode == 0, anywhere.stderr
    other = json.loads(anywhere.stdout)
    assert other["verification"]["negatives"] == "any alphabet"
    assert other["verification"]["pairs"] == 100
    figures = ("accuracy", "roc_auc", "eer", "loss")
    assert [other["verification"][k] for k in figures] != [verification[k] for k in figures]  # other pairs
    assert other["one_shot"] == one_shot


def test_compare_prints_json(checkpoint: Path, image_pair: tuple[Path, Path], tmp_path: Path) -> None:
    result = siamese("compare", *image_pair, "--checkpoint", checkpoint, "--device", "cpu", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    verdict = json.loads(result.stdout)
    assert set(verdict) == {"score", "same", "threshold"}
    assert 0 <= verdict["score"] <= 1
    assert verdict["threshold"] == torch.load(checkpoint, weights_only=True)["threshold"]
    assert verdict["same"] == (verdict["score"] >= verdict["threshold"])


def one_class_tree(root: Path, image: Path) -> Path:
    folder = root / "one-class" / "alphabet" / "character"
    folder.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        shutil.copy(image, folder / name)
    return root / "one-class"


ERROR_CASES = {
    "missing-checkpoint": (lambda t, c, i, m: ["eval", t / "missing.pt", "--data", m], "no such checkpoint"),
    "unknown-negatives": (
        lambda t, c, i, m: ["eval", c, "--data", m, "--negatives", "nearby"],
        "unknown --negatives 'nearby': choose one of alphabet, any",
    ),
    "checkpoint-is-a-directory": (
        lambda t, c, i, m: ["compare", i, i, "--checkpoint", t],
        "is a directory, not a checkpoint file",
    ),
    "missing-image": (
        lambda t, c, i, m: ["compare", i, t / "missing.png", "--checkpoint", c, "--device", "cpu"],
        "missing.png: no such file",
    ),
    "unknown-device": (
        lambda t, c, i, m: ["compare", i, i, "--checkpoint", c, "--device", "tpu"],
        "unknown device 'tpu'",
    ),
    "unknown-preset": (
        lambda t, c, i, m: ["train", "--preset", "nope", "--data", m, "--out", t / "run"],
        "unknown preset 'nope': choose one of fast, wide, koch, seed",
    ),
    "one-class-data": (
        lambda t, c, i, m: ["train", "--data", one_class_tree(t, i), "--out", t / "run", "--max-steps", 1],
        "found 1 class; at least 2 classes are needed",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_one_line_and_exit_code_2(
    case: str, checkpoint: Path, image_pair: tuple[Path, Path], mini_background: Path, tmp_path: Path
) -> None:
    make_args, message = ERROR_CASES[case]
    result = siamese(*make_args(tmp_path, checkpoint, image_pair[0], mini_background), cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""


def test_error_line_prints_paths_verbatim(image_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """Paths are data, not Rich markup: ``[v2]`` in a folder name must survive into the message."""
    missing = tmp_path / "run[v2]" / "best.pt"
    result = siamese("compare", *image_pair, "--checkpoint", missing, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {missing}: no such checkpoint"


def interrupted(*args, **kwargs):
    raise KeyboardInterrupt  # as Ctrl-C arrives during the work


@pytest.fixture
def sigint_handler() -> Iterator[object]:
    """The SIGINT handler before the test, restored after it: the processes this suite starts would inherit an
    ignored signal."""
    handler = signal.getsignal(signal.SIGINT)
    yield handler
    signal.signal(signal.SIGINT, handler)


@pytest.mark.parametrize(("command", "rank", "told"), [
    ("compare", None, "interrupted"),
    ("compare", "1", "interrupted"),  # a lone command in a job's environment: silent before
    ("train", None, "interrupted; checkpoints already written are intact"),
    ("train", "1", ""),  # a training job's rank 1: rank 0 tells it
])
def test_ctrl_c_is_one_line_about_what_the_command_writes(
    command: str, rank: str | None, told: str, monkeypatch, capsys, sigint_handler: object
) -> None:
    import typer

    from siamese_omniglot import cli, staging, verify

    if rank is not None:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)

    monkeypatch.setattr(verify.Verifier, "from_checkpoint", interrupted)  # compare's first step
    monkeypatch.setattr(staging, "check_placement", interrupted)  # one of train's first steps
    with pytest.raises(typer.Exit) as stopped:
        getattr(cli, command)(**({"first": Path("a.png"), "second": Path("b.png")} if command == "compare" else {}))
    assert signal.getsignal(signal.SIGINT) == sigint_handler  # a caller in the same process can still be interrupted
    assert stopped.value.exit_code == 130
    assert capsys.readouterr().err.strip() == told  # compare said checkpoints were intact, as if it wrote any


def test_an_interrupted_console_script_ignores_a_second_ctrl_c_while_it_shuts_down(
    image_pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    sigint_handler: object,
) -> None:
    from siamese_omniglot import __main__ as console_script
    from siamese_omniglot import verify

    monkeypatch.setattr(verify.Verifier, "from_checkpoint", interrupted)
    monkeypatch.setattr(sys, "argv", ["siamese", "compare", *map(str, image_pair)])
    with pytest.raises(SystemExit) as stopped:
        console_script.main()
    # a second Ctrl-C cannot interrupt the shutdown (a traceback from torch's exit handlers before)
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert stopped.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_counts_and_times_left_read_as_words() -> None:
    from siamese_omniglot.cli import _counted, _time_left

    assert [_counted(1, "class"), _counted(2, "class"), _counted(1, "image"), _counted(0, "alphabet")] == [
        "1 class", "2 classes", "1 image", "0 alphabets"]  # "1 classes", "1 groups" before
    assert [_time_left(29), _time_left(7 * 60 + 10), _time_left(125 * 60)] == [
        "under a minute left", "about 7 min left", "about 2 h 05 min left"]


def test_progress_without_a_terminal_is_a_line_every_ten_seconds_of_a_long_task(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A log file or CI got no word of a download or a decoding, however long it took."""
    from siamese_omniglot.cli import _plain_progress

    now = [0.0]
    update = _plain_progress(clock=lambda: now[0])
    for second, done in [(0, 0), (4, 8), (10, 20), (15, 60), (20, 100), (25, 1000)]:
        now[0] = second
        update("decode images_background", done, 1000)
    update("embed images", 5, 5)  # a task done at once says nothing
    assert capsys.readouterr().err.splitlines() == [
        "decode images_background: 2%, about 8 min left",
        "decode images_background: 10%, about 3 min left",
    ]


def test_the_reference_spellings_are_kept_out_of_the_help() -> None:
    code = "import sys; from siamese_omniglot.cli import main; sys.argv[0] = 'siamese'; main()"
    result = subprocess.run([sys.executable, "-c", code, "train", "--help"], capture_output=True, text=True,
                            timeout=120, env=os.environ | {"COLUMNS": "80"})  # a usual terminal's width
    assert result.returncode == 0 and result.stdout.splitlines()[1].strip() == "Usage: siamese train [OPTIONS]"
    # the second names squeezed the help column of a usual terminal: "--data,--train_data…", "--batch-size,--batc…"
    assert not re.search(r"--[\w-]*…", result.stdout), result.stdout
    assert "--batch_size" in result.stdout  # named once, in the description


def test_an_option_given_in_both_spellings_is_refused(tmp_path: Path) -> None:
    code = "import sys; from siamese_omniglot.cli import main; sys.argv[0] = 'siamese'; main()"
    result = subprocess.run([sys.executable, "-c", code, "train", "--epochs", "3", "--epoch", "5", "--out",
                             str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (2, "error: --epochs and --epoch are one option; give it once\n")
    assert not (tmp_path / "run").exists()
