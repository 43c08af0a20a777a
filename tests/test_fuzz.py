"""Fuzzing compare's image loading: mutated PNG files decode to a canvas or are refused with a DataError.

1,200 files are mutated from a few valid PNGs of different modes (seeded, so a failure reproduces):
byte flips, truncations, inserted and deleted runs, chunk edits with valid CRCs (so that the decoder,
not the CRC check, meets the damage), IHDR fields set to edge values, chunks dropped, repeated or
swapped, and splices of two files. Each goes through the library's decoding in-process; a handful also
go through the real ``siamese compare`` command.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_omniglot.checkpoint import save_checkpoint
from siamese_omniglot.data.images import CANVAS_PX, decode_image, read_image
from siamese_omniglot.errors import DataError
from siamese_omniglot.models import build_model

SIAMESE = shutil.which("siamese") or str(Path(sys.executable).parent / "siamese")
MUTANTS = 1200
BUDGET_S = 60  # the whole in-process fuzz run; it takes a few seconds
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IHDR_EDGES = [0, 1, 2, 7, 8, 255, 256, 65535, 10**6, 2**31 - 1, 2**31, 2**32 - 1]


def glyph(size: tuple[int, int] = (24, 32)) -> np.ndarray:
    """A small drawing: paper 255, one stroke of ink 0."""
    pixels = np.full((size[1], size[0]), 255, dtype=np.uint8)
    pixels[4:-4, size[0] // 2 - 2 : size[0] // 2 + 2] = 0
    pixels[size[1] // 2, 3:-3] = 0
    return pixels


def seeds() -> dict[str, bytes]:
    """Valid PNGs of the modes the decoder handles, small so that each mutant decodes in microseconds."""
    gray = Image.fromarray(glyph())
    rgba = Image.merge("RGBA", [gray, gray, gray, Image.eval(gray, lambda v: 255 - v)])
    palette = gray.convert("P")
    exif = Image.Exif()
    exif[0x0112] = 6
    images = {
        "gray": (gray, {}),
        "bilevel": (gray.convert("1"), {}),
        "rgb": (gray.convert("RGB"), {}),
        "rgba": (rgba, {}),
        "palette-transparent": (palette, {"transparency": palette.getpixel((0, 0))}),  # the paper
        "sixteen-bit": (Image.fromarray(glyph().astype(np.uint16) * 257), {}),
        "interlaced": (gray, {"interlace": 1}),
        "exif-rotated": (gray, {"exif": exif.tobytes()}),
    }
    encoded = {}
    for name, (image, options) in images.items():
        buffer = io.BytesIO()
        image.save(buffer, "PNG", **options)
        encoded[name] = buffer.getvalue()
    return encoded


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of each chunk of a well-formed PNG."""
    found, offset = [], len(PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        found.append((kind, data[offset + 8 : offset + 8 + length]))
        offset += 12 + length
    return found


def assemble(parts: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG from chunks, with correct lengths and CRCs."""
    body = b"".join(
        struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        for kind, payload in parts
    )
    return PNG_SIGNATURE + body


def mutate(data: bytes, other: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of ``data``: its name and the mutated bytes."""
    kind = rng.choice(["flip", "truncate", "insert", "delete", "chunk-bytes", "ihdr", "chunks", "splice", "idat"])
    buffer = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            buffer[rng.randrange(len(buffer))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del buffer[rng.randrange(len(buffer)) :]
    elif kind == "insert":
        at = rng.randrange(len(buffer))
        buffer[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == "delete":
        at = rng.randrange(len(buffer))
        del buffer[at : at + rng.randint(1, 64)]
    elif kind == "splice":
        buffer = bytearray(data[: rng.randrange(len(data))] + other[rng.randrange(len(other)) :])
    else:
        parts = chunks(data)
        if kind == "ihdr":
            fields = list(struct.unpack(">IIBBBBB", parts[0][1]))
            field = rng.randrange(7)
            fields[field] = rng.choice(IHDR_EDGES) if field < 2 else rng.randrange(256)
            fields[0], fields[1] = (min(v, 2**32 - 1) for v in fields[:2])
            parts[0] = (b"IHDR", struct.pack(">IIBBBBB", *fields))
        elif kind == "chunk-bytes":
            index = rng.randrange(len(parts))
            payload = bytearray(parts[index][1])
            for _ in range(rng.randint(1, 4)):
                if payload:
                    payload[rng.randrange(len(payload))] = rng.randrange(256)
            parts[index] = (parts[index][0], bytes(payload))
        elif kind == "idat":  # well-formed zlib around wrong-sized or random scanlines
            raw = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 10, 100, 5000])))
            parts = [p for p in parts if p[0] != b"IDAT"]
            parts.insert(len(parts) - 1, (b"IDAT", zlib.compress(raw)))
        else:  # drop, repeat or swap chunks
            action = rng.choice(["drop", "repeat", "swap"])
            i, j = rng.randrange(len(parts)), rng.randrange(len(parts))
            if action == "drop":
                del parts[i]
            elif action == "repeat":
                parts.insert(j, parts[i])
            else:
                parts[i], parts[j] = parts[j], parts[i]
        buffer = bytearray(assemble(parts))
    return kind, bytes(buffer)


def mutants(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    originals = seeds()
    names = sorted(originals)
    made = []
    for i in range(count):
        name = names[i % len(names)]
        kind, data = mutate(originals[name], originals[rng.choice(names)], rng)
        made.append((f"{i:04d}-{name}-{kind}.png", data))
    return made


def test_seeds_are_valid_and_decode_to_the_glyph() -> None:
    for name, data in seeds().items():
        pixels = decode_image(data, name)
        assert pixels.shape == (CANVAS_PX, CANVAS_PX) and pixels[0, 0] == 255 and (pixels < 128).any(), name
        assert assemble(chunks(data)) == data  # the chunk tools round-trip


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every mutant decoded in-process: outcome per file, and the time it all took."""
    folder = tmp_path_factory.mktemp("fuzz")
    outcomes: dict[str, str] = {}
    escaped: list[str] = []
    started = time.perf_counter()
    for name, data in mutants(MUTANTS):
        path = folder / name
        path.write_bytes(data)
        try:
            pixels = read_image(path)
        except DataError as error:
            message = str(error)
            outcomes[name] = "refused"
            if not message.startswith(f"{path}: ") or "\n" in message:
                escaped.append(f"{name}: badly formed message {message!r}")
        except Exception as error:  # noqa: BLE001 (what the fuzz is looking for)
            escaped.append(f"{name}: {type(error).__name__}: {error}")
        else:
            outcomes[name] = "decoded"
            if pixels.shape != (CANVAS_PX, CANVAS_PX) or pixels.dtype != np.uint8:
                escaped.append(f"{name}: decoded to {pixels.shape} {pixels.dtype}")
        assert time.perf_counter() - started < BUDGET_S, f"fuzzing ran past {BUDGET_S} s at {name}"
    return {"folder": folder, "outcomes": outcomes, "escaped": escaped, "seconds": time.perf_counter() - started}


def test_mutated_pngs_decode_or_are_refused_with_a_data_error(fuzz_results: dict) -> None:
    assert fuzz_results["escaped"] == []
    outcomes = fuzz_results["outcomes"]
    assert len(outcomes) == MUTANTS
    # the mutations reach both outcomes in quantity: the fuzz is not just feeding unrecognisable noise
    counts = {kind: list(outcomes.values()).count(kind) for kind in ("decoded", "refused")}
    assert counts["decoded"] > 100 and counts["refused"] > 300, counts


def test_the_command_agrees_and_never_shows_a_traceback(fuzz_results: dict, tmp_path: Path) -> None:
    """A handful through the real ``siamese compare``: exit 0 with a verdict, or exit 2 with one error line."""
    torch.manual_seed(0)
    model = build_model("fast")
    checkpoint = save_checkpoint(
        {"model_config": model.config.to_dict(), "model": model.state_dict(), "threshold": 0.5}, tmp_path / "m.pt"
    )
    reference = tmp_path / "reference.png"
    Image.fromarray(glyph()).save(reference)
    outcomes = fuzz_results["outcomes"]
    rng = random.Random(1)
    picked = rng.sample([n for n, o in outcomes.items() if o == "decoded"], 1)
    picked += rng.sample([n for n, o in outcomes.items() if o == "refused"], 2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIAMESE_")} | {"OMP_NUM_THREADS": "1"}
    for name in picked:
        path = fuzz_results["folder"] / name
        command = [SIAMESE, "compare", reference, path, "--checkpoint", checkpoint, "--device", "cpu", "--json"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert "Traceback" not in result.stdout + result.stderr, name
        if outcomes[name] == "decoded":
            assert result.returncode == 0, (name, result.stderr)
            assert 0 <= json.loads(result.stdout)["score"] <= 1
        else:
            assert result.returncode == 2, (name, result.stderr)
            assert result.stdout == ""
            assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {path}: "), result.stderr
