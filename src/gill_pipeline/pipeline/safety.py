"""An optional safety check on every image GILL shows, generated or retrieved.

GILL runs its decoder from the mapper's conditioning, without the decoder checkpoint's own safety checker (the stock
pipeline is built with `safety_checker=None`), and retrieved images come from a user's own set. Nothing is checked
unless a checker is set: the pipeline then says so once (as diffusers does for `safety_checker=None`). A checker is
either a callable `checker(images: list[PIL.Image]) -> (images, has_nsfw_concepts)` or diffusers'
`StableDiffusionSafetyChecker` with a CLIP image processor; it runs on every candidate of every `[IMG]` group (both
images with `image_mode="both"`), before an image is streamed or returned. A flagged image is replaced by what the
checker returns (black for diffusers' checker) and marked `nsfw_content_detected`. See docs/security.md.
"""

import inspect
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers.utils import logging

from ..models.placement import compute_device
from .pipeline_output import GILLImage


logger = logging.get_logger(__name__)

# Arguments of `from_pretrained` / `from_base_models` that set the checker instead of being passed to the loaders.
SAFETY_KWARGS = ("safety_checker", "safety_feature_extractor")

NO_SAFETY_CHECKER_WARNING = (
    "No safety checker runs on the images this GILLPipeline generates or retrieves (the decoder checkpoint's own "
    "checker is not used). Ensure that you abide by the conditions of the decoder's license and do not expose "
    "unfiltered results in services open to the public; set one with `pipe.set_safety_checker(...)` (a callable, or "
    "diffusers' `StableDiffusionSafetyChecker`). See docs/security.md."
)


def pop_safety_checker(kwargs: dict) -> tuple | None:
    """Takes `safety_checker=` / `safety_feature_extractor=` out of loader `kwargs`; `(checker, extractor)` or None."""
    if "safety_checker" not in kwargs and "safety_feature_extractor" not in kwargs:
        return None
    return kwargs.pop("safety_checker", None), kwargs.pop("safety_feature_extractor", None)


class DiffusersSafetyCheck:
    """diffusers' `StableDiffusionSafetyChecker` (or anything with its `forward(clip_input, images)`) as a callable
    over PIL images; the CLIP input is made by `feature_extractor` on the checker's own device and dtype."""

    def __init__(self, checker: torch.nn.Module, feature_extractor):
        self.checker = checker
        self.feature_extractor = feature_extractor

    @torch.no_grad()
    def __call__(self, images: list[PIL.Image.Image]) -> tuple[list[PIL.Image.Image], list[bool]]:
        dtype = next(self.checker.parameters()).dtype
        # Where the checker computes: under offload its weights may be on `meta` (see `models.placement`).
        device = compute_device(self.checker) or torch.device("cpu")
        clip_input = self.feature_extractor(images, return_tensors="pt").pixel_values
        arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images])
        checked, flags = self.checker(clip_input=clip_input.to(device=device, dtype=dtype), images=arrays)
        checked = [PIL.Image.fromarray((np.clip(np.asarray(a), 0, 1) * 255).round().astype(np.uint8)) for a in checked]
        return checked, [bool(flag) for flag in flags]


def as_safety_check(safety_checker: Any, feature_extractor=None) -> Callable | None:
    """`safety_checker` as a callable over PIL images (None stays None); refuses anything else by name."""
    if safety_checker is None:
        return None
    if isinstance(safety_checker, torch.nn.Module) and "clip_input" in _forward_parameters(safety_checker):
        if feature_extractor is None:
            raise ValueError(
                f"`safety_checker` is a {type(safety_checker).__name__}, which reads CLIP pixel values: pass its "
                "image processor as `feature_extractor` (`safety_feature_extractor` when loading), e.g. "
                "`CLIPImageProcessor.from_pretrained(<sd checkpoint>, subfolder='feature_extractor')`."
            )
        return DiffusersSafetyCheck(safety_checker, feature_extractor)
    if callable(safety_checker):
        return safety_checker
    raise TypeError(
        "`safety_checker` must be a callable `(list of PIL images) -> (images, has_nsfw_concepts)`, diffusers' "
        f"`StableDiffusionSafetyChecker` or None, got {type(safety_checker).__name__} {safety_checker!r:.100}."
    )


def _forward_parameters(module) -> tuple[str, ...]:
    return tuple(inspect.signature(module.forward).parameters)


def _to_pil(image, image_processor) -> PIL.Image.Image:
    if isinstance(image, PIL.Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image_processor.pt_to_numpy(image[None].float().cpu())[0]
    return image_processor.numpy_to_pil(np.asarray(image)[None])[0]


def _like(image: PIL.Image.Image, reference, image_processor):
    """`image` (PIL) in the type of `reference` (PIL, HWC numpy in [0, 1] or CHW tensor in [0, 1])."""
    if isinstance(reference, PIL.Image.Image):
        return image
    array = image_processor.pil_to_numpy([image])
    if isinstance(reference, torch.Tensor):
        return image_processor.numpy_to_pt(array)[0].to(device=reference.device, dtype=reference.dtype)
    return array[0].astype(reference.dtype, copy=False)


def check_images(check: Callable, images: list[GILLImage], output_type: str, image_processor) -> None:
    """Runs `check` on every candidate of `images` (in place): flagged candidates are replaced by what the check
    returns, and each GILLImage's `nsfw_content_detected` says whether its shown image was flagged. Latents are
    not images: with `output_type="latent"` generated images are left unchecked (flag None), as in diffusers."""
    for gill_image in images:
        if output_type == "latent" and gill_image.source == "generated":
            continue
        candidates = gill_image.candidates or [gill_image.image]
        pil = [_to_pil(c, image_processor) for c in candidates]
        checked, flags = check(pil)
        if len(checked) != len(pil) or len(flags) != len(pil):
            raise ValueError(
                f"`safety_checker` returned {len(checked)} images and {len(flags)} flags for {len(pil)} images; it "
                "must return one of each per image."
            )
        candidates = [
            _like(new, old, image_processor) if flag else old for new, old, flag in zip(checked, candidates, flags)
        ]
        gill_image.candidates = candidates
        gill_image.image = candidates[0]
        gill_image.nsfw_content_detected = bool(flags[0])


class SafetyCheckerMixin:
    """The pipeline's optional safety check (see this module's docstring)."""

    _safety_check = None
    _warned_no_safety_checker = False

    def set_safety_checker(self, safety_checker: Any, feature_extractor=None) -> None:
        r"""
        Sets the check run on every image this pipeline shows, generated or retrieved (None removes it).

        Args:
            safety_checker (`Callable` or `StableDiffusionSafetyChecker`): A callable `(list of PIL images) ->
                (images, has_nsfw_concepts)` (one image and one flag per input image; flagged images are replaced
                by the returned ones), or diffusers' `StableDiffusionSafetyChecker` (e.g. from
                `StableDiffusionSafetyChecker.from_pretrained(<sd checkpoint>, subfolder="safety_checker")`; it is
                not moved by `pipe.to`: put it on the device you want).
            feature_extractor (`CLIPImageProcessor`, *optional*): The CLIP image processor of a
                `StableDiffusionSafetyChecker`.
        """
        self._safety_check = as_safety_check(safety_checker, feature_extractor)
        self._safety_checker = safety_checker

    @property
    def safety_checker(self):
        """The checker set with `set_safety_checker` (None when images are not checked)."""
        return getattr(self, "_safety_checker", None)

    def run_safety_checker(self, images: dict, output_type: str) -> None:
        """Checks the GILLImages of a step's results in place (see `check_images`); without a checker, warns once
        per pipeline that nothing is checked."""
        if not images:
            return
        if self._safety_check is None:
            if not self._warned_no_safety_checker:
                logger.warning(NO_SAFETY_CHECKER_WARNING)
                self._warned_no_safety_checker = True
            return
        check_images(self._safety_check, list(images.values()), output_type, self.image_processor)
