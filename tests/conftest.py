"""Shared fixtures: small real Omniglot subsets built once per session from ``../shared/omniglot``."""

from __future__ import annotations

import os
import subprocess
import sys
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


@pytest.fixture(scope="session")
def tiny_checkpoint(mini_background: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of the fast preset trained for 40 steps on ``mini_background`` (about 10 s on one core)."""
    import torch

    from siamese_omniglot.config import preset
    from siamese_omniglot.data import load_folder
    from siamese_omniglot.train import Trainer

    config = preset("fast", max_steps=40, batch_size=32, val_pairs=50, log_every=20)
    out = tmp_path_factory.mktemp("tiny") / "run"
    return Trainer(config, load_folder(mini_background), out, torch.device("cpu")).fit().best_checkpoint


def _run_siamese(*args: object, cwd: Path, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``siamese ARGS`` in a fresh interpreter on one thread, with no SIAMESE_* settings inherited.

    ``blocked`` names packages to make unimportable (as if not installed) for that run.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIAMESE_")} | {"OMP_NUM_THREADS": "1"}
    prelude = "".join(f"sys.modules[{name!r}] = None; " for name in blocked)
    code = f"import sys; {prelude}from siamese_omniglot.cli import main; sys.argv[0] = 'siamese'; main()"
    command = [sys.executable, "-c", code, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


@pytest.fixture(scope="session")
def run_siamese():
    """The ``siamese`` command as a function: ``run_siamese(*args, cwd=…, blocked=("matplotlib",))``."""
    return _run_siamese
