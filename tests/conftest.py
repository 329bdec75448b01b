"""Shared fixtures: tiny GILL pipelines with random weights, built offline from configs after a fixed seed."""

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import PIL.Image
import pytest
import torch

from gill_pipeline.testing import build_tiny_gill_pipeline

torch.set_num_threads(1)

# Small call settings that keep every test fast: few decoding steps, 2 denoising steps, tensors out.
FAST_CALL = dict(max_new_tokens=6, num_inference_steps=2, output_type="pt")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The training scripts' smallest run (a tiny random pipeline, a few steps).
TINY_CONFIG = os.path.join(REPO, "training", "configs", "tiny.yaml")
# The reference release's files, in ../shared beside the checkout (as on developer machines and in CI).
SHARED_DATA = os.path.join(REPO, "..", "shared", "data", "gill_original")


def make_pipeline(lm_type: str = "opt", **kwargs):
    pipe = build_tiny_gill_pipeline(lm_type, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_image(seed: int = 0, size: int = 32, mode: str = "RGB") -> PIL.Image.Image:
    array = (np.random.RandomState(seed).rand(size, size, 3) * 255).astype(np.uint8)
    return PIL.Image.fromarray(array).convert(mode)


def header_bomb_png(path, width: int = 20000, height: int = 20000) -> str:
    """A real 16x16 PNG whose header (IHDR, with a correct CRC) declares `width` x `height`: PIL opens it as that
    size, the way a decompression bomb looks before it is decoded (a few hundred bytes on disk)."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    random_image(0, 16).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"  # signature (8), length (4), type (4), then the 13 bytes of IHDR and its CRC
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def write_image(path, seed: int, size: int = 20) -> None:
    """Writes `random_image(seed, size)` to `path` (its format from the file name's extension)."""
    random_image(seed, size).save(path)


@pytest.fixture(scope="session")
def opt_pipe():
    """A tiny OPT-based pipeline (tied embeddings, word_embed_proj_dim != hidden_size). Do not mutate it."""
    return make_pipeline("opt")


@pytest.fixture(scope="session")
def llama_pipe():
    """A tiny Llama-based pipeline (untied embeddings). Do not mutate it."""
    return make_pipeline("llama")


@pytest.fixture(scope="module")
def tiny():
    """The training scripts' tiny OPT models (`training.setup_models.build_tiny_models`), built once per module."""
    from training.setup_models import build_tiny_models

    return build_tiny_models("opt", seed=0)


@pytest.fixture(scope="module")
def saved_opt(tmp_path_factory):
    """A tiny OPT pipeline saved once per module. Do not change it: damage `saved_copy` instead."""
    folder = tmp_path_factory.mktemp("opt_saved")
    make_pipeline("opt").save_pretrained(folder)
    return folder


@pytest.fixture()
def saved_copy(saved_opt, tmp_path):
    """A fresh copy of `saved_opt` for one test to change."""
    target = tmp_path / "pipe"
    shutil.copytree(saved_opt, target)
    return target


@pytest.fixture(scope="module")
def world_clip_folder(tmp_path_factory):
    """A whole CLIP shaped like the shapes world's (random weights, built from its configs): its text tower is
    as wide as the bundled UNet's cross-attention, so it serves as the decoder baseline's text encoder too."""
    from training.shapes.models import SIZES, build_clip, build_tokenizer
    from training.shapes.pretrain_base import processor

    torch.manual_seed(0)
    tokenizer = build_tokenizer(clip_style=True, model_max_length=SIZES.text_length)
    folder = tmp_path_factory.mktemp("world_clip")
    build_clip(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor(SIZES.image_size).save_pretrained(folder)
    return str(folder)
