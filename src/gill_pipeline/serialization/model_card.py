"""Model cards (the Hub's `README.md`) for GILL pipelines and learned-weights repos.

The card is built from what the folder itself records (`model_index.json` or the learned-weights manifest: the base
models and their revisions) plus what only the user knows ([`ModelCardInfo`]: training data, metrics, license).
"""

import os
from dataclasses import dataclass, field

from huggingface_hub import ModelCard, ModelCardData

from ..constants import (
    GILL_COMPONENT,
    LEARNED_WEIGHTS_MANIFEST_FILE,
    LIBRARY_NAME,
    LLM_COMPONENT,
    MODEL_CARD_FILE,
    MODEL_CONFIG_FILE,
    MODEL_INDEX_FILE,
    SAFETENSORS_WEIGHTS_FILE,
)
from .base_models import BASE_MODEL_ROLES, normalize_base_models
from .folder import read_json_object

PIPELINE_TAG = "any-to-any"  # interleaved images and text in; text, generated and retrieved images out
DEFAULT_TAGS = ("gill", "multimodal", "text-to-image", "image-to-text", "image-retrieval", "diffusers")
PAPER_URL = "https://arxiv.org/abs/2305.17216"
ROLE_TITLES = {
    "llm": "Language model (frozen)",
    "stable_diffusion": "Image decoder (frozen: VAE, UNet or transformer)",
    "image_encoder": "Vision encoder (frozen)",
}


@dataclass
class ModelCardInfo:
    """What a model card says beyond what the weights record.

    Args:
        description: A paragraph about these weights (how they were made, what they are for).
        datasets: Hub dataset ids (or names) of the training data; they become the card's `datasets` metadata.
        training_data: Free text about the training data (sizes, filtering).
        metrics: Metric name -> value, shown in a table.
        metrics_source: Where the numbers come from (e.g. "reported in the GILL paper", "our evaluation on ...").
        license: A Hub license id (e.g. "apache-2.0", "other").
        tags: Extra tags.
        model_name: A title for the card.
    """

    description: str | None = None
    datasets: list[str] = field(default_factory=list)
    training_data: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_source: str | None = None
    license: str | None = None
    tags: list[str] = field(default_factory=list)
    model_name: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, [], {})}

    @classmethod
    def from_dict(cls, data: dict | None) -> "ModelCardInfo":
        data = data or {}
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"Unknown model card fields {unknown}; known: {sorted(cls.__dataclass_fields__)}.")
        return cls(**data)


def _read_folder_record(folder: str) -> tuple[str, dict, dict]:
    """(kind, base_models, extra facts) of a saved pipeline folder or learned-weights folder."""
    index_path = os.path.join(folder, MODEL_INDEX_FILE)
    manifest_path = os.path.join(folder, LEARNED_WEIGHTS_MANIFEST_FILE)
    if os.path.isfile(index_path):
        index = read_json_object(index_path, "the pipeline's model index")
        llm_class = (index.get(LLM_COMPONENT) or [None, None])[1]
        return "pipeline", normalize_base_models(index.get("base_models")), {"llm_class": llm_class}
    if os.path.isfile(manifest_path):
        manifest = read_json_object(manifest_path, "the learned-weights manifest")
        return "learned_weights", normalize_base_models(manifest.get("base_models")), manifest
    raise ValueError(
        f"`folder` {folder!r} is neither a GILL pipeline folder ({MODEL_INDEX_FILE}) nor a learned-weights folder "
        f"({LEARNED_WEIGHTS_MANIFEST_FILE})."
    )


def _gill_size(folder: str) -> int | None:
    path = os.path.join(folder, GILL_COMPONENT, SAFETENSORS_WEIGHTS_FILE)
    return os.path.getsize(path) if os.path.isfile(path) else None


def _decoder_line(folder: str) -> str | None:
    """The decoder the mapper was trained for, from `gill/config.json` (a config without a layout is SD 1.x/2.x)."""
    path = os.path.join(folder, GILL_COMPONENT, MODEL_CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    config = read_json_object(path, "the learned parts' config")
    layout = config.get("conditioning_layout")
    if layout is None:
        return (
            f"Image decoder: `StableDiffusionPipeline` (Stable Diffusion 1.x/2.x); the mapper produces `prompt_embeds` "
            f"of {config.get('cond_length')} x {config.get('cond_dim')}."
        )
    tensors = ", ".join(f"`{t['name']}` {tuple(t['shape'])}" for t in layout["tensors"])
    return (
        f"Image decoder: `{layout['pipeline_class']}` (family `{layout['family']}`, guidance `{layout['guidance']}`); "
        f"the mapper produces {tensors}. The learned weights load only onto a decoder of this family and layout."
    )


def _usage(repo_id: str, kind: str, base_models: dict) -> str:
    lines = [
        "```py",
        "import torch",
        "from gill_pipeline import GILLPipeline",
        "",
        f'pipe = GILLPipeline.from_pretrained("{repo_id}", dtype=torch.bfloat16).to("cuda")',
        'out = pipe(["A picture of a dog playing in the snow."], img_logit_scale=1.3)',
        "for element in out.outputs[0]:",
        "    print(element if isinstance(element, str) else (element.source, element.image.size))",
        "```",
    ]
    if kind == "learned_weights":
        missing = [role for role in BASE_MODEL_ROLES if base_models.get(role) is None]
        lines += [
            "",
            "This repo holds only GILL's learned weights; `from_pretrained` downloads the base models listed above "
            "at their recorded revisions. Already loaded (or quantized) base models can be passed instead, e.g. "
            "`GILLPipeline.from_pretrained(repo, llm=my_llm)`; `vae=None, unet=None` skips the image decoder.",
        ]
        if missing:
            lines += [
                "",
                f"No base model is recorded for: {', '.join(missing)}. Pass "
                + ", ".join({"llm": "`llm=`", "stable_diffusion": "`vae=`, `unet=`, `scheduler=`",
                             "image_encoder": "`image_encoder=`"}[r] for r in missing)
                + " to `from_pretrained`.",
            ]
    return "\n".join(lines)


def build_model_card(folder: str, repo_id: str | None = None, info: ModelCardInfo | dict | None = None) -> ModelCard:
    """The model card of a saved pipeline folder or learned-weights folder."""
    if isinstance(info, dict) or info is None:
        info = ModelCardInfo.from_dict(info)
    kind, base_models, extra = _read_folder_record(folder)
    repo_id = repo_id or "path/to/this/folder"
    base_ids = [entry["repo_id"] for entry in base_models.values() if entry is not None]
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        tags=list(DEFAULT_TAGS) + (["gill-learned-weights"] if kind == "learned_weights" else []) + list(info.tags),
        base_model=base_ids or None,
        datasets=list(info.datasets) or None,
        license=info.license,
        metrics=sorted(info.metrics) or None,
    )
    title = info.model_name or (repo_id.split("/")[-1] if "/" in repo_id else "GILL")
    what = (
        "the learned weights of a GILL model (a few MB: the `[IMG]` token rows, the visual prefix, the retrieval "
        "projections, the mapper to the image decoder and the decision head), to be combined with the base models below"
        if kind == "learned_weights"
        else "a complete GILL pipeline (the frozen base models and the learned weights)"
    )
    body = [
        f"# {title}",
        "",
        f"GILL ([Koh, Fried, Salakhutdinov, NeurIPS 2023]({PAPER_URL})) lets a frozen causal language model read "
        "interleaved images and text and answer with text, generated images (through a frozen diffusion "
        "decoder) and retrieved images. This repo holds " + what + f", in the format of `{LIBRARY_NAME}`.",
        "",
    ]
    if info.description:
        body += [info.description, ""]
    body += ["## Base models", "", "| Role | Hub id | Revision |", "|---|---|---|"]
    for role in BASE_MODEL_ROLES:
        entry = base_models.get(role)
        if entry is None:
            body.append(f"| {ROLE_TITLES[role]} | not recorded | |")
        else:
            repo = entry["repo_id"]
            where = f"[{repo}](https://huggingface.co/{repo})" + (
                f" (`{entry['subfolder']}`)" if entry.get("subfolder") else ""
            )
            body.append(f"| {ROLE_TITLES[role]} | {where} | `{entry.get('revision') or 'main'}` |")
    decoder = _decoder_line(folder)
    if decoder is not None:
        body += ["", decoder]
    size = _gill_size(folder)
    if size is not None:
        body += ["", f"Learned weights: {size / 2**20:.1f} MB (safetensors)."]
    if kind == "learned_weights" and extra.get("img_token_ids"):
        body += ["", f"`[IMG]` token ids in the tokenizer: {extra['img_token_ids']}."]
    body += ["", "## Usage", "", f"Install `{LIBRARY_NAME}`, then:", "", _usage(repo_id, kind, base_models), ""]
    body += ["## Training data", ""]
    if info.datasets or info.training_data:
        if info.datasets:
            body.append("Datasets: " + ", ".join(f"`{d}`" for d in info.datasets) + ".")
        if info.training_data:
            body += ["", info.training_data]
    else:
        body.append("Not recorded.")
    body.append("")
    if info.metrics:
        body += ["## Metrics", ""]
        if info.metrics_source:
            body += [f"Source: {info.metrics_source}.", ""]
        body += ["| Metric | Value |", "|---|---|"]
        body += [f"| {name} | {value:.4g} |" for name, value in info.metrics.items()]
        body.append("")
    body += [
        "## Citation",
        "",
        "```bibtex",
        "@inproceedings{koh2023generating,",
        "  title={Generating Images with Multimodal Language Models},",
        "  author={Koh, Jing Yu and Fried, Daniel and Salakhutdinov, Ruslan},",
        "  booktitle={NeurIPS},",
        "  year={2023}",
        "}",
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def write_model_card(
    folder: str, repo_id: str | None = None, info: ModelCardInfo | dict | None = None, overwrite: bool = True
) -> str:
    """Writes the card as `folder/README.md` (kept as it is when `overwrite=False` and it exists); returns the path."""
    path = os.path.join(folder, MODEL_CARD_FILE)
    if overwrite or not os.path.isfile(path):
        build_model_card(folder, repo_id, info).save(path)
    return path
