"""One-shot recognition against a support folder: layouts, the ranking, and the embedding cache."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siamese_omniglot.data import read_image
from siamese_omniglot.errors import ConfigError, DataError
from siamese_omniglot.gallery import CACHE_DIR, Support, scan_support
from siamese_omniglot.verify import Verifier


@pytest.fixture(scope="module")
def verifier(tiny_checkpoint: Path) -> Verifier:
    return Verifier.from_checkpoint(tiny_checkpoint, "cpu")


@pytest.fixture(scope="module")
def alphabet(mini_evaluation: Path) -> Path:
    """One unseen alphabet: 6 characters × 20 drawings."""
    return sorted(p for p in mini_evaluation.iterdir() if p.is_dir() and not p.name.startswith("."))[0]


def character_folders(alphabet: Path) -> list[Path]:
    return sorted(p for p in alphabet.iterdir() if p.is_dir())


def five_shot_support(alphabet: Path, root: Path) -> Path:
    """``root/<character>/<image>``: the first 5 drawings of every character."""
    for character in character_folders(alphabet):
        (root / character.name).mkdir(parents=True)
        for image in sorted(character.glob("*.png"))[:5]:
            shutil.copy(image, root / character.name / image.name)
    return root


def one_shot_support(alphabet: Path, root: Path) -> Path:
    """``root/<character>.png``: the first drawing of every character."""
    root.mkdir(parents=True)
    for character in character_folders(alphabet):
        shutil.copy(sorted(character.glob("*.png"))[0], root / f"{character.name}.png")
    return root


def test_scan_support_reads_both_layouts_and_skips_the_rest(alphabet: Path, tmp_path: Path) -> None:
    first, second = character_folders(alphabet)[:2]
    (tmp_path / "alpha").mkdir()
    for image in sorted(first.glob("*.png"))[:2]:
        shutil.copy(image, tmp_path / "alpha" / image.name)
    shutil.copy(next(second.glob("*.png")), tmp_path / "beta.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    shutil.copy(next(second.glob("*.png")), tmp_path / ".hidden" / "x.png")
    names = sorted(p.name for p in first.glob("*.png"))[:2]
    assert scan_support(tmp_path) == [("alpha", f"alpha/{names[0]}"), ("alpha", f"alpha/{names[1]}"),
                                      ("beta", "beta.png")]


def test_scan_support_follows_symlinked_class_folders(alphabet: Path, tmp_path: Path) -> None:
    first, second = character_folders(alphabet)[:2]
    (tmp_path / "support").mkdir()
    shutil.copytree(first, tmp_path / "support" / "real")
    (tmp_path / "support" / "linked").symlink_to(second, target_is_directory=True)  # left out silently before
    classes = sorted({name for name, _ in scan_support(tmp_path / "support")})
    assert classes == ["linked", "real"]
    assert len(scan_support(tmp_path / "support")) == len(list(first.glob("*.png"))) + len(list(second.glob("*.png")))


def test_a_support_file_name_that_is_not_utf8_is_a_data_error(alphabet: Path, tmp_path: Path) -> None:
    (tmp_path / "support" / "c01").mkdir(parents=True)
    shutil.copy(next(alphabet.glob("*/*.png")), os.fsencode(tmp_path / "support" / "c01") + b"/caf\xe9.png")
    with pytest.raises(DataError, match="the file name is not valid UTF-8; rename it"):
        scan_support(tmp_path / "support")  # a UnicodeEncodeError traceback from load_support before


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root, image: None, "no such folder"),
        (lambda root, image: root.mkdir(), "no images found"),
        (lambda root, image: (root / "a" / "b").mkdir(parents=True) or shutil.copy(image, root / "a" / "b"),
         "is too deep"),
    ],
    ids=["missing", "empty", "too-deep"],
)
def test_bad_support_folders_are_data_errors(make, message: str, alphabet: Path, tmp_path: Path) -> None:
    make(tmp_path / "support", next(alphabet.glob("*/*.png")))
    with pytest.raises(DataError, match=message):
        scan_support(tmp_path / "support")


def test_a_support_image_is_recognised_as_its_own_class(verifier: Verifier, alphabet: Path, tmp_path: Path) -> None:
    """Distance 0 gives the highest score the calibrated head can give: each class must come first."""
    support = one_shot_support(alphabet, tmp_path / "support")
    queries = sorted(support.glob("*.png"))
    results = verifier.classify(queries, support, top_k=3)
    assert [r.best.class_name for r in results] == [q.stem for q in queries]
    assert all(r.best.same for r in results)  # an image with itself is above the threshold
    assert [r.query for r in results] == [str(q) for q in queries]


def test_unseen_drawings_are_mostly_recognised(verifier: Verifier, alphabet: Path, tmp_path: Path) -> None:
    support = five_shot_support(alphabet, tmp_path / "support")
    queries, truth = [], []
    for character in character_folders(alphabet):
        drawings = sorted(character.glob("*.png"))[10:14]  # never in the support folder
        queries += drawings
        truth += [character.name] * len(drawings)
    results = verifier.classify(queries, support)
    accuracy = sum(r.best.class_name == t for r, t in zip(results, truth, strict=True)) / len(truth)
    assert accuracy >= 0.6  # 6 classes: chance is 0.17; this model reaches about 0.9


def test_scores_are_the_sigmoid_of_each_class_mean_logit(
    verifier: Verifier, alphabet: Path, tmp_path: Path
) -> None:
    support = five_shot_support(alphabet, tmp_path / "support")
    query = sorted(character_folders(alphabet)[2].glob("*.png"))[15]
    (result,) = verifier.classify(query, support, top_k=4)
    by_hand = {}
    embedded = verifier.embed([query])
    with torch.no_grad():
        for character in character_folders(alphabet):
            shots = verifier.embed(sorted((support / character.name).glob("*.png")))
            by_hand[character.name] = float(torch.sigmoid(verifier.model.score_embeddings(embedded, shots).mean()))
    ranked = sorted(by_hand.items(), key=lambda item: -item[1])[:4]
    assert [m.class_name for m in result.matches] == [name for name, _ in ranked]
    assert [m.score for m in result.matches] == pytest.approx([score for _, score in ranked], abs=1e-5)
    assert all(m.same == (m.score >= verifier.threshold) for m in result.matches)
    assert len(verifier.classify(query, support, top_k=50)[0].matches) == 6  # at most every class


def test_top_k_below_one_is_refused(verifier: Verifier, alphabet: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top_k must be at least 1"):
        verifier.classify(next(alphabet.glob("*/*.png")), one_shot_support(alphabet, tmp_path / "s"), top_k=0)


def test_support_embeddings_are_cached_and_reused(
    verifier: Verifier, alphabet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    support_dir = five_shot_support(alphabet, tmp_path / "support")
    first = verifier.load_support(support_dir)
    assert not first.from_cache and first.cache_path is not None and first.cache_path.is_file()
    assert first.cache_path.parent == support_dir / CACHE_DIR
    assert [p.name for p in first.cache_path.parent.iterdir()] == [first.cache_path.name]  # no temporary file left
    monkeypatch.setattr(verifier, "embed", lambda images: pytest.fail("the support images were embedded again"))
    second = verifier.load_support(support_dir)
    assert second.from_cache and second.cache_path == first.cache_path
    assert torch.equal(second.embeddings, first.embeddings)
    assert (second.class_names, second.paths) == (first.class_names, first.paths)
    assert torch.equal(second.labels, first.labels)


@pytest.mark.parametrize("change", ["add", "remove", "edit", "rename"])
def test_the_cache_is_invalidated_when_the_folder_changes(
    change: str, verifier: Verifier, alphabet: Path, tmp_path: Path
) -> None:
    support_dir = five_shot_support(alphabet, tmp_path / "support")
    before = verifier.load_support(support_dir)
    images = sorted(support_dir.glob("*/*.png"))
    if change == "add":
        shutil.copy(images[0], support_dir / "new-class.png")
    elif change == "remove":
        images[3].unlink()
    elif change == "edit":
        images[3].write_bytes(images[8].read_bytes())  # same name, other drawing
    else:
        images[3].rename(images[3].with_name("renamed.png"))
    after = verifier.load_support(support_dir)
    assert not after.from_cache and after.cache_path != before.cache_path
    assert not before.cache_path.exists()  # this model's cache of the old contents is gone
    assert after.embeddings.shape[0] == len(after.paths) == len(list(support_dir.glob("**/*.png")))
    fresh = verifier.load_support(support_dir, cache=False)
    assert torch.allclose(after.embeddings, fresh.embeddings, atol=1e-6)


def test_the_cache_is_keyed_by_the_model(verifier: Verifier, tiny_checkpoint: Path, alphabet: Path,
                                         tmp_path: Path) -> None:
    support_dir = one_shot_support(alphabet, tmp_path / "support")
    ours = verifier.load_support(support_dir)
    other = Verifier.from_checkpoint(tiny_checkpoint, "cpu")
    with torch.no_grad():
        other.model.embedding.backbone.features[0].weight.mul_(1.5)
    theirs = other.load_support(support_dir)
    assert not theirs.from_cache and theirs.cache_path != ours.cache_path
    assert ours.cache_path.exists()  # another model's cache is left alone
    assert not torch.allclose(theirs.embeddings, ours.embeddings)


def test_the_cache_is_keyed_by_the_views(verifier: Verifier, tiny_checkpoint: Path, alphabet: Path,
                                        tmp_path: Path) -> None:
    """Same weights, other views: other embeddings, so another cache entry."""
    support_dir = one_shot_support(alphabet, tmp_path / "support")
    ours = verifier.load_support(support_dir)
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    views = 9 if state["calibrated_views"] == 5 else 5
    state["model_config"]["views"] = state["calibrated_views"] = views
    torch.save(state, tmp_path / "other-views.pt")
    theirs = Verifier.from_checkpoint(tmp_path / "other-views.pt", "cpu").load_support(support_dir)
    assert not theirs.from_cache and theirs.cache_path != ours.cache_path
    assert not torch.allclose(theirs.embeddings, ours.embeddings)


def _damaged(cache: Path, embeddings: np.ndarray) -> None:
    """Rewrite a cache file, valid as an archive, with these embeddings for its own paths."""
    with np.load(cache) as stored:
        paths = stored["paths"]
    with cache.open("wb") as file:
        np.savez(file, paths=paths, embeddings=embeddings)


@pytest.mark.parametrize(
    "damage",
    [
        lambda cache, e: cache.write_bytes(b"truncated"),
        lambda cache, e: _damaged(cache, e[:, :7]),
        lambda cache, e: _damaged(cache, np.full_like(e, np.nan)),
    ],
    ids=["truncated", "other-width", "not-numbers"],
)
def test_an_unreadable_cache_is_recomputed(
    verifier: Verifier, alphabet: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage
) -> None:
    support_dir = one_shot_support(alphabet, tmp_path / "support")
    first = verifier.load_support(support_dir)
    damage(first.cache_path, first.embeddings.numpy())
    second = verifier.load_support(support_dir)
    assert not second.from_cache and "ignoring unreadable cache" in caplog.text
    assert torch.equal(second.embeddings, first.embeddings)
    assert verifier.load_support(support_dir).from_cache  # rewritten whole


def test_a_loaded_support_is_reused_by_classify(verifier: Verifier, alphabet: Path, tmp_path: Path) -> None:
    support = verifier.load_support(one_shot_support(alphabet, tmp_path / "support"), cache=False)
    assert isinstance(support, Support) and support.cache_path is None and len(support) == support.num_classes == 6
    assert not (tmp_path / "support" / CACHE_DIR).exists()
    query = sorted(tmp_path.glob("support/*.png"))[2]
    assert verifier.classify(query, support)[0].best.class_name == query.stem


def test_a_support_embedded_by_another_model_is_refused(verifier: Verifier, alphabet: Path, tmp_path: Path) -> None:
    from siamese_omniglot.errors import ConfigError
    from siamese_omniglot.verify import default_checkpoint

    bundled = Verifier.from_checkpoint(default_checkpoint(), "cpu")  # another network, other embeddings
    support = bundled.load_support(one_shot_support(alphabet, tmp_path / "support"), cache=False)
    query = sorted(tmp_path.glob("support/*.png"))[2]
    assert bundled.classify(query, support)[0].best.class_name == query.stem
    # a raw RuntimeError where the widths differ before, and rankings by the other model's embeddings where not
    with pytest.raises(ConfigError, match="the support was embedded by another model; load it with this verifier"):
        verifier.classify(query, support)


def test_cli_classify(tiny_checkpoint: Path, alphabet: Path, run_siamese, tmp_path: Path) -> None:
    support = one_shot_support(alphabet, tmp_path / "support")
    characters = character_folders(alphabet)
    queries = [sorted(characters[1].glob("*.png"))[0], sorted(characters[4].glob("*.png"))[9]]
    options = ["--support", support, "--checkpoint", tiny_checkpoint, "--top-k", "3", "--device", "cpu"]
    text = run_siamese("classify", *queries, *options, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert len(lines) == 2 * 4 and lines[0] == str(queries[0]) and lines[4] == str(queries[1])
    assert lines[1].split()[:2] == ["1.", characters[1].name] and lines[1].endswith("SAME")  # the same drawing
    assert [line.split()[0] for line in lines[1:4]] == ["1.", "2.", "3."]
    assert "6 classes, 6 images (embedded, cached in" in text.stderr

    as_json = run_siamese("classify", *queries, *options, "--json", cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["support"] | {"cache": None} == {"folder": str(support), "classes": 6, "images": 6, "cache": None,
                                                   "from_cache": True}
    assert "(read from" in as_json.stderr
    first, second = report["results"]
    assert first["query"] == str(queries[0]) and first["matches"][0]["class"] == characters[1].name
    assert len(second["matches"]) == 3
    scores = [m["score"] for m in second["matches"]]
    assert scores == sorted(scores, reverse=True)
    assert all(m["same"] == (m["score"] >= report["threshold"]) for m in second["matches"])


def test_unreadable_support_images_are_refused_or_skipped_as_asked(
    verifier: Verifier, alphabet: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    support = five_shot_support(alphabet, tmp_path / "support")
    first, second = character_folders(support)[:2]
    broken = sorted(first.glob("*.png"))[0]
    broken.write_bytes(b"not an image")
    for image in second.glob("*.png"):
        image.write_bytes(b"")  # a whole class unreadable
    with pytest.raises(DataError, match=re.escape(f"{broken}: not a readable image")):
        verifier.load_support(support)
    with caplog.at_level("WARNING", logger="siamese_omniglot"):
        gallery = verifier.load_support(support, skip_bad_images=True)
    assert caplog.messages[0].startswith(f"{support}: skipping 6 unreadable images: {broken}: not a readable image")
    assert gallery.class_names == tuple(p.name for p in character_folders(support) if p != second)
    assert len(gallery) == 30 - 6 and gallery.labels.tolist() == sorted(gallery.labels.tolist())
    assert gallery.cache_path is None and not (support / CACHE_DIR).exists()  # a load without skipping sees them
    assert verifier.classify(sorted(first.glob("*.png"))[1], gallery)[0].best.class_name == first.name
    with pytest.raises(DataError, match=re.escape(f"{second}: none of its 5 images can be read")):
        verifier.load_support(second, skip_bad_images=True)


def test_support_images_that_cannot_be_read_from_disk_are_skipped_as_asked(
    verifier: Verifier, alphabet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    support = five_shot_support(alphabet, tmp_path / "support")
    locked = sorted(character_folders(support)[0].glob("*.png"))[0]
    read_bytes = Path.read_bytes

    def denied(path: Path) -> bytes:  # as chmod 000 makes a file for anyone but root
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DataError, match=re.escape(f"{locked}: cannot read (Permission denied)")):
        verifier.load_support(support)
    with caplog.at_level("WARNING", logger="siamese_omniglot"):
        gallery = verifier.load_support(support, skip_bad_images=True)  # the same refusal before
    assert caplog.messages == [f"{support}: skipping 1 unreadable images: {locked}: cannot read (Permission denied)"]
    assert len(gallery) == 29 and str(locked.relative_to(support)) not in gallery.paths
    assert gallery.cache_path is None and not (support / CACHE_DIR).exists()


def test_cli_classify_skips_bad_images_when_asked(
    tiny_checkpoint: Path, alphabet: Path, run_siamese, tmp_path: Path
) -> None:
    support = one_shot_support(alphabet, tmp_path / "support")
    broken = sorted(support.glob("*.png"))[0]
    broken.write_bytes(b"")
    query = sorted(character_folders(alphabet)[3].glob("*.png"))[0]
    result = run_siamese("classify", query, "--support", support, "-c", tiny_checkpoint, "--device", "cpu",
                         "--skip-bad-images", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"WARNING: {support}: skipping 1 unreadable images: {broken}: " in result.stderr
    assert "5 classes, 5 images (embedded)" in result.stderr


def test_cli_classify_without_a_support_folder_is_one_error_line(
    tiny_checkpoint: Path, alphabet: Path, run_siamese, tmp_path: Path
) -> None:
    query = next(alphabet.glob("*/*.png"))
    result = run_siamese("classify", query, "--support", tmp_path / "nope", "-c", tiny_checkpoint, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: {tmp_path / 'nope'}: no such folder (expected a support folder of " \
                            "<class>/<image> or <class>.png)\n"


def test_a_gallery_s_dark_images_are_named_in_one_warning(
    tiny_checkpoint: Path, alphabet: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    support = tmp_path / "support"
    for image in sorted(alphabet.glob("*/*.png"))[:7]:
        (support / image.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - read_image(image)).save(support / image.parent.name / image.name)
    with caplog.at_level("WARNING", logger="siamese_omniglot"):
        Verifier.from_checkpoint(tiny_checkpoint, "cpu").load_support(support, cache=False)
    assert len(caplog.messages) == 1, caplog.messages  # one per image before, as "image 0" … "image 6"
    named = sorted(support.glob("*/*.png"))[:5]
    assert caplog.messages[0].startswith(f"mostly dark, so read as mostly ink: {named[0]} (")
    assert all(str(path) in caplog.messages[0] for path in named) and ", … and 2 more;" in caplog.messages[0]


def test_a_support_folder_that_is_a_file_is_called_one(alphabet: Path) -> None:
    image = next(alphabet.glob("*/*.png"))
    with pytest.raises(DataError, match=re.escape(f"{image}: is a file, not a folder (expected a support folder")):
        scan_support(image)  # "no such folder" before, of a file that exists


def test_a_support_cache_follows_weights_changed_in_place(
    tiny_checkpoint: Path, alphabet: Path, tmp_path: Path
) -> None:
    verifier = Verifier.from_checkpoint(tiny_checkpoint, "cpu")  # its own: the module's fixture stays untouched
    folder = one_shot_support(alphabet, tmp_path / "support")
    assert not verifier.load_support(folder).from_cache
    with torch.no_grad():
        for parameter in verifier.model.parameters():
            parameter.mul_(0.5)  # fine-tuned in place
    again = verifier.load_support(folder)
    assert not again.from_cache  # the first model's embeddings were served from the cache before
    assert torch.allclose(again.embeddings, verifier.embed(sorted(folder.glob("*.png"))))
