"""Retrieval evaluations: dialogue-conditioned image retrieval on VisDial, and text-to-image / image-to-text
retrieval on CC3M or COCO captions (GILL paper, appendix; the FROMAGe protocols it inherits).

GILL's text side is the normalised retrieval embedding at the `[IMG0]` forced after the text; its image side the
retrieval projection of the vision encoder's pooled feature. The baseline is a whole CLIP the user passes. Every
embedding is saved batch by batch (`embeddings/`), so a stopped run resumes; ranks are written per query to
`records.jsonl` and recall@k computed from them.
"""

import functools
import os

import torch

from .clip_features import CLIPTextImageScorer
from .datasets import Loaded, read_captions, read_visdial
from .metrics import DEFAULT_RECALL_KS, rank_of_first_match, recall_at_k
from .records import EmbeddingStore, RecordLog, check_settings, ignored_notes, write_summary
from .runner import dataset_or_read, limit_examples, load_rgb
from .systems import CLIPRetrievalBaseline, GILLSystem


VISDIAL = "visdial"
CAPTION_RETRIEVAL = "caption_retrieval"
DEFAULT_CAPTION_TEMPLATE = "{caption}."
DEFAULT_ROUND_TEMPLATE = " Q: {question}? A: {answer}."


def _systems(pipe, clip_baseline) -> list:
    systems = [GILLSystem(pipe)]
    if clip_baseline is not None:
        scorer = CLIPTextImageScorer.from_pretrained(str(clip_baseline)) if isinstance(clip_baseline, (str, os.PathLike)) else clip_baseline
        systems.append(CLIPRetrievalBaseline(scorer))
    return systems


def _embed_texts(system, texts: list[str]) -> torch.Tensor:
    # GILL reads interleaved inputs (here: one text each); CLIP reads strings.
    return system.text_embeds([[t] for t in texts] if isinstance(system, GILLSystem) else texts)


def _texts_and_images(store: EmbeddingStore, system, queries: tuple, images: tuple, batch_size: int, progress: bool,
                      max_image_pixels: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings of `queries` = (kind, ids, texts) and of `images` = (kind, ids, paths) by `system`, each saved
    (and resumed) under `<system>_<kind>`."""
    load = functools.partial(load_rgb, max_pixels=max_image_pixels)
    kind, ids, texts = queries
    text = store.compute(f"{system.name}_{kind}", ids, texts, lambda t: _embed_texts(system, t), batch_size, progress)
    kind, ids, paths = images
    pictures = store.compute(
        f"{system.name}_{kind}", ids, paths, lambda p: system.image_embeds([load(path) for path in p]), batch_size, progress
    )
    return text, pictures


def _record_ranks(log: RecordLog, system: str, ids: list[str], ranks: list[int]) -> None:
    done = log.done
    log.append([{"id": i, "system": system, "rank": r} for i, r in zip(ids, ranks) if (i, system) not in done])


def dialog_text(dialog, num_rounds: int | None, caption_template: str, round_template: str) -> str:
    """The dialogue as one text: the caption, then the first `num_rounds` rounds (all when `None`)."""
    rounds = dialog.rounds if num_rounds is None else dialog.rounds[:num_rounds]
    text = caption_template.format(caption=dialog.caption)
    return text + "".join(round_template.format(question=q, answer=a) for q, a in rounds)


def evaluate_visdial(
    pipe,
    dialogs_file: str,
    image_dir: str,
    output_dir: str,
    *,
    num_rounds: int | None = None,
    caption_template: str = DEFAULT_CAPTION_TEMPLATE,
    round_template: str = DEFAULT_ROUND_TEMPLATE,
    clip_baseline=None,
    image_pattern: str = "VisualDialog_val2018_{id:012d}.jpg",
    limit: int | None = None,
    batch_size: int = 16,
    ks: tuple[int, ...] = DEFAULT_RECALL_KS,
    progress: bool = True,
    dataset: Loaded | None = None,
    max_image_pixels: int | None = None,
) -> dict:
    r"""
    Dialogue-conditioned retrieval: each dialogue (caption and `num_rounds` question/answer rounds, as one text)
    retrieves its image among the images of every evaluated dialogue; recall@1/5/10.

    Args:
        pipe ([`GILLPipeline`]): the GILL pipeline under test.
        dialogs_file (`str`): a VisDial v1.0 JSON file; `image_dir` its images, named by `image_pattern`.
        num_rounds (`int`, *optional*): rounds of dialogue given (the paper compares 1 with all 10).
        caption_template, round_template (`str`): how the caption and each round are written out.
        clip_baseline (`str` or [`CLIPTextImageScorer`], *optional*): a whole CLIP, for the CLIP rows.
        limit (`int`, *optional*): the first `limit` dialogues only (the gallery shrinks with them).
        dataset ([`Loaded`], *optional*): what `read_visdial(dialogs_file, image_dir, image_pattern)` returned, when
            read already (`gill evaluate` reads and checks it before loading any model).
        max_image_pixels (`int`, *optional*): largest image read (default: `gill_pipeline.utils.image_io.MAX_IMAGE_PIXELS`).
    """
    if num_rounds is not None and (not isinstance(num_rounds, int) or isinstance(num_rounds, bool) or num_rounds < 0):
        raise ValueError(f"`num_rounds` must be a non-negative integer or None, got {num_rounds!r}.")
    loaded = dataset_or_read(dataset, read_visdial, dialogs_file, image_dir, image_pattern)
    dialogs = limit_examples(loaded.examples, limit)
    settings = dict(
        protocol=VISDIAL, dialogs_file=os.path.abspath(dialogs_file), num_rounds=num_rounds, limit=limit,
        caption_template=caption_template, round_template=round_template, clip_baseline=clip_baseline is not None,
    )
    check_settings(output_dir, settings)
    log, store = RecordLog(output_dir, fields=("rank",)), EmbeddingStore(output_dir)
    ids = [d.id for d in dialogs]
    texts = [dialog_text(d, num_rounds, caption_template, round_template) for d in dialogs]
    results = {}
    for system in _systems(pipe, clip_baseline):
        queries, gallery = _texts_and_images(
            store, system, ("dialogs", ids, texts), ("images", ids, [d.image_path for d in dialogs]), batch_size,
            progress, max_image_pixels,
        )
        ranks = rank_of_first_match(queries @ gallery.t(), [[i] for i in range(len(dialogs))])
        _record_ranks(log, system.name, ids, ranks)
        results[system.name] = {**recall_at_k(ranks, ks), "n": len(ranks)}
    rounds = "all rounds" if num_rounds is None else f"{num_rounds} round(s)"
    notes = [
        f"Query: the caption and {rounds} of dialogue as one text; gallery: the {len(dialogs)} images of the "
        "evaluated dialogues.",
        f"Dialogues left out: {loaded.skipped} with a missing image.",
    ] + ignored_notes(log, store)
    return write_summary(output_dir, VISDIAL, results, settings, notes)


def evaluate_caption_retrieval(
    pipe,
    captions_file: str,
    image_dir: str,
    output_dir: str,
    *,
    data_format: str = "cc3m",
    clip_baseline=None,
    image_pattern: str = "{id}",
    limit: int | None = None,
    batch_size: int = 32,
    ks: tuple[int, ...] = DEFAULT_RECALL_KS,
    progress: bool = True,
    dataset: Loaded | None = None,
    max_image_pixels: int | None = None,
) -> dict:
    r"""
    Text-to-image (each caption retrieves its image among all images) and image-to-text (each image retrieves any of
    its captions among all captions) recall@k.

    Args:
        captions_file (`str`): a CC3M-style TSV (`caption<TAB>image`, `data_format="cc3m"`, images named by
            `image_pattern`) or a COCO captions JSON (`data_format="coco"`).
        clip_baseline (`str` or [`CLIPTextImageScorer`], *optional*): a whole CLIP, for the CLIP rows.
        limit (`int`, *optional*): the first `limit` images (with all their captions) only.
        dataset ([`Loaded`], *optional*): what `read_captions(captions_file, image_dir, data_format, image_pattern)`
            returned, when read already; max_image_pixels (`int`, *optional*): largest image read.
    """
    loaded = dataset_or_read(dataset, read_captions, captions_file, image_dir, data_format, image_pattern)
    images = limit_examples(loaded.examples, limit)
    settings = dict(
        protocol=CAPTION_RETRIEVAL, captions_file=os.path.abspath(captions_file), data_format=data_format, limit=limit,
        clip_baseline=clip_baseline is not None,
    )
    check_settings(output_dir, settings)
    caption_ids, captions, owner = [], [], []
    for n, image in enumerate(images):
        for j, caption in enumerate(image.captions):
            caption_ids.append(f"{image.id}#{j}")
            captions.append(caption)
            owner.append(n)
    image_ids = [image.id for image in images]
    log, store = RecordLog(output_dir, fields=("rank",)), EmbeddingStore(output_dir)
    results = {}
    for system in _systems(pipe, clip_baseline):
        text, pictures = _texts_and_images(
            store, system, ("captions", caption_ids, captions), ("images", image_ids, [i.image_path for i in images]),
            batch_size, progress, max_image_pixels,
        )
        scores = text @ pictures.t()
        t2i = rank_of_first_match(scores, [[n] for n in owner])
        captions_of = [[] for _ in images]
        for c, n in enumerate(owner):
            captions_of[n].append(c)
        i2t = rank_of_first_match(scores.t(), captions_of)
        _record_ranks(log, system.name, [f"t2i:{c}" for c in caption_ids], t2i)
        _record_ranks(log, system.name, [f"i2t:{i}" for i in image_ids], i2t)
        results[system.name] = {
            **{f"t2i_{k}": v for k, v in recall_at_k(t2i, ks).items()},
            **{f"i2t_{k}": v for k, v in recall_at_k(i2t, ks).items()},
            "n_images": len(images),
            "n_captions": len(captions),
        }
    notes = [
        f"t2i: each of the {len(captions)} captions retrieves its image among {len(images)}; i2t: each image "
        "retrieves any of its captions among all captions.",
        f"Images left out: {loaded.skipped} missing.",
    ] + ignored_notes(log, store)
    return write_summary(output_dir, CAPTION_RETRIEVAL, results, settings, notes)
