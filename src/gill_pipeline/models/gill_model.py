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
from .mapper import GILLMapper


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
    - `uncond_prompt_embeds` (buffer): the SD text encoder's embedding of the empty prompt, for classifier-free
      guidance without the SD text encoder at inference.

    Args:
        lm_input_dim (`int`): Width of the LM's input embeddings.
        lm_hidden_dim (`int`): Width of the LM's last hidden state (the input width of its output embeddings).
        vision_dim (`int`): Width of the vision encoder's pooled output.
        cond_dim (`int`): The UNet's cross-attention width.
        cond_length (`int`, *optional*, defaults to 77): Length of the UNet's text conditioning.
        num_img_tokens (`int`, *optional*, defaults to 8): `r`, the number of `[IMG]` tokens.
        num_visual_tokens (`int`, *optional*, defaults to 4): `k`, the LM input embeddings per input image.
        retrieval_dim (`int`, *optional*, defaults to 256): Width of the shared retrieval space.
        tie_img_embeddings (`bool`, *optional*, defaults to `True`):
            Whether the `[IMG]` output rows are the input rows (LMs with tied word embeddings).
        mapper_hidden_dim, mapper_encoder_layers, mapper_decoder_layers, mapper_heads: the [`GILLMapper`]'s sizes.
        decision_dropout (`float`, *optional*, defaults to 0.5): Dropout before the decision head's linear layer.
        logit_scale_init (`float`, *optional*, defaults to log(1/0.07)): Initial retrieval temperature (log scale).
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
        )
        self.decision_head = nn.Sequential(nn.Dropout(decision_dropout), nn.Linear(lm_hidden_dim, 2))
        self.register_buffer("uncond_prompt_embeds", torch.zeros(1, cond_length, cond_dim), persistent=True)

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
        return hidden_states.to(rows.dtype) @ rows.t()

    @torch.no_grad()
    def init_img_embeddings_from(self, input_embeddings: torch.Tensor, output_embeddings: torch.Tensor | None = None):
        """Initialise the `[IMG]` rows from the mean and spread of an LM's existing rows (as `mean_resizing` does)."""
        for target, source in ((self.img_input_embeddings, input_embeddings), (self.img_output_embeddings, output_embeddings)):
            if target is None or source is None:
                continue
            source = source.detach().float()
            mean, std = source.mean(0), source.std(0)
            noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
            target.copy_((mean + noise * std * 0.1).to(target.dtype))

    # ----------------------------------------------------------------------------------------------------------
    # Heads
    # ----------------------------------------------------------------------------------------------------------
    def encode_visual_prefix(self, image_features: torch.Tensor) -> torch.Tensor:
        """Pooled vision features `(N, vision_dim)` -> LM input embeddings `(N, k, lm_input_dim)`."""
        x = self.visual_prefix(image_features.to(self.visual_prefix.weight.dtype))
        return x.reshape(x.shape[0], self.config.num_visual_tokens, self.config.lm_input_dim)

    def text_retrieval_embeds(self, img0_hidden_states: torch.Tensor) -> torch.Tensor:
        """Hidden state at `[IMG0]` `(N, lm_hidden_dim)` -> normalised retrieval embedding `(N, retrieval_dim)`."""
        x = self.ret_text_proj(img0_hidden_states.to(self.ret_text_proj.weight.dtype))
        return F.normalize(x, dim=-1)

    def image_retrieval_embeds(self, image_features: torch.Tensor) -> torch.Tensor:
        """Pooled vision features `(N, vision_dim)` -> normalised retrieval embedding `(N, retrieval_dim)`."""
        x = self.ret_image_proj(image_features.to(self.ret_image_proj.weight.dtype))
        return F.normalize(x, dim=-1)

    def decide(self, img0_hidden_states: torch.Tensor) -> torch.Tensor:
        """Hidden state at `[IMG0]` -> probabilities `(N, 2)` of (generate, retrieve)."""
        logits = self.decision_head(img0_hidden_states.to(self.decision_head[1].weight.dtype))
        return logits.float().softmax(-1)

    def map_to_prompt_embeds(self, img_hidden_states: torch.Tensor) -> torch.Tensor:
        """`[IMG]` hidden states `(N, r, lm_hidden_dim)` -> UNet prompt embeddings `(N, cond_length, cond_dim)`."""
        dtype = self.mapper.fc.weight.dtype
        embeds = self.img_input_embeddings.to(dtype).unsqueeze(0).expand(img_hidden_states.shape[0], -1, -1)
        return self.mapper(img_hidden_states.to(dtype), embeds)

    @property
    def temperature(self) -> float:
        return 1.0 / math.exp(float(self.logit_scale.detach()))
