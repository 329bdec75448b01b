"""Rows of a data set's index files, shared by every reader (image-caption sets in data.py, interleaved documents in
interleaved.py, the decision head's TSV): lines decoded one by one, example keys, malformed rows counted, skipped
examples. It imports no other reader, so each of them can import it.
"""

import codecs
import logging

logger = logging.getLogger(__name__)

SKIP_IMAGE = "image"  # the example's image is missing or unreadable
SKIP_ROW = "row"  # the example itself is malformed (a webdataset sample without a readable caption)


def record_key(image: str, line_number: int) -> str:
    """The key of a row of an index file (TSV, captions.jsonl): its image and its line number.

    An image may have several caption rows (COCO style); every row is its own example, with its own precomputed
    target, so the image alone cannot be the key.
    """
    return f"{image}#{line_number}"


def unique_records(records, source: str):
    """Yields `records` ((key, ...) tuples), raising a `ValueError` at the first key seen twice: precomputed targets
    are stored and looked up by key, so two examples under one key would silently share one target."""
    seen = set()
    for record in records:
        if record[0] in seen:
            raise ValueError(
                f"Example key {record[0]!r} occurs twice in {source}: each example needs its own key (its precomputed "
                "target is stored under it). Give every sample a distinct key (webdataset: `__key__`)."
            )
        seen.add(record[0])
        yield record


def decoded_lines(path: str):
    """(line number, text, problem) for every line of a UTF-8 text file, counted from 1.

    A UTF-8 byte-order mark before the first line is dropped (spreadsheet exports write one), and line ends (LF or
    CRLF) are stripped. A line that is not valid UTF-8 comes with `text=None` and the problem in words: one bad line
    must not end a run over millions of good ones.
    """
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if line_number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                yield line_number, raw.decode("utf-8").rstrip("\r\n"), None
            except UnicodeDecodeError as error:
                yield line_number, None, f"not valid UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1})"


def decode_text(data: bytes) -> tuple[str | None, str | None]:
    """bytes of a caption file -> (text, None), or (None, the problem with its line) when not valid UTF-8."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        return None, f"line {line}: not valid UTF-8 (byte {data[error.start]:#04x})"


class RowProblems(list):
    """Rows of a data set's index skipped as malformed: `(file, line, problem)`, each logged once, when found."""

    def add(self, path: str, line_number: int | None, problem: str) -> None:
        self.append((path, line_number, problem))
        where = path if line_number is None else f"{path}, line {line_number}"
        logger.warning("Skipping a malformed row (%s): %s", where, problem)


def skipped_example(key: str, kind: str, reason: str) -> dict:
    """An example the collator drops; the loop counts it once per key and logs `reason` (which names the file)."""
    return {"key": key, "caption": "", "skipped": True, "skip_kind": kind, "skip_reason": reason}
