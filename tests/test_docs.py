"""The documentation: the CLI reference matches the CLI, and the pictures the pages show exist and are PNGs."""

from __future__ import annotations

import inspect
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
reference = runpy.run_path(str(REPO / "scripts" / "make_cli_reference.py"))


def test_cli_reference_is_up_to_date() -> None:
    assert (DOCS / "cli.md").read_text() == reference["render"](), (
        "docs/cli.md is out of date: run python scripts/make_cli_reference.py"
    )


def test_cli_reference_lists_every_command() -> None:
    page = (DOCS / "cli.md").read_text()
    for name in ("train", "eval", "compare", "classify", "export"):
        assert f"## `siamese {name}`" in page


def test_cli_reference_is_what_the_console_script_prints(tmp_path: Path) -> None:
    """The page's text is the real ``siamese classify --help`` in a 100-column terminal."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "GITHUB_ACTIONS", "PY_COLORS")}
    code = "import sys; from siamese_omniglot.cli import main; sys.argv[0] = 'siamese'; main()"
    result = subprocess.run([sys.executable, "-c", code, "classify", "--help"], capture_output=True, text=True,
                            cwd=tmp_path, env=env | {"COLUMNS": "100", "NO_COLOR": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    printed = "\n".join(line.rstrip() for line in result.stdout.splitlines()).strip("\n")
    page = (DOCS / "cli.md").read_text()
    section = page.split("## `siamese classify`\n\n```text\n", 1)[1].split("```", 1)[0]
    assert section.strip("\n") == printed


def images_shown() -> set[str]:
    """Every ``images/…`` picture that a page links to."""
    links = set()
    for page in DOCS.glob("*.md"):
        links |= set(re.findall(r"!\[[^\]]*\]\((images/[^)]+)\)", page.read_text()))
    return links


def test_every_picture_shown_exists_and_every_picture_is_shown() -> None:
    shown = images_shown()
    on_disk = {f"images/{p.name}" for p in (DOCS / "images").glob("*")}
    assert shown == on_disk
    assert {"images/epoch_loss.png", "images/roc.png", "images/hardest_trials.png",
            "images/compare_same.png"} <= shown


@pytest.mark.parametrize("name", sorted(p.split("/")[1] for p in images_shown()))
def test_pictures_are_small_pngs(name: str) -> None:
    path = DOCS / "images" / name
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= 300
    assert path.stat().st_size < 200_000


def test_every_page_is_in_the_navigation() -> None:
    config = (REPO / "mkdocs.yml").read_text()
    for page in DOCS.glob("*.md"):
        assert re.search(rf":\s*{re.escape(page.name)}\s*$", config, re.MULTILINE), f"{page.name} is not in nav"


def test_every_test_the_guarantees_name_exists() -> None:
    """Each ``tests/FILE.py::NAME`` of guarantees.md, and each ``::NAME`` after it (the same file), is a test."""
    named: list[tuple[str, str]] = []
    for cell in re.findall(r"`((?:tests/\w+\.py)?::\w+)`", (DOCS / "guarantees.md").read_text()):
        path, name = cell.split("::")
        named.append((path or named[-1][0], name))
    assert len(named) > 20
    missing = [f"{path}::{name}" for path, name in named
               if not re.search(rf"^def {name}\(", (REPO / path).read_text(), re.MULTILINE)]
    assert missing == []


def test_the_device_helpers_table_lists_exactly_the_public_functions_of_devices() -> None:
    from siamese_omniglot import devices

    table = re.search(r"## The helpers\n(.*?)\n\n", (DOCS / "devices.md").read_text(), re.DOTALL).group(1)
    listed = set(re.findall(r"^\| `(\w+)\(", table, re.MULTILINE))
    public = {name for name, value in vars(devices).items()
              if inspect.isfunction(value) and value.__module__ == devices.__name__ and not name.startswith("_")}
    assert listed == public
