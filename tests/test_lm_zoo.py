"""GILL's decoding on a zoo of tiny random LMs of every transformers causal-LM family that takes input embeddings and
a cache: a batch equals its rows one by one, `[IMG]` rows are embedded like text, `[IMG]` logits get the LM's own
logit post-processing.

Every family of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is built from its config with small generic sizes (sliding windows
smaller than the test sequences, one layer of each kind for hybrid models); a few families need an override, and those
that cannot take part are skipped with the reason. A representative subset runs by default, the whole zoo under
`-m slow`.
"""

import functools
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as transformers_logging

from gill_pipeline import DecodingSettings, GILLDecoder, GILLModel
from gill_pipeline.models.lm_bridge import (
    embed_tokens,
    input_embedding_scale,
    lm_forward_with_img_logits,
    new_cache,
    takes_position_ids,
)

VOCAB = 96
NUM_IMG_TOKENS = 3
MAX_PARAMETERS = 3_000_000  # "tiny": a family whose smallest build is bigger than this is skipped

# Small sizes under every name transformers configs use for them (each config gets the names it has).
GENERIC = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    sliding_window=4,  # much shorter than the decoded sequences: windows really cut
    attention_window_size=4,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    is_decoder=True,  # BERT-like families are causal LMs only as decoders
    # mixtures of experts
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    # multi-head latent attention
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    # partial rotary embeddings given in dimensions
    rotary_dim=8,
    # state-space / linear-attention layers
    state_size=8,
    mamba_d_state=8,
    mamba_n_heads=4,
    mamba_d_head=16,
    mamba_expand=2,
    mamba_n_groups=1,
    linear_num_key_heads=2,
    linear_num_value_heads=2,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    # logit post-processing strong enough to matter for tiny random logits
    final_logit_softcapping=0.5,
    logits_scaling=4.0,
    logit_scale=4.0,
    # per-layer input embeddings (Gemma 3n / 4)
    vocab_size_per_layer_input=VOCAB,
    hidden_size_per_layer_input=8,
)

PER_FAMILY = {
    "mamba2": dict(num_heads=4, head_dim=16, expand=2, n_groups=1, chunk_size=8),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "bamba": dict(attn_layer_indices=[1]),
    "zaya": dict(num_experts_per_tok=1),
    "gpt_neo": dict(num_layers=2, attention_types=[[["global", "local"], 1]], window_size=4),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], lru_width=32),
    "gemma3n_text": dict(num_kv_shared_layers=0),
    "xlm": dict(causal=True),  # XLM is bidirectional unless asked
    "falcon_h1": dict(mamba_d_ssm=64),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),  # its default is all Mamba
    "zamba2": dict(layer_types=["linear_attention", "hybrid"], hybrid_layer_ids=[1]),
    # Moshi's attention ignores the window its cache keeps (transformers' cached and full forwards disagree whenever
    # the window cuts, in `generate` too): a window as long as the context.
    "moshi": dict(sliding_window=128),
}

SKIP = {
    "blt": "byte-level patching model with its own entropy model; not a plain token LM",
    "cpmant": "does not accept `inputs_embeds`",
    "xlnet": "permutation LM with memory instead of a cache",
    "reformer": "chunked LSH attention with its own buffers; no `Cache`",
    "xmod": "needs a language adapter chosen at call time",
    "rembert": "input embedding width differs from the hidden width, which GILL does not support",
    # Families whose config could not be made tiny here with generic sizes (their own validation or per-layer configs
    # reject them, or the tiny model does not run); none of them is a new kind of layer for the decoder.
    "axk1": "tiny config not found (MLA head sizes rejected)",
    "cohere_compass_text": "tiny config not found (layer-type table)",
    "dbrx": "tiny config not found (nested attention config)",
    "deepseek_v4": "tiny config not found (compressed attention sizes)",
    "dory": "tiny config not found (attention sizes)",
    "dots3_note_text": "tiny config not found (per-layer attribute config)",
    "gemma3n": "multimodal wrapper needs timm",
    "gemma3n_text": "tiny config not found (KV-sharing layers)",
    "gemma4_assistant": "assistant (drafter) model, not a stand-alone LM",
    "gemma4_text": "tiny config not found (per-layer attribute config)",
    "gemma4_unified_text": "tiny config not found (per-layer attribute config)",
    "lfm2_moe": "tiny config not found (layer table)",
    "mimo_v2_flash": "tiny config not found (attention head sizes)",
    "prophetnet": "encoder-decoder model",
    "qwen4_exp": "tiny config not found (multimodal sizes)",
    "qwen4_exp_text": "tiny config not found (indexed-attention sizes)",
    "xlstm": "tiny config not found (matrix-memory sizes)",
    "zamba": "tiny config not found (shared-transformer tying)",
}
# The `[IMG]`-row embedding applies the module's scale only: an embedding that normalises rows is not reproduced.
SKIP_IMG_EMBEDDING = {"inkling_text": "`InklingNormedEmbedding` normalises looked-up rows (not done for `[IMG]` rows yet)"}


def _read_only(cls, name: str) -> bool:
    name = getattr(cls, "attribute_map", {}).get(name, name)
    attribute = getattr(cls, name, None)
    return isinstance(attribute, property) and attribute.fset is None


@functools.lru_cache(maxsize=None)
def tiny_config(family: str):
    cls = CONFIG_MAPPING[family]
    default = cls()
    # Only names the family's config has: a stray `sliding_window` would make `DynamicCache` drop keys that a
    # full-attention model still attends to.
    overrides = {k: v for k, v in GENERIC.items() if hasattr(default, k)}
    if hasattr(default, "qk_rope_head_dim"):
        overrides["head_dim"] = GENERIC["qk_rope_head_dim"]  # multi-head latent attention: rotary part of a head
    overrides.update(PER_FAMILY.get(family, {}))
    # Hybrid models: one layer of each kind the full-size model has (attention, sliding, linear, state-space...).
    default_types = getattr(default, "layer_types", None)
    if (
        isinstance(default_types, (list, tuple))
        and default_types
        and not _read_only(cls, "layer_types")
        and "layer_types" not in PER_FAMILY.get(family, {})
    ):
        kinds = list(dict.fromkeys(default_types))
        overrides["num_hidden_layers"] = max(2, len(kinds))
        overrides["layer_types"] = (kinds * 2)[: overrides["num_hidden_layers"]]
    overrides = {k: v for k, v in overrides.items() if not _read_only(cls, k)}
    return cls(**overrides)


def build_tiny_lm(family: str):
    """A tiny random LM of `family` in eval mode, or `pytest.skip` with the reason it cannot take part."""
    if family in SKIP:
        pytest.skip(f"{family}: {SKIP[family]}")
    transformers_logging.set_verbosity_error()
    try:
        config = tiny_config(family)
    except ImportError as error:
        pytest.skip(f"{family}: needs an extra package: {error}")
    if getattr(config, "is_encoder_decoder", False):
        pytest.skip(f"{family}: encoder-decoder model")
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_PARAMETERS:
        pytest.skip(f"{family}: cannot be built tiny from its config ({size / 1e6:.0f}M parameters)")
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(config).eval()
    return llm


def tiny_gill(llm) -> GILLModel:
    width = llm.get_input_embeddings().weight.shape[1]
    torch.manual_seed(0)
    gill = GILLModel(
        lm_input_dim=width,
        lm_hidden_dim=width,
        vision_dim=8,
        cond_dim=8,
        cond_length=4,
        num_img_tokens=NUM_IMG_TOKENS,
        num_visual_tokens=1,
        retrieval_dim=8,
        tie_img_embeddings=llm.get_output_embeddings().weight is llm.get_input_embeddings().weight,
        mapper_hidden_dim=8,
        mapper_encoder_layers=1,
        mapper_decoder_layers=1,
        mapper_heads=1,
    ).eval()
    head = llm.get_output_embeddings()
    gill.init_img_embeddings_from(llm.get_input_embeddings().weight, None if head is None else head.weight)
    return gill


def img_token_ids(llm) -> list[int]:
    vocab = llm.get_input_embeddings().weight.shape[0]
    return list(range(vocab, vocab + NUM_IMG_TOKENS))


def scheduled_decoder(llm, gill) -> GILLDecoder:
    """A `GILLDecoder` over the LM whose `[IMG0]` logit follows the row's own tokens: huge when the LM's favourite
    text token plus the row's position is a multiple of 4, else very low. Rows therefore produce `[IMG0]` at
    different steps, and a row's choice depends on nothing but its own tokens."""
    ids = img_token_ids(llm)

    def lm_forward(embeds, mask, positions, cache, use_cache, keep):
        logits, hidden, output = lm_forward_with_img_logits(
            llm, gill, ids, embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=use_cache,
            logits_to_keep=keep,
        )
        favourite = logits[:, -1, : ids[0]].argmax(-1)
        logits = logits.clone()
        # The row's length so far makes the schedule differ between rows even when a random LM repeats one token.
        wanted = (favourite + positions[:, -1]) % 4 == 0
        logits[:, -1, ids[0]] = torch.where(wanted, 1e4, -1e4).to(logits.dtype)
        return logits, hidden, getattr(output, "cache", None) if use_cache else None

    return GILLDecoder(
        lm_forward=lm_forward,
        embed_ids=lambda token_ids: embed_tokens(llm, gill, ids, token_ids),
        img_token_ids=ids,
        eos_token_ids=set(),
        is_newline=lambda token: False,
        new_cache=lambda: new_cache(llm),
        max_positions=None,
        pad_prompts=takes_position_ids(llm),
    )


def prompts(llm, gill) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = img_token_ids(llm)
    lengths = (6, 11, 3)  # different lengths: left padding of 0, 5 and 8 slots
    rows = [torch.randint(3, ids[0], (n,), generator=generator) for n in lengths]
    return [embed_tokens(llm, gill, ids, row) for row in rows]


ALL_FAMILIES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
# One of each kind: full attention (learned positions, rotary), sliding window, ALiBi, state-space, hybrid and
# linear attention, an own cache class, scaled input embeddings, final-logit soft-capping, logit scaling.
REPRESENTATIVE = [
    "opt", "llama", "mistral", "gpt_neo", "mpt", "bloom", "mamba2", "qwen3_next", "jamba", "minimax", "gemma2",
    "cohere2", "granite", "xglm", "roberta",
]
SETTINGS = DecodingSettings(max_new_tokens=8, min_text_tokens=1, max_images=2)


def check_batch_equals_single_calls(family: str, use_cache: bool = True):
    llm = build_tiny_lm(family)
    gill = tiny_gill(llm)
    decoder = scheduled_decoder(llm, gill)
    embeds = prompts(llm, gill)
    settings = DecodingSettings(**{**SETTINGS.__dict__, "use_cache": use_cache})
    with torch.no_grad():
        batched = decoder(embeds, settings)
        singles = [decoder([e], settings)[0] for e in embeds]
    for b, (row, single) in enumerate(zip(batched, singles)):
        assert row.token_ids == single.token_ids, f"{family}: row {b} differs from its single call"
        assert row.img_starts == single.img_starts
        assert len(row.hidden_states) == len(single.hidden_states)
        torch.testing.assert_close(
            torch.stack(row.hidden_states), torch.stack(single.hidden_states), atol=1e-4, rtol=1e-4,
            msg=lambda m: f"{family}: row {b} hidden states: {m}",
        )
        # And both equal ONE forward over the row's prompt and fed tokens, without padding or cache.
        fed = row.token_ids[: len(row.hidden_states)]
        sequence = torch.cat([embeds[b], decoder.embed_ids(torch.tensor(fed))])[None]
        with torch.no_grad():
            reference = llm(inputs_embeds=sequence, output_hidden_states=True).hidden_states[-1][0, embeds[b].shape[0] :]
        torch.testing.assert_close(
            torch.stack(row.hidden_states), reference, atol=1e-4, rtol=1e-4,
            msg=lambda m: f"{family}: row {b} hidden states vs one full forward: {m}",
        )
    return batched


@pytest.mark.parametrize("family", REPRESENTATIVE)
def test_batch_equals_single_calls(family):
    rows = check_batch_equals_single_calls(family)
    # The schedule makes rows emit [IMG0] at different steps (the case that used to pad one row inside a step).
    assert len({tuple(row.img_starts) for row in rows}) > 1, [row.img_starts for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_batch_equals_single_calls_whole_zoo(family):
    check_batch_equals_single_calls(family)


def test_uncached_decoding_equals_cached():
    """Without a cache (the reference's full re-runs) a batch gives the same answers, for a few kinds of LM."""
    for family in ("gpt_neo", "mamba2", "qwen3_next", "minimax"):
        cached = check_batch_equals_single_calls(family, use_cache=True)
        uncached = check_batch_equals_single_calls(family, use_cache=False)
        for a, b in zip(cached, uncached):
            assert a.token_ids == b.token_ids, family
            torch.testing.assert_close(torch.stack(a.hidden_states), torch.stack(b.hidden_states), atol=1e-4, rtol=1e-4)


def check_img_tokens_like_text(family: str):
    """With `[IMG]` rows copied from the LM's own rows of some text tokens, `[IMG]` ids are embedded exactly as those
    tokens (the embedding module's scale included) and get exactly their logits (the LM's soft-capping or logit
    scaling included)."""
    if family in SKIP_IMG_EMBEDDING:
        pytest.skip(SKIP_IMG_EMBEDDING[family])
    llm = build_tiny_lm(family)
    gill = tiny_gill(llm)
    ids = img_token_ids(llm)
    text = torch.tensor([5, 6, 7])
    head = llm.get_output_embeddings()
    with torch.no_grad():
        gill.img_input_embeddings.copy_(llm.get_input_embeddings().weight[text])
        if gill.img_output_embeddings is not None:
            gill.img_output_embeddings.copy_(head.weight[text])
        if getattr(head, "bias", None) is not None:
            head.bias[text] = 0.0  # GILL's [IMG] output rows have no bias
        torch.testing.assert_close(embed_tokens(llm, gill, ids, torch.tensor(ids)), llm.get_input_embeddings()(text))
        embeds = embed_tokens(llm, gill, ids, torch.tensor([[3, 4, ids[0], 8, ids[2], 9]]))
        logits, _, _ = lm_forward_with_img_logits(llm, gill, ids, embeds, use_cache=False)
    torch.testing.assert_close(logits[..., ids], logits[..., text], atol=1e-5, rtol=1e-5)
    return llm


@pytest.mark.parametrize("family", ["llama", "opt", "gemma2", "xglm", "cohere", "granite", "minicpm3"])
def test_img_tokens_are_embedded_and_scored_like_text(family):
    llm = check_img_tokens_like_text(family)
    if family in ("gemma2", "xglm", "minicpm3"):  # these scale their input embeddings: the test would see a bare row
        assert float(input_embedding_scale(llm)) != 1.0


@pytest.mark.slow
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_img_tokens_are_embedded_and_scored_like_text_whole_zoo(family):
    check_img_tokens_like_text(family)


def tiny_pipeline(family: str):
    """A whole GILL pipeline (random weights) around a tiny LM of `family`."""
    from gill_pipeline import GILLPipeline
    from gill_pipeline.testing import build_tiny_stable_diffusion, build_tiny_tokenizer, build_tiny_vision_encoder

    tokenizer = build_tiny_tokenizer()
    config = tiny_config(family)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(config).eval()
    encoder, processor = build_tiny_vision_encoder()
    return GILLPipeline.from_base_models(
        language_model=llm, tokenizer=tokenizer, stable_diffusion=build_tiny_stable_diffusion(), image_encoder=encoder,
        feature_extractor=processor, num_img_tokens=3, retrieval_dim=8, mapper_hidden_dim=16, mapper_encoder_layers=1,
        mapper_decoder_layers=1, mapper_heads=1,
    )


@pytest.mark.parametrize("family", ["minimax", "gemma2", "mamba2"])
def test_pipeline_around_other_lm_classes(family):
    """A whole pipeline around an LM with its own cache class (MiniMax), scaled embeddings and soft-capping (Gemma 2)
    or no attention at all (Mamba 2): the default cached decoding runs, equals full re-runs, and a batch equals its
    inputs one by one."""
    pipe = tiny_pipeline(family)
    embeds = [pipe.encode_interleaved([text], torch.device("cpu"), "inputs") for text in ("Show me", "This is my dog.")]
    settings = dict(max_new_tokens=6, min_text_tokens=2, img_logit_scale=1e4, max_images=1)
    cached = pipe.decode(embeds, DecodingSettings(**settings))
    uncached = pipe.decode(embeds, DecodingSettings(use_cache=False, **settings))
    singles = [pipe.decode([e], DecodingSettings(**settings))[0] for e in embeds]
    for row, full, single in zip(cached, uncached, singles):
        assert row.img_starts == [2] and row.token_ids == full.token_ids == single.token_ids
        torch.testing.assert_close(torch.stack(row.hidden_states), torch.stack(full.hidden_states), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.stack(row.hidden_states), torch.stack(single.hidden_states), atol=1e-4, rtol=1e-4)


def test_training_and_inference_read_the_img_tokens_alike():
    """Training's forward and the pipeline's decoding share one embedding and one `[IMG]` logit computation: on an
    LM with scaled embeddings and soft-capped logits (Gemma 2) they give the same logits for the same sequence."""
    from training.model_forward import GILLTrainingModel

    pipe = tiny_pipeline("gemma2")
    ids = pipe.tokenizer("This is my dog.", add_special_tokens=False).input_ids + pipe.img_token_ids
    ids = torch.tensor([ids])
    model = GILLTrainingModel(pipe.llm, pipe.gill, None, pipe.img_token_ids, pad_token_id=0, bos_token_id=None).eval()
    with torch.no_grad():
        embeds = model.embed_tokens(ids)
        torch.testing.assert_close(embeds, pipe.embed_token_ids(ids))
        train_logits, _ = model.run_lm(embeds, torch.ones_like(ids))
        mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
        infer_logits, _, _ = pipe._lm_forward(embeds, mask, positions, None, False, ids.shape[1])
    torch.testing.assert_close(train_logits, infer_logits)
    cap = pipe.llm.config.final_logit_softcapping
    assert train_logits[..., pipe.img_token_ids].abs().max() <= cap  # the [IMG] logits are soft-capped too
