"""Loading the images of a retrieval index safely: local files only inside the image root, URLs only on request."""

import os
import urllib.request

import PIL.Image

from ..utils.image_io import read_image

# Largest download accepted for one image, in bytes.
MAX_DOWNLOAD_BYTES = 32 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 10.0
URL_SCHEMES = ("http://", "https://")


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
    (webdataset) also have `offset` and `size`, the byte range of the image inside the tar file at `path`. An image
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
        if "offset" in record:
            data = _read_range(full, int(record["offset"]), int(record["size"]))
            return decode_image(data, f"{path} (offset {record['offset']})", max_pixels)
        with open(full, "rb") as f:
            data = f.read()
    except ImageLoadError:
        raise
    except OSError as error:
        raise ImageLoadError(f"Cannot read the image {full}: {error}") from error
    return decode_image(data, full, max_pixels)
