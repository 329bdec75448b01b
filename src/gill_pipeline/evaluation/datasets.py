"""Readers for the evaluation data of the GILL paper, in the original datasets' own file formats.

Each reader returns plain examples with stable ids (the resumable runner keys its records on them) and the local path
of every image. Images are looked up as `image_dir / image_pattern.format(id=...)`; when that file does not exist the
same name is tried with the usual image extensions (CC3M's caption file names its images without one).

What is normal in these downloads is skipped and counted: examples whose images are missing (most users' VIST and
CC3M copies miss some) are left out with a warning. What is not is refused before anything runs, as a
[`DataFileError`] naming the file, the row and the field: a file that is not UTF-8 or not JSON, a row without its
caption, prompt or id, an entry of the wrong type, a question index outside VisDial's list, an image name that leaves
`image_dir`, repeated ids, a file with no examples, or one whose images are all missing.
"""

from dataclasses import dataclass, field

from diffusers.utils import logging

from .data_files import (
    DataFileError,
    check_image_dir,
    check_image_pattern,
    find_image,
    format_image_name,
    id_field,
    image_path_inside,
    int_field,
    json_entry,
    read_json,
    read_tsv,
    text_field,
    unique_ids,
)


logger = logging.get_logger(__name__)
# Labels of the PartiPrompts decision files (kohjingyu/gill): which image matched the prompt better.
RETRIEVE_LABEL, GENERATE_LABEL, SAME_LABEL = "ret", "gen", "same"
LABELS = (RETRIEVE_LABEL, GENERATE_LABEL, SAME_LABEL)
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
    """Examples read from a file, and how many were left out because an image they need is missing."""

    examples: list
    skipped: int = 0


def _loaded(path: str, examples: list, total: int, missing: list[str], what: str, image_dir: str | None = None) -> Loaded:
    """The examples, after refusing a file with none and warning about (and counting) those left out. `missing`: the
    first missing image of each example left out."""
    if total == 0:
        raise DataFileError(path, f"has no {what}; is it the right file?")
    if not examples:
        raise DataFileError(
            path, f"none of its {total} {what} has its images in {image_dir!r} (looked for e.g. {missing[0]!r}); "
            "check --images and --image-pattern."
        )
    if missing:
        logger.warning(f"{len(missing)} of {total} {what} of {path} left out: an image they need is missing "
                       f"(e.g. {missing[0]}).")
    return Loaded(examples, len(missing))


class _ImageFinder:
    """Image paths of one file's ids: `image_dir/image_pattern.format(id=...)`, inside `image_dir`, or None."""

    def __init__(self, path: str, image_dir: str, image_pattern: str | None):
        check_image_dir(image_dir)
        if image_pattern is not None:
            check_image_pattern(image_pattern)
        self.path, self.image_dir, self.image_pattern = path, image_dir, image_pattern

    def __call__(self, image_id, row: str, field: str) -> tuple[str | None, str]:
        """(the image file or None, the path looked for)."""
        name = image_id if self.image_pattern is None else format_image_name(self.image_pattern, image_id, self.path, row, field)
        full = image_path_inside(self.image_dir, name, self.path, row, field)
        return find_image(full), full


def resolve_image(image_dir: str, image_pattern: str, image_id) -> str | None:
    """The path of the image `image_id` under `image_dir`, or `None` when no such file exists."""
    return _ImageFinder("<image id>", image_dir, image_pattern)(image_id, "", "id")[0]


def read_vist_stories(path: str, image_dir: str, image_pattern: str = "{id}.jpg") -> Loaded:
    """Stories of a VIST "story in sequence" file (e.g. `sis/val.story-in-sequence.json`).

    The file holds `annotations`: a list of one-element lists, each a dict with `story_id`, `photo_flickr_id`,
    `worker_arranged_photo_order` and `text`. Images are `{photo_flickr_id}.jpg` (or another extension) in `image_dir`.
    """
    find = _ImageFinder(path, image_dir, image_pattern)
    data = read_json(path, "VIST story")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataFileError(path, "has no `annotations` list; is it a story-in-sequence file?", field="annotations")
    steps: dict[str, list[tuple]] = {}
    for i, entry in enumerate(data["annotations"]):
        row = f"annotations[{i}]"
        if isinstance(entry, list):  # the release wraps each annotation in a one-element list
            if len(entry) != 1:
                raise DataFileError(path, f"expected a list of one annotation, got {len(entry)} elements.", row)
            entry, row = entry[0], row + "[0]"
        json_entry(entry, path, row)
        story_id = str(id_field(entry, "story_id", path, row))
        order = int_field(entry, "worker_arranged_photo_order", path, row)
        photo = id_field(entry, "photo_flickr_id", path, row)
        steps.setdefault(story_id, []).append((order, photo, text_field(entry, "text", path, row), row))
    stories, missing = [], []
    for story_id, items in steps.items():
        items.sort(key=lambda item: item[0])
        found = [find(photo, row, "photo_flickr_id") for _, photo, _, row in items]
        absent = [looked for image, looked in found if image is None]
        if absent:
            missing.append(absent[0])
            continue
        stories.append(Story(id=story_id, captions=[item[2] for item in items], image_paths=[image for image, _ in found]))
    return _loaded(path, stories, len(steps), missing, "VIST stories", image_dir)


def read_visdial(path: str, image_dir: str, image_pattern: str = "VisualDialog_val2018_{id:012d}.jpg") -> Loaded:
    """Dialogues of a VisDial v1.0 file (e.g. `visdial_1.0_val.json`).

    The file holds `data.questions` and `data.answers` (lists of strings) and `data.dialogs`: per image an
    `image_id`, a `caption` and `dialog` rounds whose `question` and `answer` index those lists. The default image
    name is that of the VisDial v1.0 validation images.
    """
    find = _ImageFinder(path, image_dir, image_pattern)
    data = read_json(path, "VisDial")
    body = data.get("data") if isinstance(data, dict) else None
    if not isinstance(body, dict) or not all(isinstance(body.get(k), list) for k in ("questions", "answers", "dialogs")):
        raise DataFileError(path, "needs the lists `data.questions`, `data.answers` and `data.dialogs`.", field="data")
    questions, answers = body["questions"], body["answers"]
    out, missing, ids = [], [], []
    for i, dialog in enumerate(body["dialogs"]):
        row = f"data.dialogs[{i}]"
        json_entry(dialog, path, row)
        image_id = id_field(dialog, "image_id", path, row)
        caption = text_field(dialog, "caption", path, row)
        rounds = []
        for j, turn in enumerate(json_entry(dialog.get("dialog", []), path, row + ".dialog", list, "a list of rounds")):
            where = f"{row}.dialog[{j}]"
            json_entry(turn, path, where)
            if "answer" not in turn:  # the test split leaves the last round's answer out
                continue
            question = questions[int_field(turn, "question", path, where, len(questions))]
            answer = answers[int_field(turn, "answer", path, where, len(answers))]
            rounds.append((str(question), str(answer)))
        image_path, looked = find(image_id, row, "image_id")
        if image_path is None:
            missing.append(looked)
            continue
        ids.append((str(image_id), row))
        out.append(Dialog(id=str(image_id), image_id=str(image_id), image_path=image_path, caption=caption, rounds=rounds))
    unique_ids(ids, path)
    return _loaded(path, out, len(body["dialogs"]), missing, "VisDial dialogues", image_dir)


def read_cc3m_captions(path: str, image_dir: str, image_pattern: str = "{id}") -> Loaded:
    """Image-caption pairs of a CC3M-style TSV file: a header `caption<TAB>image`, then one pair per line."""
    find = _ImageFinder(path, image_dir, image_pattern)
    rows = read_tsv(path, "caption", {"caption", "image"}, "`caption<TAB>image`")
    out, missing, ids = [], [], []
    for line, row in rows:
        where = f"line {line}"
        caption, image = text_field(row, "caption", path, where), text_field(row, "image", path, where)
        image_path, looked = find(image, where, "image")
        if image_path is None:
            missing.append(looked)
            continue
        ids.append((image, where))
        out.append(CaptionedImage(id=image, image_path=image_path, captions=[caption]))
    unique_ids(ids, path)
    return _loaded(path, out, len(rows), missing, "caption rows", image_dir)


def read_coco_captions(path: str, image_dir: str) -> Loaded:
    """Images with their captions from a COCO captions file (`captions_val2017.json`): `images` (`id`,
    `file_name`) and `annotations` (`image_id`, `caption`). Images without a caption are not evaluated."""
    find = _ImageFinder(path, image_dir, None)
    data = read_json(path, "COCO captions")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise DataFileError(path, "needs the lists `images` and `annotations`; is it a COCO captions file?")
    captions: dict = {}
    for i, annotation in enumerate(data["annotations"]):
        row = f"annotations[{i}]"
        json_entry(annotation, path, row)
        image_id = id_field(annotation, "image_id", path, row)
        captions.setdefault(str(image_id), []).append(text_field(annotation, "caption", path, row))
    out, missing, ids, total = [], [], [], 0
    for i, image in enumerate(data["images"]):
        row = f"images[{i}]"
        json_entry(image, path, row)
        image_id = str(id_field(image, "id", path, row))
        file_name = text_field(image, "file_name", path, row)
        if image_id not in captions:
            continue
        total += 1
        image_path, looked = find(file_name, row, "file_name")
        if image_path is None:
            missing.append(looked)
            continue
        ids.append((image_id, row))
        out.append(CaptionedImage(id=image_id, image_path=image_path, captions=captions[image_id]))
    unique_ids(ids, path)
    return _loaded(path, out, total, missing, "COCO images with captions", image_dir)


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
    rows = read_tsv(path, "decision", {"Prompt"}, "`Prompt<TAB>...<TAB>Decision` (or `Decisions`)")
    decision = next((c for c in ("Decisions", "Decision") if rows and c in rows[0][1]), None)
    if decision is None and rows:
        raise DataFileError(path, f"needs the column `Decision` or `Decisions`, got {sorted(rows[0][1])!r}.", "line 1")
    out = []
    for i, (line, row) in enumerate(rows):
        where = f"line {line}"
        prompt = text_field(row, "Prompt", path, where)
        votes = [v.strip() for v in text_field(row, decision, path, where).split(",") if v.strip()]
        unknown = [v for v in votes if v not in LABELS]
        if unknown:
            raise DataFileError(path, f"has the vote {unknown[0]!r}; votes are {', '.join(LABELS)}.", where, decision)
        out.append(
            DecisionPrompt(
                id=str(i), prompt=prompt, label=majority_label(votes), votes=votes,
                category=(row.get("Category") or "").strip(), challenge=(row.get("Challenge") or "").strip(),
            )
        )
    return _loaded(path, out, len(rows), [], "prompts")
