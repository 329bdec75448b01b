"""GILL at real sizes on this machine, end to end (issue 18, section 1): every stage a user runs, timed, with the
process's peak resident memory and the bytes on disk.

    python -m benchmarks.bench_real_size                         # the paper's pairing (OPT-6.7B + CLIP-L + SD 1.5)
    python -m benchmarks.bench_real_size --pairing llama3-sdxl   # a Llama-3-8B-shaped LM (int8) + SDXL
    python -m benchmarks.bench_real_size --pairing qwen-flux     # a Qwen2.5-7B-shaped LM + Flux.1-schnell, both int8
    python -m benchmarks.bench_real_size --pairing tiny          # tiny configs, seconds (the default tests run this)
    python -m benchmarks.bench_real_size --pairing tiny-flux     # tiny configs of the Flux pairing's classes

Architectures come from the published configs (`benchmarks/gpu/real_configs.py` and the shapes below), the values are
random (nothing is downloaded). For each pairing, each stage runs in a FRESH process so that its peak RSS is its own:

0. write the base models as a user has them: safetensors shards (transformers' / diffusers' layout), written from
   models built on the `meta` device, one shard in memory at a time (setup, reported but not a user stage);
1. assemble: `GILLPipeline.from_base_models(llm_folder, decoder=..., image_encoder=folder, dtype=bf16
   [, quantization_config])` + `save_pretrained` (the decoder's text encoders are built for this stage only: GILL
   reads the conditioning layout and the empty-prompt negatives from them, then drops them);
   Flux pairings write a whole Flux checkpoint folder (transformer, VAE, CLIP-L text, T5-XXL encoder, tokenizers,
   scheduler) and split this stage in fresh processes, so that no two big components are ever in memory together:
   1a reads the conditioning layout from the text encoders alone (the transformer and VAE built on `meta`: only their
   configs are read; the T5 encoder is 9.5 GB in bf16), and their folders are then deleted; 1b quantizes each of the
   LM and the transformer ALONE, each with its entry of the one `PipelineQuantizationConfig(quant_mapping={"llm":
   transformers.TorchAoConfig(Int8WeightOnlyConfig()), "transformer": diffusers.TorchAoConfig(...)})`, and saves it
   in place of its bf16 files (the process owns one quantized component: 11.9 GB for the transformer, not the 20.6 GB
   of both, which `from_base_models(..., quantization_config=...)` would hold at once); 1c is
   `from_base_models(llm_folder, decoder=flux_folder, conditioning_layout=..., negative_conditioning=...)`, which
   loads the checkpoint without its text encoders and the quantized files as saved (memory-mapped), and saves;
2. in one fresh process: `from_pretrained` (peak RSS of the load, RSS after it), a text answer of N forced tokens, an
   answer with one generated image (N forced tokens + `[IMG]`, a reduced size and step count, stated), the stock
   decoder pipeline alone with the same conditioning shape, steps and size, one training step of the learned parts
   (micro-batch 2, precomputed random targets), and the learned weights pushed to a local in-process Hub and pulled
   back onto the loaded base models (checked bit-identical).

Targets (issue 18): from_pretrained peak RSS <= 1.10x the bytes of the weights it keeps; RSS after loading <= 1.05x;
an answer with an image <= 1.10x (LM time for the same tokens + the stock decoder alone, same steps and size).
Writes "## Section 1: real sizes end to end" of benchmarks/results/real_size.md (other sections left as they are).

Before a pairing starts, its disk and per-stage memory needs are worked out from its configs and printed
(`benchmarks/real_size_estimate.py`); a `--workdir` with less free disk than the pairing needs is refused.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from . import real_size_estimate
from .gpu import real_configs

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "real_size.md")
HEADING = "## Section 1: real sizes end to end"
SHARD_BYTES = 2 * 1024**3
CHUNK = 16 * 1024**2

# meta-llama/Meta-Llama-3-8B and Qwen/Qwen2.5-7B config.json (architecture numbers only).
LLAMA_3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY_OPT = dict(vocab_size=1000, hidden_size=64, word_embed_proj_dim=64, ffn_dim=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=256, dropout=0.0, attention_dropout=0.0)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8, projection_dim=32)
TINY_UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=4, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16)
TINY_TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=32)
# Tiny configs of the Flux pairing's classes (Qwen2, Flux transformer, 16-channel-style VAE, T5 encoder).
TINY_QWEN = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
TINY_T5 = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
               relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0)
TINY_FLUX_VAE = dict(TINY_VAE, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                     shift_factor=0.1159)
TINY_FLUX = dict(patch_size=1, in_channels=4 * TINY_FLUX_VAE["latent_channels"], num_layers=1, num_single_layers=1,
                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TINY_T5["d_model"],
                 pooled_projection_dim=TINY_TEXT["hidden_size"], guidance_embeds=False, axes_dims_rope=(4, 4, 8))

# What each pairing builds, and the reduced answer it measures (CPU: a smaller image and fewer steps than a GPU uses).
PAIRINGS = {
    "paper": dict(title="OPT-6.7B + CLIP ViT-L/14 + SD 1.5, bf16 (the paper's pairing)", lm="opt", lm_config=real_configs.OPT_6_7B,
                  vision=real_configs.CLIP_VIT_L_14, decoder="sd15", unet=real_configs.SD15_UNET,
                  vae=real_configs.SD_VAE, text=[real_configs.CLIP_L_TEXT], quantize="none", size=256, steps=4,
                  tokens=16),
    "llama3-sdxl": dict(title="Llama-3-8B-shaped LM (torchao int8 weight-only) + CLIP ViT-L/14 + SDXL, bf16",
                        lm="llama", lm_config=LLAMA_3_8B, vision=real_configs.CLIP_VIT_L_14, decoder="sdxl",
                        unet=real_configs.SDXL_UNET, vae=dict(real_configs.SD_VAE, scaling_factor=0.13025),
                        text=[real_configs.CLIP_L_TEXT, real_configs.CLIP_BIGG_TEXT], quantize="int8", size=256,
                        steps=2, tokens=16),
    "qwen-flux": dict(title="Qwen2.5-7B-shaped LM + CLIP ViT-L/14 + Flux.1-schnell, LM and transformer torchao int8 "
                           "weight-only, the rest bf16", lm="qwen2", lm_config=real_configs.QWEN_2_5_7B,
                      vision=real_configs.CLIP_VIT_L_14, decoder="flux",
                      transformer=real_configs.FLUX_SCHNELL_TRANSFORMER, vae=real_configs.FLUX_VAE,
                      scheduler=real_configs.FLUX_SCHNELL_SCHEDULER, text=[real_configs.CLIP_L_TEXT],
                      t5=real_configs.T5_XXL, quantize="int8", quantized=("llm", "transformer"),
                      quantize_apart=("transformer",), size=256, steps=1, tokens=16),
    "tiny-flux": dict(title="tiny configs of the Flux pairing (smoke run)", lm="qwen2", lm_config=TINY_QWEN,
                      vision=TINY_VISION, decoder="flux", transformer=TINY_FLUX, vae=TINY_FLUX_VAE,
                      scheduler=real_configs.FLUX_SCHNELL_SCHEDULER, text=[TINY_TEXT], t5=TINY_T5, quantize="int8",
                      quantized=("llm", "transformer"), quantize_apart=("transformer",), size=32, steps=1, tokens=4,
                      learned="tiny"),
    "tiny": dict(title="tiny configs (smoke run)", lm="opt", lm_config=TINY_OPT, vision=TINY_VISION, decoder="sd15",
                 unet=TINY_UNET, vae=TINY_VAE, text=[TINY_TEXT], quantize="none", size=32, steps=2, tokens=4,
                 learned="tiny"),
}


def memory() -> dict:
    """Resident memory of this process in GiB (anonymous: our own copies; file: mapped safetensors pages), its peak
    so far, and the machine's 1-minute load average (other jobs on the cores make every time longer)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0]) / 2**20
    return {"rss": fields["VmRSS"], "anon": fields["RssAnon"], "file": fields["RssFile"], "peak": fields["VmHWM"],
            "load": os.getloadavg()[0]}


def folder_bytes(folder: str, suffix: str = "") -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files
               if f.endswith(suffix))


# ----------------------------------------------------------------------------------------------------------------------
# Stage 0: base models written from `meta` models, one shard in memory at a time
# ----------------------------------------------------------------------------------------------------------------------
def write_random(model, folder: str, weights_name: str, dtype=torch.bfloat16) -> int:
    """Writes `model` (built on `meta`) with random values as safetensors shards named like `weights_name`
    (`model.safetensors` / `diffusion_pytorch_model.safetensors`) plus the index; returns the bytes written.
    Norm scales are 1 and every other tensor a copy of one N(0, 0.02) block at shifting offsets (the timing does not
    depend on the values, and drawing billions of normal values costs minutes of CPU)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    block = torch.randn(2 * CHUNK, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(dtype)
    stem = weights_name[: -len(".safetensors")]
    tensors = dict(model.named_parameters())
    tensors.update({name: b for name, b in model.named_buffers() if name.split(".")[-1] not in getattr(
        model, "_non_persistent", ()) and not name.endswith("position_ids")})
    shard, shard_bytes, shards, total, names = {}, 0, [], 0, {}

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            path = os.path.join(folder, f"{stem}-part{len(shards)}.safetensors")
            save_file(shard, path, metadata={"format": "pt"})
            shards.append((path, list(shard)))
            shard, shard_bytes = {}, 0

    for name, meta in tensors.items():
        tensor = torch.empty(meta.shape, dtype=dtype if meta.is_floating_point() else meta.dtype)
        flat = tensor.view(-1)
        if not meta.is_floating_point():
            flat.zero_()
        elif meta.dim() == 1 and "norm" in name and name.endswith("weight"):
            flat.fill_(1.0)
        else:
            for i, start in enumerate(range(0, flat.numel(), CHUNK)):
                stop = min(start + CHUNK, flat.numel())
                shift = (i * 7919) % CHUNK
                flat[start:stop] = block[shift: shift + stop - start]
        nbytes = tensor.numel() * tensor.element_size()
        if shard_bytes + nbytes > SHARD_BYTES:
            flush()
        shard[name] = tensor
        shard_bytes += nbytes
        total += nbytes
    flush()
    # The library's own names: name-00001-of-0000N.safetensors and the index.
    for i, (path, keys) in enumerate(shards):
        final = os.path.join(folder, f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        os.replace(path, final)
        names.update({key: os.path.basename(final) for key in keys})
    with open(os.path.join(folder, f"{weights_name}.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": names}, f)
    return total


def lm_class(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

    return {"opt": (OPTConfig, OPTForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]


FLUX_FOLDER = "decoder"  # a Flux pairing's decoder: a whole FluxPipeline checkpoint folder under the base folder
FLUX_TEXT = ("text_encoder", "text_encoder_2")


def meta_models(pairing: dict) -> dict:
    """The pairing's base models on the `meta` device (architecture only: no memory, no values)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel, T5Config, T5EncoderModel

    config_class, model_class = lm_class(pairing["lm"])
    with torch.device("meta"):
        models = {"llm": model_class(config_class(**pairing["lm_config"], dtype=torch.bfloat16)),
                  "image_encoder": CLIPVisionModel(CLIPVisionConfig(**pairing["vision"], dtype=torch.bfloat16))}
        if pairing["decoder"] == "flux":
            models["transformer"] = FluxTransformer2DModel(**pairing["transformer"])
            models["vae"] = AutoencoderKL(**pairing["vae"])
            models["text_encoder"] = CLIPTextModel(CLIPTextConfig(**pairing["text"][0], dtype=torch.bfloat16))
            models["text_encoder_2"] = T5EncoderModel(T5Config(**pairing["t5"], dtype=torch.bfloat16))
        else:
            models["unet"] = UNet2DConditionModel(**pairing["unet"])
            models["vae"] = AutoencoderKL(**pairing["vae"])
    return models


def plan(pairing: dict) -> dict:
    """Disk and per-stage memory the pairing needs, from its configs (`benchmarks/real_size_estimate.py`)."""
    return real_size_estimate.estimate(pairing, meta_models(pairing), SHARD_BYTES)


def component_folder(pairing: dict, base: str, name: str) -> str:
    if pairing["decoder"] == "flux" and name not in ("llm", "image_encoder"):
        return os.path.join(base, FLUX_FOLDER, name)
    return os.path.join(base, name)


def write_flux_checkpoint_files(pairing: dict, models: dict, folder: str) -> None:
    """What a FluxPipeline folder holds besides weights: `model_index.json` (diffusers' own, from a pipeline over the
    `meta` models), the scheduler and the two tokenizers (tiny ones: random weights only need ids in the vocabularies)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from gill_pipeline.testing import build_tiny_clip_tokenizer
    from gill_pipeline.testing.tiny_decoders import build_tiny_t5_tokenizer

    scheduler = FlowMatchEulerDiscreteScheduler(**pairing["scheduler"])
    tokenizer, tokenizer_2 = build_tiny_clip_tokenizer(model_max_length=77), build_tiny_t5_tokenizer()
    pipe = FluxPipeline(scheduler=scheduler, vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizer,
                        text_encoder_2=models["text_encoder_2"], tokenizer_2=tokenizer_2,
                        transformer=models["transformer"])
    pipe.save_config(folder)
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    tokenizer_2.save_pretrained(os.path.join(folder, "tokenizer_2"))


def stage_write(pairing: dict, base: str) -> dict:
    from transformers import PreTrainedModel

    start = time.perf_counter()
    models = meta_models(pairing)
    written = {}
    for name, model in models.items():
        folder = component_folder(pairing, base, name)
        if isinstance(model, PreTrainedModel):
            model.config.save_pretrained(folder)
            written[name] = write_random(model, folder, "model.safetensors")
        else:
            model.save_config(folder)
            written[name] = write_random(model, folder, "diffusion_pytorch_model.safetensors")
    if pairing["decoder"] == "flux":
        write_flux_checkpoint_files(pairing, models, os.path.join(base, FLUX_FOLDER))
    return {"seconds": time.perf_counter() - start, "bytes": written, "memory": memory()}


# ----------------------------------------------------------------------------------------------------------------------
# Stage 1a (Flux): the conditioning layout, read from the text encoders alone
# ----------------------------------------------------------------------------------------------------------------------
LAYOUT_FILE, NEGATIVES_FILE = "layout.json", "negatives.safetensors"


def stage_layout(pairing: dict, base: str) -> dict:
    """Loads the Flux checkpoint's text encoders (memory-mapped, bf16) with its transformer and VAE built on `meta`
    (GILL reads only their configs: widths to check, guidance, latent space), reads the layout and the default
    negatives, and writes them next to the checkpoint for the assembly stage."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from safetensors.torch import save_file

    from gill_pipeline.decoders import default_negative_conditioning, load_decoder, read_conditioning_layout

    start = time.perf_counter()
    folder = os.path.join(base, FLUX_FOLDER)
    with torch.device("meta"):
        config_only = {name: cls.from_config(cls.load_config(os.path.join(folder, name)))
                       for name, cls in (("transformer", FluxTransformer2DModel), ("vae", AutoencoderKL))}
    decoder = load_decoder(folder, family="flux", text_encoders=True, torch_dtype=torch.bfloat16, **config_only)
    decoder.set_progress_bar_config(disable=True)
    layout = read_conditioning_layout(decoder)
    negatives = default_negative_conditioning(decoder) if layout.has_negatives else {}
    with open(os.path.join(base, LAYOUT_FILE), "w") as f:
        f.write(layout.to_json_string())
    if negatives:
        save_file({k: v.contiguous() for k, v in negatives.items()}, os.path.join(base, NEGATIVES_FILE))
    return {"seconds": time.perf_counter() - start, "layout": layout.describe(), "memory": memory()}


# ----------------------------------------------------------------------------------------------------------------------
# Stage 1: assemble from the base models and save
# ----------------------------------------------------------------------------------------------------------------------
def build_decoder(pairing: dict, base: str):
    """The stock decoder pipeline on the written UNet and VAE (memory-mapped), with its text encoders built here in
    bf16 with random values (GILL reads its conditioning layout and negatives from them once)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from gill_pipeline.testing import build_tiny_clip_tokenizer

    unet = UNet2DConditionModel.from_pretrained(os.path.join(base, "unet"), torch_dtype=torch.bfloat16)
    vae = AutoencoderKL.from_pretrained(os.path.join(base, "vae"), torch_dtype=torch.bfloat16)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.manual_seed(0)
    texts = [CLIPTextConfig(**config, dtype=torch.bfloat16) for config in pairing["text"]]
    if pairing["decoder"] == "sd15":
        return StableDiffusionPipeline(
            vae=vae, text_encoder=CLIPTextModel(texts[0]).to(torch.bfloat16),
            tokenizer=build_tiny_clip_tokenizer(model_max_length=77), unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(texts[0]).to(torch.bfloat16),
        text_encoder_2=CLIPTextModelWithProjection(texts[1]).to(torch.bfloat16),
        tokenizer=build_tiny_clip_tokenizer(model_max_length=77),
        tokenizer_2=build_tiny_clip_tokenizer(model_max_length=77), unet=unet, scheduler=scheduler,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Stage 1b (the components in a pairing's `quantize_apart`): a base model quantized alone, in place of its bf16 files
# ----------------------------------------------------------------------------------------------------------------------
def stage_quantize(pairing: dict, base: str, name: str) -> dict:
    """Loads one base model quantized by its entry of the pairing's `PipelineQuantizationConfig` and saves it beside its
    bf16 folder (`<folder>.quantized`): only this component's quantized copy is ever in this process's own memory."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from gill_pipeline.serialization.quantization import component_quantization, release_freed_memory
    from gill_pipeline.serialization.quantized_save import save_quantized_component

    start = time.perf_counter()
    folder = component_folder(pairing, base, name)
    config = component_quantization(quantization(pairing), name)
    if name == "llm":
        model = lm_class(pairing["lm"])[1].from_pretrained(folder, dtype=torch.bfloat16, quantization_config=config)
    else:
        model_class = FluxTransformer2DModel if name == "transformer" else UNet2DConditionModel
        model = model_class.from_pretrained(folder, torch_dtype=torch.bfloat16, quantization_config=config)
    release_freed_memory()
    loaded = memory()
    # The libraries' own save would hold a second copy of the int8 weights (gill_pipeline.serialization.quantized_save).
    save_quantized_component(model, folder + QUANTIZED_SUFFIX, max_shard_size=SHARD_BYTES // 2)
    return {"component": name, "seconds": time.perf_counter() - start, "memory_loaded": loaded, "memory": memory(),
            "bytes": folder_bytes(folder + QUANTIZED_SUFFIX, ".safetensors")}


QUANTIZED_SUFFIX = ".quantized"


def quantization(pairing: dict, leave_out=()):
    """The pairing's `PipelineQuantizationConfig`: the `--quantize` preset's entries for the components it names
    (except those in `leave_out`: quantized apart, loaded as saved)."""
    from diffusers import PipelineQuantizationConfig

    from gill_pipeline.serialization.quantization import quantization_preset

    config = quantization_preset(pairing["quantize"], decoder=True)
    if config is None:
        return None
    wanted = [name for name in pairing.get("quantized", ("llm",)) if name not in leave_out]
    mapping = {k: v for k, v in config.quant_mapping.items() if k in wanted}
    return PipelineQuantizationConfig(quant_mapping=mapping) if mapping else None


def flux_decoder_arguments(base: str) -> dict:
    """The Flux checkpoint folder and the layout and negatives stage 1a read: `from_base_models` then loads the
    checkpoint without its text encoders."""
    from safetensors.torch import load_file

    with open(os.path.join(base, LAYOUT_FILE)) as f:
        layout = json.load(f)
    negatives = os.path.join(base, NEGATIVES_FILE)
    return {"decoder": os.path.join(base, FLUX_FOLDER), "conditioning_layout": layout,
            "negative_conditioning": load_file(negatives) if os.path.exists(negatives) else {}}


def stage_assemble(pairing: dict, base: str, output: str) -> dict:
    from transformers import CLIPImageProcessor

    from gill_pipeline import GILLPipeline
    from gill_pipeline.testing import TINY_GILL_SIZES, build_tiny_tokenizer

    start = time.perf_counter()
    # Quantized apart (stage 1b): the folders hold the quantized models, which load as they were saved.
    config = quantization(pairing, leave_out=pairing.get("quantize_apart", ()))
    if pairing["decoder"] == "flux":
        decoder = flux_decoder_arguments(base)
    else:
        decoder = {"decoder": build_decoder(pairing, base)}
    # GILL's reference sizes of the learned parts (the library's defaults); tiny ones for the smoke run.
    learned = TINY_GILL_SIZES if pairing.get("learned") == "tiny" else {}
    size = pairing["vision"]["image_size"]
    pipe = GILLPipeline.from_base_models(
        os.path.join(base, "llm"), **decoder, image_encoder=os.path.join(base, "image_encoder"),
        # Random weights: the tokenizer only has to give ids inside the LM's vocabulary.
        tokenizer=build_tiny_tokenizer(),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        dtype=torch.bfloat16, quantization_config=config, **learned,
    )
    del decoder
    assembled = time.perf_counter() - start
    memory_assembled = memory()
    pipe.save_pretrained(output)
    return {"assemble_s": assembled, "save_s": time.perf_counter() - start - assembled,
            "memory_assembled": memory_assembled, "memory": memory(), "bytes": folder_bytes(output),
            "weights_bytes": folder_bytes(output, ".safetensors")}


# ----------------------------------------------------------------------------------------------------------------------
# Stage 2: load, answer, train, push and pull, in one fresh process
# ----------------------------------------------------------------------------------------------------------------------
PROMPT = "This is my dog. Show me what he would look like in the snow."


def timed(fn, repeats: int):
    """(median seconds, last result) of `repeats` runs after one untimed warm-up run (the models' pages come in from
    the page cache then: the image answer would otherwise pay for reading the decoder's pages that the decoder-alone
    run, timed after it, finds in memory)."""
    fn()
    seconds, result = [], None
    for _ in range(repeats):
        begin = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - begin)
    return sorted(seconds)[len(seconds) // 2], result


@torch.no_grad()
def lm_same_passes(pipe, n: int):
    """The LM alone (transformers, a `DynamicCache`, argmax; no GILL code) running the passes the image answer runs:
    the prompt, `n` passes of one text token each, and one pass of the `r` tokens of the `[IMG]` group (GILL feeds a
    group in one pass; the text answer of `n` tokens runs two passes fewer: its last token is never fed and it has no
    group). This is "the LM time for the same tokens" of the issue's target."""
    from transformers import DynamicCache

    llm = pipe.llm
    ids = pipe.tokenizer(PROMPT, return_tensors="pt").input_ids
    cache = DynamicCache()
    logits = llm(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    for _ in range(n):
        token = logits[:, -1].argmax(-1, keepdim=True)
        logits = llm(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    group = torch.zeros(1, pipe.num_img_tokens, dtype=torch.long)
    return llm(input_ids=group, past_key_values=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)


def stage_use(pairing: dict, folder: str, repeats: int) -> dict:
    from gill_pipeline import GILLPipeline
    from gill_pipeline.decoders import run_decoder

    result = {"memory_before": memory()}
    start = time.perf_counter()
    # dtype given as a user gives it: without it, a saved int8 LM / transformer loads its unquantized tensors
    # (embeddings, norms, biases) in fp32 (diffusers' and transformers' default), twice their bytes on disk.
    pipe = GILLPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    result["load_s"] = time.perf_counter() - start
    result["memory_loaded"] = memory()
    result["weights_bytes"] = folder_bytes(folder, ".safetensors")
    n, size, steps = pairing["tokens"], pairing["size"], pairing["steps"]

    def text_answer():
        return pipe(PROMPT, max_new_tokens=n, min_text_tokens=n, max_images=0, output_type="pt")

    def image_answer():
        # [IMG] forced right after n text tokens: every run does the same work (n tokens + 1 image).
        return pipe(PROMPT, max_new_tokens=n + 1, min_text_tokens=n, img_logit_scale=1e4, max_images=1,
                    image_mode="generate", num_inference_steps=steps, height=size, width=size,
                    generator=torch.Generator().manual_seed(0), output_type="pt")

    result["text_s"], _ = timed(text_answer, repeats)
    result["memory_text"] = memory()
    result["image_s"], out = timed(image_answer, repeats)
    result["images"] = len(out.images)
    result["memory_image"] = memory()
    layout = pipe.gill.conditioning_layout
    hidden = torch.randn(1, pipe.num_img_tokens, pipe.gill.config.lm_hidden_dim, dtype=pipe.gill.dtype)
    with torch.no_grad():
        cond = pipe.gill.map_to_conditioning(hidden)
    negatives = pipe.gill.negative_conditioning() or None
    parts = {denoiser_name(pipe): getattr(pipe, denoiser_name(pipe)), "vae": pipe.vae, "scheduler": pipe.scheduler}
    result["decoder_s"], _ = timed(lambda: run_decoder(
        parts, cond, negatives, layout=layout, height=size, width=size, num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0), output_type="pt", progress_bar_config={"disable": True},
    ), repeats)
    result["lm_same_s"], _ = timed(lambda: lm_same_passes(pipe, n), repeats)
    result["image_ratio"] = result["image_s"] / (result["lm_same_s"] + result["decoder_s"])
    result["image_ratio_text"] = result["image_s"] / (result["text_s"] + result["decoder_s"])
    result["train"] = train_step(pipe)
    result["hub"] = push_and_pull(pipe)
    result["memory_end"] = memory()
    return result


def denoiser_name(pipe) -> str:
    return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"


def train_step(pipe) -> dict:
    """One optimizer step of the learned parts (fp32, under bf16 autocast as training/ runs them) against the frozen
    base models: micro-batch 2, 16 caption tokens, precomputed (random) targets of the decoder's layout."""
    from training.model_forward import GILLTrainingModel, total_loss
    from training.params import LossArgs
    from training.quantized_backward import lean_quantized_backward

    from .gpu.bench_gpu import random_targets

    gill = pipe.gill.float().train()
    gill.decision_head.requires_grad_(False)
    model = GILLTrainingModel(pipe.llm.requires_grad_(False), gill, pipe.image_encoder.requires_grad_(False),
                              pipe.img_token_ids, pad_token_id=1, bos_token_id=2)
    optimizer = torch.optim.AdamW([p for p in gill.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 300, (2, 16), generator=generator)
    ids[:, 0] = 2
    size = pipe.image_encoder.config.image_size
    batch = {"caption_ids": ids, "caption_lengths": torch.tensor([16, 12]),
             "pixel_values": torch.randn(2, 3, size, size, generator=generator).to(torch.bfloat16),
             "targets": random_targets(gill, 2, generator, torch.device("cpu"))}
    start = time.perf_counter()
    # A quantized LM: the backward keeps its int8 weights, not a bf16 copy of every layer (training/quantized_backward.py).
    with lean_quantized_backward(pipe.llm):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            loss = total_loss(model(batch, concat_caption=False, concat_img=False), LossArgs())
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    gill.eval().to(torch.bfloat16)
    return {"seconds": seconds, "loss": float(loss.detach()), "memory": memory(),
            "trainable": sum(p.numel() for p in gill.parameters() if p.requires_grad)}


def push_and_pull(pipe) -> dict:
    """Learned weights pushed to an in-process Hub (tests/fake_hub.py: huggingface_hub's own client, its HTTP
    answered in memory) and loaded back onto the loaded base models; every tensor compared."""
    from tests.fake_hub import FakeHub

    from gill_pipeline import GILLPipeline

    start = time.perf_counter()
    with FakeHub() as hub, tempfile.TemporaryDirectory() as cache:
        pipe.push_to_hub("bench/gill-real-size", learned_weights_only=True, token="fake")
        pushed = time.perf_counter() - start
        uploaded = sum(len(data) for data in hub.files("bench/gill-real-size").values())
        pulled = GILLPipeline.from_pretrained(
            "bench/gill-real-size", cache_dir=cache, llm=pipe.llm, image_encoder=pipe.image_encoder,
            **{denoiser_name(pipe): getattr(pipe, denoiser_name(pipe))}, vae=pipe.vae, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler, feature_extractor=pipe.feature_extractor,
        )
        pull_s = time.perf_counter() - start - pushed
        mine, theirs = pipe.gill.state_dict(), pulled.gill.state_dict()
        same = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k].to(mine[k].dtype)) for k in mine)
    return {"push_s": pushed, "pull_s": pull_s, "bytes": uploaded, "identical": same, "memory": memory()}


# ----------------------------------------------------------------------------------------------------------------------
# The parent: one fresh process per stage, the report
# ----------------------------------------------------------------------------------------------------------------------
def child(stage: str, pairing_name: str, *paths: str, repeats: int = 1) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_real_size", "--pairing", pairing_name, "--repeats",
               str(repeats), "--child", stage, *paths]
    run = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"stage {stage!r} failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run_pairing(name: str, workdir: str, repeats: int) -> dict:
    base, folder = os.path.join(workdir, "base"), os.path.join(workdir, "gill")
    report = {"pairing": name, "free_disk_gb": shutil.disk_usage(workdir).free / 1e9,
              "estimate": real_size_estimate.describe(name, plan(PAIRINGS[name]))}
    try:
        report["write"] = child("write", name, base)
        print(f"[{name}] wrote base models: {json.dumps(report['write'])}", flush=True)
        if PAIRINGS[name]["decoder"] == "flux":
            report["layout"] = child("layout", name, base)
            print(f"[{name}] read the layout: {json.dumps(report['layout'])}", flush=True)
            for text in FLUX_TEXT:  # not needed again: free their disk before the GILL folder is written
                shutil.rmtree(os.path.join(base, FLUX_FOLDER, text))
        if PAIRINGS[name].get("quantize_apart"):
            for component in PAIRINGS[name]["quantize_apart"]:
                result = child("quantize", name, base, component)
                report.setdefault("quantize", {})[component] = result
                print(f"[{name}] quantized a base model: {json.dumps(result)}", flush=True)
                folder_of = component_folder(PAIRINGS[name], base, component)
                shutil.rmtree(folder_of)  # the bf16 files, replaced by the quantized ones
                os.replace(folder_of + QUANTIZED_SUFFIX, folder_of)
        report["assemble"] = child("assemble", name, base, folder)
        print(f"[{name}] assembled and saved: {json.dumps(report['assemble'])}", flush=True)
        shutil.rmtree(base, ignore_errors=True)
        report["use"] = child("use", name, folder, repeats=repeats)
        print(f"[{name}] loaded and used: {json.dumps(report['use'])}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    return report


def reports_from_log(path: str) -> list[dict]:
    """The reports of a run, read back from the stage lines it printed (`[pairing] stage: {json}`)."""
    stages = {"wrote base models": "write", "read the layout": "layout", "quantized a base model": "quantize",
              "assembled and saved": "assemble", "loaded and used": "use"}
    reports = {}
    with open(path) as f:
        for line in f:
            if line.startswith("[") and ("] estimate from the configs: " in line or "] memory per stage, " in line):
                report = reports.setdefault(line[1:line.index("]")], {"pairing": line[1:line.index("]")]})
                report["estimate"] = (report.get("estimate", "") + "\n" + line.rstrip("\n")).lstrip("\n")
            for label, key in stages.items():
                if line.startswith("[") and f"] {label}: " in line:
                    name = line[1:line.index("]")]
                    result = json.loads(line.split(f"{label}: ", 1)[1])
                    if key == "quantize":
                        reports.setdefault(name, {"pairing": name}).setdefault(key, {})[result["component"]] = result
                    else:
                        reports.setdefault(name, {"pairing": name})[key] = result
    complete = [r for r in reports.values() if {"write", "assemble", "use"} <= set(r)]
    if not complete:
        raise ValueError(f"`--write-from`: {path!r} holds no complete pairing (its stages were not all printed).")
    return complete


def gib(value: float) -> str:
    return f"{value:.2f} GiB"


def quantized_label(pairing: dict) -> str:
    if pairing["quantize"] == "none":
        return ""
    apart = pairing.get("quantize_apart", ())
    here = [name for name in pairing.get("quantized", ("llm",)) if name not in apart]
    return (f", quantize {pairing['quantize']}: {' + '.join(here)}" if here else "") + (
        f"; {' + '.join(apart)} {pairing['quantize']} as saved" if apart else "")


def table(report: dict) -> list[str]:
    pairing = PAIRINGS[report["pairing"]]
    write, assemble, use = report["write"], report["assemble"], report["use"]
    weights = use["weights_bytes"] / 2**30
    loaded = use["memory_loaded"]
    train, hub = use["train"], use["hub"]
    return [
        f"### {pairing['title']}",
        "",
        f"Base models written: {sum(write['bytes'].values()) / 1e9:.2f} GB in {write['seconds']:.0f} s (peak RSS "
        f"{gib(write['memory']['peak'])}; {', '.join(f'{k} {v / 1e9:.2f} GB' for k, v in write['bytes'].items())}). "
        f"GILL's folder: {assemble['bytes'] / 1e9:.2f} GB on disk, of which weights {weights:.2f} GiB. Answers: "
        f"{pairing['tokens']} forced text tokens; the image answer adds `[IMG]` and one image of "
        f"{pairing['size']}x{pairing['size']} in {pairing['steps']} step{'s' if pairing['steps'] > 1 else ''} (reduced for the CPU).",
        "",
    ] + ([
        "Estimated before the run, from the configs (`benchmarks/real_size_estimate.py`):",
        "",
        "```",
        report["estimate"],
        "```",
        "",
    ] if "estimate" in report else []) + [
        "| stage | time | peak RSS of the process | RSS at its end (anon + file) | target |",
        "| --- | --- | --- | --- | --- |",
    ] + ([
        f"| read the layout (text encoders alone; transformer, VAE on `meta`) | {report['layout']['seconds']:.1f} s | "
        f"{gib(report['layout']['memory']['peak'])} | {gib(report['layout']['memory']['rss'])} | |",
    ] if "layout" in report else []) + [
        f"| quantize {component} alone (`from_pretrained(..., quantization_config=<its entry>)` + save) | "
        f"{result['seconds']:.1f} s | {gib(result['memory']['peak'])} | {gib(result['memory_loaded']['rss'])} "
        f"({result['memory_loaded']['anon']:.2f} + {result['memory_loaded']['file']:.2f}) after loading | |"
        for component, result in report.get("quantize", {}).items()
    ] + [
        f"| `from_base_models` (assemble{quantized_label(pairing)}) "
        f"| {assemble['assemble_s']:.1f} s | {gib(assemble['memory_assembled']['peak'])} | "
        f"{gib(assemble['memory_assembled']['rss'])} ({assemble['memory_assembled']['anon']:.2f} + "
        f"{assemble['memory_assembled']['file']:.2f}) | |",
        f"| `save_pretrained` | {assemble['save_s']:.1f} s | {gib(assemble['memory']['peak'])} | "
        f"{gib(assemble['memory']['rss'])} | |",
        f"| `from_pretrained` (fresh process) | {use['load_s']:.1f} s | {gib(loaded['peak'])} = "
        f"{loaded['peak'] / weights:.2f}x weights | {gib(loaded['rss'])} ({loaded['anon']:.2f} + {loaded['file']:.2f}) "
        f"= {loaded['rss'] / weights:.2f}x weights | peak <= 1.10x, after <= 1.05x |",
        f"| text answer, {pairing['tokens']} tokens | {use['text_s']:.1f} s "
        f"({use['text_s'] / pairing['tokens'] * 1e3:.0f} ms/token incl. prefill) | {gib(use['memory_text']['peak'])} | "
        f"{gib(use['memory_text']['rss'])} = {use['memory_text']['rss'] / weights:.2f}x weights | |",
        f"| answer with one generated image | {use['image_s']:.1f} s | {gib(use['memory_image']['peak'])} | "
        f"{gib(use['memory_image']['rss'])} = {use['memory_image']['rss'] / weights:.2f}x weights | |",
        f"| stock decoder alone (same steps, size) | {use['decoder_s']:.1f} s | | | |",
    ] + ([
        f"| the LM alone, the image answer's passes (prompt, {pairing['tokens']} tokens, the `[IMG]` group) | "
        f"{use['lm_same_s']:.1f} s | | | |",
        f"| **image answer / (LM alone, same passes + decoder alone)** | **{use['image_ratio']:.2f}x** | | | <= 1.10x |",
        f"| image answer / (text answer + decoder alone) | {use['image_ratio_text']:.2f}x | | | |",
    ] if "lm_same_s" in use else [
        f"| **image answer / (text answer + decoder alone)** | **{use['image_ratio']:.2f}x** | | | <= 1.10x |",
    ]) + [
        f"| one training step (micro-batch 2, {train['trainable'] / 1e6:.1f}M trainable) | {train['seconds']:.1f} s | "
        f"{gib(train['memory']['peak'])} | {gib(train['memory']['rss'])} | |",
        f"| learned weights pushed (in-process Hub) | {hub['push_s']:.1f} s ({hub['bytes'] / 1e6:.0f} MB) | | | |",
        f"| pulled back onto the loaded base | {hub['pull_s']:.1f} s, identical: {'yes' if hub['identical'] else 'NO'} "
        f"| {gib(hub['memory']['peak'])} | {gib(hub['memory']['rss'])} | |",
        "",
    ] + ([
        "Load average (1 min) of the machine after the load / text answer / image answer / training step: "
        f"{loaded['load']:.1f} / {use['memory_text']['load']:.1f} / {use['memory_image']['load']:.1f} / "
        f"{train['memory']['load']:.1f} ({os.cpu_count()} cores).",
        "",
    ] if "load" in loaded else [])


def write_results(reports: list[dict], argv: list[str]) -> None:
    lines = [
        HEADING,
        "",
        f"One run of `python -m benchmarks.bench_real_size {' '.join(argv)}` on {platform.machine()}, "
        f"{os.cpu_count()} cores, 24 GiB, torch {torch.__version__}; random weights from the published configs; each "
        "stage in a fresh process (its peak RSS is its own). RSS counts the memory-mapped safetensors pages the "
        "process has touched (file) as well as its own copies (anon).",
        "",
    ]
    for report in reports:
        lines += table(report)
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Real sizes within real memory\n\n"
    if HEADING in text:
        start = text.index(HEADING)
        end = text.find("\n## ", start + len(HEADING))
        text = text[:start] + "\n".join(lines) + ("" if end < 0 else text[end:])
    else:
        first = text.find("\n## ")
        text = (text.rstrip("\n") + "\n\n" + "\n".join(lines)) if first < 0 else (
            text[: first + 1] + "\n".join(lines) + "\n" + text[first + 1:])
    with open(RESULTS, "w") as f:
        f.write(text)
    print(f"wrote {RESULTS}")


DISK_MARGIN = 1.05  # shard rounding, configs, tokenizers, and the learned weights pushed to the in-process Hub


def check_disk(parser, names: list[str], workdir: str) -> None:
    """Prints each pairing's estimate and refuses (before writing anything) when `workdir` has too little free disk
    for the largest of them (pairings run one after the other, each deleting its folders)."""
    free = shutil.disk_usage(workdir).free
    for name in names:
        needed = plan(PAIRINGS[name])
        print(real_size_estimate.describe(name, needed), flush=True)
        need = needed["disk"]["peak"] * DISK_MARGIN
        if need > free:
            parser.error(
                f"argument --workdir: {workdir!r} has {free / 1e9:.1f} GB free, but the {name!r} pairing needs "
                f"{need / 1e9:.1f} GB at its peak (base models and the GILL folder on disk together); pass a "
                f"--workdir on a disk with more room"
            )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairing", action="append", choices=sorted(PAIRINGS),
                        help="a pairing to measure (repeatable; default: paper)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per answer after the warm-up (median)")
    parser.add_argument("--workdir", default=None, help="where the multi-GB folders go (default: a temporary folder)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave real_size.md alone")
    parser.add_argument("--write-from", metavar="LOG", help="write real_size.md from the printed stages of a run's log")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = args.pairing or ["paper"]
    if args.write_from:
        reports = reports_from_log(args.write_from)
        write_results(reports, [a for n in reports for a in ("--pairing", n["pairing"])])
        return reports
    if args.child:
        pairing = PAIRINGS[names[0]]
        stage, *paths = args.child
        torch.manual_seed(0)
        if stage == "write":
            result = stage_write(pairing, *paths)
        elif stage == "layout":
            result = stage_layout(pairing, *paths)
        elif stage == "quantize":
            result = stage_quantize(pairing, *paths)
        elif stage == "assemble":
            result = stage_assemble(pairing, *paths)
        else:
            result = stage_use(pairing, *paths, repeats=args.repeats)
        print("RESULT " + json.dumps(result), flush=True)
        return None
    if args.repeats < 1:
        parser.error(f"argument --repeats: must be at least 1, got {args.repeats}")
    if args.workdir is not None and not os.path.isdir(args.workdir):
        parser.error(f"argument --workdir: no such folder {args.workdir!r}")
    check_disk(parser, names, args.workdir or tempfile.gettempdir())
    reports = []
    for name in names:
        workdir = tempfile.mkdtemp(prefix=f"gill_real_size_{name}_", dir=args.workdir)
        try:
            reports.append(run_pairing(name, workdir, args.repeats))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    if not args.no_write:
        write_results(reports, argv)
    return reports


if __name__ == "__main__":
    main()
