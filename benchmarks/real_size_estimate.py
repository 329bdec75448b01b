"""What a `bench_real_size` pairing will need, worked out from its configs before anything is written or loaded.

Every model is built on the `meta` device (no memory, no values); sizes follow from how each component is stored:

- bf16 weights: 2 bytes a value;
- torchao int8 weight-only (`Int8WeightOnlyConfig`): every `nn.Linear` weight becomes int8 values (1 byte) plus one
  fp32 scale per output row, its bias stays bf16; transformers leaves the LM's output embedding (`lm_head`) out, diffusers
  quantizes every `nn.Linear` of the denoiser (both checked on tiny models: `tests/test_benchmarks.py` compares this
  estimate with the bytes the tiny Flux pairing writes);
- the learned GILL parts: bf16 in the folder, fp32 plus gradients and two AdamW moments (16 bytes a value) while training.

Memory per stage distinguishes what the process owns (anonymous: quantized copies, activations, optimizer state) from
memory-mapped safetensors pages (bf16 weights used in place, or read once to quantize): mapped pages count in RSS
once touched, but the kernel drops them when memory runs short; owned memory it cannot drop.
"""

import inspect

import torch

from gill_pipeline.serialization.quantized_save import DEFAULT_MAX_SHARD_SIZE, max_shard_bytes

GiB = 2**30
# What a fresh Python with torch, transformers and diffusers imported holds, before any model (measured here: ~0.5 GiB).
INTERPRETER = 0.6 * GiB


def stored_bytes(model, quantized: bool, keep=()) -> int:
    """Bytes of `model`'s weights as saved: bf16, or torchao int8 weight-only for its `nn.Linear` layers (except the
    modules in `keep`)."""
    kept = {id(module) for module in keep}
    total, seen = 0, set()
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if id(param) in seen or name == "position_ids":
                continue
            seen.add(id(param))
            if quantized and isinstance(module, torch.nn.Linear) and name == "weight" and id(module) not in kept:
                total += param.numel() + 4 * param.shape[0]
            else:
                total += 2 * param.numel() if param.is_floating_point() else param.element_size() * param.numel()
    return total


def largest_tensor_bytes(model) -> int:
    return max(2 * p.numel() for p in model.parameters())


def learned_parts(pairing: dict, models: dict) -> int:
    """Values of GILL's learned parts at the library's reference sizes (or the tiny ones), built on `meta`."""
    from gill_pipeline.models.dims import lm_dims, vision_feature_dim
    from gill_pipeline.models.gill_model import GILLModel
    from gill_pipeline.testing import TINY_GILL_SIZES

    lm_input_dim, lm_hidden_dim, tied = lm_dims(models["llm"])
    if pairing["decoder"] == "flux":
        from diffusers import FluxPipeline

        # The T5 sequence FluxPipeline makes by default (`max_sequence_length`), and its width.
        length = inspect.signature(FluxPipeline.__call__).parameters["max_sequence_length"].default
        cond_dim = pairing["t5"]["d_model"]
    else:
        length, cond_dim = 77, pairing["unet"]["cross_attention_dim"]
    sizes = TINY_GILL_SIZES if pairing.get("learned") == "tiny" else {}
    with torch.device("meta"):
        gill = GILLModel(lm_input_dim=lm_input_dim, lm_hidden_dim=lm_hidden_dim, tie_img_embeddings=tied,
                         vision_dim=vision_feature_dim(models["image_encoder"]), cond_dim=cond_dim,
                         cond_length=length, **sizes)
    return sum(p.numel() for p in gill.parameters())


def estimate(pairing: dict, models: dict, shard_bytes: int) -> dict:
    """Disk and memory (bytes) per stage of `pairing`, from its base `models` built on `meta` (see `meta_models`)."""
    quantized = list(pairing.get("quantized", ("llm",)) if pairing["quantize"] != "none" else ())
    text = [name for name in models if name.startswith("text_encoder")]
    base = {name: stored_bytes(model, False) for name, model in models.items()}
    kept = {}
    for name, model in models.items():
        if name in text:
            continue
        keep = [model.get_output_embeddings()] if name == "llm" else []
        kept[name] = stored_bytes(model, name in quantized, keep)
    learned = learned_parts(pairing, models)
    kept["gill"] = 2 * learned
    quantized_bytes = sum(kept[name] for name in quantized)
    mapped = sum(value for name, value in kept.items() if name not in quantized and name != "gill")
    apart = [name for name in pairing.get("quantize_apart", ()) if name in quantized]
    here = [name for name in quantized if name not in apart]
    # What `from_base_models(..., quantization_config=...)` quantizes itself (the rest was quantized apart and saved).
    own_here = sum(kept[name] for name in here)
    read_here = sum(base[name] for name in here)
    largest_here = max((largest_tensor_bytes(models[name]) for name in here), default=0)
    gill_folder = sum(kept.values())
    # Disk along the run: the base models written; the decoder's text encoders deleted after the layout; (apart) each
    # quantized model saved beside its bf16 files, which are then deleted; the GILL folder written beside the base.
    on_disk = sum(base.values()) - sum(base[name] for name in text)
    peak = sum(base.values())
    for name in apart:
        peak = max(peak, on_disk + kept[name])
        on_disk += kept[name] - base[name]
    peak = max(peak, on_disk + gill_folder)
    disk = {"base": sum(base.values()), "text_encoders": sum(base[name] for name in text), "gill": gill_folder,
            "peak": peak}
    save_shard = max_shard_bytes(DEFAULT_MAX_SHARD_SIZE)  # `GILLPipeline.save_pretrained`'s shard of quantized parts
    activations = 0.5 * GiB  # one small image: the VAE decode at 256 px dominates (measured ~0.3 GiB)
    training = 16 * learned  # fp32 values, gradients and AdamW's two moments of the learned parts
    # Per stage, (own, total): own = the process's anonymous memory; total adds the memory-mapped safetensors pages
    # it touches, which count in RSS but which the kernel drops when memory runs short.
    memory = {
        # The shard being filled, the random block it copies from; +0.4 GiB measured beyond that (paper: 2.9 GiB).
        "write": (INTERPRETER + min(shard_bytes, max(base.values())) + 0.4 * GiB,) * 2,
        "layout": (INTERPRETER + activations, INTERPRETER + activations + sum(base[name] for name in text)),
        # Every quantized copy at once (anonymous until saved), the learned parts built in fp32, one bf16 tensor in
        # flight; mapped: the bf16 weights used in place and the bf16 pages the quantizer reads. Quantized apart, the
        # assembly maps the saved quantized files like the others, and one component's copy is held at a time.
        # Saving a model quantized in memory clones its quantized tensors (torchao's `flatten_tensor_state_dict`); the
        # pipeline's save does it one shard at a time (gill_pipeline.serialization.quantized_save): one shard's clones.
        "assemble": (INTERPRETER + 2 * kept["gill"] + own_here + min(own_here, save_shard) + largest_here,
                     INTERPRETER + 2 * kept["gill"] + quantized_bytes + min(own_here, save_shard) + largest_here
                     + read_here + mapped),
        # A saved folder loads memory-mapped, the int8 weights too (measured at a reduced size of this pairing: the
        # process's own memory stayed at the interpreter's plus the activations).
        "use": (INTERPRETER + activations, INTERPRETER + activations + gill_folder),
        # Quantized apart: one component's int8 copy, one bf16 tensor in flight, and (saved shard by shard,
        # gill_pipeline.serialization.quantized_save) one shard's clones.
        **{f"quantize {name}": (INTERPRETER + kept[name] + largest_tensor_bytes(models[name]) + shard_bytes // 2,
                                INTERPRETER + kept[name] + largest_tensor_bytes(models[name]) + shard_bytes // 2
                                + base[name])
           for name in apart},
        "train": (INTERPRETER + activations + training, INTERPRETER + activations + gill_folder + training),
    }
    order = ["write", "layout", *(f"quantize {name}" for name in apart), "assemble", "use", "train"]
    memory = {stage: memory[stage] for stage in order}
    return {"base": base, "kept": kept, "learned_values": learned, "disk": disk, "memory": memory}


def size(value: float) -> str:
    """Bytes as GB (2 decimals), or MB below 0.1 GB (tiny pairings)."""
    return f"{value / 1e9:.2f} GB" if value >= 1e8 else f"{value / 1e6:.2f} MB"


def describe(name: str, plan: dict) -> str:
    """The estimate as a few lines, printed before a pairing starts."""
    disk, memory = plan["disk"], plan["memory"]
    parts = ", ".join(f"{k} {size(v)}" for k, v in plan["kept"].items())
    text = f" (of which the decoder's text encoders {size(disk['text_encoders'])})" if disk["text_encoders"] else ""
    stages = [stage for stage in memory if stage != "layout" or disk["text_encoders"]]
    per_stage = "; ".join(f"{stage} {memory[stage][0] / GiB:.1f} / {memory[stage][1] / GiB:.1f}" for stage in stages)
    return "\n".join([
        f"[{name}] estimate from the configs: base models {size(disk['base'])}{text}, GILL folder "
        f"{size(disk['gill'])} ({parts}); disk needed at the peak {size(disk['peak'])}.",
        f"[{name}] memory per stage, own / with the mapped weights it touches, GiB: {per_stage}.",
    ])
