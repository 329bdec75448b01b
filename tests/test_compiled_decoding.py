"""Compiled decoding (`pipe.enable_compiled_decoding()`): a StaticCache and the LM's base model compiled with static
shapes give the eager path's answers; where it does not apply, the call decodes eagerly after a warning."""

import logging

import pytest
import torch
from conftest import FAST_CALL, make_pipeline, random_image
from transformers import DynamicCache, StaticCache

from gill_pipeline import DecodingSettings, GILLConversation
from gill_pipeline.models.lm_bridge import _last_hidden_module
from gill_pipeline.pipeline import compiled_decoding
from gill_pipeline.pipeline.compiled_decoding import CompiledDecoding, why_not_compiled
from gill_pipeline.testing.tiny import build_tiny_lm

# Two prompts of different lengths (left padding) and a forced [IMG] group after 3 words: both step widths compile.
SAMPLES = [["This is my dog.", random_image(0)], ["A photo of a mountain lake", random_image(1), "and"]]
WITH_IMAGE = dict(max_new_tokens=10, min_text_tokens=3, img_logit_scale=1e4, max_images=1)


class Records(logging.Handler):
    """The messages `gill_pipeline.pipeline.compiled_decoding` logs (the diffusers loggers do not propagate)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def records():
    handler = Records()
    compiled_decoding.logger.addHandler(handler)
    yield handler
    compiled_decoding.logger.removeHandler(handler)


def embeds_of(pipe, samples=SAMPLES):
    return [pipe.encode_interleaved(s, torch.device("cpu"), "inputs") for s in samples]


def assert_same_rows(eager, compiled):
    for a, b in zip(eager, compiled):
        assert a.token_ids == b.token_ids
        assert a.img_starts == b.img_starts
        torch.testing.assert_close(torch.stack(a.hidden_states), torch.stack(b.hidden_states), atol=1e-5, rtol=1e-4)


def decode_both(pipe, settings):
    embeds = embeds_of(pipe)
    pipe.disable_compiled_decoding()
    eager, eager_cache = pipe.decode(embeds, settings, return_cache=True)
    pipe.enable_compiled_decoding()
    compiled, cache = pipe.decode(embeds, settings, return_cache=True)
    return eager, eager_cache, compiled, cache


def check_compiled_answers(lm_type):
    pipe = make_pipeline(lm_type)
    eager, eager_cache, compiled, cache = decode_both(pipe, DecodingSettings(**WITH_IMAGE))
    assert isinstance(eager_cache, DynamicCache) and isinstance(cache, StaticCache)
    assert cache.get_max_length() == compiled_decoding.MIN_CACHE_LENGTH
    assert all(row.img_starts == [3] for row in compiled)  # both widths ran: single tokens and an [IMG] group
    assert_same_rows(eager, compiled)
    assert "forward" not in vars(_last_hidden_module(pipe.llm))  # the compiled forward is set only during a step
    # A second call reuses the compiled graphs (a new cache of the same length) and answers the same.
    assert_same_rows(eager, pipe.decode(embeds_of(pipe), DecodingSettings(**WITH_IMAGE)))
    # The whole call: the same texts, and the same generated images.
    pipe.disable_compiled_decoding()
    expected = pipe(SAMPLES, **WITH_IMAGE, num_inference_steps=2, output_type="pt", image_mode="generate",
                    generator=[torch.Generator().manual_seed(b) for b in range(2)])
    pipe.enable_compiled_decoding()
    got = pipe(SAMPLES, **WITH_IMAGE, num_inference_steps=2, output_type="pt", image_mode="generate",
               generator=[torch.Generator().manual_seed(b) for b in range(2)])
    assert got.texts == expected.texts
    assert len(got.images) == len(expected.images) == 2
    for a, b in zip(got.images, expected.images):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_compiled_decoding_gives_the_eager_answer_opt():
    check_compiled_answers("opt")


@pytest.mark.slow
def test_compiled_decoding_gives_the_eager_answer_llama():
    check_compiled_answers("llama")


@pytest.mark.slow
def test_conversation_with_compiled_decoding_answers_as_eager():
    """Multi-turn reuse of a StaticCache (copied into a longer one when a turn needs it), and eager turns that continue
    a compiled turn's cache and are continued by one."""
    turn = dict(FAST_CALL, max_new_tokens=8, min_text_tokens=2, img_logit_scale=1e4, max_images=1)

    def dialogue(pipe, compiled_turns):
        conversation = GILLConversation(pipe, **turn)
        texts, caches = [], []
        for t, compiled in enumerate(compiled_turns):
            pipe.enable_compiled_decoding() if compiled else pipe.disable_compiled_decoding()
            content = ["A dog.", random_image(t)] if t == 0 else "More."
            answer = conversation.send(content, generator=torch.Generator().manual_seed(t))
            texts.append("".join(p["text"] for p in answer["content"] if p["type"] == "text"))
            caches.append(conversation.last_output.past)
        return texts, caches

    pipe = make_pipeline("llama", chat_template=True)
    expected, _ = dialogue(pipe, [False] * 3)
    texts, pasts = dialogue(pipe, [True, True, False])
    assert texts == expected
    assert all(isinstance(p.cache, StaticCache) for p in pasts[:2]) and isinstance(pasts[2].cache, DynamicCache)
    assert all(p.reused > 0 for p in pasts[1:])  # every later turn continued the cache
    # An eager turn between compiled ones: static -> dynamic -> static copies.
    texts, pasts = dialogue(pipe, [True, False, True])
    assert texts == expected and [type(p.cache) for p in pasts] == [StaticCache, DynamicCache, StaticCache]
    assert all(p.reused > 0 for p in pasts[1:])


def test_cache_length_is_a_power_of_two_within_the_context():
    auto, fixed = CompiledDecoding(), CompiledDecoding(max_cache_len=100)
    assert auto.cache_length(10, None) == 64
    assert auto.cache_length(65, 2048) == 128
    assert auto.cache_length(90, 100) == 100  # the LM's context holds every position
    assert auto.cache_length(130, 100) == 256  # a padded batch's columns may pass the context
    assert fixed.cache_length(100, None) == 100
    assert fixed.cache_length(101, None) is None  # decoded eagerly


def test_the_cache_holds_the_most_positions_a_call_can_feed(opt_pipe, monkeypatch):
    """The static length covers prompt + `max_new_tokens` + `r - 1` per allowed [IMG] group (never overflows)."""
    seen = []
    monkeypatch.setattr(CompiledDecoding, "cache_length", lambda self, needed, context: seen.append(needed))
    opt_pipe.enable_compiled_decoding()
    try:
        embeds = embeds_of(opt_pipe)
        length = max(e.shape[0] for e in embeds)
        r = opt_pipe.num_img_tokens
        opt_pipe.decode(embeds, DecodingSettings(max_new_tokens=5, max_images=2))
        opt_pipe.decode(embeds, DecodingSettings(max_new_tokens=5))
        assert seen == [length + 5 + (r - 1) * 2, length + 5 + (r - 1) * 5]
    finally:
        opt_pipe.disable_compiled_decoding()


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(max_cache_len=0), r"`max_cache_len` must be a positive integer, got 0"),
        (dict(max_cache_len="64"), r"`max_cache_len` must be a positive integer, got '64'"),
        (dict(max_cache_len=64.0), r"`max_cache_len` must be a positive integer, got 64.0"),
        (dict(max_cache_len=10**6), r"`max_cache_len` must be at most the LM's context length \(128\), got 1000000"),
        (dict(mode="fast"), r"`mode` must be one of .*, got 'fast'"),
    ],
)
def test_bad_arguments_are_named(opt_pipe, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        opt_pipe.enable_compiled_decoding(**kwargs)
    assert not opt_pipe.compiled_decoding


def test_lms_it_does_not_apply_to_are_named():
    assert why_not_compiled(build_tiny_lm("opt", 64)) is None
    assert why_not_compiled(build_tiny_lm("llama", 64)) is None
    opt = build_tiny_lm("opt", 64)
    opt.__class__ = type("NotCompileable", (type(opt),), {"_can_compile_fullgraph": False})
    assert "NotCompileable does not declare `_can_compile_fullgraph`" in why_not_compiled(opt)
    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=1, sliding_window=8))
    assert "not full attention" in why_not_compiled(mistral)
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(build_tiny_lm("llama", 64), LoraConfig(r=2, target_modules=["q_proj"]))
    assert why_not_compiled(wrapped) is None  # LoRA layers are compiled with the LM (test below)
    quantized = build_tiny_lm("opt", 64)
    quantized.hf_quantizer = object()
    assert "is quantized" in why_not_compiled(quantized)
    spread = build_tiny_lm("opt", 64)
    spread.hf_device_map = {"model.decoder.layers.0": "cpu", "model.decoder.layers.1": "disk"}
    assert "device map over ['cpu', 'disk']" in why_not_compiled(spread)
    flex = build_tiny_lm("opt", 64)
    flex.config._attn_implementation = "flex_attention"
    assert "attention implementation 'flex_attention'" in why_not_compiled(flex)


def test_fallbacks_decode_eagerly_with_the_same_answer(records, monkeypatch):
    pipe = make_pipeline("opt")
    settings = DecodingSettings(**WITH_IMAGE)
    embeds = embeds_of(pipe)
    expected = pipe.decode(embeds, settings)
    # A fixed cache length too short for the call: decoded eagerly, nothing compiled.
    pipe.enable_compiled_decoding(max_cache_len=8)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("nothing may be compiled"))
    rows, cache = pipe.decode(embeds, settings, return_cache=True)
    assert isinstance(cache, DynamicCache)
    assert_same_rows(expected, rows)
    assert any("more than `max_cache_len=8`" in m for m in records.messages)
    # Without a cache, the reference's full re-runs.
    rows, cache = pipe.decode(embeds, DecodingSettings(use_cache=False, **WITH_IMAGE), return_cache=True)
    assert not isinstance(cache, StaticCache) and [r.token_ids for r in rows] == [r.token_ids for r in expected]
    # An LM under offload hooks.
    pipe.enable_compiled_decoding()
    pipe.enable_model_cpu_offload(device="cpu")
    rows, cache = pipe.decode(embeds_of(pipe), settings, return_cache=True)
    assert isinstance(cache, DynamicCache)
    assert_same_rows(expected, rows)
    assert any("offload hooks" in m for m in records.messages)


def test_a_step_torch_cannot_compile_runs_eagerly(records, monkeypatch):
    """A compilation failure (here: every compiled call raises as a graph break would) leaves the answer unchanged."""
    pipe = make_pipeline("opt")
    settings = DecodingSettings(**WITH_IMAGE)
    expected = pipe.decode(embeds_of(pipe), settings)

    def cannot_compile(function, **kwargs):
        def compiled(*args, **kwargs):
            raise torch._dynamo.exc.TorchDynamoException("no C++ compiler")

        return compiled

    monkeypatch.setattr(torch, "compile", cannot_compile)
    pipe.enable_compiled_decoding()
    rows, cache = pipe.decode(embeds_of(pipe), settings, return_cache=True)
    assert isinstance(cache, StaticCache)
    assert_same_rows(expected, rows)
    assert sum("could not compile" in m and "no C++ compiler" in m for m in records.messages) == 1
    assert "forward" not in vars(_last_hidden_module(pipe.llm))


def test_cli_compile_decoding_flag_enables_it(tmp_path, monkeypatch):
    from gill_pipeline.commands import main
    from gill_pipeline.pipeline import GILLPipeline

    enabled = []
    original = GILLPipeline.enable_compiled_decoding
    monkeypatch.setattr(GILLPipeline, "enable_compiled_decoding", lambda pipe, **kw: enabled.append(original(pipe, **kw)))
    argv = ["generate", "A dog.", "--model", "tiny-random", "--compile-decoding", "--max-new-tokens", "1",
            "--steps", "1", "--output-dir", str(tmp_path)]
    assert main(argv) == 0 and len(enabled) == 1
    assert (tmp_path / "answer.txt").is_file()


@pytest.mark.slow
def test_a_lora_wrapped_lm_compiles_to_the_same_answer():
    from peft import LoraConfig, get_peft_model

    pipe = make_pipeline("llama")
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # LoRA changes the answer
    pipe.register_modules(llm=get_peft_model(pipe.llm, config))
    eager, _, compiled, cache = decode_both(pipe, DecodingSettings(**WITH_IMAGE))
    assert isinstance(cache, StaticCache)
    assert_same_rows(eager, compiled)


def test_the_swapped_forward_puts_back_an_instance_level_forward():
    from gill_pipeline.pipeline.compiled_decoding import _ForwardSwapped

    layer = torch.nn.Linear(2, 2)
    own = layer.forward  # e.g. what a hook library set on the instance
    layer.forward = own
    with _ForwardSwapped(layer, lambda self, x: x * 0):
        assert torch.equal(layer(torch.ones(1, 2)), torch.zeros(1, 2))
    assert layer.__dict__["forward"] is own
    plain = torch.nn.Linear(2, 2)
    with _ForwardSwapped(plain, lambda self, x: x):
        pass
    assert "forward" not in plain.__dict__
