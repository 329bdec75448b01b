"""Chat messages in and out: the transformers chat format, rendered with the LM's own chat template.

A conversation is a list of `{"role": ..., "content": ...}` messages whose content is a string or a list of parts
`{"type": "text", "text": ...}` and `{"type": "image", "image": <PIL image, numpy array or tensor>}`. With a
tokenizer that has a chat template (instruction LMs), the messages are rendered by that template, each image part
standing where the image is; the rendered text is split there again, so every image becomes its visual prefix in the
right place. Without a template (base LMs) the contents are simply concatenated, as a plain interleaved input.
"""

from typing import Any

from .inputs import is_image

# Stands in for an image while the chat template renders the conversation; never a real piece of text.
IMAGE_SENTINEL = "\u2063<gill-image-{i}>\u2063"
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
    for b, conversation in enumerate(conversations):
        where = f"{name}[{b}]" if batched else name
        if not conversation:
            raise ValueError(f"`{where}` is an empty conversation: give at least one message.")
        for m, message in enumerate(conversation):
            check_message(message, f"{where}[{m}]")
    return conversations, batched


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


def render_conversation(tokenizer, conversation: list[dict], add_generation_prompt: bool = True) -> list[Any]:
    """A conversation -> one interleaved list (text segments and images) as the LM should read it.

    With a chat template, the text segments already hold every special token the template writes (BOS included),
    so they are tokenised as they are; without one, the contents are concatenated in order.
    """
    if not has_chat_template(tokenizer):
        return [element for message in conversation for element in content_elements(message["content"])]
    images, flat = [], []
    for message in conversation:
        text = ""
        for element in content_elements(message["content"]):
            if isinstance(element, str):
                text += element
            else:
                text += IMAGE_SENTINEL.format(i=len(images))
                images.append(element)
        flat.append({"role": message["role"], "content": text})
    rendered = tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=add_generation_prompt)
    elements: list[Any] = []
    rest = rendered
    for i, image in enumerate(images):
        sentinel = IMAGE_SENTINEL.format(i=i)
        before, found, rest = rest.partition(sentinel)
        if not found:
            raise ValueError(
                "The tokenizer's chat template dropped or changed an image's place in the conversation; GILL cannot "
                "tell where the image goes."
            )
        if before:
            elements.append(before)
        elements.append(image)
    if rest:
        elements.append(rest)
    return elements


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
