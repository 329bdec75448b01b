"""Slower checks, excluded from the default run: `python -m pytest -m slow`."""

import pytest
import torch

from gill_pipeline import DecodingSettings, GILLPipeline
from gill_pipeline.testing import build_tiny_stable_diffusion, build_tiny_tokenizer, build_tiny_vision_encoder


@pytest.mark.slow
def test_kv_cache_parity_at_opt_125m_size():
    """KV-cache and full re-run decoding agree token for token on an OPT-125m-shaped LM (random weights), in a batch
    with an [IMG] group, where numerical differences would show if the cache or masks were subtly wrong."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    llm = OPTForCausalLM(
        OPTConfig(vocab_size=50272, hidden_size=768, word_embed_proj_dim=768, ffn_dim=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=2048)
    ).eval()
    encoder, processor = build_tiny_vision_encoder()
    pipe = GILLPipeline.from_base_models(
        language_model=llm, tokenizer=tokenizer, stable_diffusion=build_tiny_stable_diffusion(), image_encoder=encoder,
        feature_extractor=processor,
    )
    prompts = [pipe.embed_token_ids(torch.randint(4, 300, (n,), generator=torch.Generator().manual_seed(n))) for n in (32, 20)]
    settings = dict(max_new_tokens=40, min_text_tokens=10, img_logit_scale=1e4, max_images=1)
    cached = pipe.decode(prompts, DecodingSettings(**settings))
    full = pipe.decode(prompts, DecodingSettings(use_cache=False, **settings))
    for a, b in zip(cached, full):
        assert a.token_ids == b.token_ids and a.img_starts == b.img_starts == [10]
        torch.testing.assert_close(torch.stack(a.hidden_states), torch.stack(b.hidden_states), atol=1e-4, rtol=1e-3)
