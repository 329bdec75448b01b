"""benchmarks/gpu/bench_gpu.py stays in step with the library: its --tiny run (the same code as the GPU run, tiny
configs, CPU) completes and writes every section; the real architectures have their published sizes."""

import importlib.util
import os

import pytest

GPU_BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu")


def load(name):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", os.path.join(GPU_BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_every_section(tmp_path):
    bench = load("bench_gpu")
    output = bench.main(["--tiny", "--output", str(tmp_path / "gpu.md")])
    text = open(output, encoding="utf-8").read()
    for heading in ("## 1. Per-token decoding", "## 2. A whole GILL answer", "## 3. Peak memory", "## 4. Training"):
        assert heading in text
    assert "Failed" not in text and "skipped" not in text
    for family in ("sd15", "sdxl", "flux"):
        assert f"| {family} | 32 |" in text
    assert "| 2 | 2 |" in text and "| 4 | 1 |" in text  # micro-batches x accumulation = the effective batch


def test_tiny_run_never_writes_the_gpu_results(tmp_path, monkeypatch):
    bench = load("bench_gpu")
    monkeypatch.setattr(bench, "RESULTS", str(tmp_path / "must_not_exist.md"))
    monkeypatch.setattr(bench, "MODES", dict(bench.MODES, tiny=dict(bench.MODES["tiny"], micro_batches=(4,))))
    monkeypatch.setattr(bench, "bench_decoder_memory", lambda family, *args: {"family": family, "skipped": "test"})
    output = bench.main(["--tiny", "--skip-flux"])
    assert not os.path.exists(tmp_path / "must_not_exist.md")
    assert os.path.exists(output) and "gpu.md" in output


@pytest.mark.parametrize(
    "name,published_millions",
    [("CLIP-L text", 123.1), ("OpenCLIP bigG text (projected)", 694.7), ("T5-v1.1-XXL encoder", 4762.3),
     ("Gemma-2-2B", 2614.3)],
)
def test_real_text_encoder_configs_have_their_published_sizes(name, published_millions):
    configs = load("real_configs")
    assert configs.parameter_count(configs.TEXT_ENCODERS[name]) / 1e6 == pytest.approx(published_millions, abs=0.1)


REAL_LAYOUTS = {
    "sd15": {"prompt_embeds": [77, 768]},
    "sdxl": {"prompt_embeds": [77, 2048], "pooled_prompt_embeds": [1280]},
    "flux": {"prompt_embeds": [512, 4096], "pooled_prompt_embeds": [768]},
    "sd3": {"prompt_embeds": [77 + 256, 4096], "pooled_prompt_embeds": [768 + 1280]},
}


@pytest.mark.parametrize(
    "family", ["sd15", "sdxl", "flux", pytest.param("sd3", marks=pytest.mark.slow)]  # an 8B transformer: ~10 s
)
def test_real_size_decoders_build_and_give_their_layouts_on_the_meta_device(family):
    """The real configs fit together (text widths = denoiser widths), checked without memory on the meta device."""
    import torch

    from gill_pipeline.decoders import read_conditioning_layout

    pipe = load("bench_gpu").build_decoder(family, "real", torch.device("meta"), torch.bfloat16)
    layout = read_conditioning_layout(pipe)
    assert {t.name: t.shape for t in layout.tensors} == REAL_LAYOUTS[family]


def test_real_masked_families_text_widths_match_their_transformers():
    """PixArt-Sigma and Sana cannot run on the meta device (their encoders read mask values): check the configs."""
    configs = load("real_configs")
    assert configs.T5_XXL["d_model"] == configs.PIXART_SIGMA_TRANSFORMER["caption_channels"]
    assert configs.GEMMA_2_2B["hidden_size"] == configs.SANA_1600M_TRANSFORMER["caption_channels"]
