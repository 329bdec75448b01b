"""Tiny RANDOM-weight text-to-image decoders of every family the decoder layer serves, built offline from configs.

As diffusers' own fast tests do: each model is built from a small config after `torch.manual_seed(0)`, and the
tokenizers are built in memory (a byte-level BPE for the CLIP encoders, a T5 unigram vocabulary, a Gemma BPE
vocabulary), so nothing is downloaded. The images these pipelines make are meaningless; they exercise the real
pipelines' code paths at sizes that run in well under a second on a CPU.

    from gill_pipeline.testing import build_tiny_decoder
    pipe = build_tiny_decoder("flux-dev")
"""

import string

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from transformers import (
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from .tiny import (
    TINY_UNET_SETTINGS,
    assemble_tiny_gill_pipeline,
    build_tiny_clip_text_encoder,
    build_tiny_clip_tokenizer,
    build_tiny_stable_diffusion,
)

# CLIP text positions of the tiny CLIP tokenizers (77 in the real checkpoints; small keeps the tests fast).
TINY_CLIP_LENGTH = 16
# The patch-transformer settings the tiny SD3, PixArt and Sana denoisers share (16x16 latents of 4 channels).
TINY_DIT_SETTINGS = dict(
    sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2
)
_WORDS = "a an the of in on with and photo painting drawing picture cat dog red blue green small large".split()


def build_tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5 (unigram) tokenizer over letters, digits and a few words, built in memory."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(char, -3.0) for char in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + word, -1.0) for word in _WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=4)


def build_tiny_gemma_tokenizer() -> GemmaTokenizer:
    """A Gemma (BPE) tokenizer over single characters. `add_bos_token=True`: Sana assumes `<bos>` at position 0."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for char in "\u2581" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(char, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True)


def _clip_text_side(hidden_size: int, projection_dim: int | None = None):
    """A tiny CLIP tokenizer and its text encoder (with a projection when `projection_dim` is given)."""
    tokenizer = build_tiny_clip_tokenizer(TINY_CLIP_LENGTH)
    torch.manual_seed(0)
    return tokenizer, build_tiny_clip_text_encoder(
        tokenizer, hidden_size, projection_dim or hidden_size, with_projection=projection_dim is not None
    )


def _t5_text_side(d_model: int) -> tuple[T5Tokenizer, T5EncoderModel]:
    """A tiny T5 tokenizer and its encoder."""
    tokenizer = build_tiny_t5_tokenizer()
    torch.manual_seed(0)
    return tokenizer, T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=8,
            d_ff=d_model * 2,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def _text_components(*sides) -> dict:
    """`(tokenizer, text_encoder)` pairs under the names diffusers pipelines give them: `tokenizer`, `text_encoder`,
    then `tokenizer_2`, `text_encoder_2`, and so on."""
    components = {}
    for number, (tokenizer, text_encoder) in enumerate(sides, start=1):
        suffix = "" if number == 1 else f"_{number}"
        components[f"tokenizer{suffix}"] = tokenizer
        components[f"text_encoder{suffix}"] = text_encoder
    return components


def _vae_kl(latent_channels: int = 4, blocks: int = 2, **kwargs) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(4, 8)[:blocks],
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=2,
        sample_size=32,
        **kwargs,
    )


def build_tiny_sd() -> StableDiffusionPipeline:
    """SD 1.x/2.x: the package's tiny Stable Diffusion (one CLIP text encoder, a UNet)."""
    torch.manual_seed(0)
    return build_tiny_stable_diffusion(cross_attention_dim=32, scheduler="ddim", text_length=TINY_CLIP_LENGTH)


def build_tiny_sdxl() -> StableDiffusionXLPipeline:
    """SDXL: two CLIP text encoders (widths 16 and 32, the second with a projection), a text-time UNet."""
    tokenizer, text_encoder = _clip_text_side(hidden_size=16)
    tokenizer_2, text_encoder_2 = _clip_text_side(hidden_size=32, projection_dim=24)
    addition_time_embed_dim = 8
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        **TINY_UNET_SETTINGS,
        sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        # SDXL's added embedding: the pooled text (text_encoder_2's projection) + 6 size/crop ids.
        projection_class_embeddings_input_dim=text_encoder_2.config.projection_dim + 6 * addition_time_embed_dim,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return StableDiffusionXLPipeline(
        **_text_components((tokenizer, text_encoder), (tokenizer_2, text_encoder_2)),
        vae=_vae_kl(),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def build_tiny_sd3() -> StableDiffusion3Pipeline:
    """SD3: two projected CLIP encoders (widths 16 and 16) and a T5 (width 32), an MMDiT transformer."""
    tokenizer, text_encoder = _clip_text_side(hidden_size=16, projection_dim=16)
    tokenizer_2, text_encoder_2 = _clip_text_side(hidden_size=16, projection_dim=16)
    tokenizer_3, text_encoder_3 = _t5_text_side(d_model=32)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        **TINY_DIT_SETTINGS,
        caption_projection_dim=16,
        joint_attention_dim=text_encoder_3.config.d_model,
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        out_channels=4,
    )
    return StableDiffusion3Pipeline(
        **_text_components((tokenizer, text_encoder), (tokenizer_2, text_encoder_2), (tokenizer_3, text_encoder_3)),
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae_kl(shift_factor=0.0609, scaling_factor=1.5035),
    )


def build_tiny_flux(guidance_embeds: bool = True) -> FluxPipeline:
    """Flux: a CLIP encoder (pooled, width 16) and a T5 (width 32). `guidance_embeds`: dev-style, else schnell."""
    tokenizer, text_encoder = _clip_text_side(hidden_size=16)
    tokenizer_2, text_encoder_2 = _t5_text_side(d_model=32)
    vae = _vae_kl(latent_channels=1, shift_factor=0.0609, scaling_factor=1.5035)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * vae.config.latent_channels,  # Flux packs 2x2 latent patches into one token
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),  # must sum to the head size
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        **_text_components((tokenizer, text_encoder), (tokenizer_2, text_encoder_2)),
        scheduler=scheduler,
        vae=vae,
        transformer=transformer,
    )


def build_tiny_pixart_sigma() -> PixArtSigmaPipeline:
    """PixArt-Sigma: a T5 (width 32) with an attention mask, a DiT with cross-attention."""
    tokenizer, text_encoder = _t5_text_side(d_model=32)
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        **TINY_DIT_SETTINGS,
        caption_channels=text_encoder.config.d_model,
        cross_attention_dim=16,
        out_channels=8,  # learned sigma: twice the latent channels
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    return PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=_vae_kl(), transformer=transformer,
        scheduler=DDIMScheduler(),
    )


def build_tiny_sana() -> SanaPipeline:
    """Sana: a Gemma-2 encoder (width 16) with an attention mask, a linear-attention DiT, a DC autoencoder."""
    tokenizer = build_tiny_gemma_tokenizer()
    torch.manual_seed(0)
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            head_dim=8,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            attn_implementation="eager",
        )
    )
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        # 1x1 patches (the DC autoencoder's latents are already small) and narrower heads than SD3's and PixArt's.
        **{**TINY_DIT_SETTINGS, "patch_size": 1, "attention_head_dim": 4},
        out_channels=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=text_encoder.config.hidden_size,
    )
    torch.manual_seed(0)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    return SanaPipeline(
        **_text_components((tokenizer, text_encoder)),
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


TINY_DECODER_BUILDERS = {
    "sd": build_tiny_sd,
    "sdxl": build_tiny_sdxl,
    "sd3": build_tiny_sd3,
    "flux-dev": lambda: build_tiny_flux(guidance_embeds=True),
    "flux-schnell": lambda: build_tiny_flux(guidance_embeds=False),
    "pixart-sigma": build_tiny_pixart_sigma,
    "sana": build_tiny_sana,
}


def build_tiny_decoder(name: str):
    """The tiny random decoder pipeline `name` (one of `TINY_DECODER_BUILDERS`), without touching the global RNG.

    Every model is built after `torch.manual_seed(0)`, so two calls give equal weights.
    """
    if name not in TINY_DECODER_BUILDERS:
        raise ValueError(f"`name` must be one of {sorted(TINY_DECODER_BUILDERS)}, got {name!r}.")
    with torch.random.fork_rng(devices=[]):
        pipe = TINY_DECODER_BUILDERS[name]()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as `from_pretrained` leaves them: T5's dropout would otherwise make every call differ
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_gill_pipeline_with_decoder(name: str, lm_type: str = "opt", seed: int = 0, pipeline_class=None, **kwargs):
    """A whole tiny GILL pipeline (random LM, vision encoder and learned parts) over the tiny decoder `name`,
    assembled with `GILLPipeline.from_base_models`; returns `(pipe, decoder)` (the decoder keeps its text encoders,
    for training targets)."""
    pipe, decoder = assemble_tiny_gill_pipeline(
        lambda: build_tiny_decoder(name), lm_type=lm_type, seed=seed, pipeline_class=pipeline_class, **kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, decoder
