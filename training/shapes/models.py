"""The shapes world's base models: their configs (every size here, in one place) and the word-level tokenizers."""

import dataclasses

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .dialogue import CHAT_WORDS
from .world import vocabulary

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
# EOS is deliberately not id 2: CLIP's text pooling treats eos id 2 as a legacy case and pools the wrong token.
SPECIALS = [PAD, UNK, BOS, EOS]


@dataclasses.dataclass(frozen=True)
class WorldSizes:
    image_size: int = 32
    text_length: int = 24  # the SD text conditioning length: a whole context prompt (17 words) + <s> </s> fits
    clip_width: int = 128
    clip_layers: int = 3
    clip_heads: int = 4
    clip_patch: int = 4
    clip_projection: int = 64
    vae_channels: tuple = (32, 64, 64)
    latent_channels: int = 4
    unet_channels: tuple = (32, 64)
    lm_width: int = 128
    lm_layers: int = 3
    lm_heads: int = 4
    lm_context: int = 96
    dialogue_lm_context: int = 160  # with chat transcripts: a five-turn chat (start image, requests, answers, images) fits


SIZES = WorldSizes()


def normalise_case_and_punctuation(tokenizer: Tokenizer) -> None:
    """Lower-cases text and splits punctuation off words, so that "Draw a blue square." reads as the world writes it
    ("draw a blue square ."). The world's own text is lower case with spaced punctuation, so it tokenises exactly as
    without this: a trained LM keeps its meaning (this is how the bundled tokenizer got it without retraining)."""
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )


def build_tokenizer(clip_style: bool, model_max_length: int, chat_words: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the world's vocabulary.

    `clip_style=True` wraps every text in `<s> ... </s>` (what CLIP's text tower reads); the LM's tokenizer adds
    nothing, because GILLPipeline puts BOS itself. `chat_words=True` (the LM's) adds the words a user of a chat types
    (`dialogue.CHAT_WORDS`: "what", "?", "please", ...) after the world's, so the world's words keep their ids.
    """
    words = vocabulary() + ([w for w in CHAT_WORDS if w not in vocabulary()] if chat_words else [])
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    normalise_case_and_punctuation(tokenizer)
    if clip_style:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
    )


def vocabulary_settings(tokenizer) -> dict:
    """What a text model's config takes from its tokenizer: the vocabulary size and the special tokens' ids."""
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def transformer_settings(width: int, layers: int, heads: int, mlp_ratio: int) -> dict:
    """A transformer's width, depth, heads and MLP width, under the names CLIP's and Llama's configs share."""
    return dict(
        hidden_size=width, intermediate_size=width * mlp_ratio, num_hidden_layers=layers, num_attention_heads=heads
    )


def build_clip(tokenizer, sizes: WorldSizes = SIZES):
    from transformers import CLIPConfig, CLIPModel

    # Both towers have one width and depth.
    tower = transformer_settings(sizes.clip_width, sizes.clip_layers, sizes.clip_heads, mlp_ratio=4)
    text = dict(**tower, **vocabulary_settings(tokenizer), max_position_embeddings=sizes.text_length)
    vision = dict(**tower, image_size=sizes.image_size, patch_size=sizes.clip_patch)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=sizes.clip_projection))


def build_vae(sizes: WorldSizes = SIZES):
    from diffusers import AutoencoderKL

    n = len(sizes.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=sizes.vae_channels,
        latent_channels=sizes.latent_channels,
        norm_num_groups=16,
        sample_size=sizes.image_size,
        layers_per_block=1,
    )


def build_unet(sizes: WorldSizes = SIZES):
    from diffusers import UNet2DConditionModel

    latent = sizes.image_size // 2 ** (len(sizes.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=latent,
        in_channels=sizes.latent_channels,
        out_channels=sizes.latent_channels,
        block_out_channels=sizes.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=sizes.clip_width,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    # clip_sample=False: DDIM would otherwise clamp the latents (a trap noted in shared/facts/shapes-world.md).
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_lm(tokenizer, sizes: WorldSizes = SIZES):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **vocabulary_settings(tokenizer),
        **transformer_settings(sizes.lm_width, sizes.lm_layers, sizes.lm_heads, mlp_ratio=2),
        num_key_value_heads=sizes.lm_heads,
        max_position_embeddings=sizes.lm_context,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)
