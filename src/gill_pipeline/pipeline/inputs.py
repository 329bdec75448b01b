"""Checking and normalising interleaved inputs: text segments and images."""

import math
import re
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import logging

from ..constants import IMG_TOKEN_TEMPLATE


logger = logging.get_logger(__name__)

# GILL's [IMG] tokens written as text ("[IMG0]", ...).
IMG_TOKEN_TEXT = re.compile(re.escape(IMG_TOKEN_TEMPLATE).replace(re.escape("{i}"), r"\d+"))

# Smallest accepted image side, in pixels. Smaller images carry no usable content for a vision encoder.
MIN_IMAGE_SIDE = 8

# PIL modes that convert to RGB without losing meaning.
_DIRECT_MODES = {"RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV"}
_ALPHA_MODES = {"RGBA", "LA", "RGBa", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def is_image(element: Any) -> bool:
    return isinstance(element, (PIL.Image.Image, np.ndarray, torch.Tensor))


def normalize_interleaved_inputs(inputs: Any, name: str = "inputs") -> tuple[list[list[Any]], bool]:
    """Turns the user's input into a batch (a list of interleaved lists) and says whether it was a batch.

    Accepted: one `str` or image; one list of `str` and images; a list of such lists (a batch).
    """
    if inputs is None:
        raise ValueError(f"`{name}` must be text, an image, or a list of them; got None.")
    if isinstance(inputs, str) or is_image(inputs):
        return [[inputs]], False
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(
            f"`{name}` must be a `str`, an image (PIL.Image, numpy array or torch tensor), a list of them, or a "
            f"list of such lists; got {type(inputs).__name__}: {inputs!r:.200}."
        )
    if len(inputs) == 0:
        raise ValueError(f"`{name}` is empty: give at least one text segment or image.")

    nested = [isinstance(x, (list, tuple)) for x in inputs]
    if any(nested) and not all(nested):
        raise ValueError(
            f"`{name}` mixes lists and single elements at the top level ({[type(x).__name__ for x in inputs]}). "
            "Give one interleaved list, or a list of interleaved lists (a batch)."
        )
    batch = [list(x) for x in inputs] if all(nested) else [list(inputs)]
    for b, sample in enumerate(batch):
        where = f"{name}[{b}]" if all(nested) else name
        if len(sample) == 0:
            raise ValueError(f"`{where}` is empty: give at least one text segment or image.")
        for i, element in enumerate(sample):
            if isinstance(element, (list, tuple)):
                raise ValueError(
                    f"`{where}[{i}]` is a {type(element).__name__}: interleaved inputs nest at most two levels "
                    "(a batch of lists of text and images)."
                )
            if not (isinstance(element, str) or is_image(element)):
                raise TypeError(
                    f"`{where}[{i}]` must be a `str` or an image (PIL.Image, numpy HWC uint8 array or CHW torch "
                    f"tensor); got {type(element).__name__}: {element!r:.200}."
                )
    return batch, bool(all(nested))


def check_interleaved_sample(sample: list[Any], name: str) -> list[Any]:
    """One interleaved list -> the same list with every image as an RGB PIL image; raises, naming the element, for
    text that cannot be encoded (e.g. a lone surrogate) and images that cannot be read or converted."""
    checked = []
    for i, element in enumerate(sample):
        if isinstance(element, str):
            checked.append(check_text(element, f"{name}[{i}]"))
            if IMG_TOKEN_TEXT.search(element):
                # Plain input is the LM's raw input (special tokens are read as such, as `tokenizer(text)` reads
                # them); chat messages refuse this outright (`chat.refuse_control_markers`).
                logger.warning(
                    f"`{name}[{i}]` contains {IMG_TOKEN_TEXT.search(element).group()!r}: the LM reads it as GILL's "
                    "[IMG] token (an image request), not as text."
                )
        else:
            checked.append(to_rgb_pil(element, f"{name}[{i}]"))
    return checked


def check_text(text: str, name: str) -> str:
    """`text`, or a ValueError naming `name` when it cannot be encoded (e.g. a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"`{name}` is text that cannot be encoded as UTF-8: character {text[error.start]!r} at position "
            f"{error.start} ({error.reason}). Remove it or fix the text's decoding."
        ) from None
    return text


def to_rgb_pil(image: Any, name: str = "image") -> PIL.Image.Image:
    """Converts a PIL image, a numpy HWC uint8 array or a CHW tensor to an RGB PIL image, or raises."""
    if isinstance(image, torch.Tensor):
        image = _tensor_to_pil(image, name)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image, name)
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"`{name}` must be a PIL.Image, numpy array or torch tensor; got {type(image).__name__}.")
    try:
        image.load()  # a closed image, or a file truncated or removed since it was opened, fails here
    except (ValueError, OSError) as error:
        raise ValueError(f"`{name}` is a PIL image that cannot be read: {error}.") from None

    width, height = image.size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"`{name}` is {width}x{height} pixels; images must be at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}."
        )

    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        # Palette images may carry transparency; go through RGBA so it is composited like the alpha modes.
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        # Transparent pixels have no colour of their own: composite on white, as image viewers show them.
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _DIRECT_MODES:
        return image.convert("RGB")
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit greyscale: scale 0..65535 down to 0..255 (PIL's own convert would clip everything above 255).
        array = np.asarray(image, dtype=np.uint16).astype(np.float32) / 257.0
        return PIL.Image.fromarray(np.round(array).astype(np.uint8)).convert("RGB")
    raise ValueError(
        f"`{name}` has PIL mode {mode!r}, which has no meaningful RGB conversion (integer or floating-point "
        "data images). Convert it to an 8-bit RGB image first."
    )


def _array_to_pil(array: np.ndarray, name: str) -> PIL.Image.Image:
    if np.issubdtype(array.dtype, np.floating):
        # Float HWC in [0, 1], as diffusers' `output_type="np"` gives images (so an answer can be fed back).
        if not np.isfinite(array).all():
            raise ValueError(f"`{name}` is a float array with NaN or infinite values; image values must be in [0, 1].")
        lo, hi = float(array.min()), float(array.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"`{name}` is a float array with values in [{lo:.3f}, {hi:.3f}]; float image arrays must be in [0, 1] "
                "(uint8 arrays in 0..255)."
            )
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    if array.dtype != np.uint8:
        raise TypeError(
            f"`{name}` is a numpy array of dtype {array.dtype}; numpy images must be uint8 (0..255) or float in "
            "[0, 1], HWC or HW."
        )
    # uint8 HW -> "L", HWC with 3 channels -> "RGB", with 4 -> "RGBA".
    if array.ndim == 2:
        return PIL.Image.fromarray(np.ascontiguousarray(array))
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        if array.shape[-1] == 1:
            return PIL.Image.fromarray(np.ascontiguousarray(array[..., 0]))
        return PIL.Image.fromarray(np.ascontiguousarray(array))
    raise ValueError(
        f"`{name}` is a numpy array of shape {array.shape}; expected HWC with 1, 3 or 4 channels, or HW."
    )


def _tensor_to_pil(tensor: torch.Tensor, name: str) -> PIL.Image.Image:
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(
            f"`{name}` is a tensor of shape {tuple(tensor.shape)}; expected CHW with 1 or 3 channels (one image, "
            "not a batch)."
        )
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"`{name}` is a float tensor with NaN or infinite values; image values must be in [0, 1].")
    if tensor.dtype == torch.uint8:
        array = tensor.permute(1, 2, 0).numpy()
    elif tensor.is_floating_point():
        lo, hi = float(tensor.min()), float(tensor.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"`{name}` is a float tensor with values in [{lo:.3f}, {hi:.3f}]; float image tensors must be in "
                "[0, 1] (uint8 tensors in 0..255)."
            )
        array = (tensor.float().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    else:
        raise TypeError(f"`{name}` is a tensor of dtype {tensor.dtype}; expected uint8 or a floating-point dtype.")
    return _array_to_pil(array, name)


def is_number(value) -> bool:
    """A finite int or float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(value, name: str, minimum: int):
    """Refuses, naming `name`, anything but an int >= `minimum`."""
    # A bool is not an int here, and neither is a float such as 2.0: both are usually a mistake.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"`{name}` must be {kind}, got {value!r:.100} ({type(value).__name__}).")


def check_number(value, name: str, positive: bool = False, minimum: float | None = None):
    """Refuses, naming `name`, anything but a finite number (> 0 with `positive`, >= `minimum`)."""
    if not is_number(value) or (positive and value <= 0) or (minimum is not None and value < minimum):
        kind = "a positive finite number" if positive else f"a finite number >= {minimum}"
        raise ValueError(f"`{name}` must be {kind}, got {value!r:.100} ({type(value).__name__}).")


def check_bool(value, name: str):
    """Refuses, naming `name`, anything but True or False (1 or "yes" are usually a mistake)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {type(value).__name__} {value!r:.100}.")


# Seeds are whole numbers in [0, MAX_SEED): what `torch.Generator.manual_seed` takes (it overflows above 2**64) on
# every surface alike (`gill --seed`, the web page, `evaluation`).
MAX_SEED = 2**63


def check_seed(value, name: str = "seed") -> int:
    """A seed as an int, or a ValueError naming `name` (1e30 would overflow inside torch, with no name)."""
    seed = value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        seed = int(value)  # number boxes deliver whole floats
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"`{name}` must be a whole number in [0, 2**63), got {value!r:.100} ({type(value).__name__}).")
    return seed


def seeded_generator(seed, name: str = "seed") -> torch.Generator:
    """A fresh CPU generator seeded with `seed`, checked first (see `check_seed`)."""
    return torch.Generator().manual_seed(check_seed(seed, name))


def check_generator(generator, num_inputs: int):
    """`generator`: None, one `torch.Generator`, or a list of one per input."""
    if isinstance(generator, list):
        if len(generator) != num_inputs:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators, but {num_inputs} inputs were given: pass "
                "one generator per input, or a single generator."
            )
        bad = [g for g in generator if not isinstance(g, torch.Generator)]
    else:
        bad = [] if generator is None or isinstance(generator, torch.Generator) else [generator]
    if bad:
        raise TypeError(
            f"`generator` must be a `torch.Generator`, a list of them (one per input) or None, got "
            f"{type(bad[0]).__name__} {bad[0]!r:.100}; e.g. `generator=torch.Generator().manual_seed(42)`."
        )
