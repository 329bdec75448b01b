"""What conditioning a text-to-image decoder takes instead of a prompt: a small JSON-serialisable record.

GILL's mapper must produce exactly these tensors, so the layout is what GILLModel's config records and what a
learned-weights repo is checked against before it is loaded onto a decoder.
"""

import json
from dataclasses import asdict, dataclass, field
from typing import Any

SEQUENCE = "sequence"
POOLED = "pooled"
MASK = "mask"
TENSOR_KINDS = (SEQUENCE, POOLED, MASK)

GUIDANCE_CFG = "cfg"  # classifier-free guidance: a second, negative pass per step
GUIDANCE_EMBEDDING = "embedding"  # guidance-distilled: `guidance_scale` enters the denoiser as an embedding (Flux-dev)
GUIDANCE_NONE = "none"  # timestep-distilled: no guidance at all (Flux-schnell)
GUIDANCE_KINDS = (GUIDANCE_CFG, GUIDANCE_EMBEDDING, GUIDANCE_NONE)

PADDING_MASKED = "masked"  # padded text positions are hidden from the denoiser by an attention mask
PADDING_ATTENDED = "attended"  # the denoiser attends to every position, padding included: padding carries signal


@dataclass
class ConditioningTensor:
    """One tensor the decoder's `__call__` takes, per prompt.

    Args:
        name (`str`): The `__call__` argument, e.g. `"prompt_embeds"`, `"pooled_prompt_embeds"`,
            `"prompt_attention_mask"`.
        kind (`str`): `"sequence"` (`shape` = `[length, width]`), `"pooled"` (`[width]`) or `"mask"` (`[length]`).
        shape (`list[int]`): The shape of one prompt's tensor (no batch dimension).
        dtype (`str`): The torch dtype the decoder's text side returns, e.g. `"float32"` or `"int64"`.
        negative_name (`str`, *optional*): The `__call__` argument of its negative (`"negative_prompt_embeds"`), or
            `None` when the family takes no negative of it.
        masks (`str`, *optional*): For a mask, the sequence tensor it belongs to.
    """

    name: str
    kind: str
    shape: list[int]
    dtype: str = "float32"
    negative_name: str | None = None
    masks: str | None = None

    def __post_init__(self):
        if self.kind not in TENSOR_KINDS:
            raise ValueError(f"`kind` must be one of {TENSOR_KINDS}, got {self.kind!r} for `{self.name}`.")
        self.shape = [int(size) for size in self.shape]
        expected_rank = {SEQUENCE: 2, POOLED: 1, MASK: 1}[self.kind]
        if len(self.shape) != expected_rank or min(self.shape) <= 0:
            raise ValueError(
                f"A {self.kind} tensor has {expected_rank} positive sizes per prompt, got `shape`={self.shape} "
                f"for `{self.name}`."
            )

    @property
    def length(self) -> int | None:
        return self.shape[0] if self.kind in (SEQUENCE, MASK) else None

    @property
    def width(self) -> int | None:
        return self.shape[-1] if self.kind in (SEQUENCE, POOLED) else None


@dataclass
class ConditioningLayout:
    """The conditioning a decoder family takes instead of a prompt, read from a loaded decoder.

    Args:
        family (`str`): Short family name, e.g. `"sdxl"`, `"flux"`.
        pipeline_class (`str`): The stock diffusers pipeline class, e.g. `"FluxPipeline"`.
        tensors (`list[ConditioningTensor]`): Every tensor GILL must produce, in the order the family's
            `encode_prompt` returns them.
        guidance (`str`): `"cfg"`, `"embedding"` (Flux-dev) or `"none"` (Flux-schnell).
        padding (`str`): `"masked"` (PixArt, Sana: an attention mask hides padded positions) or `"attended"`
            (SD, SDXL, SD3, Flux: padded positions are real inputs and must be reproduced).
        encode_kwargs (`dict`): The non-default `encode_prompt` settings the targets were made with, taken from the
            stock `__call__` defaults (e.g. `max_sequence_length`, `clean_caption`, `complex_human_instruction`).
        latent_space (`dict`, *optional*): The decoder VAE's class, `latent_channels`, `scaling_factor` and
            `shift_factor` when the layout was read: the denoiser was trained in that latent space, so another VAE of
            the same class must have the same scaling and shift (`decoders/fit.py`). None in layouts recorded before.
    """

    family: str
    pipeline_class: str
    tensors: list[ConditioningTensor]
    guidance: str
    padding: str
    encode_kwargs: dict[str, Any] = field(default_factory=dict)
    latent_space: dict[str, Any] | None = None

    def __post_init__(self):
        self.tensors = [t if isinstance(t, ConditioningTensor) else ConditioningTensor(**t) for t in self.tensors]
        if self.guidance not in GUIDANCE_KINDS:
            raise ValueError(f"`guidance` must be one of {GUIDANCE_KINDS}, got {self.guidance!r}.")
        if self.padding not in (PADDING_MASKED, PADDING_ATTENDED):
            raise ValueError(f"`padding` must be {PADDING_MASKED!r} or {PADDING_ATTENDED!r}, got {self.padding!r}.")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names) or not any(t.kind == SEQUENCE for t in self.tensors):
            raise ValueError(f"`tensors` must name each tensor once and hold a sequence, got {names}.")

    # ------------------------------------------------------------------------------------------------------------
    # Views the mapper and the pipeline need
    # ------------------------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def tensor(self, name: str) -> ConditioningTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"{self.pipeline_class} takes no conditioning tensor `{name}`; it takes {self.names}.")

    @property
    def learned_tensors(self) -> list[ConditioningTensor]:
        """Tensors a mapper must output (sequences and pooled vectors); masks follow from the sequences' lengths."""
        return [t for t in self.tensors if t.kind != MASK]

    @property
    def has_negatives(self) -> bool:
        return any(t.negative_name is not None for t in self.tensors)

    # ------------------------------------------------------------------------------------------------------------
    # JSON (GILLModel's config, learned-weights repos)
    # ------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ConditioningLayout":
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json_string(cls, text: str) -> "ConditioningLayout":
        return cls.from_dict(json.loads(text))

    def describe(self) -> str:
        """One line per tensor, for error messages and model cards."""
        parts = [f"{t.name} {t.kind} {tuple(t.shape)}" for t in self.tensors]
        return f"{self.pipeline_class} ({self.family}, guidance {self.guidance}, padding {self.padding}): " + ", ".join(
            parts
        )
