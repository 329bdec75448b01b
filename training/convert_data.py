"""Interleaved training documents (`training/interleaved.py`) from VIST stories and MMC4 documents.

    # VIST: a story-in-sequence file (train.story-in-sequence.json) -> one document per story
    python -m training.convert_data vist --input sis/train.story-in-sequence.json --output vist_train.jsonl \
        --image-template "images/train/{id}.jpg"

    # MMC4: document shards (docs_shard_*.jsonl) -> one document per line
    python -m training.convert_data mmc4 --input docs_shard_0_v2.jsonl --output mmc4_0.jsonl --image-dir images/

VIST: a story's five sentences and photos in the workers' order become `text, image, text, image, ...`, each image
captioned by its own sentence (the text just before its `[IMG]` tokens, as in GILL's VIST evaluation: k sentences and
k-1 images in, the k-th image out). MMC4: every sentence of `text_list` is a text segment; each image of `image_info`
follows the sentence its `matched_text_index` names, captioned by that sentence. Image paths are written relative to
the output file's folder when they lie under it, so a converted set can be moved with its images.
"""

import argparse
import json
import logging
import os
import sys

from training.records import RowProblems, decoded_lines
from training.interleaved import CAPTION_KEY, ID_KEY, IMAGE_KEY, SEGMENTS_KEY, TEXT_KEY, write_documents

logger = logging.getLogger("convert_data")

VIST_ANNOTATIONS = "annotations"
VIST_TEXT_FIELDS = ("original_text", "text")


def vist_documents(story_in_sequence: dict, image_template: str = "{id}.jpg", text_field: str = "original_text"):
    """VIST story-in-sequence JSON (its `annotations`: lists of one storylet each) -> documents, in story order.

    `image_template` makes an image path from the photo's `{id}` (VIST's `photo_flickr_id`); `text_field` is
    `original_text` (as written) or `text` (VIST's lower-cased, tokenised and anonymised form).
    """
    if text_field not in VIST_TEXT_FIELDS:
        raise ValueError(f"`text_field` must be one of {VIST_TEXT_FIELDS}, got {text_field!r}.")
    annotations = story_in_sequence.get(VIST_ANNOTATIONS)
    if not isinstance(annotations, list):
        raise ValueError(
            f"A VIST story-in-sequence file has an `{VIST_ANNOTATIONS}` list; got keys {sorted(story_in_sequence)}."
        )
    stories, order = {}, []
    for entry in annotations:
        storylet = entry[0] if isinstance(entry, list) else entry  # VIST wraps each storylet in a one-item list
        story = str(storylet["story_id"])
        if story not in stories:
            stories[story] = []
            order.append(story)
        stories[story].append(storylet)
    for story in order:
        segments = []
        for storylet in sorted(stories[story], key=lambda s: int(s["worker_arranged_photo_order"])):
            sentence = (storylet.get(text_field) or storylet.get("text") or "").strip()
            if not sentence:
                continue
            path = image_template.format(id=storylet["photo_flickr_id"])
            segments += [{TEXT_KEY: sentence}, {IMAGE_KEY: path, CAPTION_KEY: sentence}]
        if segments:
            yield {ID_KEY: f"vist-{story}", SEGMENTS_KEY: segments}


def mmc4_document(document: dict, key: str, image_dir: str = "", min_similarity: float | None = None) -> dict | None:
    """One MMC4 document (`text_list`, `image_info` with `image_name` and `matched_text_index`) -> a document, or None
    when no image is left (every image under `min_similarity`, or none matched to a sentence)."""
    sentences = document.get("text_list")
    if not isinstance(sentences, list):
        raise ValueError(f"An MMC4 document has a `text_list` list; got keys {sorted(document)}.")
    matched = {}
    for info in document.get("image_info") or []:
        index = info.get("matched_text_index")
        if not isinstance(index, int) or not 0 <= index < len(sentences) or not str(sentences[index]).strip():
            continue
        if min_similarity is not None and float(info.get("matched_sim", 1.0)) < min_similarity:
            continue
        path = os.path.join(image_dir, info["image_name"]) if image_dir else info["image_name"]
        matched.setdefault(index, []).append(path)
    if not matched:
        return None
    segments = []
    for index, sentence in enumerate(sentences):
        sentence = str(sentence).strip()
        if not sentence:
            continue
        segments.append({TEXT_KEY: sentence})
        segments += [{IMAGE_KEY: path, CAPTION_KEY: sentence} for path in matched.get(index, [])]
    return {ID_KEY: key, SEGMENTS_KEY: segments}


def mmc4_documents(path: str, image_dir: str = "", min_similarity: float | None = None, problems=None):
    """Every MMC4 document of a JSONL shard; malformed lines are skipped and added to `problems`."""
    problems = RowProblems() if problems is None else problems
    name = os.path.splitext(os.path.basename(path))[0]
    for line_number, text, problem in decoded_lines(path):
        if problem is None and not text.strip():
            continue
        if problem is None:
            try:
                document = mmc4_document(json.loads(text), f"{name}-{line_number}", image_dir, min_similarity)
            except (json.JSONDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
                problem = f"not an MMC4 document ({error})"
        if problem is not None:
            problems.add(path, line_number, problem)
            continue
        if document is not None:
            yield document


def relative_to(documents, folder: str):
    """Image paths under `folder` rewritten relative to it (the reader resolves them against the JSONL's folder)."""
    folder = os.path.abspath(folder)
    for document in documents:
        for segment in document[SEGMENTS_KEY]:
            if IMAGE_KEY in segment and os.path.isabs(segment[IMAGE_KEY]):
                if os.path.commonpath([folder, segment[IMAGE_KEY]]) == folder:
                    segment[IMAGE_KEY] = os.path.relpath(segment[IMAGE_KEY], folder)
        yield document


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Convert VIST stories or MMC4 documents to interleaved JSONL.")
    sub = parser.add_subparsers(dest="source", required=True)
    vist = sub.add_parser("vist", help="A VIST story-in-sequence JSON file.")
    vist.add_argument("--input", required=True)
    vist.add_argument("--output", required=True)
    vist.add_argument("--image-template", default="{id}.jpg", help="Image path from the photo id `{id}`.")
    vist.add_argument("--text-field", default="original_text", choices=VIST_TEXT_FIELDS)
    mmc4 = sub.add_parser("mmc4", help="MMC4 document shards (JSONL).")
    mmc4.add_argument("--input", required=True, nargs="+")
    mmc4.add_argument("--output", required=True)
    mmc4.add_argument("--image-dir", default="", help="Folder of the downloaded images (their `image_name`).")
    mmc4.add_argument("--min-similarity", type=float, default=None, help="Drop images matched below this CLIP score.")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = build_parser().parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.output))
    if args.source == "vist":
        with open(args.input, encoding="utf-8") as f:
            documents = vist_documents(json.load(f), args.image_template, args.text_field)
        count = write_documents(args.output, relative_to(documents, folder))
    else:
        problems = RowProblems()
        documents = (
            d for path in args.input for d in mmc4_documents(path, args.image_dir, args.min_similarity, problems)
        )
        count = write_documents(args.output, relative_to(documents, folder))
        if problems:
            logger.warning("%d malformed MMC4 lines skipped.", len(problems))
    logger.info("Wrote %d documents to %s", count, args.output)
    return count


if __name__ == "__main__":
    main(sys.argv[1:])
