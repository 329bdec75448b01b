"""The training forward: one batch -> GILL's four losses, with exactly two LM forwards.

1. Captioning: `[visual prefix of the image][BOS caption]`, cross-entropy on the caption.
2. `[IMG]` sequences: `[BOS caption [IMG0]..[IMG{r-1}]]`, ONE LM forward whose outputs serve three objectives:
   - `[IMG]` production: cross-entropy on the caption tokens and `[IMG0]` (later `[IMG]` tokens are appended
     automatically at inference, so they are not targets);
   - retrieval: InfoNCE between the `[IMG0]` hidden state (text side) and the image (image side);
   - generation: the mapper on the `r` `[IMG]` hidden states against SD's text encoding of the caption.
   The reference runs this LM pass twice over identical sequences (once in "retrieval", once in "generation" mode,
   each [IMG] loss at weight 0.5); `separate_img_passes=True` reproduces that for the benchmark.

With `concat_*` the batch's examples are joined in pairs into one sequence (the second without its BOS, when the
tokenizer has one: Qwen2-style tokenizers add none, and then no token is dropped), so the LM
learns to read several images/[IMG] groups in one context (the reference does this half of the time). Unlike the
reference, whose masking rule drops the whole second caption of a joined [IMG] sequence from the cross-entropy, the
second caption and its `[IMG0]` are targets here too.

A batch of interleaved documents (`training/interleaved.py`) goes through `interleaved_objectives` instead: the same
four losses at every image of a document, each image's `[IMG]` group reading all the text and images before it.
"""

import torch
from torch import nn

from gill_pipeline.models.lm_bridge import embed_tokens, lm_forward_with_img_logits
from gill_pipeline.models.vision import pooled_image_features

from .chat_format import ChatWrapping
from .losses import IGNORE_INDEX, contrastive_loss, generation_loss, next_token_loss
from .trainable import decoder_layers

PREFIX = -1  # placeholder id of a visual-prefix position while sequences are assembled


class GILLTrainingModel(nn.Module):
    """Frozen LM and vision encoder + the learned `GILLModel`; `forward(batch)` returns the losses.

    It is the module accelerate wraps (DDP); only `gill` (and a LoRA adapter inside `llm`) have trainable weights.
    """

    def __init__(
        self,
        llm,
        gill,
        image_encoder,
        img_token_ids: list[int],
        pad_token_id: int,
        bos_token_id: int | None,
        accelerator=None,
        chat: ChatWrapping | None = None,
        context_prefix_grad: bool = True,
        length_buckets: int = 1,
    ):
        super().__init__()
        # With a chat template (`training/chat_format.py`), caption pairs are user/assistant exchanges.
        self.chat = chat
        self.llm = llm
        self.gill = gill
        self.image_encoder = image_encoder
        self.register_buffer("img_token_ids", torch.tensor(img_token_ids, dtype=torch.long), persistent=False)
        self.pad_token_id = int(pad_token_id)
        # The collator starts each caption with BOS only when the tokenizer has one (`Collator.tokenize`).
        self.bos_token_id = None if bos_token_id is None else int(bos_token_id)
        self.accelerator = accelerator  # for gathering retrieval negatives across processes
        # False: the [IMG] rows of interleaved documents read the context images' prefixes detached, so only the
        # captioning loss trains the visual-prefix projection (`LossArgs.interleaved_context_prefix_grad`).
        self.context_prefix_grad = bool(context_prefix_grad)
        # Interleaved documents vary in length (a one-image story next to a five-turn chat): their rows are run
        # through the LM in this many groups of similar length, each padded only to its own longest row
        # (`run_lm_in_buckets`; same losses, less padding). 1: the whole batch in one forward.
        self.length_buckets = int(length_buckets)

    @property
    def _no_split_modules(self) -> list[str]:
        """The LM's decoder-layer classes: with FSDP (accelerate's transformer-based wrap reads this), each decoder
        layer is its own sharded unit; everything else, the learned parts included, forms the root unit."""
        return sorted({type(layer).__name__ for layer in decoder_layers(self.llm)})

    # ------------------------------------------------------------------------------------------------------------
    # Embeddings and the LM
    # ------------------------------------------------------------------------------------------------------------
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> LM input embeddings, `[IMG]` positions from `gill` (the library's `embed_tokens`)."""
        return embed_tokens(self.llm, self.gill, self.img_token_ids.tolist(), ids)

    def run_lm(self, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> logits over the LM vocabulary extended with the `[IMG]` ids, and last-layer hidden states.

        The `[IMG]` columns are computed as at inference (`lm_forward_with_img_logits`), the LM's own logit
        post-processing included.
        """
        dtype = self.llm.get_input_embeddings().weight.dtype
        # No KV cache: training never decodes, and a cache filled again by a checkpointed layer's recomputation would
        # corrupt it (see `trainable.enable_gradient_checkpointing`).
        logits, hidden, _ = lm_forward_with_img_logits(
            self.llm, self.gill, self.img_token_ids.tolist(), embeds.to(dtype), attention_mask=mask, use_cache=False
        )
        return logits, hidden

    def run_lm_in_buckets(self, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`run_lm` over right-padded rows (`_pad`'s layout), sorted by length and split into `length_buckets`
        groups, each cut to its own longest row; outputs are padded back with zeros and returned in the rows' order.

        Each row sees exactly its own tokens either way (causal attention, right padding), so losses and gradients
        are those of one forward over the whole batch, up to float rounding; what changes is the compute spent on
        padding (2.65x the real tokens for the shapes world's mix of short documents and five-turn chats).
        """
        groups = min(self.length_buckets, embeds.shape[0])
        if groups <= 1:
            return self.run_lm(embeds, mask)
        lengths = mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        total = embeds.shape[1]
        logits, hidden = [], []
        for rows in torch.chunk(order, groups):
            length = max(1, int(lengths[rows].max()))
            group_logits, group_hidden = self.run_lm(embeds[rows, :length], mask[rows, :length])
            logits.append(nn.functional.pad(group_logits, (0, 0, 0, total - length)))
            hidden.append(nn.functional.pad(group_hidden, (0, 0, 0, total - length)))
        inverse = torch.argsort(order)
        return torch.cat(logits)[inverse], torch.cat(hidden)[inverse]

    @torch.no_grad()
    def image_features(self, batch: dict) -> torch.Tensor:
        if "image_features" in batch:
            return batch["image_features"]
        if "pixel_values" not in batch:  # the loops skip empty batches (`empty_on_any_process`) before this
            raise RuntimeError(
                f"Every example of this batch was skipped as unreadable ({int(batch['num_skipped'])} images): check "
                "`image_folder` (image paths in a TSV are relative to it) and the data files."
            )
        return pooled_image_features(self.image_encoder, batch["pixel_values"]).float()

    # ------------------------------------------------------------------------------------------------------------
    # Sequences
    # ------------------------------------------------------------------------------------------------------------
    def _groups(self, n: int, concat: bool) -> list[list[int]]:
        if not concat:
            return [[i] for i in range(n)]
        groups = [[i, i + 1] for i in range(0, n - 1, 2)]
        return groups + ([[n - 1]] if n % 2 else [])

    def _continuation(self, caption: list[int]) -> list[int]:
        """A caption joined after another one: without its BOS, if it starts with one (never a word of it)."""
        if self.bos_token_id is not None and caption and caption[0] == self.bos_token_id:
            return caption[1:]
        return caption

    def _without_bos(self, caption: list[int]) -> list[int]:
        """A caption inside a chat turn: the template writes the BOS, so the collator's is dropped."""
        return self._continuation(caption)

    def _pad(self, rows: list[list[int]], labels: list[list[int]], device):
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        lab = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, (r, l) in enumerate(zip(rows, labels)):
            ids[b, : len(r)], lab[b, : len(l)], mask[b, : len(r)] = torch.tensor(r), torch.tensor(l), 1
        return ids.to(device), lab.to(device), mask.to(device)

    def caption_sequences(self, captions: list[list[int]], prefix: torch.Tensor, concat: bool):
        """`[prefix_i][BOS cap_i]([prefix_j][cap_j])` rows -> embeddings, labels, mask."""
        k = prefix.shape[1]
        rows, labels, slots = [], [], []
        for group in self._groups(len(captions), concat):
            row, label, slot = [], [], []
            for position, i in enumerate(group):
                if self.chat is not None:  # [before][prefix][between][caption][end of turn]: the answer is the target
                    caption = self._without_bos(captions[i])
                    before = self.chat.caption_before if position == 0 else self.chat.continuation(self.chat.caption_before)
                    between, after = self.chat.caption_between, self.chat.caption_after
                    row += before + [PREFIX] * k + between + caption + after
                    label += [IGNORE_INDEX] * (len(before) + k + len(between)) + caption + after
                    slot += [None] * len(before) + [(i, j) for j in range(k)]
                    slot += [None] * (len(between) + len(caption) + len(after))
                    continue
                caption = captions[i] if position == 0 else self._continuation(captions[i])
                row += [PREFIX] * k + caption
                label += [IGNORE_INDEX] * k + caption
                slot += [(i, j) for j in range(k)] + [None] * len(caption)
            rows.append(row), labels.append(label), slots.append(slot)
        ids, labels, mask = self._pad(rows, labels, prefix.device)
        embeds = self.embed_tokens(ids)
        image_index = torch.tensor([[s[0] if s else 0 for s in slot] + [0] * (ids.shape[1] - len(slot)) for slot in slots])
        token_index = torch.tensor([[s[1] if s else 0 for s in slot] + [0] * (ids.shape[1] - len(slot)) for slot in slots])
        prefix_embeds = prefix[image_index.to(prefix.device), token_index.to(prefix.device)].to(embeds.dtype)
        embeds = torch.where((ids == PREFIX)[..., None], prefix_embeds, embeds)
        return embeds, labels, mask

    def img_sequences(self, captions: list[list[int]], concat: bool):
        """`[BOS cap_i IMG0..](cap_j IMG0..)` rows -> ids, labels, mask, and each example's (row, IMG0 position)."""
        img = self.img_token_ids.tolist()
        rows, labels, where = [], [], {}
        for b, group in enumerate(self._groups(len(captions), concat)):
            row, label = [], []
            for position, i in enumerate(group):
                if self.chat is not None:  # [request][caption IMG0..IMG{r-1}][end of turn]: the answer is the target
                    caption = self._without_bos(captions[i])
                    before = self.chat.img_before if position == 0 else self.chat.continuation(self.chat.img_before)
                    where[i] = (b, len(row) + len(before) + len(caption))
                    row += before + caption + img + self.chat.img_after
                    label += [IGNORE_INDEX] * len(before) + caption + img[:1] + [IGNORE_INDEX] * (len(img) - 1)
                    label += self.chat.img_after
                    continue
                caption = captions[i] if position == 0 else self._continuation(captions[i])
                where[i] = (b, len(row) + len(caption))
                row += caption + img
                label += caption + img[:1] + [IGNORE_INDEX] * (len(img) - 1)
            rows.append(row), labels.append(label)
        device = self.img_token_ids.device
        ids, labels, mask = self._pad(rows, labels, device)
        order = sorted(where)
        locations = torch.tensor([where[i] for i in order], device=device)
        return ids, labels, mask, locations

    # ------------------------------------------------------------------------------------------------------------
    # Objectives
    # ------------------------------------------------------------------------------------------------------------
    def captioning(self, captions, features, concat):
        prefix = self.gill.encode_visual_prefix(features)
        embeds, labels, mask = self.caption_sequences(captions, prefix, concat)
        logits, _ = self.run_lm(embeds, mask)
        return next_token_loss(logits, labels)

    def img_objectives(self, captions, features, targets, concat):
        """ONE LM forward over the [IMG] sequences -> [IMG]-production CE, retrieval and generation losses."""
        ids, labels, mask, locations = self.img_sequences(captions, concat)
        logits, hidden = self.run_lm(self.embed_tokens(ids), mask)
        ce, correct, count = next_token_loss(logits, labels)
        r = self.img_token_ids.numel()
        positions = locations[:, 1:2] + torch.arange(r, device=ids.device)
        img_hidden = hidden[locations[:, :1], positions]  # (N, r, D): where [IMG0..r-1] are the inputs
        text = self.gill.text_retrieval_embeds(img_hidden[:, 0])
        image = self.gill.image_retrieval_embeds(features)
        ret, ret_logits = contrastive_loss(text, image, self.gill.logit_scale, self.accelerator)
        out = {"img_token": ce, "img_token_correct": correct, "img_token_count": count, "retrieval": ret}
        out["retrieval_logits"], out["text_embeds"], out["image_embeds"] = ret_logits.detach(), text.detach(), image.detach()
        if targets is not None:
            out["generation"] = generation_loss(self.gill, img_hidden, targets)
        return out

    # ------------------------------------------------------------------------------------------------------------
    # Interleaved documents (training/interleaved.py)
    # ------------------------------------------------------------------------------------------------------------
    def _embed_rows(self, rows, labels, slots, prefix):
        """Rows of token ids with `PREFIX` placeholders -> embeddings (placeholders filled from `prefix[image, j]`
        as named by `slots`), labels, mask."""
        ids, labels, mask = self._pad(rows, labels, prefix.device)
        embeds = self.embed_tokens(ids.clamp(min=0))
        length = ids.shape[1]
        image_index = torch.tensor([[s[0] if s else 0 for s in slot] + [0] * (length - len(slot)) for slot in slots])
        token_index = torch.tensor([[s[1] if s else 0 for s in slot] + [0] * (length - len(slot)) for slot in slots])
        prefix_embeds = prefix[image_index.to(prefix.device), token_index.to(prefix.device)].to(embeds.dtype)
        return torch.where((ids == PREFIX)[..., None], prefix_embeds, embeds), labels, mask

    def interleaved_img_rows(self, documents):
        """Each document as the pipeline reads it: BOS before the first text, text tokens, and for every image its
        `[IMG]` tokens (target images) then its visual prefix. -> rows, labels, slots, and per target image (in
        order) its (row, `[IMG0]` position)."""
        img = self.img_token_ids.tolist()
        k = self.gill.config.num_visual_tokens
        rows, labels, slots, where = [], [], [], []
        for b, document in enumerate(documents):
            row, label, slot, bos_added = [], [], [], self.bos_token_id is None
            for piece in document:
                if piece[0] == "text":
                    ids = list(piece[1]) if bos_added else [self.bos_token_id] + list(piece[1])
                    bos_added = True
                    row, label, slot = row + ids, label + ids, slot + [None] * len(ids)
                    continue
                _, image, is_target, _ = piece
                if is_target:
                    where.append((b, len(row)))
                    row, slot = row + img, slot + [None] * len(img)
                    label = label + img[:1] + [IGNORE_INDEX] * (len(img) - 1)
                row, label = row + [PREFIX] * k, label + [IGNORE_INDEX] * k
                slot = slot + [(image, j) for j in range(k)]
            rows.append(row), labels.append(label), slots.append(slot)
        return rows, labels, slots, where

    def interleaved_caption_rows(self, documents):
        """Each document's images in order as `[prefix_1][BOS caption_1][prefix_2][caption_2]...`; captions are the
        targets, earlier images and captions the context."""
        k = self.gill.config.num_visual_tokens
        bos = [] if self.bos_token_id is None else [self.bos_token_id]
        rows, labels, slots = [], [], []
        for document in documents:
            row, label, slot = [], [], []
            for piece in document:
                if piece[0] != "image":
                    continue
                caption = list(piece[3]) if row else bos + list(piece[3])
                row = row + [PREFIX] * k + caption
                label = label + [IGNORE_INDEX] * k + caption
                slot = slot + [(piece[1], j) for j in range(k)] + [None] * len(caption)
            rows.append(row), labels.append(label), slots.append(slot)
        return rows, labels, slots

    def interleaved_objectives(self, batch: dict) -> dict:
        """GILL's four losses at every image of interleaved documents, two LM forwards for the whole batch.

        The `[IMG]` row gives the text/`[IMG0]` cross-entropy (`img_token`), and for target image i the hidden states
        of its `[IMG]` group -- which see everything before it -- give retrieval (against image i) and generation
        (against the SD encoding of caption i); the captioning row gives `caption`.
        """
        documents = batch["documents"]
        features = self.image_features(batch)
        prefix = self.gill.encode_visual_prefix(features)
        embeds, labels, mask = self._embed_rows(*self.interleaved_caption_rows(documents), prefix)
        logits, _ = self.run_lm_in_buckets(embeds, mask)
        cap, cap_correct, cap_count = next_token_loss(logits, labels)
        out = {"caption": cap, "caption_correct": cap_correct, "caption_count": cap_count}

        rows, labels, slots, where = self.interleaved_img_rows(documents)
        context_prefix = prefix if self.context_prefix_grad else prefix.detach()
        embeds, labels, mask = self._embed_rows(rows, labels, slots, context_prefix)
        logits, hidden = self.run_lm_in_buckets(embeds, mask)
        ce, correct, count = next_token_loss(logits, labels)
        r = self.img_token_ids.numel()
        locations = torch.tensor(where, device=hidden.device)
        positions = locations[:, 1:2] + torch.arange(r, device=hidden.device)
        img_hidden = hidden[locations[:, :1], positions]  # (targets, r, D)
        target_images = [p[1] for d in documents for p in d if p[0] == "image" and p[2]]
        text = self.gill.text_retrieval_embeds(img_hidden[:, 0])
        image = self.gill.image_retrieval_embeds(features[torch.tensor(target_images, device=features.device)])
        ret, ret_logits = contrastive_loss(text, image, self.gill.logit_scale, self.accelerator)
        out.update({"img_token": ce, "img_token_correct": correct, "img_token_count": count, "retrieval": ret})
        out.update(retrieval_logits=ret_logits.detach(), text_embeds=text.detach(), image_embeds=image.detach())
        out["img_hidden"] = img_hidden
        targets = batch.get("targets")
        if targets is not None:
            out["generation"] = generation_loss(self.gill, img_hidden, targets)
        return out

    def forward(self, batch: dict, concat_caption: bool = False, concat_img: bool = False, separate_img_passes: bool = False):
        if "documents" in batch:  # interleaved documents: every image position in its context
            return self.interleaved_objectives(batch)
        lengths = batch["caption_lengths"].tolist()
        captions = [row[:n] for row, n in zip(batch["caption_ids"].tolist(), lengths)]
        features = self.image_features(batch)
        targets = batch.get("targets")
        cap, cap_correct, cap_count = self.captioning(captions, features, concat_caption)
        out = {"caption": cap, "caption_correct": cap_correct, "caption_count": cap_count}
        if not separate_img_passes:
            out.update(self.img_objectives(captions, features, targets, concat_img))
            return out
        # The reference: a "retrieval" pass and a "generation" pass over the same sequences, [IMG] CE at 0.5 each.
        first = self.img_objectives(captions, features, None, concat_img)
        second = self.img_objectives(captions, features, targets, concat_img)
        out.update(first)
        out["img_token"] = 0.5 * first["img_token"] + 0.5 * second["img_token"]
        if "generation" in second:
            out["generation"] = second["generation"]
        return out


def empty_on_any_process(batch: dict, accelerator) -> bool:
    """Whether some process got a batch with no readable example (every image missing or unreadable).

    All processes must then skip the micro-step together: the forward gathers retrieval negatives (a collective),
    and DDP expects every process in every backward.
    """
    empty = torch.tensor(int(len(batch["keys"]) == 0), device=accelerator.device)
    return bool(accelerator.reduce(empty, reduction="max"))


def total_loss(out: dict, loss_args, interleaved: bool = False) -> torch.Tensor:
    """The weighted sum of GILL's losses; on interleaved-document batches the retrieval weight is multiplied by
    `interleaved_retrieval_weight`."""
    retrieval_weight = loss_args.retrieval_weight * (loss_args.interleaved_retrieval_weight if interleaved else 1.0)
    loss = loss_args.caption_weight * out["caption"] + loss_args.img_token_weight * out["img_token"]
    loss = loss + retrieval_weight * out["retrieval"]
    if "generation" in out:
        loss = loss + loss_args.generation_weight * out["generation"]
    return loss
