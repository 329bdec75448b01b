"""Train GILL's learned parts on image-caption pairs (Koh et al., NeurIPS 2023), LM / CLIP / SD frozen.

Smoke run on a CPU, nothing downloaded (tiny random models, synthetic coloured shapes):

    python -m training.train_gill --config training/configs/tiny.yaml --output-dir runs/tiny

The paper's setting (OPT-6.7B, CLIP ViT-L/14, SD v1.5, CC3M) on one or more GPUs:

    accelerate launch -m training.train_gill --config training/configs/paper_opt6.7b_cc3m.yaml \
        --train-data /data/cc3m/train.tsv --image-folder /data/cc3m/images

Resume an interrupted run exactly where it stopped:  ... --resume latest
The loop, nanoGPT-style: learning rate, validation + checkpoint, micro-steps, clip, step, log. See docs/training.md.
"""

import gc
import json
import logging
import math
import os
import sys
import traceback
import warnings


import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from torch.utils.data import IterableDataset, Subset

from training.chat_format import ChatWrapping
from training.checkpoint import (
    clean_stale_temporaries,
    load_checkpoint,
    load_skips,
    read_latest,
    resolve_resume,
    save_checkpoint,
)
from training.data import Collator, ExampleReader, SkipCounter, build_dataset, make_loader
from training.evaluate import evaluate
from training.interleaved import InterleavedCollator, InterleavedDataset
from training.model_forward import GILLTrainingModel, empty_on_any_process, total_loss
from training.params import TrainConfig, parse_config
from training.quantized_backward import lean_quantized_backward
from training.setup_models import attach_image_decoder, cast_frozen, load_models
from training.sharding import (
    average_replicated_gradients,
    configure_deepspeed,
    enable_fsdp_on_cpu,
    engine_kwargs,
    export_learned_parts,
    fsdp_mixed_precision,
    is_sharded,
    keep_learned_parts_whole,
    lm_sharded,
    lm_values_per_process,
    quiet_view_warning,
    resolve_sharding,
)
from training.targets import TargetStore, encode_captions, encode_family_targets
from training.trainable import (
    enable_gradient_checkpointing,
    img_row_norms,
    rescale_img_rows,
    set_train_modes,
    setup_trainable,
)

logger = logging.getLogger("train_gill")

LOSS_NAMES = ("caption", "img_token", "retrieval", "generation")
METRICS_FILE = "metrics.jsonl"
EXPORT_DIR = "pipeline"
GILL_DIR = "gill"
TRACKER_DIR = "tensorboard"
INTERLEAVED_VAL_PREFIX = "val_interleaved/"


def build_optimizer(params, optim):
    """AdamW, linear warm-up, then step decay (the reference's GradualWarmupScheduler + StepLR)."""
    optimizer = torch.optim.AdamW(
        params, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=optim.weight_decay
    )
    decay = torch.optim.lr_scheduler.StepLR(optimizer, step_size=optim.decay_every, gamma=optim.decay_gamma)
    if optim.warmup_steps == 0:
        return optimizer, decay
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / (optim.warmup_steps + 1), end_factor=1.0, total_iters=optim.warmup_steps
    )
    schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, decay], milestones=[optim.warmup_steps])
    return optimizer, schedule


def load_store(folder, models):
    if folder is None:
        return None
    store = TargetStore(folder)
    store.validate(
        models.pipe.gill, models.text_encoder, models.text_tokenizer, models.pipe.image_encoder, decoder=models.decoder
    )
    return store


def data_batches(dataset, collator, config: TrainConfig, accelerator, epoch: int, batch_in_epoch: int):
    """Endless (epoch, position after this batch, batch), starting at a saved data position.

    Batches whose images were all unreadable are yielded too (empty): the loop skips them on every process at once.
    """
    data = config.data
    while True:
        loader = make_loader(
            dataset, collator, config.optim.batch_size, data.num_workers, config.run.seed, epoch,
            accelerator.process_index, accelerator.num_processes, start_batch=batch_in_epoch,
        )
        produced = False
        for batch in loader:
            batch_in_epoch += 1
            produced = True
            yield epoch, batch_in_epoch, batch
        if not produced and batch_in_epoch == 0:
            raise ValueError("The training data produced no batch in a whole epoch (empty, or every image unreadable).")
        epoch, batch_in_epoch = epoch + 1, 0


def interleaved_draw(seed: int, step: int, micro: int, ratio: float) -> bool:
    """Whether micro-step `micro` of `step` reads interleaved documents (else caption pairs): drawn from (seed, step)
    as `concat_draws` is, so every process and a resumed run draw the same."""
    if ratio <= 0 or ratio >= 1:
        return ratio >= 1
    generator = torch.Generator().manual_seed(seed * 2_000_003 + step * 7_919 + micro + 17)
    return bool(torch.rand(1, generator=generator)[0] < ratio)


def concat_draws(seed: int, step: int, micro: int, prob: float) -> tuple[bool, bool]:
    """Whether to join examples in pairs, for the captioning and the [IMG] sequences: drawn from (seed, step), not
    from the global RNG, so a resumed run draws exactly the same."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + micro)
    draws = torch.rand(2, generator=generator)
    return bool(draws[0] < prob), bool(draws[1] < prob)


class BatchPreparer:
    """Moves a collated batch to the device and adds the generation targets when they are not stored: SD's text
    encoder outputs, or for another decoder family its own `encode_prompt` outputs (`decoder`, with its text
    encoders)."""

    def __init__(self, accelerator, text_encoder, text_tokenizer, cond_length, decoder=None):
        self.device, self.text_encoder, self.text_tokenizer = accelerator.device, text_encoder, text_tokenizer
        self.cond_length = cond_length
        self.decoder = decoder

    def _to_device(self, value):
        if isinstance(value, dict):  # targets of a decoder family: {name: tensor}
            return {k: v.to(self.device) for k, v in value.items()}
        return value.to(self.device) if torch.is_tensor(value) else value

    def __call__(self, batch):
        batch = {k: self._to_device(v) for k, v in batch.items()}
        if "targets" not in batch and self.decoder is not None and batch["captions"]:
            batch["targets"] = encode_family_targets(self.decoder, batch["captions"], device=self.device)
        elif "targets" not in batch and self.text_encoder is not None and batch["captions"]:
            batch["targets"] = encode_captions(
                self.text_encoder, self.text_tokenizer, batch["captions"], self.cond_length
            ).float()
        return batch


def log_metrics(accelerator, output_dir, metrics: dict, step: int):
    accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        with open(os.path.join(output_dir, METRICS_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


class NonFiniteTrainingError(FloatingPointError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(argv)
    accelerator = make_accelerator(config)
    try:
        result = train(config, accelerator)
    except BaseException as error:
        # The frames of the traceback hold the DDP model: free them now, not at interpreter exit (see `shutdown`).
        traceback.clear_frames(error.__traceback__)
        shutdown(accelerator, together=False)
        raise
    shutdown(accelerator, together=True)
    return result


def shutdown(accelerator, together: bool) -> None:
    """Ends trackers and the process group, in order, on every process.

    gloo on CPU can hang at exit when the DDP reducer, still alive during interpreter shutdown, is what destroys the
    process group (its worker thread waits for the GIL). So the DDP model is released while every process is still
    running, then the group is destroyed explicitly. `together`: all processes got here (a normal end), so they can
    wait for each other first; after an error they may not, and nobody waits.
    """
    if together:
        accelerator.wait_for_everyone()
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()  # finishes the trackers and destroys the process group
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    logger.debug("Process group shut down on process %d.", accelerator.process_index)


def make_accelerator(config: TrainConfig) -> Accelerator:
    run = config.run
    # Bad settings fail here, before any model loads.
    engine_name = resolve_sharding(run.sharding, run.deepspeed_config)
    engine = engine_kwargs(engine_name, run.deepspeed_config)
    fsdp = engine_name == "fsdp"
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=True)] if any(
        getattr(config.loss, f"{n}_weight") == 0 for n in LOSS_NAMES
    ) else []
    accelerator = Accelerator(
        # Without a GPU, processes started by torchrun / `accelerate launch --multi_gpu` join a gloo (MULTI_CPU) group
        # only if accelerate is told to use the CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision=run.mixed_precision,
        log_with=None if run.report_to == "none" else run.report_to,
        project_dir=run.output_dir,
        kwargs_handlers=kwargs,
        **engine,
    )
    if fsdp and not torch.cuda.is_available():
        enable_fsdp_on_cpu(accelerator, engine.get("fsdp_plugin"))
    if fsdp:  # also over a launcher's FSDP config, whose bf16 default would reduce the adapter's gradients in bf16
        accelerator.state.fsdp_plugin.mixed_precision_policy = fsdp_mixed_precision()
        quiet_view_warning()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    return accelerator


def train(config: TrainConfig, accelerator) -> dict:
    run, optim = config.run, config.optim
    os.makedirs(run.output_dir, exist_ok=True)
    set_seed(run.seed)

    # 2. Models: frozen LM / vision / SD; trainable GILL parts (+ LoRA). Precomputed targets are checked against the
    #    frozen models before `frozen_dtype` rounds their weights.
    data = config.data
    need_text_encoder = (
        data.train_targets is None
        or (data.val_data and data.val_targets is None)
        or (data.interleaved_data and data.interleaved_targets is None)
        or (data.interleaved_val_data and data.interleaved_val_targets is None)
    )
    models = load_models(
        config.model, seed=run.seed, need_text_encoder=bool(need_text_encoder), need_image_decoder=run.export_pipeline
    )
    train_store = load_store(config.data.train_targets, models)
    val_store = load_store(config.data.val_targets, models)
    interleaved_store = load_store(config.data.interleaved_targets, models)
    interleaved_val_store = load_store(config.data.interleaved_val_targets, models)
    cast_frozen(models, config.model.frozen_dtype)
    pipe = models.pipe
    params = setup_trainable(pipe, config.lora, extra_frozen=(models.text_encoder,))
    if config.model.gradient_checkpointing:
        logger.info("Gradient checkpointing on %d LM blocks.", enable_gradient_checkpointing(pipe.llm))
    row_norms = img_row_norms(pipe.llm)
    gill = pipe.gill

    # 3. Data
    image_size = pipe.image_encoder.config.image_size
    collator = Collator(pipe.tokenizer, len(pipe.img_token_ids), config.data.max_length)
    train_set = build_dataset(
        config.data.train_data, config.data.train_data_type, config.data.image_folder,
        ExampleReader(pipe.feature_extractor, train_store, config.data.cache_images),
        config.data.synthetic_size, image_size, run.seed,
    )
    interleaved_set = interleaved_val_set = None
    interleaved_collator = InterleavedCollator(
        pipe.tokenizer, len(pipe.img_token_ids), gill.config.num_visual_tokens, config.data.interleaved_max_length,
        collator.max_caption_tokens,
    )
    if config.data.interleaved_data is not None:
        interleaved_set = InterleavedDataset(
            config.data.interleaved_data, ExampleReader(pipe.feature_extractor, interleaved_store, config.data.cache_images),
            config.data.interleaved_image_folder,
        )
    if config.data.interleaved_val_data is not None:
        interleaved_val_set = InterleavedDataset(
            config.data.interleaved_val_data, ExampleReader(pipe.feature_extractor, interleaved_val_store, config.data.cache_images),
            config.data.interleaved_val_image_folder,
        )
        if len(interleaved_val_set) > config.data.val_max_samples:
            interleaved_val_set = Subset(interleaved_val_set, range(config.data.val_max_samples))
    val_set = None
    if config.data.val_data or config.data.val_data_type == "synthetic":
        val_set = build_dataset(
            config.data.val_data, config.data.val_data_type, config.data.val_image_folder,
            ExampleReader(pipe.feature_extractor, val_store, config.data.cache_images),
            config.data.synthetic_size, image_size, run.seed + 1,
        )
        if not isinstance(val_set, IterableDataset) and len(val_set) > config.data.val_max_samples:
            val_set = Subset(val_set, range(config.data.val_max_samples))

    # 4. Training module, optimizer, schedule
    model = GILLTrainingModel(
        pipe.llm, gill, pipe.image_encoder, pipe.img_token_ids,
        pad_token_id=pipe.tokenizer.pad_token_id if pipe.tokenizer.pad_token_id is not None else 0,
        bos_token_id=collator.bos, accelerator=accelerator,
        chat=(
            ChatWrapping.from_tokenizer(pipe.tokenizer, data.chat_image_request, data.chat_caption_request)
            if data.chat_template
            else None
        ),
        context_prefix_grad=config.loss.interleaved_context_prefix_grad,
        # A sharded LM gathers its layers at every forward: each process must run the same number of them.
        length_buckets=1 if lm_sharded(accelerator) else config.loss.interleaved_length_buckets,
    )
    optimizer, scheduler = build_optimizer(params, optim)
    # FSDP shards the LM (each decoder layer a unit) and keeps the learned parts whole on every process (see
    # training/sharding.py); their gradients are averaged by `average_replicated_gradients` below.
    replicated = keep_learned_parts_whole(accelerator, gill)
    configure_deepspeed(accelerator, optim.batch_size, optim.grad_accum_steps)
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it per process).
    model, optimizer = accelerator.prepare(model, optimizer)
    # FSDP replaces the sharded parameters (a LoRA adapter's) by new DTensor parameters, and the optimizer's with them:
    # the gradient norm and clipping must read those, not the objects listed before `prepare`.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if models.text_encoder is not None:
        models.text_encoder.to(accelerator.device)
    if models.decoder is not None:
        models.decoder.to(accelerator.device)
    prepare_batch = BatchPreparer(
        accelerator, models.text_encoder, models.text_tokenizer, gill.config.cond_length, decoder=models.decoder
    )
    log_lm_shards(accelerator, pipe.llm, run.output_dir)

    # 5. Resume
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_batches": 0, "samples": 0, "nonfinite_steps": 0,
             "nonfinite_streak": 0, "interleaved_epoch": 0, "interleaved_batch_in_epoch": 0}
    skips = SkipCounter(
        malformed_rows=getattr(train_set, "malformed_rows", 0) + getattr(interleaved_set, "malformed_rows", 0)
    )
    if accelerator.is_main_process:
        clean_stale_temporaries(run.output_dir)
    accelerator.wait_for_everyone()  # the main process may have put back a checkpoint that `resume` names
    if run.resume:
        folder = resolve_resume(run.output_dir, run.resume)
        state.update(load_checkpoint(accelerator, folder, model, optimizer, scheduler))
        saved_skips = load_skips(folder)
        if saved_skips is not None:
            skips.load_state_dict(saved_skips)
        logger.info("Resumed from %s at step %d (epoch %d, batch %d).", folder, state["step"], state["epoch"], state["batch_in_epoch"])
    count_skips(state, skips)
    accelerator.init_trackers(TRACKER_DIR, config={k: str(v) for s in config.to_dict().values() for k, v in s.items()})

    # 6. The loop
    batches = data_batches(train_set, collator, config, accelerator, state["epoch"], state["batch_in_epoch"])
    documents = None
    if interleaved_set is not None:  # its own order and position, saved with the pairs' own
        documents = data_batches(
            interleaved_set, interleaved_collator, config, accelerator, state["interleaved_epoch"],
            state["interleaved_batch_in_epoch"],
        )
    stop_at = optim.max_steps if run.exit_after_steps is None else min(optim.max_steps, state["step"] + run.exit_after_steps)
    history = []
    val_metrics = {}
    progress = None
    if run.progress_bar and accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=optim.max_steps, initial=state["step"], desc="train", dynamic_ncols=True)
    # Backpropagating through a torchao-quantized frozen LM saves its quantized weights, not a dense copy of every
    # layer (training/quantized_backward.py); nothing changes for an unquantized LM.
    with lean_quantized_backward(pipe.llm) as routed:
        if routed:
            logger.info("Backward through %d quantized LM layers without dense copies.", routed)
        while state["step"] < stop_at:
            step = state["step"]
            # micro-steps: forward, backward (gradients synchronised on the last one only)
            sums = {}
            finite = True
            for micro in range(optim.grad_accum_steps):
                interleaved = documents is not None and interleaved_draw(
                    run.seed, step, micro, config.data.interleaved_ratio
                )
                if interleaved:
                    batch = next_nonempty_batch(documents, state, accelerator, skips, position="interleaved_")
                else:
                    batch = next_nonempty_batch(batches, state, accelerator, skips)
                sums["interleaved"] = sums.get("interleaved", 0.0) + float(interleaved) / optim.grad_accum_steps
                batch = prepare_batch(batch)
                state["samples"] += len(batch["keys"]) * accelerator.num_processes
                concat_caption, concat_img = concat_draws(run.seed, step, micro, config.loss.concat_prob)
                last = micro == optim.grad_accum_steps - 1
                with accelerator.no_sync(model) if not last else _nullcontext():
                    out = model(batch, concat_caption=concat_caption, concat_img=concat_img)
                    loss = total_loss(out, config.loss, interleaved=interleaved)
                    accelerator.backward(loss / optim.grad_accum_steps)
                finite = finite and bool(torch.isfinite(loss.detach()))
                for name in LOSS_NAMES + ("total",):
                    value = loss if name == "total" else out.get(name)
                    if value is not None:
                        sums[name] = sums.get(name, 0.0) + value.item() / optim.grad_accum_steps
                sums["global_batch"] = float(out["retrieval_logits"].shape[1])
            average_replicated_gradients(replicated, accelerator)
            # clip (an infinite bound only measures the norm), watch, step, schedule
            grad_norm = accelerator.clip_grad_norm_(params, optim.grad_clip if optim.grad_clip > 0 else math.inf)
            # With fp16 loss scaling, non-finite gradients are the scaler's business (it skips the step, lowers the
            # scale).
            finite = finite and (accelerator.scaler is not None or bool(torch.isfinite(torch.as_tensor(grad_norm))))
            if all_finite(finite, accelerator):
                optimizer.step()
                state["nonfinite_streak"] = 0
                if config.loss.rescale_img_rows:
                    rescale_img_rows(gill, *row_norms)
            else:
                skip_nonfinite_step(state, run, accelerator, sums, grad_norm)
            with warnings.catch_warnings():  # a skipped first step is not the misuse torch warns about
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step + 1
            # log
            record = {f"train/{k}_loss" if k in LOSS_NAMES + ("total",) else f"train/{k}": v for k, v in sums.items()}
            record.update({"train/lr": scheduler.get_last_lr()[0], "train/logit_scale": gill.logit_scale.exp().item()})
            record["data/skipped_total"] = float(state["skipped"])
            record["data/skipped_images_total"] = float(state["skipped_images"])
            record["data/malformed_rows_total"] = float(state["malformed_rows"])
            record["data/skipped_batches_total"] = float(state["skipped_batches"])
            record["train/nonfinite_steps_total"] = float(state["nonfinite_steps"])
            record["train/grad_norm"] = float(grad_norm)
            history.append(record)
            if state["step"] % run.log_every == 0 or state["step"] == 1:
                log_metrics(accelerator, run.output_dir, record, state["step"])
                if state["skipped"]:
                    logger.info("Skipped %d examples so far (%d images missing or unreadable, %d malformed rows).",
                                state["skipped"], state["skipped_images"], state["malformed_rows"])
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{sums['total']:.3f}")
            # validate, checkpoint
            done = state["step"] == stop_at
            validate = (run.val_every and state["step"] % run.val_every == 0) or state["step"] == optim.max_steps
            if validate and (val_set is not None or interleaved_val_set is not None):
                val_metrics = {}
                if val_set is not None:
                    val_metrics.update(
                        run_validation(model, val_set, collator, config, accelerator, prepare_batch, gill, pipe)
                    )
                if interleaved_val_set is not None:  # the same metrics at every image of held-out documents
                    documents_metrics = run_validation(
                        model, interleaved_val_set, interleaved_collator, config, accelerator, prepare_batch, gill, pipe
                    )
                    val_metrics.update(
                        {k.replace("val/", INTERLEAVED_VAL_PREFIX, 1): v for k, v in documents_metrics.items()}
                    )
                log_metrics(accelerator, run.output_dir, val_metrics, state["step"])
                logger.info("step %d validation: %s", state["step"], {k: round(v, 4) for k, v in val_metrics.items()})
            periodic = run.checkpoint_every and state["step"] % run.checkpoint_every == 0
            if periodic or (done and state["step"] < optim.max_steps):
                save_checkpoint(
                    accelerator, run.output_dir, model, optimizer, scheduler, dict(state), run.keep_checkpoints,
                    skips=skips.state_dict(),
                )
    if progress is not None:
        progress.close()
    if state["skipped"]:
        logger.warning("Skipped %d examples in total (%d images missing or unreadable, %d malformed rows).",
                       state["skipped"], state["skipped_images"], state["malformed_rows"])
    if state["nonfinite_steps"]:
        logger.warning("Skipped %d optimizer steps with a non-finite loss or gradient.", state["nonfinite_steps"])

    # 7. Export the trained pipeline
    export_dir = None
    if state["step"] >= optim.max_steps:
        export_dir = export(accelerator, pipe, model, run, models.image_decoder_source)
    return {"history": history, "val": val_metrics, "state": state, "export_dir": export_dir, "output_dir": run.output_dir}


def log_lm_shards(accelerator, llm, output_dir) -> None:
    """How many of the LM's values each process holds (all of them unless FSDP shards it), logged at step 0."""
    counts, total = lm_values_per_process(accelerator, llm)
    record = {"sharding/lm_values": float(total)}
    record.update({f"sharding/lm_values_rank{rank}": float(count) for rank, count in enumerate(counts)})
    log_metrics(accelerator, output_dir, record, 0)


def count_skips(state: dict, skips: SkipCounter) -> None:
    state["skipped"], state["skipped_images"], state["malformed_rows"] = skips.total, skips.images, skips.rows


def next_nonempty_batch(batches, state: dict, accelerator, skips: SkipCounter, position: str = "") -> dict:
    """The next batch with readable images on every process; micro-batches empty on any process are skipped by all
    processes together (counted in `state["skipped_batches"]`). Raises when a whole epoch has no readable image.

    The examples skipped in a batch (any process's) are counted once per key in `skips`, and logged when new. The
    data position is kept in `state[position + "epoch"]` and `state[position + "batch_in_epoch"]`.
    """
    first_empty = None
    while True:
        epoch_key, batch_key = position + "epoch", position + "batch_in_epoch"
        state[epoch_key], state[batch_key], batch = next(batches)
        skipped = batch["skipped_examples"]
        if accelerator.num_processes > 1:
            skipped = gather_object(skipped)  # every process calls this for every micro-batch: a collective
        for key, _, reason in skips.add(skipped):
            if accelerator.is_main_process:
                logger.warning("Skipping example %r: %s", key, reason)
        count_skips(state, skips)
        if not empty_on_any_process(batch, accelerator):
            return batch
        state["skipped_batches"] += 1
        logger.warning(
            "Skipping micro-batch %d of epoch %d (step %d): a process got no readable image in it (%d skipped here).",
            state[batch_key], state[epoch_key], state["step"], int(batch["num_skipped"]),
        )
        where = (state[epoch_key], state[batch_key])
        if first_empty is None:
            first_empty = where
        elif where >= (first_empty[0] + 1, first_empty[1]):
            raise RuntimeError(
                f"A whole epoch of micro-batches had no readable image ({state['skipped']} images skipped): check "
                "`image_folder` (image paths in a TSV are relative to it) and the data files."
            )


def all_finite(local: bool, accelerator) -> bool:
    """Whether the step is finite on every process (the processes must agree to step, or to skip, together)."""
    if accelerator.num_processes == 1:
        return local
    return not bool(accelerator.reduce(torch.tensor(int(not local), device=accelerator.device), reduction="max"))


def skip_nonfinite_step(state: dict, run, accelerator, sums: dict, grad_norm) -> None:
    """A step whose loss or gradient is NaN/inf never reaches the weights, the optimizer moments or a checkpoint: it
    is skipped and counted; after `max_nonfinite_steps` in a row the run stops, its last checkpoint untouched."""
    state["nonfinite_steps"] += 1
    state["nonfinite_streak"] += 1
    if accelerator.is_main_process:
        logger.warning(
            "Step %d skipped: non-finite loss or gradient (loss %s, gradient norm %s); %d in a row.",
            state["step"] + 1, sums.get("total"), float(grad_norm), state["nonfinite_streak"],
        )
    if state["nonfinite_streak"] >= run.max_nonfinite_steps:
        latest = read_latest(run.output_dir)
        raise NonFiniteTrainingError(
            f"{state['nonfinite_streak']} optimizer steps in a row (up to step {state['step'] + 1}) had a non-finite "
            f"loss or gradient (`max_nonfinite_steps`={run.max_nonfinite_steps}); the weights were not updated by "
            f"them. Last checkpoint: {latest or 'none written'}. Lower `lr`, check the data and targets for NaN/inf, "
            "or resume with `--resume latest`."
        )


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def run_validation(model, val_set, collator, config, accelerator, prepare_batch, gill, pipe):
    gill.eval()
    loader = make_loader(
        val_set, collator, config.optim.batch_size, 0, config.run.seed, 0,
        accelerator.process_index, accelerator.num_processes, shuffle=False,
    )
    metrics = evaluate(model, loader, prepare_batch, accelerator)
    set_train_modes(pipe.llm, gill, pipe.image_encoder)
    return metrics


def export(accelerator, pipe, model, run, image_decoder_source=None) -> str | None:
    """Saves the trained pipeline (the learned parts small and separate in `gill/`, a LoRA adapter in `llm_lora/`).

    The exported pipeline is complete: the UNet, VAE and scheduler left out of training are read again from
    `image_decoder_source` (the run's input pipeline folder) first.
    """
    accelerator.wait_for_everyone()
    if any(is_sharded(p) for p in pipe.llm.parameters()):
        export_learned_parts(accelerator, pipe, run.output_dir, GILL_DIR, run.export_pipeline)
        return None
    export_dir = os.path.join(run.output_dir, EXPORT_DIR)
    if accelerator.is_main_process:
        pipe.gill.eval()
        pipe.gill.save_pretrained(os.path.join(run.output_dir, GILL_DIR))
        if run.export_pipeline:
            if image_decoder_source is not None:
                attach_image_decoder(pipe, image_decoder_source)
            pipe.save_pretrained(export_dir)
            logger.info("Exported the trained pipeline to %s", export_dir)
    accelerator.wait_for_everyone()
    return export_dir if run.export_pipeline else None


if __name__ == "__main__":
    main(sys.argv[1:])
