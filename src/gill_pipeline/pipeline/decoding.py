"""GILL's decoding loop: text tokens and `[IMG]` groups, batched, with a KV cache.

The rules are those of GILL's inference algorithm:
- `[IMG1..r-1]` are never produced on their own; producing `[IMG0]` appends the rest of the group at once;
- `[IMG0]` is forbidden until `min_text_tokens` text tokens were produced and once `max_images` groups exist;
- `img_logit_scale > 1` replaces the `[IMG0]` logit by `|logit| * img_logit_scale` (the reference's
  `ret_scale_factor`);
- text may stop at the first newline.

Each token's last-layer hidden state is taken from the forward pass in which that token is an INPUT, so an `[IMG]`
group produced at the last step is still run through the LM once to get its hidden states.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache


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


# (inputs_embeds, attention_mask, position_ids, cache, logits_to_keep) -> (logits, last_hidden_state)
LMForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object, int], tuple[torch.Tensor, torch.Tensor]]


class GILLDecoder:
    """Runs the decoding loop for a batch of prompts given as input embeddings.

    Args:
        lm_forward: runs the causal LM (see `LMForward`); returns logits over the LM's own vocabulary for the last
            `logits_to_keep` positions and the last hidden state for all positions.
        embed_ids: maps token ids `(B, W)` (`[IMG]` ids included) to input embeddings `(B, W, D)`.
        img_logits: maps hidden states `(N, D)` to `[IMG]` logits `(N, r)`.
        img_token_ids: the `r` ids of `[IMG0]..[IMG{r-1}]`.
        eos_token_ids: ids that end a row.
        is_newline: says whether a token id decodes to text containing a newline.
        cache_config: the LM config a `DynamicCache` is built from.
        max_positions: the LM's context length; a row stops when it is full, and `[IMG0]` is forbidden when its
            group would not fit.
    """

    def __init__(
        self,
        lm_forward: LMForward,
        embed_ids: Callable[[torch.Tensor], torch.Tensor],
        img_logits: Callable[[torch.Tensor], torch.Tensor],
        img_token_ids: list[int],
        eos_token_ids: set[int],
        is_newline: Callable[[int], bool],
        cache_config=None,
        max_positions: int | None = None,
    ):
        self.lm_forward = lm_forward
        self.embed_ids = embed_ids
        self.img_logits = img_logits
        self.img_token_ids = list(img_token_ids)
        self.eos_token_ids = set(eos_token_ids)
        self.is_newline = is_newline
        self.cache_config = cache_config
        self.max_positions = max_positions

    # ------------------------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt_embeds: list[torch.Tensor],
        settings: DecodingSettings,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> list[DecodedSequence]:
        batch_size = len(prompt_embeds)
        device, dtype = prompt_embeds[0].device, prompt_embeds[0].dtype
        width = prompt_embeds[0].shape[-1]
        r = len(self.img_token_ids)

        # Left-pad the prompts so that every row's next position is the last column.
        length = max(e.shape[0] for e in prompt_embeds)
        embeds = torch.zeros(batch_size, length, width, device=device, dtype=dtype)
        mask = torch.zeros(batch_size, length, device=device, dtype=torch.long)
        for b, e in enumerate(prompt_embeds):
            embeds[b, length - e.shape[0] :] = e
            mask[b, length - e.shape[0] :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        next_position = mask.sum(-1)

        cache = DynamicCache(config=self.cache_config) if settings.use_cache else None
        history = (embeds, mask, positions)  # the whole sequence, for decoding without a cache
        logits, _ = self._forward(embeds, mask, positions, cache, history, 1)
        next_logits = logits[:, -1]

        rows = [DecodedSequence() for _ in range(batch_size)]
        for step in range(settings.max_new_tokens):
            room = self._room(next_position)
            for b, row in enumerate(rows):
                if room[b] < 1 and not row.finished:
                    row.finished = True  # the LM's context is full
            if all(row.finished for row in rows):
                break
            tokens = self._choose_tokens(next_logits, rows, settings, generator, room)
            chunks: list[list[int]] = [[] for _ in range(batch_size)]
            for b, token in enumerate(tokens):
                row = rows[b]
                if row.finished:
                    continue
                if token in self.eos_token_ids or (settings.stop_at_newline and self.is_newline(token)):
                    row.finished = True
                elif token == self.img_token_ids[0]:
                    row.img_starts.append(len(row.token_ids))
                    chunks[b] = list(self.img_token_ids)
                else:
                    row.num_text_tokens += 1
                    chunks[b] = [token]
                row.token_ids.extend(chunks[b])

            last_step = step == settings.max_new_tokens - 1
            if last_step:
                # Only `[IMG]` groups still need their hidden states; a last text token is never fed.
                chunks = [c if len(c) == r and c[0] == self.img_token_ids[0] else [] for c in chunks]
            if not any(chunks):
                if all(row.finished for row in rows) or last_step:
                    break
                continue

            chunk_width = max(len(c) for c in chunks)
            ids = torch.zeros(batch_size, chunk_width, dtype=torch.long, device=device)
            chunk_mask = torch.zeros(batch_size, chunk_width, dtype=torch.long, device=device)
            for b, c in enumerate(chunks):
                if c:
                    ids[b, : len(c)] = torch.tensor(c, device=device)
                    chunk_mask[b, : len(c)] = 1
            chunk_positions = next_position[:, None] + torch.arange(chunk_width, device=device)[None]
            # Padded slots are masked out, but LMs with learned position tables still look their positions up.
            chunk_positions = torch.where(chunk_mask.bool(), chunk_positions, torch.zeros_like(chunk_positions))
            chunk_embeds = self.embed_ids(ids).to(dtype) * chunk_mask[..., None].to(dtype)
            mask = torch.cat([mask, chunk_mask], dim=1)
            history = (
                torch.cat([history[0], chunk_embeds], dim=1),
                mask,
                torch.cat([history[2], chunk_positions], dim=1),
            )
            logits, hidden = self._forward(chunk_embeds, mask, chunk_positions, cache, history, chunk_width)
            next_position = next_position + chunk_mask.sum(-1)

            last_index = (chunk_mask.sum(-1) - 1).clamp(min=0)
            next_logits = logits[torch.arange(batch_size, device=device), last_index]
            for b, c in enumerate(chunks):
                rows[b].hidden_states.extend(hidden[b, : len(c)].unbind(0))
            if last_step or all(row.finished for row in rows):
                break
        return rows

    # ------------------------------------------------------------------------------------------------------
    def _forward(self, embeds, mask, positions, cache, history, keep):
        """One LM pass over the new chunk; without a cache the whole history is run (the reference's way)."""
        if cache is not None:
            logits, hidden = self.lm_forward(embeds, mask, positions, cache, keep)
        else:
            logits, hidden = self.lm_forward(history[0], history[1], history[2], None, keep)
        hidden = hidden[:, -embeds.shape[1] :]
        full = self._extend_with_img_logits(logits, hidden[:, -keep:])
        return full, hidden

    def _extend_with_img_logits(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """LM logits `(B, K, V_lm)` -> logits over the LM vocabulary plus the `[IMG]` ids."""
        vocab = max(logits.shape[-1], max(self.img_token_ids) + 1)
        full = logits.new_full((*logits.shape[:-1], vocab), float("-inf"))
        full[..., : logits.shape[-1]] = logits
        full[..., self.img_token_ids] = self.img_logits(hidden).to(full.dtype)
        return full.float()

    def _room(self, next_position: torch.Tensor) -> list[int]:
        """Positions left in each row's context."""
        if self.max_positions is None:
            return [1 << 30] * next_position.shape[0]
        return [self.max_positions - int(p) for p in next_position]

    def _choose_tokens(self, logits, rows, settings, generator, room) -> list[int]:
        logits = logits.clone()
        img0, rest = self.img_token_ids[0], self.img_token_ids[1:]
        logits[:, rest] = float("-inf")
        for b, row in enumerate(rows):
            allowed = (
                row.num_text_tokens >= settings.min_text_tokens
                and (settings.max_images is None or len(row.img_starts) < settings.max_images)
                and room[b] >= len(self.img_token_ids)
            )
            if not allowed:
                logits[b, img0] = float("-inf")
            elif settings.img_logit_scale > 1:
                logits[b, img0] = logits[b, img0].abs() * settings.img_logit_scale
        if not settings.do_sample:
            return logits.argmax(-1).tolist()

        logits = logits / settings.temperature
        if settings.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            remove = cumulative > settings.top_p
            remove[..., 1:] = remove[..., :-1].clone()  # keep the first token past the threshold
            remove[..., 0] = False
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(remove, float("-inf")))
        probs = logits.softmax(-1)
        # Only unfinished rows draw, so a row's generator advances exactly as it would for that input alone.
        active = [b for b, row in enumerate(rows) if not row.finished]
        chosen = [0] * len(rows)
        if isinstance(generator, list):
            for b in active:
                chosen[b] = int(torch.multinomial(probs[b].to(generator[b].device), 1, generator=generator[b]))
        elif active:
            sample_device = generator.device if generator is not None else probs.device
            drawn = torch.multinomial(probs[active].to(sample_device), 1, generator=generator)[:, 0].tolist()
            for b, token in zip(active, drawn):
                chosen[b] = token
        return chosen
