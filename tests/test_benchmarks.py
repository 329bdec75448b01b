"""The benchmark scripts stay in step with the library: one tiny measurement of each (no timing is asserted)."""

import importlib

import torch


def load(name):
    """`benchmarks.<name>`, imported as `python -m benchmarks.<name>` runs it (the repository root on the path)."""
    return importlib.import_module(f"benchmarks.{name}")


def test_training_benchmark_builds_and_steps():
    bench = load("bench_training")
    from training.model_forward import total_loss
    from training.params import LossArgs

    small = dict(bench.SMALL, hidden=32, ffn=64, layers=1, heads=2, vocab=300, vision=16, cond=16, cond_length=8,
                 batch=4, caption_tokens=8, mapper=16, mapper_layers=1)
    model, batch, optimizer = bench.build(small, torch.device("cpu"), torch.float32)
    loss = total_loss(model(batch, concat_caption=False, concat_img=False), LossArgs())
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)


def test_pipeline_benchmark_kv_cache_part_runs():
    bench = load("bench_pipeline")
    from gill_pipeline.testing import build_tiny_lm, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    pipe = bench.build_pipeline(build_tiny_lm("opt", len(tokenizer), tokenizer), cross_attention_dim=32)
    rows = bench.bench_kv_cache(pipe, repeats=1)
    assert [n for n, _, _ in rows] == [8, 32, 64]


def test_conversation_benchmark_runs_and_reuses_the_cache(tmp_path):
    bench = load("bench_conversation")
    output = tmp_path / "conversation.md"
    medians = bench.main(["--tiny", "--repeats", "1", "--answer-tokens", "4", "--output", str(output)])
    assert set(medians) == {"reused", "recomputed", "no cache"}
    assert "turn 8 reuses" in output.read_text()


def test_real_size_benchmark_stages_run_on_tiny_configs(tmp_path):
    # The stages of `python -m benchmarks.bench_real_size` (each a fresh process there), run in-process on tiny configs.
    bench = load("bench_real_size")
    pairing = bench.PAIRINGS["tiny"]
    base, folder = str(tmp_path / "base"), str(tmp_path / "gill")
    written = bench.stage_write(pairing, base)
    assert set(written["bytes"]) == {"llm", "image_encoder", "unet", "vae"}
    assembled = bench.stage_assemble(pairing, base, folder)
    assert assembled["weights_bytes"] > 0
    used = bench.stage_use(pairing, folder, repeats=1)
    assert used["images"] == 1 and used["hub"]["identical"] and torch.isfinite(torch.tensor(used["train"]["loss"]))
    report = {"pairing": "tiny", "write": written, "assemble": assembled, "use": used}
    text = "\n".join(bench.table(report))
    assert "image answer / (LM alone, same passes + decoder alone)" in text and "identical: yes" in text
    assert used["lm_same_s"] > 0 and used["image_ratio"] == used["image_s"] / (used["lm_same_s"] + used["decoder_s"])


def test_serve_benchmark_runs_and_batched_answers_match(tmp_path):
    bench = load("bench_serve")
    output = tmp_path / "serve.md"
    output.write_text(f"# old results\n\n{bench.REPLICAS_HEADING}\n\nthe replicas' figures\n")
    results = bench.main([
        "--levels", "2", "--kinds", "text", "--requests-per-client", "2", "--queue-clients", "4", "--dialogues", "0",
        "--leak-requests", "8", "--output", str(output),
    ])
    assert results["identity"]["text"][1] == 0 and results["identity"]["text"][0] >= 4
    assert all(row["errors"] == 0 for row in results["levels"])
    assert results["queue"]["errors"] == 0 and results["queue"]["served"] == results["queue"]["requests"]
    text = output.read_text()
    assert "## Throughput and latency" in text and "# old results" not in text
    assert text.endswith(f"{bench.REPLICAS_HEADING}\n\nthe replicas' figures\n")  # bench_serve_replicas' section kept


def test_serve_benchmark_http_driver_reads_sse_and_retries_429():
    """The `--url` driver against an in-process transport that speaks OpenAI's streamed chat completions: a 429 with
    Retry-After is retried, the SSE chunks are read, a 500 is counted as an error."""
    import asyncio
    import json

    import httpx

    bench = load("bench_serve")
    seen, refused = [], set()

    def handler(request):
        body = json.loads(request.content)
        seen.append(body)
        assert body["stream"] is True and body["messages"][0]["content"][0]["type"] == "image_url"
        assert body["image_mode"] == "both" and "max_new_tokens" not in body and body["max_tokens"] == 8
        if body["seed"] == 1 and 1 not in refused:
            refused.add(1)
            return httpx.Response(429, headers={"retry-after": "0"}, json={"error": {"message": "full"}})
        if body["seed"] == 2:
            return httpx.Response(500, json={"error": {"message": "boom"}})
        chunks = [{"choices": [{"delta": {"content": "a red"}}]}, {"choices": [{"delta": {}, "finish_reason": "stop"}]}]
        text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, text=text)

    rows = asyncio.run(bench.bench_http("http://test", ["image"], [2], 4, 2, transport=httpx.MockTransport(handler)))
    (row,) = rows
    assert row["requests"] == 8 and row["full"] == 1 and row["errors"] == 1
    assert len(seen) == 9 and row["ttft50"] <= row["p50"]


def test_cpu_decode_benchmark_runs_and_compares_alike(tmp_path):
    """Every way of decoding in the benchmark gives the same ids (checked inside); the report has every column."""
    bench = load("bench_cpu_decode")
    results = tmp_path / "real_size.md"
    results.write_text("# Real sizes\n\n## Section 1: kept\n\nrow\n\n## Section 4: CPU decoding at the bound\n\nold\n")
    bench.RESULTS = str(results)
    report = bench.main(["--tiny", "--rounds", "1", "--tokens", "4", "--threads", "1", "--write", "--no-compiled"])
    written = results.read_text()
    assert "## Section 1: kept\n\nrow" in written and "\nold\n" not in written and written.count("## Section 4") == 1
    rows = report["summary"][1]["rows"]
    assert set(rows) == {"fp32", "bf16", "fp16"}
    assert rows["fp32"]["same_ids_as_fp32"] and rows["fp32"]["vs_reference"] > 0
    assert all(r["bound_ms"] > 0 and r["per_token_ms"] > 0 for r in rows.values())
    assert "| 1 | bf16 |" in report["markdown"]
    assert rows["fp32"]["compiled_ms"] is None and "| - | - | - | - |" in report["markdown"]


def test_cpu_decode_benchmark_compiled_column(tmp_path):
    """The 'pipeline, compiled' column: the same ids as the eager pipeline (checked inside), a time per token."""
    bench = load("bench_cpu_decode")
    bench.RESULTS = str(tmp_path / "real_size.md")
    report = bench.main(["--tiny", "--rounds", "1", "--tokens", "4", "--threads", "1", "--dtypes", "fp32",
                         "--no-reference"])
    row = report["summary"][1]["rows"]["fp32"]
    assert row["compiled_ms"] is not None and row["compiled_x_bound"] > 0 and row["first_compiled_s"] > 0


def test_real_size_benchmark_flux_stages_run_on_tiny_configs(tmp_path):
    # The Flux pairing's stages on tiny configs of the same classes: the layout read from the text encoders alone,
    # their folders deleted, then assembly from the checkpoint folder (which must not load them) with the LM and the
    # transformer quantized int8 by one `PipelineQuantizationConfig`, the answers, a training step, the Hub round trip.
    import json
    import os
    import shutil

    from safetensors import safe_open

    bench = load("bench_real_size")
    pairing = bench.PAIRINGS["tiny-flux"]
    base, folder = str(tmp_path / "base"), str(tmp_path / "gill")
    written = bench.stage_write(pairing, base)
    assert set(written["bytes"]) == {"llm", "image_encoder", "transformer", "vae", "text_encoder", "text_encoder_2"}
    layout = bench.stage_layout(pairing, base)
    assert layout["layout"].startswith("FluxPipeline (flux, guidance none")
    assert "prompt_embeds sequence (512, 32)" in layout["layout"] and "pooled_prompt_embeds pooled (32,)" in layout["layout"]
    for text in bench.FLUX_TEXT:
        shutil.rmtree(os.path.join(base, bench.FLUX_FOLDER, text))
    quantized = {}
    for component in pairing["quantize_apart"]:  # alone, replacing its bf16 files, as the run does
        quantized[component] = bench.stage_quantize(pairing, base, component)
        original = bench.component_folder(pairing, base, component)
        shutil.rmtree(original)
        os.replace(original + bench.QUANTIZED_SUFFIX, original)
    assembled = bench.stage_assemble(pairing, base, folder)
    for component in ("llm", "transformer"):
        with open(os.path.join(folder, component, "config.json")) as f:
            assert "quantization_config" in json.load(f), component
    # The estimate made from the configs before a run: the bytes of the tensors each component writes (headers
    # aside, which only tiny models notice).
    plan = bench.plan(pairing)
    for component, expected in plan["kept"].items():
        stored = 0
        for root, _, files in os.walk(os.path.join(folder, component)):
            for name in (f for f in files if f.endswith(".safetensors")):
                with safe_open(os.path.join(root, name), "pt") as f:
                    for key in f.keys():
                        stored += f.get_tensor(key).nbytes
        assert abs(stored - expected) <= 0.03 * stored, (component, stored, expected)
    assert plan["disk"]["base"] == sum(written["bytes"].values())
    used = bench.stage_use(pairing, folder, repeats=1)
    assert used["images"] == 1 and used["hub"]["identical"] and torch.isfinite(torch.tensor(used["train"]["loss"]))
    report = {"pairing": "tiny-flux", "write": written, "layout": layout, "quantize": quantized, "assemble": assembled,
              "use": used}
    text = "\n".join(bench.table(report))
    assert "read the layout" in text and "| quantize transformer alone" in text and "identical: yes" in text
    assert "quantize int8: llm; transformer int8 as saved" in text


def test_real_size_benchmark_refuses_bad_workdirs_before_writing(tmp_path, monkeypatch, capsys):
    import collections
    import shutil

    import pytest

    bench = load("bench_real_size")
    with pytest.raises(SystemExit):
        bench.main(["--pairing", "tiny", "--workdir", str(tmp_path / "missing"), "--no-write"])
    assert "argument --workdir: no such folder" in capsys.readouterr().err
    # A disk with 1 GB free: the Qwen + Flux pairing needs tens of GB (estimated from its configs, printed first).
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**9, 10**9))
    with pytest.raises(SystemExit):
        bench.main(["--pairing", "qwen-flux", "--workdir", str(tmp_path), "--no-write"])
    out, err = capsys.readouterr()
    assert "[qwen-flux] estimate from the configs" in out and "disk needed at the peak" in out
    assert f"argument --workdir: {str(tmp_path)!r} has 1.0 GB free, but the 'qwen-flux' pairing needs" in err
    assert list(tmp_path.iterdir()) == []
