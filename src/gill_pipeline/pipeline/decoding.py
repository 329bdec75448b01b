"""GILL's decoding loop: text tokens and `[IMG]` groups, batched, with a KV cache.

The rules are those of GILL's inference algorithm:
- `[IMG1..r-1]` are never produced on their own; producing `[IMG0]` appends the rest of the group at once;
- `[IMG0]` is forbidden until `min_text_tokens` text tokens were produced and once `max_images` groups exist;
- `img_logit_scale > 1` replaces the `[IMG0]` logit by `|logit| * img_logit_scale` (the reference's
  `ret_scale_factor`);
- text may stop at the first newline.

Each token's last-layer hidden state is taken from the forward pass in which that token is an INPUT, so an `[IMG]`
group produced at the last step is still run through the LM once to get its hidden states.

A batch gives the same tokens as its inputs one by one, for every kind of LM (full, sliding-window or ALiBi
attention, recurrent / linear-attention / state-space layers): no row ever gets a padded slot between two of its
tokens. Prompts are left-padded (pads come before a row's first token, where every layer ignores them) and each row
keeps a queue of tokens still to be fed: the text token it chose, or the `r` ids of an `[IMG]` group. Every LM pass
feeds the same number of tokens from each row that has any (the shortest queue), so a row that chose text and a row
that chose `[IMG0]` advance one token at a time together, and rows that all chose `[IMG0]` feed their groups in one
pass. A row chooses its next token only once its queue is empty, from the logits of its last fed token. Rows that
are done get masked slots; their outputs are no longer read.
"""

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers import Cache, LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from ..models.lm_bridge import lm_forward_with_img_logits
from .inputs import check_bool, check_int, check_number


@dataclass
class DecodingSettings:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    min_text_tokens: int = 0
    img_logit_scale: float = 1.0
    max_images: int | None = None
    stop_at_newline: bool = False
    use_cache: bool = True

    def check(self) -> None:
        """Refuses a bad setting (called by `GILLPipeline.check_inputs`); errors name the argument of the call."""
        for name in ("do_sample", "stop_at_newline", "use_cache"):
            check_bool(getattr(self, name), name)
        check_int(self.max_new_tokens, "max_new_tokens", minimum=1)
        check_number(self.temperature, "temperature", positive=True)
        check_number(self.top_p, "top_p", positive=True)
        if self.top_p > 1:
            raise ValueError(f"`top_p` must be a number in (0, 1], got {self.top_p!r}.")
        check_int(self.min_text_tokens, "min_text_tokens", minimum=0)
        if self.img_logit_scale != float("inf"):  # inf: `[IMG0]` wherever it is allowed (a forced image)
            check_number(self.img_logit_scale, "img_logit_scale", positive=True)
        if self.max_images is not None:
            check_int(self.max_images, "max_images", minimum=0)


@dataclass
class DecodedSequence:
    """What one input row produced.

    `token_ids` are the generated ids, `[IMG]` groups included. `hidden_states[j]` is the LM's last-layer hidden
    state where `token_ids[j]` was the input; it has one row fewer than `token_ids` when the last produced token is a
    text token (that one was never run through the LM). `img_starts` are the indices of `[IMG0]` in `token_ids`.
    """

    token_ids: list[int] = field(default_factory=list)
    hidden_states: list[torch.Tensor] = field(default_factory=list)
    img_starts: list[int] = field(default_factory=list)
    num_text_tokens: int = 0
    finished: bool = False

    def img_hidden_states(self, index: int, num_img_tokens: int) -> torch.Tensor:
        start = self.img_starts[index]
        return torch.stack(self.hidden_states[start : start + num_img_tokens])


class GILLImgTokenLogitsProcessor(LogitsProcessor):
    """GILL's `[IMG]` rules as a transformers `LogitsProcessor`, for rows given at construction.

    `[IMG1..r-1]` are suppressed; `[IMG0]` is suppressed in a row that has fewer than `min_text_tokens` text tokens,
    already `max_images` groups, or less than `r` positions left in the LM's context; elsewhere `img_logit_scale > 1`
    replaces its logit by `|logit| * img_logit_scale`, and `img_logit_scale=math.inf` makes it the only choice.

    Args:
        img_token_ids (`list[int]`): The `r` ids of `[IMG0]..[IMG{r-1}]`.
        num_text_tokens (`Sequence[int]`): Text tokens each row has produced.
        num_images (`Sequence[int]`): `[IMG]` groups each row has produced.
        room (`Sequence[int]`): Positions left in each row's context.
        min_text_tokens, max_images, img_logit_scale: as in [`DecodingSettings`].
    """

    def __init__(
        self,
        img_token_ids: list[int],
        num_text_tokens: Sequence[int],
        num_images: Sequence[int],
        room: Sequence[int],
        min_text_tokens: int = 0,
        max_images: int | None = None,
        img_logit_scale: float = 1.0,
    ):
        self.img_token_ids = list(img_token_ids)
        self.allowed = [
            text >= min_text_tokens and (max_images is None or images < max_images) and left >= len(img_token_ids)
            for text, images, left in zip(num_text_tokens, num_images, room)
        ]
        self.img_logit_scale = img_logit_scale

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        img0, rest = self.img_token_ids[0], self.img_token_ids[1:]
        scores[:, rest] = float("-inf")
        logit = scores[:, img0]
        allowed = torch.tensor(self.allowed, device=scores.device)
        if math.isinf(self.img_logit_scale):  # `[IMG0]` wherever it is allowed, whatever its logit (also sampled)
            scores = torch.where(allowed[:, None], torch.full_like(scores, float("-inf")), scores)
            scores[:, img0] = torch.where(allowed, torch.zeros_like(logit), torch.full_like(logit, float("-inf")))
            return scores
        if self.img_logit_scale > 1:
            logit = logit.abs() * self.img_logit_scale
        scores[:, img0] = torch.where(allowed, logit, torch.full_like(logit, float("-inf")))
        return scores


def _continues_in_chunks(cache) -> bool:
    """Whether an LM with this cache continues exactly from it when given several new tokens in one pass.

    Attention caches do. Recurrent, linear-attention and state-space layers (`Cache.is_linear`) continue from their
    cached state exactly only one token at a time in transformers (Jamba's multi-token scan, for one, starts from a zero
    state), and a cache class of the LM's own promises nothing: those LMs are fed one token per pass.
    """
    return isinstance(cache, Cache) and not any(cache.is_linear)


def _call_for_row(on_token, row: int, _: int, token_id: int) -> None:
    on_token(row, token_id)


def _ask_for_row(should_stop, row: int, _: int) -> bool:
    return should_stop(row)


def _drop_images(row: DecodedSequence) -> None:
    """A stopped row keeps its text before its first `[IMG]` group and loses the groups (no image is made for it)."""
    if row.img_starts:
        cut = row.img_starts[0]
        del row.token_ids[cut:]
        del row.hidden_states[cut:]
        row.img_starts.clear()


def _only_recurrent(cache) -> bool:
    """Whether every layer of this cache is a recurrent / state-space one (no attention over past keys)."""
    return isinstance(cache, Cache) and len(cache.is_linear) > 0 and all(cache.is_linear)


# (inputs_embeds, attention_mask, position_ids, cache, use_cache, logits_to_keep)
#     -> (logits over the LM vocabulary extended with the [IMG] ids, last hidden state, cache)
LMForward = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, object, bool, int], tuple[torch.Tensor, torch.Tensor, object]
]


class GILLDecoder:
    """Runs the decoding loop for a batch of prompts given as input embeddings.

    Args:
        lm_forward: runs the causal LM (see `LMForward`); returns logits over the LM vocabulary extended with the
            `[IMG]` ids for the last `logits_to_keep` positions, the last hidden state for all positions, and the
            cache to pass next time (the one it was given, or the LM's own when it was given `None`).
        embed_ids: maps token ids `(B, W)` (`[IMG]` ids included) to input embeddings `(B, W, D)`.
        img_token_ids: the `r` ids of `[IMG0]..[IMG{r-1}]`.
        eos_token_ids: ids that end a row.
        is_newline: says whether a token id decodes to text containing a newline.
        new_cache: returns the empty cache to start from, or `None` to let the LM build its own
            (see `models.lm_bridge.new_cache`).
        max_positions: the LM's context length; a row stops when it is full, and `[IMG0]` is forbidden when its
            group would not fit.
        pad_prompts: whether prompts of different lengths may be left-padded into one batch; `False` for LMs that
            cannot be told where a padded row starts (see `models.lm_bridge.takes_position_ids`): unless they have no
            attention layer at all, they are decoded one row at a time.
        static: decode with a `StaticCache` and compiled steps (`pipeline.compiled_decoding.CompiledDecoding`, with
            `llm` the LM it serves), or `None` for a growing cache and eager steps.
    """

    def __init__(
        self,
        lm_forward: LMForward,
        embed_ids: Callable[[torch.Tensor], torch.Tensor],
        img_token_ids: list[int],
        eos_token_ids: set[int],
        is_newline: Callable[[int], bool],
        new_cache: Callable[[], object] | None = None,
        max_positions: int | None = None,
        pad_prompts: bool = True,
        static=None,
        llm=None,
    ):
        self.lm_forward = lm_forward
        self.embed_ids = embed_ids
        self.img_token_ids = list(img_token_ids)
        self.eos_token_ids = set(eos_token_ids)
        self.is_newline = is_newline
        self.new_cache = new_cache
        self.max_positions = max_positions
        self.pad_prompts = pad_prompts
        self.static = static
        self.llm = llm
        self._static_length = None  # the static cache's length in this call, or None
        self._compiled_steps = False
        self._on_token = None
        self.last_cache = None

    # ------------------------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt_embeds: list[torch.Tensor],
        settings: DecodingSettings,
        generator: torch.Generator | list[torch.Generator] | None = None,
        *,
        past_cache=None,
        past_length: int = 0,
        on_token: Callable[[int, int], None] | None = None,
        should_stop: Callable[[int], bool] | None = None,
    ) -> list[DecodedSequence]:
        """Decodes every prompt; `self.last_cache` then holds the cache (every token fed so far).

        `past_cache` (one prompt only, with `use_cache`): a cache that already holds `past_length` positions the
        prompt continues (an earlier turn of a conversation); only the prompt's own embeddings are run.
        `on_token(row, token_id)` is called for every text token as it is chosen (streaming).
        `should_stop(row)` is asked before each of a row's choices: true means nobody wants that row's answer any more
        (a server's client went away). The row stops choosing (the other rows decode exactly as before: rows never
        see each other), and its `[IMG]` groups are dropped, so no image is retrieved or generated for it.
        """
        batch_size = len(prompt_embeds)
        device, dtype = prompt_embeds[0].device, prompt_embeds[0].dtype
        width = prompt_embeds[0].shape[-1]
        self._on_token = on_token
        if past_cache is not None and (batch_size != 1 or not settings.use_cache):
            raise ValueError("A past cache continues one prompt decoded with `use_cache=True`.")

        # Left-pad the prompts so that every row's next position is the last column.
        length = max(e.shape[0] for e in prompt_embeds)
        embeds = torch.zeros(batch_size, length, width, device=device, dtype=dtype)
        mask = torch.zeros(batch_size, past_length + length, device=device, dtype=torch.long)
        for b, e in enumerate(prompt_embeds):
            embeds[b, length - e.shape[0] :] = e
            mask[b, past_length + length - e.shape[0] :] = 1
        mask[:, :past_length] = 1  # what the past cache holds
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_length:]
        next_position = mask.sum(-1)

        self._static_length = self._static_cache_length(settings, past_length + length)
        self._compiled_steps = False
        if self._static_length is not None:
            if past_cache is not None:
                cache = self.static.continue_cache(self.llm, past_cache, past_length, self._static_length)
            else:
                cache = self.static.new_cache(self.llm, self._static_length)
        elif past_cache is not None:
            cache = past_cache
        else:
            cache = self.new_cache() if settings.use_cache and self.new_cache is not None else None
        history = (embeds, mask, positions)  # the whole sequence, for decoding without a cache
        padded = len({e.shape[0] for e in prompt_embeds}) > 1
        prefill_mask = mask[:, past_length:] if _only_recurrent(past_cache) else mask  # see `masks_new_tokens_only`
        # A padded batch's prefill always asks for a cache, to learn whether the LM returns one.
        logits, _, cache = self._forward(embeds, prefill_mask, positions, cache, history, settings.use_cache or padded)
        self._compiled_steps = self._static_length is not None and self.static.step_ready(self.llm)
        if padded and (cache is None or (not self.pad_prompts and not _only_recurrent(cache))):
            # An LM that returns no `Cache` (RWKV, RecurrentGemma, ...) may also ignore the attention mask, and one
            # with attention that takes no position ids may start a padded row at the wrong position: left padding
            # could change their answers. (State-space LMs need no positions and mask their padding.)
            return self._rows_alone(prompt_embeds, settings, generator, on_token, should_stop)
        next_logits = logits[:, -1]
        # An LM that returns no cache (one that keeps its state elsewhere, e.g. RecurrentGemma) is re-run in full.
        use_cache = settings.use_cache and cache is not None
        max_tokens_per_pass = 1 if use_cache and not _continues_in_chunks(cache) else None
        # LMs without any attention layer (Mamba and the like) read `attention_mask` as the mask of the tokens they are
        # given, not of the whole sequence: their cached passes get the new tokens' part only.
        masks_new_tokens_only = use_cache and _only_recurrent(cache)

        rows = [DecodedSequence() for _ in range(batch_size)]
        queues: list[list[int]] = [[] for _ in range(batch_size)]  # tokens chosen but not yet fed
        choices = [0] * batch_size  # tokens (an [IMG] group counts once) each row has chosen
        done = [False] * batch_size  # nothing left to choose or feed
        while True:
            # 1. Rows that fed everything they chose choose their next token.
            room = self._room(next_position)
            choosing = []
            for b, row in enumerate(rows):
                if done[b] or queues[b]:
                    continue  # a row feeding an [IMG] group finishes it first: a group is never cut in two
                if should_stop is not None and should_stop(b):
                    _drop_images(row)
                    done[b] = True
                elif choices[b] >= settings.max_new_tokens:
                    done[b] = True
                elif room[b] < 1:
                    row.finished = done[b] = True  # the LM's context is full
                else:
                    choosing.append(b)
            if choosing:
                if isinstance(generator, list):
                    row_generator = [generator[b] for b in choosing]
                else:
                    row_generator = generator
                tokens = self._choose_tokens(
                    next_logits[choosing], [rows[b] for b in choosing], settings, row_generator, [room[b] for b in choosing]
                )
                for b, token in zip(choosing, tokens):
                    self._take(b, token, rows[b], queues, choices, done, settings)

            # 2. One LM pass over the same number of queued tokens from every row that has any.
            feeding = [b for b in range(batch_size) if queues[b]]
            if not feeding:
                break
            n = min(min(len(queues[b]) for b in feeding), max_tokens_per_pass or len(self.img_token_ids))
            ids = torch.zeros(batch_size, n, dtype=torch.long, device=device)
            step_mask = torch.zeros(batch_size, n, dtype=torch.long, device=device)
            step_positions = torch.zeros(batch_size, n, dtype=torch.long, device=device)
            offsets = torch.arange(n, device=device)
            for b in feeding:
                ids[b] = torch.tensor(queues[b][:n], device=device)
                step_mask[b] = 1
                # Rows that are done keep position 0: LMs with learned position tables look up masked slots too.
                step_positions[b] = next_position[b] + offsets
            step_embeds = self.embed_ids(ids).to(dtype) * step_mask[..., None].to(dtype)
            mask = torch.cat([mask, step_mask], dim=1)
            history = (
                torch.cat([history[0], step_embeds], dim=1),
                mask,
                torch.cat([history[2], step_positions], dim=1),
            )
            lm_mask = step_mask if masks_new_tokens_only else mask
            logits, hidden, cache = self._forward(step_embeds, lm_mask, step_positions, cache, history, use_cache)
            for b in feeding:
                rows[b].hidden_states.extend(hidden[b].unbind(0))
                queues[b] = queues[b][n:]
                next_position[b] += n
                # Only rows whose queue is now empty choose from these logits: their last fed token is the last slot.
                next_logits[b] = logits[b, -1]
        self.last_cache = cache
        return rows

    # ------------------------------------------------------------------------------------------------------
    def _take(self, b, token, row, queues, choices, done, settings) -> None:
        """Records row `b`'s chosen token and queues what must be run through the LM."""
        choices[b] += 1
        if token in self.eos_token_ids or (settings.stop_at_newline and self.is_newline(token)):
            row.finished = done[b] = True
            return
        if token == self.img_token_ids[0]:
            row.img_starts.append(len(row.token_ids))
            chunk = list(self.img_token_ids)
        else:
            row.num_text_tokens += 1
            chunk = [token]
            if self._on_token is not None:
                self._on_token(b, token)
        row.token_ids.extend(chunk)
        if choices[b] >= settings.max_new_tokens and len(chunk) == 1:
            done[b] = True  # a last text token is never fed; a last [IMG] group still needs its hidden states
        else:
            queues[b] = chunk

    def _rows_alone(self, prompt_embeds, settings, generator, on_token, should_stop=None) -> list[DecodedSequence]:
        """Decodes each prompt on its own (for LMs that left padding could change)."""
        rows = []
        for b, row_embeds in enumerate(prompt_embeds):
            row_generator = [generator[b]] if isinstance(generator, list) else generator
            row_on_token = None if on_token is None else functools.partial(_call_for_row, on_token, b)
            row_should_stop = None if should_stop is None else functools.partial(_ask_for_row, should_stop, b)
            rows += self([row_embeds], settings, row_generator, on_token=row_on_token, should_stop=row_should_stop)
        return rows

    def _static_cache_length(self, settings, prompt_positions: int) -> int | None:
        """The static cache's length for this call (prompt, past and the most positions its answers can feed), or
        None: no static cache. Every LM pass feeds the same number of tokens from each row still decoding, so the
        columns fed never exceed one row's most: `max_new_tokens`, plus `r - 1` for each `[IMG]` group allowed."""
        if self.static is None or not settings.use_cache:
            return None
        groups = settings.max_new_tokens if settings.max_images is None else min(settings.max_images, settings.max_new_tokens)
        needed = prompt_positions + settings.max_new_tokens + (len(self.img_token_ids) - 1) * groups
        return self.static.cache_length(needed, self.max_positions)

    def _forward(self, embeds, mask, positions, cache, history, use_cache):
        """One LM pass over the new tokens; without a cache the whole history is run (the reference's way)."""
        if self._static_length is not None:
            # The mask at the cache's full length: future columns are ones (the causal mask excludes them), so each
            # step's mask has one shape and the compiled graph is reused.
            full = mask.new_ones(mask.shape[0], self._static_length)
            full[:, : mask.shape[1]] = mask
            if self._compiled_steps:
                logits, hidden, cache = self.static.run_step(
                    self.llm, lambda: self.lm_forward(embeds, full, positions, cache, True, 1)
                )
            else:
                logits, hidden, cache = self.lm_forward(embeds, full, positions, cache, True, 1)
            return logits.float(), hidden[:, -embeds.shape[1] :], cache
        if use_cache:
            logits, hidden, cache = self.lm_forward(embeds, mask, positions, cache, True, 1)
        else:
            logits, hidden, _ = self.lm_forward(history[0], history[1], history[2], None, False, 1)
        return logits.float(), hidden[:, -embeds.shape[1] :], cache

    def _room(self, next_position: torch.Tensor) -> list[int]:
        """Positions left in each row's context."""
        if self.max_positions is None:
            return [1 << 30] * next_position.shape[0]
        return [self.max_positions - int(p) for p in next_position]

    def _choose_tokens(self, logits, rows, settings, generator, room) -> list[int]:
        """The next token of each of `rows` (those that choose now) from their logits `(len(rows), V)`.

        `generator` is one generator for these rows, or a list with one per row.
        """
        processors = LogitsProcessorList(
            [
                GILLImgTokenLogitsProcessor(
                    self.img_token_ids,
                    num_text_tokens=[row.num_text_tokens for row in rows],
                    num_images=[len(row.img_starts) for row in rows],
                    room=room,
                    min_text_tokens=settings.min_text_tokens,
                    max_images=settings.max_images,
                    img_logit_scale=settings.img_logit_scale,
                )
            ]
        )
        if settings.do_sample:
            processors.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_p < 1.0:
                processors.append(TopPLogitsWarper(settings.top_p))
        # The processors read no previous ids: GILL's per-row state is given to its processor at construction.
        no_ids = torch.zeros(logits.shape[0], 0, dtype=torch.long, device=logits.device)
        scores = processors(no_ids, logits)
        if not settings.do_sample:
            return scores.argmax(-1).tolist()
        probs = scores.softmax(-1)
        # Only rows that choose now draw, so a row's generator advances exactly as it would for that input alone.
        if isinstance(generator, list):
            return [
                int(torch.multinomial(p.to(g.device), 1, generator=g)) for p, g in zip(probs, generator)
            ]
        sample_device = generator.device if generator is not None else probs.device
        return torch.multinomial(probs.to(sample_device), 1, generator=generator)[:, 0].tolist()


class LMForwardMixin:
    """What `GILLDecoder` needs from a pipeline's LM: one forward with the `[IMG]` logits, its newline and EOS ids."""

    def _lm_forward(self, embeds, mask, positions, cache, use_cache, logits_to_keep):
        """One LM pass -> (logits with the `[IMG]` columns, last hidden state, cache); see `GILLDecoder`."""
        logits, hidden, output = lm_forward_with_img_logits(
            self.llm,
            self.gill,
            self.img_token_ids,
            embeds,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
        )
        return logits, hidden, getattr(output, "cache", None) if use_cache else None

    def _is_newline(self, token_id: int) -> bool:
        return "\n" in self.tokenizer.decode([token_id])

    def _eos_token_ids(self) -> set[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.llm.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return ids
