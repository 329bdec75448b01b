"""Readers for the evaluation data of the GILL paper, in the original datasets' own file formats.

Each reader returns plain examples with stable ids (the resumable runner keys its records on them) and the local path
of every image. Images are looked up as `image_dir / image_pattern.format(id=...)`; when that file does not exist the
same name is tried with the usual image extensions (CC3M's caption file names its images without one). Examples whose
images are missing are left out with a warning, and counted: the VIST and CC3M downloads of most users miss some.
"""

import csv
import json
import os
from dataclasses import dataclass, field

from diffusers.utils import logging


logger = logging.get_logger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")
# Labels of the PartiPrompts decision files (kohjingyu/gill): which image matched the prompt better.
RETRIEVE_LABEL, GENERATE_LABEL, SAME_LABEL = "ret", "gen", "same"
# Caption files: CC3M-style TSV, or COCO captions JSON.
DATA_FORMATS = ("cc3m", "coco")


@dataclass
class Story:
    """A VIST story: captions and images in story order (`worker_arranged_photo_order`)."""

    id: str
    captions: list[str]
    image_paths: list[str]


@dataclass
class Dialog:
    """A VisDial dialogue about one image: its caption and question/answer rounds."""

    id: str
    image_id: str
    image_path: str
    caption: str
    rounds: list[tuple[str, str]]


@dataclass
class CaptionedImage:
    """An image with the captions that describe it (one for CC3M, about five for COCO)."""

    id: str
    image_path: str
    captions: list[str]


@dataclass
class DecisionPrompt:
    """A PartiPrompts prompt with the human decision: `"ret"`, `"gen"`, or `None` (`"same"` or a tied vote)."""

    id: str
    prompt: str
    label: str | None
    votes: list[str] = field(default_factory=list)
    category: str = ""
    challenge: str = ""


@dataclass
class Loaded:
    """Examples read from a file, and how many were left out (missing images, unusable rows)."""

    examples: list
    skipped: int = 0


def resolve_image(image_dir: str, image_pattern: str, image_id) -> str | None:
    """The path of the image `image_id` under `image_dir`, or `None` when no such file exists."""
    path = os.path.join(image_dir, image_pattern.format(id=image_id))
    if os.path.isfile(path):
        return path
    stem = os.path.splitext(path)[0] if path.lower().endswith(IMAGE_EXTENSIONS) else path
    for extension in IMAGE_EXTENSIONS:
        if os.path.isfile(stem + extension):
            return stem + extension
    return None


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"The {what} file {path!r} does not exist.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"The {what} file {path!r} is not valid JSON: {error}") from None


def _check_dir(image_dir: str, name: str = "image_dir") -> None:
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"`{name}` {image_dir!r} is not a folder.")


def _report_missing(missing: int, total: int, what: str) -> None:
    if missing:
        logger.warning(f"{missing} of {total} {what} left out: an image they need is missing.")


def read_vist_stories(path: str, image_dir: str, image_pattern: str = "{id}.jpg") -> Loaded:
    """Stories of a VIST "story in sequence" file (e.g. `sis/val.story-in-sequence.json`).

    The file holds `annotations`: a list of one-element lists, each a dict with `story_id`, `photo_flickr_id`,
    `worker_arranged_photo_order` and `text`. Images are `{photo_flickr_id}.jpg` (or another extension) in `image_dir`.
    """
    _check_dir(image_dir)
    data = _read_json(path, "VIST story")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"The VIST file {path!r} has no `annotations` list; is it a story-in-sequence file?")
    steps: dict[str, list[dict]] = {}
    for entry in data["annotations"]:
        item = entry[0] if isinstance(entry, list) and entry else entry
        try:
            steps.setdefault(str(item["story_id"]), []).append(item)
        except (KeyError, TypeError):
            raise ValueError(f"A VIST annotation in {path!r} has no `story_id`: {str(entry)[:200]}") from None
    stories, missing = [], 0
    for story_id, items in steps.items():
        items.sort(key=lambda x: int(x["worker_arranged_photo_order"]))
        paths = [resolve_image(image_dir, image_pattern, item["photo_flickr_id"]) for item in items]
        if any(p is None for p in paths):
            missing += 1
            continue
        stories.append(Story(id=story_id, captions=[item["text"].strip() for item in items], image_paths=paths))
    _report_missing(missing, len(steps), "VIST stories")
    return Loaded(stories, missing)


def read_visdial(path: str, image_dir: str, image_pattern: str = "VisualDialog_val2018_{id:012d}.jpg") -> Loaded:
    """Dialogues of a VisDial v1.0 file (e.g. `visdial_1.0_val.json`).

    The file holds `data.questions` and `data.answers` (lists of strings) and `data.dialogs`: per image an
    `image_id`, a `caption` and `dialog` rounds whose `question` and `answer` index those lists. The default image
    name is that of the VisDial v1.0 validation images.
    """
    _check_dir(image_dir)
    data = _read_json(path, "VisDial")
    try:
        body = data["data"]
        questions, answers, dialogs = body["questions"], body["answers"], body["dialogs"]
    except (KeyError, TypeError):
        raise ValueError(f"The VisDial file {path!r} needs `data.questions`, `data.answers` and `data.dialogs`.") from None
    out, missing = [], 0
    for dialog in dialogs:
        image_id = dialog["image_id"]
        image_path = resolve_image(image_dir, image_pattern, image_id)
        if image_path is None:
            missing += 1
            continue
        rounds = [
            (questions[r["question"]], answers[r["answer"]])
            for r in dialog.get("dialog", [])
            if "question" in r and "answer" in r  # the test split leaves the last round's answer out
        ]
        out.append(
            Dialog(id=str(image_id), image_id=str(image_id), image_path=image_path, caption=dialog["caption"], rounds=rounds)
        )
    _report_missing(missing, len(dialogs), "VisDial dialogues")
    return Loaded(out, missing)


def read_cc3m_captions(path: str, image_dir: str, image_pattern: str = "{id}") -> Loaded:
    """Image-caption pairs of a CC3M-style TSV file: a header `caption<TAB>image`, then one pair per line."""
    _check_dir(image_dir)
    try:
        f = open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise FileNotFoundError(f"The caption file {path!r} does not exist.") from None
    with f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if not reader.fieldnames or not {"caption", "image"} <= set(reader.fieldnames):
            raise ValueError(
                f"The caption file {path!r} must start with the header `caption<TAB>image`, got {reader.fieldnames!r}."
            )
        rows = list(reader)
    out, missing = [], 0
    for row in rows:
        image_path = resolve_image(image_dir, image_pattern, row["image"])
        if image_path is None:
            missing += 1
            continue
        out.append(CaptionedImage(id=row["image"], image_path=image_path, captions=[row["caption"].strip()]))
    _report_missing(missing, len(rows), "CC3M pairs")
    return Loaded(out, missing)


def read_coco_captions(path: str, image_dir: str) -> Loaded:
    """Images with their captions from a COCO captions file (`captions_val2017.json`): `images` (`id`,
    `file_name`) and `annotations` (`image_id`, `caption`)."""
    _check_dir(image_dir)
    data = _read_json(path, "COCO captions")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"The COCO captions file {path!r} needs `images` and `annotations`.")
    captions: dict = {}
    for annotation in data["annotations"]:
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"].strip())
    out, missing = [], 0
    for image in data["images"]:
        if image["id"] not in captions:
            continue
        image_path = os.path.join(image_dir, image["file_name"])
        if not os.path.isfile(image_path):
            missing += 1
            continue
        out.append(CaptionedImage(id=str(image["id"]), image_path=image_path, captions=captions[image["id"]]))
    _report_missing(missing, len(data["images"]), "COCO images")
    return Loaded(out, missing)


def read_captions(path: str, image_dir: str, data_format: str, image_pattern: str = "{id}") -> Loaded:
    """Images with captions from a CC3M-style TSV (`data_format="cc3m"`) or a COCO captions JSON (`"coco"`)."""
    if data_format == "cc3m":
        return read_cc3m_captions(path, image_dir, image_pattern)
    if data_format == "coco":
        return read_coco_captions(path, image_dir)
    raise ValueError(f"`data_format` must be one of {DATA_FORMATS}, got {data_format!r}.")


def majority_label(votes: list[str]) -> str | None:
    """`"ret"` or `"gen"`, whichever has more votes; `None` on a tie (`"same"` votes count for neither)."""
    ret, gen = votes.count(RETRIEVE_LABEL), votes.count(GENERATE_LABEL)
    if ret == gen:
        return None
    return RETRIEVE_LABEL if ret > gen else GENERATE_LABEL


def read_partiprompts_decisions(path: str) -> Loaded:
    """Prompts of a PartiPrompts decision file of the GILL release.

    `PartiPromptsDecisionsConfident.tsv` has one label per prompt (`Decision`: `ret`, `gen` or `same`);
    `PartiPromptsAllDecisions_*.tsv` have five votes (`Decisions`: e.g. `ret,gen,gen,same,gen`), of which the
    majority between `ret` and `gen` is the label. Prompts labelled `same`, and ties, get the label `None`.
    """
    try:
        f = open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise FileNotFoundError(f"The decision file {path!r} does not exist.") from None
    with f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        fields = set(reader.fieldnames or [])
        if "Prompt" not in fields or not fields & {"Decision", "Decisions"}:
            raise ValueError(
                f"The decision file {path!r} needs the columns `Prompt` and `Decision` or `Decisions`, got "
                f"{reader.fieldnames!r}."
            )
        out = []
        for i, row in enumerate(reader):
            votes = [v.strip() for v in (row.get("Decisions") or row.get("Decision") or "").split(",") if v.strip()]
            label = majority_label(votes)
            out.append(
                DecisionPrompt(
                    id=str(i), prompt=row["Prompt"], label=label, votes=votes,
                    category=row.get("Category") or "", challenge=row.get("Challenge") or "",
                )
            )
    return Loaded(out, 0)
