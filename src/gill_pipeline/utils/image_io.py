"""Opening image files with a pixel limit: the one place where the library, the commands, the demo and the
evaluation read an image from a path or from bytes (docs/security.md, "Images read from files").

A small file can declare a huge image: a 20000x20000 PNG of one colour is a few hundred kilobytes and decodes to 1.2 GB
of RGB. PIL guards against this only in part: above `PIL.Image.MAX_IMAGE_PIXELS` (about 89 MP) it merely warns
(`DecompressionBombWarning`), and above twice that it raises `DecompressionBombError`, which is not an `OSError`, so
callers that catch file errors let it through as a traceback. Here the size in the file's header is checked against
one limit (in place of PIL's) before anything is decoded, and every way PIL can fail becomes a `ValueError` that
names the file.
"""

import contextlib
import io
import os
import threading

import PIL.Image

# Largest image accepted, in pixels (width x height): 64 MP, e.g. 8192 x 8192. Above any ordinary photograph (a 61 MP
# camera gives 9504 x 6336 = 60.2 MP) and far above what GILL reads (its vision encoder sees 224 x 224), while the
# decoded RGB copy stays below 200 MB. Lower than PIL's own warning limit (89.5 MP), so PIL never warns first. Change it
# here for a whole program, per call with `max_pixels=`, or on the command line with `--max-image-pixels`.
MAX_IMAGE_PIXELS = 8192 * 8192

# PIL checks the declared size against its own limit inside `PIL.Image.open` (a warning, or an error that hides the
# size); ours replaces it: PIL's is lifted for the moment of reading the header, one thread at a time.
_PIL_LIMIT_LOCK = threading.Lock()


class ImageTooLargeError(ValueError):
    """An image file declares more pixels than the limit (`max_pixels`, `MAX_IMAGE_PIXELS`, `--max-image-pixels`)."""


class UnreadableImageError(ValueError):
    """A file is not an image PIL can decode: not an image format, truncated, or corrupt. `reason`: PIL's words."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"Cannot read the image {where}: {reason}")
        self.reason = reason


def check_max_pixels(max_pixels, name: str = "max_pixels") -> int:
    """`max_pixels` (None: the module's `MAX_IMAGE_PIXELS`) as a positive int, or a `ValueError` naming `name`."""
    if max_pixels is None:
        max_pixels = MAX_IMAGE_PIXELS
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
        raise ValueError(f"`{name}` must be a positive integer (pixels), got {max_pixels!r:.100}.")
    return max_pixels


def _too_large(where: str, width: int, height: int, limit: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"The image {where} is {width}x{height} pixels ({width * height:,}), above the limit of {limit:,} pixels "
        "(`max_pixels`, or --max-image-pixels on the command line)."
    )


def _open_header(stream) -> PIL.Image.Image:
    """`PIL.Image.open` (which reads the header only) without PIL's own size check: ours follows, with our limit."""
    with _PIL_LIMIT_LOCK:
        pil_limit, PIL.Image.MAX_IMAGE_PIXELS = PIL.Image.MAX_IMAGE_PIXELS, None
        try:
            return PIL.Image.open(stream)
        finally:
            PIL.Image.MAX_IMAGE_PIXELS = pil_limit


def read_image(source, max_pixels: int | None = None, name: str | None = None, mode: str | None = "RGB") -> PIL.Image.Image:
    r"""
    Opens and decodes one image with a pixel limit.

    Args:
        source (`str`, `os.PathLike`, `bytes` or a binary file object):
            The image file, or its bytes.
        max_pixels (`int`, *optional*):
            Largest width x height accepted; defaults to `MAX_IMAGE_PIXELS` (64 MP).
        name (`str`, *optional*):
            How errors name the image (default: the path; "<bytes>" for bytes).
        mode (`str`, *optional*, defaults to `"RGB"`):
            The PIL mode to convert to; `None` keeps the file's.

    Returns:
        `PIL.Image.Image`: the decoded image, detached from the file.

    Raises:
        `ImageTooLargeError` (a `ValueError`) when the declared size is above the limit, before it is decoded;
        `UnreadableImageError` (a `ValueError`) when PIL cannot decode it; `OSError` (e.g. `FileNotFoundError`, with
        the path) when the file cannot be opened.
    """
    limit = check_max_pixels(max_pixels)
    if isinstance(source, (bytes, bytearray)):
        where, stream = name or "<bytes>", io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        where, stream = name or os.fspath(source), open(source, "rb")  # a missing file: FileNotFoundError, with the path
    else:
        where, stream = name or getattr(source, "name", "<file>"), source
    try:
        # A file object the caller opened is read, not closed.
        with stream if stream is not source else contextlib.nullcontext(source):
            image = _open_header(stream)
            width, height = image.size
            if width * height > limit:
                raise _too_large(where, width, height, limit)
            with image:
                image.load()  # decode now: a truncated file fails here, not later in a model
                return image.convert(mode) if mode is not None and image.mode != mode else image.copy()
    except (ImageTooLargeError, UnreadableImageError):
        raise
    except PIL.Image.DecompressionBombError as error:  # some formats check again while loading (PIL's limit)
        raise ImageTooLargeError(f"The image {where} is too large for PIL.Image.MAX_IMAGE_PIXELS: {error}") from None
    except (PIL.UnidentifiedImageError, SyntaxError, EOFError, ValueError, TypeError, IndexError) as error:
        raise UnreadableImageError(where, str(error)) from None
    except OSError as error:
        # PIL reports truncated and corrupt data as OSError ("image file is truncated", "broken data stream").
        raise UnreadableImageError(where, str(error)) from None

