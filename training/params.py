"""Training settings: dataclasses with help text and checks, loaded from a YAML/JSON file plus command-line overrides.

Precedence: dataclass defaults < config file < command line. A config file is either flat (`lr: 1e-3`) or grouped by
section (`optim: {lr: 1e-3}`); the command line uses the field names with dashes (`--lr 1e-3`, `--lora true`).
"""

import argparse
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field

MIXED_PRECISION = ("no", "fp16", "bf16")
FROZEN_DTYPES = ("float32", "bfloat16", "float16")
# "interleaved" (JSONL documents) is read by precompute.py; training takes documents as `interleaved_data`.
DATA_TYPES = ("auto", "tsv", "folder", "webdataset", "synthetic", "interleaved")
TINY_LM_TYPES = ("opt", "gpt2", "llama", "qwen2")
SHARDING = ("auto", "ddp", "fsdp", "deepspeed")  # training/sharding.py acts on it


def _positive(name, value, allow_zero=False):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"`{name}` must be a {kind} number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")


def _check_numbers(settings) -> None:
    """Every `float` setting must be a finite number: `inf` or `nan` passes most range checks (`nan < 0` is False)
    and would silently turn every weight into NaN. Runs first in each `__post_init__`."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if float not in (hints[f.name], *typing.get_args(hints[f.name])) or value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"`{f.name}` must be a number, got {value!r}.")
        if not math.isfinite(value):
            raise ValueError(f"`{f.name}` must be a finite number, got {value!r}.")


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


@dataclass
class ModelArgs:
    """Where the models come from. Exactly one of `pipeline`, `language_model` (with the two others) or
    `tiny_random`."""

    pipeline: str | None = field(
        default=None,
        metadata={"help": "Folder of an assembled GILL pipeline (saved by `GILLPipeline.from_base_models(...)."
                  "save_pretrained(...)`); training continues from its learned parts."},
    )
    language_model: str | None = field(default=None, metadata={"help": "Causal LM id or path (e.g. facebook/opt-6.7b)."})
    image_encoder: str | None = field(
        default=None, metadata={"help": "CLIP vision encoder id or path (e.g. openai/clip-vit-large-patch14)."}
    )
    stable_diffusion: str | None = field(
        default=None,
        metadata={"help": "Stable Diffusion id or path. Its text encoder makes the generation targets; with "
                  "`pipeline` it is only needed when the targets are not precomputed."},
    )
    tiny_random: str | None = field(
        default=None,
        metadata={"help": f"Build a tiny random-weight pipeline in-process, with this LM type {TINY_LM_TYPES} "
                  "(tests and smoke runs; nothing is downloaded)."},
    )
    num_img_tokens: int | None = field(default=None, metadata={"help": "[IMG] tokens r when assembling (default 8)."})
    num_visual_tokens: int | None = field(default=None, metadata={"help": "Visual prefix length k when assembling (default 4)."})
    retrieval_dim: int | None = field(default=None, metadata={"help": "Retrieval space width when assembling (default 256)."})
    frozen_dtype: str = field(
        default="float32",
        metadata={"help": f"dtype of the frozen LM, vision and text encoders {FROZEN_DTYPES}; learned parts stay float32."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute the frozen LM's block activations in the backward pass (less activation "
                  "memory, one more LM forward of compute); outputs and gradients are unchanged."}
    )

    def __post_init__(self):
        _check_numbers(self)
        sources = [n for n in ("pipeline", "language_model", "tiny_random") if getattr(self, n)]
        if len(sources) != 1:
            raise ValueError(
                "Give exactly one model source: `pipeline` (an assembled pipeline folder), `language_model` + "
                f"`image_encoder` + `stable_diffusion` (base models), or `tiny_random`; got {sources or 'none'}."
            )
        if self.language_model and not (self.image_encoder and self.stable_diffusion):
            raise ValueError(
                f"`language_model`={self.language_model!r} needs `image_encoder` and `stable_diffusion` too, got "
                f"{self.image_encoder!r} and {self.stable_diffusion!r}."
            )
        if self.tiny_random:
            _choice("tiny_random", self.tiny_random, TINY_LM_TYPES)
        _choice("frozen_dtype", self.frozen_dtype, FROZEN_DTYPES)
        for name in ("num_img_tokens", "num_visual_tokens", "retrieval_dim"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))


@dataclass
class DataArgs:
    train_data: str | None = field(
        default=None,
        metadata={"help": "Training set: a CC3M-style TSV (`caption<TAB>image`), a folder of images with captions, "
                  "webdataset shards (`shards-{000..009}.tar`), or None with `train_data_type: synthetic`."},
    )
    train_data_type: str = field(default="auto", metadata={"help": f"One of {DATA_TYPES}; auto guesses from the path."})
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder the TSV's image paths are relative to (default: the TSV's folder)."}
    )
    val_data: str | None = field(default=None, metadata={"help": "Validation set, same formats as `train_data`."})
    val_data_type: str = field(default="auto", metadata={"help": f"One of {DATA_TYPES}."})
    val_image_folder: str | None = field(default=None, metadata={"help": "Image folder of a TSV validation set."})
    train_targets: str | None = field(
        default=None, metadata={"help": "Folder written by precompute.py for `train_data` (SD text-encoder targets)."}
    )
    val_targets: str | None = field(default=None, metadata={"help": "Folder written by precompute.py for `val_data`."})
    interleaved_data: str | None = field(
        default=None,
        metadata={"help": "Interleaved documents (JSONL, see docs/training.md) mixed with the caption pairs at "
                  "`interleaved_ratio`; made from VIST or MMC4 by training/convert_data.py."},
    )
    interleaved_image_folder: str | None = field(
        default=None,
        metadata={"help": "Folder the documents' image paths are relative to (default: the file's folder)."},
    )
    interleaved_targets: str | None = field(
        default=None,
        metadata={"help": "Folder written by `precompute.py --data-type interleaved` for `interleaved_data`."},
    )
    interleaved_ratio: float = field(
        default=0.5, metadata={"help": "Probability that a micro-batch is drawn from `interleaved_data` instead of the "
                               "caption pairs (0: pairs only, 1: documents only); used only with `interleaved_data`."}
    )
    interleaved_val_data: str | None = field(
        default=None,
        metadata={"help": "Validation documents (same format); their metrics are logged as `val_interleaved/`."},
    )
    interleaved_val_image_folder: str | None = field(
        default=None, metadata={"help": "Folder the validation documents' image paths are relative to."}
    )
    interleaved_val_targets: str | None = field(
        default=None, metadata={"help": "Folder written by precompute.py for `interleaved_val_data`."}
    )
    interleaved_max_length: int = field(
        default=256, metadata={"help": "LM tokens of an interleaved document's row; longer ones are cut at a segment."}
    )
    max_length: int = field(
        default=32, metadata={"help": "Tokens per caption sequence, BOS and the r [IMG] tokens included (reference: 32)."}
    )
    chat_template: bool = field(
        default=False,
        metadata={
            "help": "Wrap caption pairs in the LM's chat template (user asks, assistant answers with the caption and "
            "[IMG]; captioning: user gives the image), so instruction LMs learn [IMG] inside assistant turns."
        },
    )
    chat_image_request: str = field(
        default="Show me a picture.", metadata={"help": "The user's request before an [IMG] answer (`chat_template`)."}
    )
    chat_caption_request: str = field(
        default="Describe this picture.", metadata={"help": "The user's request after an image (`chat_template`)."}
    )
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes per training process."})
    cache_images: int = field(
        default=0,
        metadata={
            "help": "Keep the preprocessed pixels of up to this many image files in memory (per data-loading process, "
            "least recently used dropped first; 0: off). For small data sets read for many epochs; same values either way."
        },
    )
    synthetic_size: int = field(default=64, metadata={"help": "Examples of the synthetic data set."})
    val_max_samples: int = field(default=1000, metadata={"help": "At most this many validation examples are used."})

    def __post_init__(self):
        _check_numbers(self)
        _choice("train_data_type", self.train_data_type, DATA_TYPES)
        _choice("val_data_type", self.val_data_type, DATA_TYPES)
        if self.train_data is None and self.train_data_type != "synthetic":
            raise ValueError("`train_data` is required unless `train_data_type` is 'synthetic'; got None.")
        for name in ("train", "val"):
            if getattr(self, f"{name}_data_type") == "synthetic" and getattr(self, f"{name}_data") is not None:
                raise ValueError(
                    f"`{name}_data`={getattr(self, f'{name}_data')!r} is ignored by `{name}_data_type`='synthetic': "
                    f"set `{name}_data_type` to auto, tsv, folder or webdataset."
                )
        for name in ("train", "val"):
            if getattr(self, f"{name}_data_type") == "interleaved":
                raise ValueError(
                    f"`{name}_data_type`='interleaved' is not a caption-pair set: give interleaved documents as "
                    f"`interleaved_data` (mixed with the pairs at `interleaved_ratio`)."
                )
        if not 0 <= self.interleaved_ratio <= 1:
            raise ValueError(f"`interleaved_ratio` must be in [0, 1], got {self.interleaved_ratio}.")
        _positive("interleaved_max_length", self.interleaved_max_length)
        _positive("max_length", self.max_length)
        _positive("num_workers", self.num_workers, allow_zero=True)
        _positive("cache_images", self.cache_images, allow_zero=True)
        _positive("synthetic_size", self.synthetic_size)
        _positive("val_max_samples", self.val_max_samples)


@dataclass
class OptimArgs:
    lr: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate (reference: 1e-3)."})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (reference: 0.95)."})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay, on every learned tensor as in the reference."})
    warmup_steps: int = field(default=2000, metadata={"help": "Linear warm-up steps (reference: 2000)."})
    decay_every: int = field(default=10000, metadata={"help": "After warm-up, multiply the lr by `decay_gamma` every this many steps."})
    decay_gamma: float = field(default=0.1, metadata={"help": "Step decay factor (reference: 0.1)."})
    grad_clip: float = field(default=1.0, metadata={"help": "Max global grad norm; 0 disables clipping."})
    batch_size: int = field(default=200, metadata={"help": "Examples per process per micro-step."})
    grad_accum_steps: int = field(default=1, metadata={"help": "Micro-steps per optimizer step."})
    max_steps: int = field(default=20000, metadata={"help": "Optimizer steps of the whole run."})

    def __post_init__(self):
        _check_numbers(self)
        _positive("lr", self.lr)
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be in [0, 1), got {getattr(self, name)!r}.")
        _positive("eps", self.eps)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        _positive("warmup_steps", self.warmup_steps, allow_zero=True)
        _positive("decay_every", self.decay_every)
        _positive("decay_gamma", self.decay_gamma)
        _positive("grad_clip", self.grad_clip, allow_zero=True)
        for name in ("batch_size", "grad_accum_steps", "max_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")


@dataclass
class LossArgs:
    caption_weight: float = field(default=1.0, metadata={"help": "Weight of the captioning cross-entropy."})
    img_token_weight: float = field(
        default=1.0, metadata={"help": "Weight of the [IMG]-production cross-entropy (reference: 2 x 0.5)."}
    )
    retrieval_weight: float = field(default=1.0, metadata={"help": "Weight of the symmetric InfoNCE loss."})
    generation_weight: float = field(default=1.0, metadata={"help": "Weight of the generation (per-token L2) loss."})
    interleaved_retrieval_weight: float = field(
        default=1.0,
        metadata={"help": "Multiplies `retrieval_weight` on interleaved-document batches (0: documents train "
                  "generation, [IMG] production and captioning, but retrieval learns from caption pairs only)."},
    )
    interleaved_context_prefix_grad: bool = field(
        default=True,
        metadata={"help": "Whether the [IMG] losses of interleaved documents train the visual-prefix projection "
                  "through the context images' prefixes (False: only captioning trains it, so document losses "
                  "cannot pull it away from what captioning needs)."},
    )
    interleaved_length_buckets: int = field(
        default=4,
        metadata={"help": "Interleaved-document rows run through the LM in this many groups of similar length, each "
                  "padded to its own longest row (same losses, less padding; 1: one forward for the whole batch). "
                  "Runs that shard the LM (FSDP, DeepSpeed) use 1, so every process runs the same forwards."},
    )
    concat_prob: float = field(
        default=0.5, metadata={"help": "Probability that a batch's examples are concatenated in pairs (reference: 0.5)."}
    )
    rescale_img_rows: bool = field(
        default=True,
        metadata={"help": "After each step, rescale every [IMG] row to the mean norm of the LM's own rows (reference)."},
    )

    def __post_init__(self):
        _check_numbers(self)
        for name in (
            "caption_weight", "img_token_weight", "retrieval_weight", "generation_weight", "interleaved_retrieval_weight"
        ):
            _positive(name, getattr(self, name), allow_zero=True)
        if isinstance(self.interleaved_length_buckets, bool) or not isinstance(self.interleaved_length_buckets, int) \
                or self.interleaved_length_buckets < 1:
            raise ValueError(
                f"`interleaved_length_buckets` must be a whole number >= 1, got {self.interleaved_length_buckets!r}."
            )
        if not 0 <= self.concat_prob <= 1:
            raise ValueError(f"`concat_prob` must be in [0, 1], got {self.concat_prob!r}.")


@dataclass
class LoraArgs:
    lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter on the LM too (paper: off)."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale = alpha / rank)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "LM module names to adapt (comma-separated on the command line), or all-linear."},
    )

    def __post_init__(self):
        _check_numbers(self)
        if not isinstance(self.lora_rank, int) or self.lora_rank <= 0:
            raise ValueError(f"`lora_rank` must be a positive integer, got {self.lora_rank!r}.")
        _positive("lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        if not self.lora_target_modules:
            raise ValueError("`lora_target_modules` must name at least one module, got an empty list.")


@dataclass
class RunArgs:
    output_dir: str = field(default="runs/gill", metadata={"help": "Checkpoints, logs and the exported pipeline go here."})
    seed: int = field(default=0, metadata={"help": "Seed of data order, concatenation draws and initial weights."})
    mixed_precision: str = field(default="bf16", metadata={"help": f"accelerate autocast mode {MIXED_PRECISION}."})
    log_every: int = field(default=10, metadata={"help": "Log training losses every this many steps."})
    val_every: int = field(default=1000, metadata={"help": "Validate every this many steps (0: only at the end)."})
    checkpoint_every: int = field(default=1000, metadata={"help": "Write a resumable checkpoint every this many steps (0: never)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Most recent checkpoints kept on disk."})
    resume: str | None = field(
        default=None, metadata={"help": "'latest' (the newest checkpoint in output_dir) or a checkpoint folder."}
    )
    exit_after_steps: int | None = field(
        default=None,
        metadata={"help": "Stop this invocation after this many steps (with a checkpoint), keeping the schedule of "
                  "`max_steps`: for time-limited jobs that resume later."},
    )
    report_to: str = field(default="tensorboard", metadata={"help": "accelerate tracker: tensorboard, wandb, all or none."})
    export_pipeline: bool = field(
        default=True, metadata={"help": "At the end, save the whole trained pipeline to output_dir/pipeline."}
    )
    progress_bar: bool = field(default=True, metadata={"help": "Show a tqdm progress bar on the main process."})
    sharding: str = field(
        default="auto",
        metadata={"help": "How processes share the models: 'ddp' (each holds every weight), 'fsdp' (FSDP2: the frozen "
                  "LM and the learned parts sharded across processes, each LM layer its own unit; needs >= 2 "
                  "processes), 'deepspeed' (ZeRO-3; CUDA and the deepspeed package), or 'auto' (what the "
                  "`accelerate launch` config asks for, else ddp). See docs/training.md."},
    )
    deepspeed_config: str | None = field(
        default=None,
        metadata={"help": "DeepSpeed JSON config for `sharding: deepspeed` when the launcher gave none "
                  "(training/configs/deepspeed_zero3.json)."},
    )
    max_nonfinite_steps: int = field(
        default=5,
        metadata={"help": "A step with a NaN/inf loss or gradient is skipped (the weights, optimizer and checkpoints "
                  "never see it) and counted; after this many in a row the run stops with an error."},
    )

    def __post_init__(self):
        _check_numbers(self)
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _choice("sharding", self.sharding, SHARDING)
        for name in ("log_every",):
            _positive(name, getattr(self, name))
        for name in ("val_every", "checkpoint_every"):
            _positive(name, getattr(self, name), allow_zero=True)
        if not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints <= 0:
            raise ValueError(f"`keep_checkpoints` must be a positive integer, got {self.keep_checkpoints!r}.")
        if self.exit_after_steps is not None:
            _positive("exit_after_steps", self.exit_after_steps)
        patience = self.max_nonfinite_steps
        if not isinstance(patience, int) or isinstance(patience, bool) or patience <= 0:
            raise ValueError(f"`max_nonfinite_steps` must be a positive integer, got {self.max_nonfinite_steps!r}.")


SECTIONS = {"model": ModelArgs, "data": DataArgs, "optim": OptimArgs, "loss": LossArgs, "lora": LoraArgs, "run": RunArgs}


@dataclass
class TrainConfig:
    model: ModelArgs
    data: DataArgs
    optim: OptimArgs
    loss: LossArgs
    lora: LoraArgs
    run: RunArgs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_owner() -> dict[str, str]:
    owner = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in owner:
                raise RuntimeError(f"Field `{f.name}` is defined twice ({owner[f.name]}, {section}).")
            owner[f.name] = section
    return owner


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_optional(inner):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else inner(text)

    return parse


def _argparse_type(hint):
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _parse_optional(_argparse_type(args[0]))
    if origin is list:
        return lambda text: [part.strip() for part in text.split(",") if part.strip()]
    if hint is bool:
        return _parse_bool
    return hint


def build_parser(description: str = "Train GILL's learned parts.") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML or JSON config file (flat or grouped by section).")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            group.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                type=_argparse_type(hints[f.name]),
                default=argparse.SUPPRESS,
                help=f.metadata.get("help", "").replace("%", "%%"),
            )
    return parser


def load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`config` file not found: {path!r}.")
    with open(path, encoding="utf-8") as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(f) or {}
        elif path.endswith(".json"):
            data = json.load(f)
        else:
            raise ValueError(f"`config` must be a .yaml, .yml or .json file, got {path!r}.")
    if not isinstance(data, dict):
        raise ValueError(f"`config` {path!r} must hold a mapping of settings, got {type(data).__name__}.")
    return data


def flatten_settings(data: dict, source: str) -> dict:
    """`{optim: {lr: 1}, seed: 0}` -> `{lr: 1, seed: 0}`, rejecting unknown names (typos must not pass silently)."""
    owner, flat = _field_owner(), {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for inner_key, inner_value in value.items():
                if owner.get(inner_key) != key:
                    raise ValueError(f"Unknown setting `{key}.{inner_key}` in {source}.")
                flat[inner_key] = inner_value
        elif key in owner:
            flat[key] = value
        else:
            raise ValueError(f"Unknown setting `{key}` in {source}; known: {sorted(owner)}.")
    return flat


def make_config(settings: dict) -> TrainConfig:
    owner = _field_owner()
    grouped = {section: {} for section in SECTIONS}
    for key, value in settings.items():
        if key not in owner:
            raise ValueError(f"Unknown setting `{key}`; known: {sorted(owner)}.")
        grouped[owner[key]][key] = value
    return TrainConfig(**{section: SECTIONS[section](**grouped[section]) for section in SECTIONS})


def parse_config(argv: list[str] | None) -> TrainConfig:
    """Command line (with an optional `--config` file) -> a checked [`TrainConfig`]."""
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config")
    settings = flatten_settings(load_config_file(config_path), config_path) if config_path else {}
    settings.update(args)
    return make_config(settings)
