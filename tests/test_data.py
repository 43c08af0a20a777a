"""Tests of siamese_omniglot.data: decoding, folder trees, Omniglot loading and caching, pairs, episodes."""

from __future__ import annotations

import io
import logging
import math
import os
import re
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from siamese_omniglot.data import (
    CANVAS_PX,
    ImageSet,
    PairSampler,
    decode_image,
    load_folder,
    load_lake_runs,
    load_split,
    load_training_set,
    read_image,
    sample_episodes,
    seeded_generator,
    split_validation,
    to_ink,
)
from siamese_omniglot.data import omniglot as omniglot_module
from siamese_omniglot.data.augment import random_distortion, sampling_grid
from siamese_omniglot.data.folders import decode_index, index_paths
from siamese_omniglot.data.images import image_to_canvas
from siamese_omniglot.data.omniglot import BACKGROUND, find_split
from siamese_omniglot.data.pairs import fixed_pairs, split_images
from siamese_omniglot.data.roots import data_root
from siamese_omniglot.errors import ConfigError, DataError

FIRST_BACKGROUND_PNG = "images_background/Alphabet_of_the_Magi/character01/0709_01.png"


def encode(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def decode_tree(root: Path) -> ImageSet:
    """Decode a tree without the loader (no cache is written into shared fixtures)."""
    paths = [p.relative_to(root).as_posix() for p in root.rglob("*.png")]
    return decode_index(index_paths(paths, str(root)), lambda relative: (root / relative).read_bytes())


NO_CACHE = shutil.ignore_patterns(".*")  # a copied tree has other inodes: a cache copied with it would be ignored


def first_alphabet(root: Path) -> Path:
    """The first alphabet folder of a tree (not its hidden cache folder)."""
    return next(p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith("."))


def synthetic_set(class_sizes: list[int], class_groups: list[int]) -> ImageSet:
    """An ImageSet of blank images with the given images per class and group per class."""
    labels = torch.repeat_interleave(torch.arange(len(class_sizes)), torch.tensor(class_sizes, dtype=torch.long))
    num_groups = max(class_groups, default=-1) + 1
    return ImageSet(
        pixels=torch.full((int(labels.numel()), 4, 4), 255, dtype=torch.uint8),
        labels=labels,
        class_names=tuple(f"g{g}/c{i}" for i, g in enumerate(class_groups)),
        class_groups=torch.tensor(class_groups),
        group_names=tuple(f"g{g}" for g in range(num_groups)),
    )


def zip_tree(tree: Path, archive: Path, top: str) -> Path:
    with zipfile.ZipFile(archive, "w") as target:
        for path in sorted(tree.rglob("*.png")):
            target.write(path, f"{top}/{path.relative_to(tree).as_posix()}")
    return archive


@pytest.fixture(scope="module")
def background_images(mini_background):
    return decode_tree(mini_background)


@pytest.fixture(scope="module")
def evaluation_images(mini_evaluation):
    return decode_tree(mini_evaluation)


# --- images.py -------------------------------------------------------------------------------------


def test_real_omniglot_png_decodes_to_paper_and_ink(shared_omniglot, tmp_path):
    with zipfile.ZipFile(shared_omniglot / "images_background.zip") as archive:
        data = archive.read(FIRST_BACKGROUND_PNG)
    path = tmp_path / "0709_01.png"
    path.write_bytes(data)
    pixels = read_image(path)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    assert pixels.shape == (105, 105) and pixels.dtype == np.uint8
    assert set(np.unique(pixels).tolist()) == {0, 255}
    assert pixels[0, 0] == 255  # the corner is paper
    assert np.array_equal(pixels, expected)
    assert np.array_equal(decode_image(data, "x.png"), pixels)


def square_on_paper(mode: str, paper, ink) -> Image.Image:
    image = Image.new(mode, (105, 105), paper)
    image.paste(ink, (10, 10, 20, 20))
    return image


@pytest.mark.parametrize(
    ("name", "image"),
    [
        ("gray", square_on_paper("L", 255, 0)),
        ("1-bit", square_on_paper("1", 1, 0)),
        ("rgb", square_on_paper("RGB", (255, 255, 255), (0, 0, 0))),
        ("rgba transparent paper", square_on_paper("RGBA", (0, 0, 0, 0), (0, 0, 0, 255))),
        ("la transparent paper", square_on_paper("LA", (0, 0), (0, 255))),
        ("white ink on transparent", square_on_paper("RGBA", (255, 255, 255, 0), (255, 255, 255, 255))),
        ("la white ink on transparent", square_on_paper("LA", (255, 0), (255, 255))),
        ("float 0-1", square_on_paper("F", 1.0, 0.0)),
        ("float 0-255", square_on_paper("F", 255.0, 0.0)),
    ],
)
def test_modes_decode_to_white_paper_and_black_ink(name, image):
    pixels = decode_image(encode(image, "TIFF" if image.mode == "F" else "PNG"), name)  # blank or all ink before
    assert pixels.shape == (105, 105) and pixels.dtype == np.uint8
    assert pixels[0, 0] == 255 and pixels[60, 60] == 255
    assert pixels[15, 15] == 0
    assert int((pixels < 128).sum()) == 100


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_float_image_with_a_pixel_that_is_no_number_is_refused_not_read_as_black(value):
    image = square_on_paper("F", 1.0, 0.0)
    image.putpixel((50, 50), value)
    with pytest.raises(DataError, match=r"^odd\.tiff: not a readable image \(its pixels hold NaN or infinity\)$"):
        decode_image(encode(image, "TIFF"), "odd.tiff")  # all ink before: the 0-1 image was taken as 0-255


def test_rgba_half_transparent_ink_is_composited_on_white():
    image = Image.new("RGBA", (105, 105), (0, 0, 0, 0))
    image.paste((0, 0, 0, 128), (10, 10, 20, 20))
    pixels = decode_image(encode(image), "half.png")
    assert pixels[0, 0] == 255
    assert 120 <= pixels[15, 15] <= 135  # half black over white


def test_palette_image_and_its_transparent_index():
    image = Image.new("P", (105, 105), 0)
    image.putpalette([255, 255, 255, 0, 0, 0, 0, 0, 0])
    image.paste(1, (10, 10, 20, 20))
    image.paste(2, (40, 40, 50, 50))
    pixels = decode_image(encode(image), "palette.png")
    assert (pixels[0, 0], pixels[15, 15], pixels[45, 45]) == (255, 0, 0)
    # index 2 is black in the palette but declared transparent: it must become paper
    pixels = decode_image(encode(image, transparency=2), "palette-transparent.png")
    assert (pixels[0, 0], pixels[15, 15], pixels[45, 45]) == (255, 0, 255)


def sixteen_bit_values() -> np.ndarray:
    values = np.full((105, 105), 65535, dtype=np.uint16)
    values[10:20, 10:20] = 0
    values[40:50, 40:50] = 32768
    return values


def test_sixteen_bit_grayscale_png():
    data = encode(Image.fromarray(sixteen_bit_values()))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    pixels = decode_image(data, "deep.png")
    assert (pixels[0, 0], pixels[15, 15]) == (255, 0)
    assert 125 <= pixels[45, 45] <= 130


def test_a_big_endian_sixteen_bit_image():
    values = sixteen_bit_values()
    image = Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes())
    data = encode(image, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    pixels = decode_image(data, "big-endian.tif")  # "not a readable image (image has wrong mode)" before
    assert (pixels[0, 0], pixels[15, 15]) == (255, 0)
    assert 125 <= pixels[45, 45] <= 130


def test_sixteen_bit_values_in_a_32_bit_image():
    """Pillow before 10.3 opens 16-bit grayscale PNGs as mode I (values 0..65535): paper must stay white."""
    data = encode(Image.fromarray(sixteen_bit_values().astype(np.int32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    pixels = decode_image(data, "deep-as-i.tif")
    assert (pixels[0, 0], pixels[15, 15]) == (255, 0)
    assert 125 <= pixels[45, 45] <= 130


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_eight_bit_levels_in_a_wider_image_are_read_as_eight_bit(dtype):
    """An integer array of levels 0–255 reads the same whether given as an array or as a PIL image of it (a mode I
    or I;16 image of such levels decoded almost black before: 255 of 65535)."""
    levels = np.full((105, 105), 255, dtype=np.uint8)
    levels[10:20, 10:20] = 0
    levels[40:50, 40:50] = 128
    image = Image.fromarray(levels.astype(dtype))
    assert image.mode.startswith("I")
    assert np.array_equal(image_to_canvas(image), levels)
    assert np.array_equal(decode_image(encode(image, "TIFF" if dtype == np.int32 else "PNG"), "wide.img"), levels)


@pytest.mark.parametrize("format", ["JPEG", "TIFF"])
def test_cmyk(format):
    image = square_on_paper("CMYK", (0, 0, 0, 0), (0, 0, 0, 255))
    pixels = decode_image(encode(image, format, quality=100), f"cmyk.{format.lower()}")
    assert pixels[0, 0] >= 250 and pixels[60, 60] >= 250
    assert pixels[15, 15] <= 5


def test_exif_rotation_is_applied():
    image = Image.new("L", (105, 105), 255)
    image.paste(0, (0, 0, 105, 10))  # a bar along the top
    exif = image.getexif()
    exif[0x0112] = 6  # display rotated 90° clockwise: the bar ends up on the right
    pixels = decode_image(encode(image, exif=exif.tobytes()), "rotated.png")
    assert (pixels[:, 95:] == 0).all()
    assert (pixels[:, :90] == 255).all()


def test_wide_image_is_fitted_centred_with_paper_padding():
    image = Image.new("L", (210, 105), 255)
    image.paste(0, (0, 0, 20, 105))  # full-height bar on the left, 20 px wide
    pixels = decode_image(encode(image), "wide.png")
    assert pixels.shape == (105, 105)
    ink_rows = np.flatnonzero((pixels < 128).any(axis=1))
    ink_cols = np.flatnonzero((pixels < 128).any(axis=0))
    # halved to 105 × 52 and centred vertically; the bar keeps its aspect: 10 px wide
    assert 50 <= ink_rows.size <= 54 and abs((ink_rows[0] + ink_rows[-1]) / 2 - 52) <= 1
    assert ink_cols.tolist() == list(range(10))
    assert (pixels[:20] == 255).all() and (pixels[-20:] == 255).all()


def test_large_image_is_shrunk_onto_the_canvas():
    image = Image.new("L", (420, 420), 255)
    image.paste(0, (0, 0, 420, 40))  # top bar, 40 px of 420
    pixels = decode_image(encode(image), "large.png")
    assert pixels.shape == (105, 105)
    assert (pixels[:9] == 0).all() and (pixels[11:] == 255).all()


def test_read_image_errors_name_the_path_and_problem(tmp_path):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (105, 105), dtype=np.uint8))
    valid = encode(noise)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image\n")
    (tmp_path / "truncated.png").write_bytes(valid[: len(valid) // 2])
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    cases = {
        "missing.png": "no such file",
        "loop.png": "a symbolic link to no file",  # "no such file" before, for a file that is there
        "dangling.png": "a symbolic link to no file",
        "folder.png": "is a directory",
        "empty.png": "empty file",
        "text.png": "not a readable image",
        "truncated.png": "not a readable image",
    }
    for name, message in cases.items():
        with pytest.raises(DataError) as caught:
            read_image(tmp_path / name)
        assert str(caught.value).startswith(str(tmp_path / name)), name
        assert message in str(caught.value), name


def test_decompression_bomb_is_refused_and_pillows_limit_left_to_the_process(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000), 1).save(path)
    assert path.stat().st_size < 100_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a process's own choice: no limit
    with pytest.raises(DataError, match=r"bomb\.png: image too large \(more than 64,000,000 pixels\)"):
        read_image(path)
    assert Image.MAX_IMAGE_PIXELS is None  # set to 64,000,000 for the whole process before


def test_to_ink():
    pixels = torch.tensor([[[255, 0], [51, 204]]], dtype=torch.uint8)
    ink = to_ink(pixels)
    assert ink.shape == (1, 1, 2, 2) and ink.dtype == torch.float32
    assert torch.allclose(ink, torch.tensor([[[[0.0, 1.0], [0.8, 0.2]]]]))


# --- folders.py ------------------------------------------------------------------------------------


def test_index_paths_three_levels_sorted_with_groups():
    paths = [
        "Latin/b/2.png",
        "Greek/beta/1.png",
        "Latin/a/2.PNG",
        "Greek/alpha/9.png",
        "Latin/a/1.png",
        "Greek/alpha/10.png",
        "Greek/beta/0.png",
        "Latin/b/1.png",
        "Latin/a/notes.txt",
        ".DS_Store",
        "Latin/.hidden/1.png",
        "Latin/.hidden/2.png",
        "Latin/a/.x.png",
    ]
    index = index_paths(paths, "/data/tree")
    assert index.group_names == ("Greek", "Latin")
    assert index.class_names == ("Greek/alpha", "Greek/beta", "Latin/a", "Latin/b")
    assert index.class_groups == (0, 0, 1, 1)
    assert index.paths == (
        "Greek/alpha/10.png",
        "Greek/alpha/9.png",
        "Greek/beta/0.png",
        "Greek/beta/1.png",
        "Latin/a/1.png",
        "Latin/a/2.PNG",
        "Latin/b/1.png",
        "Latin/b/2.png",
    )
    assert index.labels == (0, 0, 1, 1, 2, 2, 3, 3)


def test_index_paths_two_levels_form_one_group_named_after_the_source():
    index = index_paths(["y/1.png", "x/2.jpg", "x/1.bmp", "y/2.png", "z/a.gif", "z/b.webp"], "/data/shapes")
    assert index.group_names == ("shapes",)
    assert index.class_names == ("shapes/x", "shapes/y", "shapes/z")
    assert index.class_groups == (0, 0, 0)
    assert index.paths == ("x/1.bmp", "x/2.jpg", "y/1.png", "y/2.png", "z/a.gif", "z/b.webp")
    assert index.labels == (0, 0, 1, 1, 2, 2)


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        (["g/a/1.png", "g/a/2.png", "b/1.png", "b/2.png"], r"tree: mixed or unexpected folder depths \[2, 3\]"),
        (["1.png", "2.png"], r"tree: 2 images and no class folders; expected <group>/<class>/<image> or"),
        (["g/a/1.png", "g/a/2.png", "g/a/3.png"], r"tree: found 1 class; at least 2 classes are needed"),
        (["g/a/1.png", "g/a/2.png", "g/lonely/1.png"], r"tree: 1 class\(es\) have fewer than 2 images: g/lonely$"),
        (["a/readme.txt", ".hidden/1.png"], r"tree: no images found"),
    ],
)
def test_index_paths_errors(paths, message):
    with pytest.raises(DataError, match=message):
        index_paths(paths, "tree")


# --- omniglot.py -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def background_load(shared_omniglot, tmp_path_factory):
    """Load the full background split once, fetched from the shared folder as a mirror."""
    root = tmp_path_factory.mktemp("data_root")
    warnings: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append
    logger = logging.getLogger(omniglot_module.__name__)
    logger.addHandler(handler)
    try:
        started = time.perf_counter()
        images = load_split("background", data=root, mirror=str(shared_omniglot))
        first_load_s = time.perf_counter() - started
    finally:
        logger.removeHandler(handler)
    return root, images, [record.getMessage() for record in warnings], first_load_s


def test_load_split_copies_the_archive_from_the_mirror_and_warns(background_load, shared_omniglot):
    root, _, warnings, _ = background_load
    archive = root / "images_background.zip"
    assert archive.read_bytes() == (shared_omniglot / "images_background.zip").read_bytes()
    assert not list(root.glob(".*.part"))
    assert len(warnings) == 1
    assert "images_background.zip is not byte-identical to the official archive" in warnings[0]
    assert "contents check out (30 alphabets, 964 characters, 19280 images)" in warnings[0]


def test_background_split_contents(background_load, shared_omniglot):
    _, images, _, _ = background_load
    assert images.pixels.shape == (19280, 105, 105) and images.pixels.dtype == torch.uint8
    assert images.num_classes == 964 and len(images.group_names) == 30
    assert torch.equal(torch.bincount(images.labels), torch.full((964,), 20))
    assert bool((images.labels[1:] >= images.labels[:-1]).all())
    assert bool((images.class_groups[1:] >= images.class_groups[:-1]).all())
    assert images.class_names[0] == "Alphabet_of_the_Magi/character01"
    assert images.group_names[-1] == "Tifinagh" and images.class_names[-1] == "Tifinagh/character55"
    sample = images.pixels[::97]  # a full unique() over 200 M pixels would dominate the run
    assert int((sample == 0).sum() + (sample == 255).sum()) == sample.numel()
    assert int((sample == 0).sum()) > 0
    with zipfile.ZipFile(shared_omniglot / "images_background.zip") as archive:
        first = np.asarray(Image.open(io.BytesIO(archive.read(FIRST_BACKGROUND_PNG))).convert("L"))
    assert np.array_equal(images.pixels[0].numpy(), first)


def test_second_load_is_served_from_the_cache(background_load, shared_omniglot, monkeypatch):
    root, first, _, first_load_s = background_load
    caches = list((root / ".siamese-cache").glob("*.npz"))
    assert len(caches) == 1 and re.fullmatch(r"images_background-v2-[0-9a-f]{20}\.npz", caches[0].name)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(omniglot_module, "decode_index", no_decoding)
    started = time.perf_counter()
    second = load_split("background", data=root, mirror=str(shared_omniglot / "absent"))
    assert time.perf_counter() - started < first_load_s / 2
    assert torch.equal(second.pixels, first.pixels)
    assert torch.equal(second.labels, first.labels)
    assert torch.equal(second.class_groups, first.class_groups)
    assert (second.class_names, second.group_names) == (first.class_names, first.group_names)


@pytest.mark.parametrize(
    "location",
    [
        "images_background.zip",
        "images_background",
        "image_background",
        "omniglot-py/images_background.zip",
        "omniglot-py/images_background",
    ],
)
def test_find_split_locations(tmp_path, location):
    assert find_split(tmp_path, BACKGROUND) is None
    path = tmp_path / location
    path.parent.mkdir(parents=True, exist_ok=True)
    if location.endswith(".zip"):
        path.write_bytes(b"")
    else:
        path.mkdir()
    assert find_split(tmp_path, BACKGROUND) == path


def test_find_split_prefers_the_archive(tmp_path):
    (tmp_path / "images_background").mkdir()
    (tmp_path / "images_background.zip").write_bytes(b"")
    assert find_split(tmp_path, BACKGROUND) == tmp_path / "images_background.zip"


WRONG_COUNTS = "has 8 alphabets / 48 characters / 960 images, expected 30 / 964 / 19280 for images_background"


def test_an_unknown_split_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown Omniglot split 'train': choose background or evaluation"):
        load_split("train", data=tmp_path, download=False)  # a KeyError before


def test_archive_with_wrong_contents_is_refused(mini_background, tmp_path):
    archive = zip_tree(mini_background, tmp_path / "images_background.zip", "images_background")
    with pytest.raises(DataError, match=re.escape(f"{archive}: {WRONG_COUNTS}")):
        load_split("background", data=tmp_path, download=False)
    assert not (tmp_path / ".siamese-cache").exists()


def test_reference_spelling_folder_is_read_and_checked(mini_background, tmp_path):
    folder = shutil.copytree(mini_background, tmp_path / "image_background")
    with pytest.raises(DataError, match=re.escape(f"{folder}: {WRONG_COUNTS}")):
        load_split("background", data=tmp_path, download=False)


def test_unsafe_archive_entry_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "images_background.zip", "w") as archive:
        archive.writestr("images_background/Latin/a/1.png", encode(Image.new("L", (105, 105), 255)))
        archive.writestr("../evil.png", b"x")
    with pytest.raises(DataError, match=r"refusing unsafe archive entry '\.\./evil\.png'"):
        load_split("background", data=tmp_path, download=False)
    assert not (tmp_path.parent / "evil.png").exists()


def test_decoding_is_reported_under_the_tree_s_name(mini_evaluation: Path, tmp_path: Path) -> None:
    tree = shutil.copytree(mini_evaluation, tmp_path / "my_characters", ignore=shutil.ignore_patterns(".*"))
    told: list[tuple[str, int, int]] = []
    images = load_folder(tree, progress=lambda *report: told.append(report))
    assert {what for what, _, _ in told} == {"decode my_characters"}  # "decode folder" for every tree before
    assert told[-1][1:] == (len(images), len(images)) == (360, 360)


def test_missing_archive_and_a_mirror_without_it(tmp_path):
    root, mirror = tmp_path / "root", tmp_path / "mirror"
    mirror.mkdir()
    with pytest.raises(DataError, match=re.escape(f"mirror {mirror} has no images_background.zip")):
        load_split("background", data=root, mirror=str(mirror))
    assert not root.exists()  # the partial download was removed, and the folder made for it
    with pytest.raises(DataError, match=re.escape(f"{root}: no images_background.zip or images_background/ found")):
        load_split("background", data=root, download=False)


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SIAMESE_DATA", raising=False)
    assert data_root() == Path("datasets")
    monkeypatch.setenv("SIAMESE_DATA", str(tmp_path / "from-env"))
    assert data_root() == tmp_path / "from-env"
    assert data_root(tmp_path / "from-arg") == tmp_path / "from-arg"
    assert data_root("~/omniglot") == Path.home() / "omniglot"


def test_load_training_set_on_a_custom_tree(mini_background, tmp_path):
    root = shutil.copytree(mini_background, tmp_path / "tree", ignore=NO_CACHE)
    images = load_training_set(root, mirror=str(tmp_path / "no-mirror"))
    assert images.pixels.shape == (960, 105, 105)
    assert images.num_classes == 48 and len(images.group_names) == 8
    assert images.group_names == tuple(sorted(p.name for p in mini_background.iterdir() if not p.name.startswith(".")))
    first_class = images.class_names[0]
    first_file = sorted((root / first_class).iterdir())[0]
    assert np.array_equal(images.pixels[0].numpy(), read_image(first_file))
    assert not (root / "images_background.zip").exists()
    assert len(list((root / ".siamese-cache").glob("folder-v2-*.npz"))) == 1


def test_cache_key_changes_when_a_file_changes(mini_evaluation, tmp_path):
    root = shutil.copytree(mini_evaluation, tmp_path / "tree", ignore=NO_CACHE)
    before = load_folder(root)
    changed = sorted(root.rglob("*.png"))[0]
    changed.write_bytes(encode(Image.new("L", (105, 105), 255)))  # a blank page of another size
    after = load_folder(root)
    assert len(list((root / ".siamese-cache").glob("folder-v2-*.npz"))) == 2
    assert int((before.pixels[0] == 0).sum()) > 0
    assert bool((after.pixels[0] == 255).all())
    assert torch.equal(after.pixels[1:], before.pixels[1:])


def test_files_replaced_keeping_their_size_and_timestamp_get_a_new_cache(mini_evaluation, tmp_path):
    root = shutil.copytree(mini_evaluation, tmp_path / "tree", ignore=NO_CACHE)
    changed = sorted(root.rglob("*.png"))[0]
    size, stamp = changed.stat().st_size, changed.stat().st_mtime_ns
    load_folder(root)
    blank = encode(Image.new("L", (105, 105), 255))
    changed.write_bytes(blank.ljust(size, b"\0")[:size] if len(blank) <= size else blank)
    assert changed.stat().st_size == size
    os.utime(changed, ns=(stamp, stamp))  # as mv, cp -p or unzip leave a file: same size and mtime, other pixels
    after = load_folder(root)  # the cached pixels of before
    assert bool((after.pixels[0] == 255).all())


def test_a_tree_is_walked_once_per_load_so_its_cache_holds_what_its_key_names(mini_evaluation, tmp_path, monkeypatch):
    root = shutil.copytree(mini_evaluation, tmp_path / "tree", ignore=NO_CACHE)
    first = sorted(root.rglob("*.png"))[0]
    added = first.with_name("added.png")
    walk, walks = omniglot_module.visible_images, []

    def walk_then_add(folder):
        walks.append(folder)
        files = walk(folder)
        shutil.copy(first, added)  # a file that arrives while the tree is being loaded
        return files

    monkeypatch.setattr(omniglot_module, "visible_images", walk_then_add)
    during = load_folder(root)
    monkeypatch.undo()
    added.unlink()
    after = load_folder(root)  # its key is the first load's: two walks cached the added file under it
    assert len(during) == len(after) == len(list(root.rglob("*.png")))
    assert torch.equal(after.pixels, during.pixels)
    assert len(walks) == 1


def test_symlinked_class_folders_are_read_once(mini_evaluation, tmp_path):
    real = shutil.copytree(first_alphabet(mini_evaluation), tmp_path / "real")
    tree = tmp_path / "tree"
    tree.mkdir()
    for folder in sorted(p for p in real.iterdir() if p.is_dir()):
        (tree / folder.name).symlink_to(folder, target_is_directory=True)  # skipped before: "no images found"
    (tree / "loop").symlink_to(tree, target_is_directory=True)  # a link back up is not walked again
    direct, linked = load_folder(real), load_folder(tree)
    assert [name.split("/")[1] for name in linked.class_names] == [name.split("/")[1] for name in direct.class_names]
    assert torch.equal(linked.pixels, direct.pixels)


def test_a_file_name_that_is_not_utf8_is_a_data_error(mini_evaluation, tmp_path):
    root = shutil.copytree(mini_evaluation, tmp_path / "tree", ignore=NO_CACHE)
    folder = next(p for p in sorted(root.glob("*/*")) if p.is_dir())
    shutil.copy(next(folder.glob("*.png")), os.fsencode(folder) + b"/caf\xe9.png")  # a Latin-1 name
    with pytest.raises(DataError, match=r"caf\\xe9\.png: the file name is not valid UTF-8; rename it"):
        load_folder(root)  # a UnicodeEncodeError traceback before


def test_hidden_and_other_files_with_names_that_are_not_utf8_are_skipped_as_other_such_files(mini_evaluation, tmp_path):
    root = shutil.copytree(mini_evaluation, tmp_path / "tree", ignore=NO_CACHE)
    folder = next(p for p in sorted(root.glob("*/*")) if p.is_dir())
    image = next(folder.glob("*.png"))
    shutil.copy(image, os.fsencode(folder) + b"/._caf\xe9.png")  # macOS's AppleDouble file of a Latin-1 name
    (Path(os.fsdecode(os.fsencode(folder) + b"/notes-caf\xe9.txt"))).write_text("not an image")
    assert torch.equal(load_folder(root).pixels, load_folder(mini_evaluation).pixels)  # the tree was refused before


def test_a_folder_that_cannot_be_listed_is_a_data_error_not_classes_missing(mini_evaluation, tmp_path, monkeypatch):
    root = shutil.copytree(mini_evaluation, tmp_path / "tree", ignore=NO_CACHE)
    folder = next(p for p in sorted(root.glob("*/*")) if p.is_dir())
    scandir = os.scandir

    def unreadable(path):  # as chmod 000 makes a folder for anyone but root
        if os.fspath(path) == str(folder):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", unreadable)
    with pytest.raises(DataError, match=re.escape(f"{folder}: cannot list this folder (Permission denied)")):
        load_folder(root)  # trained on the other classes, silently, before


def test_a_folder_of_images_without_class_folders_is_refused_not_taken_for_omniglot(mini_evaluation, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted(mini_evaluation.glob("*/*/*.png"))[:5]:
        shutil.copy(path, flat / path.name)
    with pytest.raises(DataError, match=r"flat: 5 images and no class folders; expected <group>/<class>/<image>"):
        load_training_set(flat, mirror=str(tmp_path / "no-mirror"))  # a download into it was tried before
    assert sorted(p.name for p in flat.iterdir() if p.suffix != ".png") == []


def test_a_class_tree_read_as_dot_is_named_after_its_folder(mini_evaluation, tmp_path, monkeypatch):
    alphabet = first_alphabet(mini_evaluation)
    tree = shutil.copytree(alphabet, tmp_path / "mine")
    monkeypatch.chdir(tree)
    images = load_folder(".")
    assert images.group_names == ("mine",)  # "" before, with classes named "/character01"
    assert images.class_names[0].startswith("mine/")


# --- pairs.py --------------------------------------------------------------------------------------


def test_split_validation_holds_out_whole_groups(background_images):
    train, val = split_validation(background_images, 0.25, seed=3)
    assert len(val.group_names) == 2 and len(train.group_names) == 6
    assert not set(train.group_names) & set(val.group_names)
    assert not set(train.class_names) & set(val.class_names)
    assert set(train.class_names) | set(val.class_names) == set(background_images.class_names)
    assert len(train) + len(val) == len(background_images)
    for part in (train, val):
        groups = {name.split("/")[0] for name in part.class_names}
        assert groups == set(part.group_names)
        assert [part.group_names[g].split("/")[0] for g in part.class_groups.tolist()] == [
            name.split("/")[0] for name in part.class_names
        ]
    again = split_validation(background_images, 0.25, seed=3)
    assert again[1].class_names == val.class_names and torch.equal(again[1].pixels, val.pixels)
    others = {split_validation(background_images, 0.25, seed=s)[1].group_names for s in range(4, 10)}
    assert len(others | {val.group_names}) > 1


@pytest.mark.parametrize("seed", range(6))
def test_split_validation_holds_out_groups_until_two_classes(seed):
    images = synthetic_set([3] * 11, [0, 1, 2, 3, 4, 5, 6, 7, 7, 8, 8])  # 7 groups of one class, 2 of two
    train, val = split_validation(images, 0.15, seed=seed)  # refused for seeds 0 and 2 before
    assert val.num_classes >= 2 and train.num_classes >= 2
    assert not set(train.group_names) & set(val.group_names)


def test_split_validation_single_group_holds_out_classes():
    images = synthetic_set([3] * 10, [0] * 10)
    train, val = split_validation(images, 0.3, seed=0)
    assert (train.num_classes, val.num_classes) == (7, 3)
    assert not set(train.class_names) & set(val.class_names)


@pytest.mark.parametrize(
    ("images", "fraction", "error", "message"),
    [
        (synthetic_set([2] * 3, [0] * 3), 0.3, DataError, "3 classes are too few"),
        (synthetic_set([2] * 4, [0, 1, 2, 3]), 0.9, DataError, "4 classes are too few to hold out validation "
         "classes: training needs 2 classes to train on and 2 to validate, and this split leaves 0 and 4"),
        (synthetic_set([2] * 8, [0] * 8), 1.0, ConfigError, "validation fraction must be between 0 and 1, got 1.0"),
    ],
)
def test_split_validation_errors(images, fraction, error, message):
    with pytest.raises(error, match=re.escape(message)):
        split_validation(images, fraction, seed=0)


def check_pairs(images: ImageSet, pairs, count: int) -> None:
    """Balance and correctness of one sample of ``count`` same and ``count`` different pairs."""
    assert len(pairs) == 2 * count
    assert pairs.same[:count].all() and not pairs.same[count:].any()
    first, second = images.labels[pairs.first], images.labels[pairs.second]
    assert torch.equal(first == second, pairs.same)
    assert bool((pairs.first[:count] != pairs.second[:count]).all())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32), within_group=st.floats(0.0, 1.0))
def test_pair_sampler_properties(background_images, seed, within_group):
    count = 2000
    pairs = PairSampler(background_images, within_group).sample(count, seeded_generator(seed))
    check_pairs(background_images, pairs, count)
    groups = background_images.class_groups[background_images.labels]
    same_group = (groups[pairs.first[count:]] == groups[pairs.second[count:]]).float().mean().item()
    # within-group draws, plus the share of "anywhere" draws that land in the group (5 of 47 others)
    expected = within_group + (1 - within_group) * 5 / 47
    assert abs(same_group - expected) < 0.06


def test_pair_sampler_within_group_extremes(background_images):
    groups = background_images.class_groups[background_images.labels]
    count = 3000
    inside = PairSampler(background_images, 1.0).sample(count, seeded_generator(1))
    assert torch.equal(groups[inside.first[count:]], groups[inside.second[count:]])
    anywhere = PairSampler(background_images, 0.0).sample(count, seeded_generator(1))
    other_group = (groups[anywhere.first[count:]] != groups[anywhere.second[count:]]).float().mean()
    assert other_group > 0.8


def test_pair_sampler_two_image_classes_and_lone_class_groups():
    images = synthetic_set([2, 2, 3, 2, 5], [0, 0, 1, 2, 2])  # group 1 has one class only
    count = 500
    pairs = PairSampler(images, within_group=1.0).sample(count, seeded_generator(5))
    check_pairs(images, pairs, count)
    same_pairs = {
        tuple(sorted(p)) for p in zip(pairs.first[:count].tolist(), pairs.second[:count].tolist(), strict=True)
    }
    assert {(0, 1), (2, 3)} <= same_pairs


def test_pair_sampler_reaches_every_class_evenly(background_images):
    count = 24_000
    pairs = PairSampler(background_images, 0.5).sample(count, seeded_generator(2))
    num_classes = background_images.num_classes
    same_classes = torch.bincount(background_images.labels[pairs.first[:count]], minlength=num_classes)
    negative_classes = torch.bincount(background_images.labels[pairs.second[count:]], minlength=num_classes)
    assert same_classes[-1] > 0 and negative_classes[-1] > 0  # the reference never drew its last class
    assert int(same_classes.min()) > 350 and int(same_classes.max()) < 650  # 500 expected
    assert int(negative_classes.min()) > 350 and int(negative_classes.max()) < 650
    images_used = torch.bincount(pairs.first[:count], minlength=len(background_images))
    assert int((images_used == 0).sum()) == 0  # every image of every class is drawn


def test_pair_sampler_is_deterministic(background_images):
    sampler = PairSampler(background_images, 0.5)
    a = sampler.sample(100, seeded_generator(4, 0))
    b = sampler.sample(100, seeded_generator(4, 0))
    c = sampler.sample(100, seeded_generator(4, 1))
    assert torch.equal(a.first, b.first) and torch.equal(a.second, b.second)
    assert not torch.equal(a.first, c.first)


@pytest.mark.parametrize(("class_sizes", "class_groups", "told"),
                         [([5], [0], "1 classes, 0 of them"), ([3, 1, 4], [0, 0, 1], "3 classes, 1 of them"),
                          ([], [], "0 classes, 0 of them")])
def test_pair_sampler_refuses_sets_that_cannot_make_both_kinds_of_pair(class_sizes, class_groups, told):
    # before: one class made "different" pairs of that class, a lone image "same" pairs of itself, no class a raw error
    told = f"pairs need at least 2 classes of at least 2 images each; this set has {told}"
    with pytest.raises(DataError, match=told):
        PairSampler(synthetic_set(class_sizes, class_groups))


def test_pair_sampler_rejects_bad_probability(background_images):
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\], got 1.5"):
        PairSampler(background_images, 1.5)


@pytest.mark.parametrize(("fraction", "held"), [(0.1, [2, 2, 2]), (0.5, [2, 2, 10]), (0.9, [2, 3, 18])])
def test_an_image_split_keeps_two_images_of_every_class_on_each_side(fraction: float, held: list[int]) -> None:
    images = synthetic_set([4, 5, 20], [0, 0, 1])
    train, val = split_images(images, fraction, seed=3)
    # before: 0.1 held out one image of the small classes (no validation pairs to make of them), 0.9 all but one or
    # none to train on (its "same" pairs one image twice, or a raw ZeroDivisionError)
    assert val.class_ranges()[1].tolist() == held
    assert train.class_ranges()[1].tolist() == [4 - held[0], 5 - held[1], 20 - held[2]]
    fixed_pairs(val, 50, seed=1)  # validation pairs of every class: refused with one image in a class


def test_an_image_split_refuses_classes_of_fewer_than_four_images() -> None:
    with pytest.raises(DataError, match=r"needs at least 4 images per class \(2 to train on, 2 to validate\)"):
        split_images(synthetic_set([4, 3, 20], [0, 0, 1]), 0.1, seed=3)


# --- episodes.py -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("way", "shot"), [(5, 1), (6, 3), (2, 19)])
def test_sample_episodes_are_valid_trials(evaluation_images, way, shot):
    trials = 200
    episodes = sample_episodes(evaluation_images, way=way, shot=shot, trials=trials, seed=0)
    assert episodes.support.shape == (trials, way, shot) and len(episodes) == trials
    labels, groups = evaluation_images.labels, evaluation_images.class_groups
    support_classes = labels[episodes.support]  # [T, N, K]
    assert torch.equal(support_classes, support_classes[..., :1].expand_as(support_classes))
    candidate_classes = support_classes[..., 0]  # [T, N]
    for t in range(trials):
        assert candidate_classes[t].unique().numel() == way
        assert groups[candidate_classes[t]].unique().numel() == 1
        assert episodes.support[t].flatten().unique().numel() == way * shot
        answer = int(episodes.answers[t])
        assert int(labels[episodes.queries[t]]) == int(candidate_classes[t, answer])
        assert int(episodes.queries[t]) not in episodes.support[t, answer].tolist()
    assert set(episodes.answers.tolist()) == set(range(way))
    assert groups[candidate_classes[:, 0]].unique().numel() == 3  # every alphabet is used


def test_sample_episodes_are_deterministic(evaluation_images):
    a = sample_episodes(evaluation_images, 5, 1, 50, seed=7)
    b = sample_episodes(evaluation_images, 5, 1, 50, seed=7)
    c = sample_episodes(evaluation_images, 5, 1, 50, seed=8)
    assert torch.equal(a.support, b.support) and torch.equal(a.queries, b.queries)
    assert torch.equal(a.answers, b.answers)
    assert not torch.equal(a.support, c.support)


@pytest.mark.parametrize(
    ("way", "shot", "message"),
    [
        (7, 1, "no alphabet has 7 characters; choose a smaller --way (largest: 6)"),
        (5, 20, "20-shot trials need 21 images per class; some classes have fewer; choose a smaller --shot "
                "(largest: 19)"),
        (1, 1, "need way ≥ 2"),
    ],
)
def test_sample_episodes_errors(evaluation_images, way, shot, message):
    with pytest.raises(DataError, match=re.escape(message)):
        sample_episodes(evaluation_images, way, shot, trials=10, seed=0)


def lake_answers(archive: Path) -> list[list[int]]:
    """Each run's answers read straight from class_labels.txt: ``classMM`` is training image MM - 1."""
    answers = []
    with zipfile.ZipFile(archive) as runs:
        for run in range(1, 21):
            lines = runs.read(f"run{run:02d}/class_labels.txt").decode().split("\n")
            pairs = [line.split() for line in lines if line.strip()]
            assert [test for test, _ in pairs] == [f"run{run:02d}/test/item{i:02d}.png" for i in range(1, 21)]
            answers.append([int(train[-6:-4]) - 1 for _, train in pairs])
    return answers


def test_load_lake_runs_from_the_archive_and_a_folder(shared_omniglot, tmp_path):
    archive = shared_omniglot / "all_runs.zip"
    runs = load_lake_runs(archive)
    assert runs.training.shape == (20, 20, 105, 105) and runs.test.shape == (20, 20, 105, 105)
    assert runs.training.dtype == torch.uint8
    assert runs.answers.tolist() == lake_answers(archive)
    with zipfile.ZipFile(archive) as source:
        item = np.asarray(Image.open(io.BytesIO(source.read("run03/test/item07.png"))).convert("L"))
        train = np.asarray(Image.open(io.BytesIO(source.read("run03/training/class12.png"))).convert("L"))
        source.extractall(tmp_path / "all_runs")
    assert np.array_equal(runs.test[2, 6].numpy(), item)
    assert np.array_equal(runs.training[2, 11].numpy(), train)
    for folder in (tmp_path / "all_runs", tmp_path):  # the runs, or a folder holding all_runs/
        extracted = load_lake_runs(folder)
        assert torch.equal(extracted.training, runs.training)
        assert torch.equal(extracted.test, runs.test)
        assert torch.equal(extracted.answers, runs.answers)


def test_load_lake_runs_errors(tmp_path, mini_evaluation):
    with pytest.raises(DataError, match="no such file or folder"):
        load_lake_runs(tmp_path / "all_runs.zip")
    with pytest.raises(DataError, match="no runNN/class_labels.txt found"):
        load_lake_runs(mini_evaluation)


@pytest.mark.parametrize(("edit", "told"), [
    (lambda line: line.replace("run01/training", "run07/training"), "has an unexpected line"),  # another run's
    (lambda line: line.replace("item02.png", "item01.png"), "must name each test image once"),
], ids=["another-run-s-class", "a-test-image-twice"])
def test_load_lake_runs_refuses_labels_that_do_not_pair_the_run_s_own_images(shared_omniglot, tmp_path, edit, told):
    with zipfile.ZipFile(shared_omniglot / "all_runs.zip") as source:
        source.extractall(tmp_path / "all_runs")
    labels = tmp_path / "all_runs" / "run01" / "class_labels.txt"
    lines = labels.read_text().splitlines()
    lines[1] = edit(lines[1])  # before: scored against run01's class of that name, or item01 scored twice
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"run01/class_labels.txt {told}"):
        load_lake_runs(tmp_path / "all_runs")


def test_load_lake_runs_refuses_a_test_image_no_label_names(shared_omniglot, tmp_path):
    with zipfile.ZipFile(shared_omniglot / "all_runs.zip") as source:
        source.extractall(tmp_path / "all_runs")
    test = tmp_path / "all_runs" / "run01" / "test"
    (test / "item21.png").write_bytes((test / "item01.png").read_bytes())  # before: left out of the scoring unsaid
    with pytest.raises(DataError, match="run01/class_labels.txt must name each test image once"):
        load_lake_runs(tmp_path / "all_runs")


# --- augment.py ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ink_batch(background_images):
    return to_ink(background_images.pixels[::40])  # 24 real characters


def test_random_distortion_distorts_reproducibly(ink_batch):
    out = random_distortion(ink_batch, seeded_generator(1))
    again = random_distortion(ink_batch, seeded_generator(1))
    other = random_distortion(ink_batch, seeded_generator(2))
    assert out.shape == ink_batch.shape and out.dtype == ink_batch.dtype
    assert torch.equal(out, again)
    assert not torch.allclose(out, other)
    changed = (out - ink_batch).abs().flatten(1).sum(1)
    assert bool((changed > 1).all())  # every image moved
    ratio = out.flatten(1).sum(1) / ink_batch.flatten(1).sum(1)
    assert bool(((ratio > 0.5) & (ratio < 2.0)).all())
    assert out.min() >= 0 and out.max() <= 1 + 1e-6


def test_random_distortion_without_distortion_is_identity(ink_batch):
    out = random_distortion(ink_batch, seeded_generator(0), rotate_deg=0, shear=0, scale=(1, 1), shift_px=0)
    assert torch.allclose(out, ink_batch, atol=1e-5)


def test_elastic_distortion_bends_strokes_more_as_it_grows(ink_batch):
    small = F.interpolate(ink_batch, size=(28, 28), mode="area")  # the fast preset's training size
    still = {"rotate_deg": 0, "shear": 0, "scale": (1, 1), "shift_px": 0}
    change = []
    for elastic in (0.05, 0.15, 0.3):
        out = random_distortion(small, seeded_generator(3), elastic=elastic, **still)
        assert torch.equal(out, random_distortion(small, seeded_generator(3), elastic=elastic, **still))
        ratio = out.flatten(1).sum(1) / small.flatten(1).sum(1)
        if elastic <= 0.15:  # up to the presets' strength, strokes bend without being erased or smeared
            assert bool(((ratio > 0.6) & (ratio < 1.5)).all())
        change.append(float((out - small).abs().mean()))
    assert 0 < change[0] < change[1] < change[2]


@pytest.mark.parametrize(("height", "width"), [(84, 84), (28, 40)])
def test_sampling_grid_is_the_affine_grid_plus_the_bicubic_field(height: int, width: int) -> None:
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(8, 2, 3, generator=generator)
    coarse = torch.randn(8, 2, 4, 4, generator=generator)
    affine = F.affine_grid(theta, [8, 1, height, width], align_corners=False)
    field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    assert torch.allclose(sampling_grid(theta, None, height, width), affine, atol=1e-5)
    assert torch.allclose(sampling_grid(theta, coarse, height, width), affine + field, atol=1e-5)


def test_random_distortion_keeps_blank_pages_blank():
    blank = torch.zeros(4, 1, 105, 105)
    assert torch.equal(random_distortion(blank, seeded_generator(0)), blank)


@pytest.mark.parametrize("size", [(1, 5000), (5000, 1), (3, 2000)])
def test_a_thin_image_fits_the_canvas_as_a_line(size: tuple[int, int]) -> None:
    buffer = io.BytesIO()
    Image.new("L", size, 0).save(buffer, format="PNG")
    pixels = decode_image(buffer.getvalue(), "thin.png")
    assert pixels.shape == (CANVAS_PX, CANVAS_PX)
    ink_rows, ink_columns = np.nonzero(pixels < 128)
    assert len(ink_rows) > 0  # the line is still there, centred
    long_extent = ink_rows if size[1] > size[0] else ink_columns
    assert long_extent.min() == 0 and long_extent.max() == CANVAS_PX - 1


@pytest.mark.parametrize(("classes", "message"), [
    (torch.tensor([2, 2]), "an index is repeated"),  # two names for one class, one of them without images, before
    (torch.tensor([-1]), r"class indices run from 0 to \d+"),  # the last class, by negative indexing, before
    (torch.tensor([9999]), r"class indices run from 0 to \d+"),  # a raw IndexError before
    (torch.tensor([True, False]), "not a mask"),  # classes 1 and 0 before
], ids=["repeated", "negative", "beyond", "mask"])
def test_subset_classes_refuses_what_it_would_misread(mini_evaluation: Path, classes, message: str) -> None:
    images = load_folder(mini_evaluation)
    with pytest.raises(DataError, match=message):
        images.subset_classes(classes)
    assert images.subset_classes(torch.tensor([3, 1])).class_names == (images.class_names[1], images.class_names[3])


def test_an_empty_image_set_has_no_trials_to_sample(mini_evaluation: Path) -> None:
    empty = load_folder(mini_evaluation).subset_classes(torch.tensor([], dtype=torch.long))
    with pytest.raises(DataError, match=r"no alphabet has 2 characters; choose a smaller --way \(largest: 0\)"):
        sample_episodes(empty, 2, 1, 1, 0)  # a raw RuntimeError from max() before
