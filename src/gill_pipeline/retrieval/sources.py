"""Where the images of an index come from: a folder, a CC3M-style caption TSV, or webdataset tar shards.

Each source yields records (`id`, `path` relative to the source's `root` or a URL, `caption`, ...) in a fixed
order, without decoding any image: a build skips the ids already in the index before it loads anything, which makes
resuming and adding images cheap.
"""

import csv
import glob
import json
import os
import sys
import tarfile
from collections.abc import Iterator

from .image_loading import is_url

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# webdataset keys: a sample's files share the name up to the first dot of the base name.
WEBDATASET_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp")
WEBDATASET_CAPTION_SUFFIXES = ("txt", "caption")
TSV_EXTENSIONS = (".tsv",)
CSV_EXTENSIONS = (".csv",)


class ImageFolderSource:
    r"""
    Every image under `root` (recursively, sorted, hidden files and folders skipped). The id and path are the
    image's path relative to `root`; the caption is the text of a `<same name>.txt` file beside it, if any.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = str(root)
        if not os.path.isdir(self.root):
            raise ValueError(f"`source` must be an existing folder, got {self.root!r}.")

    def _files(self) -> list[str]:
        found = []
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(os.path.relpath(os.path.join(folder, name), self.root).replace(os.sep, "/"))
        return found

    def __len__(self) -> int:
        return len(self._files())

    def __iter__(self) -> Iterator[dict]:
        for path in self._files():
            caption_file = os.path.join(self.root, os.path.splitext(path)[0] + ".txt")
            caption = None
            if os.path.isfile(caption_file):
                with open(caption_file, encoding="utf-8", errors="replace") as f:
                    caption = f.read().strip()
            yield {"id": path, "path": path, "caption": caption}


class CaptionTSVSource:
    r"""
    A CC3M-style caption file: a header line naming the columns (`caption<TAB>image`), then one caption and one
    image per line. The image column holds a URL or a file name relative to `image_root`.

    Args:
        tsv_path (`str`): The file.
        image_root (`str`, *optional*): Folder of the image files; defaults to the TSV's folder.
        caption_column (`str`, *optional*, defaults to `"caption"`), image_column (`str`, *optional*, defaults to
        `"image"`): Column names in the header.
        image_suffix (`str`, *optional*, defaults to `""`): Appended to each file name (e.g. `".jpg"` when the column
            holds bare names such as `0_1595581236`).
        delimiter (`str`, *optional*, defaults to a tab): `","` reads the same columns from a CSV file (quoted as
            Python's `csv` module writes it).
    """

    def __init__(
        self,
        tsv_path: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        caption_column: str = "caption",
        image_column: str = "image",
        image_suffix: str = "",
        delimiter: str = "\t",
    ):
        self.tsv_path = str(tsv_path)
        # A TSV is read as CC3M writes it (no quoting); a CSV as the csv module writes it.
        self._format = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if delimiter == "\t" else dict(delimiter=delimiter)
        if not os.path.isfile(self.tsv_path):
            raise ValueError(f"`tsv_path` must be an existing file, got {self.tsv_path!r}.")
        self.root = str(image_root) if image_root is not None else os.path.dirname(os.path.abspath(self.tsv_path))
        self.caption_column, self.image_column, self.image_suffix = caption_column, image_column, image_suffix
        with open(self.tsv_path, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f, **self._format), [])
        for name, column in (("caption_column", caption_column), ("image_column", image_column)):
            if column not in header:
                raise ValueError(f"`{name}`={column!r} is not a column of {self.tsv_path}; its header is {header}.")
        self._caption_at, self._image_at = header.index(caption_column), header.index(image_column)

    def __len__(self) -> int:
        with open(self.tsv_path, "rb") as f:
            return max(0, sum(1 for line in f if line.strip()) - 1)

    def __iter__(self) -> Iterator[dict]:
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        with open(self.tsv_path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, **self._format)
            next(reader)
            for row in reader:
                if len(row) <= max(self._caption_at, self._image_at):
                    continue
                image = row[self._image_at].strip()
                if not image:
                    continue
                path = image if is_url(image) else image + self.image_suffix
                yield {"id": image, "path": path, "caption": row[self._caption_at]}


class WebDatasetSource:
    r"""
    webdataset shards: uncompressed `.tar` files whose members are grouped into samples by key (`key.jpg`,
    `key.txt`, `key.json`). Images are not extracted: each record stores the shard path (relative to `root`) and
    the byte range of the image inside it, so retrieval reads it directly.

    Args:
        shards (`str` or `list[str]`): A folder of `.tar` files, a glob pattern, or a list of files.
        root (`str`, *optional*): The folder records are relative to; defaults to the shards' common folder.
    """

    def __init__(self, shards: str | os.PathLike | list, root: str | os.PathLike | None = None):
        if isinstance(shards, (list, tuple)):
            files = [str(s) for s in shards]
        elif os.path.isdir(str(shards)):
            files = sorted(glob.glob(os.path.join(str(shards), "*.tar")))
        else:
            files = sorted(glob.glob(str(shards)))
        if not files:
            raise ValueError(f"`shards`={shards!r} names no .tar file.")
        for file in files:
            if not file.endswith(".tar") or not os.path.isfile(file):
                raise ValueError(
                    f"`shards` must name existing uncompressed .tar files (images are read in place), got {file!r}."
                )
        self.files = [os.path.abspath(f) for f in files]
        self.root = str(root) if root is not None else os.path.commonpath([os.path.dirname(f) for f in self.files])

    def __len__(self):
        raise TypeError("The number of samples in webdataset shards is not known without reading them.")

    def __iter__(self) -> Iterator[dict]:
        for file in self.files:
            rel = os.path.relpath(file, self.root).replace(os.sep, "/")
            with tarfile.open(file, mode="r:") as tar:
                sample, key = {}, None
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, base = os.path.split(member.name)
                    if "." not in base:
                        continue
                    stem, suffix = base.split(".", 1)
                    member_key = f"{folder}/{stem}" if folder else stem
                    if member_key != key:
                        if sample:
                            yield from self._record(sample, key, rel, tar)
                        sample, key = {}, member_key
                    sample[suffix.lower()] = member
                if sample:
                    yield from self._record(sample, key, rel, tar)

    @staticmethod
    def _record(sample: dict, key: str, rel: str, tar: tarfile.TarFile) -> Iterator[dict]:
        image = next((sample[s] for s in WEBDATASET_IMAGE_SUFFIXES if s in sample), None)
        if image is None:
            return
        record = {"id": key, "path": rel, "member": image.name, "offset": image.offset_data, "size": image.size}
        caption = next((sample[s] for s in WEBDATASET_CAPTION_SUFFIXES if s in sample), None)
        record["caption"] = tar.extractfile(caption).read().decode("utf-8", "replace").strip() if caption else None
        if "json" in sample:
            try:
                meta = json.loads(tar.extractfile(sample["json"]).read())
                if isinstance(meta, dict) and isinstance(meta.get("url"), str):
                    record["url"] = meta["url"]
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
        yield record


def as_source(source, **kwargs):
    """A source object from what the user gave: a source object, a folder of images, a `.tsv` caption file, `.tar`
    shards (a file, a glob, a list) or a folder of them (when it holds `.tar` files and no images)."""
    if hasattr(source, "root") and hasattr(source, "__iter__"):
        return source
    if isinstance(source, (list, tuple)):
        return WebDatasetSource(source, **kwargs)
    path = str(source)
    if os.path.isdir(path):
        has_tars = bool(glob.glob(os.path.join(path, "*.tar")))
        has_images = any(n.lower().endswith(IMAGE_EXTENSIONS) for n in os.listdir(path))
        return WebDatasetSource(path, **kwargs) if has_tars and not has_images else ImageFolderSource(path, **kwargs)
    if path.lower().endswith(TSV_EXTENSIONS):
        return CaptionTSVSource(path, **kwargs)
    if path.lower().endswith(CSV_EXTENSIONS):
        return CaptionTSVSource(path, delimiter=",", **kwargs)
    if path.endswith(".tar") or glob.has_magic(path):
        return WebDatasetSource(path, **kwargs)
    raise ValueError(
        f"`source` must be a folder of images, a CC3M-style .tsv (or .csv) caption file, or webdataset .tar shards; got "
        f"{path!r}."
    )
