"""Whether the frozen base models fit each other and GILL's learned weights, read from sizes and configs only.

Checked when a pipeline is built (`GILLPipeline.__init__`: assembly with `from_base_models` and every loading path go
through it) and again by `check_inputs` on every call, so a component assigned afterwards (`pipe.tokenizer = ...`,
`pipe.image_encoder = ...`, `pipe.vae = ...`) is refused by name before the LM runs, instead of answering wrongly
(a token id past the LM's vocabulary was embedded as id 0) or failing at the first image or denoising step.
"""

import inspect

from ..models.dims import vision_feature_dim


def _embedding_rows(llm) -> int | None:
    get_embeddings = getattr(llm, "get_input_embeddings", None)
    table = get_embeddings() if callable(get_embeddings) else None
    table = getattr(table, "base_layer", table)  # a peft wrapper keeps the embedding as its base layer
    rows = getattr(table, "num_embeddings", None)
    if rows is None and getattr(table, "weight", None) is not None:
        rows = table.weight.shape[0]
    return rows


def check_tokenizer_fits(tokenizer, llm, img_token_ids, *, name: str = "tokenizer") -> None:
    """Every id `tokenizer` can produce must have a row in the LM's input embeddings, except the `[IMG]` ids, which
    `models/lm_bridge.py` embeds from `GILLModel`'s learned rows (they may lie past the LM's vocabulary)."""
    rows = _embedding_rows(llm)
    if rows is None or tokenizer is None:
        return
    size = len(tokenizer)
    ids = set(range(rows, size))
    ids.update(i for i in getattr(tokenizer, "added_tokens_decoder", {}) if i >= rows)
    beyond = sorted(ids - {int(i) for i in img_token_ids})
    if beyond:
        tokens = tokenizer.convert_ids_to_tokens(beyond[:3])
        raise ValueError(
            f"`{name}` has {size} token ids, but the LM (`llm`, {type(llm).__name__}) has {rows} input embedding rows: "
            f"{len(beyond)} ids that are not [IMG] ids have no row ({beyond[0]}..{beyond[-1]}, e.g. {tokens}) and "
            f"would be embedded as another token. Pass the LM's own tokenizer (only the [IMG] tokens added), or an "
            f"LM whose embedding matrix covers every id."
        )


def _takes_pixels(image_encoder) -> bool:
    main_input = getattr(image_encoder, "main_input_name", None)
    if main_input is not None and main_input != "sample":  # "sample" is diffusers' ModelMixin default, not a fact
        return main_input == "pixel_values"
    forward = getattr(image_encoder, "forward", None)
    return callable(forward) and "pixel_values" in inspect.signature(forward).parameters


def check_image_encoder_fits(image_encoder, gill, *, name: str = "image_encoder") -> None:
    """The image encoder must be a vision model (GILL calls it with `pixel_values`) whose pooled feature width is the
    `vision_dim` the learned visual prefix and retrieval projection read (`models/dims.py`)."""
    if image_encoder is None:
        return
    if not _takes_pixels(image_encoder):
        raise ValueError(
            f"`{name}` must be a vision encoder that takes `pixel_values` (e.g. CLIPVisionModel, "
            f"CLIPVisionModelWithProjection, OpenCLIPVisionModel), got {type(image_encoder).__name__} (main input "
            f"`{getattr(image_encoder, 'main_input_name', None)}`): a text model cannot encode images."
        )
    width = vision_feature_dim(image_encoder)
    expected = gill.config.vision_dim
    if width != expected:
        raise ValueError(
            f"`{name}` ({type(image_encoder).__name__}) gives features of width {width}, but the learned weights "
            f"(`gill.config.vision_dim`) read width {expected}: pass the vision encoder they were trained with."
        )


def check_base_models_fit(*, tokenizer, llm, gill, image_encoder, img_token_ids) -> None:
    """The tokenizer against the LM and the image encoder against the learned weights (see the module docstring)."""
    check_tokenizer_fits(tokenizer, llm, img_token_ids)
    check_image_encoder_fits(image_encoder, gill)


def check_pipeline_fits(pipe) -> None:
    """Every fit checkable from configs, on a built pipeline: base models, then the decoder modules (`check_decoder`)."""
    check_base_models_fit(
        tokenizer=pipe.tokenizer, llm=pipe.llm, gill=pipe.gill, image_encoder=pipe.image_encoder,
        img_token_ids=pipe.img_token_ids,
    )
    if pipe.can_generate:
        pipe.check_decoder()
