"""Models: the three backbones' shapes, the twin forward pass, resizing, and the reference's VGG16 figures."""

from __future__ import annotations

import re
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from siamese_omniglot.errors import CheckpointError, ConfigError, DataError
from siamese_omniglot.models import (
    BACKBONES,
    VIEW_SHIFTS,
    ModelConfig,
    SiameseNetwork,
    build_model,
    fold_batch_norm,
    shift,
)

EMBEDDING_DIMS = {"fast": 256 * 3 * 3, "koch": 4096, "vgg16": 4608}


def ink(count: int, size_px: int, seed: int = 0) -> torch.Tensor:
    """Random ink images [count, 1, size_px, size_px] in [0, 1]."""
    return torch.rand(count, 1, size_px, size_px, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def built() -> dict[str, SiameseNetwork]:
    """Each backbone built once per module (vgg16 takes seconds to initialise), in eval mode."""
    torch.manual_seed(0)
    return {name: build_model(name).eval() for name in EMBEDDING_DIMS}


@pytest.fixture(scope="module", params=list(EMBEDDING_DIMS))
def twin_outputs(request: pytest.FixtureRequest, built: dict[str, SiameseNetwork]) -> dict:
    """Per backbone: one batch-2 forward pass and the embeddings of its inputs."""
    model = built[request.param]
    first, second = ink(2, 105, seed=1), ink(2, 105, seed=2)
    with torch.no_grad():
        logits = model(first, second)
        embeddings = model.embed(torch.cat([first, second]))
    return {"name": request.param, "model": model, "logits": logits, "embeddings": embeddings}


def test_embedding_and_logit_shapes(twin_outputs: dict) -> None:
    model, dim = twin_outputs["model"], EMBEDDING_DIMS[twin_outputs["name"]]
    assert model.embedding_dim == dim
    assert twin_outputs["embeddings"].shape == (4, dim)
    assert twin_outputs["logits"].shape == (2,)
    assert torch.isfinite(twin_outputs["logits"]).all()


def test_forward_equals_scoring_the_embeddings(twin_outputs: dict) -> None:
    model, embeddings = twin_outputs["model"], twin_outputs["embeddings"]
    with torch.no_grad():
        scored = model.score_embeddings(embeddings[:2], embeddings[2:])
    torch.testing.assert_close(twin_outputs["logits"], scored, rtol=1e-4, atol=1e-4)


def test_score_is_symmetric(twin_outputs: dict) -> None:
    model, embeddings = twin_outputs["model"], twin_outputs["embeddings"]
    with torch.no_grad():
        assert torch.equal(
            model.score_embeddings(embeddings[:2], embeddings[2:]),
            model.score_embeddings(embeddings[2:], embeddings[:2]),
        )


def test_forward_is_batch_first_and_pairwise() -> None:
    """Pair i's logit depends on pair i only (what DataParallel's split along dim 0 relies on)."""
    torch.manual_seed(0)
    model = build_model("fast").eval()
    first, second = ink(3, 28, seed=3), ink(3, 28, seed=4)
    with torch.no_grad():
        together = model(first, second)
        alone = torch.stack([model(first[i : i + 1], second[i : i + 1])[0] for i in range(3)])
    assert together.shape == (3,)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("settings", "message"), [
    ({"width": 10**6}, "width=1000000, widen=2, blocks=4 at 28 px make 378,000,081,000,000 weights, more than "
     "1,000,000,000"),
    ({"blocks": 50}, "50 blocks need an input of at least 562949953421312 px, got 28"),
    ({"input_px": 10**6}, "input_px=1000000: the input size must be from 1 to 1024 px"),
    ({"input_px": 0}, "input_px=0: the input size must be from 1 to 1024 px"),
])
def test_networks_no_memory_holds_are_refused_before_a_layer_is_built(settings: dict, message: str) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_model("fast", **settings)
    assert time.monotonic() - started < 2  # blocks=50 allocated layers of many GB for minutes before


def test_forward_compares_one_image_with_a_batch_either_way_and_refuses_other_sizes() -> None:
    torch.manual_seed(0)
    model = build_model("fast").eval()
    one, three = ink(1, 28, seed=5), ink(3, 28, seed=6)
    with torch.no_grad():
        expected = model(one.expand(3, -1, -1, -1), three)
        torch.testing.assert_close(model(one, three), expected)  # a TypeError from Python before
        torch.testing.assert_close(model(three, one), expected)
        with pytest.raises(DataError, match="forward takes two batches of as many images, .*; got 2 and 3"):
            model(ink(2, 28), three)


@pytest.mark.parametrize("size_px", [20, 28, 64, 105])
def test_any_input_size_gives_the_same_shapes(size_px: int) -> None:
    model = build_model("fast").eval()
    with torch.no_grad():
        assert model.embed(ink(2, size_px)).shape == (2, EMBEDDING_DIMS["fast"])
        assert model(ink(2, size_px), ink(2, size_px, seed=1)).shape == (2,)


def test_larger_input_is_area_resized_to_the_model_size() -> None:
    model = build_model("fast", frame=0.0).eval()
    large = ink(2, 2 * model.config.input_px)
    with torch.no_grad():
        torch.testing.assert_close(model.embed(large), model.embed(F.avg_pool2d(large, 2)), rtol=1e-5, atol=1e-5)


def test_framed_model_sees_a_character_alike_wherever_it_is_drawn() -> None:
    model = build_model("fast").eval()
    assert model.config.frame == 0.8
    character = torch.zeros(1, 1, 105, 105)
    character[..., 10:50, 10:14] = 1  # an L in the top left corner
    character[..., 46:50, 10:40] = 1
    moved = character.roll((45, 50), dims=(2, 3))  # the same L, bottom right
    with torch.no_grad():
        torch.testing.assert_close(model.embed(character), model.embed(moved), rtol=1e-4, atol=1e-4)
        unframed = build_model("fast", frame=0.0).eval()
        unframed.load_state_dict(model.state_dict())
        assert (unframed.embed(character) - unframed.embed(moved)).abs().max() > 0.01


def test_checkpoints_from_before_framing_rebuild_unframed() -> None:
    saved = BACKBONES["fast"].to_dict()
    del saved["frame"]
    assert ModelConfig.from_dict(saved).frame == 0.0


@pytest.mark.parametrize("frame", [-0.1, 1.5, float("nan")])
def test_frame_outside_zero_to_one_is_a_config_error(frame: float) -> None:
    with pytest.raises(ConfigError, match="frame="):
        build_model("fast", frame=frame)


@pytest.mark.parametrize(("normalize", "unit"), [(True, True), (False, False)])
def test_normalize_gives_unit_norm_embeddings(normalize: bool, unit: bool) -> None:
    model = build_model("fast", normalize=normalize).eval()
    with torch.no_grad():
        norms = model.embed(ink(4, 28)).norm(dim=1)
    assert torch.allclose(norms, torch.ones(4), atol=1e-5) is unit


@pytest.mark.parametrize(
    "make", [lambda: build_model("resnet18"), lambda: SiameseNetwork(ModelConfig(backbone="resnet18"))]
)
def test_unknown_backbone_is_a_config_error(make) -> None:
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet18': choose one of fast, koch, vgg16"):
        make()


@pytest.mark.parametrize(("final_pool", "smallest"), [(False, 8), (True, 16)])
def test_too_small_input_for_the_fast_blocks_is_a_config_error(final_pool: bool, smallest: int) -> None:
    with pytest.raises(ConfigError, match=f"4 blocks need an input of at least {smallest} px, got {smallest - 1}"):
        build_model("fast", input_px=smallest - 1, final_pool=final_pool)
    assert build_model("fast", input_px=smallest, final_pool=final_pool).embedding_dim == 256


@pytest.mark.parametrize(
    "images",
    [torch.zeros(2, 1, 105, 105, dtype=torch.uint8), torch.rand(2, 105, 105), torch.rand(2, 3, 105, 105)],
    ids=["uint8-canvases", "no-channel-axis", "three-channels"],
)
def test_embed_refuses_what_is_not_float_ink_of_one_channel(images: torch.Tensor) -> None:
    # before: torch's errors from within (a dtype or unpacking error), or vectors of nothing meant for 3 channels
    with pytest.raises(DataError, match=rf"embed takes float ink images \[N, 1, H, W\].*{list(images.shape)}"):
        build_model("fast").eval().embed(images)


def test_score_embeddings_refuses_vectors_of_another_width() -> None:
    model = build_model("fast").eval()
    width = model.embedding_dim
    vectors = torch.rand(3, width)
    with pytest.raises(DataError, match=f"embeddings of {width} values, got {width} and 10"):
        model.score_embeddings(vectors, vectors[:, :10])
    assert model.score_embeddings(vectors, vectors[:1]).shape == (3,)  # broadcasting, as before


@pytest.mark.parametrize(("backbone", "smallest"), [("koch", 65), ("vgg16", 32)])
def test_too_small_input_for_the_koch_and_vgg16_layers_is_a_config_error(backbone: str, smallest: int) -> None:
    # before: torch's error in the first forward pass ("Output size is too small"), or at build for koch
    with pytest.raises(ConfigError, match=f"the {backbone} backbone needs an input of at least {smallest} px, got "
                                          f"{smallest - 1}"):
        build_model(backbone, input_px=smallest - 1)
    assert build_model(backbone, input_px=smallest).eval().embed(torch.rand(1, 1, 105, 105)).isfinite().all()


@pytest.mark.parametrize(
    ("input_px", "width", "widen", "blocks", "final_pool", "dim"),
    [
        (28, 32, 2, 4, False, 256 * 3 * 3),
        (28, 64, 1, 4, False, 64 * 3 * 3),
        (28, 64, 1, 4, True, 64),
        (32, 16, 1, 3, False, 16 * 8 * 8),
        (32, 16, 3, 3, True, 144 * 4 * 4),
        (28, 8, 1, 2, True, 8 * 7 * 7),
    ],
)
def test_fast_overrides_set_the_embedding_size(
    input_px: int, width: int, widen: int, blocks: int, final_pool: bool, dim: int
) -> None:
    model = build_model(
        "fast", input_px=input_px, width=width, widen=widen, blocks=blocks, final_pool=final_pool
    ).eval()
    assert model.config == ModelConfig(
        "fast", input_px, width, blocks, True, final_pool=final_pool, views=5, widen=widen, frame=0.8
    )
    assert model.embedding_dim == dim
    with torch.no_grad():
        assert model.embed(ink(2, 105)).shape == (2, dim)


def test_fast_channels_double_from_block_to_block() -> None:
    convs = [m for m in build_model("fast").modules() if isinstance(m, nn.Conv2d)]
    assert [(conv.in_channels, conv.out_channels) for conv in convs] == [(1, 32), (32, 64), (64, 128), (128, 256)]


@pytest.mark.parametrize("setting", ["width", "widen"])
def test_fast_channels_below_one_are_a_config_error(setting: str) -> None:
    with pytest.raises(ConfigError, match="both must be at least 1"):
        build_model("fast", **{setting: 0})


def test_a_config_from_before_widen_rebuilds_the_same_channels_in_every_block() -> None:
    older = {"backbone": "fast", "input_px": 28, "width": 64, "blocks": 4, "normalize": True, "final_pool": False}
    assert SiameseNetwork(ModelConfig.from_dict(older)).embedding_dim == 64 * 3 * 3


@pytest.mark.parametrize(
    "config", [*BACKBONES.values(), ModelConfig(backbone="fast", input_px=32, width=16, blocks=3, widen=3)]
)
def test_model_config_round_trip(config: ModelConfig) -> None:
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_shift_moves_ink_one_pixel_without_wrapping() -> None:
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, 1, 3] = 1.0  # row 1, last column
    assert shift(image, 1, 0).sum() == 0  # pushed off the right edge, not wrapped to the left
    assert shift(image, -1, 0)[0, 0, 1, 2] == 1.0 and shift(image, -1, 0).sum() == 1
    assert shift(image, 0, 1)[0, 0, 2, 3] == 1.0 and shift(image, 0, -1)[0, 0, 0, 3] == 1.0
    assert shift(image, 0, 0) is image


@pytest.mark.parametrize("views", [5, 9])
def test_eval_embeddings_average_the_shifted_views(views: int) -> None:
    torch.manual_seed(0)
    model = build_model("fast", views=views, frame=0.0).eval()  # framing would recentre each shifted view
    images = ink(3, 28)
    with torch.no_grad():
        singles = [model.embed(shift(images, dx, dy), views=1) for dx, dy in VIEW_SHIFTS[views]]
        expected = F.normalize(torch.stack(singles).mean(0), dim=1)
        torch.testing.assert_close(model.embed(images), expected)
        torch.testing.assert_close(model.embed(images, views=1), singles[0])
        assert not torch.allclose(model.embed(images), singles[0], atol=1e-3)
        model.train()  # training embeds one view: the loss sees each distorted image once
        torch.testing.assert_close(model.embed(images), model.embed(images, views=1))


@pytest.mark.parametrize("views", [0, 2, 4])
def test_unsupported_view_counts_are_a_config_error(views: int) -> None:
    with pytest.raises(ConfigError, match="views=.*choose one of 1, 5, 9"):
        build_model("fast", views=views)
    model = build_model("fast").eval()
    with pytest.raises(ConfigError, match="views=.*choose one of 1, 5, 9"), torch.no_grad():
        model.embed(ink(1, 28), views=views)


def test_configs_without_views_are_single_view() -> None:
    """Checkpoints written before views existed embed as they did."""
    values = BACKBONES["fast"].to_dict()
    del values["views"]
    assert ModelConfig.from_dict(values).views == 1


def test_folding_batch_norm_keeps_the_eval_outputs() -> None:
    torch.manual_seed(0)
    model = build_model("fast")
    with torch.no_grad():  # batch norms with statistics and affine parameters far from the identity
        for norm in [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]:
            norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(0.5, 2), norm.bias.uniform_(-1, 1)
    model.eval()
    folded = fold_batch_norm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4  # the original is left alone
    first, second = ink(4, 105, seed=1), ink(4, 105, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(folded.embed(first), model.embed(first), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(folded(first, second), model(first, second), atol=1e-4, rtol=1e-4)


def test_model_config_with_unknown_keys_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match=r"unknown model settings \['dropout'\]"):
        ModelConfig.from_dict(ModelConfig().to_dict() | {"dropout": 0.1})


def test_vgg16_matches_the_reference_network(built: dict[str, SiameseNetwork]) -> None:
    model = built["vgg16"]
    parameters = sum(p.numel() for p in model.parameters())
    assert abs(parameters / 1e6 - 17.08) <= 0.01
    assert model.embedding_dim == 512 * 3 * 3 == 4608
    assert [type(layer) for layer in model.head] == [nn.Linear, nn.Linear]
    first, second = model.head
    assert (first.in_features, first.out_features, second.in_features, second.out_features) == (4608, 512, 512, 1)


def test_an_unknown_model_setting_is_a_config_error_naming_the_settings() -> None:
    # a CheckpointError, "checkpoint from a newer version?", before: no checkpoint is involved
    with pytest.raises(ConfigError, match=r"ModelConfig has no setting 'foo': choose among backbone, input_px, "):
        build_model("fast", foo=1)


@pytest.mark.parametrize("blocks", [0, -1])
def test_a_network_of_no_blocks_is_refused(blocks: int) -> None:
    with pytest.raises(ConfigError, match=f"blocks={blocks}: a network needs at least 1 block"):
        build_model("fast", blocks=blocks)  # a linear model of the raw pixels before
