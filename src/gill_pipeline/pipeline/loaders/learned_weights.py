"""The loader mixin of `GILLPipeline`, in the way of diffusers' `loaders/`: loading and saving a GILL pipeline (a
whole folder or only its learned weights), its LoRA adapter on the LM, Hub pushes, and assembly from base models.

The mixin comes FIRST among `GILLPipeline`'s bases: its `from_pretrained`/`save_pretrained` must win over
`DiffusionPipeline`'s, which they extend through `super()`.
"""

import os

from ...constants import LORA_FOLDER
from ...serialization.hub import HUB_KWARGS, resolve_pipeline_folder
from ...serialization.learned_weights import is_learned_weights_folder, load_learned_weights_pipeline, save_learned_weights
from ...serialization.folder import check_pipeline_parts, prepare_pipeline_load, refuse_remote_code
from ...serialization.lora import load_llm_lora, saving_without_lora
from ...serialization.paths import name_or_path
from ...serialization.push import push_pipeline_to_hub
from ...serialization.quantization import release_freed_memory, refuse_quantizing_passed, resolve_quantization_config
from ...serialization.quantized_save import max_shard_bytes, saving_quantized_components
from ...serialization.staged_folder import staged_folder
from ..assembly import assemble_gill_pipeline
from ..safety import pop_safety_checker


class GILLLoaderMixin:
    """`from_pretrained`, `save_pretrained`, `save_learned_weights`, `push_to_hub`, `push_learned_weights` and
    `from_base_models` for `GILLPipeline`."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        r"""
        Loads a GILL pipeline from a local folder or a Hub repo id (accepts diffusers' `from_pretrained` arguments,
        e.g. `dtype` (a dtype or a name such as `"bfloat16"`), `revision`, `token`, `cache_dir`, `local_files_only`,
        and components to use as they are), or a learned-weights folder or repo (see `gill_pipeline.serialization.learned_weights`).

        Before any weight is read, every file is checked (a missing, corrupted or wrong-kind file is named), the
        learned parts are checked to fit the LM, decoder, vision encoder and tokenizer, and pickled weights are
        refused unless `allow_pickle=True` (then read with `torch.load(weights_only=True)`). Remote code is never
        loaded; see docs/security.md. A LoRA adapter saved with the pipeline (`llm_lora/`) is applied to the LM.
        `safety_checker=` (and `safety_feature_extractor=`) set the check run on every image shown; see
        [`GILLPipeline.set_safety_checker`].

        `quantization_config` (a diffusers `PipelineQuantizationConfig`, e.g. `quant_mapping={"llm":
        transformers.TorchAoConfig(Int8WeightOnlyConfig()), "unet": diffusers.TorchAoConfig(...)}`) quantizes the
        base models on loading, for whole-pipeline and learned-weights folders alike; the learned `gill` module is
        never quantized. See docs/quantization.md and `gill_pipeline.serialization.quantization`.
        """
        name = name_or_path(pretrained_model_name_or_path, "pretrained_model_name_or_path")
        refuse_remote_code(kwargs)
        safety = pop_safety_checker(kwargs)
        if "quantization_config" in kwargs:
            kwargs["quantization_config"] = resolve_quantization_config(kwargs["quantization_config"])
            refuse_quantizing_passed(kwargs["quantization_config"], kwargs, "`from_pretrained`")
        folder = resolve_pipeline_folder(name, **kwargs)
        if is_learned_weights_folder(folder):
            pipe = load_learned_weights_pipeline(cls, folder, name, **kwargs)
        else:
            for hub_argument in HUB_KWARGS:
                if hub_argument != "local_files_only":
                    kwargs.pop(hub_argument, None)
            kwargs, allow_pickle = prepare_pipeline_load(cls, folder, kwargs)
            pipe = super().from_pretrained(folder, **kwargs)
            check_pipeline_parts(pipe, f"the learned weights {os.path.join(folder, 'gill')}")
            load_llm_lora(pipe, folder, allow_pickle)
        if kwargs.get("quantization_config") is not None:
            release_freed_memory()
        if safety is not None:
            pipe.set_safety_checker(*safety)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """Saves every component (the LM without its LoRA adapter, which goes to `llm_lora/`); accepts diffusers'
        `save_pretrained` arguments (`max_shard_size`, `variant`, ...).

        Everything is written to a hidden folder inside `save_directory` first and moved in when complete: a failed
        save leaves the folder as it was, entries the save does not write stay, and an earlier save's `llm_lora/` goes
        when the LM has no adapter now (see `gill_pipeline.serialization.staged_folder`). torchao-quantized components
        are written one shard at a time, in their library's format (see `gill_pipeline.serialization.quantized_save`):
        saving holds one shard's copy of their weights, not a whole one, and an LM loaded from a quantized folder can
        be saved again.
        """
        if kwargs.get("max_shard_size") is not None:
            max_shard_bytes(kwargs["max_shard_size"])  # a bad size is refused before anything is written
        if kwargs.get("push_to_hub"):  # diffusers names the repo after the folder written: the target, not the staging
            kwargs.setdefault("repo_id", os.path.basename(os.path.abspath(os.fspath(save_directory))))
        with staged_folder(save_directory, owned=(LORA_FOLDER,)) as staging:
            with saving_without_lora(self, staging), saving_quantized_components(self):
                super().save_pretrained(staging, **kwargs)

    def save_learned_weights(self, save_directory: str | os.PathLike, base_models: dict | None = None) -> str:
        """Saves only the learned parts (a few MB) and the record of the base models they fit; see
        [`gill_pipeline.serialization.learned_weights`]. `GILLPipeline.from_pretrained(save_directory)` loads them back."""
        return save_learned_weights(self, save_directory, base_models=base_models)

    def push_to_hub(self, repo_id: str, learned_weights_only: bool = False, card_info=None, **kwargs) -> str:
        """Uploads the whole pipeline (or, with `learned_weights_only=True`, only the learned weights) to a Hub repo
        with a model card; see [`gill_pipeline.serialization.push.push_pipeline_to_hub`]. Returns the commit URL."""
        return push_pipeline_to_hub(
            self, repo_id, learned_weights_only=learned_weights_only, card_info=card_info, **kwargs
        )

    def push_learned_weights(self, repo_id: str, card_info=None, **kwargs) -> str:
        """Uploads only the learned weights and the record of their base models; see `push_to_hub`."""
        return self.push_to_hub(repo_id, learned_weights_only=True, card_info=card_info, **kwargs)

    @classmethod
    def from_base_models(cls, *args, **kwargs):
        """Assembles a new, untrained GILL pipeline; see [`gill_pipeline.assemble_gill_pipeline`]. Accepts
        `safety_checker=` as `from_pretrained` does."""
        safety = pop_safety_checker(kwargs)
        pipe = assemble_gill_pipeline(cls, *args, **kwargs)
        if safety is not None:
            pipe.set_safety_checker(*safety)
        return pipe

