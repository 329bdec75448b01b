"""Putting a GILL pipeline together from loaded parts: shared by assembly, conversion and learned-weights loading.

Below the pipeline package: it takes the pipeline class as an argument and imports nothing of this package's
loaders, so each of them can use it.
"""

import torch
from transformers import CLIPImageProcessor


def default_image_processor(image_encoder) -> CLIPImageProcessor:
    """A CLIP image processor at the encoder's input size, for encoders that come without one."""
    size = image_encoder.config.image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def pipeline_from_parts(pipeline_class, dtype=None, **parts):
    """`pipeline_class(**parts)`: the GILL pipeline over the given components (the decoder modules may be None;
    `unet` for UNet decoders, `transformer` for SD3, Flux, PixArt and Sana), `img_token_ids` and `base_models`, every
    module in eval mode, cast to `dtype` when given."""
    if parts.get("transformer", 0) is None:
        del parts["transformer"]  # passed only when there is one, as before DiT decoders existed
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.eval()
    pipe = pipeline_class(**parts)
    if dtype is not None:
        # A quantized base model was loaded in `dtype` and cannot be cast (diffusers and transformers refuse it).
        for part in parts.values():
            if isinstance(part, torch.nn.Module) and getattr(getattr(part, "config", None), "quantization_config", None) is None:
                part.to(dtype=dtype)
    return pipe
