"""Pictures of results, drawn with matplotlib (the ``plot`` extra): a compared pair, a ROC curve, hard trials.

matplotlib is imported only when a picture is drawn, and without pyplot (no GUI backend, no global
state), so the rest of the library and the CLI work without it. Training's ``epoch_loss.png`` is drawn
with Pillow instead (see :mod:`.plots`).

Every picture has a fixed size in pixels (the ``*_PX`` constants), whatever the data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.episodes import Episodes
from .data.images import ImageSet
from .errors import DependencyError, OutputError
from .evaluate import hardest_episodes, roc_curve
from .files import atomic_write
from .verify import Comparison

DPI = 100
COMPARE_PX = (720, 400)
ROC_PX = (560, 560)
HARD_TRIALS = 8  # trials in the grid of hardest trials
TRIALS_PER_ROW = 2
_TRIAL_IMAGE_PX = 120
_TRIAL_CELL = (140, 190)  # one image with its captions above and below
_TRIAL_GAP_PX = 40  # between the trials of a row
_TRIAL_MARGIN_PX = 20
_TRIAL_HEADER_PX = 44
_GREEN, _RED = "#1b7f3a", "#b3261e"


def require_matplotlib() -> None:
    """Raise ``DependencyError`` with the install command when matplotlib is missing."""
    _figure_class()


def compare_figure(
    first: np.ndarray, second: np.ndarray, comparison: Comparison, path: str | Path, names: tuple[str, str] = ("", "")
) -> Path:
    """Both images side by side (as the model sees them: fitted to the canvas) with the score and decision."""
    figure = _new_figure(COMPARE_PX)
    axes = figure.subplots(1, 2)
    for ax, pixels, name in zip(axes, (first, second), names, strict=True):
        _show(ax, pixels)
        ax.set_title(_short(name), fontsize=10)
    verdict = "SAME" if comparison.same else "DIFFERENT"
    figure.suptitle(f"{verdict}   score {comparison.score:.4f}   (threshold {comparison.threshold:.4f})",
                    fontsize=15, fontweight="bold", color=_GREEN if comparison.same else _RED)
    figure.subplots_adjust(left=0.04, right=0.96, bottom=0.04, top=0.8, wspace=0.12)
    return _save(figure, path)


def roc_figure(
    scores: torch.Tensor, same: torch.Tensor, threshold: float, path: str | Path, title: str = "Verification ROC"
) -> Path:
    """The ROC curve of same/different scores, with the point of the decision threshold marked."""
    from .evaluate import equal_error_rate, roc_auc

    scores, same = scores.double().cpu(), same.bool().cpu()
    fpr, tpr = roc_curve(scores, same)
    accept = scores >= threshold
    point = (float(accept[~same].float().mean()), float(accept[same].float().mean()))
    figure = _new_figure(ROC_PX)
    ax = figure.add_subplot()
    ax.plot(fpr.numpy(), tpr.numpy(), color="#1f4e9c", linewidth=2,
            label=f"ROC (AUC {roc_auc(scores, same):.4f}, EER {equal_error_rate(scores, same):.2%})")
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance")
    ax.plot(*point, "o", color=_RED, markersize=8, label=f"threshold {threshold:.4f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate (different pairs accepted)",
           ylabel="true-positive rate (same pairs accepted)", title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    figure.subplots_adjust(left=0.12, right=0.96, bottom=0.1, top=0.9)  # room for a two-line title
    return _save(figure, path)


def trials_figure(
    images: ImageSet, episodes: Episodes, logits: torch.Tensor, path: str | Path, count: int = HARD_TRIALS
) -> Path:
    """A grid of the hardest trials, two to a row: the query, the true class and the class chosen.

    The hardest trials are those where the best wrong candidate beats the true class by the most (the
    errors first, the closest calls after them); a class is shown by its first support image, with the
    sigmoid of its logit.
    """
    order = hardest_episodes(logits, episodes.answers, count).tolist()
    width, height = trials_figure_px(len(order))
    figure = _new_figure((width, height))
    scores = torch.sigmoid(logits.float())
    wrong = int((logits.argmax(1) != episodes.answers).sum())
    figure.text(0.5, 1 - 14 / height, f"The hardest {len(order)} of {len(episodes)} {logits.shape[1]}-way trials "
                f"({wrong} wrong in all)", ha="center", va="top", fontsize=13)
    for slot, trial in enumerate(order):
        answer, chosen = int(episodes.answers[trial]), int(logits[trial].argmax())
        verdict = ("right", _GREEN) if chosen == answer else ("wrong", _RED)
        shown = [
            (int(episodes.queries[trial]), f"trial {trial}: query", "black"),
            (int(episodes.support[trial, answer, 0]), f"true class {scores[trial, answer]:.3f}", _GREEN),
            (int(episodes.support[trial, chosen, 0]), f"chosen {scores[trial, chosen]:.3f} ({verdict[0]})",
             verdict[1]),
        ]
        row, group = divmod(slot, TRIALS_PER_ROW)
        for column, (index, caption, colour) in enumerate(shown):
            x = _TRIAL_MARGIN_PX + group * (3 * _TRIAL_CELL[0] + _TRIAL_GAP_PX) + column * _TRIAL_CELL[0]
            y = _TRIAL_HEADER_PX + row * _TRIAL_CELL[1] + 18  # room for the caption above the image
            ax = figure.add_axes([x / width, 1 - (y + _TRIAL_IMAGE_PX) / height,
                                  _TRIAL_IMAGE_PX / width, _TRIAL_IMAGE_PX / height])
            _show(ax, images.pixels[index].numpy())
            ax.set_title(caption, fontsize=8, color=colour, pad=3)
            name = images.class_names[int(images.labels[index])]
            alphabet, _, character = name.rpartition("/")
            shown_name = f"{_clip(alphabet, 20)}/\n{_clip(character, 20)}" if alphabet else _clip(character, 20)
            ax.set_xlabel(shown_name, fontsize=7.5, labelpad=2)
    return _save(figure, path)


def trials_figure_px(trials: int) -> tuple[int, int]:
    """The size in pixels of :func:`trials_figure` showing ``trials`` trials."""
    groups = min(trials, TRIALS_PER_ROW)
    rows = -(-trials // TRIALS_PER_ROW)
    width = 2 * _TRIAL_MARGIN_PX + groups * 3 * _TRIAL_CELL[0] + (groups - 1) * _TRIAL_GAP_PX
    return max(width, 2 * _TRIAL_MARGIN_PX + 3 * _TRIAL_CELL[0]), _TRIAL_HEADER_PX + rows * _TRIAL_CELL[1]


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise DependencyError("pictures need matplotlib, which is not installed: "
                              "pip install 'siamese-omniglot[plot]'") from None
    return Figure


def _new_figure(size_px: tuple[int, int]):
    # a quarter pixel more: some matplotlib versions truncate width × dpi (919.99… → 919), others round it
    return _figure_class()(figsize=((size_px[0] + 0.25) / DPI, (size_px[1] + 0.25) / DPI), dpi=DPI)


def _show(ax, pixels: np.ndarray) -> None:
    ax.imshow(np.asarray(pixels), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters at its end (alphabet names under a 120-pixel image)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def check_png_name(path: str | Path) -> Path:
    """``path`` as a Path when its name ends in ``.png``, as the pictures drawn here are PNG files; else an
    OutputError (a viewer trusting a ``.jpg`` name would fail on the PNG inside)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise OutputError(f"{path}: pictures are drawn as PNG files; give it a name ending in .png")
    return path


def _save(figure, path: str | Path) -> Path:
    path = check_png_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as file:  # a full disk leaves the picture that was there, not half of a new one
            figure.savefig(file, dpi=DPI, format="png")
    except OSError as error:
        raise OutputError(f"{path}: cannot write ({error.strerror})") from None
    return path
