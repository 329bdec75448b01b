"""What each quantization of the LM costs on this CPU, measured side by side in one run.

    python -m benchmarks.bench_quantization [--shape opt-6.7b|opt-2.7b|opt-1.3b] [--tokens 8] [--scenes 48]

(a) An OPT LM of the given published shape (random weights: built on `meta`, filled chunk by chunk, saved once in
    bf16, deleted afterwards) is loaded in a FRESH process per dtype (bf16, fp16, torchao int8 weight-only, int4 as
    torchao runs it on CPU, int8 dynamic): resident memory after loading and after decoding (anonymous and file-mapped
    pages apart: mapped safetensors pages are counted by RSS but belong to the page cache), decode ms/token, against
    the dtype's weight-streaming bound (bytes of the LM's weights / the GEMV bandwidth of a Linear of the LM's width
    in that dtype, measured in the same run).
(b) The bundled shapes world (real weights, real answers): captioning exact accuracy (the text GILL writes about an
    input image) and generation exact accuracy (GILL's image judged by the world's classifier) for fp32 and int8.

Writes "Section 2: quantization" of benchmarks/results/real_size.md (the other sections are left as they are).
"""

import argparse
import gc
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.results_file import replace_section

RESULTS = os.path.join(os.path.dirname(__file__), "results", "real_size.md")
HEADING = "## Section 2: quantization"
SHAPES = {
    "opt-6.7b": dict(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32),
    "opt-2.7b": dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32),
    "opt-1.3b": dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32),
}
KINDS = ("bf16", "fp16", "int8", "int4", "int8-dynamic")


def memory() -> dict:
    """Resident memory of this process in GiB: anonymous (our own copies) and file-mapped (safetensors pages)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 2**20
    return {"rss": fields["VmRSS"], "anon": fields["RssAnon"], "file": fields["RssFile"]}


def build_and_save(shape: str, folder: str) -> int:
    """An OPT of `shape` with random bf16 weights saved to `folder` without ever holding two copies; returns bytes."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=SHAPES[shape]["hidden_size"],
                       dropout=0.0, attention_dropout=0.0, **SHAPES[shape])
    with torch.device("meta"):
        model = OPTForCausalLM(config).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            data = torch.empty(param.shape, dtype=torch.bfloat16)
            flat = data.view(-1)
            for start in range(0, flat.numel(), 1 << 24):  # chunks of 16M values
                chunk = flat[start:start + (1 << 24)]
                chunk.copy_(torch.randn(chunk.shape, generator=generator) * 0.02)
            setattr(module, name, torch.nn.Parameter(data, requires_grad=False))
    model.tie_weights()
    model.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def gemv_bandwidth(width: int, dtype: torch.dtype, repeats: int = 20) -> float:
    """GB/s of weights streamed by a Linear(width, 4*width) on one row, in `dtype`."""
    layer = torch.nn.Linear(width, 4 * width, bias=False).to(dtype)
    x = torch.randn(1, width, dtype=dtype)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
        start = time.perf_counter()
        for _ in range(repeats):
            layer(x)
        seconds = (time.perf_counter() - start) / repeats
    return layer.weight.numel() * layer.weight.element_size() / seconds / 1e9


def quantized_gemv_bandwidth(width: int, kind: str) -> float:
    """GB/s of stored weights through a torchao-quantized Linear of the LM's width (bytes as stored)."""
    from torchao.quantization import quantize_

    from gill_pipeline.serialization.quantization import _torchao_weight_config

    layer = torch.nn.Linear(width, 4 * width, bias=False).to(torch.bfloat16)
    quantize_(layer, _torchao_weight_config(kind, "cpu", 32))
    stored = sum(t.numel() * t.element_size() for t in _inner_tensors(layer.weight))
    x = torch.randn(1, width, dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
        start = time.perf_counter()
        for _ in range(10):
            layer(x)
        seconds = (time.perf_counter() - start) / 10
    return stored / seconds / 1e9


def _inner_tensors(weight):
    if hasattr(weight, "__tensor_flatten__"):
        names, _ = weight.__tensor_flatten__()
        return [getattr(weight, name) for name in names]
    return [weight]


def measure_one(folder: str, kind: str, tokens: int) -> dict:
    """Runs in a fresh process: load `folder` as `kind`, decode `tokens` tokens twice (the second timed)."""
    from transformers import AutoModelForCausalLM, TorchAoConfig

    from gill_pipeline.serialization.quantization import _torchao_weight_config

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    before = memory()
    start = time.perf_counter()
    if kind in ("bf16", "fp16"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if kind == "bf16" else torch.float16)
    else:
        config = TorchAoConfig(_torchao_weight_config(kind, "cpu", 32))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=config)
    load_s = time.perf_counter() - start
    gc.collect()
    loaded = memory()
    weight_bytes = sum(sum(t.numel() * t.element_size() for t in _inner_tensors(p)) for p in model.parameters())
    ids = torch.tensor([[2, 100, 200, 300]])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        per_token = (time.perf_counter() - start) / tokens
    after = memory()
    return {"kind": kind, "load_s": load_s, "weight_bytes": weight_bytes, "before": before, "loaded": loaded,
            "after": after, "ms_per_token": per_token * 1000}


def section_a(shape: str, tokens: int, workdir: str) -> dict:
    folder = os.path.join(workdir, shape)
    start = time.perf_counter()
    saved_bytes = build_and_save(shape, folder)
    gc.collect()
    build_s = time.perf_counter() - start
    width = SHAPES[shape]["hidden_size"]
    bandwidth = {"bf16": gemv_bandwidth(width, torch.bfloat16), "fp16": gemv_bandwidth(width, torch.float16)}
    for kind in ("int8", "int4", "int8-dynamic"):
        try:
            bandwidth[kind] = quantized_gemv_bandwidth(width, kind)
        except Exception as error:  # noqa: BLE001 - a backend that does not run here is reported, not fatal
            bandwidth[kind] = f"fails: {error}"
    rows = []
    for kind in KINDS:
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_quantization", "--measure-one", folder, kind, str(tokens)],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            rows.append({"kind": kind, "error": result.stderr.strip().splitlines()[-1][:200]})
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    shutil.rmtree(folder)
    return {"shape": shape, "saved_bytes": saved_bytes, "build_s": build_s, "bandwidth": bandwidth, "rows": rows}


def section_b(scenes_count: int, seed: int = 0) -> dict:
    """Captioning and generation exact accuracy on the bundled shapes world, fp32 vs int8 LM."""
    from gill_pipeline import GILLPipeline
    from gill_pipeline.bundled import BUNDLED_PIPELINE, BUNDLED_ROOT
    from gill_pipeline.serialization.quantization import quantization_preset
    from training.shapes.classifier import AttributeClassifier
    from training.shapes.evaluate_world import accuracy, captioning, gill_images, judge
    from training.shapes.world import all_scenes

    classifier = AttributeClassifier.from_pretrained(os.path.join(BUNDLED_ROOT, "shapes_classifier")).eval()
    scenes = all_scenes()
    scenes = random.Random(seed).sample(scenes, min(scenes_count, len(scenes)))
    out = {}
    for label, quantize in (("fp32", "none"), ("int8", "int8")):
        pipe = GILLPipeline.from_pretrained(
            BUNDLED_PIPELINE, dtype=torch.float32, quantization_config=quantization_preset(quantize)
        )
        pipe.set_progress_bar_config(disable=True)
        start = time.perf_counter()
        caption = captioning(pipe, scenes, seed)
        made = gill_images(pipe, [[s.caption()] for s in scenes], seed)
        generation = accuracy(judge(classifier, torch.stack([m.image for m in made])), scenes)
        out[label] = {"captioning": caption, "generation": generation, "seconds": time.perf_counter() - start}
    return {"n": len(scenes), **out}


def markdown(report: dict) -> str:
    a, b = report["a"], report["b"]
    lines = [HEADING, "", f"One run of `python -m benchmarks.bench_quantization --shape {a['shape']}` on "
             f"{report['machine']}.", ""]
    lines += [f"### (a) The LM at {a['shape']} shape (random weights, {a['saved_bytes'] / 1e9:.2f} GB in bf16), "
              f"decode of {report['tokens']} tokens after a warm-up", "",
              "| LM weights | weights in memory (GB) | RSS after load (GiB): anon + file | RSS after decode (GiB): "
              "anon + file | decode ms/token | GEMV bandwidth (GB/s) | bound ms/token | x bound |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in a["rows"]:
        if "error" in row:
            lines.append(f"| {row['kind']} | fails: {row['error']} | | | | | | |")
            continue
        bw = a["bandwidth"].get(row["kind"])
        bound = row["weight_bytes"] / (bw * 1e9) * 1000 if isinstance(bw, float) else None
        ratio = f"{row['ms_per_token'] / bound:.1f}" if bound else "-"
        lines.append(
            f"| {row['kind']} | {row['weight_bytes'] / 1e9:.2f} | {row['loaded']['rss']:.2f}: {row['loaded']['anon']:.2f}"
            f" + {row['loaded']['file']:.2f} | {row['after']['rss']:.2f}: {row['after']['anon']:.2f} + "
            f"{row['after']['file']:.2f} | {row['ms_per_token']:.0f} | "
            f"{bw if not isinstance(bw, float) else f'{bw:.1f}'} | {f'{bound:.0f}' if bound else '-'} | "
            f"{ratio} |"
        )
    lines += ["", f"### (b) The bundled shapes world, {b['n']} scenes, fp32 vs int8 LM (exact = every attribute right)",
              "", "| LM | captioning exact | generation exact (classifier) | seconds |", "| --- | --- | --- | --- |"]
    for label in ("fp32", "int8"):
        row = b[label]
        lines.append(f"| {label} | {row['captioning']['exact']:.3f} | {row['generation']['exact']:.3f} | "
                     f"{row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    replace_section(RESULTS, HEADING, text, title="# Real sizes, measured on this machine\n\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="opt-6.7b")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--measure-one", nargs=3, metavar=("FOLDER", "KIND", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_one:
        folder, kind, tokens = args.measure_one
        print(json.dumps(measure_one(folder, kind, int(tokens))))
        return {}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as workdir:
        report = {"machine": machine, "tokens": args.tokens, "a": section_a(args.shape, args.tokens, workdir),
                  "b": section_b(args.scenes)}
    text = markdown(report)
    write_section(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
