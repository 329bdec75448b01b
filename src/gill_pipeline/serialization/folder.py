"""Checks made before any weight is read, so that what is wrong is named by file and argument.

- [`resolve_dtype`]: the usual dtype names (`"float16"`, `"fp16"`, `"bf16"`, `"torch.float32"`, ...) or a refusal.
- [`validate_pipeline_folder`], [`validate_learned_weights_folder`]: every file a loader will read exists and parses,
  every component's config is a JSON object of the right kind, every class comes from `diffusers`, `transformers` or
  `gill_pipeline`, and nothing pickled or importable is there (pickles only with `allow_pickle=True`).
- [`check_pipeline_fit_from_configs`], [`check_fit`], [`check_img_tokens`]: the learned parts fit the base models
  (widths, tied embeddings, `[IMG]` token ids), from config files before loading, or from loaded models.

See docs/security.md for what is loaded from where and what is refused.
"""

import importlib
import json
import os

import diffusers
import torch
import transformers
from diffusers import ModelMixin, SchedulerMixin
from diffusers.utils import logging
from safetensors import safe_open
from transformers import PreTrainedModel

from ..constants import (
    CODE_SUFFIXES,
    GILL_COMPONENT,
    IMAGE_ENCODER_COMPONENT,
    IMG_TOKEN_TEMPLATE,
    LIBRARY_NAME,
    LLM_COMPONENT,
    MODEL_CONFIG_FILE,
    MODEL_INDEX_FILE,
    PICKLE_SUFFIXES,
    PREPROCESSOR_CONFIG_FILE,
    SCHEDULER_CONFIG_FILE,
    TOKENIZER_COMPONENT,
    TOKENIZER_FILES,
    TRANSFORMER_COMPONENT,
    UNET_COMPONENT,
)
from ..decoders.fit import check_decoder_fits
from ..models.dims import lm_dims, lm_dims_from_config, vision_feature_dim, vision_feature_dim_from_config
from .saved_dtypes import saved_component_dtypes

logger = logging.get_logger(__name__)


class PipelineFolderError(OSError):
    """A file of a saved GILL pipeline (or learned-weights) folder is missing, unreadable or of the wrong kind."""


class UnsafeFileError(PipelineFolderError):
    """A folder holds a pickled weight file (refused unless `allow_pickle=True`) or a code file (always refused)."""


# Libraries whose classes a saved pipeline may name in `model_index.json`; our own modules are named by module path.
ALLOWED_LIBRARIES = ("diffusers", "transformers")
OWN_LIBRARY = LIBRARY_NAME
# diffusers' `from_pretrained` arguments that load code from a folder, a file or the Hub: never accepted.
REMOTE_CODE_ARGUMENTS = ("custom_pipeline", "custom_revision", "trust_remote_code")

DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------
def resolve_dtype(value, argument: str = "dtype") -> torch.dtype | None:
    """A floating-point `torch.dtype` (or None) from a dtype or one of its usual names; anything else is refused.

    Strings are accepted because configs and command lines carry them: silently loading float32 for `"float16"`
    (diffusers' behaviour for a non-dtype) would waste memory without a word.
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise ValueError(f"`{argument}` must be a floating-point dtype, got {value}.")
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in DTYPE_NAMES:
            return DTYPE_NAMES[key]
        if key == "auto":
            raise ValueError(
                f"`{argument}`='auto' is not supported: pass a dtype (e.g. torch.bfloat16 or 'bfloat16'), or None for "
                "float32."
            )
        raise ValueError(f"`{argument}` must be a torch dtype or one of {sorted(DTYPE_NAMES)}, got {value!r}.")
    raise TypeError(f"`{argument}` must be a torch dtype or a dtype name, got {type(value).__name__} {value!r}.")


def pop_dtype(kwargs: dict, allow_per_component: bool = False):
    """Removes `dtype` (and its old name `torch_dtype`) from `kwargs` and returns it resolved.

    With `allow_per_component`, a dict `{component name or "default": dtype}` (as diffusers takes it) is resolved too.
    """
    dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
    if dtype is not None and torch_dtype is not None:
        raise ValueError(f"Pass `dtype` or `torch_dtype`, not both (got {dtype!r} and {torch_dtype!r}).")
    argument = "dtype" if dtype is not None else "torch_dtype"
    value = dtype if dtype is not None else torch_dtype
    if isinstance(value, dict):
        if not allow_per_component:
            raise TypeError(f"`{argument}` must be one dtype here, got a dict {value!r}.")
        return {name: resolve_dtype(v, f"{argument}[{name!r}]") for name, v in value.items()}
    return resolve_dtype(value, argument)


def refuse_remote_code(kwargs: dict, where: str = "from_pretrained") -> None:
    """Code is never loaded from a pipeline folder, a file or the Hub: refuse the arguments that would."""
    for name in REMOTE_CODE_ARGUMENTS:
        if kwargs.get(name):
            raise ValueError(
                f"`{name}`={kwargs[name]!r} is not accepted by `{where}`: gill_pipeline never loads code from a model "
                "folder or repo (see docs/security.md)."
            )
        kwargs.pop(name, None)


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------
def read_json_object(path: str, what: str | None = None) -> dict:
    """A JSON file that must hold an object; every failure names the file (and `what` it is for)."""
    label = f"{path} ({what})" if what else path
    if not os.path.isfile(path):
        raise PipelineFolderError(f"Missing file: {label}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PipelineFolderError(f"Corrupted JSON file: {label} ({error})") from error
    if not isinstance(data, dict):
        raise PipelineFolderError(f"Corrupted JSON file: {label} holds a {type(data).__name__}, not a JSON object")
    return data


def refuse_unsafe_files(folder: str, allow_pickle: bool = False) -> None:
    """Raises [`UnsafeFileError`] for a code file anywhere under `folder`, and for a pickled weight file unless
    `allow_pickle`."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .cache / .git of Hub snapshots hold no weights
        for file_name in sorted(files):
            path = os.path.join(root, file_name)
            if file_name.endswith(CODE_SUFFIXES):
                raise UnsafeFileError(
                    f"Refusing to load {folder}: it holds the code file {path}. gill_pipeline never imports code from "
                    "a model folder; remove the file if the folder is otherwise trusted."
                )
            if not allow_pickle and file_name.endswith(PICKLE_SUFFIXES):
                raise UnsafeFileError(
                    f"Refusing to load {folder}: it holds the pickled file {path}, and unpickling can run code. Convert "
                    "it to safetensors, or pass `allow_pickle=True` if you trust its source (it is then read with "
                    "torch.load(weights_only=True))."
                )


def _check_safetensors(component: str, name: str, files: list[str], allow_pickle: bool) -> None:
    weights = [f for f in files if f.endswith(".safetensors")]
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if not weights and not (allow_pickle and pickles):
        raise PipelineFolderError(
            f"Missing weights: no .safetensors file in {component} (component `{name}`); files there: {sorted(files)}"
        )
    for file_name in weights:
        path = os.path.join(component, file_name)
        try:
            with safe_open(path, framework="pt") as f:
                f.keys()  # reads the header only
        except Exception as error:  # safetensors raises its own error types for bad headers
            raise PipelineFolderError(f"Corrupted safetensors file: {path} ({error})") from error
    for file_name in files:
        # A weight index names the shards it needs: a missing shard is named too.
        if file_name.endswith(".safetensors.index.json"):
            path = os.path.join(component, file_name)
            weight_map = read_json_object(path).get("weight_map", {})
            for shard in sorted(set(weight_map.values()) if isinstance(weight_map, dict) else ()):
                if not os.path.isfile(os.path.join(component, shard)):
                    raise PipelineFolderError(f"Missing file: {os.path.join(component, shard)} (listed in {path})")


def check_model_kind(component_class, config: dict, config_path: str, name: str) -> None:
    """The config must describe the class that will read it (a VAE config is not a UNet's, a CLIP's not an LM's)."""
    if issubclass(component_class, ModelMixin):
        saved = config.get("_class_name")
        if saved is not None and saved != component_class.__name__:
            raise PipelineFolderError(
                f"Wrong kind of model: {config_path} describes a {saved}, but component `{name}` is loaded as "
                f"{component_class.__name__}."
            )
    elif issubclass(component_class, PreTrainedModel):
        expected = getattr(component_class.config_class, "model_type", None)
        saved = config.get("model_type")
        # A composite config (CLIP's text + vision) holds the one a tower reads under `base_config_key`.
        nested = getattr(component_class.config_class, "base_config_key", None)
        if expected and saved != expected and not (nested and isinstance(config.get(nested), dict)):
            raise PipelineFolderError(
                f"Wrong kind of model: {config_path} has model_type {saved!r}, but component `{name}` is loaded as "
                f"{component_class.__name__} (model_type {expected!r})."
            )


def validate_component(
    component: str,
    name: str,
    component_class,
    allow_pickle: bool = False,
    listed_in: str | None = None,
) -> dict | None:
    """Checks one component folder (config present, a JSON object, of the right kind; weights present and readable)
    and returns its config (None for tokenizers, whose several files are each checked)."""
    if not os.path.isdir(component):
        where = f" (component `{name}` listed in {listed_in})" if listed_in else f" (component `{name}`)"
        raise PipelineFolderError(f"Missing folder: {component}{where}")
    files = os.listdir(component)
    if not files:
        raise PipelineFolderError(f"Empty component folder: {component}")
    for file_name in sorted(files):
        if file_name.endswith(".json"):
            read_json_object(os.path.join(component, file_name))
    is_model = issubclass(component_class, (ModelMixin, PreTrainedModel))
    if is_model:
        config_path = os.path.join(component, MODEL_CONFIG_FILE)
        config = read_json_object(config_path, f"config of component `{name}`")
        check_model_kind(component_class, config, config_path, name)
        _check_safetensors(component, name, files, allow_pickle)
        return config
    if issubclass(component_class, SchedulerMixin):
        return read_json_object(os.path.join(component, SCHEDULER_CONFIG_FILE), f"config of component `{name}`")
    if issubclass(component_class, transformers.PreTrainedTokenizerBase):
        if not any(f in files for f in TOKENIZER_FILES):
            raise PipelineFolderError(
                f"Missing file: {component} (component `{name}`) has none of {list(TOKENIZER_FILES)}; files there: "
                f"{sorted(files)}"
            )
        check_tokenizer_files(component, name, component_class, files)
        return None
    if issubclass(component_class, (transformers.ImageProcessingMixin, transformers.FeatureExtractionMixin)):
        return read_json_object(os.path.join(component, PREPROCESSOR_CONFIG_FILE), f"config of component `{name}`")
    return None


def check_tokenizer_files(component: str, name: str, tokenizer_class, files: list[str]) -> None:
    """A tokenizer folder must hold its vocabulary: `tokenizer.json`, or every file the class's slow tokenizer reads
    (`vocab.json` + `merges.txt`, `tokenizer.model`, ...). Without them transformers fails with an error about
    sentencepiece/tiktoken that names neither the folder nor the file."""
    tokenizer_file = "tokenizer.json"
    if tokenizer_file in files:
        return
    if not getattr(tokenizer_class, "vocab_files_names", None) and "tokenizer_config.json" in files:
        # A learned-weights folder loads with AutoTokenizer: the class its config records says what it reads.
        recorded = read_json_object(os.path.join(component, "tokenizer_config.json")).get("tokenizer_class")
        tokenizer_class = getattr(transformers, recorded, None) if isinstance(recorded, str) else None
        tokenizer_class = tokenizer_class if isinstance(tokenizer_class, type) else transformers.PreTrainedTokenizerBase
    slow_files = [f for key, f in getattr(tokenizer_class, "vocab_files_names", {}).items() if key != "tokenizer_file"]
    if slow_files and all(f in files for f in slow_files):
        return
    raise PipelineFolderError(
        f"Missing file: {os.path.join(component, tokenizer_file)} (component `{name}`, {tokenizer_class.__name__})"
        f"{' and no ' + ' + '.join(slow_files) + ' to build it from' if slow_files else ''}; files there: "
        f"{sorted(files)}. Save the tokenizer again with `tokenizer.save_pretrained(...)`, which writes {tokenizer_file}."
    )


def resolve_component_class(library: str, class_name: str, where: str):
    """The class `[library, class_name]` of `model_index.json` names, from an allowed library only.

    `diffusers` and `transformers` classes are looked up by name in the library; `gill_pipeline` classes by their
    module path inside this package. Nothing is imported from the folder or from any other package.
    """
    if not isinstance(library, str) or not isinstance(class_name, str):
        raise PipelineFolderError(f"{where}: expected [library, class name] strings, got {[library, class_name]!r}")
    if library in ALLOWED_LIBRARIES:
        module = {"diffusers": diffusers, "transformers": transformers}[library]
    elif library == OWN_LIBRARY or library.startswith(OWN_LIBRARY + "."):
        try:
            module = importlib.import_module(library)
        except ImportError as error:
            raise PipelineFolderError(f"{where}: no module {library!r} in gill_pipeline ({error})") from error
    else:
        raise UnsafeFileError(
            f"{where}: refusing the class {class_name!r} of library {library!r}; a GILL pipeline loads classes of "
            f"{list(ALLOWED_LIBRARIES)} and {OWN_LIBRARY} only."
        )
    component_class = getattr(module, class_name, None)
    if not isinstance(component_class, type):
        raise PipelineFolderError(f"{where}: {library!r} has no class {class_name!r}.")
    return component_class


def validate_pipeline_folder(
    folder: str, allow_pickle: bool = False, pipeline_class=None, skip: tuple[str, ...] = ()
) -> tuple[dict, dict]:
    """Raises [`PipelineFolderError`] naming the first missing, corrupted, unsafe or wrong-kind file of a saved
    pipeline folder; returns (`model_index.json` as a dict, `{component: class}` of the components to load).

    It reads `model_index.json`, resolves every component class from an allowed library, and checks every
    component folder (except those in `skip`, passed in by the caller): its config, its kind and the header of its
    safetensors files (no tensor data is read). `pipeline_class`: the class the folder must record (or a parent of).
    """
    index_path = os.path.join(folder, MODEL_INDEX_FILE)
    index = read_json_object(index_path)
    refuse_unsafe_files(folder, allow_pickle)
    saved_class = index.get("_class_name")
    if pipeline_class is not None:
        names = {c.__name__ for c in pipeline_class.__mro__ if issubclass(c, diffusers.DiffusionPipeline)}
        if not isinstance(saved_class, str) or saved_class not in names:
            raise PipelineFolderError(
                f"{index_path} records the pipeline class {saved_class!r}, not {pipeline_class.__name__}: it is not "
                "a GILL pipeline folder (custom pipeline code is never loaded)."
            )
    classes = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2 or value[0] is None:
            continue
        if name in skip:
            continue
        where = f"{index_path} (component `{name}`)"
        component_class = resolve_component_class(value[0], value[1], where)
        validate_component(os.path.join(folder, name), name, component_class, allow_pickle, listed_in=index_path)
        classes[name] = component_class
    return index, classes


# --------------------------------------------------------------------------------------------------------------
# Fit of the learned parts to the base models
# --------------------------------------------------------------------------------------------------------------
def check_fit(
    gill_config,
    learned: str,
    *,
    lm: tuple[int, int, bool] | None = None,
    lm_name: str = "The LM",
    cross_attention_dim: int | None = None,
    unet_name: str = "The UNet",
    vision_dim: int | None = None,
    vision_name: str = "The vision encoder",
) -> None:
    """Raises a `ValueError` naming both sides when a base model does not fit GILL's learned parts.

    `gill_config`: GILLModel's config (object or `config.json` dict); `learned`: how to name it ("the learned weights
    'org/x'", a file path). `lm`: `lm_dims` of the LM; the others are the UNet's cross-attention width and the vision
    encoder's feature width; None skips a check (no such component).
    """
    def value(key):
        return gill_config[key] if isinstance(gill_config, dict) else getattr(gill_config, key)

    if lm is not None:
        lm_input, lm_hidden, tied = lm
        if (lm_input, lm_hidden) != (value("lm_input_dim"), value("lm_hidden_dim")):
            raise ValueError(
                f"{lm_name} has input/hidden widths {lm_input}/{lm_hidden}, but {learned} fit "
                f"{value('lm_input_dim')}/{value('lm_hidden_dim')}: it is not the LM they were trained with."
            )
        if tied != value("tie_img_embeddings"):
            raise ValueError(
                f"{lm_name} has {'tied' if tied else 'untied'} embeddings, but {learned} were made for an LM with "
                f"{'tied' if value('tie_img_embeddings') else 'untied'} ones."
            )
    if cross_attention_dim is not None and cross_attention_dim != value("cond_dim"):
        raise ValueError(
            f"{unet_name}'s cross-attention width is {cross_attention_dim}, but {learned} map to width "
            f"{value('cond_dim')}: it is not the Stable Diffusion they were trained for."
        )
    if vision_dim is not None and vision_dim != value("vision_dim"):
        raise ValueError(
            f"{vision_name}'s feature width is {vision_dim}, but {learned} read width {value('vision_dim')}: it is not "
            "the vision encoder they were trained with."
        )


def check_img_tokens(
    tokenizer, img_token_ids: list[int], num_img_tokens: int, tokenizer_name: str, record_name: str, tokens=None
) -> None:
    """The tokenizer must give the `[IMG]` tokens exactly the recorded ids (else the learned rows mean other words)."""
    tokens = list(tokens or [IMG_TOKEN_TEMPLATE.format(i=i) for i in range(num_img_tokens)])
    if len(img_token_ids) != num_img_tokens:
        raise ValueError(
            f"{record_name} records {len(img_token_ids)} [IMG] token ids ({img_token_ids}), but the learned weights "
            f"were built for {num_img_tokens} [IMG] tokens."
        )
    ids = tokenizer.convert_tokens_to_ids(tokens)
    unk = getattr(tokenizer, "unk_token_id", None)
    missing = [t for t, i in zip(tokens, ids) if i is None or (unk is not None and i == unk)]
    if missing:
        raise ValueError(f"{tokenizer_name} has no tokens {missing}: it is not the tokenizer saved with {record_name}.")
    if [int(i) for i in ids] != [int(i) for i in img_token_ids]:
        raise ValueError(
            f"{tokenizer_name} gives the [IMG] tokens {tokens} the ids {ids}, but {record_name} records "
            f"{list(img_token_ids)}: use the tokenizer saved with them."
        )


def check_pipeline_fit_from_configs(folder: str, index: dict, classes: dict):
    """The fit checks of a whole pipeline folder, read from its config files before any weight is loaded.

    Only the components in `classes` (those loaded from the folder) are checked here; components passed in by the
    caller are checked once the pipeline is built ([`check_pipeline_parts`]). Returns the folder's tokenizer, loaded
    for the `[IMG]` id check, so it is not read twice (None when the tokenizer is passed in).
    """
    if GILL_COMPONENT not in classes:
        return None
    gill_path = os.path.join(folder, GILL_COMPONENT, MODEL_CONFIG_FILE)
    gill_config = read_json_object(gill_path)
    learned = f"the learned weights {gill_path}"
    lm = unet_width = vision_width = None
    lm_name = unet_name = vision_name = ""
    if LLM_COMPONENT in classes:
        lm_class = classes[LLM_COMPONENT]
        lm_folder = os.path.join(folder, LLM_COMPONENT)
        lm_name = f"The LM {os.path.join(lm_folder, MODEL_CONFIG_FILE)} ({lm_class.__name__})"
        if not issubclass(lm_class, PreTrainedModel):
            raise PipelineFolderError(f"{lm_name} is not a transformers model.")
        try:
            config = lm_class.config_class.from_pretrained(lm_folder)
            lm = lm_dims_from_config(lm_class, config)
        except (ValueError, TypeError, AttributeError, KeyError, NotImplementedError) as error:
            # Some setups cannot be built on `meta` (e.g. quantized configs): the check then runs on the loaded LM.
            logger.info("%s: widths checked after loading (%s).", lm_name, error)
    if UNET_COMPONENT in classes:
        unet_path = os.path.join(folder, UNET_COMPONENT, MODEL_CONFIG_FILE)
        unet_width = read_json_object(unet_path).get("cross_attention_dim")
        unet_name = f"The UNet {unet_path}"
    if IMAGE_ENCODER_COMPONENT in classes:
        encoder_path = os.path.join(folder, IMAGE_ENCODER_COMPONENT, MODEL_CONFIG_FILE)
        vision_name = f"The vision encoder {encoder_path}"
        try:
            encoder_class = classes[IMAGE_ENCODER_COMPONENT]
            vision_width = vision_feature_dim_from_config(encoder_class.__name__, read_json_object(encoder_path))
        except ValueError as error:
            raise PipelineFolderError(f"{vision_name}: {error}") from error
    check_fit(
        gill_config, learned, lm=lm, lm_name=lm_name, cross_attention_dim=unet_width, unet_name=unet_name,
        vision_dim=vision_width, vision_name=vision_name,
    )
    tokenizer = None
    if TOKENIZER_COMPONENT in classes:
        tokenizer_path = os.path.join(folder, TOKENIZER_COMPONENT)
        tokenizer = classes[TOKENIZER_COMPONENT].from_pretrained(tokenizer_path)
        check_img_tokens(
            tokenizer, list(index.get("img_token_ids") or []), gill_config.get("num_img_tokens", 0),
            f"The tokenizer {tokenizer_path}", os.path.join(folder, MODEL_INDEX_FILE),
        )
    return tokenizer


def check_pipeline_parts(pipe, learned: str) -> None:
    """The fit checks on a built pipeline's modules (covers components the caller passed in)."""
    check_fit(
        pipe.gill.config,
        learned,
        lm=lm_dims(pipe.llm),
        lm_name=f"The LM ({type(pipe.llm).__name__})",
        cross_attention_dim=pipe.unet.config.cross_attention_dim if pipe.unet is not None else None,
        vision_dim=vision_feature_dim(pipe.image_encoder) if pipe.image_encoder is not None else None,
    )
    # The decoder must be of the family and conditioning layout the learned parts were trained for.
    check_decoder_fits(pipe.gill.conditioning_layout, {UNET_COMPONENT: pipe.unet, TRANSFORMER_COMPONENT: pipe.transformer}, learned)


def prepare_pipeline_load(pipeline_class, folder: str, kwargs: dict) -> tuple[dict, bool]:
    """Checks a whole pipeline folder before diffusers loads it; returns (the arguments for diffusers'
    `from_pretrained`, `allow_pickle`).

    It resolves `dtype`, refuses remote code, validates the folder (components passed in `kwargs` are skipped),
    checks the fit of the learned parts from the config files and hands diffusers the tokenizer it loaded for that
    check. diffusers gets `use_safetensors=True` unless `allow_pickle=True`.
    """
    kwargs = dict(kwargs)
    refuse_remote_code(kwargs)
    allow_pickle = kwargs.pop("allow_pickle", False)
    if not isinstance(allow_pickle, bool):
        raise TypeError(f"`allow_pickle` must be a bool, got {allow_pickle!r}.")
    use_safetensors = kwargs.pop("use_safetensors", None)
    if use_safetensors is False and not allow_pickle:
        raise ValueError("`use_safetensors=False` reads pickled weights: pass `allow_pickle=True` to opt in.")
    dtype = pop_dtype(kwargs, allow_per_component=True)
    index_path = os.path.join(folder, MODEL_INDEX_FILE)
    passed = tuple(name for name in kwargs if not name.startswith("_") and name in read_json_object(index_path))
    if dtype is None:
        # No dtype asked for: each component loads in the dtype it was saved in (diffusers alone would load its
        # models in float32: a second, wider copy of a bf16 UNet; see saved_dtypes.py).
        saved = saved_component_dtypes(folder, [n for n in read_json_object(index_path) if n not in passed])
        dtype = saved or None
    if dtype is not None:
        kwargs["dtype"] = dtype
    index, classes = validate_pipeline_folder(folder, allow_pickle, pipeline_class, skip=passed)
    tokenizer = check_pipeline_fit_from_configs(folder, index, classes)
    if tokenizer is not None:
        kwargs[TOKENIZER_COMPONENT] = tokenizer
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    return kwargs, allow_pickle
