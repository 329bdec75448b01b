"""The open_clip vision adapter against the real `open_clip_torch` package (the `open_clip` extra): tiny open_clip
model configs, no pretrained download. Skipped with the reason when open_clip cannot be imported, unless
`GILL_REQUIRE_OPEN_CLIP=1` (set by CI, whose setup installs it), where that is a failure."""

import json
import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import FAST_CALL, random_image
from gill_pipeline import GILLPipeline, OpenCLIPVisionModel
from gill_pipeline.models.open_clip_vision import OpenCLIPImageProcessor
from gill_pipeline.testing import build_tiny_lm, build_tiny_stable_diffusion, build_tiny_tokenizer


# A ViT small enough to build in milliseconds: width 32, 2 layers, 32 px images in 8 px patches.
TINY_MODEL_CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
TINY_NAME = "GILL-Tiny-ViT"
# Sizes whose centre-crop margin after the resize is odd, so crops that round differently disagree.
ODD_IMAGE_SIZES = [(50, 37), (37, 50), (41, 33), (47, 64), (64, 45), (33, 40), (100, 71), (32, 32)]


@pytest.fixture(scope="module")
def open_clip():
    try:
        import open_clip
    except Exception as error:  # torchvision built for another torch fails with more than ImportError
        if os.environ.get("GILL_REQUIRE_OPEN_CLIP") == "1":
            raise
        pytest.skip(f"open_clip_torch is not importable ({error!r}); `bash scripts/setup.sh --test` installs it")
    return open_clip


@pytest.fixture()
def registered_tiny_model(open_clip, tmp_path, monkeypatch):
    """TINY_NAME registered with `open_clip.add_model_config`, and unregistered (with the file gone) afterwards; the
    returned function unregisters it early."""
    factory = sys.modules["open_clip.factory"]
    # add_model_config appends to and rebinds these module globals: restore them so no other test sees the model.
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", list(factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", dict(factory._MODEL_CONFIGS))
    path = tmp_path / f"{TINY_NAME}.json"
    path.write_text(json.dumps(TINY_MODEL_CONFIG))
    open_clip.add_model_config(path)
    assert TINY_NAME in open_clip.list_models()

    def unregister():
        path.unlink()
        del factory._MODEL_CONFIGS[TINY_NAME]
        assert TINY_NAME not in open_clip.list_models()

    return unregister


def build_tiny_pipeline(encoder, processor):
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    pipe = GILLPipeline.from_base_models(
        language_model=build_tiny_lm("opt", len(tokenizer), tokenizer), tokenizer=tokenizer,
        stable_diffusion=build_tiny_stable_diffusion(), image_encoder=encoder, feature_extractor=processor,
        num_img_tokens=4, mapper_hidden_dim=32, mapper_heads=2, mapper_encoder_layers=1, mapper_decoder_layers=1,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode(pipe, seed=1):
    return pipe.encode_image_features([random_image(seed, size=45)], torch.device("cpu"))


def test_pipeline_round_trip_with_an_unregistered_custom_model(open_clip, registered_tiny_model, tmp_path):
    encoder, processor = OpenCLIPVisionModel.from_open_clip(TINY_NAME)
    pipe = build_tiny_pipeline(encoder, processor)
    assert pipe.gill.config.vision_dim == TINY_MODEL_CONFIG["embed_dim"]
    inputs = ["A dog", random_image(0), "in the snow"]
    before = pipe(inputs, generator=torch.Generator().manual_seed(0), max_images=0, **FAST_CALL)
    pipe.save_pretrained(tmp_path)

    registered_tiny_model()  # the architecture must now come from the saved config alone
    loaded = GILLPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.image_encoder, OpenCLIPVisionModel)
    assert isinstance(loaded.feature_extractor, OpenCLIPImageProcessor)
    assert loaded.image_encoder.config.vision_cfg == TINY_MODEL_CONFIG["vision_cfg"]
    torch.testing.assert_close(encode(loaded), encode(pipe), rtol=0, atol=1e-5)
    after = loaded(inputs, generator=torch.Generator().manual_seed(0), max_images=0, **FAST_CALL)
    assert before.texts == after.texts


def test_weights_come_from_the_created_open_clip_model(open_clip, tmp_path):
    """`pretrained` as a checkpoint file with a config dict: the encoder holds those weights, not a fresh init."""
    torch.manual_seed(0)
    source = open_clip.create_model(f"local-dir:{write_local_dir(tmp_path / 'model')}")
    checkpoint = tmp_path / "weights.pt"
    torch.save(source.state_dict(), checkpoint)

    torch.manual_seed(1)  # a different init, so copied weights are told apart from a rebuild
    encoder, _ = OpenCLIPVisionModel.from_open_clip(TINY_MODEL_CONFIG, pretrained=str(checkpoint))
    for name, tensor in source.visual.state_dict().items():
        torch.testing.assert_close(encoder.visual.state_dict()[name], tensor, rtol=0, atol=0)
    assert encoder.config.model_name is None and encoder.config.embed_dim == TINY_MODEL_CONFIG["embed_dim"]


def write_local_dir(folder):
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_MODEL_CONFIG}))
    return folder


def test_force_quick_gelu_survives_save_and_load(open_clip, registered_tiny_model, tmp_path):
    encoder, _ = OpenCLIPVisionModel.from_open_clip(TINY_NAME, force_quick_gelu=True)
    encoder.save_pretrained(tmp_path)
    loaded = OpenCLIPVisionModel.from_pretrained(tmp_path)
    assert loaded.config.quick_gelu is True
    assert any(isinstance(module, open_clip.transformer.QuickGELU) for module in loaded.visual.modules())

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).pooler_output, encoder(pixels).pooler_output, rtol=0, atol=1e-5)
        # The same weights with plain GELU compute something else: the flag is architecture, not decoration.
        plain = OpenCLIPVisionModel.from_config({**loaded.config, "quick_gelu": False}).eval()
        plain.load_state_dict(loaded.state_dict())
        assert (plain(pixels).pooler_output - loaded(pixels).pooler_output).abs().max() > 1e-4


def test_force_image_size_survives_save_and_load(open_clip, registered_tiny_model, tmp_path):
    encoder, processor = OpenCLIPVisionModel.from_open_clip(TINY_NAME, force_image_size=48)
    encoder.save_pretrained(tmp_path)
    loaded = OpenCLIPVisionModel.from_pretrained(tmp_path)
    assert loaded.image_size == (48, 48) and loaded.config.vision_cfg["image_size"] == 48
    # 48 / 8 = 6 x 6 patches + the class token: the positional table was built for the forced size.
    assert loaded.visual.positional_embedding.shape == (37, TINY_MODEL_CONFIG["vision_cfg"]["width"])
    assert processor.crop_size.height == processor.crop_size.width == 48

    pixels = processor(images=[random_image(2, size=60)], return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).pooler_output, encoder(pixels).pooler_output, rtol=0, atol=1e-5)


def test_model_keywords_are_kept(open_clip, registered_tiny_model, tmp_path):
    """Keywords open_clip merges into the model config (here a whole `vision_cfg`, which wins over the named one)."""
    vision_cfg = {**TINY_MODEL_CONFIG["vision_cfg"], "layers": 3, "pool_type": "avg"}
    encoder, _ = OpenCLIPVisionModel.from_open_clip(TINY_NAME, vision_cfg=vision_cfg)
    encoder.save_pretrained(tmp_path)
    loaded = OpenCLIPVisionModel.from_pretrained(tmp_path)
    assert loaded.config.vision_cfg == vision_cfg
    assert len(loaded.visual.transformer.resblocks) == 3 and loaded.visual.pool_type == "avg"


def test_force_patch_dropout_is_kept(open_clip, registered_tiny_model, tmp_path):
    encoder, _ = OpenCLIPVisionModel.from_open_clip(TINY_NAME, force_patch_dropout=0.25)
    encoder.save_pretrained(tmp_path)
    loaded = OpenCLIPVisionModel.from_pretrained(tmp_path)
    assert loaded.config.vision_cfg["patch_dropout"] == 0.25 and loaded.visual.patch_dropout.prob == 0.25


def test_low_precision_tower_keeps_float32_norms_across_save_and_load(open_clip, registered_tiny_model, tmp_path):
    """`precision="bf16"` builds layer norms that compute in float32; loading in bfloat16 must keep them so."""
    encoder, _ = OpenCLIPVisionModel.from_open_clip(TINY_NAME, precision="bf16")
    encoder.save_pretrained(tmp_path)
    loaded = OpenCLIPVisionModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert loaded.config.cast_dtype == "bfloat16"
    assert loaded.visual.ln_post.weight.dtype == torch.float32 and loaded.visual.conv1.weight.dtype == torch.bfloat16
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).pooler_output, encoder(pixels).pooler_output, rtol=0, atol=0)


def test_timm_tower_with_forced_image_size(open_clip, tmp_path):
    """A timm trunk (timm's own tiny test ViT, without a projection): open_clip resizes it after creation for
    `force_image_size`; the loaded copy must be rebuilt at that size, never ask timm for pretrained weights, and
    report the trunk's own width as `hidden_size`."""
    pytest.importorskip("timm", reason="timm towers need the `timm` package")
    vision_cfg = {"timm_model_name": "test_vit", "timm_pool": "token", "timm_proj": "none", "image_size": 160}
    config = {**TINY_MODEL_CONFIG, "vision_cfg": vision_cfg}
    encoder, _ = OpenCLIPVisionModel.from_open_clip(config, force_image_size=64)
    encoder.save_pretrained(tmp_path)
    loaded = OpenCLIPVisionModel.from_pretrained(tmp_path)
    assert loaded.config.vision_cfg["timm_model_pretrained"] is False and loaded.image_size == (64, 64)
    assert loaded.config.hidden_size == loaded.visual.trunk.num_features != TINY_MODEL_CONFIG["embed_dim"]
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).pooler_output, encoder(pixels).pooler_output, rtol=0, atol=1e-5)


def test_an_architecture_the_config_misses_is_refused_at_build_time(open_clip, registered_tiny_model, monkeypatch):
    """If a keyword changed the tower in a way our config did not record, from_open_clip must refuse to build (and so
    never save) a component that would load as a different model. Simulated by dropping `force_quick_gelu` from the
    config our component is built from."""
    from gill_pipeline.models import open_clip_vision

    derive = open_clip_vision._final_model_config
    monkeypatch.setattr(
        open_clip_vision, "_final_model_config", lambda *args: {**derive(*args), "quick_gelu": False}
    )
    with pytest.raises(ValueError, match="its features differ"):
        OpenCLIPVisionModel.from_open_clip(TINY_NAME, force_quick_gelu=True)


@pytest.mark.parametrize(
    "preprocess",
    [
        {},
        {"interpolation": "bilinear", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
        {"resize_mode": "squash"},
    ],
    ids=["default", "bilinear", "squash"],
)
def test_feature_extractor_matches_open_clip_transform(open_clip, registered_tiny_model, preprocess):
    # open_clip's own transform, through its public entry point (which names the options `image_<option>`).
    image_keywords = {f"image_{key}": value for key, value in preprocess.items()}
    _, _, transform = open_clip.create_model_and_transforms(TINY_NAME, **image_keywords)
    _, processor = OpenCLIPVisionModel.from_open_clip(TINY_NAME, force_preprocess_cfg=preprocess)
    for width, height in ODD_IMAGE_SIZES:
        array = np.random.RandomState(width * height).randint(0, 256, (height, width, 3), dtype=np.uint8)
        image = PIL.Image.fromarray(array)
        ours = processor(images=[image], return_tensors="pt").pixel_values[0]
        torch.testing.assert_close(ours, transform(image), rtol=0, atol=1e-5, msg=f"image {width}x{height}")


def test_feature_extractor_survives_save_and_load(open_clip, registered_tiny_model, tmp_path):
    _, processor = OpenCLIPVisionModel.from_open_clip(TINY_NAME, force_preprocess_cfg={"interpolation": "bilinear"})
    processor.save_pretrained(tmp_path)
    loaded = OpenCLIPImageProcessor.from_pretrained(tmp_path)
    image = PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (37, 50, 3), dtype=np.uint8))
    expected = processor(images=[image], return_tensors="pt").pixel_values
    torch.testing.assert_close(loaded(images=[image], return_tensors="pt").pixel_values, expected)


def test_unsupported_preprocessing_is_refused(open_clip, registered_tiny_model):
    with pytest.raises(ValueError, match=r"`resize_mode`='longest'"):
        OpenCLIPVisionModel.from_open_clip(TINY_NAME, force_preprocess_cfg={"resize_mode": "longest"})


def test_bad_arguments_name_themselves(open_clip, registered_tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"`jit`=True"):
        OpenCLIPVisionModel.from_open_clip(TINY_NAME, jit=True)
    with pytest.raises(ValueError, match=r"without \['vision_cfg'\]"):
        OpenCLIPVisionModel.from_open_clip({"embed_dim": 8, "text_cfg": {}})
    with pytest.raises(ValueError, match=r"`pretrained` must be a checkpoint file, got 'laion2b'"):
        OpenCLIPVisionModel.from_open_clip(TINY_MODEL_CONFIG, pretrained="laion2b")
    with pytest.raises(ValueError, match=r"`vision_cfg` has keys"):
        OpenCLIPVisionModel(embed_dim=8, vision_cfg={"no_such_option": 1})
    with pytest.raises(ValueError, match=r"`cast_dtype` must be"):
        OpenCLIPVisionModel(embed_dim=8, vision_cfg=TINY_MODEL_CONFIG["vision_cfg"], cast_dtype="float64")


def test_missing_open_clip_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match=r"gill-pipeline\[open_clip\]"):
        OpenCLIPVisionModel(embed_dim=512, vision_cfg={})
