"""One quantization config for LM and decoder: whole folders, learned-weights folders, from_base_models, the CLI,
torchao int8 / int4 / int8-dynamic on CPU, GGUF decoders, bitsandbytes on CUDA, and the learned parts never quantized."""

import json

import numpy as np
import pytest
import torch

torchao = pytest.importorskip("torchao")
import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import PipelineQuantizationConfig  # noqa: E402
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig  # noqa: E402

from conftest import make_pipeline  # noqa: E402
from gill_pipeline import GILLPipeline  # noqa: E402
from gill_pipeline.serialization.quantization import quantization_preset, resolve_quantization_config  # noqa: E402

IDS = torch.tensor([[2, 5, 6, 7, 9, 11]])
CALL = dict(max_new_tokens=4, num_inference_steps=2, output_type="pt", min_text_tokens=1)


def int8_llm():
    return transformers.TorchAoConfig(Int8WeightOnlyConfig())


def weight_kinds(module) -> set[str]:
    return {type(m.weight).__name__ for m in module.modules() if isinstance(m, torch.nn.Linear)}


def assert_gill_untouched(pipe, dtype=torch.float32):
    for name, value in list(pipe.gill.named_parameters()) + list(pipe.gill.named_buffers()):
        assert type(value) in (torch.Tensor, torch.nn.Parameter), name
        if value.is_floating_point():
            assert value.dtype == dtype, name


def relative_error(a, b) -> float:
    return float(((a - b).abs().max() / b.abs().max()).detach())


@pytest.fixture(scope="module")
def pipe():
    return make_pipeline("opt")


@pytest.fixture(scope="module")
def folders(pipe, tmp_path_factory):
    """A whole-pipeline folder, the base models as local folders, and a learned-weights folder recording them."""
    root = tmp_path_factory.mktemp("quant")
    pipe.save_pretrained(root / "whole")
    pipe.llm.save_pretrained(root / "opt")
    pipe.tokenizer.save_pretrained(root / "opt")
    for name in ("vae", "unet", "scheduler"):
        getattr(pipe, name).save_pretrained(root / "sd" / name)
    pipe.image_encoder.save_pretrained(root / "clip")
    pipe.feature_extractor.save_pretrained(root / "clip")
    base = {"llm": str(root / "opt"), "stable_diffusion": str(root / "sd"), "image_encoder": str(root / "clip")}
    pipe.save_learned_weights(root / "learned", base_models=base)
    return root


@pytest.mark.parametrize("folder", ["whole", "learned"])
def test_lm_and_unet_quantized_gill_not(pipe, folders, folder):
    """A whole-pipeline folder and a learned-weights folder (whose base models are loaded one by one, each with its
    own entry of the mapping) quantize the same components."""
    config = PipelineQuantizationConfig(
        quant_mapping={"llm": int8_llm(), "unet": diffusers.TorchAoConfig(Int8WeightOnlyConfig())}
    )
    quantized = GILLPipeline.from_pretrained(folders / folder, quantization_config=config)
    assert weight_kinds(quantized.llm.model.decoder.layers) == {"Int8Tensor"}
    assert "Int8Tensor" in weight_kinds(quantized.unet)
    assert weight_kinds(quantized.image_encoder) == {"Parameter"}
    assert_gill_untouched(quantized)
    assert relative_error(quantized.llm(IDS).logits, pipe.llm(IDS).logits) < 0.05
    quantized(["Show me a dog"], generator=torch.Generator().manual_seed(0), **CALL)


def test_backend_form_as_dict_builds_each_librarys_config(folders):
    config = {
        "quant_backend": "torchao",
        "quant_kwargs": {"quant_type": Int8WeightOnlyConfig()},
        "components_to_quantize": ["llm", "unet"],
    }
    resolved = resolve_quantization_config(config)
    assert isinstance(resolved.quant_mapping["llm"], transformers.TorchAoConfig)
    assert isinstance(resolved.quant_mapping["unet"], diffusers.TorchAoConfig)
    quantized = GILLPipeline.from_pretrained(folders / "learned", quantization_config=config)
    assert weight_kinds(quantized.llm.model.decoder.layers) == {"Int8Tensor"}


def test_backend_form_that_diffusers_accepts_is_routed():
    # bitsandbytes' two config classes share a signature, so diffusers builds its backend form; no GILL module in it.
    config = PipelineQuantizationConfig(quant_backend="bitsandbytes_8bit", quant_kwargs={"load_in_8bit": True})
    resolved = resolve_quantization_config(config)
    assert "gill" not in resolved.quant_mapping
    assert isinstance(resolved.quant_mapping["llm"], transformers.BitsAndBytesConfig)
    assert isinstance(resolved.quant_mapping["unet"], diffusers.BitsAndBytesConfig)


def test_from_base_models_quantizes_named_models(pipe, folders, tmp_path):
    from gill_pipeline.testing import build_tiny_stable_diffusion

    build_tiny_stable_diffusion().save_pretrained(tmp_path / "sd_full")
    assembled = GILLPipeline.from_base_models(
        str(folders / "opt"), decoder=str(tmp_path / "sd_full"), image_encoder=str(folders / "clip"),
        num_img_tokens=4, num_visual_tokens=1, retrieval_dim=16, mapper_hidden_dim=16, mapper_encoder_layers=1,
        mapper_decoder_layers=1, mapper_heads=2, dtype=torch.bfloat16,
        quantization_config=PipelineQuantizationConfig(quant_mapping={"llm": int8_llm()}),
    )
    assert weight_kinds(assembled.llm.model.decoder.layers) == {"Int8Tensor"}
    assert_gill_untouched(assembled, torch.bfloat16)  # cast to `dtype`; the quantized LM left as loaded


@pytest.mark.parametrize(
    "mapping, error, match",
    [
        ({"gill": "int8"}, ValueError, "never quantized"),
        ({"text_encoder": "int8"}, ValueError, "not a quantizable component"),
        ({"unet": "int8-transformers"}, TypeError, "needs diffusers"),
        ({"llm": "int8-diffusers"}, TypeError, "needs transformers"),
    ],
)
def test_bad_quant_mapping_is_refused(mapping, error, match):
    configs = {
        "int8": int8_llm(), "int8-transformers": int8_llm(),
        "int8-diffusers": diffusers.TorchAoConfig(Int8WeightOnlyConfig()),
    }
    with pytest.raises(error, match=match):
        resolve_quantization_config({"quant_mapping": {k: configs[v] for k, v in mapping.items()}})


def test_refusals_before_loading(pipe, folders):
    with pytest.raises(ValueError, match="never quantized"):
        resolve_quantization_config({"quant_backend": "torchao", "quant_kwargs": {}, "components_to_quantize": ["gill"]})
    with pytest.raises(TypeError, match="PipelineQuantizationConfig"):
        GILLPipeline.from_pretrained(folders / "whole", quantization_config="int8")
    with pytest.raises(ValueError, match="as loaded models"):
        GILLPipeline.from_pretrained(
            folders / "learned", llm=pipe.llm, quantization_config=PipelineQuantizationConfig(quant_mapping={"llm": int8_llm()})
        )
    with pytest.raises(ValueError, match="quant_backend"):
        resolve_quantization_config({"quant_backend": "no-such-backend", "quant_kwargs": {"x": 1}})


def test_saved_quantized_pipeline_reloads_quantized(folders, tmp_path):
    config = PipelineQuantizationConfig(
        quant_mapping={"llm": int8_llm(), "unet": diffusers.TorchAoConfig(Int8WeightOnlyConfig())}
    )
    quantized = GILLPipeline.from_pretrained(folders / "whole", quantization_config=config)
    quantized.save_pretrained(tmp_path / "saved")
    for component in ("llm", "unet"):
        recorded = json.loads((tmp_path / "saved" / component / "config.json").read_text())["quantization_config"]
        assert recorded["quant_method"] == "torchao"
    assert not (tmp_path / "saved" / "llm" / "pytorch_model.bin").exists()  # safetensors, no pickle
    again = GILLPipeline.from_pretrained(tmp_path / "saved")
    assert weight_kinds(again.llm.model.decoder.layers) == {"Int8Tensor"}
    assert "Int8Tensor" in weight_kinds(again.unet)
    torch.testing.assert_close(again.llm(IDS).logits, quantized.llm(IDS).logits)


def test_learned_weights_cross_load_between_quantized_and_full_bases(pipe, folders, tmp_path):
    quantized = GILLPipeline.from_pretrained(
        folders / "learned", quantization_config=PipelineQuantizationConfig(quant_mapping={"llm": int8_llm()})
    )
    with torch.no_grad():
        quantized.gill.img_input_embeddings.add_(0.5)  # "trained on the quantized LM"
    quantized.save_learned_weights(tmp_path / "from_quantized", base_models=dict(pipe.config.base_models or {}, llm=str(folders / "opt"), stable_diffusion=str(folders / "sd"), image_encoder=str(folders / "clip")))
    full = GILLPipeline.from_pretrained(tmp_path / "from_quantized")
    assert weight_kinds(full.llm.model.decoder.layers) == {"Parameter"}
    for name, value in quantized.gill.state_dict().items():
        torch.testing.assert_close(full.gill.state_dict()[name], value)
    # and the other way: learned weights of the full pipeline onto an int8 base
    onto_quantized = GILLPipeline.from_pretrained(
        folders / "learned", quantization_config=PipelineQuantizationConfig(quant_mapping={"llm": int8_llm()})
    )
    for name, value in pipe.gill.state_dict().items():
        torch.testing.assert_close(onto_quantized.gill.state_dict()[name], value)


@pytest.mark.parametrize("choice", ["int8", "int4", "int8-dynamic"])
def test_cpu_presets_load_and_answer(pipe, folders, choice):
    quantized = GILLPipeline.from_pretrained(folders / "whole", quantization_config=quantization_preset(choice, "cpu", group_size=16))
    kinds = weight_kinds(quantized.llm.model.decoder.layers)
    assert kinds == {"IntxUnpackedToInt8Tensor" if choice == "int4" else "Int8Tensor"}
    tolerance = 0.25 if choice == "int4" else 0.05
    assert relative_error(quantized.llm(IDS).logits, pipe.llm(IDS).logits) < tolerance
    out = quantized(["Show me a dog"], generator=torch.Generator().manual_seed(0), **CALL)
    assert len(out.texts) == 1
    assert_gill_untouched(quantized)


def test_lora_training_step_on_int8_lm(folders):
    """QLoRA-style: a LoRA adapter on the int8 LM gets gradients; the int8 base weights stay frozen and unchanged."""
    from peft import LoraConfig, get_peft_model

    quantized = GILLPipeline.from_pretrained(
        folders / "whole", quantization_config=PipelineQuantizationConfig(quant_mapping={"llm": int8_llm()})
    )
    lm = get_peft_model(quantized.llm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    before = lm.base_model.model.model.decoder.layers[0].fc1.weight.dequantize().clone()
    trainable = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    loss = lm(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert all(p.grad is not None for p in trainable)
    optimizer.step()
    torch.testing.assert_close(lm.base_model.model.model.decoder.layers[0].fc1.weight.dequantize(), before)
    assert lm(input_ids=IDS, labels=IDS).loss.item() != pytest.approx(loss.item())


def test_gguf_transformer_in_a_flux_gill_pipeline(tmp_path):
    gguf = pytest.importorskip("gguf")
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    from gill_pipeline.testing import build_tiny_gill_pipeline_with_decoder

    flux, _ = build_tiny_gill_pipeline_with_decoder("flux-dev")
    flux.transformer.save_pretrained(tmp_path / "transformer")
    writer = gguf.GGUFWriter(str(tmp_path / "transformer.gguf"), "flux")
    quantized_names = []
    for name, tensor in flux.transformer.state_dict().items():
        array = tensor.detach().float().numpy()
        if array.ndim == 2 and array.shape[-1] % 32 == 0:  # Q8_0 blocks are 32 values
            data = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            quantized_names.append(name)
        else:
            writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert quantized_names
    transformer = FluxTransformer2DModel.from_single_file(
        str(tmp_path / "transformer.gguf"), config=str(tmp_path / "transformer"),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), torch_dtype=torch.float32,
    )
    assert type(transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "GGUFParameter"
    flux.save_pretrained(tmp_path / "gill_flux")
    with_gguf = GILLPipeline.from_pretrained(tmp_path / "gill_flux", transformer=transformer)
    call = dict(CALL, min_text_tokens=0, img_logit_scale=100.0, max_images=1, image_mode="generate")
    expected = flux(["Show me a dog"], generator=torch.Generator().manual_seed(0), **call)
    got = with_gguf(["Show me a dog"], generator=torch.Generator().manual_seed(0), **call)
    assert got.texts == expected.texts
    [a], [b] = ([image.image for image in out.gill_images[0]] for out in (expected, got))
    torch.testing.assert_close(b, a, atol=2e-2, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 0.50 quantizes on CUDA; its CPU path is not used by transformers here")
def test_bitsandbytes_nf4_lm_on_cuda(folders):
    pytest.importorskip("bitsandbytes")
    config = PipelineQuantizationConfig(
        quant_mapping={"llm": transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")}
    )
    quantized = GILLPipeline.from_pretrained(folders / "whole", quantization_config=config).to("cuda")
    assert "Params4bit" in weight_kinds(quantized.llm.model.decoder.layers)
    quantized(["Show me a dog"], **CALL)


def test_cli_quantize_on_the_bundled_model(tmp_path):
    from gill_pipeline.bundled import bundle_available
    from gill_pipeline.commands import main

    if not bundle_available():
        pytest.skip("the bundled shapes-world model is not installed")
    args = ["generate", "--quantize", "int8", "--max-new-tokens", "4", "--output-dir", str(tmp_path), "A red circle."]
    assert main(args) == 0
    assert (tmp_path / "answer.txt").read_text().strip()


def test_cli_quantize_refused_for_the_tiny_random_model(tmp_path, capsys):
    from gill_pipeline.commands import main

    args = ["generate", "--model", "tiny-random", "--quantize", "int8", "--output-dir", str(tmp_path), "Hi"]
    assert main(args) == 2
    assert "nothing to quantize" in capsys.readouterr().err


def test_freed_memory_is_handed_back_after_quantized_loading(folders, monkeypatch):
    """Quantizing on load frees each bf16 weight after quantizing it; glibc keeps those blocks unless trimmed."""
    from gill_pipeline.pipeline.loaders import learned_weights as loader

    calls = []
    monkeypatch.setattr(loader, "release_freed_memory", lambda: calls.append(1) or True)
    GILLPipeline.from_pretrained(folders / "whole")
    assert calls == []
    GILLPipeline.from_pretrained(folders / "whole", quantization_config=quantization_preset("int8"))
    assert calls == [1]
