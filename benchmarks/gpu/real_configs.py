"""Architectures of the real checkpoints, written from their published `config.json` values.

The checkpoints' configs cannot be downloaded here, so the values are copied from the published configs (Hub model
cards / `config.json` of the named repos). Only architecture numbers: every model built from them has random
weights. Used by `bench_gpu.py` (models built directly on the device) and for the parameter counts in
`docs/decoders.md` (models built on the meta device, no memory used).
"""

import torch
from diffusers import (
    AutoencoderKL,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
    Gemma2Config,
    Gemma2Model,
    OPTConfig,
    OPTForCausalLM,
    T5Config,
    T5EncoderModel,
)

# facebook/opt-6.7b
OPT_6_7B = dict(vocab_size=50272, hidden_size=4096, word_embed_proj_dim=4096, ffn_dim=16384, num_hidden_layers=32,
                num_attention_heads=32, max_position_embeddings=2048, dropout=0.0, attention_dropout=0.0)
# openai/clip-vit-large-patch14 (vision tower)
CLIP_VIT_L_14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
# openai/clip-vit-large-patch14 (text tower): SD 1.x text_encoder, SDXL/SD3 text_encoder, Flux text_encoder
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
# laion/CLIP-ViT-bigG-14-laion2B-39B-b160k (text tower): SDXL/SD3 text_encoder_2
CLIP_BIGG_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
# google/t5-v1_1-xxl encoder: SD3 text_encoder_3, Flux text_encoder_2, PixArt-Sigma text_encoder
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)
# google/gemma-2-2b-it: Sana text_encoder
GEMMA_2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192)

# runwayml/stable-diffusion-v1-5 unet and vae
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512,
              scaling_factor=0.18215)
# stabilityai/stable-diffusion-xl-base-1.0 unet
SDXL_UNET = dict(sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
# black-forest-labs/FLUX.1-dev transformer and vae
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# black-forest-labs/FLUX.1-schnell transformer (timestep-distilled: no guidance embedding) and scheduler; same VAE
FLUX_SCHNELL_TRANSFORMER = dict(FLUX_TRANSFORMER, guidance_embeds=False)
FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
FLUX_VAE = dict(SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024,
                scaling_factor=0.3611, shift_factor=0.1159)

# stabilityai/stable-diffusion-3.5-large transformer
SD35_LARGE_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                              num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                              pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer
PIXART_SIGMA_TRANSFORMER = dict(sample_size=128, num_layers=28, patch_size=2, attention_head_dim=72,
                                num_attention_heads=16, caption_channels=4096, in_channels=4, out_channels=8,
                                cross_attention_dim=1152, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
                                use_additional_conditions=False, interpolation_scale=2, attention_bias=True,
                                activation_fn="gelu-approximate", norm_elementwise_affine=False, norm_eps=1e-6)
# Efficient-Large-Model/Sana_1600M_1024px_diffusers transformer
SANA_1600M_TRANSFORMER = dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32,
                              num_layers=20, num_cross_attention_heads=20, cross_attention_head_dim=112,
                              cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5, sample_size=32,
                              patch_size=1)

DENOISERS = {
    "SD 1.5 UNet": lambda: sd15_unet(),
    "SDXL UNet": lambda: sdxl_unet(),
    "SD3.5-large transformer": lambda: sd35_large_transformer(),
    "Flux.1 transformer": lambda: flux_transformer(),
    "PixArt-Sigma XL transformer": lambda: pixart_sigma_transformer(),
    "Sana 1600M transformer": lambda: sana_transformer(),
}

TEXT_ENCODERS = {
    "CLIP-L text": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
    "OpenCLIP bigG text (projected)": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT)),
    "T5-v1.1-XXL encoder": lambda: T5EncoderModel(T5Config(**T5_XXL)),
    "Gemma-2-2B": lambda: Gemma2Model(Gemma2Config(**GEMMA_2_2B)),
}
# The text encoders each decoder family loads (what GILL inference leaves out).
FAMILY_TEXT_ENCODERS = {
    "SD 1.5": ["CLIP-L text"],
    "SDXL": ["CLIP-L text", "OpenCLIP bigG text (projected)"],
    "SD3 / 3.5": ["CLIP-L text", "OpenCLIP bigG text (projected)", "T5-v1.1-XXL encoder"],
    "Flux.1": ["CLIP-L text", "T5-v1.1-XXL encoder"],
    "PixArt-Sigma": ["T5-v1.1-XXL encoder"],
    "Sana": ["Gemma-2-2B"],
}


def opt_6_7b() -> OPTForCausalLM:
    return OPTForCausalLM(OPTConfig(**OPT_6_7B))


def clip_vit_l_14() -> CLIPVisionModel:
    return CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_L_14))


def sd15_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**SD15_UNET)


def sdxl_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**SDXL_UNET)


def sd_vae(**overrides) -> AutoencoderKL:
    return AutoencoderKL(**dict(SD_VAE, **overrides))


def flux_transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(**FLUX_TRANSFORMER)


def sd35_large_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(**SD35_LARGE_TRANSFORMER)


def pixart_sigma_transformer() -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(**PIXART_SIGMA_TRANSFORMER)


def sana_transformer() -> SanaTransformer2DModel:
    return SanaTransformer2DModel(**SANA_1600M_TRANSFORMER)


def parameter_count(build) -> int:
    """Parameters of a model built on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


def text_encoder_memory_table(bytes_per_parameter: int = 2) -> list[tuple[str, int, float]]:
    """(family, text-encoder parameters, GiB of weights at `bytes_per_parameter`) for every family."""
    counts = {name: parameter_count(build) for name, build in TEXT_ENCODERS.items()}
    rows = []
    for family, encoders in FAMILY_TEXT_ENCODERS.items():
        total = sum(counts[name] for name in encoders)
        rows.append((family, total, total * bytes_per_parameter / 2**30))
    return rows


if __name__ == "__main__":
    for name, build in {**TEXT_ENCODERS, **DENOISERS}.items():
        print(f"{name}: {parameter_count(build) / 1e6:.1f}M parameters")
    for family, total, gib in text_encoder_memory_table():
        print(f"{family}: text encoders {total / 1e9:.3f}B parameters, {gib:.2f} GiB in bf16")

# meta-llama/Meta-Llama-3-8B (untied embeddings, grouped-query attention)
LLAMA_3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
# meta-llama/Meta-Llama-3-70B
LLAMA_3_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                   num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                   rms_norm_eps=1e-5, tie_word_embeddings=False)
# Qwen/Qwen2.5-7B (grouped-query attention with q/k/v biases, untied embeddings; max_position_embeddings 131072 in
# the published config, 32768 here: the rotary cache does not depend on it and nothing here reads that far)
QWEN_2_5_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                   num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0,
                   rms_norm_eps=1e-6, tie_word_embeddings=False)
