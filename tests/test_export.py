"""ONNX export: the models onnxruntime runs reproduce PyTorch (checked here independently of the command's own
check), take any batch size, carry the threshold, and the command reports its difference and its errors."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from siamese_omniglot.data import to_ink
from siamese_omniglot.errors import ConfigError, ExportError
from siamese_omniglot.export import EMBEDDING_FILE, SCORER_FILE, OnnxExport, _difference, export_onnx
from siamese_omniglot.models import build_model
from siamese_omniglot.verify import BUNDLED_CHECKPOINT, Verifier

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def verifier(tiny_checkpoint: Path) -> Verifier:
    return Verifier.from_checkpoint(tiny_checkpoint, "cpu")


@pytest.fixture(scope="module")
def exported(verifier: Verifier, tmp_path_factory: pytest.TempPathFactory) -> OnnxExport:
    return export_onnx(verifier, tmp_path_factory.mktemp("onnx") / "out")


@pytest.fixture(scope="module")
def real_pixels(verifier: Verifier, mini_evaluation: Path) -> torch.Tensor:
    """11 real drawings of unseen characters, decoded as the Verifier decodes them."""
    return verifier.pixels(sorted(mini_evaluation.glob("*/*/*.png"))[::33][:11])


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 4, 11])
def test_onnx_embeddings_match_pytorch_at_any_batch_size(
    exported: OnnxExport, verifier: Verifier, real_pixels: torch.Tensor, batch: int
) -> None:
    pixels = real_pixels[:batch]
    (embeddings,) = session(exported.embedding_path).run(None, {"pixels": pixels.numpy()})
    expected = verifier.embed(pixels).numpy()
    assert embeddings.shape == expected.shape == (batch, exported.embedding_dim)
    assert np.abs(embeddings - expected).max() < 1e-4


def test_onnx_scores_match_the_verifier(exported: OnnxExport, verifier: Verifier, real_pixels: torch.Tensor) -> None:
    (embeddings,) = session(exported.embedding_path).run(None, {"pixels": real_pixels.numpy()})
    first, second = embeddings, np.roll(embeddings, 3, axis=0)
    logits, scores = session(exported.scorer_path).run(None, {"first": first, "second": second})
    expected = [verifier.score(a, b) for a, b in zip(real_pixels.numpy(), np.roll(real_pixels.numpy(), 3, axis=0),
                                                     strict=True)]
    assert scores.shape == logits.shape == (len(real_pixels),)
    assert np.abs(scores - np.array(expected)).max() < 1e-4
    assert np.abs(scores - 1 / (1 + np.exp(-logits))).max() < 1e-6


def test_export_reports_its_own_check(exported: OnnxExport) -> None:
    assert 0 <= exported.embedding_max_abs_diff < 1e-4 and 0 <= exported.scorer_max_abs_diff < 1e-4
    assert exported.max_abs_diff == max(exported.embedding_max_abs_diff, exported.scorer_max_abs_diff)
    assert exported.check_batches == (1, 8)
    assert sorted(p.name for p in exported.embedding_path.parent.iterdir()) == [EMBEDDING_FILE, SCORER_FILE]


def test_models_declare_a_dynamic_batch_and_carry_the_threshold(exported: OnnxExport, verifier: Verifier) -> None:
    embedding, scorer = onnx.load(str(exported.embedding_path)), onnx.load(str(exported.scorer_path))
    (pixels,) = embedding.graph.input
    dims = pixels.type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 105, 105]
    assert pixels.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [i.name for i in scorer.graph.input] == ["first", "second"]
    assert [o.name for o in scorer.graph.output] == ["logits", "scores"]
    for model, role in ((embedding, "embedding"), (scorer, "scorer")):
        metadata = {p.key: p.value for p in model.metadata_props}
        assert json.loads(metadata["siamese.threshold"]) == verifier.threshold
        assert json.loads(metadata["siamese.model_config"]) == verifier.model.config.to_dict()
        assert metadata["siamese.role"] == role


def test_a_model_that_resizes_without_framing_exports(real_pixels: torch.Tensor, tmp_path: Path) -> None:
    model = build_model("fast", frame=0.0, input_px=40).eval()  # 105 → 40: area ranges that overlap
    exported = export_onnx(model, tmp_path / "out", threshold=np.float32(0.25))  # numpy's scalars were refused
    (embeddings,) = session(exported.embedding_path).run(None, {"pixels": real_pixels.numpy()})
    with torch.no_grad():
        expected = model.embed(to_ink(real_pixels)).numpy()
    assert np.abs(embeddings - expected).max() < 1e-4
    metadata = {p.key: p.value for p in onnx.load(str(exported.scorer_path)).metadata_props}
    assert json.loads(metadata["siamese.threshold"]) == 0.25


def test_a_bare_network_needs_a_threshold(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no calibrated threshold: pass threshold= or a Verifier"):
        export_onnx(build_model("fast"), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is made


def test_a_failed_check_writes_nothing(verifier: Verifier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("siamese_omniglot.export._compare", lambda *args: (3e-3, 1e-7))
    with pytest.raises(ExportError, match=r"differs from PyTorch by 0\.003 .* more than 0\.0001; nothing was written"):
        export_onnx(verifier, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # no models, no temporary files, and not the folder made for them


def test_cli_export_prints_the_difference(tiny_checkpoint: Path, run_siamese, tmp_path: Path) -> None:
    result = run_siamese("export", tiny_checkpoint, "--format", "onnx", "--out", tmp_path / "onnx", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    match = re.search(r"max abs difference (\S+) \(embeddings (\S+), scores (\S+); limit 1e-04\)", result.stdout)
    assert match is not None, result.stdout
    assert all(float(value) < 1e-4 for value in match.groups())
    assert f"embedding: {tmp_path / 'onnx' / EMBEDDING_FILE}" in result.stdout
    assert (tmp_path / "onnx" / SCORER_FILE).is_file()


def test_cli_export_without_a_checkpoint_exports_the_bundled_model(run_siamese, tmp_path: Path) -> None:
    result = run_siamese("export", "--out", tmp_path / "onnx", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["checkpoint"] == str(BUNDLED_CHECKPOINT)
    assert (tmp_path / "onnx" / EMBEDDING_FILE).is_file() and (tmp_path / "onnx" / SCORER_FILE).is_file()


@pytest.mark.parametrize(
    ("args", "blocked", "message"),
    [
        (["CHECKPOINT", "--out", "onnx", "--format", "tflite"], (), "unknown export format 'tflite'"),
        (["CHECKPOINT", "--out", "onnx"], ("onnxruntime",), "pip install 'siamese-omniglot[onnx]'"),
        (["CHECKPOINT", "--out", "onnx", "--opset", "15"], (), "frames its input needs ONNX opset 16 or later, not 15"),
        (["CHECKPOINT", "--out", "onnx/deeper/still", "--opset", "99"], (), "ONNX opset 99 is newer than the "),
        (["CHECKPOINT", "--out", "onnx", "--opset", "99999999999"], (), "ONNX opset 99999999999 is newer than the "),
    ],
    ids=["unknown-format", "no-onnxruntime", "framing-below-opset-16", "unknown-opset", "opset-past-a-c-int"],
)
def test_cli_export_errors_are_one_line(
    args: list[str], blocked: tuple[str, ...], message: str, tiny_checkpoint: Path, run_siamese, tmp_path: Path
) -> None:
    args = [tiny_checkpoint if a == "CHECKPOINT" else a for a in args]
    result = run_siamese("export", *args, cwd=tmp_path, blocked=blocked)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert result.stdout == ""  # the exporter's dump of the graph included
    assert not (tmp_path / "onnx").exists()  # nor any of the folders made for it


def test_cli_export_with_standard_output_closed_writes_both_models_then_says_where_the_summary_went(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    code = "import sys; from siamese_omniglot.cli import main; sys.argv[0] = 'siamese'; main()"
    result = subprocess.run([sys.executable, "-c", code, "export", tiny_checkpoint, "--out", tmp_path / "onnx"],
                            stderr=subprocess.PIPE, text=True, timeout=600, preexec_fn=lambda: os.close(1))
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [EMBEDDING_FILE, SCORER_FILE]
    assert onnx.load(tmp_path / "onnx" / EMBEDDING_FILE).graph.node  # complete models
    # as `ls >&-` fails to print its listing: the summary was lost with exit code 0 before
    assert (result.returncode, result.stderr) == (2, "error: standard output is closed: the result has nowhere to go\n")


def test_cli_export_where_a_model_file_is_a_folder_writes_neither(
    tiny_checkpoint: Path, run_siamese, tmp_path: Path
) -> None:
    (tmp_path / "onnx" / EMBEDDING_FILE).mkdir(parents=True)
    result = run_siamese("export", tiny_checkpoint, "--out", tmp_path / "onnx", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"{tmp_path / 'onnx' / EMBEDDING_FILE}: is a folder" in result.stderr
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == [EMBEDDING_FILE]


def test_cli_export_to_a_file_says_out_names_a_folder(tiny_checkpoint: Path, run_siamese, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"a picture")
    result = run_siamese("export", tiny_checkpoint, "--out", tmp_path / "a.png", cwd=tmp_path)
    # "cannot create (File exists)" before
    told = f"error: {tmp_path / 'a.png'}: is a file; --out must name a folder\n"
    assert (result.returncode, result.stderr) == (2, told)
    assert (tmp_path / "a.png").read_bytes() == b"a picture"


def test_the_docs_onnx_canvas_is_the_library_s(mini_evaluation: Path, tmp_path: Path) -> None:
    from PIL import Image

    from siamese_omniglot.data import read_image

    usage = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    snippet = re.search(r"```python\n(import numpy as np\nimport onnxruntime.*?)\nembed = ", usage, re.DOTALL).group(1)
    namespace: dict = {}
    exec(snippet, namespace)  # the imports and the canvas function, as a user copies them
    drawing = sorted(mini_evaluation.glob("*/*/*.png"))[0]
    strokes = np.asarray(Image.open(drawing).convert("L")) < 128
    rgba = np.zeros((105, 105, 4), np.uint8)
    rgba[..., 3] = strokes * 255  # black strokes on a transparent canvas: an all-black canvas before
    Image.fromarray(rgba, "RGBA").save(tmp_path / "transparent.png")
    Image.open(drawing).convert("RGB").resize((80, 120)).save(tmp_path / "colour.png")  # another size, in colour
    for path in (drawing, tmp_path / "transparent.png", tmp_path / "colour.png"):
        assert np.array_equal(namespace["canvas"](path), read_image(path)), path


@pytest.mark.parametrize("threshold", ["high", float("nan"), 1.5, True])
def test_a_threshold_that_is_not_a_score_is_refused(threshold, tmp_path: Path) -> None:
    # written into the metadata before: "high" failed the consumer's float(), NaN decided every pair different
    with pytest.raises(ConfigError, match="is not a score between 0 and 1"):
        export_onnx(build_model("fast"), tmp_path / "onnx", threshold=threshold)
    assert not (tmp_path / "onnx").exists()


def test_a_nan_on_either_side_fails_the_check_against_pytorch() -> None:
    """``max(0.0, nan)`` is 0.0: a model giving NaN passed the check with "max abs difference 0.00e+00" before."""
    finite = np.array([[1.0, 2.0]], dtype=np.float32)
    with_nan = np.array([[1.0, np.nan]], dtype=np.float32)
    assert _difference(with_nan, finite) == _difference(finite, with_nan) == _difference(with_nan, with_nan) == math.inf
    assert _difference(finite + 1e-6, finite) == pytest.approx(1e-6, rel=0.1)
