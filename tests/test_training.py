"""Training of GILL's learned parts (training/), on tiny random models and a synthetic image-caption set."""

import copy
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_CONFIG
from gill_pipeline import GILLImage, GILLPipeline
from multiprocess_run import run_two_processes
from training import precompute, train_decision, train_gill
from training.checkpoint import CHECKPOINTS_DIR, LATEST_FILE, TMP_PREFIX
from training.data import Collator, EpochBatchSampler, ExampleReader, SyntheticDataset
from training.losses import IGNORE_INDEX, contrastive_loss
from training.model_forward import GILLTrainingModel, total_loss
from training.params import LoraArgs, LossArgs
from training.setup_models import build_tiny_models
from training.trainable import decoder_layers, enable_gradient_checkpointing, setup_trainable

LOSSES = ("caption", "img_token", "retrieval", "generation")


def run_args(output_dir, *extra):
    return [
        "--config", TINY_CONFIG, "--output-dir", str(output_dir), "--report-to", "none", "--progress-bar", "false",
        "--log-every", "1", *map(str, extra),
    ]


def state_of(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """60 steps on 8 synthetic examples (the same batch every step, paired differently), then an export."""
    out = tmp_path_factory.mktemp("train")
    result = train_gill.main(run_args(
        out, "--synthetic-size", 8, "--batch-size", 8, "--max-steps", 60, "--lr", 3e-3, "--warmup-steps", 0,
        "--grad-clip", 0, "--val-every", 0, "--checkpoint-every", 30,
    ))
    return result


def test_every_loss_goes_down(trained_run):
    history = trained_run["history"]
    assert len(history) == 60
    for name in LOSSES:
        values = [h[f"train/{name}_loss"] for h in history]
        first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
        assert last < first, f"{name} loss did not fall: {first:.4f} -> {last:.4f}"


def test_validation_metrics_are_reported(trained_run):
    val = trained_run["val"]
    for key in ("val/caption_loss", "val/caption_token_accuracy", "val/text_to_image_recall@1",
                "val/text_to_image_recall@5", "val/image_to_text_recall@1", "val/generation_l2"):
        assert key in val and val[key] == val[key]  # present and not NaN
    with open(os.path.join(trained_run["output_dir"], train_gill.METRICS_FILE)) as f:
        assert any("val/caption_loss" in json.loads(line) for line in f)


def test_only_learned_parameters_change(trained_run):
    initial = build_tiny_models("opt", seed=0).pipe
    trained = GILLPipeline.from_pretrained(trained_run["export_dir"])
    for name in ("llm", "image_encoder", "unet", "vae"):
        before, after = state_of(getattr(initial, name)), state_of(getattr(trained, name))
        assert before.keys() == after.keys()
        for key in before:
            assert torch.equal(before[key], after[key]), f"{name}.{key} changed"
    assert torch.equal(initial.llm.get_input_embeddings().weight, trained.llm.get_input_embeddings().weight)
    before, after = state_of(initial.gill), state_of(trained.gill)
    for key in ("img_input_embeddings", "visual_prefix.weight", "ret_text_proj.weight", "ret_image_proj.weight",
                "logit_scale", "mapper.fc.weight", "mapper.query_embs"):
        assert not torch.equal(before[key], after[key]), f"gill.{key} did not train"
    for key in ("decision_head.1.weight", "decision_head.1.bias", "uncond_prompt_embeds"):
        assert torch.equal(before[key], after[key]), f"gill.{key} changed in the main training"


def test_exported_pipeline_loads_and_generates(trained_run):
    pipe = GILLPipeline.from_pretrained(trained_run["export_dir"])
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red square on a blue background", max_new_tokens=3, img_logit_scale=1e6, image_mode="generate",
               num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    images = [x for x in out.outputs[0] if isinstance(x, GILLImage)]
    assert images and images[0].source == "generated" and torch.isfinite(images[0].image).all()
    # The learned parts are also saved on their own, small.
    assert os.path.isfile(os.path.join(trained_run["output_dir"], train_gill.GILL_DIR, "config.json"))


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora_dropout"])
def test_resume_continues_exactly(tmp_path, lora):
    # With LoRA dropout every step draws from the global RNG: the resumed run must continue every random stream
    # exactly (a DataLoader built at resume must not draw its base seed from it).
    common = ("--synthetic-size", 12, "--batch-size", 4, "--max-steps", 6, "--warmup-steps", 2, "--decay-every", 3,
              "--val-every", 0, "--checkpoint-every", 0, "--export-pipeline", "false")
    if lora:
        common += ("--lora", "true", "--lora-rank", 4, "--lora-dropout", 0.3, "--lora-target-modules", "q_proj,v_proj",
                   "--export-pipeline", "true")
    straight = train_gill.main(run_args(tmp_path / "straight", *common))
    # Interrupted after 4 steps (mid-epoch: 3 batches per epoch), then resumed to the end.
    first = train_gill.main(run_args(tmp_path / "resumed", *common, "--exit-after-steps", 4))
    assert first["state"]["step"] == 4 and first["export_dir"] is None
    root = tmp_path / "resumed" / CHECKPOINTS_DIR
    assert (root / LATEST_FILE).read_text().strip() == "checkpoint-4"
    # A crash while writing a later checkpoint leaves only a temporary folder; `latest` is untouched.
    (root / f"{TMP_PREFIX}checkpoint-5").mkdir()
    (root / f"{TMP_PREFIX}checkpoint-5" / "trainable.safetensors").write_bytes(b"partial")
    second = train_gill.main(run_args(tmp_path / "resumed", *common, "--resume", "latest"))
    assert second["state"]["step"] == 6 and not (root / f"{TMP_PREFIX}checkpoint-5").exists()
    a = load_file(str(tmp_path / "straight" / "gill" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "gill" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The losses of the resumed steps are the same bits, dropout masks included.
    for name in LOSSES:
        resumed_losses = [h[f"train/{name}_loss"] for h in second["history"]]
        assert [h[f"train/{name}_loss"] for h in straight["history"][4:]] == resumed_losses
    if lora:  # and so is the adapter
        a = load_file(str(tmp_path / "straight" / "pipeline" / "llm_lora" / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "resumed" / "pipeline" / "llm_lora" / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and len(a) > 0
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_lora_adapter_is_saved_reloaded_and_changes_the_lm(tmp_path):
    result = train_gill.main(run_args(
        tmp_path, "--max-steps", 4, "--batch-size", 4, "--synthetic-size", 8, "--lr", 1e-2, "--warmup-steps", 0,
        "--val-every", 0, "--checkpoint-every", 2, "--lora", "true", "--lora-rank", 4,
        "--lora-target-modules", "q_proj,v_proj",
    ))
    lora_dir = os.path.join(result["export_dir"], "llm_lora")
    assert os.path.isfile(os.path.join(lora_dir, "adapter_config.json"))
    assert os.path.isfile(os.path.join(lora_dir, "adapter_model.safetensors"))
    assert sorted(os.listdir(os.path.join(result["export_dir"], "llm"))) == ["config.json", "generation_config.json", "model.safetensors"]
    pipe = GILLPipeline.from_pretrained(result["export_dir"])
    from peft import PeftModel

    assert isinstance(pipe.llm, PeftModel)
    ids = pipe.tokenizer("a red square", return_tensors="pt").input_ids
    with torch.no_grad():
        with_lora = pipe.llm(input_ids=ids).logits
        with pipe.llm.disable_adapter():
            without = pipe.llm(input_ids=ids).logits
    assert not torch.allclose(with_lora, without)
    base = build_tiny_models("opt", seed=0).pipe.llm
    with torch.no_grad():
        assert torch.allclose(base(input_ids=ids).logits, without, atol=1e-6)


def training_model(pipe, collator):
    pad = pipe.tokenizer.pad_token_id if pipe.tokenizer.pad_token_id is not None else 0
    return GILLTrainingModel(
        pipe.llm, pipe.gill, pipe.image_encoder, pipe.img_token_ids, pad_token_id=pad, bos_token_id=collator.bos
    )


def test_joined_captions_keep_every_word_when_the_tokenizer_has_no_bos():
    pipe = build_tiny_models("qwen2", seed=0).pipe
    no_bos = copy.deepcopy(pipe.tokenizer)
    no_bos.bos_token = None  # as Qwen2's tokenizer: the collator adds no BOS
    img = pipe.img_token_ids
    texts = ["a red square", "a blue circle"]
    for tokenizer in (no_bos, pipe.tokenizer):
        collator = Collator(tokenizer, len(img), 16)
        model = training_model(pipe, collator)
        captions = [collator.tokenize(t) for t in texts]
        words = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        bos = [] if collator.bos is None else [collator.bos]
        assert captions == [bos + w for w in words]
        # [IMG] sequences: the second caption loses its BOS, if any, and never a word.
        ids, labels, mask, locations = model.img_sequences(captions, concat=True)
        assert ids[0, : int(mask[0].sum())].tolist() == bos + words[0] + img + words[1] + img
        assert locations.tolist() == [[0, len(bos + words[0])], [0, len(bos + words[0]) + len(img) + len(words[1])]]
        # Captioning sequences: every word of both captions is a target.
        prefix = torch.zeros(2, pipe.gill.config.num_visual_tokens, pipe.llm.config.hidden_size)
        _, labels, _ = model.caption_sequences(captions, prefix, concat=True)
        assert [t for t in labels[0].tolist() if t != IGNORE_INDEX] == bos + words[0] + words[1]


def test_gradient_checkpointing_recomputes_the_frozen_lm_with_equal_results():
    def run(checkpointing):
        pipe = build_tiny_models("opt", seed=0).pipe
        setup_trainable(pipe, LoraArgs())  # the LM frozen, in eval mode
        if checkpointing:
            assert enable_gradient_checkpointing(pipe.llm) == pipe.llm.config.num_hidden_layers
        calls = []
        for layer in decoder_layers(pipe.llm):
            layer.self_attn.register_forward_hook(lambda *_: calls.append(1))
        collator = Collator(pipe.tokenizer, len(pipe.img_token_ids), 16)
        dataset = SyntheticDataset(4, pipe.image_encoder.config.image_size, ExampleReader(pipe.feature_extractor))
        batch = collator([dataset[i] for i in range(4)])
        batch["targets"] = torch.randn(4, pipe.gill.config.cond_length, pipe.gill.config.cond_dim,
                                       generator=torch.Generator().manual_seed(0))
        loss = total_loss(training_model(pipe, collator)(batch, concat_caption=True, concat_img=True), LossArgs())
        forward_calls = len(calls)
        loss.backward()
        grads = {n: p.grad for n, p in pipe.gill.named_parameters() if p.grad is not None}
        return loss.detach(), grads, forward_calls, len(calls) - forward_calls, pipe.llm.training

    plain, checkpointed = run(False), run(True)
    layers = 2 * build_tiny_models("opt").pipe.llm.config.num_hidden_layers  # 2 LM passes
    assert plain[2:] == (layers, 0, False)
    assert checkpointed[2:] == (layers, layers, False)  # every block recomputed once in the backward, eval mode kept
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    assert plain[1].keys() == checkpointed[1].keys() and len(plain[1]) > 5
    for name in plain[1]:
        torch.testing.assert_close(checkpointed[1][name], plain[1][name], rtol=1e-6, atol=1e-7)


def test_gradient_checkpointing_run_matches_a_plain_run(tmp_path):
    common = ("--synthetic-size", 8, "--batch-size", 4, "--max-steps", 2, "--warmup-steps", 0, "--val-every", 0,
              "--checkpoint-every", 0, "--export-pipeline", "false")
    plain = train_gill.main(run_args(tmp_path / "plain", *common))["history"]
    checkpointed = train_gill.main(run_args(tmp_path / "ckpt", *common, "--gradient-checkpointing", "true"))["history"]
    for a, b in zip(plain, checkpointed):
        for name in LOSSES:
            assert b[f"train/{name}_loss"] == pytest.approx(a[f"train/{name}_loss"], rel=1e-5)


def write_decisions(path, count=24):
    rows = ["Prompt\tCategory\tChallenge\tNote\tDecision"]
    for i in range(count):
        rows.append(f"a photo of a {['red', 'blue', 'green'][i % 3]} square number {i}\tX\tBasic\t-\tret")
        rows.append(f"a surreal painting of a dream {i}\tX\tBasic\t-\tgen")
    path.write_text("\n".join(rows) + "\n")


def test_pipeline_source_trains_without_image_decoder_and_exports_a_complete_pipeline(tmp_path, monkeypatch):
    source = tmp_path / "source"
    initial = build_tiny_models("opt", seed=0).pipe
    initial.save_pretrained(source)
    targets = tmp_path / "targets"
    precompute.main(["--tiny-random", "opt", "--data-type", "synthetic", "--synthetic-size", "8", "--output",
                     str(targets), "--dtype", "float32"])
    loaded = []
    from_pretrained = GILLPipeline.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        pipe = from_pretrained(cls, path, **kwargs)
        loaded.append((pipe, (pipe.unet, pipe.vae, pipe.scheduler, pipe.image_encoder)))  # as loaded
        return pipe

    monkeypatch.setattr(GILLPipeline, "from_pretrained", classmethod(spy))
    result = train_gill.main(run_args(
        tmp_path / "run", "--tiny-random", "none", "--pipeline", source, "--train-targets", targets,
        "--synthetic-size", 8, "--batch-size", 4, "--max-steps", 2, "--val-every", 0, "--checkpoint-every", 0,
    ))
    assert loaded[0][1][:3] == (None, None, None)  # never loaded for training

    # The export is complete: the source's UNet, VAE and scheduler, unchanged, and it generates an image.
    exported = GILLPipeline.from_pretrained(result["export_dir"])
    for name in ("unet", "vae"):
        before, after = state_of(getattr(initial, name)), state_of(getattr(exported, name))
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert type(exported.scheduler) is type(initial.scheduler)
    exported.set_progress_bar_config(disable=True)
    out = exported("a red square on a blue background", max_new_tokens=3, img_logit_scale=1e6, image_mode="generate",
                   num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    images = [x for x in out.outputs[0] if isinstance(x, GILLImage)]
    assert images and images[0].source == "generated" and torch.isfinite(images[0].image).all()

    # The decision head trains on an LM loaded in bfloat16, without the image decoder or the vision encoder; the
    # learned parts are saved in float32, the others unchanged.
    write_decisions(tmp_path / "decisions.tsv")
    before = load_file(os.path.join(result["export_dir"], "gill", "diffusion_pytorch_model.safetensors"))
    loaded.clear()
    metrics = train_decision.main(["--pipeline", result["export_dir"], "--data", str(tmp_path / "decisions.tsv"),
                                   "--steps", "50", "--lr", "1e-2", "--dtype", "bfloat16"])
    assert metrics["train_examples"] + metrics["val_examples"] == 48
    pipe, components = loaded[0]
    assert components == (None, None, None, None)
    assert pipe.llm.dtype == torch.bfloat16 and pipe.gill.dtype == torch.float32
    after = load_file(os.path.join(result["export_dir"], "gill", "diffusion_pytorch_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in after.values())
    assert not torch.equal(before["decision_head.1.weight"], after["decision_head.1.weight"])
    assert torch.equal(before["mapper.fc.weight"], after["mapper.fc.weight"])


def test_two_process_job_sees_the_other_process_negatives(tmp_path):
    completed = run_two_processes(
        run_args(tmp_path, "--max-steps", 2, "--batch-size", 3, "--synthetic-size", 12, "--val-every", 2,
                 "--checkpoint-every", 1, "--export-pipeline", "false"),
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    with open(tmp_path / train_gill.METRICS_FILE) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if "train/global_batch" in r]
    # The retrieval logits span both processes' examples: 2 processes x 3 per process.
    assert train and all(r["train/global_batch"] == 6 for r in train)
    val = [r for r in records if "val/examples" in r]
    assert val and val[-1]["val/examples"] == 12  # recall over the whole validation set, gathered
    assert (tmp_path / CHECKPOINTS_DIR / "checkpoint-2" / "rng-rank1.pt").exists()

    # The other process's rows reach the loss: the retrieval loss logged at step 1 (before any update) is InfoNCE over
    # the embeddings of BOTH processes' batches, recomputed here in one process, and not the loss of one batch alone.
    pipe = build_tiny_models("opt", seed=0).pipe
    collator = Collator(pipe.tokenizer, len(pipe.img_token_ids), 16)
    dataset = SyntheticDataset(12, pipe.image_encoder.config.image_size, ExampleReader(pipe.feature_extractor), seed=0)
    model = training_model(pipe, collator)
    concat = train_gill.concat_draws(0, 0, 0, 0.5)
    texts, images = [], []
    for rank in (0, 1):
        indices = next(iter(EpochBatchSampler(12, 3, seed=0, epoch=0, rank=rank, world_size=2)))
        with torch.no_grad():
            out = model(collator([dataset[i] for i in indices]), *concat)
        texts.append(out["text_embeds"])
        images.append(out["image_embeds"])
    with torch.no_grad():
        both, _ = contrastive_loss(torch.cat(texts), torch.cat(images), pipe.gill.logit_scale)
        alone, _ = contrastive_loss(texts[0], images[0], pipe.gill.logit_scale)
    first = next(r for r in train if r["step"] == 1)
    assert first["train/retrieval_loss"] == pytest.approx(float(both), rel=1e-4, abs=1e-5)
    assert abs(first["train/retrieval_loss"] - float(alone)) > 1e-2


def test_train_decision_reports_f1_and_saves_the_head(trained_run, tmp_path):
    from training import train_decision

    folder = tmp_path / "pipeline"
    shutil.copytree(trained_run["export_dir"], folder)
    data = tmp_path / "decisions.tsv"
    rows = ["Prompt\tCategory\tChallenge\tNote\tDecision"]
    for i in range(24):
        rows.append(f"a photo of a {['red', 'blue', 'green'][i % 3]} square number {i}\tX\tBasic\t-\tret")
        rows.append(f"a surreal painting of a dream {i}\tX\tBasic\t-\tgen")
        rows.append(f"ambiguous {i}\tX\tBasic\t-\tsame")
    data.write_text("\n".join(rows) + "\n")
    before = load_file(str(folder / "gill" / "diffusion_pytorch_model.safetensors"))
    metrics = train_decision.main(["--pipeline", str(folder), "--data", str(data), "--steps", "300", "--lr", "1e-2"])
    assert metrics["train_examples"] + metrics["val_examples"] == 48
    assert 0.0 <= metrics["val_f1_macro"] <= 1.0 and metrics["val_accuracy"] > 0.5
    after = load_file(str(folder / "gill" / "diffusion_pytorch_model.safetensors"))
    assert not torch.equal(before["decision_head.1.weight"], after["decision_head.1.weight"])
    assert torch.equal(before["mapper.fc.weight"], after["mapper.fc.weight"])
    reloaded = GILLPipeline.from_pretrained(str(folder))
    assert torch.equal(reloaded.gill.decision_head[1].weight, after["decision_head.1.weight"])
