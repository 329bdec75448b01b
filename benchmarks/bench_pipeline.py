"""Benchmarks of GILLPipeline (issue: GILLPipeline).

1. Decoding with the KV cache vs re-running the whole sequence for every new token (the reference's way), on a
   random-weight LM of OPT-125m size, a 32-token prompt and 8 / 32 / 64 new tokens.
2. The pipeline's own overhead (LM decoding + mapper + glue) as a fraction of the denoising time, for the same UNet
   and number of steps: a full GILL call vs the stock StableDiffusionPipeline given the same prompt embeddings.

Both measured side by side in one run; figures are ratios. Writes benchmarks/results/pipeline.md.

    python -m benchmarks.bench_pipeline [--repeats 3] [--threads 2]
"""

import argparse
import os
import platform

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from gill_pipeline import DecodingSettings, GILLDecoder, GILLPipeline
from gill_pipeline.models.lm_bridge import new_cache
from gill_pipeline.testing import build_tiny_stable_diffusion, build_tiny_tokenizer, build_tiny_vision_encoder
from benchmarks.models import opt_125m_shaped
from benchmarks.timing import median_seconds

RESULTS = os.path.join(os.path.dirname(__file__), "results", "pipeline.md")


def build_pipeline(llm, cross_attention_dim: int, unet: UNet2DConditionModel | None = None) -> GILLPipeline:
    tokenizer = build_tiny_tokenizer()
    sd = build_tiny_stable_diffusion(cross_attention_dim=cross_attention_dim)
    if unet is not None:
        sd.register_modules(unet=unet)
    encoder, processor = build_tiny_vision_encoder()
    pipe = GILLPipeline.from_base_models(
        language_model=llm, tokenizer=tokenizer, stable_diffusion=sd, image_encoder=encoder, feature_extractor=processor
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe




def bench_kv_cache(pipe: GILLPipeline, repeats: int) -> list[tuple[int, float, float]]:
    # No EOS and no images: every run produces exactly `n` tokens, so both ways do the same work.
    decoder = GILLDecoder(
        lm_forward=pipe._lm_forward,
        embed_ids=pipe.embed_token_ids,
        img_token_ids=pipe.img_token_ids,
        eos_token_ids=set(),
        is_newline=lambda token: False,
        new_cache=lambda: new_cache(pipe.llm),
    )
    ids = torch.randint(4, 300, (32,), generator=torch.Generator().manual_seed(0))
    prompt = [pipe.embed_token_ids(ids)]
    rows = []
    for n in (8, 32, 64):
        results = {}
        for use_cache in (True, False):
            settings = DecodingSettings(max_new_tokens=n, max_images=0, use_cache=use_cache)
            with torch.no_grad():
                results[use_cache] = median_seconds(lambda: decoder(prompt, settings), repeats)
        cached = decoder(prompt, DecodingSettings(max_new_tokens=n, max_images=0))[0]
        uncached = decoder(prompt, DecodingSettings(max_new_tokens=n, max_images=0, use_cache=False))[0]
        if cached.token_ids != uncached.token_ids or len(cached.token_ids) != n:
            raise RuntimeError("KV-cache and full re-run decoding disagree; the benchmark would compare apples/oranges")
        rows.append((n, results[True], results[False]))
    return rows


def bench_overhead(pipe: GILLPipeline, steps: int, repeats: int) -> dict:
    prompt = ["This is my dog. Show me what he would look like in the snow."]
    call = dict(
        max_new_tokens=12, min_text_tokens=8, img_logit_scale=1e4, max_images=1, num_inference_steps=steps,
        guidance_scale=7.5, output_type="pt",
    )
    gill_time = median_seconds(lambda: pipe(prompt, generator=torch.Generator().manual_seed(0), **call), repeats)

    sd = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=None, tokenizer=None, unet=pipe.unet, scheduler=pipe.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, *pipe.gill.uncond_prompt_embeds.shape[1:])
    negative = pipe.gill.uncond_prompt_embeds
    sd_time = median_seconds(
        lambda: sd(
            prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=steps, guidance_scale=7.5,
            generator=torch.Generator().manual_seed(0), output_type="pt",
        ),
        repeats,
    )
    return {"gill": gill_time, "sd": sd_time, "overhead": (gill_time - sd_time) / sd_time}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    llm = opt_125m_shaped()
    # A small SD-shaped UNet (3 levels, widths 64/128/256, 32x32 latents, cross-attention width 768).
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256), layers_per_block=1, sample_size=32, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    ).eval()
    pipe = build_pipeline(llm, cross_attention_dim=768, unet=unet)

    kv_rows = bench_kv_cache(pipe, args.repeats)
    overhead = bench_overhead(pipe, args.steps, args.repeats)

    lines = [
        "# GILLPipeline benchmarks",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads, CPU, fp32; median of {args.repeats} runs after a warm-up. "
        "Command: `python -m benchmarks.bench_pipeline`.",
        "",
        "## 1. Decoding: KV cache vs re-running the whole sequence per token (reference)",
        "",
        "Random-weight LM of OPT-125m shape (12 layers, width 768, vocab 50272), 32-token prompt, greedy, batch 1.",
        "",
        "| new tokens | KV cache (s) | full re-run (s) | speed-up |",
        "| --- | --- | --- | --- |",
    ]
    for n, cached, full in kv_rows:
        lines.append(f"| {n} | {cached:.3f} | {full:.3f} | {full / cached:.2f}x |")
    lines += [
        "",
        "## 2. Pipeline overhead vs denoising",
        "",
        f"Same UNet (SD-shaped, widths 64/128/256, 32x32 latents, {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M "
        f"params), {args.steps} steps, guidance 7.5, one image. GILL = LM decoding (12 tokens, OPT-125m shape) + "
        "mapper + glue + the same denoising; SD = stock StableDiffusionPipeline with prompt embeddings.",
        "",
        "| GILL call (s) | SD denoising alone (s) | overhead (GILL - SD) / SD |",
        "| --- | --- | --- |",
        f"| {overhead['gill']:.3f} | {overhead['sd']:.3f} | {overhead['overhead'] * 100:.1f}% |",
        "",
    ]
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"Wrote {RESULTS}")


if __name__ == "__main__":
    main()
