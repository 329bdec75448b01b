"""All of GILL's learned parts in one small, shareable module."""

import math

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..constants import (
    DEFAULT_LOGIT_SCALE_INIT,
    DEFAULT_MAPPER_DECODER_LAYERS,
    DEFAULT_MAPPER_ENCODER_LAYERS,
    DEFAULT_MAPPER_HEADS,
    DEFAULT_MAPPER_WIDTH,
    DEFAULT_NUM_IMG_TOKENS,
    DEFAULT_NUM_VISUAL_TOKENS,
    DEFAULT_RETRIEVAL_DIM,
)
from ..decoders.layout import MASK, POOLED, SEQUENCE, ConditioningLayout, ConditioningTensor
from .mapper import GILLMapper

UNCOND_PREFIX = "uncond_"


def _onto(inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`inputs` on the device and in the dtype of one of this module's weights. The pipeline keeps `gill` out of
    offloading (its parts are called outside `forward`, where hooks would not run), so its weights are real and its
    inputs go where they are, whatever the pipeline's execution device."""
    return inputs.to(device=weight.device, dtype=weight.dtype)


def legacy_sd_layout(cond_length: int, cond_dim: int) -> ConditioningLayout:
    """The layout of a config without one: Stable Diffusion 1.x/2.x with its `cond_length` x `cond_dim` sequence
    (every `gill/` folder saved before layouts were recorded)."""
    return ConditioningLayout(
        family="sd",
        pipeline_class="StableDiffusionPipeline",
        tensors=[
            ConditioningTensor(
                name="prompt_embeds", kind=SEQUENCE, shape=[cond_length, cond_dim], negative_name="negative_prompt_embeds"
            )
        ],
        guidance="cfg",
        padding="attended",
    )


class GILLModel(ModelMixin, ConfigMixin):
    r"""
    The learned parts of GILL: everything that is trained while the LM, the vision encoder and the diffusion model
    stay frozen. Saved on its own (a `config.json` and a safetensors file of a few MB for small models, about 100 MB
    for the paper's), so it can be shared apart from the multi-GB frozen models.

    Parts:
    - `img_input_embeddings`: the input embedding rows of the `r` `[IMG]` tokens. The LM's own embedding matrix is
      never changed: the pipeline puts these rows in place of the LM's lookup for the `[IMG]` ids.
    - `img_output_embeddings`: the output rows giving the `[IMG]` logits, only for LMs whose input and output
      embeddings are not tied (for tied LMs such as OPT and GPT-2 the input rows serve as output rows).
    - `visual_prefix`: Linear(`vision_dim` -> `num_visual_tokens * lm_input_dim`), the image as `k` LM input
      embeddings.
    - `ret_text_proj` / `ret_image_proj` / `logit_scale`: the retrieval projections into a shared space and the
      learned temperature.
    - `mapper`: the [`GILLMapper`].
    - `decision_head`: Dropout + Linear(`lm_hidden_dim` -> 2); class 0 = generate, class 1 = retrieve.
    - `uncond_<name>` (buffers): the decoder's stored negative conditioning, one per tensor of the layout that has
      a negative (`uncond_prompt_embeds`; SDXL/SD3 also `uncond_pooled_prompt_embeds`, PixArt/Sana
      `uncond_prompt_attention_mask`; none for Flux), for classifier-free guidance without the decoder's text
      encoders at inference.

    Args:
        lm_input_dim (`int`): Width of the LM's input embeddings.
        lm_hidden_dim (`int`): Width of the LM's last hidden state (the input width of its output embeddings).
        vision_dim (`int`): Width of the vision encoder's pooled output.
        cond_dim (`int`): Width of the decoder's conditioning sequence (the UNet's cross-attention width for SD).
        cond_length (`int`, *optional*, defaults to 77): Length of the decoder's conditioning sequence.
        num_img_tokens (`int`, *optional*, defaults to 8): `r`, the number of `[IMG]` tokens.
        num_visual_tokens (`int`, *optional*, defaults to 4): `k`, the LM input embeddings per input image.
        retrieval_dim (`int`, *optional*, defaults to 256): Width of the shared retrieval space.
        tie_img_embeddings (`bool`, *optional*, defaults to `True`):
            Whether the `[IMG]` output rows are the input rows (LMs with tied word embeddings).
        mapper_hidden_dim, mapper_encoder_layers, mapper_decoder_layers, mapper_heads: the [`GILLMapper`]'s sizes.
        decision_dropout (`float`, *optional*, defaults to 0.5): Dropout before the decision head's linear layer.
        logit_scale_init (`float`, *optional*, defaults to log(1/0.07)): Initial retrieval temperature (log scale).
        conditioning_layout (`dict`, *optional*):
            The decoder's [`ConditioningLayout`] (`layout.to_dict()`): family, pipeline class and every tensor the
            mapper must produce. None means Stable Diffusion 1.x/2.x with one `cond_length` x `cond_dim` sequence
            (configs saved before layouts existed load unchanged). Its sequence must be `cond_length` x `cond_dim`.
        mapper_num_queries (`int`, *optional*):
            The mapper's learned queries; None: one per output position. See [`GILLMapper`].
    """

    @register_to_config
    def __init__(
        self,
        lm_input_dim: int,
        lm_hidden_dim: int,
        vision_dim: int,
        cond_dim: int,
        cond_length: int = 77,
        num_img_tokens: int = DEFAULT_NUM_IMG_TOKENS,
        num_visual_tokens: int = DEFAULT_NUM_VISUAL_TOKENS,
        retrieval_dim: int = DEFAULT_RETRIEVAL_DIM,
        tie_img_embeddings: bool = True,
        mapper_hidden_dim: int = DEFAULT_MAPPER_WIDTH,
        mapper_encoder_layers: int = DEFAULT_MAPPER_ENCODER_LAYERS,
        mapper_decoder_layers: int = DEFAULT_MAPPER_DECODER_LAYERS,
        mapper_heads: int = DEFAULT_MAPPER_HEADS,
        decision_dropout: float = 0.5,
        logit_scale_init: float = DEFAULT_LOGIT_SCALE_INIT,
        conditioning_layout: dict | None = None,
        mapper_num_queries: int | None = None,
    ):
        super().__init__()
        for name, value in (
            ("lm_input_dim", lm_input_dim),
            ("lm_hidden_dim", lm_hidden_dim),
            ("vision_dim", vision_dim),
            ("cond_dim", cond_dim),
            ("cond_length", cond_length),
            ("num_img_tokens", num_img_tokens),
            ("num_visual_tokens", num_visual_tokens),
            ("retrieval_dim", retrieval_dim),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if lm_input_dim != lm_hidden_dim:
            # GILL adds the [IMG] input embeddings to the [IMG] hidden states, and tied LMs reuse the input rows
            # as output rows: both need the two widths to agree.
            raise ValueError(
                f"GILL needs an LM whose input embedding width equals its last hidden width, got "
                f"`lm_input_dim`={lm_input_dim} and `lm_hidden_dim`={lm_hidden_dim}."
            )

        layout = self._read_layout(conditioning_layout, cond_length, cond_dim)
        pooled = [t for t in layout.learned_tensors if t.kind == POOLED]

        self.img_input_embeddings = nn.Parameter(torch.randn(num_img_tokens, lm_input_dim) * 0.02)
        if tie_img_embeddings:
            self.img_output_embeddings = None
        else:
            self.img_output_embeddings = nn.Parameter(torch.randn(num_img_tokens, lm_hidden_dim) * 0.02)

        self.visual_prefix = nn.Linear(vision_dim, num_visual_tokens * lm_input_dim)
        self.ret_text_proj = nn.Linear(lm_hidden_dim, retrieval_dim)
        self.ret_image_proj = nn.Linear(vision_dim, retrieval_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.mapper = GILLMapper(
            in_dim=lm_hidden_dim,
            out_dim=cond_dim,
            num_output_tokens=cond_length,
            hidden_dim=mapper_hidden_dim,
            num_encoder_layers=mapper_encoder_layers,
            num_decoder_layers=mapper_decoder_layers,
            num_heads=mapper_heads,
            pooled_out_dim=pooled[0].width if pooled else None,
            num_queries=mapper_num_queries,
        )
        self.decision_head = nn.Sequential(nn.Dropout(decision_dropout), nn.Linear(lm_hidden_dim, 2))
        for tensor in layout.tensors:
            if tensor.negative_name is None:
                continue
            dtype = torch.int64 if tensor.kind == MASK else torch.float32
            self.register_buffer(UNCOND_PREFIX + tensor.name, torch.zeros(1, *tensor.shape, dtype=dtype), persistent=True)

    @staticmethod
    def _read_layout(conditioning_layout, cond_length: int, cond_dim: int) -> ConditioningLayout:
        if conditioning_layout is None:
            return legacy_sd_layout(cond_length, cond_dim)
        layout = ConditioningLayout.from_dict(conditioning_layout)
        sequences = [t for t in layout.tensors if t.kind == SEQUENCE]
        pooled = [t for t in layout.tensors if t.kind == POOLED]
        # The mapper has one sequence head and at most one pooled head: the six supported families need no more.
        if len(sequences) != 1 or len(pooled) > 1:
            raise ValueError(
                f"GILL's mapper makes one conditioning sequence and at most one pooled vector; `conditioning_layout` "
                f"has {layout.describe()}."
            )
        if sequences[0].shape != [cond_length, cond_dim]:
            raise ValueError(
                f"`conditioning_layout`'s sequence `{sequences[0].name}` is {sequences[0].shape}, but `cond_length`="
                f"{cond_length} and `cond_dim`={cond_dim}."
            )
        return layout

    # ----------------------------------------------------------------------------------------------------------
    # The [IMG] token rows
    # ----------------------------------------------------------------------------------------------------------
    @property
    def img_output_rows(self) -> torch.Tensor:
        """Rows that give the `[IMG]` logits: `h @ rows.T`."""
        if self.img_output_embeddings is None:
            return self.img_input_embeddings
        return self.img_output_embeddings

    def img_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits of the `r` `[IMG]` tokens for LM hidden states `(..., lm_hidden_dim)` -> `(..., r)`."""
        rows = self.img_output_rows
        return _onto(hidden_states, rows) @ rows.t()

    @torch.no_grad()
    def init_img_embeddings_from(self, input_embeddings: torch.Tensor, output_embeddings: torch.Tensor | None = None):
        """Initialise the `[IMG]` rows from the mean and spread of an LM's existing rows (as `mean_resizing` does)."""
        for target, source in ((self.img_input_embeddings, input_embeddings), (self.img_output_embeddings, output_embeddings)):
            if target is None or source is None:
                continue
            source = source.detach().float()
            mean, std = source.mean(0), source.std(0)
            # Drawn on the CPU (the same values whatever the LM's device), then moved to the source's device.
            noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(0)).to(source.device)
            target.copy_((mean + noise * std * 0.1).to(device=target.device, dtype=target.dtype))

    # ----------------------------------------------------------------------------------------------------------
    # Heads
    # ----------------------------------------------------------------------------------------------------------
    def encode_visual_prefix(self, image_features: torch.Tensor) -> torch.Tensor:
        """Pooled vision features `(N, vision_dim)` -> LM input embeddings `(N, k, lm_input_dim)`."""
        x = self.visual_prefix(_onto(image_features, self.visual_prefix.weight))
        return x.reshape(x.shape[0], self.config.num_visual_tokens, self.config.lm_input_dim)

    def text_retrieval_embeds(self, img0_hidden_states: torch.Tensor) -> torch.Tensor:
        """Hidden state at `[IMG0]` `(N, lm_hidden_dim)` -> normalised retrieval embedding `(N, retrieval_dim)`."""
        x = self.ret_text_proj(_onto(img0_hidden_states, self.ret_text_proj.weight))
        return F.normalize(x, dim=-1)

    def image_retrieval_embeds(self, image_features: torch.Tensor) -> torch.Tensor:
        """Pooled vision features `(N, vision_dim)` -> normalised retrieval embedding `(N, retrieval_dim)`."""
        x = self.ret_image_proj(_onto(image_features, self.ret_image_proj.weight))
        return F.normalize(x, dim=-1)

    def decide(self, img0_hidden_states: torch.Tensor) -> torch.Tensor:
        """Hidden state at `[IMG0]` -> probabilities `(N, 2)` of (generate, retrieve)."""
        logits = self.decision_head(_onto(img0_hidden_states, self.decision_head[1].weight))
        return logits.float().softmax(-1)

    def map_to_prompt_embeds(self, img_hidden_states: torch.Tensor) -> torch.Tensor:
        """`[IMG]` hidden states `(N, r, lm_hidden_dim)` -> the decoder's conditioning sequence `(N, cond_length,
        cond_dim)` (`prompt_embeds`)."""
        dtype = self.mapper.fc.weight.dtype
        embeds = self.img_input_embeddings.to(dtype).unsqueeze(0).expand(img_hidden_states.shape[0], -1, -1)
        return self.mapper(_onto(img_hidden_states, self.mapper.fc.weight), embeds)

    # ----------------------------------------------------------------------------------------------------------
    # The decoder's conditioning
    # ----------------------------------------------------------------------------------------------------------
    @property
    def conditioning_layout(self) -> ConditioningLayout:
        """What the mapper produces: the decoder's [`ConditioningLayout`] (Stable Diffusion 1.x/2.x for configs
        without one)."""
        return self._read_layout(self.config.conditioning_layout, self.config.cond_length, self.config.cond_dim)

    def map_to_conditioning(self, img_hidden_states: torch.Tensor) -> dict[str, torch.Tensor]:
        """`[IMG]` hidden states `(N, r, lm_hidden_dim)` -> `{__call__ argument: tensor}` for the decoder: the
        sequence, the pooled vector where the family takes one, and an all-ones mask where it takes one (every
        mapper position is real)."""
        dtype = self.mapper.fc.weight.dtype
        embeds = self.img_input_embeddings.to(dtype).unsqueeze(0).expand(img_hidden_states.shape[0], -1, -1)
        sequence, pooled = self.mapper.map(_onto(img_hidden_states, self.mapper.fc.weight), embeds)
        outputs = {}
        for tensor in self.conditioning_layout.tensors:
            if tensor.kind == SEQUENCE:
                outputs[tensor.name] = sequence
            elif tensor.kind == POOLED:
                outputs[tensor.name] = pooled
            else:
                outputs[tensor.name] = torch.ones(
                    sequence.shape[0], tensor.length, dtype=torch.int64, device=sequence.device
                )
        return outputs

    def negative_conditioning(self) -> dict[str, torch.Tensor]:
        """The stored negatives, batch 1, keyed by the positive names (`{}` for families without negatives)."""
        return {
            t.name: getattr(self, UNCOND_PREFIX + t.name)
            for t in self.conditioning_layout.tensors
            if t.negative_name is not None
        }

    @torch.no_grad()
    def set_negative_conditioning(self, negatives: dict[str, torch.Tensor]):
        """Stores the decoder's default negatives (from `default_negative_conditioning`, batch 1)."""
        expected = sorted(self.negative_conditioning())
        if sorted(negatives) != expected:
            raise ValueError(f"`negatives` must hold {expected} for this layout, got {sorted(negatives)}.")
        for name, value in negatives.items():
            buffer = getattr(self, UNCOND_PREFIX + name)
            if tuple(value.shape) != tuple(buffer.shape):
                raise ValueError(
                    f"`negatives['{name}']` has shape {tuple(value.shape)}; the layout stores {tuple(buffer.shape)}."
                )
            buffer.copy_(value.to(device=buffer.device, dtype=buffer.dtype))

    @property
    def temperature(self) -> float:
        return 1.0 / math.exp(float(self.logit_scale.detach()))
