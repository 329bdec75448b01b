"""Converting the reference GILL release (github kohjingyu/gill) into this package's format.

The release is `model_args.json`, `pretrained_ckpt.pth.tar` (the learned tensors, keys `model.*`) and
`decision_model.pth.tar` (the decision head). Pickled files are read only with
`torch.load(..., weights_only=True)`; a file that needs more is refused.

Reference name (after an optional `module.` prefix)         -> `GILLModel` name
    model.input_embeddings.weight (last `num_tokens` rows)  -> img_input_embeddings
    model.visual_embeddings.{weight,bias}                   -> visual_prefix.*
    model.visual_fc.{weight,bias}                           -> ret_image_proj.*
    model.ret_text_hidden_fcs.0.model.{weight,bias}         -> ret_text_proj.*
    model.gen_text_hidden_fcs.0.{fc,tfm,model}.*            -> mapper.{fc,tfm,model}.*
    model.gen_text_hidden_fcs.0.query_embs                  -> mapper.query_embs
    model.logit_scale                                       -> logit_scale
    (decision file) 1.{weight,bias}                         -> decision_head.1.*

The reference tokenizer adds a `<|image|>` token and then `[IMG0]`..`[IMG7]` to OPT's (ids 50266..50273 for OPT);
the converter does the same on a copy of the LM's tokenizer and checks that the ids equal those in
`model_args.json`. The LM itself is not resized: the pipeline puts the learned `[IMG]` rows in place of the LM's
lookup and adds their logits, which gives the reference's resized-embedding behaviour.
"""

import copy
import json
import os
import pickle
import re

import torch
from diffusers.utils import logging

from ..constants import IMG_TOKEN_TEMPLATE
from ..models.dims import lm_dims, vision_feature_dim
from ..models.gill_model import GILLModel
from ..pipeline import GILLPipeline
from ..pipeline.assembly import _load_lm, _load_sd, _load_vision, encode_empty_prompt
from ..serialization.base_models import record_base_models
from ..serialization.components import pipeline_from_parts
from ..serialization.folder import refuse_remote_code, resolve_dtype
from ..serialization.model_card import ModelCardInfo, write_model_card

logger = logging.get_logger(__name__)

REFERENCE_ARGS_FILE = "model_args.json"
REFERENCE_CHECKPOINT_FILE = "pretrained_ckpt.pth.tar"
REFERENCE_DECISION_FILE = "decision_model.pth.tar"
REFERENCE_IMAGE_TOKEN = "<|image|>"  # the reference adds it as the tokenizer's cls token, before the [IMG] tokens
# The reference decoded with "runwayml/stable-diffusion-v1-5", since removed from the Hub; this is its official copy.
REFERENCE_STABLE_DIFFUSION = "stable-diffusion-v1-5/stable-diffusion-v1-5"
REFERENCE_MAPPER_HEADS = 4  # hard-coded in the reference's TextFcLayer; not visible in the weights
REFERENCE_DECISION_DROPOUT = 0.5
REFERENCE_DATASET = "google-research-datasets/conceptual_captions"
# Settings of model_args.json this converter supports (anything else changes the architecture).
SUPPORTED_ARGS = {
    "text_emb_layers": [[-1]],
    "text_fc_mode": ["gill_mapper"],
    "ret_text_fc_mode": ["linear"],
    "share_ret_gen": [True],
    "norm_image_embed": ["none", None],
}
_PREFIXES = ("module.", "model.")
_KEY_MAP = (
    (r"^visual_embeddings\.(weight|bias)$", r"visual_prefix.\1"),
    (r"^visual_fc\.(weight|bias)$", r"ret_image_proj.\1"),
    (r"^ret_text_hidden_fcs\.0\.model\.(weight|bias)$", r"ret_text_proj.\1"),
    (r"^gen_text_hidden_fcs\.0\.((fc|model)\.(weight|bias))$", r"mapper.\1"),
    (r"^gen_text_hidden_fcs\.0\.(tfm\..+)$", r"mapper.\1"),
    (r"^gen_text_hidden_fcs\.0\.query_embs$", "mapper.query_embs"),
    (r"^logit_scale$", "logit_scale"),
    (r"^input_embeddings\.weight$", "img_input_embeddings"),
)
_DECISION_KEY_MAP = ((r"^1\.(weight|bias)$", r"decision_head.1.\1"),)


class CheckpointError(ValueError):
    """A reference checkpoint file cannot be converted; the message names the file and what is wrong."""


# --------------------------------------------------------------------------------------------------------------
# Reading the reference files
# --------------------------------------------------------------------------------------------------------------
def load_reference_pickle(path: str | os.PathLike, what: str = "checkpoint"):
    """`torch.load(path, map_location="cpu", weights_only=True)`; a file that needs more is refused, by name."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"The reference {what} file {path} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"Refusing to load the reference {what} {path}: it holds Python objects other than tensors and plain "
            "containers, and loading those could run arbitrary code (torch.load with weights_only=True refused it: "
            f"{str(error).splitlines()[-1] if str(error) else error}). If you trust the file, re-save only its "
            "tensors (e.g. `torch.save({'state_dict': ckpt['state_dict']}, new_path)`) and convert that."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"Cannot read the reference {what} {path}: {error}") from error


def read_model_args(model_args: str | os.PathLike | dict) -> dict:
    """`model_args.json` (a path or the parsed dict), checked for settings this converter supports."""
    if not isinstance(model_args, dict):
        path = str(model_args)
        try:
            with open(path, encoding="utf-8") as f:
                model_args = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"Cannot read the reference `model_args` file {path}: {error}") from error
        if not isinstance(model_args, dict):
            raise CheckpointError(
                f"The reference `model_args` file {path} holds a {type(model_args).__name__}, not a JSON object."
            )
    for key, allowed in SUPPORTED_ARGS.items():
        if key in model_args and model_args[key] not in allowed:
            raise CheckpointError(
                f"`model_args[{key!r}]` is {model_args[key]!r}; the converter supports {allowed} (the released GILL "
                "settings)."
            )
    ret_ids, gen_ids = model_args.get("retrieval_token_idx"), model_args.get("gen_token_idx")
    if ret_ids is not None and gen_ids is not None and list(ret_ids) != list(gen_ids):
        raise CheckpointError(
            f"`model_args` has different retrieval {ret_ids} and generation {gen_ids} token ids; the converter supports "
            "shared [IMG] tokens only."
        )
    return model_args


def _state_dict(obj, path: str) -> dict[str, torch.Tensor]:
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path} is not a reference GILL checkpoint: expected a dict of tensors (or a dict with a `state_dict` "
            f"entry holding one), got {type(obj).__name__}."
        )
    return state


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def map_reference_keys(state: dict[str, torch.Tensor], path: str, key_map=_KEY_MAP, strip=True) -> dict:
    """Reference names -> `GILLModel` names; a key the map does not know is an error that lists every such key."""
    mapped, unexpected = {}, []
    for key, value in state.items():
        short = _strip_prefixes(key) if strip else (key[len("module.") :] if key.startswith("module.") else key)
        for pattern, replacement in key_map:
            if re.match(pattern, short):
                mapped[re.sub(pattern, replacement, short)] = value
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(f"{path} has keys this converter does not know (unexpected): {sorted(unexpected)}.")
    return mapped


def read_reference_checkpoint(path: str | os.PathLike, num_img_tokens: int) -> dict[str, torch.Tensor]:
    """`pretrained_ckpt.pth.tar` -> tensors under `GILLModel` names (the `[IMG]` rows cut to the last `r`)."""
    path = str(path)
    mapped = map_reference_keys(_state_dict(load_reference_pickle(path, "checkpoint"), path), path)
    rows = mapped.get("img_input_embeddings")
    if rows is not None:
        if rows.ndim != 2 or rows.shape[0] < num_img_tokens:
            raise CheckpointError(
                f"{path}: `input_embeddings.weight` has shape {tuple(rows.shape)}; expected at least "
                f"{num_img_tokens} rows (the [IMG] tokens)."
            )
        if rows.shape[0] > num_img_tokens:
            logger.info("%s holds the full embedding matrix; keeping its last %d rows ([IMG]).", path, num_img_tokens)
        mapped["img_input_embeddings"] = rows[-num_img_tokens:]
    return mapped


def read_reference_decision_head(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """`decision_model.pth.tar` -> `{"decision_head.1.weight", "decision_head.1.bias"}`."""
    path = str(path)
    mapped = map_reference_keys(
        _state_dict(load_reference_pickle(path, "decision model"), path), path, _DECISION_KEY_MAP, strip=False
    )
    missing = sorted({"decision_head.1.weight", "decision_head.1.bias"} - set(mapped))
    if missing:
        raise CheckpointError(f"{path} is missing the decision head's tensors {missing} (reference keys `1.weight`, `1.bias`).")
    return mapped


# --------------------------------------------------------------------------------------------------------------
# Building the learned module
# --------------------------------------------------------------------------------------------------------------
def _count_layers(mapped: dict, part: str) -> int:
    indices = {int(m.group(1)) for k in mapped if (m := re.match(rf"^mapper\.tfm\.{part}\.layers\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def gill_config_from_reference(mapped: dict, model_args: dict, path: str, mapper_heads: int) -> dict:
    """`GILLModel` arguments read off the reference tensors' shapes (and `model_args.json` where they agree)."""
    needed = ("img_input_embeddings", "visual_prefix.weight", "ret_text_proj.weight", "ret_image_proj.weight",
              "mapper.fc.weight", "mapper.model.weight", "mapper.query_embs")
    missing = [k for k in needed if k not in mapped]
    if missing:
        raise CheckpointError(f"{path} is missing tensors needed to rebuild GILL's learned parts: {missing}.")
    rows = mapped["img_input_embeddings"]
    lm_dim = rows.shape[1]
    vision_dim = mapped["visual_prefix.weight"].shape[1]
    num_visual_tokens = mapped["visual_prefix.weight"].shape[0] // lm_dim
    config = dict(
        lm_input_dim=lm_dim,
        lm_hidden_dim=mapped["ret_text_proj.weight"].shape[1],
        vision_dim=vision_dim,
        cond_dim=mapped["mapper.model.weight"].shape[0],
        cond_length=mapped["mapper.query_embs"].shape[1],
        num_img_tokens=rows.shape[0],
        num_visual_tokens=num_visual_tokens,
        retrieval_dim=mapped["ret_text_proj.weight"].shape[0],
        tie_img_embeddings=True,  # the reference (OPT) ties the [IMG] output rows to the input rows
        mapper_hidden_dim=mapped["mapper.fc.weight"].shape[0],
        mapper_encoder_layers=_count_layers(mapped, "encoder"),
        mapper_decoder_layers=_count_layers(mapped, "decoder"),
        mapper_heads=mapper_heads,
        decision_dropout=REFERENCE_DECISION_DROPOUT,
    )
    for arg, key in (("n_visual_tokens", "num_visual_tokens"), ("ret_emb_dim", "retrieval_dim"),
                     ("gen_emb_dim", "cond_dim"), ("num_clip_tokens", "cond_length")):
        if arg in model_args and model_args[arg] != config[key]:
            raise CheckpointError(
                f"`model_args[{arg!r}]` is {model_args[arg]} but the tensors of {path} give {config[key]}: the files "
                "do not belong together."
            )
    return config


def build_gill_model_from_reference(
    checkpoint: str | os.PathLike,
    model_args: str | os.PathLike | dict,
    decision_model: str | os.PathLike | None = None,
    mapper_heads: int = REFERENCE_MAPPER_HEADS,
):
    """The reference's learned tensors as a [`GILLModel`] (strict: every tensor used, every parameter filled;
    without `decision_model` the decision head keeps its random initialisation, with a warning). The
    `uncond_prompt_embeds` buffer is left at zero: set it from the Stable Diffusion text encoder."""
    model_args = read_model_args(model_args)
    num_tokens = int(model_args.get("num_tokens", 8))
    path = str(checkpoint)
    mapped = read_reference_checkpoint(path, num_tokens)
    if decision_model is not None:
        mapped.update(read_reference_decision_head(decision_model))
    else:
        logger.warning("No decision model given: the decision head (generate or retrieve) stays random.")
    gill = GILLModel(**gill_config_from_reference(mapped, model_args, path, mapper_heads))
    expected = {k for k in gill.state_dict() if k != "uncond_prompt_embeds"}
    if decision_model is None:
        expected -= {"decision_head.1.weight", "decision_head.1.bias"}
    missing = sorted(expected - set(mapped))
    if missing:
        raise CheckpointError(f"{path} is missing tensors of GILL's learned parts: {missing}.")
    own = gill.state_dict()
    for key, value in mapped.items():
        if own[key].shape != value.shape:
            source = decision_model if key.startswith("decision_head") else path
            raise CheckpointError(
                f"{source}: tensor for `{key}` has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}."
            )
    gill.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in mapped.items()}}, strict=True)
    return gill.eval()


def load_reference_decision_head(gill, decision_model: str | os.PathLike):
    """Loads the reference decision head file into an existing [`GILLModel`] (shapes checked); returns `gill`."""
    mapped = read_reference_decision_head(decision_model)
    head = gill.decision_head[1]
    for key, value in mapped.items():
        own = head.weight if key.endswith("weight") else head.bias
        if own.shape != value.shape:
            raise CheckpointError(
                f"{decision_model}: `{key}` has shape {tuple(value.shape)} but this GILLModel's is {tuple(own.shape)} "
                f"(its LM hidden width is {gill.config.lm_hidden_dim})."
            )
        with torch.no_grad():
            own.copy_(value.to(own.dtype))
    return gill


# --------------------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------------------
def reference_tokenizer(tokenizer, model_args: dict, num_img_tokens: int):
    """A copy of the LM's tokenizer with the reference's added tokens, and the `[IMG]` ids (checked against
    `model_args`). The reference adds `<|image|>` as cls token, then `[IMG0]`..: for OPT, ids 50265 and 50266...."""
    tokenizer = copy.deepcopy(tokenizer)
    expected = model_args.get("gen_token_idx") or model_args.get("retrieval_token_idx")
    base = len(tokenizer)
    # The reference always adds the cls token first; a model_args whose ids start at len(tokenizer) had none.
    if expected is None or int(expected[0]) != base:
        tokenizer.add_special_tokens({"cls_token": REFERENCE_IMAGE_TOKEN})
    tokens = [IMG_TOKEN_TEMPLATE.format(i=i) for i in range(num_img_tokens)]
    tokenizer.add_tokens(tokens, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if expected is not None and [int(i) for i in expected] != ids:
        raise CheckpointError(
            f"The LM's tokenizer has {base} tokens, which gives the [IMG] tokens the ids {ids}, but the checkpoint was "
            f"trained with {list(expected)} (`model_args['gen_token_idx']`): this is not the tokenizer of the LM the "
            "checkpoint was made for."
        )
    return tokenizer, ids


# --------------------------------------------------------------------------------------------------------------
# The whole conversion
# --------------------------------------------------------------------------------------------------------------
def convert_original_checkpoint(
    model_args: str | os.PathLike | dict,
    checkpoint: str | os.PathLike,
    decision_model: str | os.PathLike | None = None,
    language_model=None,
    stable_diffusion=None,
    image_encoder=None,
    tokenizer=None,
    feature_extractor=None,
    base_models: dict | None = None,
    mapper_heads: int = REFERENCE_MAPPER_HEADS,
    dtype: torch.dtype | None = None,
    pipeline_class=None,
    **load_kwargs,
):
    r"""
    Converts the reference GILL release into a [`GILLPipeline`] that behaves like the reference.

    Args:
        model_args (`str` or `dict`): `model_args.json` (path or parsed).
        checkpoint (`str`): `pretrained_ckpt.pth.tar`.
        decision_model (`str`, *optional*): `decision_model.pth.tar`; without it the decision head is random.
        language_model (`str` or model, *optional*): defaults to `model_args["opt_version"]` (facebook/opt-6.7b).
        stable_diffusion (`str` or [`StableDiffusionPipeline`], *optional*): defaults to SD v1.5
            (`REFERENCE_STABLE_DIFFUSION`). Its text encoder is used once, for the empty-prompt embedding.
        image_encoder (`str` or model, *optional*): defaults to `model_args["visual_encoder"]`.
        tokenizer, feature_extractor (*optional*): needed when the LM / vision encoder are given as objects.
        base_models (`dict`, *optional*): the record of the base models' Hub ids; made from the names by default.
        mapper_heads (`int`, *optional*, defaults to 4): attention heads of the mapper (not visible in the weights).
        dtype (`torch.dtype` or `str`, *optional*): load the base models in this dtype (or dtype name, e.g.
            `"bfloat16"`) and cast the pipeline to it.
        load_kwargs: passed to every `from_pretrained` of a base model (`revision`, `token`, `cache_dir`,
            `local_files_only`).
    """
    if pipeline_class is None:
        pipeline_class = GILLPipeline
    model_args = read_model_args(model_args)
    gill = build_gill_model_from_reference(checkpoint, model_args, decision_model, mapper_heads)
    config = gill.config

    language_model = language_model if language_model is not None else model_args.get("opt_version")
    image_encoder = image_encoder if image_encoder is not None else model_args.get("visual_encoder")
    stable_diffusion = stable_diffusion if stable_diffusion is not None else REFERENCE_STABLE_DIFFUSION
    if language_model is None or image_encoder is None:
        raise ValueError(
            "`language_model` and `image_encoder` are needed: `model_args` names no `opt_version`/`visual_encoder`."
        )
    if base_models is None:
        base_models = record_base_models(language_model, stable_diffusion, image_encoder, load_kwargs.get("revision"))
    # The same rules as every loader (docs/security.md): dtype names, no remote code, base models from safetensors.
    refuse_remote_code(load_kwargs, "convert_original_checkpoint")
    dtype = resolve_dtype(dtype)
    if dtype is not None:
        load_kwargs["dtype"] = dtype
    load_kwargs.setdefault("use_safetensors", True)
    llm, tokenizer = _load_lm(language_model, tokenizer, load_kwargs)
    sd = _load_sd(stable_diffusion, dict(load_kwargs))
    image_encoder, feature_extractor = _load_vision(image_encoder, feature_extractor, load_kwargs)

    # The base models must be the ones the checkpoint was trained with: check every width.
    lm_input, lm_hidden, tied = lm_dims(llm)
    if not tied:
        raise CheckpointError(
            f"The LM ({type(llm).__name__}) has untied input/output embeddings; the reference checkpoint holds only "
            "input rows for the [IMG] tokens, which serve as output rows for tied LMs such as OPT."
        )
    checks = (
        ("LM input embedding width", lm_input, config.lm_input_dim),
        ("LM last hidden width", lm_hidden, config.lm_hidden_dim),
        ("vision encoder feature width", vision_feature_dim(image_encoder), config.vision_dim),
        ("UNet cross-attention width", sd.unet.config.cross_attention_dim, config.cond_dim),
    )
    for what, got, want in checks:
        if got != want:
            raise CheckpointError(f"The base models do not fit the checkpoint {checkpoint}: {what} is {got}, the checkpoint needs {want}.")
    uncond = encode_empty_prompt(sd.text_encoder, sd.tokenizer, config.cond_length)
    if tuple(uncond.shape[1:]) != tuple(gill.uncond_prompt_embeds.shape[1:]):
        raise CheckpointError(
            f"The Stable Diffusion text encoder gives {tuple(uncond.shape)} for the empty prompt; the checkpoint's "
            f"mapper produces ({config.cond_length}, {config.cond_dim})."
        )
    with torch.no_grad():
        gill.uncond_prompt_embeds.copy_(uncond)

    tokenizer, img_token_ids = reference_tokenizer(tokenizer, model_args, config.num_img_tokens)
    return pipeline_from_parts(
        pipeline_class, dtype, tokenizer=tokenizer, llm=llm, gill=gill, vae=sd.vae, unet=sd.unet,
        scheduler=sd.scheduler, image_encoder=image_encoder, feature_extractor=feature_extractor,
        img_token_ids=img_token_ids, base_models=base_models,
    )


def reference_card_info():
    """What the model card of a converted release says about its training and reported results."""
    return ModelCardInfo(
        description=(
            "Converted from the reference GILL release (github.com/kohjingyu/gill, `pretrained_ckpt.pth.tar` and "
            "`decision_model.pth.tar`) with `gill convert-original`. For the same inputs it gives the reference's "
            "tokens, [IMG] hidden states, prompt embeddings, decision and retrieval scores (within float tolerance)."
        ),
        datasets=[REFERENCE_DATASET],
        training_data=(
            "CC3M image-caption pairs (captioning, [IMG] token, retrieval and generation losses); the decision head "
            "on PartiPrompts prompts with human generate/retrieve labels."
        ),
        metrics={"VIST 5th-image CLIP similarity (5 captions + 4 images)": 0.641},
        metrics_source="reported in the GILL paper (not re-measured here)",
        license="other",
        tags=["opt", "stable-diffusion", "converted"],
    )


def convert_original_to_folder(
    output_dir: str | os.PathLike,
    model_args: str | os.PathLike | dict,
    checkpoint: str | os.PathLike,
    decision_model: str | os.PathLike | None = None,
    learned_weights_only: bool = False,
    **convert_kwargs,
) -> str:
    """Converts the release (see [`convert_original_checkpoint`]) and saves it with a model card: a whole pipeline
    folder, or with `learned_weights_only=True` a learned-weights folder (MBs). Returns `output_dir`."""
    pipe = convert_original_checkpoint(model_args, checkpoint, decision_model, **convert_kwargs)
    output_dir = str(output_dir)
    if learned_weights_only:
        pipe.save_learned_weights(output_dir)
    else:
        pipe.save_pretrained(output_dir)
    write_model_card(output_dir, info=reference_card_info())
    logger.info("Wrote the converted GILL %s to %s", "learned weights" if learned_weights_only else "pipeline", output_dir)
    return output_dir
