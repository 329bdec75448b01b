"""Reading the data files of an evaluation so that every problem is one `DataFileError` naming the file, the row and
the field: not UTF-8, not JSON, a missing column, a row without its caption or id, an image name that leaves the image
folder. The readers of `datasets.py` are built on these; nothing here knows a dataset.

A row is a line number in a TSV file ("line 7") and a path of keys and indexes in a JSON file
("annotations[41][0]"), as JSON files of these datasets are usually one line.
"""

import csv
import io
import json
import os
import string

from diffusers.utils import logging


logger = logging.get_logger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")


class DataFileError(ValueError):
    r"""
    A data file of an evaluation is unreadable or malformed. `gill evaluate` shows it as one line (exit code 2).

    Args:
        path (`str`): the file.
        problem (`str`): what is wrong, in words.
        row (`str`, *optional*): where: `"line 7"`, or a JSON location such as `"data.dialogs[3]"`.
        field (`str`, *optional*): the column or key concerned.
    """

    def __init__(self, path: str, problem: str, row: str | None = None, field: str | None = None):
        where = "".join([f", {row}" if row else "", f", field `{field}`" if field else ""])
        super().__init__(f"{path}{where}: {problem}")
        self.path, self.row, self.field = path, row, field


def read_text(path: str, what: str) -> str:
    """The whole file as text (UTF-8, a byte-order mark allowed); a named error when missing or not UTF-8."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"The {what} file {path!r} does not exist.") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"The {what} file {path!r} is a folder, not a file.") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataFileError(
            path, f"is not UTF-8 text (byte 0x{data[error.start]:02x}); save the {what} file as UTF-8.", f"line {line}"
        ) from None


def read_json(path: str, what: str):
    """The parsed JSON file; a named error (with line and column) when it is not JSON."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataFileError(
            path, f"is not valid JSON ({error.msg}); is it the {what} file?", f"line {error.lineno}, column {error.colno}"
        ) from None


def read_tsv(path: str, what: str, columns: set[str], header_hint: str) -> list[tuple[int, dict]]:
    """(line number, row) of a tab-separated file with a header naming at least `columns`; rows with fewer cells than
    the header are refused, blank lines skipped."""
    reader = csv.DictReader(io.StringIO(read_text(path, what), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    fields = set(reader.fieldnames or [])
    if not columns <= fields:
        raise DataFileError(
            path, f"the {what} file must start with the header {header_hint}, got {reader.fieldnames!r}.", "line 1"
        )
    rows = []
    for row in reader:
        short = sorted(c for c in columns if row.get(c) is None)
        if short:
            raise DataFileError(path, "the row has fewer cells than the header (tabs missing?).", f"line {reader.line_num}", short[0])
        rows.append((reader.line_num, row))
    return rows


def json_entry(value, path: str, row: str, kind: type = dict, what: str = "an object"):
    """`value` when it is a `kind` (a JSON object by default), else a named error."""
    if not isinstance(value, kind):
        raise DataFileError(path, f"expected {what}, got {json.dumps(value)[:80]}", row)
    return value


def text_field(entry: dict, field: str, path: str, row: str) -> str:
    """A non-empty string field of a row, stripped."""
    value = entry.get(field)
    if value is None:
        raise DataFileError(path, "is missing.", row, field)
    if not isinstance(value, str) or not value.strip():
        raise DataFileError(path, f"must be non-empty text, got {json.dumps(value)[:80]}.", row, field)
    return value.strip()


def id_field(entry: dict, field: str, path: str, row: str) -> str | int:
    """An id field: a non-empty string or an integer (as datasets write them)."""
    value = entry.get(field)
    if value is None:
        raise DataFileError(path, "is missing.", row, field)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        raise DataFileError(path, f"must be a non-empty string or an integer, got {json.dumps(value)[:80]}.", row, field)
    return value.strip() if isinstance(value, str) else value


def int_field(entry: dict, field: str, path: str, row: str, size: int | None = None) -> int:
    """An integer field (a string of digits too); with `size`, an index into a list of that size."""
    value = entry.get(field)
    if value is None:
        raise DataFileError(path, "is missing.", row, field)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataFileError(path, f"must be an integer, got {json.dumps(value)[:80]}.", row, field)
    if size is not None and not 0 <= value < size:
        raise DataFileError(path, f"is {value}, outside the list it indexes (0..{size - 1}).", row, field)
    return value


def unique_ids(ids: list[tuple[str, str]], path: str) -> None:
    """Refuses a repeated example id (`(id, row)` pairs): records are keyed on ids."""
    seen = {}
    for example_id, row in ids:
        if example_id in seen:
            raise DataFileError(path, f"repeats the id {example_id!r} of {seen[example_id]}; ids must be unique.", row)
        seen[example_id] = row


# ----------------------------------------------------------------------------------------------------------------
# Image names: a pattern over the ids, inside the image folder
# ----------------------------------------------------------------------------------------------------------------
def check_image_dir(image_dir: str, name: str = "image_dir") -> None:
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"`{name}` {image_dir!r} is not a folder.")


def check_image_pattern(image_pattern: str) -> None:
    """A file name pattern whose only field is `{id}` (with an optional format spec, e.g. `{id:012d}`)."""
    if not isinstance(image_pattern, str) or not image_pattern:
        raise ValueError(f"`image_pattern` (--image-pattern) must be a file name with {{id}}, got {image_pattern!r}.")
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(image_pattern) if name is not None]
    except ValueError as error:
        raise ValueError(f"`image_pattern` (--image-pattern) {image_pattern!r} is not a valid pattern: {error}.") from None
    if names != ["id"]:
        raise ValueError(
            f"`image_pattern` (--image-pattern) must contain the field {{id}} once and no other field, got "
            f"{image_pattern!r} (fields: {names})."
        )


def format_image_name(image_pattern: str, image_id, path: str, row: str, field: str) -> str:
    """`image_pattern` with the id; an id of digits given as a string fits numeric patterns (`{id:012d}`) too."""
    candidates = [image_id] + ([int(image_id)] if isinstance(image_id, str) and image_id.isdigit() else [])
    for candidate in candidates:
        try:
            return image_pattern.format(id=candidate)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            continue
    raise DataFileError(path, f"the id {image_id!r} does not fit --image-pattern {image_pattern!r}.", row, field)


def image_path_inside(image_dir: str, name: str, path: str, row: str, field: str) -> str:
    """`image_dir/name`, refusing a name that is absolute or climbs out of `image_dir` (`../x.png`): ids come from the
    data file, which must not choose what else is read. (Links inside the folder are the user's own, and followed.)"""
    root = os.path.abspath(image_dir)
    full = os.path.normpath(os.path.join(root, name))
    if os.path.isabs(name) or os.path.splitdrive(name)[0] or os.path.commonpath([root, full]) != root:
        raise DataFileError(
            path, f"the image name {name!r} is outside the image folder {image_dir!r}; names must be relative to it.",
            row, field,
        )
    return full


def find_image(full: str) -> str | None:
    """`full` when it is a file, else the same name with another usual image extension (CC3M's names have none)."""
    if os.path.isfile(full):
        return full
    stem = os.path.splitext(full)[0] if full.lower().endswith(IMAGE_EXTENSIONS) else full
    for extension in IMAGE_EXTENSIONS:
        if os.path.isfile(stem + extension):
            return stem + extension
    return None
