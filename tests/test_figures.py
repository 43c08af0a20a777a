"""Pictures: valid PNGs of the documented sizes from the library and from ``compare --plot`` / ``eval --plot``,
and one clear error line when matplotlib is missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_omniglot.data import load_folder, sample_episodes
from siamese_omniglot.errors import DependencyError
from siamese_omniglot.evaluate import episode_logits, hardest_episodes
from siamese_omniglot.figures import (
    COMPARE_PX,
    ROC_PX,
    compare_figure,
    require_matplotlib,
    roc_figure,
    trials_figure,
    trials_figure_px,
)
from siamese_omniglot.verify import Comparison, Verifier

pytest.importorskip("matplotlib")


def assert_picture(path: Path, size: tuple[int, int]) -> None:
    """A PNG of exactly ``size`` that is not a blank page."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == size
        assert len(image.convert("RGB").getcolors(1 << 20)) > 20  # drawings, text, lines: not a blank page


@pytest.fixture(scope="module")
def verifier(tiny_checkpoint: Path) -> Verifier:
    return Verifier.from_checkpoint(tiny_checkpoint, "cpu")


@pytest.fixture(scope="module")
def drawings(mini_evaluation: Path) -> list[Path]:
    return sorted(mini_evaluation.glob("*/*/*.png"))


def test_compare_figure(verifier: Verifier, drawings: list[Path], tmp_path: Path) -> None:
    first, second = verifier.pixels(drawings[:2]).numpy()
    result = verifier.compare(drawings[0], drawings[1])
    path = compare_figure(first, second, result, tmp_path / "sub" / "compare.png", names=("a.png", "b.png"))
    assert path == tmp_path / "sub" / "compare.png"
    assert_picture(path, COMPARE_PX)
    with Image.open(path) as image:
        left, right = np.asarray(image.convert("L").crop((0, 60, 360, 400))), np.asarray(
            image.convert("L").crop((360, 60, 720, 400)))
    assert (left < 50).sum() > 500 and (right < 50).sum() > 500  # both characters are drawn, in ink


@pytest.mark.parametrize("same", [True, False])
def test_compare_figure_colours_the_decision(same: bool, tmp_path: Path) -> None:
    paper = np.full((105, 105), 255, dtype=np.uint8)
    path = compare_figure(paper, paper, Comparison(0.7 if same else 0.2, same, 0.5), tmp_path / "c.png")
    with Image.open(path) as image:
        title = np.asarray(image.convert("RGB").crop((0, 0, COMPARE_PX[0], 50))).reshape(-1, 3).astype(int)
    greenish = ((title[:, 1] - title[:, 0] > 60) & (title[:, 1] - title[:, 2] > 30)).sum()
    reddish = ((title[:, 0] - title[:, 1] > 60) & (title[:, 0] - title[:, 2] > 60)).sum()
    assert (greenish > 100 and reddish == 0) if same else (reddish > 100 and greenish == 0)


def test_roc_figure(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    same = torch.arange(200) % 2 == 0
    scores = torch.sigmoid(torch.randn(200, generator=generator) + 1.5 * same)
    assert_picture(roc_figure(scores, same, 0.5, tmp_path / "roc.png"), ROC_PX)


@pytest.mark.parametrize("count", [8, 3])
def test_trials_figure(verifier: Verifier, mini_evaluation: Path, count: int, tmp_path: Path) -> None:
    images = load_folder(mini_evaluation)
    episodes = sample_episodes(images, way=5, shot=1, trials=30, seed=0)
    embeddings = verifier.embed(images.pixels)
    logits = episode_logits(verifier.model, embeddings, episodes)
    path = trials_figure(images, episodes, logits, tmp_path / "hard.png", count=count)
    assert trials_figure_px(count) == ((920, 44 + 190 * 4) if count == 8 else (920, 44 + 190 * 2))
    assert_picture(path, trials_figure_px(count))


def test_hardest_episodes_puts_errors_first() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.5, 1.0], [1.0, 0.9, 0.0], [0.0, 0.0, 4.0]])
    answers = torch.tensor([0, 0, 0, 2])  # trial 1 is wrong by 2.5; trial 2 right by 0.1
    assert hardest_episodes(logits, answers, 3).tolist() == [1, 2, 0]


def test_missing_matplotlib_is_a_dependency_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    with pytest.raises(DependencyError, match=r"pip install 'siamese-omniglot\[plot\]'"):
        require_matplotlib()


def test_cli_compare_plot(tiny_checkpoint: Path, drawings: list[Path], run_siamese, tmp_path: Path) -> None:
    result = run_siamese("compare", drawings[0], drawings[1], "-c", tiny_checkpoint, "--device", "cpu",
                         "--plot", tmp_path / "pair.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] in ("SAME", "DIFFERENT")
    assert result.stderr == f"wrote {tmp_path / 'pair.png'}\n"
    assert_picture(tmp_path / "pair.png", COMPARE_PX)


def test_cli_compare_plot_over_an_image_being_compared_is_refused(
    tiny_checkpoint: Path, drawings: list[Path], run_siamese, tmp_path: Path
) -> None:
    first = tmp_path / "first.png"
    first.write_bytes(drawings[0].read_bytes())
    (tmp_path / "link.png").symlink_to(first)
    for plot in (first, tmp_path / "link.png"):  # the drawing was replaced by the picture before
        result = run_siamese("compare", first, drawings[1], "-c", tiny_checkpoint, "--device", "cpu", "--plot", plot,
                             cwd=tmp_path)
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == f"error: {plot}: is an image being compared; --plot must name another file\n"
    assert first.read_bytes() == drawings[0].read_bytes()


def test_cli_eval_plot(tiny_checkpoint: Path, mini_evaluation: Path, run_siamese, tmp_path: Path) -> None:
    options = ["--way", "5", "--trials", "40", "--pairs", "50", "--device", "cpu", "--json"]
    result = run_siamese("eval", tiny_checkpoint, "--data", mini_evaluation, *options, "--plot", tmp_path / "plots",
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.lstrip().startswith("{")  # the pictures do not disturb the JSON on stdout
    assert_picture(tmp_path / "plots" / "roc.png", ROC_PX)
    assert_picture(tmp_path / "plots" / "hardest_trials.png", trials_figure_px(8))


def test_cli_eval_plot_at_a_file_is_refused_before_any_work(
    tiny_checkpoint: Path, mini_evaluation: Path, run_siamese, tmp_path: Path
) -> None:
    (tmp_path / "taken.png").write_bytes(b"a picture")
    result = run_siamese("eval", tiny_checkpoint, "--data", mini_evaluation, "--device", "cpu", "--plot",
                         tmp_path / "taken.png", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: {tmp_path / 'taken.png'}: is a file; --plot names a folder to draw in\n"
    assert (tmp_path / "taken.png").read_bytes() == b"a picture"


@pytest.mark.parametrize("command", ["compare", "eval"])
def test_cli_plot_without_matplotlib_is_one_error_line(
    command: str, tiny_checkpoint: Path, drawings: list[Path], mini_evaluation: Path, run_siamese, tmp_path: Path
) -> None:
    args = {
        "compare": ["compare", drawings[0], drawings[1], "-c", tiny_checkpoint, "--plot", tmp_path / "p.png"],
        "eval": ["eval", tiny_checkpoint, "--data", mini_evaluation, "--plot", tmp_path / "plots"],
    }[command]
    result = run_siamese(*args, "--device", "cpu", cwd=tmp_path, blocked=("matplotlib",))
    assert result.returncode == 2
    assert result.stderr == ("error: pictures need matplotlib, which is not installed: "
                             "pip install 'siamese-omniglot[plot]'\n")
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []  # failed before doing any work


def test_a_picture_that_cannot_be_written_leaves_the_one_that_was_there(tmp_path: Path, monkeypatch) -> None:
    from matplotlib.figure import Figure

    from siamese_omniglot.errors import OutputError

    target = tmp_path / "roc.png"
    target.write_bytes(b"the picture of an earlier run")

    def full_disk(figure, file, **options):
        file.write(b"\x89PNG half a picture")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(OutputError, match="roc.png: cannot write \\(No space left on device\\)"):
        roc_figure(torch.tensor([0.9, 0.1]), torch.tensor([True, False]), 0.5, target)
    assert target.read_bytes() == b"the picture of an earlier run"  # a truncated PNG over it before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["roc.png"]


@pytest.mark.parametrize("command", ["compare", "eval"])
def test_cli_plot_targets_are_refused_before_any_work(
    command: str, tiny_checkpoint: Path, drawings: list[Path], mini_evaluation: Path, run_siamese, tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    target, told = {
        "compare": (tmp_path / "pair.jpg", "pictures are drawn as PNG files; give it a name ending in .png"),
        "eval": (tmp_path / "notes.txt" / "plots", "cannot write there (Not a directory)"),
    }[command]
    args = {
        "compare": ["compare", drawings[0], drawings[1], "-c", tiny_checkpoint],
        "eval": ["eval", tiny_checkpoint, "--data", mini_evaluation],
    }[command]
    result = run_siamese(*args, "--plot", target, "--device", "cpu", cwd=tmp_path)
    # compare wrote PNG bytes under the .jpg name; eval failed after all its work
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"error: {target}: {told}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
