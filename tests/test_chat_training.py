"""Caption pairs wrapped in the LM's chat template: instruction LMs learn `[IMG]` inside assistant turns."""

import pytest
import torch
from conftest import make_pipeline

from gill_pipeline.pipeline.chat import render_conversation
from training.chat_format import ChatWrapping
from training.losses import IGNORE_INDEX
from training.model_forward import GILLTrainingModel, total_loss
from training.params import LossArgs


@pytest.fixture(scope="module")
def chat_pipe():
    return make_pipeline("llama", chat_template=True)


def training_model(pipe, chat):
    return GILLTrainingModel(
        pipe.llm, pipe.gill, pipe.image_encoder, pipe.img_token_ids, pad_token_id=0,
        bos_token_id=pipe.tokenizer.bos_token_id, chat=chat,
    )


def caption_ids(pipe, text):
    return [pipe.tokenizer.bos_token_id] + pipe.tokenizer(text, add_special_tokens=False).input_ids


def test_img_sequence_is_what_the_pipeline_reads_then_the_answer(chat_pipe):
    tokenizer = chat_pipe.tokenizer
    chat = ChatWrapping.from_tokenizer(tokenizer, image_request="Show me a picture.")
    model = training_model(chat_pipe, chat)
    caption = caption_ids(chat_pipe, "a red circle")
    ids, labels, mask, locations = model.img_sequences([caption], concat=False)
    row, label = ids[0].tolist(), labels[0].tolist()
    # The context is exactly what `pipe(messages)` reads for that request (rendered with the generation prompt).
    (prompt,) = render_conversation(tokenizer, [{"role": "user", "content": "Show me a picture."}])
    context = tokenizer(prompt, add_special_tokens=False).input_ids
    answer = caption[1:] + chat_pipe.img_token_ids
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert row == context + answer + [end_of_turn]
    assert label[: len(context)] == [IGNORE_INDEX] * len(context), "the request is context, not a target"
    assert label[len(context) :] == caption[1:] + chat_pipe.img_token_ids[:1] + [IGNORE_INDEX] * 3 + [end_of_turn]
    assert locations.tolist() == [[0, len(context) + len(caption) - 1]], "[IMG0] located inside the assistant turn"


def test_caption_sequence_puts_the_image_in_the_user_turn(chat_pipe):
    chat = ChatWrapping.from_tokenizer(chat_pipe.tokenizer)
    model = training_model(chat_pipe, chat)
    prefix = torch.randn(1, chat_pipe.gill.config.num_visual_tokens, chat_pipe.gill.config.lm_input_dim)
    caption = caption_ids(chat_pipe, "a red circle")
    embeds, labels, mask = model.caption_sequences([caption], prefix, concat=False)
    k = prefix.shape[1]
    start = len(chat.caption_before)
    torch.testing.assert_close(embeds[0, start : start + k], prefix[0])
    targets = [t for t in labels[0].tolist() if t != IGNORE_INDEX]
    assert targets == caption[1:] + chat.caption_after, "only the assistant's caption and end of turn are targets"


def test_a_training_step_with_the_chat_template(chat_pipe):
    chat = ChatWrapping.from_tokenizer(chat_pipe.tokenizer)
    model = training_model(chat_pipe, chat)
    captions = [caption_ids(chat_pipe, c) for c in ("a red circle", "a blue square", "a green triangle")]
    batch = {
        "caption_ids": torch.tensor([c + [0] * (16 - len(c)) for c in captions]),
        "caption_lengths": torch.tensor([len(c) for c in captions]),
        "image_features": torch.randn(3, chat_pipe.gill.config.vision_dim),
        "targets": torch.randn(3, *chat_pipe.gill.uncond_prompt_embeds.shape[1:]),
    }
    out = model(batch, concat_caption=True, concat_img=True)
    loss = total_loss(out, LossArgs())
    loss.backward()
    assert torch.isfinite(loss) and chat_pipe.gill.img_input_embeddings.grad is not None
    chat_pipe.gill.zero_grad(set_to_none=True)


def test_a_tokenizer_without_a_template_is_refused(opt_pipe):
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        ChatWrapping.from_tokenizer(opt_pipe.tokenizer)
