"""Omniglot on disk: find it, download it, check it, and decode it once into a cached array.

The data root (``--data``, else ``$SIAMESE_DATA``, else ``./datasets``) may hold the official archives
``images_background.zip`` / ``images_evaluation.zip``, their extracted folders, the reference's
``image_background/`` spelling, or torchvision's ``omniglot-py/`` folder. Archives are read in place,
never extracted. Missing archives are downloaded from the official repository or from a mirror
(``--mirror`` / ``$SIAMESE_OMNIGLOT_MIRROR``: a base URL or a local folder holding the same file names).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..files import atomic_write, make_folders, remove_empty
from .folders import ImageIndex, decode_index, index_paths, visible_images
from .images import CANVAS_PX, IMAGE_SUFFIXES, ImageSet
from .roots import MIRROR_ENV, data_root, mirror_source

log = logging.getLogger(__name__)

OFFICIAL_BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
CACHE_DIR = ".siamese-cache"
CACHE_VERSION = 2  # raised when decoding changes, so no cache of the old decoding is served

ProgressFn = Callable[[str, int, int], None]  # (what, done, total)


@dataclass(frozen=True)
class Split:
    """One of Omniglot's two archives and the contents it must have."""

    name: str
    md5: str
    alphabets: int
    characters: int
    images: int

    @property
    def archive(self) -> str:
        """The archive's file name."""
        return f"{self.name}.zip"


BACKGROUND = Split("images_background", "68d2efa1b9178cc56df9314c21c6e718", 30, 964, 19280)
EVALUATION = Split("images_evaluation", "6b91aef0f799c5bb55b94e3f2daec811", 20, 659, 13180)
SPLITS = {"background": BACKGROUND, "evaluation": EVALUATION}


# --- sources: a zip archive or a folder, listed and read by relative path --------------------------


class _ZipSource:
    def __init__(self, path: Path, top: str | None) -> None:
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as error:
            raise DataError(f"{path}: not a readable zip archive ({error}); delete it and retry") from None
        self._names: dict[str, str] = {}
        for info in self._zip.infolist():
            name = info.filename
            parts = PurePosixPath(name.replace("\\", "/")).parts  # a backslash is a separator on Windows
            if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise DataError(f"{path}: refusing unsafe archive entry {name!r} (it points outside the archive)")
            if info.is_dir():
                continue
            if top is not None and parts and parts[0] == top:
                parts = parts[1:]
            self._names["/".join(parts)] = name

    def __enter__(self) -> _ZipSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._zip.close()

    def list(self) -> list[str]:
        return list(self._names)

    def read(self, relative: str) -> bytes:
        try:
            return self._zip.read(self._names[relative])
        except (zipfile.BadZipFile, OSError, KeyError) as error:
            raise DataError(f"{self.path}: entry {relative!r} is unreadable ({error})") from None

    def fingerprint(self) -> str:
        return _file_digest(self.path, "sha256")


class _FolderSource:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._files: list[str] | None = None

    def list(self) -> list[str]:
        # walked once: the cache key and the index then name the same files, even if the tree changes meanwhile
        if self._files is None:
            self._files = [str(path) for path in visible_images(self.path)]
        return self._files

    def read(self, relative: str) -> bytes:
        try:
            return (self.path / relative).read_bytes()
        except OSError as error:
            raise DataError(f"{self.path / relative}: cannot read ({error.strerror})") from None

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for relative in sorted(self.list()):
            stat = (self.path / relative).stat()
            # the inode and change time too: a file moved or copied in keeping its size and mtime (mv, cp -p,
            # unzip, which gives Omniglot's files one 1980 timestamp) changes them
            key = (relative, stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)
            digest.update("\0".join(map(str, key)).encode() + b"\n")
        return digest.hexdigest()


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- finding and fetching -------------------------------------------------------------------------


def find_split(root: Path, split: Split) -> Path | None:
    """The archive or folder of ``split`` under ``root``, or None when absent."""
    reference_spelling = split.name.replace("images_", "image_")
    for base in (root, root / "omniglot-py"):
        for candidate in (base / split.archive, base / split.name, base / reference_spelling):
            if candidate.exists():
                return candidate
    return None


def fetch_archive(
    filename: str, root: Path, mirror: str | None = None, progress: ProgressFn | None = None
) -> Path:
    """Download ``filename`` from the mirror (or the official repository) into ``root``, atomically.

    The bytes go to a hidden ``.part`` file that is renamed only once the whole archive has arrived and
    is on disk, so an interrupted download is never taken for the archive.
    """
    made: list[Path] = []
    try:
        made = make_folders(root)
    except OSError as error:
        raise DataError(f"{root}: cannot write the download there ({error.strerror or error})") from None
    target = root / filename
    source = mirror_source(mirror)
    try:
        with atomic_write(target, suffix=".part") as file:
            if source and urllib.parse.urlparse(source).scheme not in ("http", "https", "ftp"):
                local = Path(urllib.parse.urlparse(source).path if source.startswith("file:") else source)
                if not (local / filename).is_file():
                    raise DataError(f"mirror {local} has no {filename}")
                with open(local / filename, "rb") as copied:
                    _copy_stream(copied, file, (local / filename).stat().st_size, filename, progress)
            else:
                url = f"{(source or OFFICIAL_BASE_URL).rstrip('/')}/{filename}"
                log.info("downloading %s", url)
                try:
                    with urllib.request.urlopen(url, timeout=60) as response:
                        size = int(response.headers.get("Content-Length") or 0)
                        _copy_stream(response, file, size, filename, progress)
                except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                    raise DataError(
                        f"cannot download {url} ({getattr(error, 'reason', error)}); "
                        f"put {filename} in {root} or name a mirror with --mirror or ${MIRROR_ENV}"
                    ) from None
    except BaseException as error:
        remove_empty(made)  # folders made for nothing are not left behind
        if isinstance(error, OSError):  # a full disk or a vanished folder while writing
            raise DataError(f"{target}: cannot write the download ({error.strerror or error})") from None
        raise
    return target


def _copy_stream(source, sink, total: int, what: str, progress: ProgressFn | None) -> None:
    done = 0
    for block in iter(lambda: source.read(1 << 20), b""):
        try:
            sink.write(block)
        except OSError as error:  # a full disk, not a network failure
            raise DataError(f"{sink.name}: cannot write the download ({error.strerror or error})") from None
        done += len(block)
        if progress is not None:
            progress(f"download {what}", done, total)
    if total and done != total:  # a dropped connection ends the stream early without an error
        raise DataError(f"download of {what} stopped after {done:,} of {total:,} bytes; retry")


# --- loading --------------------------------------------------------------------------------------


def load_split(
    split: str | Split = "background",
    data: str | Path | None = None,
    mirror: str | None = None,
    download: bool = True,
    progress: ProgressFn | None = None,
    skip_bad_images: bool = False,
) -> ImageSet:
    """Load one Omniglot split (``background`` or ``evaluation``), fetching it when missing.

    Alphabets become the groups and characters the classes of the returned ImageSet. Unreadable
    images are all listed in one DataError, or left out with a warning when ``skip_bad_images``.
    """
    if isinstance(split, str):
        if split not in SPLITS:
            raise ConfigError(f"unknown Omniglot split {split!r}: choose {' or '.join(SPLITS)}")
        split = SPLITS[split]
    root = data_root(data)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: is a file; --data must name a folder")
    location = find_split(root, split)
    downloaded = location is None
    if downloaded:
        if not download:
            raise DataError(f"{root}: no {split.archive} or {split.name}/ found")
        location = fetch_archive(split.archive, root, mirror, progress)
    try:
        if location.is_dir():
            inner = location / split.name
            return _load_cached(_FolderSource(inner if inner.is_dir() else location), root, split.name, progress,
                                check=split, skip_bad=skip_bad_images)
        with _ZipSource(location, top=split.name) as source:
            return _load_cached(source, root, split.name, progress, check=split, skip_bad=skip_bad_images)
    except DataError:
        if downloaded:  # never leave a bad download behind as if it were the data set
            location.unlink(missing_ok=True)
        raise


def load_folder(path: str | Path, progress: ProgressFn | None = None, skip_bad_images: bool = False) -> ImageSet:
    """Load a custom tree ``<group>/<class>/<image>`` or ``<class>/<image>`` (cached beside it).

    Unreadable images are all listed in one DataError, or left out with a warning when ``skip_bad_images``.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: no such folder")
    return _load_cached(_FolderSource(path), path, "folder", progress, check=None, skip_bad=skip_bad_images)


def looks_like_omniglot(root: Path) -> bool:
    """Whether ``root`` holds (or should receive) Omniglot rather than a custom image tree."""
    if not root.is_dir() or find_split(root, BACKGROUND) or find_split(root, EVALUATION):
        return True
    # a folder of images with no class folders is a malformed custom tree, not a place to download Omniglot into
    visible = [p for p in root.iterdir() if not p.name.startswith(".")]
    return not any(p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES for p in visible)


def image_folders(data: str | Path | None = None) -> list[Path]:
    """The folders whose every visible file a load of ``data`` reads as an image: a custom tree's root, or an
    Omniglot root's extracted splits (its archives hold their own files)."""
    root = data_root(data)
    if not looks_like_omniglot(root):
        return [root]
    splits = (find_split(root, split) for split in (BACKGROUND, EVALUATION))
    return [split for split in splits if split is not None and split.is_dir()]


def load_training_set(
    data: str | Path | None = None,
    mirror: str | None = None,
    progress: ProgressFn | None = None,
    skip_bad_images: bool = False,
) -> ImageSet:
    """Images to train on: Omniglot's background split, or the custom tree at the data root."""
    root = data_root(data)
    if looks_like_omniglot(root):
        return load_split(BACKGROUND, root, mirror, progress=progress, skip_bad_images=skip_bad_images)
    return load_folder(root, progress, skip_bad_images)


def load_evaluation_set(
    data: str | Path | None = None,
    mirror: str | None = None,
    progress: ProgressFn | None = None,
    skip_bad_images: bool = False,
) -> ImageSet:
    """Images never seen in training: Omniglot's evaluation split, or the custom tree at the data root."""
    root = data_root(data)
    if looks_like_omniglot(root):
        return load_split(EVALUATION, root, mirror, progress=progress, skip_bad_images=skip_bad_images)
    return load_folder(root, progress, skip_bad_images)


def _load_cached(
    source, root: Path, name: str, progress: ProgressFn | None, check: Split | None, skip_bad: bool = False
) -> ImageSet:
    key = source.fingerprint()[:20]
    cache = root / CACHE_DIR / f"{name}-v{CACHE_VERSION}-{key}.npz"
    if cache.is_file():
        try:
            return _read_cache(cache)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            log.warning("ignoring unreadable cache %s", cache)
    index = index_paths(source.list(), str(source.path))
    if check is not None:
        _check_contents(source, index, check)
    report = (lambda d, t: progress(f"decode {source.path.name}", d, t)) if progress else None  # the archive or tree
    images = decode_index(index, source.read, report, skip_bad=skip_bad, source=str(source.path))
    if len(images) < len(index.paths):
        return images  # bad images were skipped: not cached, so a later run without skipping still sees them
    try:
        _write_cache(cache, images)
    except OSError as error:
        log.warning("cannot write cache %s (%s); images will be decoded again next time", cache, error.strerror)
    return images


def _check_contents(source, index: ImageIndex, split: Split) -> None:
    found = (len(index.group_names), len(index.class_names), len(index.paths))
    expected = (split.alphabets, split.characters, split.images)
    if isinstance(source, _ZipSource) and _file_digest(source.path, "md5") == split.md5:
        return
    if found != expected:
        raise DataError(
            f"{source.path}: has {found[0]} alphabets / {found[1]} characters / {found[2]} images, "
            f"expected {expected[0]} / {expected[1]} / {expected[2]} for {split.name}; "
            "delete it to download it again"
        )
    if isinstance(source, _ZipSource):
        log.warning(
            "%s is not byte-identical to the official archive, but its contents check out "
            "(%d alphabets, %d characters, %d images)", source.path, *found,
        )


def _write_cache(cache: Path, images: ImageSet) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    pixels = images.pixels.numpy()
    binary = bool(((pixels == 0) | (pixels == 255)).all())
    with atomic_write(cache) as file:  # a full disk leaves no partial cache behind
        np.savez(
            file,
            pixels=np.packbits(pixels == 255) if binary else pixels,
            binary=np.array(binary),
            shape=np.array(pixels.shape),
            labels=images.labels.numpy(),
            class_names=np.array(images.class_names),
            class_groups=images.class_groups.numpy(),
            group_names=np.array(images.group_names),
        )


def _read_cache(cache: Path) -> ImageSet:
    with np.load(cache, allow_pickle=False) as stored:
        shape = tuple(int(s) for s in stored["shape"])
        if shape[1:] != (CANVAS_PX, CANVAS_PX):
            raise ValueError("canvas size changed")
        if bool(stored["binary"]):
            bits = np.unpackbits(stored["pixels"], count=int(np.prod(shape))).reshape(shape)
            pixels = bits * np.uint8(255)
        else:
            pixels = stored["pixels"]
        return ImageSet(
            pixels=torch.from_numpy(np.ascontiguousarray(pixels)),
            labels=torch.from_numpy(stored["labels"]),
            class_names=tuple(str(s) for s in stored["class_names"]),
            class_groups=torch.from_numpy(stored["class_groups"]),
            group_names=tuple(str(s) for s in stored["group_names"]),
        )

