"""GILL's interleaved-input processor: text and images -> the LM's input embeddings.

Text is tokenised with the LM's tokenizer (`[IMG]` ids included); every image becomes `num_visual_tokens`
visual-prefix embeddings (CLIP vision features through `GILLModel.encode_visual_prefix`), placed where the image is.
The pipeline makes one per call (`GILLPipeline.processor`) over its current components.
"""

import hashlib
import re
from typing import Any

import PIL.Image
import torch

from ..constants import IMG_TOKEN_TEMPLATE
from ..models.lm_bridge import embed_tokens
from ..models.vision import image_pixel_values, pooled_image_features
from .inputs import to_rgb_pil


def lm_context_length(llm) -> int | None:
    """The LM's context length (positions), read from its config; None when it records none."""
    config = llm.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_img_token_ids(tokenizer, num_img_tokens: int, img_token_ids: list[int] | None = None) -> list[int]:
    """The ids of `[IMG0]`..`[IMG{r-1}]`: `img_token_ids`, else read from `tokenizer`; checked to be `r` distinct
    known ids."""
    read_from_tokenizer = img_token_ids is None
    if img_token_ids is None:
        img_token_ids = tokenizer.convert_tokens_to_ids([IMG_TOKEN_TEMPLATE.format(i=i) for i in range(num_img_tokens)])
    img_token_ids = [int(i) for i in img_token_ids]
    if len(img_token_ids) != num_img_tokens:
        raise ValueError(
            f"`img_token_ids` has {len(img_token_ids)} ids ({img_token_ids}) but `gill` was built for "
            f"{num_img_tokens} [IMG] tokens."
        )
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(set(img_token_ids)) != len(img_token_ids) or (unk is not None and unk in img_token_ids):
        names = [IMG_TOKEN_TEMPLATE.format(i=i) for i in range(num_img_tokens)]
        known = [name for name in names if name in tokenizer.get_vocab()] if hasattr(tokenizer, "get_vocab") else names
        if read_from_tokenizer and len(known) < num_img_tokens:
            # e.g. `GILLPipeline.from_pipe(sd_pipe)` without `tokenizer=`: SD's CLIP tokenizer is picked up.
            raise ValueError(
                f"`tokenizer` ({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '') or 'unnamed'}) "
                f"does not have GILL's [IMG] tokens ({', '.join(n for n in names if n not in known)} missing): it "
                f"maps them to the ids {img_token_ids}. Pass the LM's tokenizer with the [IMG] tokens, e.g. "
                "`GILLPipeline.from_pipe(sd_pipe, tokenizer=gill_pipe.tokenizer, llm=..., gill=...)`; "
                "`GILLPipeline.from_base_models` adds them to a new LM's tokenizer."
            )
        raise ValueError(f"`img_token_ids` must be distinct ids of the [IMG] tokens, got {img_token_ids}.")
    return img_token_ids


class GILLInterleavedProcessor:
    r"""
    Turns GILL's interleaved inputs (lists of text segments and images) into the LM's input embeddings.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): The LM's tokenizer, with the `[IMG]` tokens added.
        llm ([`~transformers.PreTrainedModel`]): The LM; only its input embeddings and config are read.
        gill ([`GILLModel`]): The learned `[IMG]` rows and visual prefix.
        img_token_ids (`list[int]`): Token ids of `[IMG0]`..`[IMG{r-1}]`.
        image_encoder, feature_extractor (*optional*): The vision encoder and its image processor; needed for image
            inputs.
    """

    def __init__(self, tokenizer, llm, gill, img_token_ids, image_encoder=None, feature_extractor=None):
        self.tokenizer = tokenizer
        self.llm = llm
        self.gill = gill
        self.img_token_ids = list(img_token_ids)
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor

    def embed_token_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (`[IMG]` ids included) -> LM input embeddings, on `ids.device`.

        `[IMG]` positions get the learned rows of `gill`, on the scale of the LM's own text embeddings; the LM's
        embedding matrix is only read (see `models.lm_bridge.embed_tokens`, shared with training).
        """
        return embed_tokens(self.llm, self.gill, self.img_token_ids, ids)

    @torch.no_grad()
    def encode_image_features(self, images: list[PIL.Image.Image], device: torch.device) -> torch.Tensor:
        """RGB PIL images -> the vision encoder's pooled features `(N, vision_dim)`."""
        if self.image_encoder is None or self.feature_extractor is None:
            raise ValueError(
                "The input contains images, but this pipeline has no `image_encoder`/`feature_extractor`."
            )
        pixel_values = image_pixel_values(self.feature_extractor, images)
        return pooled_image_features(self.image_encoder, pixel_values.to(device))

    def tokenize_interleaved(self, sample: list[Any], sample_name: str, add_bos: bool = True) -> list[tuple]:
        """One interleaved list -> its pieces in order: `("ids", [token ids])` for text and `("image", PIL)` for each
        image.

        Text is tokenised without adding special tokens (special tokens written in the text, as chat templates write
        them, are read as such). With `add_bos`, the LM's BOS token (if it has one) goes before the first text segment
        only (after the images when there is no text, as in GILL's captioning sequences); chat-template inputs pass
        `add_bos=False` because the template writes its own.
        """
        pieces, bos_added = [], not add_bos
        bos = self.tokenizer.bos_token_id
        for i, element in enumerate(sample):
            if isinstance(element, str):
                ids = self.tokenizer(element, add_special_tokens=False).input_ids
                if not bos_added and bos is not None:
                    ids = [bos] + ids
                bos_added = True
                if ids:
                    pieces.append(("ids", list(ids)))
            else:
                pieces.append(("image", to_rgb_pil(element, f"{sample_name}[{i}]")))
        if not bos_added and bos is not None:
            # Images only: end with BOS, as GILL's captioning sequences read [image prefix][BOS caption].
            pieces.append(("ids", [bos]))
        if not pieces:
            raise ValueError(
                f"`{sample_name}` has no tokens: its text is empty and this tokenizer has no BOS token. Give some text "
                "or an image."
            )
        return pieces

    def unknown_words(self, batch: list[list[Any]]) -> list[str]:
        """The words (as written, each once) of the text in `batch` that the tokenizer maps to its unknown token.

        A word is a run of non-space characters; with a fast tokenizer the unknown token's character span names it,
        otherwise each word is tokenised on its own.
        """
        unk = self.tokenizer.unk_token_id
        if unk is None:
            return []
        found = {}  # an ordered set: each word once, in the order met; linear in the length of the text
        for text in (element for sample in batch for element in sample if isinstance(element, str)):
            words = list(re.finditer(r"\S+", text))
            if getattr(self.tokenizer, "is_fast", False):
                encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                spans = [span for token, span in zip(encoding.input_ids, encoding.offset_mapping) if token == unk]
                hits = _words_overlapping(words, spans)
            else:
                hits = [w.group() for w in words if unk in self.tokenizer(w.group(), add_special_tokens=False).input_ids]
            found.update(dict.fromkeys(hits))
        return list(found)

    def check_length(self, pieces: list[tuple], sample_name: str) -> None:
        """Refuses, before anything is embedded or scanned, an input longer than the LM's context (text tokens plus
        `num_visual_tokens` per image)."""
        limit = lm_context_length(self.llm)
        if limit is None:
            return
        length = sum(len(v) if kind == "ids" else self.gill.config.num_visual_tokens for kind, v in pieces)
        if length >= limit:
            raise ValueError(
                f"`{sample_name}` is {length} LM positions long (text tokens plus "
                f"{self.gill.config.num_visual_tokens} per image), which leaves no room in the LM's context of "
                f"{limit} positions. Shorten the input."
            )

    def piece_keys(self, pieces: list[tuple]) -> list[tuple]:
        """One hashable key per LM position of `pieces` (a token id, or an image's content and prefix slot): two
        inputs share a cached prefix exactly as far as their keys agree (see `GILLPast`)."""
        keys = []
        for kind, value in pieces:
            if kind == "ids":
                keys.extend(("token", int(t)) for t in value)
            else:
                digest = hashlib.sha1(value.tobytes()).hexdigest()
                keys.extend(("image", value.size, digest, j) for j in range(self.gill.config.num_visual_tokens))
        return keys

    def embed_pieces(self, pieces: list[tuple], device: torch.device, sample_name: str) -> torch.Tensor:
        """Pieces from `tokenize_interleaved` -> LM input embeddings `(T, D)`; every image becomes
        `num_visual_tokens` visual-prefix embeddings."""
        self.check_length(pieces, sample_name)
        images = [value for kind, value in pieces if kind == "image"]
        visual = None
        if images:
            features = self.encode_image_features(images, device)
            visual = self.gill.encode_visual_prefix(features.to(device))
        dtype = self.llm.get_input_embeddings().weight.dtype
        embedded, image_index = [], 0
        for kind, value in pieces:
            if kind == "ids":
                embedded.append(self.embed_token_ids(torch.tensor(value, device=device)))
            else:
                embedded.append(visual[image_index].to(device=device, dtype=dtype))
                image_index += 1
        return torch.cat(embedded, dim=0).to(dtype)

    def encode_interleaved(
        self, sample: list[Any], device: torch.device, sample_name: str, add_bos: bool = True
    ) -> torch.Tensor:
        """One interleaved list of text and images -> LM input embeddings `(T, D)` (see `tokenize_interleaved`)."""
        return self.embed_pieces(self.tokenize_interleaved(sample, sample_name, add_bos), device, sample_name)


def _words_overlapping(words: list[re.Match], spans: list[tuple[int, int]]) -> list[str]:
    """The words that overlap a character span; both lists are in text order, so one sweep finds them."""
    hits, j = [], 0
    for word in words:
        while j < len(spans) and spans[j][1] <= word.start():
            j += 1
        if j < len(spans) and spans[j][0] < word.end():
            hits.append(word.group())
    return hits


class InterleavedInputsMixin:
    """The processor's methods on the pipeline (public API since round 1), each run by a processor over the
    pipeline's current components."""

    @property
    def processor(self) -> GILLInterleavedProcessor:
        """A [`GILLInterleavedProcessor`] over this pipeline's current tokenizer, LM, learned parts and vision
        encoder (made on each access: components may be replaced between calls)."""
        return GILLInterleavedProcessor(
            self.tokenizer, self.llm, self.gill, self.img_token_ids, self.image_encoder, self.feature_extractor
        )

    def embed_token_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """See [`GILLInterleavedProcessor.embed_token_ids`]."""
        return self.processor.embed_token_ids(ids)

    def encode_image_features(self, images: list[PIL.Image.Image], device: torch.device) -> torch.Tensor:
        """See [`GILLInterleavedProcessor.encode_image_features`]."""
        return self.processor.encode_image_features(images, device)

    def tokenize_interleaved(self, sample: list[Any], sample_name: str, add_bos: bool = True) -> list[tuple]:
        """See [`GILLInterleavedProcessor.tokenize_interleaved`]."""
        return self.processor.tokenize_interleaved(sample, sample_name, add_bos)

    def unknown_words(self, batch: list[list[Any]]) -> list[str]:
        """See [`GILLInterleavedProcessor.unknown_words`]."""
        return self.processor.unknown_words(batch)

    def piece_keys(self, pieces: list[tuple]) -> list[tuple]:
        """See [`GILLInterleavedProcessor.piece_keys`]."""
        return self.processor.piece_keys(pieces)

    def embed_pieces(self, pieces: list[tuple], device: torch.device, sample_name: str) -> torch.Tensor:
        """See [`GILLInterleavedProcessor.embed_pieces`]."""
        return self.processor.embed_pieces(pieces, device, sample_name)

    def encode_interleaved(
        self, sample: list[Any], device: torch.device, sample_name: str, add_bos: bool = True
    ) -> torch.Tensor:
        """See [`GILLInterleavedProcessor.encode_interleaved`]."""
        return self.processor.encode_interleaved(sample, device, sample_name, add_bos)

    def _lm_context_length(self) -> int | None:
        return lm_context_length(self.llm)
