"""LoRA on the LM: saved beside the pipeline's components (peft format) and applied when loading.

A pipeline folder may hold `llm_lora/` (`adapter_config.json` + `adapter_model.safetensors`, as peft writes them).
The `llm/` folder always holds the untouched base LM.
"""

import contextlib
import os

from ..constants import LORA_CONFIG_FILE, LORA_FOLDER, LORA_WEIGHTS_FILE, PICKLE_SUFFIXES
from .folder import PipelineFolderError, read_json_object


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep the library importable without it
        return False
    return isinstance(model, PeftModel)


def check_lora_folder(lora_dir: str, allow_pickle: bool = False) -> None:
    """The adapter's config must be a JSON object and its weights safetensors (a pickle only with `allow_pickle`)."""
    read_json_object(os.path.join(lora_dir, LORA_CONFIG_FILE), "the LM's LoRA adapter config")
    files = os.listdir(lora_dir)
    if LORA_WEIGHTS_FILE not in files and not (allow_pickle and any(f.endswith(PICKLE_SUFFIXES) for f in files)):
        raise PipelineFolderError(
            f"Missing file: {os.path.join(lora_dir, LORA_WEIGHTS_FILE)} (the LM's LoRA adapter); files there: "
            f"{sorted(files)}"
        )


def load_llm_lora(pipe, folder: str, allow_pickle: bool = False) -> None:
    """Wraps `pipe.llm` with the LoRA adapter saved in `folder/llm_lora`, if there is one."""
    lora_dir = os.path.join(folder, LORA_FOLDER)
    if not os.path.isdir(lora_dir):
        return
    check_lora_folder(lora_dir, allow_pickle)
    from peft import PeftModel

    llm = PeftModel.from_pretrained(pipe.llm, lora_dir, is_trainable=False)
    llm.eval()
    pipe.register_modules(llm=llm)


@contextlib.contextmanager
def saving_without_lora(pipe, save_directory: str):
    """While saving, `pipe.llm` is the bare base LM; its adapter goes to `save_directory/llm_lora`.

    The adapter is re-applied afterwards from the saved files, trainable again if it was: the LoRA parameters are then
    NEW tensor objects, so a training loop must save its checkpoints by other means (as training/ does) and call
    `save_pretrained` only at the end.
    """
    llm = pipe.llm
    if not is_peft_model(llm):
        yield
        return
    from peft import PeftModel

    lora_dir = os.path.join(save_directory, LORA_FOLDER)
    llm.save_pretrained(lora_dir)
    was_trainable = any(p.requires_grad for p in llm.parameters())
    was_training = llm.training
    base = llm.unload()
    pipe.register_modules(llm=base)
    try:
        yield
    finally:
        wrapped = PeftModel.from_pretrained(base, lora_dir, is_trainable=was_trainable)
        wrapped.train(was_training)
        pipe.register_modules(llm=wrapped)
