"""One quantization config for the whole GILL pipeline: diffusers' `PipelineQuantizationConfig`, routed per component.

A GILL pipeline mixes libraries: the LM and the vision encoder are transformers models, the UNet / DiT transformer
and the VAE are diffusers models, and the learned `gill/` module is ours. Every loader (whole pipeline folders through
diffusers' generic loader, learned-weights folders and `from_base_models` through their own loads) reads the same
per-component mapping from [`resolve_quantization_config`]:

- the granular form, `PipelineQuantizationConfig(quant_mapping={"llm": transformers.TorchAoConfig(...), "unet":
  diffusers.TorchAoConfig(...)})`, is used as given (after the checks below);
- the backend form, `PipelineQuantizationConfig(quant_backend=..., quant_kwargs=..., components_to_quantize=...)`, is
  turned into a mapping with the right library's config class per component. diffusers 0.42 refuses to BUILD the
  backend form for torchao (the two libraries' `TorchAoConfig` signatures differ), so the same three fields are also
  accepted as a plain `dict`: `{"quant_backend": "torchao", "quant_kwargs": {"quant_type": Int8WeightOnlyConfig()},
  "components_to_quantize": ["llm"]}`.

The learned `gill/` module (and with it the `[IMG]` rows) is never quantized: it is a few MB, it is what training
changes, and learned weights must load onto a quantized and an unquantized base alike.
"""

from diffusers import PipelineQuantizationConfig

from ..constants import (
    GILL_COMPONENT,
    IMAGE_ENCODER_COMPONENT,
    LLM_COMPONENT,
    TRANSFORMER_COMPONENT,
    UNET_COMPONENT,
    VAE_COMPONENT,
)

# Components that may be quantized, and the library whose config class each takes.
TRANSFORMERS_COMPONENTS = (LLM_COMPONENT, IMAGE_ENCODER_COMPONENT)
DIFFUSERS_COMPONENTS = (UNET_COMPONENT, TRANSFORMER_COMPONENT, VAE_COMPONENT)
QUANTIZABLE_COMPONENTS = TRANSFORMERS_COMPONENTS + DIFFUSERS_COMPONENTS
_BACKEND_KEYS = ("quant_backend", "quant_kwargs", "components_to_quantize")


def _config_classes(backend: str) -> tuple[type, type]:
    """(transformers' config class, diffusers' config class) of a quantization backend, or a ValueError naming it."""
    from diffusers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING as diffusers_classes
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING as transformers_classes

    if backend not in diffusers_classes or backend not in transformers_classes:
        both = sorted(set(diffusers_classes) & set(transformers_classes))
        raise ValueError(
            f"`quantization_config`: `quant_backend`={backend!r} is not a backend both diffusers and transformers "
            f"know; one of {both}."
        )
    return transformers_classes[backend], diffusers_classes[backend]


def _check_components(names, argument: str) -> None:
    for name in names:
        if name == GILL_COMPONENT:
            raise ValueError(
                f"`quantization_config`: {argument} names {GILL_COMPONENT!r}, the learned GILL module; it is never "
                f"quantized (a few MB, the part training changes; its `[IMG]` rows stay in the pipeline's dtype). "
                f"Quantize the base models instead: {list(QUANTIZABLE_COMPONENTS)}."
            )
        if name not in QUANTIZABLE_COMPONENTS:
            raise ValueError(
                f"`quantization_config`: {argument} names {name!r}, which is not a quantizable component of a GILL "
                f"pipeline; expected some of {list(QUANTIZABLE_COMPONENTS)}."
            )


def _library_of(config) -> str:
    module = type(config).__module__.split(".")[0]
    return module


def _mapping_from_backend(backend: str, quant_kwargs: dict, components) -> dict:
    transformers_class, diffusers_class = _config_classes(backend)
    if components is None:
        components = QUANTIZABLE_COMPONENTS  # diffusers' meaning of "no components_to_quantize": all of them
    elif isinstance(components, str):
        components = [components]
    _check_components(components, "`components_to_quantize`")
    mapping = {}
    for name in components:
        config_class = transformers_class if name in TRANSFORMERS_COMPONENTS else diffusers_class
        mapping[name] = config_class(**dict(quant_kwargs or {}))
    return mapping


def resolve_quantization_config(value) -> PipelineQuantizationConfig | None:
    """`quantization_config` as a granular `PipelineQuantizationConfig` over GILL's quantizable components (or None).

    Accepts a `PipelineQuantizationConfig` (either form) or a `dict` of its backend fields (see the module
    docstring). Refuses `gill`, unknown component names, and a config of the wrong library for a component (a
    transformers config for the UNet, a diffusers one for the LM), each with the argument and the value.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(_BACKEND_KEYS) - {"quant_mapping"})
        if unknown:
            raise ValueError(
                f"`quantization_config` as a dict takes {list(_BACKEND_KEYS)} (or `quant_mapping`), got {unknown}."
            )
        if "quant_mapping" in value:
            mapping = dict(value["quant_mapping"])
        else:
            if not value.get("quant_backend"):
                raise ValueError(f"`quantization_config` as a dict needs `quant_backend`, got {value!r}.")
            mapping = _mapping_from_backend(
                value["quant_backend"], value.get("quant_kwargs"), value.get("components_to_quantize")
            )
    elif isinstance(value, PipelineQuantizationConfig):
        if value.is_granular:
            mapping = dict(value.quant_mapping)
        else:
            mapping = _mapping_from_backend(value.quant_backend, value.quant_kwargs, value.components_to_quantize)
    else:
        raise TypeError(
            "`quantization_config` must be a diffusers `PipelineQuantizationConfig` (e.g. `quant_mapping={'llm': "
            f"transformers.TorchAoConfig(Int8WeightOnlyConfig())}}`) or a dict of its fields, got {type(value).__name__}."
        )
    _check_components(mapping, "`quant_mapping`")
    for name, config in mapping.items():
        expected = "transformers" if name in TRANSFORMERS_COMPONENTS else "diffusers"
        if _library_of(config) != expected:
            raise TypeError(
                f"`quantization_config`: the {name!r} component is a {expected} model and needs {expected}' config "
                f"class (e.g. `{expected}.TorchAoConfig(...)`), got {type(config).__module__}.{type(config).__name__}."
            )
    return PipelineQuantizationConfig(quant_mapping=mapping)


def component_quantization(config: PipelineQuantizationConfig | None, name: str):
    """The quantization config of one component (None when it is not quantized)."""
    if config is None:
        return None
    return config.quant_mapping.get(name)


def decoder_quantization(config: PipelineQuantizationConfig | None) -> dict:
    """`quantization_config=` for a stock decoder pipeline's `from_pretrained`: its denoiser and VAE entries only (the
    decoder's own text encoders, loaded once at assembly, are not GILL's and stay as they are)."""
    if config is None:
        return {}
    mapping = {name: value for name, value in config.quant_mapping.items() if name in DIFFUSERS_COMPONENTS}
    return {"quantization_config": PipelineQuantizationConfig(quant_mapping=mapping)} if mapping else {}


def refuse_quantizing_passed(config: PipelineQuantizationConfig | None, passed, where: str) -> None:
    """A component passed already loaded cannot be quantized on loading: say so rather than ignore the mapping."""
    if config is None:
        return
    clash = sorted(name for name in passed if name in config.quant_mapping)
    if clash:
        raise ValueError(
            f"`quantization_config` quantizes {clash}, but {where} got them as loaded models: quantize them when you "
            f"load them (e.g. `from_pretrained(..., quantization_config=...)`) or drop them from `quant_mapping`."
        )


def quantization_summary(module) -> dict | None:
    """The quantization a loaded transformers/diffusers model records (`config.quantization_config`), as a dict."""
    config = getattr(getattr(module, "config", None), "quantization_config", None)
    if config is None:
        return None
    return config if isinstance(config, dict) else config.to_dict()


# The choices of `gill ... --quantize`, each a torchao weight config for the LM (and the denoiser), chosen for the
# device: torchao's `Int4WeightOnlyConfig` has no CPU layout in torchao 0.18 (its packings need CUDA or the `mslk`
# kernels), so on CPU int4 is `IntxWeightOnlyConfig(int4)`: int4 values in int8 storage (int4's rounding, int8's memory).
QUANTIZE_CHOICES = ("none", "int8", "int4", "int8-dynamic")


def _torchao_weight_config(choice: str, device: str, group_size: int):
    import importlib.util

    import torch

    if importlib.util.find_spec("torchao") is None:
        raise ImportError(f"`quantize`={choice!r} needs torchao: `pip install gill_pipeline[quant]` (or `torchao`).")
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerGroup

    if choice == "int8":
        return Int8WeightOnlyConfig()
    if choice == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if str(device).startswith("cuda"):
        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))


def quantization_preset(
    choice: str, device: str = "cpu", decoder: bool = False, group_size: int = 32
) -> PipelineQuantizationConfig | None:
    """The `PipelineQuantizationConfig` of a `--quantize` choice: torchao for the LM (and, with `decoder=True`, the
    UNet/transformer); None for "none". `group_size`: int4's group of weights sharing a scale (every quantized
    layer's input width must be a multiple of it)."""
    if choice not in QUANTIZE_CHOICES:
        raise ValueError(f"`quantize` must be one of {list(QUANTIZE_CHOICES)}, got {choice!r}.")
    if choice == "none":
        return None
    import diffusers
    import transformers

    mapping = {LLM_COMPONENT: transformers.TorchAoConfig(_torchao_weight_config(choice, device, group_size))}
    if decoder:
        for name in (UNET_COMPONENT, TRANSFORMER_COMPONENT):
            mapping[name] = diffusers.TorchAoConfig(_torchao_weight_config(choice, device, group_size))
    return PipelineQuantizationConfig(quant_mapping=mapping)


def release_freed_memory() -> bool:
    """Hands memory freed during quantized loading back to the OS; returns whether it could (glibc only).

    Quantizing on load materialises each bf16 weight from the memory-mapped file, quantizes it and frees it; glibc's
    allocator keeps those freed blocks, so resident memory after loading an int8 LM held about one bf16 copy of the
    quantized layers (measured: an 8-layer 2048-wide OPT, 1.33 GiB anonymous after loading, 0.79 after this).
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is None:
        return False
    trim(0)
    return True
