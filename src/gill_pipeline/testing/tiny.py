"""Tiny GILL pipelines with RANDOM weights, built locally from configs: for tests, demos and benchmarks.

Nothing here downloads anything. The outputs of these pipelines are meaningless (the weights are random); they
exercise every code path of the real thing at a size that runs in seconds on a CPU.
"""

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ..pipeline import GILLPipeline

TINY_CORPUS = [
    "This is my dog. He likes to play in the park.",
    "Show me what he would look like in the snow.",
    "A small red circle on the left. A large blue square on the right.",
    "Here is a picture of a cat sleeping on a sofa.",
    "The weather is nice today, let us go for a walk by the river.",
    "A photo of a mountain lake at sunset with pine trees.\nA drawing of a house.",
]
LM_TYPES = ("opt", "gpt2", "llama", "qwen2")
# Llama-style LMs: (config class, model class, tied input/output embeddings).
_LLAMA_LIKE = {"llama": (LlamaConfig, LlamaForCausalLM, False), "qwen2": (Qwen2Config, Qwen2ForCausalLM, True)}
# Vocabulary of the tiny CLIP tokenizers of the decoders' text encoders.
TINY_CLIP_VOCAB_SIZE = 300
# Sizes of the learned GILL parts of every tiny pipeline (the reference sizes are for a 4096-wide LM).
TINY_GILL_SIZES = dict(
    num_img_tokens=4, retrieval_dim=16, mapper_hidden_dim=32, mapper_encoder_layers=1, mapper_decoder_layers=1,
    mapper_heads=2,
)
# The UNet settings the tiny SD and SDXL UNets share.
TINY_UNET_SETTINGS = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, in_channels=4, out_channels=4)
SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    ),
    "pndm": lambda: PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    ),
    "euler": lambda: EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
}


# ChatML, as instruction LMs such as Qwen2.5-Instruct write it.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer(
    vocab_size: int = 320, model_max_length: int = 128, chat_template: bool = False
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process on a few sentences (deterministic). With `chat_template`, it
    also has ChatML's special tokens and template, like an instruction LM's tokenizer."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"] + (TINY_CHAT_TOKENS if chat_template else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TINY_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )
    if chat_template:
        fast.add_special_tokens({"additional_special_tokens": TINY_CHAT_TOKENS})
        fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny_lm(lm_type: str, vocab_size: int, tokenizer=None, hidden_size: int = 32, num_layers: int = 2):
    """A tiny random causal LM of the given architecture. OPT gets `word_embed_proj_dim != hidden_size`."""
    special = {}
    if tokenizer is not None:
        special = dict(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
    if lm_type == "opt":
        config = OPTConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            word_embed_proj_dim=hidden_size // 2,
            ffn_dim=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            max_position_embeddings=128,
            **special,
        )
        return OPTForCausalLM(config)
    if lm_type == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=2, n_positions=128, **special
        )
        return GPT2LMHeadModel(config)
    if lm_type in _LLAMA_LIKE:
        config_class, model_class, tied = _LLAMA_LIKE[lm_type]
        config = config_class(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=128,
            tie_word_embeddings=tied,
            **special,
        )
        return model_class(config)
    raise ValueError(f"`lm_type` must be one of {LM_TYPES}, got {lm_type!r}.")


def build_tiny_clip_tokenizer(model_max_length: int = 16) -> PreTrainedTokenizerFast:
    """The tokenizer of a tiny decoder's CLIP text encoder: [`build_tiny_tokenizer`] with a smaller vocabulary."""
    return build_tiny_tokenizer(vocab_size=TINY_CLIP_VOCAB_SIZE, model_max_length=model_max_length)


def _tiny_clip_tower(hidden_size: int) -> dict:
    """The depth of every tiny CLIP tower, text or vision: 2 layers, 2 heads, an MLP twice as wide."""
    return dict(hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=2, num_attention_heads=2)


def build_tiny_clip_text_encoder(
    tokenizer, hidden_size: int, projection_dim: int | None = None, with_projection: bool = False
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A tiny random CLIP text encoder over `tokenizer` (2 layers, 2 heads); `with_projection`: with the text
    projection (of width `projection_dim`) that SDXL and SD3 pool. Draws from the global RNG: seed it first."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        **_tiny_clip_tower(hidden_size),
        max_position_embeddings=tokenizer.model_max_length,
        **({} if projection_dim is None else {"projection_dim": projection_dim}),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def build_tiny_stable_diffusion(
    cross_attention_dim: int = 32, scheduler: str = "ddim", text_length: int = 16
) -> StableDiffusionPipeline:
    """A tiny random Stable Diffusion pipeline (UNet, VAE, CLIP text encoder and tokenizer, scheduler)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"`scheduler` must be one of {sorted(SCHEDULERS)}, got {scheduler!r}.")
    unet = UNet2DConditionModel(
        **TINY_UNET_SETTINGS,
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    sd_tokenizer = build_tiny_clip_tokenizer(model_max_length=text_length)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=build_tiny_clip_text_encoder(sd_tokenizer, hidden_size=cross_attention_dim),
        tokenizer=sd_tokenizer,
        unet=unet,
        scheduler=SCHEDULERS[scheduler](),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_vision_encoder(image_size: int = 32) -> tuple[CLIPVisionModel, CLIPImageProcessor]:
    encoder = CLIPVisionModel(CLIPVisionConfig(**_tiny_clip_tower(32), image_size=image_size, patch_size=8))
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return encoder, processor


def assemble_tiny_gill_pipeline(
    build_decoder, lm_type: str = "opt", seed: int = 0, pipeline_class=None, chat_template: bool = False, **kwargs
):
    """A tiny random LM and vision encoder (seeded with `seed`, the global RNG left alone) and the decoder
    `build_decoder()` builds between them, assembled with [`GILLPipeline.from_base_models`] at `TINY_GILL_SIZES`
    (`kwargs` override them). Returns `(pipe, decoder)`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer(chat_template=chat_template)
        llm = build_tiny_lm(lm_type, len(tokenizer), tokenizer)
        decoder = build_decoder()
        image_encoder, processor = build_tiny_vision_encoder()
    pipe = (pipeline_class or GILLPipeline).from_base_models(
        language_model=llm,
        tokenizer=tokenizer,
        stable_diffusion=decoder,
        image_encoder=image_encoder,
        feature_extractor=processor,
        **{**TINY_GILL_SIZES, "seed": seed, **kwargs},
    )
    return pipe, decoder


def build_tiny_gill_pipeline(
    lm_type: str = "opt",
    cross_attention_dim: int = 32,
    scheduler: str = "ddim",
    seed: int = 0,
    pipeline_class=None,
    chat_template: bool = False,
    **assemble_kwargs,
):
    """A whole GILL pipeline with random weights, assembled with [`GILLPipeline.from_base_models`]. With
    `chat_template`, its tokenizer has a ChatML chat template (an instruction LM's tokenizer)."""
    pipe, _ = assemble_tiny_gill_pipeline(
        lambda: build_tiny_stable_diffusion(cross_attention_dim, scheduler),
        lm_type=lm_type,
        seed=seed,
        pipeline_class=pipeline_class,
        chat_template=chat_template,
        **assemble_kwargs,
    )
    return pipe
