"""Backpropagating through a frozen torchao int8 LM saves the int8 weights, not a bf16 copy of every layer."""

import pytest
import torch

from training.quantized_backward import lean_quantized_backward

pytest.importorskip("torchao")


def int8_qwen(tmp_path):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import Qwen2Config, Qwen2ForCausalLM, TorchAoConfig

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    model = Qwen2ForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    )
    return model.requires_grad_(False)


def step(model, lean: bool):
    """Gradient of a loss on the logits with respect to the input embeddings (what `[IMG]` rows get), and the bytes
    autograd saved for the backward."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size() if type(tensor) is torch.Tensor else 0)
        return tensor

    x = torch.randn(2, 8, 256, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16).requires_grad_()
    with lean_quantized_backward(model) if lean else torch.enable_grad() as routed:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(inputs_embeds=x).logits.float().square().mean()
        loss.backward()
    return x.grad, sum(saved), routed


def test_lean_backward_same_gradients_without_a_dense_copy(tmp_path):
    model = int8_qwen(tmp_path)
    quantized = [m for m in model.modules() if type(getattr(m, "weight", None)).__name__ == "Int8Tensor"]
    dense_bytes = sum(2 * m.weight.numel() for m in quantized)
    plain_grad, plain_saved, _ = step(model, lean=False)
    lean_grad, lean_saved, routed = step(model, lean=True)
    assert routed == len(quantized) == 14  # q, k, v, o, gate, up, down in each of 2 layers (lm_head stays bf16)
    assert plain_grad.abs().max() > 0
    assert (lean_grad.float() - plain_grad.float()).norm() <= 1e-3 * plain_grad.float().norm()
    # torchao's own backward keeps a bf16 copy of every quantized weight; the lean one none of them.
    assert plain_saved - lean_saved >= 0.95 * dense_bytes
    # Outside the block the layers are as loaded.
    assert all("forward" not in m.__dict__ for m in quantized)
