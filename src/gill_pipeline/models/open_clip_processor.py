"""The image processor matching open_clip's evaluation transform, saved and loaded like any CLIP image processor."""

# diffusers loads a component from a custom module by finding a known base class by name in that module: the
# processor's module must hold `ImageProcessingMixin`, as model modules hold `ModelMixin`.
from transformers import CLIPImageProcessorPil, ImageProcessingMixin  # noqa: F401
from transformers.image_utils import PILImageResampling


# open_clip's `interpolation` names; anything but bilinear is bicubic in its evaluation transform.
_RESAMPLE = {"bilinear": PILImageResampling.BILINEAR, "bicubic": PILImageResampling.BICUBIC}


class OpenCLIPImageProcessor(CLIPImageProcessorPil):
    r"""
    CLIP preprocessing (resize, centre crop, normalise on PIL images) that gives exactly what open_clip's evaluation
    transform gives: torchvision's `CenterCrop` rounds an odd margin half to even where transformers' crop floors it,
    which moves the crop one pixel for some image sizes.
    """

    def center_crop(self, image, size, **kwargs):
        height, width = image.shape[-2:]
        if height < size.height or width < size.width:  # padding: open_clip never gets here after its resize
            return super().center_crop(image, size, **kwargs)
        top = int(round((height - size.height) / 2.0))
        left = int(round((width - size.width) / 2.0))
        return image[..., top : top + size.height, left : left + size.width]

    @classmethod
    def from_open_clip_preprocess(cls, preprocess_cfg: dict) -> "OpenCLIPImageProcessor":
        """The processor for open_clip's preprocessing config (`model.visual.preprocess_cfg`)."""
        size = preprocess_cfg["size"]
        height, width = (size, size) if isinstance(size, int) else size
        mode = preprocess_cfg.get("resize_mode", "shortest")
        common = dict(
            image_mean=list(preprocess_cfg["mean"]),
            image_std=list(preprocess_cfg["std"]),
            resample=_RESAMPLE.get(preprocess_cfg.get("interpolation"), PILImageResampling.BICUBIC),
        )
        if mode == "squash":
            return cls(size={"height": height, "width": width}, do_center_crop=False, **common)
        if mode == "shortest" and height == width:
            return cls(size={"shortest_edge": height}, crop_size={"height": height, "width": width}, **common)
        raise ValueError(
            f"open_clip's `resize_mode`={mode!r} at image size {size} has no CLIP image processor equivalent; pass "
            "`force_preprocess_cfg={'resize_mode': 'squash'}` or build your own `feature_extractor`."
        )
