"""Training and inference read images the same way: one RGB conversion and one pooled-feature function."""

import io

import numpy as np
import PIL.Image
import torch
from conftest import random_image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from gill_pipeline.models.vision import image_pixel_values, pooled_image_features
from gill_pipeline.pipeline.inputs import to_rgb_pil
from training.data import load_rgb


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_training_converts_images_as_the_pipeline_does():
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red where opaque
    rgba[:8, :, 3] = 255  # top half opaque, bottom half fully transparent
    image = PIL.Image.fromarray(rgba)
    loaded = load_rgb(png_bytes(image))
    expected = to_rgb_pil(image)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(expected))
    assert tuple(np.asarray(loaded)[-1, -1]) == (255, 255, 255), "transparent pixels are white, as at inference"
    sixteen = PIL.Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16))
    assert np.asarray(load_rgb(png_bytes(sixteen))).max() == 255, "16-bit images are scaled, not clipped"
    assert load_rgb(png_bytes(PIL.Image.new("RGB", (2, 2)))) is None, "an image inference refuses is skipped"


def test_pipeline_features_are_the_shared_function(opt_pipe):
    images = [random_image(s) for s in range(3)]
    pixels = image_pixel_values(opt_pipe.feature_extractor, images)
    shared = pooled_image_features(opt_pipe.image_encoder, pixels)
    torch.testing.assert_close(opt_pipe.encode_image_features(images, torch.device("cpu")), shared, atol=0, rtol=0)


def test_projection_encoders_give_their_image_embeds():
    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         image_size=32, patch_size=8, projection_dim=12)
    ).eval()
    pixels = torch.randn(2, 3, 32, 32)
    features = pooled_image_features(encoder, pixels)
    assert features.shape == (2, 12)
    torch.testing.assert_close(features, encoder(pixel_values=pixels).image_embeds)
