"""The open_clip vision adapter, checked against a stand-in `open_clip` module (the real package needs torchvision,
which the CPU test environment does not install): assembly, a call with an image, save/load."""

import sys
import types

import pytest
import torch
from torch import nn

from conftest import FAST_CALL, random_image
from gill_pipeline import GILLPipeline, OpenCLIPVisionModel
from gill_pipeline.tiny import build_tiny_lm, build_tiny_stable_diffusion, build_tiny_tokenizer


class FakeVisual(nn.Module):
    def __init__(self, output_dim=24, image_size=32):
        super().__init__()
        self.output_dim, self.image_size = output_dim, (image_size, image_size)
        self.conv = nn.Conv2d(3, 8, 8, stride=8)
        self.proj = nn.Linear(8, output_dim)

    def forward(self, pixels):
        return self.proj(self.conv(pixels).mean((2, 3)))


@pytest.fixture()
def fake_open_clip(monkeypatch):
    module = types.ModuleType("open_clip")
    module.OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
    module.OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
    created = []

    def create_model(name, pretrained=None, **kwargs):
        torch.manual_seed(123 if pretrained else 0)  # "pretrained" weights differ from a fresh build
        created.append((name, pretrained))
        return types.SimpleNamespace(visual=FakeVisual())

    module.create_model = create_model
    monkeypatch.setitem(sys.modules, "open_clip", module)
    return created


def test_open_clip_encoder_in_a_gill_pipeline(fake_open_clip, tmp_path):
    encoder, processor = OpenCLIPVisionModel.from_open_clip("ViT-Fake", pretrained="laion-fake")
    torch.manual_seed(123)
    pretrained = FakeVisual()
    for a, b in zip(encoder.visual.parameters(), pretrained.parameters()):
        assert torch.equal(a, b)  # the pretrained weights were copied
    assert encoder.config.hidden_size == 24 and processor.crop_size == {"height": 32, "width": 32}

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    pipe = GILLPipeline.from_base_models(
        language_model=build_tiny_lm("opt", len(tokenizer), tokenizer), tokenizer=tokenizer,
        stable_diffusion=build_tiny_stable_diffusion(), image_encoder=encoder, feature_extractor=processor,
        num_img_tokens=4, mapper_hidden_dim=32, mapper_heads=2, mapper_encoder_layers=1, mapper_decoder_layers=1,
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.gill.config.vision_dim == 24
    inputs = ["A dog", random_image(0), "in the snow"]
    before = pipe(inputs, generator=torch.Generator().manual_seed(0), max_images=0, **FAST_CALL)
    pipe.save_pretrained(tmp_path)
    loaded = GILLPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.image_encoder, OpenCLIPVisionModel)
    after = loaded(inputs, generator=torch.Generator().manual_seed(0), max_images=0, **FAST_CALL)
    assert before.texts == after.texts
    features = pipe.encode_image_features([random_image(1)], torch.device("cpu"))
    torch.testing.assert_close(features, loaded.encode_image_features([random_image(1)], torch.device("cpu")))


def test_missing_open_clip_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match=r"gill-pipeline\[open_clip\]"):
        OpenCLIPVisionModel(model_name="ViT-B-32", hidden_size=512, image_size=224)
