"""Training-step throughput and peak memory: one LM pass for the [IMG] objectives (ours) vs the reference's two.

Both variants run the SAME training forward (training/model_forward.py) on the same random-weight models and batch;
`separate_img_passes=True` runs the [IMG]-sequence LM pass twice (the reference's "retrieval" and "generation"
modes), as kohjingyu/gill does. Each variant runs in its own fresh process, one after the other, in one invocation:

    python -m benchmarks.bench_training            # writes benchmarks/results/training.md

Peak memory: on CUDA `torch.cuda.max_memory_allocated` over the timed steps; on CPU the growth of the process's peak
resident set (ru_maxrss) from just before the first step to the end (frozen weights excluded, activations included).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small OPT-shaped setting that runs on a laptop CPU in seconds per step.
SMALL = dict(hidden=256, ffn=1024, layers=4, heads=4, vocab=8000, vision=256, cond=256, cond_length=77, batch=16,
             caption_tokens=24, img_tokens=8, mapper=256, mapper_layers=2)
# The paper's shapes (OPT-6.7B, CLIP ViT-L/14 features, SD v1.5 conditioning), random weights, bf16: GPU only.
PAPER = dict(hidden=4096, ffn=16384, layers=32, heads=32, vocab=50272, vision=1024, cond=768, cond_length=77, batch=32,
             caption_tokens=24, img_tokens=8, mapper=512, mapper_layers=4)


def build(setting, device, dtype):
    from transformers import OPTConfig, OPTForCausalLM

    from gill_pipeline import GILLModel
    from training.model_forward import GILLTrainingModel

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=setting["vocab"], hidden_size=setting["hidden"], word_embed_proj_dim=setting["hidden"],
        ffn_dim=setting["ffn"], num_hidden_layers=setting["layers"], num_attention_heads=setting["heads"],
        max_position_embeddings=128, dropout=0.0,
    )
    llm = OPTForCausalLM(config).to(device, dtype).eval().requires_grad_(False)
    gill = GILLModel(
        lm_input_dim=setting["hidden"], lm_hidden_dim=setting["hidden"], vision_dim=setting["vision"],
        cond_dim=setting["cond"], cond_length=setting["cond_length"], num_img_tokens=setting["img_tokens"],
        mapper_hidden_dim=setting["mapper"], mapper_encoder_layers=setting["mapper_layers"],
        mapper_decoder_layers=setting["mapper_layers"],
    ).to(device)
    gill.decision_head.requires_grad_(False)
    img_ids = list(range(setting["vocab"], setting["vocab"] + setting["img_tokens"]))
    model = GILLTrainingModel(llm, gill, None, img_ids, pad_token_id=1, bos_token_id=2)
    generator = torch.Generator().manual_seed(0)
    n, t = setting["batch"], setting["caption_tokens"]
    lengths = torch.randint(t // 2, t + 1, (n,), generator=generator)
    ids = torch.randint(4, setting["vocab"], (n, t), generator=generator)
    ids[:, 0] = 2  # BOS
    batch = {
        "caption_ids": ids.to(device), "caption_lengths": lengths.to(device),
        "image_features": torch.randn(n, setting["vision"], generator=generator).to(device),
        "targets": torch.randn(n, setting["cond_length"], setting["cond"], generator=generator).to(device),
    }
    params = [p for p in gill.parameters() if p.requires_grad]
    return model, batch, torch.optim.AdamW(params, lr=1e-4)


def child(variant, setting_name, steps, warmup):
    from training.model_forward import total_loss
    from training.params import LossArgs

    setting = SMALL if setting_name == "small" else PAPER
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if setting_name == "paper" else torch.float32
    model, batch, optimizer = build(setting, device, dtype)
    separate = variant == "reference"
    losses = LossArgs()

    def step(concat):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = model(batch, concat_caption=concat, concat_img=concat, separate_img_passes=separate)
            loss = total_loss(out, losses)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for i in range(warmup):
        step(concat=i % 2 == 1)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(concat=i % 2 == 1)  # half the steps with two-example concatenation, as in training
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    print(json.dumps({"variant": variant, "samples_per_s": steps * setting["batch"] / elapsed,
                      "s_per_step": elapsed / steps, "peak_mb": peak_mb, "device": device}))


def run_child(variant, setting, steps, warmup):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_training", "--child", variant, "--setting", setting, "--steps", str(steps), "--warmup", str(warmup)],
        capture_output=True, text=True, env=env, check=True, cwd=REPO,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", default="small", choices=("small", "paper"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="Alternating runs per variant; the best is reported.")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "training.md"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.setting, args.steps, args.warmup)

    results = {"ours": [], "reference": []}
    for _ in range(args.repeats):  # alternate, so that load from other processes hits both alike
        for variant in ("ours", "reference"):
            results[variant].append(run_child(variant, args.setting, args.steps, args.warmup))
    best = {v: max(r, key=lambda x: x["samples_per_s"]) for v, r in results.items()}
    peak = {v: min(x["peak_mb"] for x in r) for v, r in results.items()}
    setting = SMALL if args.setting == "small" else PAPER
    device = best["ours"]["device"]
    hardware = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')})"
    ratio = best["ours"]["samples_per_s"] / best["reference"]["samples_per_s"]
    lines = [
        "# Training step: one LM pass for the [IMG] objectives vs the reference's two",
        "",
        f"Command: `python -m benchmarks.bench_training --setting {args.setting} --steps {args.steps} --warmup {args.warmup} "
        f"--repeats {args.repeats}`  ",
        f"Device: {hardware}. Random weights, {'bf16' if args.setting == 'paper' else 'fp32'}.  ",
        f"Setting: OPT-shaped LM (width {setting['hidden']}, {setting['layers']} layers, vocab {setting['vocab']}), "
        f"vision features {setting['vision']}, conditioning {setting['cond_length']}x{setting['cond']}, mapper "
        f"{setting['mapper']} ({setting['mapper_layers']}+{setting['mapper_layers']} layers), batch {setting['batch']}, captions up to {setting['caption_tokens']} tokens + "
        f"{setting['img_tokens']} [IMG]; half the steps with two-example concatenation; image features and SD targets "
        "precomputed (as with precompute.py). One step = forward of all four losses + backward + AdamW.",
        "",
        "| variant | LM passes per step | samples/s | s/step | peak memory of the step (MiB) |",
        "|---|---|---|---|---|",
        f"| ours (one [IMG] pass) | 2 | {best['ours']['samples_per_s']:.1f} | {best['ours']['s_per_step']:.3f} | {peak['ours']:.0f} |",
        f"| reference (separate ret/gen passes) | 3 | {best['reference']['samples_per_s']:.1f} | "
        f"{best['reference']['s_per_step']:.3f} | {peak['reference']:.0f} |",
        "",
        f"**Throughput ratio ours / reference: {ratio:.2f}x**; peak memory ratio "
        f"{peak['ours'] / max(peak['reference'], 1e-9):.2f}.",
        "",
        "Best of the alternating repeats for throughput, lowest for memory. "
        + ("Peak memory is `torch.cuda.max_memory_allocated` above the loaded weights."
           if device == "cuda" else
           "CPU peak memory is the growth of the process's peak RSS during the steps (an estimate: the allocator may "
           "reuse freed pages), measured in a fresh process per run. The machine was shared with other jobs, so "
           "absolute numbers are noisy; the ratio is the figure to read."),
        "",
        "Raw runs: `" + json.dumps(results) + "`",
    ]
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
