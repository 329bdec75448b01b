"""Which weights train: GILL's learned parts (minus the decision head) and, optionally, a LoRA adapter on the LM.

Everything else (LM, vision encoder, SD text encoder, VAE, UNet) is frozen and kept in eval mode. Parameters are
chosen by module, never by matching names.
"""

import functools
import logging

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from gill_pipeline.serialization.lora import is_peft_model

logger = logging.getLogger(__name__)

CHECKPOINTED_FLAG = "_gill_gradient_checkpointing"  # set on an LM block whose forward recomputes in the backward


def freeze(module) -> None:
    if module is not None:
        module.requires_grad_(False)
        module.eval()


def apply_lora(pipe, lora_args) -> None:
    """Wraps `pipe.llm` in a trainable peft LoRA adapter (saved to `llm_lora/` by `pipe.save_pretrained`)."""
    from peft import LoraConfig, get_peft_model

    if is_peft_model(pipe.llm):
        raise ValueError(
            "`lora` is true, but the pipeline's LM already carries a LoRA adapter (llm_lora/). Start from a pipeline "
            "without one, or train with `lora: false` (the existing adapter is then applied, frozen)."
        )
    targets = lora_args.lora_target_modules
    config = LoraConfig(
        r=lora_args.lora_rank,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else list(targets),
        bias="none",
    )
    pipe.register_modules(llm=get_peft_model(pipe.llm, config))


def setup_trainable(pipe, lora_args, extra_frozen=()) -> list[nn.Parameter]:
    """Freezes the frozen parts, applies LoRA if asked, and returns the parameters to optimise."""
    for module in (pipe.llm, pipe.image_encoder, pipe.vae, pipe.unet, getattr(pipe, "transformer", None), *extra_frozen):
        freeze(module)
    if lora_args.lora:
        apply_lora(pipe, lora_args)  # peft freezes the base weights and leaves the adapter trainable
    pipe.gill.requires_grad_(True)
    pipe.gill.decision_head.requires_grad_(False)  # trained afterwards by train_decision.py
    for stored_negative in pipe.gill.negative_conditioning().values():  # the decoder's negatives, never trained
        stored_negative.requires_grad_(False)
    set_train_modes(pipe.llm, pipe.gill, pipe.image_encoder)
    params = [p for p in pipe.gill.parameters() if p.requires_grad]
    params += [p for p in pipe.llm.parameters() if p.requires_grad]
    count = sum(p.numel() for p in params)
    logger.info("Training %d tensors (%.2fM values); LoRA %s.", len(params), count / 1e6, "on" if lora_args.lora else "off")
    return params


def set_train_modes(llm, gill, image_encoder) -> None:
    """Learned parts in train mode; frozen models in eval mode (their dropout off, as in the reference).

    A LoRA adapter's own dropout stays active in training: it is the only dropout inside the LM that is switched on.
    """
    gill.train()
    gill.decision_head.eval()
    llm.eval()
    if image_encoder is not None:
        image_encoder.eval()
    if is_peft_model(llm):
        for module in llm.modules():
            lora_dropout = getattr(module, "lora_dropout", None)
            if isinstance(lora_dropout, nn.ModuleDict):
                lora_dropout.train()


@torch.no_grad()
def img_row_norms(llm) -> tuple[float, float | None]:
    """Mean norm of the LM's own input rows (and output rows for untied LMs): what the [IMG] rows are rescaled to.

    These are norms of the embedding MATRIX rows, before any scale the embedding module applies (Gemma's
    `embed_scale`): the [IMG] rows live in that same space and get the module's scale when they are embedded
    (`gill_pipeline.models.lm_bridge.embed_tokens`), as text rows do.
    """
    inputs = llm.get_input_embeddings().weight.float().norm(dim=1).mean().item()
    outputs = llm.get_output_embeddings()
    out_norm = None if outputs is None else outputs.weight.float().norm(dim=1).mean().item()
    return inputs, out_norm


@torch.no_grad()
def rescale_img_rows(gill, input_norm: float, output_norm: float | None) -> None:
    """The reference's post-step rescaling: every [IMG] row gets the mean norm of the frozen rows, so the learned
    tokens stay on the scale the LM was trained with."""
    rows = gill.img_input_embeddings
    rows.mul_(input_norm / rows.norm(dim=1, keepdim=True).clamp_min(1e-12))
    if gill.img_output_embeddings is not None and output_norm is not None:
        out = gill.img_output_embeddings
        out.mul_(output_norm / out.norm(dim=1, keepdim=True).clamp_min(1e-12))


def decoder_layers(llm) -> list[nn.Module]:
    """The LM's transformer blocks (outermost `GradientCheckpointingLayer`s, as transformers marks them)."""
    layers = []
    for module in llm.modules():
        if isinstance(module, GradientCheckpointingLayer) and not any(module in layer.modules() for layer in layers):
            layers.append(module)
    if not layers:
        raise ValueError(
            f"`gradient_checkpointing` needs an LM whose blocks are transformers `GradientCheckpointingLayer`s; "
            f"{type(llm).__name__} has none."
        )
    return layers


def _checkpointed_forward(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # validation, decision features: nothing to recompute
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_gradient_checkpointing(llm) -> int:
    """Recompute each LM block's activations in the backward pass instead of storing them.

    transformers' own `gradient_checkpointing_enable()` only acts in train mode (`self.training`), and the frozen LM
    stays in eval mode (no dropout, as in the reference), so each block's `forward` is wrapped here instead:
    same outputs and gradients, eval mode kept. A LoRA adapter's dropout draws the same mask when recomputed (torch
    restores the RNG state). The LM must run without a KV cache (`use_cache=False`), which a recomputation would fill
    twice. Returns the number of wrapped blocks.
    """
    layers = decoder_layers(llm)
    for layer in layers:
        if not getattr(layer, CHECKPOINTED_FLAG, False):
            layer.forward = functools.partial(_checkpointed_forward, layer.forward)
            setattr(layer, CHECKPOINTED_FLAG, True)
    return len(layers)
