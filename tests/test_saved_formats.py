"""Folders saved by earlier versions load bit-identically and answer as they did.

`tests/data/round2_tiny/` was written by the round-2 code (main 237914d, before the 0.2 layout): a tiny pipeline
saved whole (`pipeline/`), its learned weights alone (`learned_weights/`), and the answer that code gave to one call
(`expected_answer.json`, `expected_image.safetensors`). The bundled shapes-world pipeline is the other real folder.
"""

import json
import math
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from gill_pipeline import GILLPipeline
from gill_pipeline.bundled import BUNDLED_EXAMPLE_IMAGE, BUNDLED_PIPELINE, bundle_available

ROUND2 = os.path.join(os.path.dirname(__file__), "data", "round2_tiny")
WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


def assert_component_matches_files(module: torch.nn.Module, folder: str, dtype: torch.dtype | None = None):
    """Every tensor in the component's safetensors file equals the loaded module's, bit for bit (after the exact
    widening to `dtype` when the pipeline was loaded in a wider dtype than the file's)."""
    files = [os.path.join(folder, name) for name in WEIGHT_FILES if os.path.isfile(os.path.join(folder, name))]
    assert files, f"no weights file in {folder}"
    saved = load_file(files[0])
    state = module.state_dict()
    for key, tensor in saved.items():
        assert key in state, f"{folder}: {key} is not a tensor of the loaded {type(module).__name__}"
        if dtype is not None and tensor.is_floating_point():
            assert state[key].dtype == dtype, key
            tensor = tensor.to(dtype)
        assert state[key].dtype == tensor.dtype, key
        assert torch.equal(state[key], tensor), f"{folder}: {key} differs from the file"


def round2_call(pipe):
    image = Image.open(BUNDLED_EXAMPLE_IMAGE).convert("RGB").resize((32, 32))
    return pipe(
        ["a picture", image, "and then"], max_new_tokens=8, min_text_tokens=3, max_images=1,
        img_logit_scale=math.inf, image_mode="generate", num_inference_steps=2, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )


def assert_round2_answer(out):
    with open(os.path.join(ROUND2, "expected_answer.json"), encoding="utf-8") as f:
        expected = json.load(f)
    assert out.texts[0] == expected["text"]
    assert len(out.images) == expected["n_images"]
    reference = load_file(os.path.join(ROUND2, "expected_image.safetensors"))["image"]
    torch.testing.assert_close(out.images[0], reference, atol=1e-5, rtol=0)


def test_round2_pipeline_folder_loads_bit_identically_and_answers_as_before():
    folder = os.path.join(ROUND2, "pipeline")
    pipe = GILLPipeline.from_pretrained(folder)
    for name in ("llm", "gill", "vae", "unet", "image_encoder"):
        assert_component_matches_files(getattr(pipe, name), os.path.join(folder, name))
    assert_round2_answer(round2_call(pipe))


def test_round2_learned_weights_folder_loads_bit_identically(tmp_path):
    base = GILLPipeline.from_pretrained(os.path.join(ROUND2, "pipeline"))
    folder = os.path.join(ROUND2, "learned_weights")
    pipe = GILLPipeline.from_pretrained(
        folder, llm=base.llm, vae=base.vae, unet=base.unet, image_encoder=base.image_encoder
    )
    assert_component_matches_files(pipe.gill, os.path.join(folder, "gill"))
    assert_round2_answer(round2_call(pipe))
    # Saved again by this version: the same tensors under the same names.
    pipe.save_learned_weights(str(tmp_path / "again"))
    old = load_file(os.path.join(folder, "gill", "diffusion_pytorch_model.safetensors"))
    new = load_file(str(tmp_path / "again" / "gill" / "diffusion_pytorch_model.safetensors"))
    assert old.keys() == new.keys()
    assert all(torch.equal(old[k], new[k]) for k in old)


@pytest.mark.skipif(not bundle_available(), reason="the bundled shapes-world pipeline is not present")
def test_bundled_pipeline_loads_bit_identically():
    pipe = GILLPipeline.from_pretrained(BUNDLED_PIPELINE, dtype=torch.float32)
    for name in ("gill", "vae", "unet", "image_encoder"):
        assert_component_matches_files(getattr(pipe, name), os.path.join(BUNDLED_PIPELINE, name), torch.float32)
    # The LM carries its LoRA adapter: the base weights on disk are the LM's base layers.
    llm_files = load_file(os.path.join(BUNDLED_PIPELINE, "llm", "model.safetensors"))
    base_state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                  for k, v in pipe.llm.state_dict().items() if "lora_" not in k}
    for key, tensor in llm_files.items():
        assert torch.equal(base_state[key], tensor.float()), key
    adapter = load_file(os.path.join(BUNDLED_PIPELINE, "llm_lora", "adapter_model.safetensors"))
    lora_state = {k: v for k, v in pipe.llm.state_dict().items() if "lora_" in k}
    assert len(adapter) == len(lora_state) > 0
    for key, tensor in adapter.items():
        matches = [v for k, v in lora_state.items() if k.replace(".default", "") == key]
        assert len(matches) == 1 and torch.equal(matches[0], tensor.float()), key
