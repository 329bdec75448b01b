"""Offloading gives the same answer as no offloading: diffusers' model, sequential and group offload, and an LM loaded
by accelerate's big-model inference (`device_map`, `max_memory`, `offload_folder`), on the tiny pipeline and on the
bundled shapes-world model (real weights, a real answer with text and a generated image).

On this CPU-only machine the hooks run with `device="cpu"`: each test checks that they are installed (weights on
`meta` under sequential offload, accelerate's `CpuOffload` hooks under model offload, group hooks, `disk` in the LM's
device map) before comparing answers.
"""

import pytest
import torch
from accelerate.hooks import CpuOffload
from PIL import Image
from transformers import AutoModelForCausalLM

from gill_pipeline.bundled import BUNDLED_EXAMPLE_IMAGE, bundle_available, load_bundled_pipeline
from gill_pipeline.models.placement import compute_device
from gill_pipeline.pipeline import GILLPipeline
from gill_pipeline.pipeline.conversation import GILLConversation

from conftest import make_pipeline, random_image

# Text first, then one generated image: the random LM is pushed to [IMG0] after a few words.
TINY_CALL = dict(
    max_new_tokens=8, min_text_tokens=2, img_logit_scale=100.0, max_images=1, image_mode="generate",
    num_inference_steps=2, output_type="pt",
)
TINY_PROMPT = ["This is my dog.", random_image(0), "Show me him in the snow."]


def answer(pipe, prompt=TINY_PROMPT, **kwargs):
    settings = {**TINY_CALL, **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **settings)


def generated_images(output) -> list[torch.Tensor]:
    images = []
    for row in output.outputs:
        images += [item.image for item in row if not isinstance(item, str) and getattr(item, "source", None) == "generated"]
    return images


def assert_same_answer(reference, offloaded, atol=1e-4):
    assert offloaded.texts == reference.texts
    expected, got = generated_images(reference), generated_images(offloaded)
    assert len(expected) == len(got) >= 1, "the answer should hold a generated image"
    for a, b in zip(expected, got):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        assert a.shape == b.shape
        assert torch.allclose(a.float(), b.float(), atol=atol), float((a.float() - b.float()).abs().max())


def offloaded_components(pipe):
    return {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module) and n != "gill"}


@pytest.fixture
def tiny_pipe():
    return make_pipeline("opt")


@pytest.fixture(scope="module")
def tiny_reference():
    return answer(make_pipeline("opt"))


# ----------------------------------------------------------------------------------------------------------------------
# The three diffusers modes, on the tiny pipeline
# ----------------------------------------------------------------------------------------------------------------------
def test_sequential_cpu_offload_forward_pass(tiny_pipe, tiny_reference):
    # diffusers' PipelineTesterMixin.test_sequential_cpu_offload_forward_pass failed here with "Cannot copy out of
    # meta tensor": inputs were moved to the device of the modules' weights, which is `meta` under this offload.
    tiny_pipe.enable_sequential_cpu_offload(device="cpu")
    for name, module in offloaded_components(tiny_pipe).items():
        assert {p.device.type for p in module.parameters()} == {"meta"}, name
    assert next(tiny_pipe.gill.parameters()).device.type == "cpu"
    assert tiny_pipe._execution_device == torch.device("cpu")
    assert_same_answer(tiny_reference, answer(tiny_pipe))
    # The hooks move the weights back out after each forward: nothing stays resident.
    assert {p.device.type for p in tiny_pipe.unet.parameters()} == {"meta"}


def test_sequential_cpu_offload_keeps_parameters_on_cpu(tiny_pipe, tiny_reference):
    # diffusers turns device="cpu" into "cpu:0"; with torch >= 2.14 `.to("cpu:0")` copies, and accelerate's hooks left
    # plain tensors where parameters were ("new() received an invalid combination of arguments" on the second call).
    tiny_pipe.enable_sequential_cpu_offload(device="cpu")
    answer(tiny_pipe)
    for name, module in offloaded_components(tiny_pipe).items():
        assert all(type(p) is torch.nn.Parameter for p in module._parameters.values() if p is not None), name
        assert all(isinstance(p, torch.nn.Parameter) for p in module.parameters()), name
    assert_same_answer(tiny_reference, answer(tiny_pipe))


def test_model_cpu_offload_same_answer(tiny_pipe, tiny_reference):
    tiny_pipe.enable_model_cpu_offload(device="cpu")
    for name in ("llm", "unet", "vae", "image_encoder"):
        hook = getattr(tiny_pipe, name)._hf_hook
        assert isinstance(hook, CpuOffload) and hook.execution_device == torch.device("cpu"), name
    weights = {id(p) for p in tiny_pipe.llm.parameters()}
    assert_same_answer(tiny_reference, answer(tiny_pipe))
    # Hooks on the plain CPU device never copy the weights (with "cpu:0" every forward made new tensors).
    assert {id(p.data) for p in tiny_pipe.llm.parameters()} and weights == {id(p) for p in tiny_pipe.llm.parameters()}
    assert_same_answer(tiny_reference, answer(tiny_pipe))


@pytest.mark.parametrize("offload_type", ["leaf_level", "block_level"])
def test_group_offload_same_answer(tiny_pipe, tiny_reference, offload_type):
    from diffusers.hooks.group_offloading import _get_group_onload_device

    extra = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    tiny_pipe.enable_group_offload(onload_device="cpu", offload_type=offload_type, **extra)
    for name, module in offloaded_components(tiny_pipe).items():
        assert _get_group_onload_device(module) == torch.device("cpu"), name
    with pytest.raises(ValueError):
        _get_group_onload_device(tiny_pipe.gill)  # kept out, as from the accelerate modes
    assert_same_answer(tiny_reference, answer(tiny_pipe))


def test_group_offload_to_disk_same_answer(tiny_pipe, tiny_reference, tmp_path):
    tiny_pipe.enable_group_offload(
        onload_device="cpu", offload_type="block_level", num_blocks_per_group=1, offload_to_disk_path=str(tmp_path)
    )
    assert list(tmp_path.glob("*.safetensors")), "group offloading to disk should write its groups"
    assert_same_answer(tiny_reference, answer(tiny_pipe))


# ----------------------------------------------------------------------------------------------------------------------
# An LM loaded by accelerate's big-model inference, passed to from_pretrained
# ----------------------------------------------------------------------------------------------------------------------
def test_lm_with_device_map_and_disk_offload_same_answer(tiny_pipe, tiny_reference, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    weights = sum(p.numel() * p.element_size() for p in tiny_pipe.llm.parameters())
    llm = AutoModelForCausalLM.from_pretrained(
        tmp_path / "pipe" / "llm",
        device_map="auto",
        max_memory={"cpu": weights // 3},
        offload_folder=str(tmp_path / "offload"),
        dtype=torch.float32,
    )
    placements = set(llm.hf_device_map.values())
    assert "disk" in placements, llm.hf_device_map
    assert any(p.device.type == "meta" for p in llm.parameters())
    assert compute_device(llm.get_input_embeddings()) == torch.device("cpu")
    pipe = GILLPipeline.from_pretrained(tmp_path / "pipe", llm=llm)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.llm is llm
    assert_same_answer(tiny_reference, answer(pipe))


def test_compute_device_reads_hooks_before_weights(tiny_pipe):
    assert compute_device(tiny_pipe.unet) == torch.device("cpu")
    tiny_pipe.enable_sequential_cpu_offload(device="cpu")
    assert next(tiny_pipe.unet.parameters()).device.type == "meta"
    assert compute_device(tiny_pipe.unet) == torch.device("cpu")
    assert compute_device(torch.nn.Linear(2, 2, device="meta")) is None


# ----------------------------------------------------------------------------------------------------------------------
# Multi-turn and retrieval under offload
# ----------------------------------------------------------------------------------------------------------------------
def test_conversation_under_sequential_offload_same_answers():
    turns = ["Hello there.", ["What is this?", random_image(1)], "Show it to me."]
    settings = dict(TINY_CALL, max_new_tokens=6)
    del settings["output_type"]

    def dialogue(pipe):
        conversation = GILLConversation(pipe, output_type="pt", **settings)
        return [conversation.send(t, generator=torch.Generator().manual_seed(0)) for t in turns], conversation

    reference, _ = dialogue(make_pipeline("opt", chat_template=True))
    pipe = make_pipeline("opt", chat_template=True)
    pipe.enable_sequential_cpu_offload(device="cpu")
    got, conversation = dialogue(pipe)
    assert conversation.past is not None and len(conversation.past) > 0
    for a, b in zip(reference, got):
        assert [x for x in a["content"] if isinstance(x, str)] == [x for x in b["content"] if isinstance(x, str)]


# ----------------------------------------------------------------------------------------------------------------------
# The bundled shapes-world model: real weights, a real answer (text + a generated image), and retrieval
# ----------------------------------------------------------------------------------------------------------------------
BUNDLED_CALL = dict(
    max_new_tokens=8, min_text_tokens=0, img_logit_scale=2.0, max_images=1, num_inference_steps=4, output_type="pt",
)


@pytest.fixture(scope="module")
def bundled_reference():
    if not bundle_available():
        pytest.skip("the bundled shapes-world pipeline is not present")
    pipe = load_bundled_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with Image.open(BUNDLED_EXAMPLE_IMAGE) as image:
        prompt = [image.convert("RGB")]
    run = lambda p, mode: p(prompt, image_mode=mode, generator=torch.Generator().manual_seed(0), **BUNDLED_CALL)
    return run, {"generate": run(pipe, "generate"), "retrieve": run(pipe, "retrieve")}


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_bundled_answer_same_under_offload(bundled_reference, mode):
    run, reference = bundled_reference
    pipe = load_bundled_pipeline()
    pipe.set_progress_bar_config(disable=True)
    getattr(pipe, f"enable_{mode}_cpu_offload")(device="cpu")
    generated = run(pipe, "generate")
    assert generated.texts[0].strip(), "the bundled model should answer with text"
    assert_same_answer(reference["generate"], generated, atol=1e-4)
    retrieved = run(pipe, "retrieve")
    assert retrieved.texts == reference["retrieve"].texts
    ids = lambda out: [i.metadata.get("id") for row in out.outputs for i in row if getattr(i, "source", None) == "retrieved"]
    assert ids(retrieved) == ids(reference["retrieve"]) and ids(retrieved)


def test_from_base_models_around_a_disk_offloaded_lm(tiny_pipe, tmp_path):
    # `from_base_models` starts the [IMG] rows from the LM's embedding rows; offloaded, those sat on `meta` ("Cannot
    # copy out of meta tensor"). They are read from the offload hook's weights instead.
    tiny_pipe.llm.save_pretrained(tmp_path / "llm")
    llm = AutoModelForCausalLM.from_pretrained(
        tmp_path / "llm", device_map="auto", max_memory={"cpu": 1}, offload_folder=str(tmp_path / "offload")
    )
    assert llm.get_input_embeddings().weight.device.type == "meta"
    from gill_pipeline.testing.tiny import TINY_GILL_SIZES, build_tiny_stable_diffusion

    pipe = GILLPipeline.from_base_models(
        language_model=llm, tokenizer=tiny_pipe.tokenizer, stable_diffusion=build_tiny_stable_diffusion(32, "ddim"),
        image_encoder=tiny_pipe.image_encoder, feature_extractor=tiny_pipe.feature_extractor, **TINY_GILL_SIZES, seed=0,
    )
    # The same learned parts as when assembled around the LM in memory.
    assert torch.allclose(pipe.gill.img_input_embeddings, tiny_pipe.gill.img_input_embeddings, atol=1e-6)
    pipe.set_progress_bar_config(disable=True)
    out = answer(pipe, max_images=0)
    assert out.texts == answer(tiny_pipe, max_images=0).texts
