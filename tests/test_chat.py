"""Conversations: chat messages in and out with the LM's own template, multi-turn state with a reused KV cache, and
streaming."""

import threading

import PIL.Image
import pytest
import torch
from conftest import FAST_CALL, make_pipeline, random_image
from transformers import TextStreamer

from gill_pipeline import GILLConversation, GILLImage, GILLStreamer
from gill_pipeline.pipeline.chat import end_of_turn_token_ids, render_conversation
from gill_pipeline.pipeline.conversation import GILLPast

# A huge [IMG0] scale after a few words makes the tiny random LM answer with text and an image.
TURN = dict(FAST_CALL, max_new_tokens=8, min_text_tokens=2, img_logit_scale=1e4, max_images=1, output_type="pil")


@pytest.fixture(scope="module")
def chat_pipe():
    """A tiny pipeline whose tokenizer has a ChatML chat template (an instruction LM's tokenizer)."""
    return make_pipeline("llama", chat_template=True)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def user(*parts):
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p} for p in parts]
    return {"role": "user", "content": content}


# ----------------------------------------------------------------------------------------------------------------------
# Messages in, with the template; an assistant message out
# ----------------------------------------------------------------------------------------------------------------------
def test_messages_are_rendered_by_the_chat_template_with_images_in_place(chat_pipe):
    image = random_image(0)
    elements = render_conversation(chat_pipe.tokenizer, [user("Look: ", image, " what is it?")])
    assert elements[0] == "<|im_start|>user\nLook: " and elements[1] is image
    assert elements[2] == " what is it?<|im_end|>\n<|im_start|>assistant\n"
    assert end_of_turn_token_ids(chat_pipe.tokenizer) == {chat_pipe.tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_chat_call_equals_the_rendered_interleaved_call_without_an_extra_bos(chat_pipe):
    messages = [user("This is my dog. ", random_image(0), " Show me him in the snow.")]
    chat = chat_pipe(messages, generator=seeded(), **TURN)
    rendered = render_conversation(chat_pipe.tokenizer, messages)
    embeds = chat_pipe.encode_interleaved(rendered, torch.device("cpu"), "x", add_bos=False)
    with_bos = chat_pipe.encode_interleaved(rendered, torch.device("cpu"), "x")
    assert with_bos.shape[0] == embeds.shape[0] + 1, "the template's text is read as it is, with no BOS added"
    (message,) = chat.messages
    assert message["role"] == "assistant"
    texts = [p["text"] for p in message["content"] if p["type"] == "text"]
    images = [p for p in message["content"] if p["type"] == "image"]
    assert "".join(texts) == chat.texts[0]
    assert len(images) == len(chat.images) == 1 and images[0]["image"] is chat.images[0]
    assert images[0]["source"] == "generated" and len(images[0]["decision_probs"]) == 2


def test_decoding_stops_at_the_end_of_turn_token(chat_pipe, monkeypatch):
    end = chat_pipe.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Make the LM prefer <|im_end|> after two tokens: the answer must stop there and never show it.
    head = chat_pipe.llm.get_output_embeddings()
    original = head.forward
    calls = []

    def prefer_end(hidden):
        logits = original(hidden)
        calls.append(1)
        if len(calls) >= 3:
            logits = logits.clone()
            logits[..., end] = 1e4
        return logits

    monkeypatch.setattr(head, "forward", prefer_end)
    out = chat_pipe([user("Hello there.")], **dict(TURN, max_new_tokens=20, max_images=0))
    assert "<|im_end|>" not in out.texts[0]
    assert len(out.texts[0]) > 0 and len(calls) < 10


def test_answers_can_be_appended_and_sent_back(chat_pipe):
    messages = [user("This is my dog. ", random_image(0), " Show me him.")]
    first = chat_pipe(messages, generator=seeded(), **TURN).messages[0]
    messages += [first, user("And now in the rain.")]
    second = chat_pipe(messages, generator=seeded(), **TURN)
    assert second.messages[0]["role"] == "assistant"
    # The image GILL showed comes back as visual prefix: the rendering holds it where the answer had it.
    rendered = render_conversation(chat_pipe.tokenizer, messages)
    assert sum(isinstance(x, PIL.Image.Image) for x in rendered) == 2


def test_base_lm_without_template_keeps_the_interleaved_behaviour(opt_pipe):
    messages = [user("This is my dog. ", random_image(0), " Show me him.")]
    chat = opt_pipe(messages, generator=seeded(), **TURN)
    plain = opt_pipe(["This is my dog. ", random_image(0), " Show me him."], generator=seeded(), **TURN)
    assert chat.texts == plain.texts
    torch.testing.assert_close(
        torch.as_tensor(list(chat.images[0].getdata())), torch.as_tensor(list(plain.images[0].getdata()))
    )


@pytest.mark.parametrize(
    "messages,pattern",
    [
        ([{"role": "user"}], r"`prompt\[0\]\['content'\]` must be a string or a list of parts"),
        ([{"content": "hi"}], r"`prompt\[0\]\['role'\]` must be a non-empty string"),
        ([{"role": "user", "content": [{"type": "video"}]}], r"`prompt\[0\]\['content'\]\[0\]` must be"),
        ([{"role": "user", "content": [{"type": "image", "image": "cat.png"}]}], r"\['image'\]` must be an image"),
    ],
)
def test_bad_messages_are_named(chat_pipe, messages, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        chat_pipe(messages, **TURN)


# ----------------------------------------------------------------------------------------------------------------------
# Multi-turn state
# ----------------------------------------------------------------------------------------------------------------------
def run_dialogue(pipe, reuse: bool, turns=3):
    conversation = GILLConversation(pipe, **TURN)
    answers = []
    for turn in range(turns):
        if not reuse:
            conversation.past = None
        content = ["A dog.", random_image(turn)] if turn == 0 else "More."
        answers.append(conversation.send(content, generator=seeded(turn)))
    return conversation, answers


def texts_of(message):
    return "".join(p["text"] for p in message["content"] if p["type"] == "text")


def test_conversation_with_a_reused_cache_answers_as_from_scratch(chat_pipe):
    reused, answers = run_dialogue(chat_pipe, reuse=True)
    fresh, expected = run_dialogue(chat_pipe, reuse=False)
    assert [texts_of(a) for a in answers] == [texts_of(a) for a in expected]
    assert len(reused.messages) == 6 and [m["role"] for m in reused.messages] == ["user", "assistant"] * 3
    output = reused.last_output
    assert isinstance(output.past, GILLPast) and output.past.reused > 0
    assert fresh.last_output.past.reused == 0


def test_reused_turn_runs_only_its_new_tokens(chat_pipe, monkeypatch):
    conversation = GILLConversation(chat_pipe, **dict(TURN, max_images=0))
    conversation.send("A first question about circles.")
    seen = []
    forward = chat_pipe.llm.forward

    def count(*args, **kwargs):
        seen.append(kwargs["inputs_embeds"].shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(chat_pipe.llm, "forward", count)
    conversation.send("Second.")
    total = len(conversation.past)
    assert seen[0] < total / 2, f"the second turn re-ran {seen[0]} of {total} positions"


def test_past_from_another_pipeline_is_refused(chat_pipe, opt_pipe):
    conversation = GILLConversation(chat_pipe, **dict(TURN, max_images=0))
    conversation.send("Hello.")
    with pytest.raises(ValueError, match="`past` was made by another pipeline"):
        opt_pipe([user("Hi.")], past=conversation.past, **TURN)


def test_reset_forgets_everything(chat_pipe):
    conversation, _ = run_dialogue(chat_pipe, reuse=True, turns=1)
    conversation.reset()
    assert conversation.messages == [] and conversation.past is None


# ----------------------------------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------------------------------
def test_streamer_yields_the_text_then_each_image(chat_pipe):
    streamer = GILLStreamer(chat_pipe.tokenizer, timeout=60)
    result = {}

    def run():
        result["out"] = chat_pipe([user("Show me a dog.")], streamer=streamer, generator=seeded(), **TURN)

    thread = threading.Thread(target=run)
    thread.start()
    items = list(streamer)
    thread.join(timeout=60)
    out = result["out"]
    text = "".join(x for x in items if isinstance(x, str))
    images = [x for x in items if isinstance(x, GILLImage)]
    assert text.strip() == out.texts[0].strip()
    assert len(images) == len(out.images) == 1 and images[0].image is out.images[0]
    assert streamer.progress == (TURN["num_inference_steps"], TURN["num_inference_steps"])


def test_transformers_text_streamer_gets_the_text(chat_pipe, capsys):
    out = chat_pipe([user("Hello.")], streamer=TextStreamer(chat_pipe.tokenizer), **dict(TURN, max_images=0))
    assert capsys.readouterr().out.strip() == out.texts[0].strip()


def test_streaming_a_batch_is_refused(chat_pipe):
    with pytest.raises(ValueError, match="`streamer` streams one answer"):
        chat_pipe([[user("a")], [user("b")]], streamer=GILLStreamer(chat_pipe.tokenizer), **TURN)
