"""What GILL reads from a vision encoder: one home for inference, retrieval and training.

The pipeline (`GILLPipeline.encode_image_features`), the retrieval index builder and the training scripts
(`training/model_forward.py`, `training/precompute.py`) all call these, so the feature an image gives can never differ
between training and inference.
"""

import PIL.Image
import torch

from .placement import compute_device


def pooled_image_features(image_encoder, pixel_values: torch.Tensor) -> torch.Tensor:
    """Pixel values `(N, 3, H, W)` -> the encoder's pooled feature `(N, vision_dim)`, in the encoder's dtype.

    CLIP vision models give `pooler_output`; projection models (`CLIPVisionModelWithProjection`) give `image_embeds`;
    `OpenCLIPVisionModel` gives its projected embedding as `pooler_output`. The pixels go where the encoder computes
    (see `placement.compute_device`: under offload its weights may be on `meta` or on the offload device), or stay
    where the caller put them when nothing says.
    """
    dtype = next(image_encoder.parameters()).dtype
    device = compute_device(image_encoder) or pixel_values.device
    output = image_encoder(pixel_values=pixel_values.to(device=device, dtype=dtype))
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        pooled = getattr(output, "image_embeds", None)
    if pooled is None:
        raise ValueError(
            f"The vision encoder {type(image_encoder).__name__} returned neither `pooler_output` nor `image_embeds`; "
            "GILL needs one pooled feature per image."
        )
    return pooled


def image_pixel_values(image_processor, images: list[PIL.Image.Image]) -> torch.Tensor:
    """RGB PIL images -> pixel values `(N, 3, H, W)` by the pipeline's image processor (`feature_extractor`)."""
    return image_processor(images=images, return_tensors="pt").pixel_values
