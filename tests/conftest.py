"""Shared fixtures: small real Omniglot subsets built once per session from ``../shared/omniglot``."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SIAMESE_TEST_OMNIGLOT", REPO.parent / "shared" / "omniglot"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real Omniglot not found at {path} (set SIAMESE_TEST_OMNIGLOT)")
    return path


@pytest.fixture(scope="session")
def shared_omniglot() -> Path:
    """The folder holding the real archives (images_background.zip, images_evaluation.zip, all_runs.zip)."""
    return _need(SHARED)


def extract_subset(archive: Path, target: Path, alphabets: int, characters: int, drawers: int = 20) -> Path:
    """Copy the first ``alphabets`` × ``characters`` × ``drawers`` images of an Omniglot zip into a tree."""
    with zipfile.ZipFile(archive) as source:
        names = sorted(n for n in source.namelist() if n.endswith(".png"))
        chosen_alphabets = sorted({n.split("/")[1] for n in names})[:alphabets]
        for alphabet in chosen_alphabets:
            inside = [n for n in names if n.split("/")[1] == alphabet]
            for character in sorted({n.split("/")[2] for n in inside})[:characters]:
                files = sorted(n for n in inside if n.split("/")[2] == character)[:drawers]
                folder = target / alphabet / character
                folder.mkdir(parents=True, exist_ok=True)
                for name in files:
                    (folder / Path(name).name).write_bytes(source.read(name))
    return target


@pytest.fixture(scope="session")
def mini_background(shared_omniglot: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A custom tree of 8 real background alphabets × 6 characters × 20 drawers (960 images)."""
    root = tmp_path_factory.mktemp("mini_background")
    return extract_subset(shared_omniglot / "images_background.zip", root, alphabets=8, characters=6)


@pytest.fixture(scope="session")
def mini_evaluation(shared_omniglot: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A custom tree of 3 real evaluation alphabets × 6 characters × 20 drawers (360 images)."""
    root = tmp_path_factory.mktemp("mini_evaluation")
    return extract_subset(shared_omniglot / "images_evaluation.zip", root, alphabets=3, characters=6)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny test models gain nothing from threads, and two cores are shared with subprocesses."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
