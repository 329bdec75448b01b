"""Per-GPU memory of GILL training with DDP vs FSDP2 over 2/4/8 GPUs, for OPT-6.7B, Llama-3-8B and Llama-3-70B.

    python -m benchmarks.bench_training_memory          # writes benchmarks/results/training_memory.md

Every parameter count comes from the published configs (`benchmarks/gpu/real_configs.py`) with the models built on
the `meta` device (no memory used): the LM, CLIP ViT-L/14's vision tower, GILL's learned module (`GILLModel` at the
paper's sizes for SD 1.5's 77x768 conditioning), and a rank-8 LoRA adapter on q_proj,v_proj counted from the LM's
own projection shapes. What each engine keeps per GPU (training/sharding.py):

- frozen weights (LM + vision encoder, bf16, 2 bytes/value). DDP: all of them. FSDP2: 1/N of the decoder layers,
  plus the root unit (embeddings, LM head, final norm, vision encoder) sharded AND whole while a step runs (FSDP2
  keeps the root gathered from its forward to its backward), plus two decoder layers gathered at once (the one that
  computes and the one prefetched);
- learned parts (fp32 weights + gradients + AdamW's two moments: 16 bytes/value), whole on every GPU in both;
- LoRA adapter (16 bytes/value), whole with DDP, 1/N with FSDP (it lives in the sharded layers);
- activations for one micro-batch: see `activation_bytes`; the same for both engines (each GPU runs its own batch).

Not counted: the CUDA context and allocator slack (~1-3 GB per GPU), communication buffers (FSDP: ~one layer), the
SD text encoder (targets precomputed, as the paper recipe does) and the data loader. Not measured on a device: no
accelerator was lent to the session that wrote this (docs/training.md says how to measure one).
"""

import argparse
import contextlib
import os

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from benchmarks.gpu.real_configs import CLIP_VIT_L_14, LLAMA_3_8B, LLAMA_3_70B, OPT_6_7B
from gill_pipeline.models import GILLModel

RESULTS = os.path.join(os.path.dirname(__file__), "results", "training_memory.md")
GIB = 1024**3
BF16, FP32, ADAM_FP32 = 2, 4, 16  # bytes per value; ADAM_FP32: weight + gradient + two moments
GPUS = (2, 4, 8)

# The workload the activations are estimated for (the paper's caption lengths; a micro-batch that fits).
MICRO_BATCH = 8
CAPTION_TOKENS = 32  # captions of at most 32 tokens including the 8 [IMG] tokens
VISUAL_TOKENS = 4  # the captioning row: [4 visual-prefix embeddings][BOS caption]
LORA_RANK = 8
LORA_TARGETS = ("q_proj", "v_proj")
SD15_COND = dict(cond_dim=768, cond_length=77)

LMS = {
    "OPT-6.7B": (OPTConfig, OPTForCausalLM, OPT_6_7B),
    "Llama-3-8B": (LlamaConfig, LlamaForCausalLM, LLAMA_3_8B),
    "Llama-3-70B": (LlamaConfig, LlamaForCausalLM, LLAMA_3_70B),
}


@contextlib.contextmanager
def meta_device():
    with torch.device("meta"):
        yield


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def decoder_layers(lm):
    return lm.model.decoder.layers if hasattr(lm.model, "decoder") else lm.model.layers


def lm_counts(name: str) -> dict:
    config_class, model_class, values = LMS[name]
    config = config_class(**values)
    with meta_device():
        lm = model_class(config)
    layers = decoder_layers(lm)
    layer = numel(layers[0])
    total = numel(lm)  # tied embeddings are counted once
    lora = 0
    for module_name, module in layers[0].named_modules():
        if module_name.split(".")[-1] in LORA_TARGETS:
            lora += LORA_RANK * (module.in_features + module.out_features)
    return {
        "config": config,
        "total": total,
        "layers": layer * len(layers),
        "layer": layer,
        "root": total - layer * len(layers),  # embeddings, LM head, final norm (and OPT's positions)
        "lora": lora * len(layers),
        "hidden": config.hidden_size,
        "ffn": getattr(config, "ffn_dim", None) or config.intermediate_size,
        "kv": config.hidden_size * getattr(config, "num_key_value_heads", config.num_attention_heads)
        // config.num_attention_heads,
        "num_layers": len(layers),
        "vocab": config.vocab_size,
        "llama": config_class is LlamaConfig,
    }


def vision_count() -> int:
    with meta_device():
        return numel(CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_L_14)))


def learned_counts(hidden: int) -> tuple[int, int]:
    """GILL's learned module at the paper's sizes: (trained values, decision head values, frozen here)."""
    with meta_device():
        gill = GILLModel(lm_input_dim=hidden, lm_hidden_dim=hidden, vision_dim=CLIP_VIT_L_14["hidden_size"], **SD15_COND)
    head = numel(gill.decision_head)
    return numel(gill) - head, head


def per_token_layer_values(lm: dict) -> int:
    """Values one decoder layer stores for the backward pass, per token (16-bit), with SDPA/flash attention (no
    sequence x sequence score matrix kept). Counted from the tensors autograd saves:

    - Llama (RMSNorm, SwiGLU): the two norms' inputs and outputs (4h), q, k, v (h + 2 kv), the attention output (h),
      gate, up, silu(gate) and the product fed to down_proj (4 ffn);
    - OPT (LayerNorm, ReLU MLP): the two norms' inputs and outputs (4h), q, k, v (3h), the attention output (h),
      fc1's output and its activation (2 ffn).
    Gradients flow through the frozen LM (to the [IMG] rows and the visual prefix), so all of it is kept unless
    `gradient_checkpointing` recomputes it.
    """
    h, ffn, kv = lm["hidden"], lm["ffn"], lm["kv"]
    if lm["llama"]:
        return 4 * h + h + 2 * kv + h + 4 * ffn
    return 4 * h + 3 * h + h + 2 * ffn


def activation_bytes(lm: dict, checkpointing: bool, batch: int = MICRO_BATCH) -> int:
    """One micro-batch's activations: two LM forwards per step (the captioning row, `VISUAL_TOKENS + CAPTION_TOKENS`
    tokens, and the [IMG] row, `CAPTION_TOKENS`), each layer's saved tensors (`per_token_layer_values`, bf16) or, with
    gradient checkpointing, each layer's input plus one layer recomputed at a time; plus the fp32 logits over the
    vocabulary and their gradient (cross-entropy on every caption token)."""
    tokens = batch * ((VISUAL_TOKENS + CAPTION_TOKENS) + CAPTION_TOKENS)
    per_layer = per_token_layer_values(lm) * BF16
    if checkpointing:
        layers = tokens * (lm["num_layers"] * lm["hidden"] * BF16 + per_layer)
    else:
        layers = tokens * lm["num_layers"] * per_layer
    logits = tokens * lm["vocab"] * FP32 * 2
    return layers + logits


def rows_for(name: str, vision: int) -> list[dict]:
    lm = lm_counts(name)
    learned, head = learned_counts(lm["hidden"])
    learned_bytes = learned * ADAM_FP32 + head * FP32
    act = {ckpt: activation_bytes(lm, ckpt) for ckpt in (False, True)}
    rows = []
    for engine, gpus in [("DDP", 1), *[("FSDP2", n) for n in GPUS]]:
        if engine == "DDP":
            frozen = (lm["total"] + vision) * BF16
            lora = lm["lora"] * ADAM_FP32
        else:
            root = lm["root"] + vision
            frozen = (lm["layers"] * BF16) / gpus + root * BF16 * (1 + 1 / gpus) + 2 * lm["layer"] * BF16
            lora = lm["lora"] * ADAM_FP32 / gpus
        rows.append({
            "lm": name, "engine": engine, "gpus": "any" if engine == "DDP" else gpus, "frozen": frozen,
            "learned": learned_bytes, "lora": lora, "act": act[False], "act_ckpt": act[True],
            "total": frozen + learned_bytes + lora + act[False], "total_ckpt": frozen + learned_bytes + lora + act[True],
        })
    return rows, lm, learned


def gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| LM | engine | GPUs | frozen LM + CLIP (bf16) | learned + AdamW (fp32) | LoRA r8 + AdamW | activations "
        "(ckpt off / on) | total, GiB (ckpt off / on) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['lm']} | {r['engine']} | {r['gpus']} | {gib(r['frozen'])} | {gib(r['learned'])} | {gib(r['lora'])} | "
            f"{gib(r['act'])} / {gib(r['act_ckpt'])} | **{gib(r['total'])}** / **{gib(r['total_ckpt'])}** |"
        )
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    vision = vision_count()
    rows, counts = [], []
    for name in LMS:
        lm_rows, lm, learned = rows_for(name, vision)
        rows += lm_rows
        counts.append(
            f"| {name} | {lm['total'] / 1e9:.2f}B | {lm['num_layers']} x {lm['layer'] / 1e6:.0f}M | "
            f"{lm['root'] / 1e6:.0f}M | {learned / 1e6:.1f}M | {lm['lora'] / 1e6:.1f}M |"
        )
    report = "\n".join([
        "# GILL training memory per GPU: DDP vs FSDP2 (computed)",
        "",
        "`python -m benchmarks.bench_training_memory`. Parameter counts from the published configs, models built on",
        "the meta device; the formulas are in the script's docstring. CLIP ViT-L/14 vision tower: "
        f"{vision / 1e6:.0f}M values (frozen, bf16). SD 1.5 conditioning (77x768); targets precomputed.",
        f"Activations: micro-batch {MICRO_BATCH} per GPU, captions of {CAPTION_TOKENS} tokens (the [IMG] row) and",
        f"{VISUAL_TOKENS}+{CAPTION_TOKENS} (the captioning row), SDPA/flash attention, fp32 logits and their gradient;",
        "'ckpt on' is `gradient_checkpointing: true`. Activations scale linearly with the micro-batch.",
        "Not counted: CUDA context and allocator slack (~1-3 GiB), FSDP's communication buffers (~one layer).",
        "Computed only: no accelerator was lent to the session that wrote this, so nothing here is measured on a GPU.",
        "",
        "| LM | values | decoder layers | outside the layers (root unit) | learned parts | LoRA r8 q,v |",
        "|---|---|---|---|---|---|",
        *counts,
        "",
        table(rows),
        "",
    ])
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(report)
    print(report)
    return report


if __name__ == "__main__":
    main()
