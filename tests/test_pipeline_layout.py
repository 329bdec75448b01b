"""The pipeline's layout (mixins, processor, decoder bridge) and the defects fixed with it: output fields, component
names in errors, one stock decoder pipeline per call, hidden states asked for once, the optional safety check."""

import logging

import numpy as np
import PIL.Image
import pytest
import torch

import gill_pipeline.decoders.run as decoder_run
import gill_pipeline.pipeline.image_generation as image_generation
from gill_pipeline import GILLPipeline
from gill_pipeline.pipeline.loaders import GILLLoaderMixin, RetrievalMixin
from gill_pipeline.pipeline.processor import GILLInterleavedProcessor
from gill_pipeline.retrieval import build_retrieval_index
from gill_pipeline.testing import build_tiny_gill_pipeline_with_decoder

from conftest import FAST_CALL, make_pipeline, random_image

FORCE_IMAGE = dict(min_text_tokens=1, img_logit_scale=float("inf"), max_images=1)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    return make_pipeline("opt")


@pytest.fixture(scope="module")
def chat_pipe():
    return make_pipeline("llama", chat_template=True)


# ------------------------------------------------------------------------------------------------ layout
def test_mixins_keep_every_public_name_and_from_pretrained_wins(pipe, tmp_path):
    assert GILLPipeline.from_pretrained.__func__ is GILLLoaderMixin.from_pretrained.__func__
    assert issubclass(GILLPipeline, RetrievalMixin)
    for name in (
        "from_pretrained", "save_pretrained", "save_learned_weights", "push_to_hub", "push_learned_weights",
        "from_base_models", "load_retrieval_index", "retrieve_images", "retrieve_for_groups", "apply_min_similarity",
        "generate_images", "rank_candidates", "generate_for_groups", "tokenize_interleaved", "unknown_words",
        "piece_keys", "embed_pieces", "encode_interleaved", "embed_token_ids", "encode_image_features", "decode",
        "decide", "encode_prompt", "merge_group_images", "assemble_answer", "check_inputs", "default_image_size",
    ):
        assert callable(getattr(GILLPipeline, name)), name
    # A learned-weights folder still loads through the mixin's override (given its base models), to the same answer.
    folder = pipe.save_learned_weights(tmp_path / "learned")
    loaded = GILLPipeline.from_pretrained(
        folder, tokenizer=pipe.tokenizer, llm=pipe.llm, vae=pipe.vae, unet=pipe.unet, scheduler=pipe.scheduler,
        image_encoder=pipe.image_encoder, feature_extractor=pipe.feature_extractor,
    )
    loaded.set_progress_bar_config(disable=True)
    for (name, x), y in zip(pipe.gill.state_dict().items(), loaded.gill.state_dict().values()):
        assert torch.equal(x, y), name
    assert loaded(["A dog"], generator=seeded(), **FAST_CALL).texts == pipe(["A dog"], generator=seeded(), **FAST_CALL).texts


def test_processor_gives_the_pipelines_embeddings(pipe):
    processor = pipe.processor
    assert isinstance(processor, GILLInterleavedProcessor)
    sample = ["A dog", random_image(1), "on grass"]
    a = processor.encode_interleaved(sample, torch.device("cpu"), "prompt")
    b = pipe.encode_interleaved(sample, torch.device("cpu"), "prompt")
    assert torch.equal(a, b)
    assert a.shape[0] == len(processor.piece_keys(processor.tokenize_interleaved(sample, "prompt")))


# ------------------------------------------------------------------------------------------------ a. output fields
def test_messages_and_past_are_real_output_fields(chat_pipe):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]
    out = chat_pipe(messages, generator=seeded(), **FAST_CALL)
    assert out["messages"] == out.messages and out["past"] is out.past
    assert "messages" in out.keys() and "past" in out.keys()
    as_tuple = chat_pipe(messages, generator=seeded(), return_dict=False, **FAST_CALL)
    images, texts, outputs, warnings, tuple_messages, tuple_past = as_tuple
    assert texts == out.texts and tuple_messages == out.messages and tuple_past is not None


def test_plain_tuple_keeps_its_four_positions(pipe):
    images, texts, outputs, warnings = pipe(["A dog"], generator=seeded(), return_dict=False, **FAST_CALL)
    assert isinstance(texts, list) and isinstance(outputs, list)


# ------------------------------------------------------------------------------------------------ b. names
def test_missing_decoder_error_names_the_transformer_for_a_dit():
    pipe, _ = build_tiny_gill_pipeline_with_decoder("flux-schnell")
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    try:
        pipe.transformer = None
        with pytest.raises(ValueError, match=r"`transformer`") as error:
            pipe(["A dog"], image_mode="generate", **FAST_CALL)
        assert "unet" not in str(error.value)
    finally:
        pipe.transformer = transformer


def test_decoder_is_the_general_name_of_stable_diffusion(pipe):
    from gill_pipeline.testing import build_tiny_stable_diffusion

    common = dict(language_model=pipe.llm, tokenizer=pipe.tokenizer, image_encoder=pipe.image_encoder,
                  feature_extractor=pipe.feature_extractor)
    torch.manual_seed(0)
    a = GILLPipeline.from_base_models(decoder=build_tiny_stable_diffusion(), **common)
    torch.manual_seed(0)
    b = GILLPipeline.from_base_models(stable_diffusion=build_tiny_stable_diffusion(), **common)
    for (name, x), y in zip(a.gill.state_dict().items(), b.gill.state_dict().values()):
        assert torch.equal(x, y), name
    with pytest.raises(ValueError, match="`decoder`.*`stable_diffusion`"):
        GILLPipeline.from_base_models(decoder=build_tiny_stable_diffusion(),
                                      stable_diffusion=build_tiny_stable_diffusion(), **common)


# ------------------------------------------------------------------------------------------------ one decoder pipeline
@pytest.mark.parametrize("name", ["sd", "flux-schnell"])
def test_the_stock_decoder_pipeline_is_built_once_per_call(name, monkeypatch):
    pipe, _ = build_tiny_gill_pipeline_with_decoder(name)
    pipe.set_progress_bar_config(disable=True)
    built = []
    original = decoder_run.build_decoder_pipeline

    def counting(*args, **kwargs):
        built.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(decoder_run, "build_decoder_pipeline", counting)
    monkeypatch.setattr(image_generation, "build_decoder_pipeline", counting)
    size = 2 * pipe.image_size_multiple
    out = pipe(["This is my dog."], image_mode="generate", height=size, width=size, generator=seeded(),
               **{**FAST_CALL, **FORCE_IMAGE})
    assert out.gill_images[0][0].source == "generated"
    assert len(built) == 1


# ------------------------------------------------------------------------------------------------ c. hidden states
def test_the_lm_is_asked_for_all_hidden_states_at_most_once(monkeypatch):
    pipe = make_pipeline("llama")
    asked = []

    def record(module, args, kwargs):
        asked.append(bool(kwargs.get("output_hidden_states")))

    handle = pipe.llm.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe(["A dog", random_image(0), "and"], generator=seeded(), **FAST_CALL)
        pipe(["Another call"], generator=seeded(), **FAST_CALL)
    finally:
        handle.remove()
    assert len(asked) > 4
    assert sum(asked) <= 1  # the first forward of this LM checks the base model's output once


# ------------------------------------------------------------------------------------------------ d. safety checker
def black_if_flagged(flag_all: bool):
    seen = []

    def check(images):
        seen.extend(images)
        assert all(isinstance(image, PIL.Image.Image) for image in images)
        return [PIL.Image.new("RGB", image.size) for image in images], [flag_all] * len(images)

    return check, seen


def test_without_a_safety_checker_the_pipeline_warns_once(caplog):
    pipe = make_pipeline("opt")
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            pipe(["A dog"], image_mode="generate", generator=seeded(), **{**FAST_CALL, **FORCE_IMAGE})
    assert sum("No safety checker runs" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_safety_checker_flags_generated_images(output_type):
    pipe = make_pipeline("opt")
    check, seen = black_if_flagged(True)
    pipe.set_safety_checker(check)
    out = pipe(["A dog"], image_mode="generate", generator=seeded(),
               **{**FAST_CALL, **FORCE_IMAGE, "output_type": output_type})
    assert len(seen) == 1 and out.nsfw_content_detected == [True]
    shown = out.gill_images[0][0]
    assert shown.nsfw_content_detected is True
    array = np.asarray(shown.image if output_type != "pt" else shown.image.numpy())
    assert float(np.abs(array.astype(np.float32)).max()) == 0.0


def test_safety_checker_runs_on_retrieved_and_generated_images(tmp_path):
    pipe = make_pipeline("opt")
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(4):
        random_image(seed).save(folder / f"{seed}.png")
    pipe.load_retrieval_index(build_retrieval_index(pipe, str(folder), str(tmp_path / "index"), progress=False))
    check, seen = black_if_flagged(False)
    pipe.set_safety_checker(check)
    out = pipe(["A dog"], image_mode="both", generator=seeded(), **{**FAST_CALL, **FORCE_IMAGE})
    shown = out.gill_images[0][0]
    sources = {shown.source, shown.alternatives[0].source}
    assert sources == {"generated", "retrieved"} and len(seen) == 2
    assert out.nsfw_content_detected == [False] and shown.alternatives[0].nsfw_content_detected is False


def test_diffusers_safety_checker_is_accepted_and_bad_ones_are_named():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = make_pipeline("opt")
    with pytest.raises(ValueError, match="feature_extractor"):
        pipe.set_safety_checker(checker)
    with pytest.raises(TypeError, match="`safety_checker`"):
        pipe.set_safety_checker("yes please")
    pipe.set_safety_checker(checker, feature_extractor=processor)
    out = pipe(["A dog"], image_mode="generate", generator=seeded(), **{**FAST_CALL, **FORCE_IMAGE})
    assert out.nsfw_content_detected is not None and len(out.nsfw_content_detected) == 1
