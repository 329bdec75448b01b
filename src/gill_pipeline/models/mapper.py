"""The GILL mapper: `[IMG]` hidden states of the LM -> text conditioning of a diffusion UNet."""

import warnings

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class GILLMapper(ModelMixin, ConfigMixin):
    r"""
    Maps the LM's `[IMG]` states to the conditioning sequence a Stable Diffusion UNet reads.

    The input is the last-layer hidden states of the `r` `[IMG]` positions plus the `[IMG]` tokens' own input
    embeddings (summed, as in GILL). A linear layer brings them to `hidden_dim`; a pre-norm encoder-decoder
    transformer encodes them and lets `num_output_tokens` learned queries read them; a last linear layer maps the
    decoder output to the UNet's cross-attention width.

    Args:
        in_dim (`int`):
            Width of the LM's last hidden state (for OPT this is `word_embed_proj_dim`).
        out_dim (`int`):
            Width of the UNet's text conditioning (`unet.config.cross_attention_dim`).
        num_output_tokens (`int`, *optional*, defaults to 77):
            Length of the produced conditioning sequence (the SD text encoder's maximum length).
        hidden_dim (`int`, *optional*, defaults to 512):
            Width of the transformer.
        num_encoder_layers (`int`, *optional*, defaults to 4):
        num_decoder_layers (`int`, *optional*, defaults to 4):
        num_heads (`int`, *optional*, defaults to 4):
        ff_mult (`int`, *optional*, defaults to 4):
            Feed-forward width as a multiple of `hidden_dim`.
        dropout (`float`, *optional*, defaults to 0.0):
        pooled_out_dim (`int`, *optional*):
            Width of a pooled conditioning vector (SDXL, SD3, Flux `pooled_prompt_embeds`), made by a linear head on
            the mean of the decoded queries. None: the decoder takes no pooled vector (SD 1.x/2.x, PixArt, Sana).
        num_queries (`int`, *optional*):
            Learned queries read from the `[IMG]` states. None: one per output position (the reference GILL). Fewer
            queries than `num_output_tokens` are spread over the output positions by a learned linear map along the
            sequence (for the long T5 sequences of SD3, Flux, PixArt and Sana; see docs/decoders.md for the
            measured trade-off).
    """

    @register_to_config
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_output_tokens: int = 77,
        hidden_dim: int = 512,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        num_heads: int = 4,
        ff_mult: int = 4,
        dropout: float = 0.0,
        pooled_out_dim: int | None = None,
        num_queries: int | None = None,
    ):
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("out_dim", out_dim),
            ("num_output_tokens", num_output_tokens),
            ("hidden_dim", hidden_dim),
            ("num_heads", num_heads),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name, value in (("pooled_out_dim", pooled_out_dim), ("num_queries", num_queries)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"`{name}` must be a positive integer or None, got {value!r}.")
        if num_queries is not None and num_queries > num_output_tokens:
            raise ValueError(
                f"`num_queries` ({num_queries}) must not exceed `num_output_tokens` ({num_output_tokens})."
            )
        if hidden_dim % num_heads != 0:
            raise ValueError(
                f"`hidden_dim` ({hidden_dim}) must be divisible by `num_heads` ({num_heads})."
            )
        self.fc = nn.Linear(in_dim, hidden_dim)
        with warnings.catch_warnings():
            # nn.Transformer warns that nested tensors are off with norm_first=True; that is expected here.
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            self.tfm = self._build_transformer(
                hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, ff_mult, dropout
            )
        self.query_embs = nn.Parameter(torch.randn(1, num_queries or num_output_tokens, hidden_dim))
        self.model = nn.Linear(hidden_dim, out_dim)
        # Created after the reference parts, so a mapper without them draws the same initial weights as before.
        if num_queries is not None and num_queries != num_output_tokens:
            self.upsample = nn.Linear(num_queries, num_output_tokens)
        else:
            self.upsample = None
        self.pooled_head = nn.Linear(hidden_dim, pooled_out_dim) if pooled_out_dim is not None else None

    @staticmethod
    def _build_transformer(hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, ff_mult, dropout):
        return nn.Transformer(
            d_model=hidden_dim,
            nhead=num_heads,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
            dim_feedforward=hidden_dim * ff_mult,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )

    def forward(self, img_hidden_states: torch.Tensor, img_input_embeds: torch.Tensor) -> torch.Tensor:
        r"""
        Args:
            img_hidden_states (`torch.Tensor` of shape `(batch, r, in_dim)`):
                Last-layer hidden states of the LM at the `r` `[IMG]` positions.
            img_input_embeds (`torch.Tensor` of shape `(batch, r, in_dim)`):
                The `[IMG]` tokens' input embeddings.

        Returns:
            `torch.Tensor` of shape `(batch, num_output_tokens, out_dim)`: prompt embeddings for the decoder.
        """
        return self.map(img_hidden_states, img_input_embeds)[0]

    def map(
        self, img_hidden_states: torch.Tensor, img_input_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Like `forward`, but returns `(sequence, pooled)`: pooled is `(batch, pooled_out_dim)`, or None without a
        pooled head."""
        if img_hidden_states.shape != img_input_embeds.shape:
            raise ValueError(
                f"`img_hidden_states` {tuple(img_hidden_states.shape)} and `img_input_embeds` "
                f"{tuple(img_input_embeds.shape)} must have the same shape."
            )
        x = self.fc(img_hidden_states + img_input_embeds)
        queries = self.query_embs.expand(x.shape[0], -1, -1)
        decoded = self.tfm(x, queries)
        if self.upsample is not None:
            # (N, Q, D) -> (N, L, D): every output position is a learned mix of the Q decoded queries.
            decoded_seq = self.upsample(decoded.transpose(1, 2)).transpose(1, 2)
        else:
            decoded_seq = decoded
        pooled = self.pooled_head(decoded.mean(1)) if self.pooled_head is not None else None
        return self.model(decoded_seq), pooled
