"""Offloading, measured: what each mode costs on the bundled model, and an LM larger than the memory it is allowed
answering through disk offload.

    python -m benchmarks.bench_disk_offload                      # Llama-2-13B-shaped LM, max_memory cpu 12GiB
    python -m benchmarks.bench_disk_offload --shape llama-2-7b --max-memory 4GiB
    python -m benchmarks.bench_disk_offload --shape tiny          # a smoke run (seconds)

Part 1, the modes: the bundled shapes-world pipeline (real weights) answers the README's example (text + one
generated image, 4 steps) without offload and under each offload mode, side by side in one process; the ratio is the
mode's time over no offload's (CPU, `device="cpu"`: the hooks run, the copies they would make to an accelerator do
not).

Part 2, disk offload: an LM built from a published config (random values; nothing downloaded) is written as
safetensors shards from a `meta` model, one shard in memory at a time (one random block copied at shifting offsets), then loaded in a fresh
process with accelerate's big-model inference (`device_map="auto"`, `max_memory={"cpu": ...}`, `offload_folder`)
and passed as GILL's LM to `GILLPipeline.from_base_models` with a tiny vision encoder and a tiny Stable Diffusion
decoder (the LM is what does not fit; the answer is text only). Reported: time to load, seconds per new token
(decode of 4 tokens minus decode of 1, over 3), peak RSS, bytes on disk. The multi-GB files are deleted afterwards.
Results go to `benchmarks/results/real_size.md` under "Section 3: disk offload".
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "real_size.md")
SECTION = "## Section 3: disk offload"

# meta-llama/Llama-2-13b-hf and meta-llama/Llama-2-7b-hf config.json (architecture numbers only).
SHAPES = {
    "llama-2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
                        rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False),
}
SHARD_BYTES = 2 * 1024**3
CHUNK_VALUES = 16 * 1024**2


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


# ----------------------------------------------------------------------------------------------------------------------
# Part 1: the modes on the bundled model
# ----------------------------------------------------------------------------------------------------------------------
def bench_modes(repeats: int) -> list[tuple[str, float, float, bool]]:
    from PIL import Image

    from gill_pipeline.bundled import BUNDLED_EXAMPLE_IMAGE, load_bundled_pipeline

    with Image.open(BUNDLED_EXAMPLE_IMAGE) as image:
        prompt = [image.convert("RGB")]
    call = dict(max_new_tokens=8, min_text_tokens=0, img_logit_scale=2.0, max_images=1, image_mode="generate",
                num_inference_steps=4, output_type="pt")

    def run(pipe):
        return pipe(prompt, generator=torch.Generator().manual_seed(0), **call)

    def timed(pipe):
        run(pipe)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = run(pipe)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2], out

    offload_dir = tempfile.mkdtemp(prefix="gill_group_offload_")
    modes = {
        "none": lambda p: None,
        "enable_model_cpu_offload": lambda p: p.enable_model_cpu_offload(device="cpu"),
        "enable_sequential_cpu_offload": lambda p: p.enable_sequential_cpu_offload(device="cpu"),
        "enable_group_offload (leaf_level)": lambda p: p.enable_group_offload("cpu", offload_type="leaf_level"),
        "enable_group_offload (block_level, to disk)": lambda p: p.enable_group_offload(
            "cpu", offload_type="block_level", num_blocks_per_group=1, offload_to_disk_path=offload_dir
        ),
    }
    rows, reference = [], None
    try:
        for name, enable in modes.items():
            pipe = load_bundled_pipeline(with_index=False)
            pipe.set_progress_bar_config(disable=True)
            enable(pipe)
            seconds, out = timed(pipe)
            if reference is None:
                reference = (seconds, out)
            same = out.texts == reference[1].texts and all(
                torch.allclose(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=1e-4)
                for a, b in zip(out.images, reference[1].images)
            )
            rows.append((name, seconds, seconds / reference[0], same))
            print(f"{name}: {seconds:.3f} s ({seconds / reference[0]:.2f}x), same answer: {same}", flush=True)
    finally:
        shutil.rmtree(offload_dir, ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Part 2: an LM larger than its memory budget, from disk
# ----------------------------------------------------------------------------------------------------------------------
def write_random_lm(shape: str, folder: str, dtype=torch.bfloat16) -> int:
    """Writes a random LM of `shape` as safetensors shards without ever holding more than one shard in memory."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], dtype=dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    config.save_pretrained(folder)
    # One random block, copied at a shifting offset: the values only need to be non-trivial (the timing does not
    # depend on them) and drawing 13e9 normal values would cost minutes of CPU.
    generator = torch.Generator().manual_seed(0)
    block = torch.randn(2 * CHUNK_VALUES, generator=generator).mul_(0.02).to(dtype)
    weight_map, shard, shard_bytes, shards = {}, {}, 0, 0
    total = 0

    def flush():
        nonlocal shard, shard_bytes, shards
        if not shard:
            return
        name = f"model-{shards + 1:05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        shard, shard_bytes, shards = {}, 0, shards + 1

    for key, meta in model.state_dict().items():
        tensor = torch.empty(meta.shape, dtype=dtype)
        flat = tensor.view(-1)
        if key.endswith("norm.weight"):
            flat.fill_(1.0)
        else:
            for i, start in enumerate(range(0, flat.numel(), CHUNK_VALUES)):
                stop = min(start + CHUNK_VALUES, flat.numel())
                shift = (i * 7919) % CHUNK_VALUES
                flat[start:stop] = block[shift : shift + stop - start]
        nbytes = tensor.numel() * tensor.element_size()
        if shard_bytes + nbytes > SHARD_BYTES:
            flush()
        shard[key] = tensor
        shard_bytes += nbytes
        total += nbytes
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return total


def answer_from_disk(folder: str, max_memory: str, offload_folder: str) -> dict:
    """In this (fresh) process: load the LM with big-model inference, assemble GILL around it, answer."""
    from transformers import AutoModelForCausalLM

    from gill_pipeline.pipeline import GILLPipeline
    from gill_pipeline.testing.tiny import build_tiny_stable_diffusion, build_tiny_tokenizer, build_tiny_vision_encoder

    start = time.perf_counter()
    llm = AutoModelForCausalLM.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": max_memory}, offload_folder=offload_folder, dtype=torch.bfloat16
    )
    load_s = time.perf_counter() - start
    placements = {}
    for device in llm.hf_device_map.values():
        placements[str(device)] = placements.get(str(device), 0) + 1
    torch.manual_seed(0)
    image_encoder, processor = build_tiny_vision_encoder()
    pipe = GILLPipeline.from_base_models(
        language_model=llm,
        tokenizer=build_tiny_tokenizer(),
        stable_diffusion=build_tiny_stable_diffusion(32, "ddim"),
        image_encoder=image_encoder,
        feature_extractor=processor,
    )
    pipe.set_progress_bar_config(disable=True)
    assemble_s = time.perf_counter() - start - load_s

    def timed(new_tokens):
        begin = time.perf_counter()
        out = pipe(["A photo of a dog."], max_new_tokens=new_tokens, min_text_tokens=new_tokens, max_images=0)
        return time.perf_counter() - begin, out

    one_s, _ = timed(1)
    four_s, out = timed(4)
    return dict(
        load_s=load_s, assemble_s=assemble_s, one_token_s=one_s, four_tokens_s=four_s,
        per_token_s=(four_s - one_s) / 3, text=out.texts[0], placements=placements,
        offload_bytes=folder_bytes(offload_folder), peak_rss_gib=peak_rss_gib(),
    )


def write_results(shape, max_memory, weights_bytes, build_s, build_rss, disk, modes, free_before):
    lines = [
        SECTION,
        "",
        "Machine: 2 CPU cores (shared with other jobs), 24 GiB of memory, no GPU; torch "
        f"{torch.__version__}. Command: `python -m benchmarks.bench_disk_offload --shape {shape} --max-memory "
        f"{max_memory}`.",
        "",
        "### What each offload mode costs (bundled shapes-world model, real weights)",
        "",
        "The README's example image in, 8 new tokens, one generated image (4 steps), `device=\"cpu\"`; median of the "
        "timed runs after a warm-up, in one process. `same answer`: the same tokens and the same image (within 1e-4) "
        "as without offload.",
        "",
        "| mode | seconds per answer | vs no offload | same answer |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {s:.3f} | {ratio:.2f}x | {'yes' if same else 'NO'} |" for name, s, ratio, same in modes]
    cpu_gib = float(max_memory.lower().replace("gib", ""))
    lines += [
        "",
        f"### An LM larger than its memory budget, answering from disk ({shape}-shaped, bf16, random weights)",
        "",
        f"Architecture from the published `config.json` (`SHAPES['{shape}']` in the script); GILL around it: a tiny "
        "CLIP vision encoder and a tiny Stable Diffusion decoder (not measured: the answer is text only). Free disk "
        f"before: {free_before / 1e9:.0f} GB.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| LM weights (bf16 safetensors) | {weights_bytes / 1e9:.2f} GB ({weights_bytes / 1024**3:.2f} GiB) |",
        f"| `max_memory` for the CPU | {max_memory} ({weights_bytes / 1024**3 / cpu_gib:.2f}x smaller than the weights) |",
        f"| writing the shards from a `meta` model | {build_s:.0f} s, peak RSS {build_rss:.2f} GiB |",
        f"| modules placed (hf_device_map) | {disk['placements']} |",
        f"| `from_pretrained(device_map='auto', max_memory=..., offload_folder=...)` | {disk['load_s']:.1f} s |",
        f"| `GILLPipeline.from_base_models` around it | {disk['assemble_s']:.1f} s |",
        f"| answer, 1 new token (prefill + 1) | {disk['one_token_s']:.1f} s |",
        f"| answer, 4 new tokens | {disk['four_tokens_s']:.1f} s |",
        f"| **seconds per new token** | **{disk['per_token_s']:.1f} s** |",
        f"| peak RSS of the answering process | {disk['peak_rss_gib']:.2f} GiB |",
        f"| bytes written to `offload_folder` | {disk['offload_bytes'] / 1e9:.2f} GB |",
        "",
        "accelerate reads the disk-offloaded layers from the checkpoint's own safetensors files when it can (memory "
        "mapped), so `offload_folder` holds little or nothing; those layers are read again on every forward, which is "
        "what a token costs. The shards and the offload folder were deleted after the run.",
        "",
    ]
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Real sizes within real memory\n\n"
    if SECTION in text:
        # Replace our own section only (up to the next "## " heading): other sections belong to other benchmarks.
        start = text.index(SECTION)
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + "\n".join(lines) + ("" if end < 0 else text[end:])
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        f.write(text)
    print(f"wrote {RESULTS}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-2-13b", choices=sorted(SHAPES))
    parser.add_argument("--max-memory", default="12GiB", help="accelerate's max_memory for the CPU, e.g. 12GiB")
    parser.add_argument("--workdir", default=None, help="where the shards go (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave real_size.md alone")
    parser.add_argument("--skip-modes", action="store_true", help="part 2 only (implies --no-write)")
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "MAX_MEMORY", "OFFLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(answer_from_disk(*args.child)), flush=True)
        return

    modes = [] if args.skip_modes else bench_modes(args.repeats)
    workdir = tempfile.mkdtemp(prefix="gill_disk_offload_", dir=args.workdir)
    try:
        free_before = shutil.disk_usage(workdir).free
        folder, offload = os.path.join(workdir, "llm"), os.path.join(workdir, "offload")
        os.makedirs(folder)
        start = time.perf_counter()
        weights_bytes = write_random_lm(args.shape, folder)
        build_s, build_rss = time.perf_counter() - start, peak_rss_gib()
        print(f"wrote {weights_bytes / 1e9:.2f} GB in {build_s:.0f} s (peak RSS {build_rss:.2f} GiB)", flush=True)
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_disk_offload", "--child", folder, args.max_memory, offload],
            capture_output=True, text=True,
        )
        result = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode != 0 or not result:
            raise RuntimeError(f"the answering process failed:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
        disk = json.loads(result[0][len("RESULT "):])
        print(json.dumps(disk, indent=1), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if not args.no_write and not args.skip_modes:
        write_results(args.shape, args.max_memory, weights_bytes, build_s, build_rss, disk, modes, free_before)


if __name__ == "__main__":
    main()
