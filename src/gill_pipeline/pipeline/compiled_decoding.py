"""Opt-in compiled decoding: a `StaticCache` and the LM's base model compiled with static shapes (`torch.compile`).

`GILLPipeline.enable_compiled_decoding()` turns it on. Each call then decodes with a `transformers.StaticCache` sized for
its prompt, `max_new_tokens` and `[IMG]` groups, rounded up to a power of two (at least `MIN_CACHE_LENGTH`), so calls
of similar lengths share one compiled graph. The prefill runs eagerly; every cached step runs the LM's base model
(`get_decoder()`, the module whose output the LM head reads) through `torch.compile(fullgraph=True, dynamic=False)`:
one compilation per step width (1 token, and the `r` tokens of an `[IMG]` group), batch size and cache length. The LM
head, GILL's `[IMG]` logits and the last-hidden-state hook stay outside the compiled graph (`models/lm_bridge.py`), so
what GILL reads is the same as in the eager path. Each step gets the attention mask at the cache's full length (zeros at
left padding and at masked slots, ones elsewhere: future positions are excluded by the causal mask, from the cache's
own position counter) and explicit position ids.

Where it does not apply, the call decodes as before (a `DynamicCache`, eager) after one warning naming why: LMs whose
class does not declare `_can_compile_fullgraph`, LMs with non-full-attention layers (sliding windows, recurrent
states), quantized LMs, LMs under offload hooks or a CPU/disk device map, attention implementations
other than `sdpa` / `eager`, `use_cache=False`, and a call that needs more positions than a fixed `max_cache_len`.
"""

import types
import weakref
from dataclasses import dataclass

import torch
from diffusers.utils import logging
from transformers import Cache, DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from ..models.lm_bridge import _base_model, _last_hidden_module, base_model_gives_last_hidden
from .inputs import check_int

logger = logging.get_logger(__name__)

# The smallest static cache length: short answers share one compiled graph.
MIN_CACHE_LENGTH = 64
_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def _text_config(llm):
    config = llm.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def why_not_compiled(llm) -> str | None:
    """Why this LM is decoded eagerly even with compiled decoding on, or `None` when it can be compiled."""
    model = _base_model(llm)  # the transformers LM under a peft wrapper (LoRA layers are compiled with it)
    name = type(model).__name__
    if not getattr(type(model), "_can_compile_fullgraph", False):
        return f"{name} does not declare `_can_compile_fullgraph` (transformers cannot compile it with a static cache)"
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        return f"{name} is quantized (quantized LMs are decoded eagerly)"
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict) and len(set(map(str, device_map.values()))) > 1:
        return f"{name} is spread by a device map over {sorted(set(map(str, device_map.values())))}"
    if any(getattr(m, "_hf_hook", None) is not None or getattr(m, "_diffusers_hook", None) is not None
           for m in llm.modules()):
        return f"{name} runs under offload hooks"
    attention = getattr(_text_config(llm), "_attn_implementation", None)
    if attention not in _ATTENTION_IMPLEMENTATIONS:
        return f"{name} uses attention implementation {attention!r} (compiled decoding takes {_ATTENTION_IMPLEMENTATIONS})"
    if _last_hidden_module(llm) is None:
        return f"{name} has no separate base model (`get_decoder()`) to compile"
    try:
        layers = StaticCache(config=_text_config(llm), max_cache_len=1).layers
    except Exception as error:  # a config transformers cannot build a static cache for
        return f"{name} has no static cache ({error})"
    if not layers or any(type(layer) is not StaticLayer for layer in layers):
        return f"{name} has layers that are not full attention (sliding windows or recurrent states)"
    return None


def copy_cache(cache: Cache, length: int, llm, max_cache_len: int | None) -> Cache:
    """The first `length` positions of an attention cache, copied into a new `StaticCache(max_cache_len)`, or into a
    `DynamicCache` when `max_cache_len` is None (a conversation's cache continued by the other path)."""
    config = _text_config(llm)
    target = DynamicCache(config=config) if max_cache_len is None else StaticCache(config=config, max_cache_len=max_cache_len)
    for index, layer in enumerate(cache.layers):
        target.update(layer.keys[:, :, :length], layer.values[:, :, :length], index)
    return target


@dataclass
class CompiledDecoding:
    """A pipeline's compiled-decoding state: the settings of `enable_compiled_decoding` and the compiled function.

    `GILLDecoder` asks it for a cache length (`cache_length`), a cache (`new_cache` / `continue_cache`) and the
    forward of each cached step (`compiled_forward`, a context manager that runs the base model compiled).
    """

    max_cache_len: int | None = None
    mode: str | None = None

    def __post_init__(self):
        self._module = None  # weak reference to the base model the function was compiled for
        self._function = None
        self._failed = False  # torch could not compile it: steps run eagerly from then on

    def cache_length(self, needed: int, max_positions: int | None) -> int | None:
        """The static cache length for a call that may fill `needed` positions, or None (decode eagerly)."""
        if self.max_cache_len is not None:
            if needed > self.max_cache_len:
                logger.warning_once(
                    f"Compiled decoding: this call may need {needed} cache positions, more than `max_cache_len="
                    f"{self.max_cache_len}`; it is decoded eagerly. Raise `max_cache_len` (one compilation per length)."
                )
                return None
            return self.max_cache_len
        length = max(MIN_CACHE_LENGTH, 1 << (needed - 1).bit_length())
        if max_positions is not None and length > max_positions >= needed:
            length = max_positions  # the LM's context holds every position a row can reach
        return length

    def new_cache(self, llm, length: int) -> StaticCache:
        return StaticCache(config=_text_config(llm), max_cache_len=length)

    def continue_cache(self, llm, past_cache: Cache, past_length: int, length: int) -> StaticCache:
        """A conversation's cache as a `StaticCache` of `length` (the same object when it already is one)."""
        if isinstance(past_cache, StaticCache) and past_cache.get_max_length() == length:
            return past_cache
        return copy_cache(past_cache, past_length, llm, length)

    def step_ready(self, llm) -> bool:
        """Whether cached steps can run compiled: GILL reads the last hidden state from the base model's output (checked
        by the eager prefill, `models/lm_bridge.py`); otherwise the call goes on eagerly with its static cache."""
        if base_model_gives_last_hidden(llm):
            return True
        logger.warning_once(
            f"Compiled decoding: {type(llm).__name__}'s last hidden state is read from all layers' hidden states, "
            "not from its base model; its steps run eagerly (with the static cache)."
        )
        return False

    def run_step(self, llm, step):
        """`step()` with the LM's base model compiled; eagerly when torch cannot compile it (a graph break under
        `fullgraph=True`, no C++ compiler for inductor, ...), then for every later step, after one warning. Compilation
        fails before the graph runs, so the static cache is unchanged when the step is run again eagerly."""
        if self._failed:
            return step()
        try:
            with self.compiled_forward(llm):
                return step()
        except torch._dynamo.exc.TorchDynamoException as error:
            self._failed = True
            logger.warning(
                f"Compiled decoding: torch could not compile {type(llm).__name__}'s base model "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); decoding eagerly."
            )
            return step()

    def compiled_forward(self, llm):
        """A context manager under which the LM's base model runs its compiled `forward` (hooks stay outside it)."""
        module = _last_hidden_module(llm)
        if self._function is None or self._module is None or self._module() is not module:
            # The class's function, compiled once; guards on the module argument keep other modules apart.
            self._function = torch.compile(type(module).forward, fullgraph=True, dynamic=False, mode=self.mode)
            self._module = weakref.ref(module)
        return _ForwardSwapped(module, self._function)


class _ForwardSwapped:
    """Sets `module.forward` to `function` bound to it for the duration of a `with` block (the module is unchanged
    after it: an instance-level `forward` it had is put back, or the attribute removed)."""

    def __init__(self, module, function):
        self.module, self.function = module, function

    def __enter__(self):
        self.previous = self.module.__dict__.get("forward")  # an instance-level forward someone set (a hook), if any
        self.module.forward = types.MethodType(self.function, self.module)

    def __exit__(self, *exc):
        if self.previous is None:
            del self.module.forward
        else:
            self.module.forward = self.previous
        return False


def check_compiled_decoding_args(max_cache_len, mode) -> None:
    """Refuses bad arguments of `enable_compiled_decoding`, naming them."""
    if max_cache_len is not None:
        check_int(max_cache_len, "max_cache_len", minimum=1)
    modes = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if mode not in modes:
        raise ValueError(f"`mode` must be one of {modes}, got {mode!r:.100}.")


class CompiledDecodingMixin:
    """`enable_compiled_decoding` / `disable_compiled_decoding` for `GILLPipeline` (see this module's docstring)."""

    _compiled_decoding: CompiledDecoding | None = None

    def enable_compiled_decoding(self, max_cache_len: int | None = None, mode: str | None = None):
        r"""
        Decodes with a `transformers.StaticCache` and the LM's base model compiled by `torch.compile` (static shapes,
        `fullgraph=True`), as transformers' `generate(cache_implementation="static")` does, from the next call on.
        The answers are the same as without it (token ids, images; hidden states within floating-point rounding).

        The first calls pay the compilation (about 12 s per step width for OPT-125m on 2 CPU cores; one for single
        tokens and one for `[IMG]` groups, again for each new batch size or cache length). LMs it does not apply to
        are decoded as before, after one warning naming why (see `gill_pipeline.pipeline.compiled_decoding`).

        Args:
            max_cache_len (`int`, *optional*):
                A fixed static cache length: one compilation per step width, and calls that may need more positions
                (prompt + `max_new_tokens` + `[IMG]` groups) are decoded eagerly. By default each call's length is
                rounded up to a power of two (at least 64), so calls of similar lengths share a compiled graph.
            mode (`str`, *optional*):
                `torch.compile`'s `mode` (e.g. `"reduce-overhead"` for CUDA graphs on a GPU); `None` is its default.
        """
        check_compiled_decoding_args(max_cache_len, mode)
        context = getattr(self, "_lm_context_length", lambda: None)()
        if max_cache_len is not None and context is not None and max_cache_len > context:
            raise ValueError(
                f"`max_cache_len` must be at most the LM's context length ({context}), got {max_cache_len}."
            )
        reason = why_not_compiled(self.llm)
        if reason is not None:
            logger.warning(f"Compiled decoding is enabled, but {reason}: this LM is decoded eagerly.")
        self._compiled_decoding = CompiledDecoding(max_cache_len=max_cache_len, mode=mode)

    def disable_compiled_decoding(self):
        """Decodes eagerly with a growing cache again (the default); compiled graphs are dropped."""
        self._compiled_decoding = None

    @property
    def compiled_decoding(self) -> bool:
        """Whether `enable_compiled_decoding` is on (LMs it does not apply to are still decoded eagerly)."""
        return self._compiled_decoding is not None

    def _static_decoding(self) -> CompiledDecoding | None:
        """The compiled-decoding state for this call, or None (off, or this LM cannot use it: warned once)."""
        if self._compiled_decoding is None:
            return None
        reason = why_not_compiled(self.llm)
        if reason is not None:
            logger.warning_once(f"Compiled decoding: {reason}; decoded eagerly.")
            return None
        return self._compiled_decoding


def eager_past(llm, past_cache, past_length: int):
    """A conversation's `StaticCache` (made with compiled decoding on) as a `DynamicCache` for an eager call."""
    if isinstance(past_cache, StaticCache):
        return copy_cache(past_cache, past_length, llm, None)
    return past_cache
