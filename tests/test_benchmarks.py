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


def test_cpu_decode_benchmark_runs_and_compares_alike():
    """Every way of decoding in the benchmark gives the same ids (checked inside); the report has every column."""
    bench = load("bench_cpu_decode")
    report = bench.main(["--tiny", "--rounds", "1", "--tokens", "4", "--threads", "1"])
    rows = report["summary"][1]["rows"]
    assert set(rows) == {"fp32", "bf16", "fp16"}
    assert rows["fp32"]["same_ids_as_fp32"] and rows["fp32"]["vs_reference"] > 0
    assert all(r["bound_ms"] > 0 and r["per_token_ms"] > 0 for r in rows.values())
    assert "| 1 | bf16 |" in report["markdown"]
