"""Loading the images of a retrieval index safely: local files only inside the image root, URLs only on request."""

import os
import tarfile
import urllib.request

import PIL.Image

from ..utils.image_io import read_image

# Largest download accepted for one image, in bytes.
MAX_DOWNLOAD_BYTES = 32 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 10.0
URL_SCHEMES = ("http://", "https://")
TAR_BLOCK = 512


class ImageLoadError(OSError):
    """An image of a retrieval index is missing, unreadable or refused (path outside the root, URL not allowed)."""


class UnsafeImagePathError(ImageLoadError):
    """A path of a retrieval index points outside its image root (absolute, `..`, or a symbolic link out)."""


def is_url(path: str) -> bool:
    return isinstance(path, str) and path.lower().startswith(URL_SCHEMES)


def resolve_local_path(image_root: str, path: str, link_root: str | None = None) -> str:
    """`path` relative to `image_root` -> an absolute path, refusing anything that resolves outside the root.

    Symbolic links are followed before the check, so a link inside the root that points out of it is refused too,
    unless it points inside `link_root`: the Hub cache keeps a snapshot's files as links to `../../blobs/`, so an
    index downloaded from the Hub passes its repo's cache folder here.
    """
    if not isinstance(path, str) or not path:
        raise UnsafeImagePathError(f"An image path must be a non-empty relative path, got {path!r}.")
    if os.path.isabs(path) or path.startswith(("\\", "/")) or ":" in os.path.splitdrive(path)[0]:
        raise UnsafeImagePathError(
            f"Refusing the absolute image path {path!r}: paths must be relative to the image root."
        )
    root = os.path.realpath(image_root)
    lexical = os.path.normpath(os.path.join(root, path))
    full = os.path.realpath(lexical)
    allowed = [root] + ([os.path.realpath(link_root)] if link_root is not None else [])
    if os.path.commonpath([root, lexical]) != root or not any(os.path.commonpath([a, full]) == a for a in allowed):
        raise UnsafeImagePathError(
            f"Refusing the image path {path!r}: it resolves to {full}, outside the image root {root}."
        )
    return full


def _download(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "gill_pipeline"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (scheme checked by the caller)
        data = response.read(MAX_DOWNLOAD_BYTES + 1)
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ImageLoadError(f"{url} is larger than {MAX_DOWNLOAD_BYTES} bytes.")
    return data


def _read_range(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ImageLoadError(f"{path} is shorter than expected ({len(data)} of {size} bytes at offset {offset}).")
    return data


def _tar_member_range(record: dict, full: str) -> tuple[int, int]:
    """The byte range of a record's image inside the tar file `full`: its `offset`/`size`, checked against the tar
    header just before it when the record names its `member` (a stale offset into a rewritten shard is an error,
    not another image); or, with a `member` and no offset, found by walking the tar's headers (data is skipped)."""
    where = f"the index entry {record.get('id')!r} ({record.get('path')!r}"
    member = record.get("member")
    if "offset" in record:
        offset, size = record.get("offset"), record.get("size")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, size)):
            raise ImageLoadError(f"{where}): `offset` and `size` must be non-negative integers, got {offset!r} and "
                                 f"{size!r}.")
        if member is not None and offset >= TAR_BLOCK:
            header = _read_range(full, offset - TAR_BLOCK, TAR_BLOCK)
            try:
                info = tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
            except tarfile.TarError as error:
                raise ImageLoadError(f"{where}): no tar header before offset {offset} ({error}); is {full} the shard "
                                     "the index was built from?") from error
            # Names over 100 characters live in an extension header further back: only the size is checked then.
            if info.size != size or (len(str(member)) < 100 and info.name != member):
                raise ImageLoadError(f"{where}): the tar header at offset {offset - TAR_BLOCK} is {info.name!r} "
                                     f"({info.size} bytes), not the member {member!r} ({size} bytes).")
        return offset, size
    if not isinstance(member, str) or not member:
        raise ImageLoadError(f"{where}): a tar shard needs `member` (a name) or `offset` and `size`, got {record!r:.200}.")
    try:
        with tarfile.open(full, mode="r:") as tar:
            for info in tar:
                if info.name == member:
                    if not info.isfile():
                        break
                    return info.offset_data, info.size
    except tarfile.TarError as error:
        raise ImageLoadError(f"{where}): {full} is not a readable uncompressed tar file ({error}).") from error
    raise ImageLoadError(f"{where}): {full} has no file member {member!r}.")


def decode_image(data: bytes, where: str, max_pixels: int | None = None) -> PIL.Image.Image:
    """The RGB image in `data`, within the pixel limit of `gill_pipeline.utils.image_io`; else [`ImageLoadError`] (so an
    index skips the image and tries the next one)."""
    try:
        return read_image(data, max_pixels=max_pixels, name=where)
    except ValueError as error:  # image_io's ImageTooLargeError and UnreadableImageError name the image already
        raise ImageLoadError(str(error)) from error


def load_record_image(
    record: dict,
    image_root: str | None,
    allow_urls: bool = False,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    link_root: str | None = None,
    max_pixels: int | None = None,
) -> PIL.Image.Image:
    """Loads the image of one index record as an RGB PIL image, or raises [`ImageLoadError`].

    A record has a `path`: a URL, or a path relative to `image_root`. Records of images inside tar shards
    (webdataset) also have `offset` and `size`, the byte range of the image inside the tar file at `path`, and/or
    `member`, its name in the tar: only that member is read (a seek to it; with a name alone, the tar's headers are
    walked to find it). An image
    above `max_pixels` (default: `gill_pipeline.utils.image_io.MAX_IMAGE_PIXELS`) is refused before it is decoded.
    """
    path = record.get("path")
    if is_url(path):
        if not allow_urls:
            raise ImageLoadError(
                f"The index entry {record.get('id')!r} is a URL ({path}); downloading is off. Load the index with "
                "`allow_urls=True` to allow it."
            )
        try:
            return decode_image(_download(path, timeout), path, max_pixels)
        except ImageLoadError:
            raise
        except Exception as error:  # urllib raises many types (URLError, HTTPError, timeouts, ...)
            raise ImageLoadError(f"Cannot download {path}: {error}") from error
    if image_root is None:
        raise ImageLoadError(
            f"The index entry {record.get('id')!r} is a local path ({path!r}) but the index has no image root; pass "
            "`image_root=` when loading it."
        )
    full = resolve_local_path(image_root, path, link_root=link_root)
    try:
        if "offset" in record or "member" in record or path.lower().endswith(".tar"):
            if not os.path.isfile(full):
                raise ImageLoadError(f"The index entry {record.get('id')!r}: its tar shard {full} does not exist.")
            offset, size = _tar_member_range(record, full)
            data = _read_range(full, offset, size)
            member = record.get("member")
            where = f"{path} (member {member!r}, offset {offset})" if member is not None else f"{path} (offset {offset})"
            return decode_image(data, where, max_pixels)
        with open(full, "rb") as f:
            data = f.read()
    except ImageLoadError:
        raise
    except OSError as error:
        raise ImageLoadError(f"Cannot read the image {full}: {error}") from error
    return decode_image(data, full, max_pixels)
