"""Caption examples wrapped in the LM's chat template, so instruction LMs learn `[IMG]` inside assistant turns.

With `--chat-template` (`DataArgs.chat_template`), a caption pair becomes a user request and an assistant answer, as
the LM's own template writes them:
- `[IMG]` sequences (generation, retrieval, `[IMG]` production): the user asks `image_request`; the assistant answers
  with the caption and the `[IMG]` group, then the template's end of turn;
- captioning sequences: the user gives the image (its visual prefix) and `caption_request`; the assistant answers
  with the caption.
Only the assistant's part (caption, `[IMG0]`, the end-of-turn token) is a target; the template's text is context.
At inference `pipe(messages)` renders conversations with the same template (`gill_pipeline.pipeline.chat`), so a
model trained this way answers requests with `[IMG]` groups inside its turn.
"""

from dataclasses import dataclass

ANSWER_SENTINEL = "\u2063gill-answer\u2063"
IMAGE_SENTINEL = "\u2063gill-image\u2063"


@dataclass
class ChatWrapping:
    """Token ids around an example, from a tokenizer's chat template.

    `img_before` + caption + `[IMG]` ids + `img_after`; `caption_before` + visual prefix + `caption_between` +
    caption + `caption_after`. `*_after` end with the template's end-of-turn token. `bos_token_id` is dropped from a
    second exchange joined into the same row (`continuation`).
    """

    img_before: list[int]
    img_after: list[int]
    caption_before: list[int]
    caption_between: list[int]
    caption_after: list[int]
    bos_token_id: int | None = None

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer,
        image_request: str = "Show me a picture.",
        caption_request: str = "Describe this picture.",
    ) -> "ChatWrapping":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "`chat_template` training needs a tokenizer with a chat template (an instruction LM's tokenizer); "
                f"{type(tokenizer).__name__} has none."
            )

        def render(messages):
            return tokenizer.apply_chat_template(messages, tokenize=False)

        def ids(text):
            return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []

        exchange = render([{"role": "user", "content": image_request}, {"role": "assistant", "content": ANSWER_SENTINEL}])
        img_before, img_after = exchange.split(ANSWER_SENTINEL)
        exchange = render(
            [
                {"role": "user", "content": IMAGE_SENTINEL + caption_request},
                {"role": "assistant", "content": ANSWER_SENTINEL},
            ]
        )
        caption_before, rest = exchange.split(IMAGE_SENTINEL)
        caption_between, caption_after = rest.split(ANSWER_SENTINEL)
        return cls(
            img_before=ids(img_before),
            img_after=_through_end_of_turn(ids(img_after), tokenizer),
            caption_before=ids(caption_before),
            caption_between=ids(caption_between),
            caption_after=_through_end_of_turn(ids(caption_after), tokenizer),
            bos_token_id=tokenizer.bos_token_id,
        )

    def continuation(self, before: list[int]) -> list[int]:
        """A template's opening ids for an exchange joined after another one in the same row: without BOS."""
        if self.bos_token_id is not None and before and before[0] == self.bos_token_id:
            return before[1:]
        return before


def _through_end_of_turn(ids: list[int], tokenizer) -> list[int]:
    """The ids after the assistant's text up to and including the first special token (the end of turn); what follows
    it (a newline before the next turn) is not part of the answer."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    special.update(int(i) for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)
    for n, token_id in enumerate(ids):
        if token_id in special:
            return ids[: n + 1]
    return ids
