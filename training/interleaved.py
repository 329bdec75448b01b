"""Interleaved documents for training: text segments and images in order, each image with its caption.

The format (`docs/training.md`, "Interleaved documents") is JSONL, one document per line:

    {"id": "story-7", "segments": [
        {"text": "We went to the beach."},
        {"image": "images/7-1.jpg", "caption": "a wide sandy beach under a blue sky"},
        {"text": "Then it started to rain."},
        {"image": "images/7-2.jpg", "caption": "dark clouds over the sea", "target": true}]}

- `id` (optional, unique in the file): the document's key; without it the key is `line<N>`. The key of the image at
  segment `i` is `<id>/<i>`: precomputed targets (`precompute.py --data-type interleaved`) are stored under it.
- `text`: a text segment, tokenised on its own as the pipeline tokenises each string of an interleaved input.
- `image`: a path relative to the JSONL file's folder (or to `interleaved_image_folder`); `caption` is the text its
  generation target is made from (required unless `"target": false`). `target` (default true): whether GILL learns to
  produce this image (`[IMG]` tokens before it, generation and retrieval losses); `false` makes it context only (an
  input image given to the model).

Two LM rows are built per document (`GILLTrainingModel.interleaved_objectives`):
- the `[IMG]` row reads the document as the pipeline would: BOS before the first text segment, text tokens, and for
  every image its `[IMG0..r-1]` tokens (target images only) followed by its visual prefix, so image k's `[IMG]`
  hidden states see every earlier text segment and image;
- the captioning row reads the images in order, each as `[visual prefix][caption]` (earlier images and captions are
  context); the prose is left out so that no caption is ever in the context of its own image.

A line that is not a valid document is skipped and counted as a malformed row; a document whose image is missing or
unreadable is skipped and counted as a skipped image, as in the image-caption readers (`training/data.py`; both share `training/records.py`).
"""

import json
import logging
import os

import torch
from torch.utils.data import Dataset

from .records import SKIP_IMAGE, SKIP_ROW, RowProblems, decoded_lines, skipped_example, unique_records

logger = logging.getLogger(__name__)

SEGMENTS_KEY = "segments"
TEXT_KEY = "text"
IMAGE_KEY = "image"
CAPTION_KEY = "caption"
TARGET_KEY = "target"
ID_KEY = "id"


def image_key(document_key: str, segment_index: int) -> str:
    """The key of a document's image: its precomputed target and image features are stored under it."""
    return f"{document_key}/{segment_index}"


def check_document(item) -> str | None:
    """The problem with a parsed JSONL line, in words, or None when it is a valid document."""
    if not isinstance(item, dict):
        return f"expected a JSON object, got {type(item).__name__}"
    if ID_KEY in item and not (isinstance(item[ID_KEY], str) and item[ID_KEY]):
        return f"`{ID_KEY}` must be a non-empty string, got {item[ID_KEY]!r}"
    segments = item.get(SEGMENTS_KEY)
    if not isinstance(segments, list) or not segments:
        return f"needs `{SEGMENTS_KEY}`, a non-empty list, got {type(segments).__name__}"
    images = 0
    for i, segment in enumerate(segments):
        if not isinstance(segment, dict) or (TEXT_KEY in segment) == (IMAGE_KEY in segment):
            return f"segment {i} must be an object with either `{TEXT_KEY}` or `{IMAGE_KEY}`, got {segment!r}"
        if TEXT_KEY in segment:
            if not isinstance(segment[TEXT_KEY], str) or not segment[TEXT_KEY].strip():
                return f"segment {i}: `{TEXT_KEY}` must be a non-empty string, got {segment[TEXT_KEY]!r}"
            continue
        images += 1
        if not isinstance(segment[IMAGE_KEY], str) or not segment[IMAGE_KEY]:
            return f"segment {i}: `{IMAGE_KEY}` must be a path, got {segment[IMAGE_KEY]!r}"
        if not isinstance(segment.get(TARGET_KEY, True), bool):
            return f"segment {i}: `{TARGET_KEY}` must be true or false, got {segment[TARGET_KEY]!r}"
        caption = segment.get(CAPTION_KEY)
        if caption is not None and not isinstance(caption, str):
            return f"segment {i}: `{CAPTION_KEY}` must be a string, got {caption!r}"
        if segment.get(TARGET_KEY, True) and not (caption or "").strip():
            return f"segment {i}: a target image needs a non-empty `{CAPTION_KEY}` (its generation target)"
    if not images:
        return "the document has no image"
    if not any(s.get(TARGET_KEY, True) for s in segments if IMAGE_KEY in s):
        return f"the document has no target image (every image has `{TARGET_KEY}`: false)"
    return None


def read_documents(path: str, problems: RowProblems | None = None) -> list[tuple[str, list[dict]]]:
    """(key, segments) of every valid document of a JSONL file, in order; malformed lines go to `problems`.

    Image paths are kept as written (relative); [`InterleavedDataset`] resolves them.
    """
    problems = RowProblems() if problems is None else problems
    documents = []
    for line_number, text, problem in decoded_lines(path):
        if problem is None and not text.strip():
            continue
        item = None
        if problem is None:
            try:
                item = json.loads(text)
            except json.JSONDecodeError as error:
                problem = f"not valid JSON ({error.msg} at column {error.colno})"
        if problem is None:
            problem = check_document(item)
        if problem is not None:
            problems.add(path, line_number, problem)
            continue
        documents.append((item.get(ID_KEY) or f"line{line_number}", item[SEGMENTS_KEY]))
    return list(unique_records(documents, repr(path)))


def write_documents(path: str, documents) -> int:
    """Writes `documents` (dicts with `segments`, optionally `id`) as JSONL, each checked first; returns the count."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for index, document in enumerate(documents):
            problem = check_document(document)
            if problem is not None:
                raise ValueError(f"Document {index} ({document.get(ID_KEY, 'no id')!r}) is not valid: {problem}.")
            f.write(json.dumps(document, ensure_ascii=False) + "\n")
            count += 1
    return count


def image_records(path: str, image_folder: str | None = None, problems: RowProblems | None = None):
    """(image key, caption, image path) of every image of every document (used by precompute.py): targets and image
    features are made per image. A context-only image without a caption gets the empty caption."""
    folder = image_folder or os.path.dirname(os.path.abspath(path))
    for key, segments in read_documents(path, problems):
        for i, segment in enumerate(segments):
            if IMAGE_KEY in segment:
                caption = (segment.get(CAPTION_KEY) or "").strip()
                yield image_key(key, i), caption, os.path.join(folder, segment[IMAGE_KEY])


class InterleavedDataset(Dataset):
    """Map-style data set of interleaved documents; an item holds every image read by an `ExampleReader`.

    Item: `{"key", "segments": [("text", str) | ("image", example)], "skipped"}` where an image `example` is the
    reader's output (pixel values or stored features, and the stored target) plus `target` (bool) and its caption.
    """

    def __init__(self, path: str, reader, image_folder: str | None = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Interleaved data set {path!r} does not exist.")
        problems = RowProblems()
        self.documents = read_documents(path, problems)
        if not self.documents:
            raise ValueError(f"Interleaved data set {path!r} has no valid document ({len(problems)} malformed rows).")
        if problems:
            logger.warning("Interleaved data set %r: %d malformed rows skipped, %d documents kept.", path,
                           len(problems), len(self.documents))
        self.malformed_rows = len(problems)
        self.folder = image_folder or os.path.dirname(os.path.abspath(path))
        self.reader = reader

    def __len__(self):
        return len(self.documents)

    def __getitem__(self, index):
        key, segments = self.documents[index]
        items = []
        for i, segment in enumerate(segments):
            if TEXT_KEY in segment:
                items.append(("text", segment[TEXT_KEY]))
                continue
            caption = (segment.get(CAPTION_KEY) or "").strip()
            example = self.reader(image_key(key, i), caption, os.path.join(self.folder, segment[IMAGE_KEY]))
            if example["skipped"]:  # one unreadable image makes the whole document's context wrong
                return skipped_example(key, SKIP_IMAGE, f"document {key!r}: {example['skip_reason']}")
            items.append(("image", {**example, "is_target": bool(segment.get(TARGET_KEY, True))}))
        return {"key": key, "segments": items, "skipped": False}


class InterleavedCollator:
    """Documents -> a batch for `GILLTrainingModel.interleaved_objectives`.

    Batch: `documents` (per document, a list of `("text", ids)` and `("image", index into the batch's images,
    is_target, caption ids)`), the images' `pixel_values` or `image_features` stacked, and for target images in order
    their `captions` (SD's targets are made from them on the fly) or stored `targets`. A document longer than
    `max_length` LM tokens is cut at the last segment that fits whole; if no target image is left it is skipped.
    """

    def __init__(
        self, tokenizer, num_img_tokens: int, num_visual_tokens: int, max_length: int, max_caption_tokens: int
    ):
        self.tokenizer = tokenizer
        self.r, self.k = num_img_tokens, num_visual_tokens
        self.max_length, self.max_caption_tokens = max_length, max_caption_tokens
        self.bos = tokenizer.bos_token_id

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def row_length(self, pieces) -> int:
        """LM length of the longer of the document's two rows (`[IMG]` row, captioning row)."""
        img_row = int(self.bos is not None)
        caption_row = int(self.bos is not None)
        for piece in pieces:
            if piece[0] == "text":
                img_row += len(piece[1])
            else:
                img_row += self.k + (self.r if piece[2] else 0)
                caption_row += self.k + len(piece[3])
        return max(img_row, caption_row)

    def document(self, example: dict):
        """-> pieces `("text", ids)` / `("image", example, is_target, caption ids)`, cut to `max_length`."""
        pieces = []
        for kind, value in example["segments"]:
            if kind == "text":
                piece = ("text", self.ids(value))
            else:
                piece = ("image", value, value["is_target"], self.ids(value["caption"])[: self.max_caption_tokens])
            if self.row_length(pieces + [piece]) > self.max_length:
                break
            pieces.append(piece)
        if not any(p[0] == "image" and p[2] for p in pieces):
            return None
        return pieces

    def __call__(self, examples: list[dict]) -> dict:
        skipped = [
            (e["key"], e.get("skip_kind", SKIP_IMAGE), e.get("skip_reason", "")) for e in examples if e["skipped"]
        ]
        documents, keys, images, captions, targets = [], [], [], [], []
        for example in examples:
            if example["skipped"]:
                continue
            pieces = self.document(example)
            if pieces is None:
                reason = f"document {example['key']!r}: no target image within `max_length`={self.max_length} tokens"
                skipped.append((example["key"], SKIP_ROW, reason))
                continue
            keys.append(example["key"])
            document = []
            for piece in pieces:
                if piece[0] == "text":
                    document.append(piece)
                    continue
                _, image, is_target, caption_ids = piece
                document.append(("image", len(images), is_target, caption_ids))
                images.append(image)
                if is_target:
                    captions.append(image["caption"])
                    if "target" in image:
                        targets.append(image["target"])
            documents.append(document)
        batch = {
            "documents": documents, "keys": keys, "captions": captions, "skipped_examples": skipped,
            "num_skipped": torch.tensor(len(skipped)),
        }
        if images and "image_features" in images[0]:
            batch["image_features"] = torch.stack([image["image_features"] for image in images])
        elif images:
            batch["pixel_values"] = torch.stack([image["pixel_values"] for image in images])
        if captions and len(targets) == len(captions):
            batch["targets"] = torch.stack(targets)
        return batch
