"""Image-caption data for training: CC3M-style TSV files, plain image folders, webdataset shards, synthetic images.

Every source yields examples `{"key", "caption", "image" | "image_features", "target"?}`; a missing or unreadable
image becomes a *skipped* example that the collator drops and counts (the loop logs the count), never a crash.

Data order is explicit so that a resumed run sees exactly the batches it would have seen: map-style sets are read
through [`EpochBatchSampler`] (a seeded permutation per epoch, split across processes, started at any batch);
webdataset shards are streamed in a fixed order and a resumed run skips the batches already consumed.

Interleaved documents (text and images in order) have their own reader, `training/interleaved.py`; here only their
per-image records for precompute.py (`iterate_records(..., "interleaved", ...)`). What every reader shares (decoded
lines, keys, malformed rows, skipped examples) lives below both, in `training/records.py`.
"""

import collections
import glob
import io
import json
import logging
import os
import random

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from gill_pipeline.pipeline.inputs import to_rgb_pil

from training.interleaved import image_records
from training.records import (
    SKIP_IMAGE,
    SKIP_ROW,
    RowProblems,
    decode_text,
    decoded_lines,
    record_key,
    skipped_example,
    unique_records,
)
from training.targets import stack_targets

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
CAPTIONS_JSONL = "captions.jsonl"
TSV_CAPTION_COLUMN = "caption"
TSV_IMAGE_COLUMN = "image"
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
WDS_CAPTION_KEYS = ("txt", "caption")

# Shapes and colours of the synthetic set: captions that are predictable from the image, so every loss can fall.
SYNTHETIC_COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}
SYNTHETIC_SHAPES = ("square", "circle", "stripe")


# ----------------------------------------------------------------------------------------------------------------
# Records: (key, caption, image path) read from the index of a data set
# ----------------------------------------------------------------------------------------------------------------
def read_tsv(
    path: str, image_folder: str | None = None, problems: RowProblems | None = None
) -> list[tuple[str, str, str]]:
    """A CC3M-style TSV with a `caption<TAB>image` header; image paths are relative to `image_folder`.

    Malformed rows (not UTF-8, too few columns, an empty caption or image) are skipped and added to `problems`.
    """
    image_folder = image_folder or os.path.dirname(os.path.abspath(path))
    problems = RowProblems() if problems is None else problems
    lines = decoded_lines(path)
    _, header_text, header_problem = next(lines, (1, "", None))
    header = (header_text or "").split("\t")
    if header_problem is not None or TSV_CAPTION_COLUMN not in header or TSV_IMAGE_COLUMN not in header:
        raise ValueError(
            f"TSV file {path!r} must have a header with `{TSV_CAPTION_COLUMN}` and `{TSV_IMAGE_COLUMN}` columns, "
            f"got {header_problem or header}."
        )
    c, i = header.index(TSV_CAPTION_COLUMN), header.index(TSV_IMAGE_COLUMN)
    records = []
    for line_number, text, problem in lines:
        if problem is None:
            parts = text.split("\t")
            if len(parts) <= max(c, i) or not parts[c].strip() or not parts[i].strip():
                problem = f"expected a caption and an image, got {text!r}"
        if problem is not None:
            problems.add(path, line_number, problem)
            continue
        records.append((record_key(parts[i], line_number), parts[c].strip(), os.path.join(image_folder, parts[i])))
    return records


def _jsonl_record(text: str) -> tuple[dict | None, str | None]:
    try:
        item = json.loads(text)
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg} at column {error.colno})"
    if not isinstance(item, dict):
        return None, f"expected a JSON object, got {type(item).__name__}"
    if not isinstance(item.get("image"), str) or not item["image"] or "caption" not in item:
        return None, f"needs `image` (a path) and `caption`, got keys {sorted(item)}"
    if not str(item["caption"]).strip():
        return None, "the caption is empty"
    return item, None


def read_folder(folder: str, problems: RowProblems | None = None) -> list[tuple[str, str, str]]:
    """A folder of images with captions: `captions.jsonl` lines `{"image": "a.jpg", "caption": "..."}`, or else one
    sidecar `a.txt` per image `a.jpg` (searched recursively). Malformed rows or caption files are skipped and added to
    `problems`."""
    index = os.path.join(folder, CAPTIONS_JSONL)
    problems = RowProblems() if problems is None else problems
    records = []
    if os.path.isfile(index):
        for line_number, text, problem in decoded_lines(index):
            if problem is None and not text.strip():
                continue
            item, problem = (None, problem) if problem is not None else _jsonl_record(text)
            if problem is not None:
                problems.add(index, line_number, problem)
                continue
            key = record_key(item["image"], line_number)
            records.append((key, str(item["caption"]).strip(), os.path.join(folder, item["image"])))
        return records
    found_images = False
    for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if path.lower().endswith(IMAGE_EXTENSIONS):
            found_images = True
            sidecar = os.path.splitext(path)[0] + ".txt"
            if os.path.isfile(sidecar):
                with open(sidecar, "rb") as f:
                    caption, problem = decode_text(f.read())
                if problem is None and not caption.strip():
                    problem = "line 1: the caption is empty"
                if problem is not None:
                    problems.add(sidecar, None, problem)
                    continue
                records.append((os.path.relpath(path, folder), caption.strip(), path))
    if not records and not (found_images and problems):
        raise ValueError(
            f"Image folder {folder!r} has neither {CAPTIONS_JSONL} nor images with sidecar .txt captions."
        )
    return records


def resolve_image_path(path: str) -> str:
    """CC3M TSVs often name images without an extension: try the path, then the usual extensions."""
    if os.path.isfile(path):
        return path
    for extension in IMAGE_EXTENSIONS:
        if os.path.isfile(path + extension):
            return path + extension
    return path


def load_rgb(source) -> PIL.Image.Image | None:
    """A path or bytes -> an RGB PIL image, or None when missing or unreadable."""
    try:
        if isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
        with PIL.Image.open(source) as image:
            image.load()
            return rgb_or_none(image)
    except (OSError, ValueError, PIL.Image.DecompressionBombError):
        return None


def rgb_or_none(image: PIL.Image.Image) -> PIL.Image.Image | None:
    """The pipeline's own RGB conversion (transparent pixels on white, 16-bit scaled), so training sees images as
    inference does; None for an image inference would refuse (too small, or a mode with no RGB meaning)."""
    try:
        return to_rgb_pil(image)
    except (TypeError, ValueError):
        return None


def synthetic_example(index: int, size: int, seed: int = 0) -> tuple[str, PIL.Image.Image]:
    rng = random.Random(seed * 1_000_003 + index)
    color = rng.choice(sorted(SYNTHETIC_COLORS))
    background = rng.choice([c for c in sorted(SYNTHETIC_COLORS) if c != color])
    shape = rng.choice(SYNTHETIC_SHAPES)
    array = np.zeros((size, size, 3), dtype=np.uint8)
    array[:] = SYNTHETIC_COLORS[background]
    yy, xx = np.mgrid[:size, :size]
    centre = size / 2
    if shape == "square":
        mask = (abs(yy - centre) < size / 4) & (abs(xx - centre) < size / 4)
    elif shape == "circle":
        mask = (yy - centre) ** 2 + (xx - centre) ** 2 < (size / 3) ** 2
    else:
        mask = (xx // max(size // 8, 1)) % 2 == 0
    array[mask] = SYNTHETIC_COLORS[color]
    return f"a {color} {shape} on a {background} background", PIL.Image.fromarray(array)


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------
class ExampleReader:
    """Turns (key, caption, image or path) into a training example: pixel values (or stored features) + target."""

    def __init__(self, image_processor, store=None, cache_images: int = 0):
        self.image_processor = image_processor
        self.store = store
        # Preprocessed pixels of up to `cache_images` image files, least recently used dropped first: a small data set
        # read for many epochs (the shapes world) then decodes and preprocesses each file once. Same tensors either way.
        self.cache_images = cache_images
        self._cache: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()

    def _preprocess(self, image: PIL.Image.Image | None) -> torch.Tensor | None:
        return None if image is None else self.image_processor(images=[image], return_tensors="pt").pixel_values[0]

    def _pixel_values(self, path: str) -> torch.Tensor | None:
        cached = self._cache.get(path)
        if cached is not None:
            self._cache.move_to_end(path)
            return cached
        pixel_values = self._preprocess(load_rgb(path))
        if pixel_values is not None and self.cache_images > 0:
            self._cache[path] = pixel_values
            if len(self._cache) > self.cache_images:
                self._cache.popitem(last=False)
        return pixel_values

    def __call__(self, key: str, caption: str, image_source) -> dict:
        example = {"key": key, "caption": caption}
        stored = self.store.get(key) if self.store is not None else None
        if self.store is not None:
            if stored is None and self.store.has_image_features:  # the image was unreadable when the features were made
                return skipped_example(key, SKIP_IMAGE, f"no image features in {self.store.folder!r} (unreadable image)")
            if stored is None:
                raise KeyError(
                    f"Example {key!r} has no precomputed target in {self.store.folder!r}: the targets were made for "
                    "another data set. Run precompute.py again for this one."
                )
            example["target"] = stored["target"]
            if "image_features" in stored:
                return {**example, "image_features": stored["image_features"], "skipped": False}
        if isinstance(image_source, str):
            pixel_values = self._pixel_values(resolve_image_path(image_source))
        else:
            image = rgb_or_none(image_source) if isinstance(image_source, PIL.Image.Image) else load_rgb(image_source)
            pixel_values = self._preprocess(image)
        if pixel_values is None:
            if isinstance(image_source, str):
                path = resolve_image_path(image_source)
                reason = f"image {path!r} is {'unreadable' if os.path.isfile(path) else 'missing'}"
            else:
                reason = "the image bytes are unreadable"
            return skipped_example(key, SKIP_IMAGE, reason)
        return {**example, "pixel_values": pixel_values, "skipped": False}


class RecordDataset(Dataset):
    """A map-style data set over records read from a TSV file or an image folder."""

    def __init__(self, records: list[tuple[str, str, str]], reader: ExampleReader):
        self.records = records
        self.reader = reader

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        key, caption, path = self.records[index]
        return self.reader(key, caption, path)


class SyntheticDataset(Dataset):
    """Coloured shapes with captions that describe them (tests, smoke runs, benchmarks)."""

    def __init__(self, size: int, image_size: int, reader: ExampleReader, seed: int = 0):
        self.size, self.image_size, self.reader, self.seed = size, image_size, reader, seed

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        caption, image = synthetic_example(index, self.image_size, self.seed)
        return self.reader(f"synthetic-{index}", caption, image)


class ShardDataset(IterableDataset):
    """webdataset tar shards, streamed in a fixed order, split across processes and DataLoader workers.

    A sample without a caption, or whose caption is not UTF-8, comes out as a skipped example naming its shard and
    key (the loop counts it once, however many epochs read it, and a resumed run skips it again the same way).
    """

    def __init__(self, urls: str, reader: ExampleReader):
        self.urls, self.reader = urls, reader

    def __iter__(self):
        import webdataset as wds

        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
        )
        for sample in pipeline:
            caption = next((sample[k] for k in WDS_CAPTION_KEYS if k in sample), None)
            image = next((sample[k] for k in WDS_IMAGE_KEYS if k in sample), None)
            key = sample.get("__key__", "")
            where = f"{sample.get('__url__', self.urls)}, sample {key!r}"
            problem = None
            if caption is None:
                problem = f"no caption ({'/'.join(WDS_CAPTION_KEYS)})"
            elif isinstance(caption, bytes):
                caption, problem = decode_text(caption)
            if problem is None and not str(caption).strip():
                problem = "the caption is empty"
            if problem is not None:
                yield skipped_example(key, SKIP_ROW, f"{where}: {problem}")
                continue
            caption = str(caption).strip()
            if image is None:
                yield skipped_example(key, SKIP_IMAGE, f"{where}: no image ({'/'.join(WDS_IMAGE_KEYS)})")
                continue
            yield self.reader(key, caption, bytes(image))


def guess_data_type(path: str | None, data_type: str) -> str:
    if data_type != "auto":
        return data_type
    if path is None:
        raise ValueError("A data set path is required unless its type is 'synthetic'; got None.")
    if path.endswith(".tar") or "{" in path or "::" in path:
        return "webdataset"
    if os.path.isdir(path):
        return "folder"
    if path.endswith((".tsv", ".txt", ".csv")):
        return "tsv"
    if path.endswith(".jsonl"):
        return "interleaved"
    raise ValueError(
        f"Cannot tell the data type of {path!r}: set the data type to one of tsv, folder, webdataset, interleaved."
    )


def build_dataset(path, data_type, image_folder, reader, synthetic_size, image_size, seed):
    """The data set of `path`; a map-style one has `malformed_rows`, the rows of its index skipped when read."""
    data_type = guess_data_type(path, data_type)
    if data_type == "synthetic":
        return SyntheticDataset(synthetic_size, image_size, reader, seed)
    if data_type == "webdataset":
        return ShardDataset(path, reader)
    if data_type == "interleaved":
        raise ValueError(
            f"{path!r} holds interleaved documents, not caption pairs: give it as `interleaved_data` "
            "(training/interleaved.py)."
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"Data set {path!r} does not exist.")
    problems = RowProblems()
    records = read_tsv(path, image_folder, problems) if data_type == "tsv" else read_folder(path, problems)
    if not records:
        raise ValueError(f"Data set {path!r} has no examples ({len(problems)} malformed rows skipped).")
    if problems:
        logger.warning("Data set %r: %d malformed rows skipped, %d examples kept.", path, len(problems), len(records))
    dataset = RecordDataset(list(unique_records(records, repr(path))), reader)
    dataset.malformed_rows = len(problems)
    return dataset


def iterate_records(
    path, data_type, image_folder, synthetic_size, image_size, seed, problems: RowProblems | None = None
):
    """(key, caption, image source) of every example, in order (used by precompute.py); malformed rows and samples
    are left out and added to `problems`."""
    problems = RowProblems() if problems is None else problems
    data_type = guess_data_type(path, data_type)
    if data_type == "synthetic":
        for i in range(synthetic_size):
            caption, image = synthetic_example(i, image_size, seed)
            yield f"synthetic-{i}", caption, image
    elif data_type == "webdataset":
        dataset = ShardDataset(path, reader=lambda key, caption, image: {"key": key, "caption": caption, "image": image})
        for item in dataset:
            if item.get("skip_kind") == SKIP_ROW:
                problems.add(path, None, item["skip_reason"])
                continue
            yield item["key"], item["caption"], item.get("image")
    elif data_type == "interleaved":  # one record per image of every document, keyed `<document>/<segment>`
        yield from image_records(path, image_folder, problems)
    else:
        records = read_tsv(path, image_folder, problems) if data_type == "tsv" else read_folder(path, problems)
        yield from records


# ----------------------------------------------------------------------------------------------------------------
# Order and batching
# ----------------------------------------------------------------------------------------------------------------
class EpochBatchSampler(Sampler):
    """Batches of indices: a permutation seeded by (seed, epoch), split across processes, from batch `start` on.

    Every process gets the same number of full batches (the tail of the permutation is dropped), so a step always
    has one batch per process.
    """

    def __init__(self, size, batch_size, seed, epoch, rank=0, world_size=1, start=0, shuffle=True):
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, epoch
        self.rank, self.world_size, self.start, self.shuffle = rank, world_size, start, shuffle
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"The data set has {size} examples, fewer than one batch of `batch_size`={batch_size} on each of "
                f"{world_size} processes."
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def __len__(self):
        return max(self.batches_per_epoch - self.start, 0)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(self.size)
        step = self.batch_size * self.world_size
        for b in range(self.start, self.batches_per_epoch):
            chunk = order[b * step : (b + 1) * step]
            yield chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()


class Collator:
    """Examples -> a batch: caption token ids (BOS + caption, room left for the r [IMG] tokens), images or image
    features, targets; skipped examples are dropped, counted in `num_skipped` and listed in `skipped_examples` as
    (key, kind, reason)."""

    def __init__(self, tokenizer, num_img_tokens: int, max_length: int):
        if max_length <= num_img_tokens + 1:
            raise ValueError(
                f"`max_length`={max_length} leaves no room for a caption next to BOS and {num_img_tokens} [IMG] tokens."
            )
        self.tokenizer = tokenizer
        self.max_caption_tokens = max_length - num_img_tokens
        self.bos = tokenizer.bos_token_id

    def tokenize(self, caption: str) -> list[int]:
        ids = self.tokenizer(caption, add_special_tokens=False).input_ids
        prefix = [self.bos] if self.bos is not None else []
        return (prefix + ids)[: self.max_caption_tokens]

    def __call__(self, examples: list[dict]) -> dict:
        kept = [e for e in examples if not e["skipped"]]
        batch = {"num_skipped": torch.tensor(len(examples) - len(kept)), "keys": [e["key"] for e in kept]}
        batch["skipped_examples"] = [
            (e["key"], e.get("skip_kind", SKIP_IMAGE), e.get("skip_reason", "")) for e in examples if e["skipped"]
        ]
        batch["captions"] = [e["caption"] for e in kept]
        ids = [self.tokenize(e["caption"]) for e in kept]
        lengths = torch.tensor([len(i) for i in ids], dtype=torch.long)
        padded = torch.zeros(len(ids), int(lengths.max()) if ids else 0, dtype=torch.long)
        for row, sequence in enumerate(ids):
            padded[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        batch["caption_ids"], batch["caption_lengths"] = padded, lengths
        if kept and "image_features" in kept[0]:
            batch["image_features"] = torch.stack([e["image_features"] for e in kept])
        elif kept:
            batch["pixel_values"] = torch.stack([e["pixel_values"] for e in kept])
        if kept and "target" in kept[0]:
            batch["targets"] = stack_targets([e["target"] for e in kept])  # a dict for non-SD decoders
        return batch


class SkipCounter:
    """Examples skipped in training, each counted once (not again every epoch) over every process.

    `images`: examples whose image was missing or unreadable; `rows`: malformed rows, those of a data set's index
    (counted once when read) plus malformed webdataset samples met in the stream. The keys already counted are kept,
    and saved in checkpoints, so a resumed run counts the same.
    """

    def __init__(self, malformed_rows: int = 0):
        self.keys: set[str] = set()
        self.images = 0
        self.rows = malformed_rows

    @property
    def total(self) -> int:
        return self.images + self.rows

    def add(self, skipped: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        """Counts the (key, kind, reason) not seen before and returns them."""
        new = []
        for key, kind, reason in skipped:
            if key in self.keys:
                continue
            self.keys.add(key)
            new.append((key, kind, reason))
            if kind == SKIP_ROW:
                self.rows += 1
            else:
                self.images += 1
        return new

    def state_dict(self) -> dict:
        return {"keys": sorted(self.keys), "images": self.images, "rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.keys, self.images, self.rows = set(state["keys"]), int(state["images"]), int(state["rows"])


def loader_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The generator a DataLoader draws its base seed (worker seeds) from.

    Without one, `iter(DataLoader(...))` draws it from the global torch RNG; a resumed run builds its loader at
    another moment than the uninterrupted run did, so every later global draw (LoRA dropout) would differ.
    """
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_009 + rank)


def make_loader(dataset, collator, batch_size, num_workers, seed, epoch, rank, world_size, start_batch=0, shuffle=True):
    """A DataLoader over one epoch from batch `start_batch` on (the exact data position of a resumed run)."""
    common = dict(
        collate_fn=collator, num_workers=num_workers, persistent_workers=False,
        generator=loader_generator(seed, epoch, rank),
    )
    if isinstance(dataset, IterableDataset):
        loader = DataLoader(dataset, batch_size=batch_size, drop_last=True, **common)
        return _skip(loader, start_batch)
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, epoch, rank, world_size, start_batch, shuffle)
    return DataLoader(dataset, batch_sampler=sampler, **common)


def _skip(loader, count):
    for index, batch in enumerate(loader):
        if index >= count:
            yield batch
