"""CPU decoding against the weight-streaming bound of each dtype (issue 18, section 4).

For a random-weight OPT-shaped LM inside a GILL pipeline, batch 1, a 32-token prompt and 64 new tokens, per thread
count and per dtype (fp32, bf16, fp16), side by side in ONE process with interleaved repetitions (median reported):

- the GEMV bandwidth of the dtype, measured by streaming the LM's own weight matrices once each, in order (what one
  decoded token reads; the LM is far larger than the CPU's caches), through `torch.mv` and through `F.linear`;
- the bound: bytes of the LM's weights / the better of those two bandwidths;
- the pipeline's decode (`GILLPipeline.decode`, step 4 of `pipe(...)`): the whole 64-token
  decode, and its steady per-token time `(t(64) - t(1)) / 63` (prefill removed), with its multiple of the bound;
- the same with `pipe.enable_compiled_decoding()` ("pipeline, compiled": a StaticCache and the LM's base model
  compiled with static shapes), measured the same way in the same rounds; its first call, which compiles, is timed
  apart (`--no-compiled` leaves it out);
- a lean loop over the same transformers model with a `DynamicCache` and argmax (no GILL), as a floor for what the
  model itself costs per token;
- the reference GILL decode loop, re-implemented here (not imported) from `GILL.generate` in
  github.com/kohjingyu/gill `gill/models.py` (commit 4600b71): each step re-runs the WHOLE sequence through the LM with
  `inputs_embeds`, `use_cache=False`, `output_hidden_states=True`, takes the argmax of the last position's logits,
  looks the token up in the input embeddings and concatenates it; in fp32 (the LM as loaded on a CPU; the release's
  `load_gill` casts to bf16 for CUDA). It is the "full re-run" baseline of `benchmarks/bench_pipeline.py` section 1.

Every decode of a dtype must give the same token ids as the pipeline's own decode in that dtype (checked); the
reference must give the fp32 pipeline's ids (checked). The compiled decode's ids are compared and reported (the first
token where they differ): in bf16/fp16 its fused kernels and full-length static attention round differently. Writes '## Section 4: CPU decoding at the bound' in
benchmarks/results/real_size.md with `--write`.

    python -m benchmarks.bench_cpu_decode [--shape opt-125m|opt-1.3b] [--layers N] [--threads 1 2] [--rounds 3]
        [--no-compiled]
"""

import argparse
import gc
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache, OPTConfig, OPTForCausalLM

from gill_pipeline import DecodingSettings
from benchmarks.bench_pipeline import build_pipeline
from benchmarks.results_file import replace_section

RESULTS = os.path.join(os.path.dirname(__file__), "results", "real_size.md")
HEADING = "## Section 4: CPU decoding at the bound"
SHAPES = {
    "opt-125m": dict(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12),
    "opt-1.3b": dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_lm(shape: str, layers: int | None = None, tiny: bool = False) -> OPTForCausalLM:
    """An OPT of `shape` (published config) with random weights, fp32; `layers` keeps only the first N layers."""
    sizes = dict(SHAPES[shape])
    if layers is not None:
        sizes["num_hidden_layers"] = layers
    if tiny:
        sizes = dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2)
    config = OPTConfig(vocab_size=50272 if not tiny else 1000, max_position_embeddings=2048,
                       word_embed_proj_dim=sizes["hidden_size"], dropout=0.0, attention_dropout=0.0, **sizes)
    return OPTForCausalLM(config).eval()


def weight_bytes(llm) -> int:
    return sum(p.numel() * p.element_size() for p in llm.parameters())


@torch.no_grad()
def stream_seconds(llm, via: str) -> float:
    """One pass of a 1-row GEMV over every Linear weight of the LM (the LM head included), in the LM's dtype."""
    weights = [m.weight for m in llm.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(w.shape[1], dtype=w.dtype) for w in weights}
    start = time.perf_counter()
    for w in weights:
        x = inputs[w.shape[1]]
        if via == "mv":
            torch.mv(w, x)
        else:
            F.linear(x[None], w)
    return time.perf_counter() - start


def linear_bytes(llm) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in llm.modules() if isinstance(m, torch.nn.Linear))


@torch.no_grad()
def pipeline_decode(pipe, prompt_ids: torch.Tensor, tokens: int) -> list[int]:
    """`GILLPipeline.decode` (step 4 of `pipe(...)`), greedy, no `[IMG]` group allowed: exactly `tokens` text tokens
    unless the random LM picks its EOS id (refused: every way must do the same work)."""
    prompt = [pipe.embed_token_ids(prompt_ids)]
    ids = pipe.decode(prompt, DecodingSettings(max_new_tokens=tokens, max_images=0))[0].token_ids
    if len(ids) != tokens:
        raise RuntimeError(f"the LM stopped after {len(ids)} of {tokens} tokens (EOS); use another prompt")
    return ids


@torch.no_grad()
def compiled_decode(pipe, prompt_ids: torch.Tensor, tokens: int) -> list[int]:
    """`pipeline_decode` with `pipe.enable_compiled_decoding()` (compiled graphs are kept by torch between calls)."""
    pipe.enable_compiled_decoding()
    try:
        return pipeline_decode(pipe, prompt_ids, tokens)
    finally:
        pipe.disable_compiled_decoding()


@torch.no_grad()
def lean_decode(llm, prompt_ids: torch.Tensor, tokens: int) -> list[int]:
    """transformers' model with a DynamicCache and argmax, nothing else (the floor for the model itself)."""
    cache = DynamicCache(config=llm.config)
    logits = llm(input_ids=prompt_ids[None], cache=cache, use_cache=True, logits_to_keep=1).logits
    out = []
    for step in range(tokens):
        token = logits[:, -1].float().argmax(-1, keepdim=True)
        out.append(int(token))
        if step + 1 < tokens:
            logits = llm(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits
    return out


@torch.no_grad()
def reference_decode(llm, prompt_ids: torch.Tensor, tokens: int) -> list[int]:
    """GILL.generate's loop (greedy, no [IMG] produced): the whole sequence through the LM each step, no cache."""
    embeddings = llm.get_input_embeddings()(prompt_ids[None])
    out = None
    for _ in range(tokens):
        output = llm(inputs_embeds=embeddings, use_cache=False, output_hidden_states=True)
        hidden = [output.hidden_states[-1]]  # text_emb_layers=[-1]: kept, as the reference keeps them
        logits = output.logits[:, -1, :]
        next_token = torch.argmax(logits, keepdim=True, dim=-1)
        out = next_token if out is None else torch.cat([out, next_token], dim=-1)
        embeddings = torch.cat([embeddings, llm.get_input_embeddings()(next_token)], dim=1)
    del hidden
    return out[0].tolist()


def first_difference(got: list[int], expected: list[int]) -> int | None:
    """The index of the first token where two decodes differ (None: the same ids)."""
    for i, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            return i
    return None if len(got) == len(expected) else min(len(got), len(expected))


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(args) -> dict:
    prompt_ids = torch.randint(4, 300, (args.prompt,), generator=torch.Generator().manual_seed(0))
    pipes = {}
    for name in sorted(args.dtypes, key=lambda n: DTYPES[n] == torch.float32):  # fp32 last: the lowest peak memory
        torch.manual_seed(0)  # the same random weights for every dtype
        llm = build_lm(args.shape, args.layers, tiny=args.tiny).to(DTYPES[name])
        gc.collect()
        pipes[name] = build_pipeline(llm, cross_attention_dim=llm.config.hidden_size)
        pipes[name].gill.to(DTYPES[name])
    pipes = {name: pipes[name] for name in args.dtypes}
    report = {"args": vars(args), "threads": {}}
    for threads in args.threads:
        torch.set_num_threads(threads)
        samples = {name: {"mv": [], "linear": [], "decode": [], "decode1": [], "lean": [], "compiled": [],
                          "compiled1": []} for name in args.dtypes}
        samples["reference"] = {"decode": []}
        ids = {name: pipeline_decode(pipes[name], prompt_ids, args.tokens) for name in args.dtypes}  # warm-up
        first_compiled, compiled_agrees = {}, {}
        if args.compiled:  # the first compiled calls compile (prefill length, then the 1-token step)
            for name in args.dtypes:
                for tokens in (1, args.tokens):
                    seconds, got = timed(lambda: compiled_decode(pipes[name], prompt_ids, tokens))
                    first_compiled[name] = first_compiled.get(name, 0.0) + seconds
                compiled_agrees[name] = first_difference(got, ids[name])
        for round_ in range(args.rounds):
            print(f'threads {threads}: round {round_ + 1} of {args.rounds}', flush=True)
            for name in args.dtypes:
                pipe, s = pipes[name], samples[name]
                s["mv"].append(stream_seconds(pipe.llm, "mv"))
                s["linear"].append(stream_seconds(pipe.llm, "linear"))
                seconds, got = timed(lambda: pipeline_decode(pipe, prompt_ids, args.tokens))
                if got != ids[name]:
                    raise RuntimeError(f"{name}: the pipeline's decode changed between runs")
                s["decode"].append(seconds)
                s["decode1"].append(timed(lambda: pipeline_decode(pipe, prompt_ids, 1))[0])
                seconds, got = timed(lambda: lean_decode(pipe.llm, prompt_ids, args.tokens))
                if got != ids[name]:
                    raise RuntimeError(f"{name}: the lean loop and the pipeline disagree: {got[:8]} vs {ids[name][:8]}")
                s["lean"].append(seconds)
                if args.compiled:
                    seconds, got = timed(lambda: compiled_decode(pipe, prompt_ids, args.tokens))
                    if first_difference(got, ids[name]) != compiled_agrees[name]:
                        raise RuntimeError(f"{name}: the compiled pipeline's ids changed between calls")
                    s["compiled"].append(seconds)
                    s["compiled1"].append(timed(lambda: compiled_decode(pipe, prompt_ids, 1))[0])
            if args.reference and "fp32" in args.dtypes:
                seconds, got = timed(lambda: reference_decode(pipes["fp32"].llm, prompt_ids, args.tokens))
                if got != ids["fp32"]:
                    raise RuntimeError("the reference loop and the fp32 pipeline disagree")
                samples["reference"]["decode"].append(seconds)
        report["threads"][threads] = {"samples": samples, "first_compiled_s": first_compiled,
                                      "compiled_first_difference": compiled_agrees, "same_ids_as_fp32": {
            name: ids[name] == ids.get("fp32", ids[name]) for name in args.dtypes}}
    report["bytes"] = {name: weight_bytes(pipes[name].llm) for name in args.dtypes}
    report["linear_bytes"] = {name: linear_bytes(pipes[name].llm) for name in args.dtypes}
    report["params"] = sum(p.numel() for p in pipes[args.dtypes[0]].llm.parameters())
    return report


def summarize(report: dict) -> dict:
    """Medians, bounds and ratios per thread count and dtype."""
    args = report["args"]
    tokens = args["tokens"]
    out = {}
    for threads, data in report["threads"].items():
        samples = data["samples"]
        rows = {}
        reference = statistics.median(samples["reference"]["decode"]) if samples["reference"]["decode"] else None
        for name in args["dtypes"]:
            s = samples[name]
            linear_bytes_ = report["linear_bytes"][name]
            mv_bw = linear_bytes_ / statistics.median(s["mv"]) / 1e9
            linear_bw = linear_bytes_ / statistics.median(s["linear"]) / 1e9
            bound_ms = report["bytes"][name] / max(mv_bw, linear_bw) / 1e6
            decode = statistics.median(s["decode"])
            per_token_ms = (decode - statistics.median(s["decode1"])) / (tokens - 1) * 1000
            lean_ms = statistics.median(s["lean"]) / tokens * 1000
            compiled_ms = None
            if s["compiled"]:
                compiled_ms = (statistics.median(s["compiled"]) - statistics.median(s["compiled1"])) / (tokens - 1) * 1000
            rows[name] = dict(
                mv_gbs=mv_bw, linear_gbs=linear_bw, bound_ms=bound_ms, decode_s=decode, per_token_ms=per_token_ms,
                x_bound=per_token_ms / bound_ms, lean_ms=lean_ms, same_ids_as_fp32=data["same_ids_as_fp32"][name],
                vs_reference=reference / decode if reference else None,
                compiled_ms=compiled_ms, compiled_x_bound=compiled_ms / bound_ms if compiled_ms else None,
                first_compiled_s=data.get("first_compiled_s", {}).get(name),
                compiled_first_difference=data.get("compiled_first_difference", {}).get(name),
            )
        fastest = min(rows, key=lambda n: rows[n]["per_token_ms"])
        for name in rows:
            rows[name]["x_fastest_bound"] = rows[name]["per_token_ms"] / min(r["bound_ms"] for r in rows.values())
        out[threads] = {"rows": rows, "reference_s": reference, "fastest": fastest}
    return out


def markdown(report: dict, summary: dict, run_label: str) -> str:
    args = report["args"]
    layers = args["layers"] or SHAPES[args["shape"]]["num_hidden_layers"]
    lines = [
        f"### {run_label}: {args['shape']} shape ({layers} layers, {report['params'] / 1e6:.0f}M parameters), "
        f"prompt {args['prompt']} tokens, {args['tokens']} new tokens, batch 1, {args['rounds']} interleaved rounds "
        "(medians)",
        "",
        "| threads | dtype | weights (MB) | GEMV GB/s: torch.mv | GEMV GB/s: F.linear | bound ms/token | pipeline "
        f"ms/token | x its bound | x fastest dtype's bound | lean HF loop ms/token | pipeline {args['tokens']}-token "
        "decode (s) | "
        "vs reference | same ids as fp32 | pipeline, compiled ms/token | compiled x its bound | compiled / pipeline | "
        "first compiled calls (s) | compiled: same ids as the pipeline |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for threads, block in summary.items():
        for name, r in block["rows"].items():
            ref = f"{r['vs_reference']:.1f}x" if r["vs_reference"] else "-"
            if r["compiled_ms"] is not None:
                compiled = (f"{r['compiled_ms']:.1f} | {r['compiled_x_bound']:.2f} | "
                            f"{r['compiled_ms'] / r['per_token_ms']:.2f} | {r['first_compiled_s']:.1f} | ")
                difference = r.get("compiled_first_difference")
                compiled += "yes" if difference is None else f"no: from token {difference + 1}"
            else:
                compiled = "- | - | - | - | -"
            lines.append(
                f"| {threads} | {name} | {report['bytes'][name] / 1e6:.0f} | {r['mv_gbs']:.1f} | {r['linear_gbs']:.1f} | "
                f"{r['bound_ms']:.1f} | {r['per_token_ms']:.1f} | {r['x_bound']:.2f} | {r['x_fastest_bound']:.2f} | "
                f"{r['lean_ms']:.1f} | {r['decode_s']:.3f} | {ref} | {'yes' if r['same_ids_as_fp32'] else 'no'} | {compiled} |"
            )
    lines.append("")
    for threads, block in summary.items():
        ref = block["reference_s"]
        ref_text = f"reference GILL loop (fp32, full re-run) {ref:.2f} s for {args['tokens']} tokens" if ref else ""
        lines.append(f"- {threads} thread(s): fastest dtype per token: **{block['fastest']}**. {ref_text}")
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    """Replaces this benchmark's section of real_size.md (other sections are left as they are)."""
    old = open(RESULTS).read()
    if HEADING in old:
        start = old.index(HEADING)
        rest = old[start + len(HEADING):]
        end = rest.find("\n## ")
        old = old[:start] + (rest[end + 1:] if end >= 0 else "")
    with open(RESULTS, "w") as f:
        f.write(old.rstrip("\n") + "\n\n" + text)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="opt-125m")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N layers (memory)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16", "fp16"])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-reference", dest="reference", action="store_false")
    parser.add_argument("--no-compiled", dest="compiled", action="store_false",
                        help="leave out the 'pipeline, compiled' column (pipe.enable_compiled_decoding(); its first "
                        "calls compile, about 12 s per dtype at OPT-125m shape on 2 cores)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer width-32 LM (keeps the script tested)")
    parser.add_argument("--label", default="Run")
    parser.add_argument("--write", action="store_true", help=f"write '{HEADING}' of benchmarks/results/real_size.md")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    report = measure(args)
    report["load"] = (load_before,)
    summary = summarize(report)
    text = markdown(report, summary, args.label)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}\n")
    print(text)
    if args.write:
        replace_section(RESULTS, HEADING, f"{HEADING}\n\nOne run of `python -m benchmarks.bench_cpu_decode "
                      f"{' '.join(argv if argv is not None else sys.argv[1:])}` on {platform.machine()}, "
                      f"{os.cpu_count()} cores, torch {torch.__version__}; load average before / after: "
                      f"{report['load'][0]:.2f} / {os.getloadavg()[0]:.2f}.\n\n{text}")
    report["summary"] = summary
    report["markdown"] = text
    return report


if __name__ == "__main__":
    main()
