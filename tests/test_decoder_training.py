"""Training GILL for decoder families other than SD 1.x/2.x (issue 10, section 3): targets from the family's own
`encode_prompt`, precomputed (sharded, fp16, fingerprinted, layout recorded) or on the fly, and a training step with
the loss over every learned tensor, LoRA as for SD."""

import pytest
import torch

from training.data import Collator, ExampleReader, SyntheticDataset, iterate_records
from training.model_forward import GILLTrainingModel, total_loss
from training.params import LoraArgs, LossArgs
from training.precompute import precompute_targets
from training.setup_models import build_tiny_models
from training.targets import TargetMismatchError, TargetStore, encode_family_targets
from training.train_gill import BatchPreparer
from training.trainable import setup_trainable

SIZE = 4


class _Accelerator:
    device = torch.device("cpu")


def precompute(models, folder):
    image_size = models.pipe.image_encoder.config.image_size
    records = iterate_records(None, "synthetic", None, SIZE, image_size, 0)
    return precompute_targets(
        records, models.text_encoder, models.text_tokenizer, str(folder), None, shard_size=3, decoder=models.decoder
    )


def training_batch(models, store=None):
    pipe = models.pipe
    collator = Collator(pipe.tokenizer, len(pipe.img_token_ids), 16)
    reader = ExampleReader(pipe.feature_extractor, store)
    dataset = SyntheticDataset(SIZE, pipe.image_encoder.config.image_size, reader)
    return collator, collator([dataset[i] for i in range(SIZE)])


@pytest.mark.parametrize("name, lora", [("sdxl", False), ("flux-dev", True), ("pixart-sigma", False)])
def test_precomputed_targets_and_a_training_step(name, lora, tmp_path):
    models = build_tiny_models("opt", seed=0, decoder=name)
    summary = precompute(models, tmp_path)
    assert summary == {"count": SIZE, "skipped": 0, "shards": 2}
    store = TargetStore(str(tmp_path))
    store.validate(models.pipe.gill, decoder=models.decoder)
    assert store.layout.pipeline_class == models.pipe.gill.conditioning_layout.pipeline_class

    collator, batch = training_batch(models, store)
    stored = batch["targets"]
    assert sorted(stored) == sorted(models.pipe.gill.conditioning_layout.names)
    # Stored in float16: equal to the family's own encode_prompt up to that rounding.
    on_the_fly = encode_family_targets(models.decoder, batch["captions"])
    for key, value in on_the_fly.items():
        torch.testing.assert_close(stored[key].to(value.dtype), value, atol=2e-3, rtol=2e-3)
    # On the fly (no stored targets): the same encode_prompt outputs, unrounded.
    prepared = BatchPreparer(_Accelerator(), None, None, None, decoder=models.decoder)(
        {k: v for k, v in batch.items() if k != "targets"}
    )
    for key, value in on_the_fly.items():
        torch.testing.assert_close(prepared["targets"][key], value, atol=0, rtol=0)

    params = setup_trainable(models.pipe, LoraArgs(lora=lora, lora_rank=2))
    pad = models.pipe.tokenizer.pad_token_id or 0
    model = GILLTrainingModel(
        models.pipe.llm, models.pipe.gill, models.pipe.image_encoder, models.pipe.img_token_ids,
        pad_token_id=pad, bos_token_id=collator.bos,
    )
    out = model(batch)
    assert torch.isfinite(out["generation"]) and out["generation"] > 0
    loss = total_loss(out, LossArgs())
    loss.backward()
    mapper = models.pipe.gill.mapper
    heads = [mapper.model] + ([mapper.pooled_head] if mapper.pooled_head is not None else [])
    for head in heads:
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    if lora:
        lora_grads = [p.grad for n, p in models.pipe.llm.named_parameters() if "lora_" in n and p.requires_grad]
        assert lora_grads and any(g is not None and g.abs().sum() > 0 for g in lora_grads)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    optimizer.step()


def test_targets_of_another_decoder_are_refused_naming_both(tmp_path):
    flux = build_tiny_models("opt", seed=0, decoder="flux-dev")
    precompute(flux, tmp_path / "flux")
    sd = build_tiny_models("opt", seed=0)
    precompute(sd, tmp_path / "sd")
    with pytest.raises(TargetMismatchError, match="FluxPipeline.*StableDiffusionPipeline"):
        TargetStore(str(tmp_path / "flux")).validate(sd.pipe.gill)
    with pytest.raises(TargetMismatchError, match="Stable Diffusion 1.x/2.x targets.*FluxPipeline"):
        TargetStore(str(tmp_path / "sd")).validate(flux.pipe.gill)
    pixart = build_tiny_models("opt", seed=0, decoder="pixart-sigma")
    with pytest.raises(TargetMismatchError, match="FluxPipeline.*PixArtSigmaPipeline"):
        TargetStore(str(tmp_path / "flux")).validate(pixart.pipe.gill, decoder=pixart.decoder)
