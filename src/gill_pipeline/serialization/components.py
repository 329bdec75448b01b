"""Putting a GILL pipeline together from loaded parts: shared by assembly, conversion and learned-weights loading.

Below the pipeline package: it takes the pipeline class as an argument and imports nothing of this package's
loaders, so each of them can use it.
"""

from transformers import CLIPImageProcessor


def default_image_processor(image_encoder) -> CLIPImageProcessor:
    """A CLIP image processor at the encoder's input size, for encoders that come without one."""
    size = image_encoder.config.image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def pipeline_from_parts(
    pipeline_class,
    tokenizer,
    llm,
    gill,
    vae,
    unet,
    scheduler,
    image_encoder,
    feature_extractor,
    img_token_ids,
    base_models,
    dtype=None,
    transformer=None,
):
    """The GILL pipeline over the given parts (the decoder modules may be None; `unet` for UNet decoders,
    `transformer` for SD3, Flux, PixArt and Sana), every module in eval mode, cast to `dtype` when given."""
    for module in (llm, image_encoder, vae, unet, transformer, gill):
        if module is not None:
            module.eval()
    pipe = pipeline_class(
        tokenizer=tokenizer,
        llm=llm,
        gill=gill,
        vae=vae,
        unet=unet,
        scheduler=scheduler,
        **({"transformer": transformer} if transformer is not None else {}),
        image_encoder=image_encoder,
        feature_extractor=feature_extractor,
        img_token_ids=img_token_ids,
        base_models=base_models,
    )
    if dtype is not None:
        pipe.to(dtype=dtype)
    return pipe
