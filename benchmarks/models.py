"""Random-weight models of real checkpoints' shapes, shared by the CPU benchmark scripts."""

from transformers import OPTConfig, OPTForCausalLM

OPT_VOCAB_SIZE = 50272


def opt_125m_shaped(vocab_size: int = OPT_VOCAB_SIZE, tiny: bool = False) -> OPTForCausalLM:
    """OPT-125m's architecture (12 layers, width 768, 12 heads) with random weights, in eval mode.

    `vocab_size`: OPT's own by default; a benchmark that decodes real text passes its tokenizer's, so that every id
    the random LM picks is a word. `tiny`: 2 layers of width 32, for the tests that keep the scripts alive."""
    width, layers, heads = (32, 2, 2) if tiny else (768, 12, 12)
    config = OPTConfig(
        vocab_size=vocab_size, hidden_size=width, word_embed_proj_dim=width, ffn_dim=4 * width,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=2048,
    )
    return OPTForCausalLM(config).eval()
