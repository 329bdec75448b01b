"""The widths GILL's learned parts must share with the frozen base models, read from loaded models or from their
config files alone (no weights are read: a model is built on the `meta` device from its config).

Imported by assembly, the folder checks and the learned-weights code; it imports none of them.
"""

import torch


def vision_feature_dim(image_encoder) -> int:
    """Width of the pooled feature GILL reads from a vision encoder (CLIP's `pooler_output`, or `image_embeds`)."""
    return vision_feature_dim_from_config(type(image_encoder).__name__, image_encoder.config)


def vision_feature_dim_from_config(class_name: str, config) -> int:
    """The same width from the encoder's class name and its config (an object or the `config.json` dict)."""
    key = "projection_dim" if class_name.endswith("WithProjection") else "hidden_size"
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    if not isinstance(value, int):
        raise ValueError(f"The vision encoder's config ({class_name}) has no integer `{key}`, got {value!r}.")
    return value


def lm_dims(llm) -> tuple[int, int, bool]:
    """(input embedding width, last hidden width, whether input and output embeddings are tied)."""
    inputs = llm.get_input_embeddings()
    outputs = llm.get_output_embeddings()
    if outputs is None:
        raise ValueError(f"`language_model` ({type(llm).__name__}) has no output embeddings: pass a causal LM.")
    tied = outputs.weight is inputs.weight
    if not tied and inputs.weight.device.type != "meta":
        # Some LMs tie by sharing storage rather than the Parameter object. On `meta` every pointer is 0, so only
        # the identity above is a fact there.
        tied = outputs.weight.data_ptr() == inputs.weight.data_ptr()
    return inputs.embedding_dim, outputs.weight.shape[1], tied


def lm_dims_from_config(lm_class, config) -> tuple[int, int, bool]:
    """`lm_dims` of the LM `lm_class(config)` would build, without reading or allocating any weight."""
    with torch.device("meta"):
        llm = lm_class._from_config(config)
    return lm_dims(llm)
