"""GILL's decoding loop: KV cache vs full re-runs, the [IMG] rules, exact [IMG] hidden states."""

import pytest
import torch

from conftest import make_pipeline, random_image
from gill_pipeline import DecodingSettings


def prompt_embeds(pipe, samples):
    return [pipe.encode_interleaved(s, torch.device("cpu"), "inputs") for s in samples]


def full_sequence_hidden(pipe, prompt: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Last-layer hidden states of the generated positions, from ONE forward over prompt + generated tokens."""
    generated = pipe.embed_token_ids(torch.tensor([token_ids]))[0]
    sequence = torch.cat([prompt, generated.to(prompt.dtype)])[None]
    out = pipe.llm(inputs_embeds=sequence, output_hidden_states=True)
    return out.hidden_states[-1][0, prompt.shape[0] :]


@pytest.mark.parametrize("lm_type", ["opt", "gpt2", "llama", "qwen2"])
def test_kv_cache_matches_full_recompute(lm_type):
    pipe = make_pipeline(lm_type)
    samples = [["This is my dog.", random_image(0)], ["A photo of a mountain lake", random_image(1), "and"]]
    embeds = prompt_embeds(pipe, samples)
    # Force one [IMG] group in the middle so both chunk widths (1 and r) and left padding are exercised.
    settings = dict(max_new_tokens=12, min_text_tokens=3, img_logit_scale=1e4, max_images=1)
    cached = pipe.decode(embeds, DecodingSettings(use_cache=True, **settings))
    uncached = pipe.decode(embeds, DecodingSettings(use_cache=False, **settings))
    for a, b in zip(cached, uncached):
        assert a.token_ids == b.token_ids
        assert a.img_starts == b.img_starts == [3]
        assert len(a.hidden_states) == len(b.hidden_states) > 0
        torch.testing.assert_close(torch.stack(a.hidden_states), torch.stack(b.hidden_states), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("lm_type", ["opt", "llama"])
def test_hidden_states_equal_a_full_forward(lm_type):
    """Each generated token's hidden state equals a single forward over the whole sequence (batched, cached)."""
    pipe = make_pipeline(lm_type)
    samples = [["Here is a picture of a cat"], ["This is my dog.", random_image(2), "Show me"]]
    embeds = prompt_embeds(pipe, samples)
    rows = pipe.decode(embeds, DecodingSettings(max_new_tokens=9, min_text_tokens=2, img_logit_scale=1e4, max_images=1))
    for prompt, row in zip(embeds, rows):
        fed = row.token_ids[: len(row.hidden_states)]
        reference = full_sequence_hidden(pipe, prompt, fed)
        torch.testing.assert_close(torch.stack(row.hidden_states), reference, atol=1e-5, rtol=1e-4)


def test_img_group_hidden_states_exact_when_last(opt_pipe):
    """An [IMG0] produced at the very last step is still run through the LM: its group has hidden states."""
    pipe = opt_pipe
    embeds = prompt_embeds(pipe, [["This is my dog."]])
    (row,) = pipe.decode(embeds, DecodingSettings(max_new_tokens=1, img_logit_scale=1e4))
    r = pipe.num_img_tokens
    assert row.token_ids == pipe.img_token_ids and row.img_starts == [0]
    assert len(row.hidden_states) == r
    reference = full_sequence_hidden(pipe, embeds[0], row.token_ids)
    torch.testing.assert_close(row.img_hidden_states(0, r), reference, atol=1e-5, rtol=1e-4)


def test_img_rules(opt_pipe):
    pipe = opt_pipe
    img0, rest = pipe.img_token_ids[0], pipe.img_token_ids[1:]
    embeds = prompt_embeds(pipe, [["This is my dog."], ["Show me"]])

    # Without a boost the random LM produces text only, and never [IMG1..] on its own.
    rows = pipe.decode(embeds, DecodingSettings(max_new_tokens=10))
    for row in rows:
        for j, token in enumerate(row.token_ids):
            if token in rest:
                start = max(s for s in row.img_starts if s <= j)
                assert row.token_ids[start] == img0

    # A big multiplier makes [IMG0] win, but only after `min_text_tokens`; the whole group is appended.
    rows = pipe.decode(embeds, DecodingSettings(max_new_tokens=8, min_text_tokens=3, img_logit_scale=1e4, max_images=2))
    for row in rows:
        assert row.img_starts == [3, 3 + pipe.num_img_tokens]
        assert row.num_text_tokens == 8 - 2  # 3 before, then text again once `max_images` is reached
        for start in row.img_starts:
            assert row.token_ids[start : start + pipe.num_img_tokens] == pipe.img_token_ids
        assert img0 not in row.token_ids[:3]

    # max_images=0 forbids images even with the boost.
    rows = pipe.decode(embeds, DecodingSettings(max_new_tokens=6, img_logit_scale=1e4, max_images=0))
    assert all(row.img_starts == [] and img0 not in row.token_ids for row in rows)


def test_img_logit_scale_is_abs_times_factor(opt_pipe):
    """The reference's rule: logit(IMG0) -> |logit| * factor when factor > 1; factors <= 1 change nothing."""
    pipe = opt_pipe
    decoder_settings = DecodingSettings(img_logit_scale=3.0)
    from gill_pipeline.pipeline.decoding import DecodedSequence, GILLDecoder

    decoder = GILLDecoder(None, None, pipe.img_token_ids, set(), lambda t: False)
    vocab = max(pipe.img_token_ids) + 1
    logits = torch.zeros(2, vocab)
    logits[:, pipe.img_token_ids[0]] = torch.tensor([-2.0, 2.0])
    logits[:, 5] = 5.0
    chosen = decoder._choose_tokens(logits, [DecodedSequence(), DecodedSequence()], decoder_settings, None, [100, 100])
    assert chosen == [pipe.img_token_ids[0]] * 2  # |-2| * 3 = 6 > 5 and 2 * 3 = 6 > 5
    chosen = decoder._choose_tokens(logits, [DecodedSequence(), DecodedSequence()], DecodingSettings(), None, [100, 100])
    assert chosen == [5, 5]


@pytest.mark.parametrize("do_sample", [False, True])
def test_infinite_img_logit_scale_forces_img0_whatever_its_logit(opt_pipe, do_sample):
    """`img_logit_scale=math.inf`: `[IMG0]` wherever it is allowed, even when its logit is 0 (where `|0| * 1e4` loses),
    greedy or sampled (no NaN from an infinite logit); still not where it is forbidden."""
    import math

    from gill_pipeline.pipeline.decoding import DecodedSequence, GILLDecoder

    pipe = opt_pipe
    decoder = GILLDecoder(None, None, pipe.img_token_ids, set(), lambda t: False)
    logits = torch.zeros(2, max(pipe.img_token_ids) + 1)
    logits[:, 5] = 20.0  # [IMG0]'s logit stays 0
    rows = [DecodedSequence(), DecodedSequence()]
    generator = torch.Generator().manual_seed(0)
    settings = DecodingSettings(img_logit_scale=1e4, do_sample=do_sample)
    assert decoder._choose_tokens(logits, rows, settings, generator, [100, 100]) == [5, 5]
    settings = DecodingSettings(img_logit_scale=math.inf, do_sample=do_sample)
    assert decoder._choose_tokens(logits, rows, settings, generator, [100, 100]) == [pipe.img_token_ids[0]] * 2
    # No room left in the second row's context: it cannot open an [IMG] group, so it keeps its best text token.
    assert decoder._choose_tokens(logits, rows, settings, generator, [100, 1]) == [pipe.img_token_ids[0], 5]
    settings = DecodingSettings(img_logit_scale=math.inf, max_images=0, do_sample=do_sample)
    assert decoder._choose_tokens(logits, rows, settings, generator, [100, 100]) == [5, 5]


def test_stop_at_newline_and_eos():
    pipe = make_pipeline("opt")
    newline_id = pipe.tokenizer("\n", add_special_tokens=False).input_ids[0]
    eos = pipe.tokenizer.eos_token_id
    embeds = prompt_embeds(pipe, [["This is my dog."]])
    # Make the LM's output layer prefer the newline token by a wide margin via its bias-free head: add it to the
    # newline row's output weights direction through a hook on the logits.
    handle = pipe.llm.lm_head.register_forward_hook(lambda m, i, o: o + 100 * torch.nn.functional.one_hot(
        torch.tensor(newline_id), o.shape[-1]).to(o.dtype))
    try:
        (row,) = pipe.decode(embeds, DecodingSettings(max_new_tokens=5, stop_at_newline=True))
        assert row.token_ids == [] and row.finished
        (row,) = pipe.decode(embeds, DecodingSettings(max_new_tokens=5, stop_at_newline=False))
        assert row.token_ids == [newline_id] * 5
    finally:
        handle.remove()
    handle = pipe.llm.lm_head.register_forward_hook(
        lambda m, i, o: o + 100 * torch.nn.functional.one_hot(torch.tensor(eos), o.shape[-1]).to(o.dtype)
    )
    try:
        (row,) = pipe.decode(embeds, DecodingSettings(max_new_tokens=5))
        assert row.token_ids == [] and row.finished
    finally:
        handle.remove()


def test_sampling_is_reproducible_and_respects_top_p(opt_pipe):
    pipe = opt_pipe
    embeds = prompt_embeds(pipe, [["This is my dog."], ["Show me"]])
    settings = DecodingSettings(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9)
    a = pipe.decode(embeds, settings, torch.Generator().manual_seed(3))
    b = pipe.decode(embeds, settings, torch.Generator().manual_seed(3))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    # A tiny top_p keeps only the most likely token: sampling becomes greedy.
    greedy = pipe.decode(embeds, DecodingSettings(max_new_tokens=8))
    nucleus = pipe.decode(embeds, DecodingSettings(max_new_tokens=8, do_sample=True, top_p=1e-6), torch.Generator().manual_seed(0))
    assert [r.token_ids for r in greedy] == [r.token_ids for r in nucleus]


def test_context_length_is_respected():
    pipe = make_pipeline("gpt2")
    limit = pipe.llm.config.n_positions
    embeds = prompt_embeds(pipe, [["This is my dog. " * 9]])
    assert embeds[0].shape[0] < limit
    (row,) = pipe.decode(embeds, DecodingSettings(max_new_tokens=200, img_logit_scale=1e4))
    assert embeds[0].shape[0] + len(row.token_ids) <= limit
    assert len(row.img_starts) > 0


def test_batched_decoding_near_the_context_limit():
    """Padded chunk slots must not look up positions past a learned position table (OPT, GPT-2)."""
    for lm_type in ("opt", "gpt2"):
        pipe = make_pipeline(lm_type)
        limit = pipe._lm_context_length()
        long_prompt = pipe.embed_token_ids(torch.randint(4, 300, (limit - 7,), generator=torch.Generator().manual_seed(0)))
        short = prompt_embeds(pipe, [["Show me"]])[0]
        settings = DecodingSettings(max_new_tokens=12, min_text_tokens=1, img_logit_scale=1e4)
        rows = pipe.decode([long_prompt, short], settings)
        singles = [pipe.decode([p], settings)[0] for p in (long_prompt, short)]
        for batched_row, single in zip(rows, singles):
            assert batched_row.token_ids == single.token_ids
        assert long_prompt.shape[0] + len(rows[0].token_ids) <= limit


def test_finished_rows_do_not_consume_their_generator():
    """With one generator per input, a row that stops early leaves its generator as a single call would."""
    pipe = make_pipeline("opt")
    embeds = prompt_embeds(pipe, [["This is my dog."], ["Show me"]])
    eos = pipe.tokenizer.eos_token_id
    settings = DecodingSettings(max_new_tokens=6, do_sample=True, temperature=1.2)

    def run(prompts, seeds, force_eos_in_row0):
        calls = {"n": 0}

        def hook(module, inputs, output):
            calls["n"] += 1
            if force_eos_in_row0 and calls["n"] >= 3:  # row 0 stops after two sampled tokens
                output = output.clone()
                output[0, ..., eos] = 1e4
            return output

        generators = [torch.Generator().manual_seed(s) for s in seeds]
        handle = pipe.llm.lm_head.register_forward_hook(hook)
        try:
            rows = pipe.decode(prompts, settings, generators)
        finally:
            handle.remove()
        return rows, generators

    batched, batched_generators = run(embeds, [1, 2], True)
    alone0, generators0 = run(embeds[:1], [1], True)
    alone1, generators1 = run(embeds[1:], [2], False)
    assert batched[0].token_ids == alone0[0].token_ids and len(batched[0].token_ids) == 2
    assert batched[1].token_ids == alone1[0].token_ids and len(batched[1].token_ids) == 6
    assert torch.equal(batched_generators[0].get_state(), generators0[0].get_state())
    assert torch.equal(batched_generators[1].get_state(), generators1[0].get_state())


def test_decoding_embedder_equals_embed_tokens(opt_pipe):
    """The decoding loop looks up the embedding table's placement once per call (`token_embedder`); its embeddings must
    be `embed_tokens`'s exactly: text ids, `[IMG]` ids (learned rows), negative placeholders."""
    from gill_pipeline.models.lm_bridge import embed_tokens, token_embedder

    img = opt_pipe.img_token_ids
    ids = torch.tensor([[3, 4, img[0], 8, img[-1], -1, 9], [5, img[1], 6, 7, 2, 3, 4]])
    embed = token_embedder(opt_pipe.llm, opt_pipe.gill, img)
    for each in (ids, ids[:1, :2], ids[:, 2:3]):
        expected = embed_tokens(opt_pipe.llm, opt_pipe.gill, img, each)
        assert torch.equal(embed(each), expected)
    rows = opt_pipe.gill.img_input_embeddings
    assert torch.equal(embed(torch.tensor([img[1]])), rows[1:2].to(expected.dtype))
