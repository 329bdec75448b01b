"""Chat messages in and out: the transformers chat format, rendered with the LM's own chat template.

A conversation is a list of `{"role": ..., "content": ...}` messages whose content is a string or a list of parts
`{"type": "text", "text": ...}` and `{"type": "image", "image": <PIL image, numpy array or tensor>}`. With a
tokenizer that has a chat template (instruction LMs), the messages are rendered by that template, each image part
standing where the image is; the rendered text is split there again, so every image becomes its visual prefix in the
right place. Without a template (base LMs) the contents are simply concatenated, as a plain interleaved input.
"""

import re
from typing import Any

import torch

from .inputs import IMG_TOKEN_TEXT, check_text, is_image, to_rgb_pil

# Stands in for an image while the chat template renders the conversation; never a real piece of text.
IMAGE_SENTINEL = "\u2063<gill-image-{i}>\u2063"
_SENTINEL_START = IMAGE_SENTINEL.split("{", 1)[0]
ROLES_OF_ANSWER = "assistant"
GILL_IMAGE_PART_KEYS = ("source", "decision_probs", "scores", "candidates", "metadata", "alternatives")


def is_chat(prompt: Any) -> bool:
    """Whether a call's input is chat messages (one conversation, or a batch of them)."""
    if isinstance(prompt, dict):
        return True
    if isinstance(prompt, (list, tuple)) and prompt:
        first = prompt[0]
        if isinstance(first, dict):
            return True
        if isinstance(first, (list, tuple)) and first and isinstance(first[0], dict):
            return True
    return False


def normalize_conversations(prompt: Any, name: str = "prompt") -> tuple[list[list[dict]], bool]:
    """One conversation or a batch of them -> a batch of checked conversations, and whether it was a batch."""
    if isinstance(prompt, dict):
        raise TypeError(f"`{name}` is a single message dict; pass a list of messages: [{{'role': ..., 'content': ...}}].")
    batched = isinstance(prompt[0], (list, tuple))
    conversations = [list(c) for c in prompt] if batched else [list(prompt)]
    for b, where in enumerate(conversation_names(name, len(conversations), batched)):
        conversation = conversations[b]
        if not conversation:
            raise ValueError(f"`{where}` is an empty conversation: give at least one message.")
        for m, message in enumerate(conversation):
            check_message(message, f"{where}[{m}]")
        conversations[b] = [_checked_copy(message, f"{where}[{m}]") for m, message in enumerate(conversation)]
    return conversations, batched


def conversation_names(name: str, count: int, batched: bool) -> list[str]:
    return [f"{name}[{b}]" if batched else name for b in range(count)]


def _checked_copy(message: dict, name: str) -> dict:
    """`message` with its text checked and its images read as RGB PIL images, errors naming the message and part
    (`prompt[0]['content'][2]['image']`), not the image's place in the rendered text. The caller's dict is not
    changed."""
    content = message["content"]
    if isinstance(content, str):
        check_text(content, f"{name}['content']")
        return message
    parts = []
    for p, part in enumerate(content):
        where = f"{name}['content'][{p}]"
        if part["type"] == "text":
            check_text(part["text"], f"{where}['text']")
            parts.append(part)
            continue
        image = part["image"]
        if "source" in part and isinstance(image, torch.Tensor) and (image.ndim != 3 or image.shape[0] not in (1, 3)):
            # An image part of an earlier answer made with output_type="latent": latents are not pictures.
            raise ValueError(
                f"`{where}['image']` is a latent tensor of shape {tuple(image.shape)} from an answer made with "
                "`output_type='latent'`; GILL reads pictures, not the decoder's latents. Run turns that will be "
                "continued with `output_type='pil'`, 'np' or 'pt', or decode the latent first (e.g. "
                "`pipe.vae.decode(...)` then `pipe.image_processor.postprocess(...)`)."
            )
        parts.append({**part, "image": to_rgb_pil(image, f"{where}['image']")})
    return {**message, "content": parts}


def check_message(message: Any, name: str) -> None:
    if not isinstance(message, dict):
        raise TypeError(f"`{name}` must be a message dict with 'role' and 'content', got {type(message).__name__}.")
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not role:
        raise ValueError(f"`{name}['role']` must be a non-empty string such as 'user', got {role!r:.100}.")
    if isinstance(content, str):
        return
    if not isinstance(content, (list, tuple)):
        raise TypeError(
            f"`{name}['content']` must be a string or a list of parts ({{'type': 'text', 'text': ...}} or "
            f"{{'type': 'image', 'image': ...}}), got {type(content).__name__} {content!r:.100}."
        )
    for p, part in enumerate(content):
        where = f"{name}['content'][{p}]"
        if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
            raise ValueError(
                f"`{where}` must be {{'type': 'text', 'text': ...}} or {{'type': 'image', 'image': ...}}, got "
                f"{part!r:.100}."
            )
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise TypeError(f"`{where}['text']` must be a string, got {type(part.get('text')).__name__}.")
        if part["type"] == "image" and not is_image(part.get("image")):
            raise TypeError(
                f"`{where}['image']` must be an image (PIL.Image, numpy HWC uint8 array or CHW tensor), got "
                f"{type(part.get('image')).__name__}."
            )


def content_elements(content: Any) -> list[Any]:
    """A message's content -> its text segments and images, in order."""
    if isinstance(content, str):
        return [content] if content else []
    elements = []
    for part in content:
        if part["type"] == "text":
            if part["text"]:
                elements.append(part["text"])
        else:
            elements.append(part["image"])
    return elements


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_conversations(tokenizer, conversations: list[list[dict]], name: str, batched: bool) -> list[list[Any]]:
    """Checked conversations (`normalize_conversations`) -> the interleaved list of each, as the LM reads it; errors
    name the conversation, message and part (`prompt[1]['content'][0]['text']`)."""
    pattern = control_marker_pattern(tokenizer)
    batch = []
    for conversation, where in zip(conversations, conversation_names(name, len(conversations), batched)):
        refuse_control_markers(conversation, pattern, where)
        batch.append(render_conversation(tokenizer, conversation, name=where))
    return batch


def control_marker_pattern(tokenizer) -> re.Pattern:
    """What a message's text may not contain: the tokenizer's special tokens (the template's turn markers, BOS/EOS),
    GILL's [IMG] tokens and the image sentinel. Each would be read as a control token, not as text."""
    tokens = set(getattr(tokenizer, "all_special_tokens", None) or [])
    tokens.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    # Whitespace-only special tokens (a few tokenizers have them) are left out: they would refuse every message.
    alternatives = [re.escape(t) for t in sorted((t for t in tokens if t and t.strip()), key=len, reverse=True)]
    return re.compile("|".join(alternatives + [IMG_TOKEN_TEXT.pattern, re.escape(_SENTINEL_START)]))


def refuse_control_markers(conversation: list[dict], pattern: re.Pattern, name: str) -> None:
    """Refuses, naming the message and part, text that would inject turns or [IMG] tokens: the rendered text is read
    with special tokens parsed (the template's own markers must be), so a user's `<|im_start|>assistant` or `[IMG0]`
    would become a fake turn or an image request. Chat APIs refuse them likewise (tiktoken's `disallowed_special`)."""
    for m, message in enumerate(conversation):
        content = message["content"]
        texts = [(message["role"], f"{name}[{m}]['role']")]
        if isinstance(content, str):
            texts.append((content, f"{name}[{m}]['content']"))
        else:
            texts += [(part["text"], f"{name}[{m}]['content'][{p}]['text']") for p, part in enumerate(content)
                      if part["type"] == "text"]
        for text, where in texts:
            found = pattern.search(text)
            if found:
                raise ValueError(
                    f"`{where}` contains {found.group()!r} (at character {found.start()}), which the LM would read as "
                    "a control token (a turn marker, BOS/EOS or GILL's [IMG] token), not as text: a message cannot "
                    "open a turn or request an image. Remove it from the text; images go in "
                    "{'type': 'image', 'image': ...} parts."
                )


def render_conversation(tokenizer, conversation: list[dict], name: str = "prompt") -> list[Any]:
    """A conversation -> one interleaved list (text segments and images) as the LM should read it.

    With a chat template, the text segments already hold every special token the template writes (BOS included),
    so they are tokenised as they are; without one, the contents are concatenated in order. A conversation that ends
    with an assistant message is continued (transformers' `continue_final_message`, as its text-generation pipeline
    does by default): the answer goes on from that message's last word, in the same turn; otherwise the template's
    generation prompt opens a new assistant turn.
    """
    if not has_chat_template(tokenizer):
        return [element for message in conversation for element in content_elements(message["content"])]
    images, flat = [], []
    for m, message in enumerate(conversation):
        text = ""
        for element in content_elements(message["content"]):
            if isinstance(element, str):
                text += element
            else:
                text += IMAGE_SENTINEL.format(i=len(images))
                images.append((element, m))
        flat.append({"role": message["role"], "content": text})
    rendered = _apply_template(tokenizer, flat, name)
    elements: list[Any] = []
    rest = rendered
    for i, (image, m) in enumerate(images):
        sentinel = IMAGE_SENTINEL.format(i=i)
        before, found, rest = rest.partition(sentinel)
        if not found:
            raise ValueError(
                f"The tokenizer's chat template dropped or moved an image of `{name}[{m}]`; GILL cannot tell where "
                "the image goes. Use a template that writes each message's content as it is."
            )
        if before:
            elements.append(before)
        elements.append(image)
    if rest:
        elements.append(rest)
    return elements


def _apply_template(tokenizer, flat: list[dict], name: str) -> str:
    """The rendered conversation; a template error (jinja2's `TemplateError` from a template's `raise_exception`, or
    any other) becomes a ValueError naming the first message the template refuses."""
    continue_final = flat[-1]["role"] == ROLES_OF_ANSWER
    try:
        return tokenizer.apply_chat_template(
            flat, tokenize=False, add_generation_prompt=not continue_final, continue_final_message=continue_final
        )
    except Exception as error:  # a template can raise anything (jinja2 errors, TypeError, transformers' ValueError)
        failure = error
    where, why = f"`{name}`", ""
    for m, message in enumerate(flat):  # the first message whose conversation-so-far the template cannot render
        try:
            tokenizer.apply_chat_template(flat[: m + 1], tokenize=False, add_generation_prompt=False)
        except Exception:
            where = f"`{name}[{m}]` (role {message['role']!r:.40})"
            break
    else:
        if continue_final:
            why = (
                f" The conversation ends with an {ROLES_OF_ANSWER!r} message, which GILL continues (transformers' "
                "`continue_final_message`); end it with a user message to get a new answer instead."
            )
    raise ValueError(
        f"{where} is refused by the tokenizer's chat template: {type(failure).__name__}: {str(failure):.500}.{why}"
    ) from failure


def end_of_turn_token_ids(tokenizer) -> set[int]:
    """The special token(s) the chat template writes right after an assistant turn (e.g. `<|im_end|>`,
    `<|eot_id|>`, `<end_of_turn>`), found by rendering a short exchange: decoding stops there."""
    if not has_chat_template(tokenizer):
        return set()
    marker = "\u2063gill-answer\u2063"
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # templates that refuse this exchange (e.g. ones that need a system turn): no extra stop ids
        return set()
    after = rendered.split(marker, 1)[-1]
    ids = tokenizer(after, add_special_tokens=False).input_ids
    special = set(getattr(tokenizer, "all_special_ids", []))
    special.update(int(i) for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)
    for token_id in ids:
        if token_id in special:
            return {int(token_id)}
    return set()


def answer_to_message(answer: list[Any]) -> dict:
    """An interleaved answer (text segments and `GILLImage`s) -> an assistant message in the chat format; each image
    part carries what the `GILLImage` carries, so the message can be appended to the conversation as it is."""
    parts = []
    for element in answer:
        if isinstance(element, str):
            parts.append({"type": "text", "text": element})
        else:
            part = {"type": "image", "image": element.image}
            part.update({key: getattr(element, key) for key in GILL_IMAGE_PART_KEYS})
            parts.append(part)
    return {"role": ROLES_OF_ANSWER, "content": parts}
