"""GILL on one GPU at real sizes with random weights (issue 10, section 6), in one command.

    python benchmarks/gpu/bench_gpu.py                 # a CUDA GPU: real sizes, writes benchmarks/results/gpu.md
    python benchmarks/gpu/bench_gpu.py --tiny          # CPU, tiny configs, seconds (the default tests run this)

Every model is built directly on the device from the published architecture numbers (`real_configs.py`), in bf16,
with random weights: nothing is downloaded. Measured side by side in one run:

1. HBM bandwidth (a large device-to-device copy) and the LM's per-token decode time (OPT-6.7B shape, KV cache,
   GILL's own decoding loop) against the weight-streaming bound: bytes of LM weights / measured bandwidth.
2. A whole GILL answer (32 text tokens + 1 generated image, 30 steps) against the stock decoder pipeline alone with
   the same steps, size and conditioning, for GILL over SD 1.5 (512x512), SDXL (1024x1024) and Flux.1-dev
   (1024x1024; `--skip-flux` leaves it out).
3. Peak memory of decoder inference with the decoder's text encoders loaded (stock `prompt=`) and without them
   (`run_decoder` from stored conditioning), for SD 1.5, SDXL and Flux.1-dev (if it fits), and of a GILL answer with
   and without `enable_model_cpu_offload`.
4. Training at the paper's setting: OPT-6.7B and CLIP ViT-L/14 frozen, SD 1.5 targets precomputed, an effective
   batch of 200 by gradient accumulation, bf16: samples/s and peak memory per micro-batch size; and one micro-batch
   size for the SDXL and Flux.1-dev targets (77 x 2048 + 1280, 512 x 4096 + 768), where the mapper's heads differ.
"""

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(REPO, "benchmarks", "results", "gpu.md")
sys.path[:0] = [HERE, REPO]  # real_configs (sibling) and training/ (repo root)

import real_configs  # noqa: E402

# What each mode runs. Real sizes follow the issue; tiny sizes exercise the same code in seconds on a CPU.
MODES = {
    "real": dict(copy_mib=4096, prompt_tokens=32, decode_short=8, decode_long=72, answer_tokens=32, steps=30,
                 sd_size=512, sdxl_size=1024, flux_size=1024, memory_steps=2, effective_batch=200,
                 micro_batches=(10, 25, 50, 100, 200), family_micro_batches=(50,), caption_tokens=32, repeats=3,
                 family_repeats=1, warmup=True),
    "tiny": dict(copy_mib=16, prompt_tokens=8, decode_short=2, decode_long=6, answer_tokens=4, steps=2,
                 sd_size=32, sdxl_size=32, flux_size=32, memory_steps=1, effective_batch=4,
                 micro_batches=(2, 4), family_micro_batches=(2,), caption_tokens=8, repeats=1, family_repeats=1,
                 warmup=False),
}


# ------------------------------------------------------------------------------------------------------------------
# Helpers: device, timing, memory
# ------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def built_on(device: torch.device, dtype: torch.dtype):
    """Build modules directly on `device` in `dtype` (no fp32 copy on the host, no transfer)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: bool = True) -> float:
    """Median wall time of `fn()` over `repeats` runs (after one warm-up run), device work included."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_gib(fn, device):
    """Runs `fn` and returns (its result, the peak of allocated device memory during it in GiB; None on CPU)."""
    if device.type != "cuda":
        return fn(), None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) / 2**30


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def weight_bytes(module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if p.data_ptr() not in seen:  # tied weights once
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def fmt(value, digits=2, unit=""):
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


# ------------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------------
# Image size key of each decoder family in MODES, and the guidance scale its answers use.
SIZE_KEYS = {"sd15": "sd_size", "sdxl": "sdxl_size", "flux": "flux_size"}
GUIDANCE = {"sd15": 7.5, "sdxl": 7.5, "flux": 3.5}  # Flux.1-dev: its guidance embedding, no negative pass


def build_base_models(mode, device, dtype):
    """The OPT-6.7B-shaped LM, CLIP ViT-L/14 and a tokenizer (tiny in --tiny), shared by every GILL built below."""
    from transformers import CLIPImageProcessor

    from gill_pipeline.testing import build_tiny_lm, build_tiny_tokenizer, build_tiny_vision_encoder

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()  # random weights: the tokenizer only has to give ids inside the LM vocabulary
    if mode == "tiny":
        llm = build_tiny_lm("opt", len(tokenizer), tokenizer)
        encoder, processor = build_tiny_vision_encoder()
    else:
        with built_on(device, dtype):
            llm = real_configs.opt_6_7b()
            encoder = real_configs.clip_vit_l_14()
        processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return tokenizer, llm.eval(), encoder.eval(), processor


def build_gill(family, base, mode, device, dtype):
    """GILL assembled on the base models and the decoder `family` ("sd15", "sdxl", "flux"), at real sizes (tiny in
    --tiny). The decoder's text encoders are used once, at assembly, then dropped with it."""
    from gill_pipeline import GILLPipeline

    tokenizer, llm, encoder, processor = base
    decoder = build_decoder(family, mode, device, dtype)
    # Real mode: GILL's reference sizes (the library defaults); tiny mode: a tiny mapper.
    learned = {} if mode == "real" else dict(num_img_tokens=4, retrieval_dim=16, mapper_hidden_dim=32,
                                             mapper_encoder_layers=1, mapper_decoder_layers=1, mapper_heads=2)
    pipe = GILLPipeline.from_base_models(
        language_model=llm, tokenizer=tokenizer, stable_diffusion=decoder, image_encoder=encoder,
        feature_extractor=processor, **learned,
    )
    del decoder
    free(device)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_decoder(family, mode, device, dtype):
    """A stock decoder pipeline WITH its text encoders at real sizes (tiny in --tiny).

    `family`: "sd15", "sdxl", "flux" (Flux.1-dev), and "sd3" (3.5-large), "pixart" (Sigma), "sana" (1600M), which
    the memory part leaves out for time. On the meta device (no memory) the tests read the layouts of the unmasked
    families from them; PixArt's and Sana's text encoders read their masks' values, which meta tensors do not have.
    """
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        PixArtSigmaPipeline,
        SanaPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        Gemma2Config,
        Gemma2Model,
        T5Config,
        T5EncoderModel,
    )

    from gill_pipeline.testing import build_tiny_tokenizer
    from gill_pipeline.testing import build_tiny_decoder, build_tiny_gemma_tokenizer, build_tiny_t5_tokenizer

    if mode == "tiny":
        tiny_name = {"sd15": "sd", "flux": "flux-dev", "pixart": "pixart-sigma"}.get(family, family)
        return build_tiny_decoder(tiny_name).to(device, dtype)
    clip_tokenizer = build_tiny_tokenizer(model_max_length=77)
    # Schedulers are made outside `built_on`: their sigma tables stay fp32 on the host, as from_pretrained makes them.
    euler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    ddim = DDIMScheduler()
    flux_vae = {key: real_configs.FLUX_VAE[key] for key in ("latent_channels", "use_quant_conv", "use_post_quant_conv",
                                                            "sample_size", "scaling_factor", "shift_factor")}
    with built_on(device, dtype):
        if family == "sd15":
            pipe = StableDiffusionPipeline(
                vae=real_configs.sd_vae(), text_encoder=CLIPTextModel(CLIPTextConfig(**real_configs.CLIP_L_TEXT)),
                tokenizer=clip_tokenizer, unet=real_configs.sd15_unet(), scheduler=euler, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False,
            )
        elif family == "sdxl":
            pipe = StableDiffusionXLPipeline(
                vae=real_configs.sd_vae(sample_size=1024, scaling_factor=0.13025),
                text_encoder=CLIPTextModel(CLIPTextConfig(**real_configs.CLIP_L_TEXT)),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**real_configs.CLIP_BIGG_TEXT)),
                tokenizer=clip_tokenizer, tokenizer_2=build_tiny_tokenizer(model_max_length=77),
                unet=real_configs.sdxl_unet(), scheduler=euler, add_watermarker=False,
            )
        elif family == "sd3":
            pipe = StableDiffusion3Pipeline(
                vae=real_configs.sd_vae(**flux_vae), transformer=real_configs.sd35_large_transformer(), scheduler=flow,
                text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**real_configs.CLIP_L_TEXT)),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**real_configs.CLIP_BIGG_TEXT)),
                text_encoder_3=T5EncoderModel(T5Config(**real_configs.T5_XXL)), tokenizer=clip_tokenizer,
                tokenizer_2=build_tiny_tokenizer(model_max_length=77), tokenizer_3=build_tiny_t5_tokenizer(),
            )
        elif family == "pixart":
            pipe = PixArtSigmaPipeline(
                vae=real_configs.sd_vae(), transformer=real_configs.pixart_sigma_transformer(), scheduler=ddim,
                text_encoder=T5EncoderModel(T5Config(**real_configs.T5_XXL)),
                tokenizer=build_tiny_t5_tokenizer(),
            )
        elif family == "sana":
            # The DC autoencoder's real config is not written down here: a tiny one stands in (the text side and
            # the transformer, what the layout and the memory of text encoders depend on, are real).
            pipe = SanaPipeline(
                vae=build_tiny_decoder("sana").vae.to(device, dtype), transformer=real_configs.sana_transformer(),
                scheduler=flow, text_encoder=Gemma2Model(Gemma2Config(**real_configs.GEMMA_2_2B)),
                tokenizer=build_tiny_gemma_tokenizer(),
            )
        else:
            pipe = FluxPipeline(
                vae=real_configs.sd_vae(**flux_vae),
                text_encoder=CLIPTextModel(CLIPTextConfig(**real_configs.CLIP_L_TEXT)), tokenizer=clip_tokenizer,
                text_encoder_2=T5EncoderModel(T5Config(**real_configs.T5_XXL)), tokenizer_2=build_tiny_t5_tokenizer(),
                transformer=real_configs.flux_transformer(),
                scheduler=flow,
            )
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------------------------
# 1. Bandwidth and per-token decoding
# ------------------------------------------------------------------------------------------------------------------
def bench_bandwidth(device, mib: int, repeats: int) -> float:
    """Bytes moved per second by a device-to-device copy (read + write), GB/s."""
    n = mib * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, max(repeats, 5))
    del src, dst
    free(device)
    return 2 * n / seconds / 1e9


def bench_decode(pipe, cfg, device, bandwidth_gbs) -> dict:
    from gill_pipeline import DecodingSettings

    ids = torch.randint(4, 300, (cfg["prompt_tokens"],), generator=torch.Generator().manual_seed(0)).to(device)
    prompt = [pipe.embed_token_ids(ids)]
    produced, seconds = {}, {}
    for n in (cfg["decode_short"], cfg["decode_long"]):
        settings = DecodingSettings(max_new_tokens=n, max_images=0)
        out = {}

        def run():
            out["sequence"] = pipe.decode(prompt, settings)[0]

        seconds[n] = timed(run, device, cfg["repeats"], warmup=cfg["warmup"])
        produced[n] = len(out["sequence"].token_ids)  # a random LM may meet EOS early: count what was made
    tokens = produced[cfg["decode_long"]] - produced[cfg["decode_short"]]
    per_token = (seconds[cfg["decode_long"]] - seconds[cfg["decode_short"]]) / max(tokens, 1)
    lm_bytes = weight_bytes(pipe.llm)
    bound = lm_bytes / (bandwidth_gbs * 1e9)
    return {"lm_gib": lm_bytes / 2**30, "per_token_ms": per_token * 1e3, "bound_ms": bound * 1e3,
            "ratio": per_token / bound, "tokens_timed": tokens}


# ------------------------------------------------------------------------------------------------------------------
# 2. A whole GILL answer vs the decoder alone
# ------------------------------------------------------------------------------------------------------------------
def gill_answer(pipe, cfg, size, guidance=7.5):
    # Forcing [IMG] right after `answer_tokens` text tokens gives every run the same work: 32 tokens + 1 image.
    return pipe(
        "This is my dog. Show me what he would look like in the snow.", max_new_tokens=cfg["answer_tokens"] + 1,
        min_text_tokens=cfg["answer_tokens"], img_logit_scale=1e4, max_images=1, num_inference_steps=cfg["steps"],
        guidance_scale=guidance, height=size, width=size, generator=torch.Generator().manual_seed(0), output_type="pt",
    )


def bench_answer(pipe, family, cfg, device, repeats) -> dict:
    from gill_pipeline.decoders import run_decoder

    size, guidance = cfg[SIZE_KEYS[family]], GUIDANCE[family]
    out = {}

    def run():
        out["answer"] = gill_answer(pipe, cfg, size, guidance)

    gill_s = timed(run, device, repeats, warmup=cfg["warmup"])
    images = len(out["answer"].images)
    layout = pipe.gill.conditioning_layout
    hidden = torch.randn(1, pipe.num_img_tokens, pipe.gill.config.lm_hidden_dim, device=device, dtype=pipe.gill.dtype)
    with torch.no_grad():
        cond = pipe.gill.map_to_conditioning(hidden)
    negatives = pipe.gill.negative_conditioning() or None
    denoiser = "unet" if pipe.unet is not None else "transformer"
    parts = {denoiser: getattr(pipe, denoiser), "vae": pipe.vae, "scheduler": pipe.scheduler}
    decoder_s = timed(
        lambda: run_decoder(parts, cond, negatives, layout=layout, height=size, width=size,
                            num_inference_steps=cfg["steps"], guidance_scale=guidance,
                            generator=torch.Generator().manual_seed(0), output_type="pt",
                            progress_bar_config={"disable": True}),
        device, repeats, warmup=cfg["warmup"],
    )
    return {"family": family, "pipeline_class": layout.pipeline_class, "size": size, "guidance": guidance,
            "gill_s": gill_s, "decoder_s": decoder_s, "overhead": (gill_s - decoder_s) / decoder_s, "images": images}


# ------------------------------------------------------------------------------------------------------------------
# 3. Peak memory: with and without the decoder's text encoders, and with CPU offload
# ------------------------------------------------------------------------------------------------------------------
def bench_decoder_memory(family, cfg, device, dtype) -> dict:
    from gill_pipeline.decoders import default_negative_conditioning, encode_conditioning, run_decoder
    from gill_pipeline.decoders.families import family_for_pipeline

    size = cfg[SIZE_KEYS[family]]
    pipe = build_decoder(family, cfg["mode"], device, dtype)
    text_names = [n for n in family_for_pipeline(pipe).text_components if n.startswith("text_encoder")]
    text_gib = sum(weight_bytes(getattr(pipe, n)) for n in text_names) / 2**30
    call = dict(height=size, width=size, num_inference_steps=cfg["memory_steps"], output_type="pt")
    _, with_text = peak_gib(lambda: pipe(prompt="a photo of a dog in the snow", **call), device)
    cond = encode_conditioning(pipe, ["a photo of a dog in the snow"])
    negatives = default_negative_conditioning(pipe)
    for name in text_names:  # what GILL inference never loads
        setattr(pipe, name, None)
    free(device)
    _, without_text = peak_gib(lambda: run_decoder(pipe, cond, negatives or None, **call), device)
    result = {"family": family, "size": size, "text_encoders_gib": text_gib, "with_text_gib": with_text,
              "without_text_gib": without_text}
    del pipe, cond, negatives
    free(device)
    return result


def bench_gill_offload(pipe, cfg, device) -> dict:
    size = cfg["sd_size"]
    if device.type != "cuda":  # no memory statistics and no offload on the CPU
        return {"resident_gib": None, "offload_gib": None, "offload_s": None}
    _, resident = peak_gib(lambda: gill_answer(pipe, cfg, size), device)
    pipe.enable_model_cpu_offload(device=device)
    _, offload = peak_gib(lambda: gill_answer(pipe, cfg, size), device)  # also the warm-up
    seconds = timed(lambda: gill_answer(pipe, cfg, size), device, 1, warmup=False)
    pipe.remove_all_hooks()
    pipe.to(device)  # the hooks leave the models on the host
    return {"resident_gib": resident, "offload_gib": offload, "offload_s": seconds}


# ------------------------------------------------------------------------------------------------------------------
# 4. Training at the paper's setting
# ------------------------------------------------------------------------------------------------------------------
def random_targets(gill, micro, generator, device) -> torch.Tensor | dict:
    """Random targets of the decoder's layout (as precomputed ones are read): the SD 1.x sequence, or a dict."""
    if gill.config.conditioning_layout is None:
        return torch.randn(micro, gill.config.cond_length, gill.config.cond_dim, generator=generator).to(device)
    targets = {}
    for tensor in gill.conditioning_layout.tensors:
        if tensor.kind == "mask":
            targets[tensor.name] = torch.ones(micro, *tensor.shape, dtype=torch.long, device=device)
        else:
            targets[tensor.name] = torch.randn(micro, *tensor.shape, generator=generator).to(device)
    return targets


def bench_training(pipe, family, cfg, device, dtype, micro_batches) -> list[dict]:
    from training.model_forward import GILLTrainingModel, total_loss
    from training.params import LossArgs

    # Targets are precomputed: training holds no denoiser or VAE.
    for name in ("unet", "transformer", "vae"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to("cpu")
    free(device)
    gill = pipe.gill.float()  # the learned parts train in fp32 under bf16 autocast, as training/ does
    gill.train()
    gill.decision_head.requires_grad_(False)
    model = GILLTrainingModel(pipe.llm.requires_grad_(False), gill, pipe.image_encoder.requires_grad_(False),
                              pipe.img_token_ids, pad_token_id=1, bos_token_id=2).to(device)
    optimizer = torch.optim.AdamW([p for p in gill.parameters() if p.requires_grad], lr=1e-4)
    vocab = pipe.llm.get_input_embeddings().num_embeddings
    image_size = pipe.image_encoder.config.image_size
    generator = torch.Generator().manual_seed(0)
    rows = []
    for micro in micro_batches:
        t = cfg["caption_tokens"]
        ids = torch.randint(4, min(vocab, 300), (micro, t), generator=generator)
        ids[:, 0] = 2
        batch = {
            "caption_ids": ids.to(device),
            "caption_lengths": torch.randint(t // 2, t + 1, (micro,), generator=generator).to(device),
            "pixel_values": torch.randn(micro, 3, image_size, image_size, generator=generator).to(device, dtype),
            "targets": random_targets(gill, micro, generator, device),
        }
        accumulation = cfg["effective_batch"] // micro

        def effective_step():
            for i in range(accumulation):
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    loss = total_loss(model(batch, concat_caption=i % 2 == 1, concat_img=i % 2 == 1), LossArgs())
                (loss / accumulation).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            if cfg["warmup"]:
                effective_step()
            seconds, peak = peak_gib(lambda: timed(effective_step, device, 1, warmup=False), device)
            rows.append({"family": family, "micro_batch": micro, "accumulation": accumulation, "peak_gib": peak,
                         "samples_per_s": cfg["effective_batch"] / seconds})
        except torch.OutOfMemoryError:
            rows.append({"family": family, "micro_batch": micro, "accumulation": accumulation, "peak_gib": None,
                         "samples_per_s": None, "oom": True})
        optimizer.zero_grad(set_to_none=True)
        del batch
        free(device)
    return rows


# ------------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------------
def _failed(part) -> str | None:
    return part.get("failed") if isinstance(part, dict) else None


def _table_head(*columns: str) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def _section(title: str, text: str, *columns: str) -> list[str]:
    """The opening of a report section: its title, what it measured, and the head of its table."""
    return ["", f"## {title}", "", text, "", *_table_head(*columns)]


def report(results: dict, args) -> str:
    r, cfg = results, args_cfg(args)
    lines = [
        "# GILL on a GPU: real sizes, random weights",
        "",
        f"Command: `python benchmarks/gpu/bench_gpu.py{' --tiny' if args.tiny else ''}` "
        f"({r['elapsed_s']:.0f} s in all). "
        f"Device: {r['device']}; torch {torch.__version__}; dtype {r['dtype']}. "
        + ("Tiny configs (a smoke run: the figures mean nothing). " if args.tiny else
           "Models built on the device from the published configs (`benchmarks/gpu/real_configs.py`), random weights. ")
        + "Medians after a warm-up.",
        "",
        "## 1. Per-token decoding vs the HBM weight-streaming bound",
        "",
    ]
    decode, bandwidth = r["decode"], r["bandwidth_gbs"]
    if _failed(decode) or _failed(bandwidth):
        lines.append(f"Failed: {_failed(decode) or _failed(bandwidth)}")
    else:
        lines += [
            f"Measured copy bandwidth (read + write of a {cfg['copy_mib']} MiB device-to-device copy): "
            f"**{bandwidth:.0f} GB/s**. LM weights: {decode['lm_gib']:.2f} GiB. GILL's decoding loop "
            f"(`GILLPipeline.decode`), KV cache, batch 1, {cfg['prompt_tokens']}-token prompt; per token over "
            f"{decode['tokens_timed']} tokens (the difference of a {cfg['decode_long']}- and a {cfg['decode_short']}-"
            "token run, so the prompt's prefill cancels out).",
            "",
            *_table_head("per-token decode (ms)", "bound = weight bytes / bandwidth (ms)", "ratio (target <= 1.5x)"),
            f"| {decode['per_token_ms']:.2f} | {decode['bound_ms']:.2f} | {decode['ratio']:.2f}x |",
        ]
    lines += _section(
        "2. A whole GILL answer vs the decoder alone",
        f"GILL: {cfg['answer_tokens']} text tokens + 1 generated image, {cfg['steps']} steps. Decoder alone: the stock "
        "pipeline of the family (through `run_decoder`) with the same denoiser, steps, size, guidance and stored "
        "negatives. SD 1.5 and SDXL guide with classifier-free guidance, Flux.1-dev with its guidance embedding.",
        "decoder", "size", "guidance", "GILL answer (s)", "decoder alone (s)", "GILL adds (target <= 10%)",
    )
    for answer in r["answer"]:
        if _failed(answer):
            lines.append(f"| {answer['family']} | failed: {_failed(answer)} | | | | |")
            continue
        lines.append(
            f"| {answer['family']} ({answer['pipeline_class']}) | {answer['size']} | {answer['guidance']} | "
            f"{answer['gill_s']:.3f} | {answer['decoder_s']:.3f} | {answer['overhead'] * 100:.1f}% |"
        )
    lines += _section(
        "3. Peak memory of inference",
        "Peak allocated device memory of one call (`torch.cuda.max_memory_allocated`), weights included. With text "
        "encoders: the stock pipeline from `prompt=`. Without: `run_decoder` from stored conditioning, the text "
        f"encoders deleted. {cfg['memory_steps']} steps (the peak does not depend on the step count).",
        "decoder", "size", "text encoders (GiB)", "peak with text encoders (GiB)", "peak without (GiB)", "saved (GiB)",
    )
    for row in r["memory"]:
        if "skipped" in row:
            lines.append(f"| {row['family']} | - | - | skipped: {row['skipped']} | - | - |")
            continue
        saved = None if row["with_text_gib"] is None else row["with_text_gib"] - row["without_text_gib"]
        lines.append(
            f"| {row['family']} | {row['size']} | {row['text_encoders_gib']:.2f} | {fmt(row['with_text_gib'])} | "
            f"{fmt(row['without_text_gib'])} | {fmt(saved)} |"
        )
    offload = r["offload"]
    lines.append("")
    if _failed(offload):
        lines.append(f"GILL answer with `enable_model_cpu_offload()`: failed: {_failed(offload)}")
    else:
        lines.append(
            f"GILL answer (section 2's call): peak {fmt(offload['resident_gib'])} GiB with every model on the device; "
            f"{fmt(offload['offload_gib'])} GiB with `enable_model_cpu_offload()` ({fmt(offload['offload_s'], 1)} s "
            "per answer with offload)."
            + (" Offload needs an accelerator: not measured on the CPU." if offload["offload_gib"] is None else "")
        )
    lines += _section(
        "4. Training at the paper's setting",
        "OPT-6.7B and CLIP ViT-L/14 frozen (bf16, on the device), learned parts in fp32 under bf16 autocast with "
        f"AdamW, targets precomputed (no denoiser or VAE on the device): SD 1.5 (77x768), SDXL (77x2048 + pooled "
        f"1280), Flux.1-dev (512x4096 + pooled 768); captions up to {cfg['caption_tokens']} tokens, effective batch "
        f"{cfg['effective_batch']} by gradient accumulation, half the micro-steps with two-example concatenation. "
        "Target: the effective batch within 24 GB.",
        "decoder", "micro-batch", "accumulation", "samples/s", "peak memory (GiB)", "within 24 GB",
    )
    for rows in r["training"]:
        if _failed(rows):
            lines.append(f"| failed: {_failed(rows)} | | | | | |")
            continue
        for row in rows:
            if row.get("oom"):
                lines.append(f"| {row['family']} | {row['micro_batch']} | {row['accumulation']} | out of memory | - | "
                             "no |")
                continue
            fits = "n/a" if row["peak_gib"] is None else ("yes" if row["peak_gib"] * 2**30 <= 24e9 else "no")
            lines.append(f"| {row['family']} | {row['micro_batch']} | {row['accumulation']} | "
                         f"{row['samples_per_s']:.1f} | {fmt(row['peak_gib'])} | {fits} |")
    lines += ["", "Raw results: `" + json.dumps(r) + "`", ""]
    return "\n".join(lines)


def args_cfg(args):
    return MODES["tiny" if args.tiny else "real"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="Tiny configs on the CPU (seconds); for the tests.")
    parser.add_argument("--output", default=None, help="Report path. Default: benchmarks/results/gpu.md on a GPU, "
                        "a temporary file with --tiny.")
    parser.add_argument("--skip-flux", action="store_true", help="Leave out Flux.1-dev (answer, training, memory).")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        parser.error("No CUDA device: run with --tiny (the real sizes need a GPU with about 40 GB or more).")
    cfg = dict(args_cfg(args), mode="tiny" if args.tiny else "real")
    output = args.output or (os.path.join(tempfile.mkdtemp(prefix="bench_gpu_"), "gpu.md") if args.tiny else RESULTS)

    def log(message):
        print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)

    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"CPU ({platform.machine()}, {os.cpu_count()} cores)", "dtype": str(dtype).removeprefix("torch."),
               "memory_steps": cfg["memory_steps"]}
    def section(name, fn):
        """Runs one part; on a GPU a failure is recorded in the report instead of losing the whole run."""
        try:
            results[name] = fn()
        except Exception as error:  # noqa: BLE001
            if args.tiny:
                raise
            results[name] = {"failed": f"{type(error).__name__}: {error}"[:500]}
            free(device)
        log(f"{name}: {str(results[name])[:300]}")

    section("bandwidth_gbs", lambda: bench_bandwidth(device, cfg["copy_mib"], cfg["repeats"]))
    base = build_base_models(cfg["mode"], device, dtype)
    pipe = build_gill("sd15", base, cfg["mode"], device, dtype)
    log("GILL (SD 1.5) built")
    bandwidth = results["bandwidth_gbs"] if isinstance(results["bandwidth_gbs"], float) else float("nan")
    section("decode", lambda: bench_decode(pipe, cfg, device, bandwidth))
    answers, training = [], []
    section("_answer", lambda: bench_answer(pipe, "sd15", cfg, device, cfg["repeats"]))
    answers.append(dict(results.pop("_answer"), family="sd15"))
    section("offload", lambda: bench_gill_offload(pipe, cfg, device))
    section("_training", lambda: bench_training(pipe, "sd15", cfg, device, dtype, cfg["micro_batches"]))
    training.append(results.pop("_training"))
    del pipe
    free(device)
    # The other decoder families: one answer and one training micro-batch size each (their decoders are larger).
    for family in ("sdxl", "flux"):
        if family == "flux" and args.skip_flux:
            continue
        section("_pipe", lambda: build_gill(family, base, cfg["mode"], device, dtype))
        pipe = results.pop("_pipe")
        if _failed(pipe):
            answers.append({"family": family, "failed": _failed(pipe)})
            continue
        section("_answer", lambda: bench_answer(pipe, family, cfg, device, cfg["family_repeats"]))
        answers.append(dict(results.pop("_answer"), family=family))
        section("_training", lambda: bench_training(pipe, family, cfg, device, dtype, cfg["family_micro_batches"]))
        training.append(results.pop("_training"))
        del pipe
        free(device)
    results["answer"], results["training"] = answers, training
    del base
    free(device)
    memory = []
    for family in ("sd15", "sdxl", "flux"):
        if family == "flux" and args.skip_flux:
            memory.append({"family": family, "skipped": "--skip-flux"})
            continue
        section("_row", lambda: bench_decoder_memory(family, cfg, device, dtype))
        row = results.pop("_row")
        memory.append(row if "failed" not in row else {"family": family, "skipped": row["failed"]})
    results["memory"] = memory
    results["elapsed_s"] = time.perf_counter() - start
    text = report(results, args)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    log(f"wrote {output}")
    return output


if __name__ == "__main__":
    main()
