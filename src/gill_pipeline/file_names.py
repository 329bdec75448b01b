"""Names of what this library writes and reads: files and folders of its saved formats, the library name its
downloads carry, and how a name is told apart as a local path or a Hub repo id.

This module is at the bottom of the package: it imports nothing from it, and every module may import it.
"""

import os

# Sent with every Hub download (`library_name=`) and written into model cards.
LIBRARY_NAME = "gill_pipeline"

# A model card, as the Hub reads it.
MODEL_CARD_FILE = "README.md"

# A learned-weights folder (see `gill_pipeline.learned_weights`).
LEARNED_WEIGHTS_MANIFEST_FILE = "gill_learned_weights.json"
FEATURE_EXTRACTOR_FOLDER = "feature_extractor"
SCHEDULER_FOLDER = "scheduler"

# The LM's LoRA adapter beside a pipeline's components, as peft writes it.
LORA_FOLDER = "llm_lora"
LORA_CONFIG_FILE = "adapter_config.json"
LORA_WEIGHTS_FILE = "adapter_model.safetensors"

# Subfolders of a Stable Diffusion checkpoint on the Hub (diffusers' layout).
SD_VAE_SUBFOLDER = "vae"
SD_UNET_SUBFOLDER = "unet"
SD_SCHEDULER_SUBFOLDER = "scheduler"

# The config file of each kind of component, as diffusers and transformers write them.
MODEL_CONFIG_FILE = "config.json"
SCHEDULER_CONFIG_FILE = "scheduler_config.json"
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")

# Weight files that unpickle (and so may run code) when read; refused unless a loader is given `allow_pickle=True`.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".tar")
# Code files: never imported from a model folder.
CODE_SUFFIXES = (".py", ".pyc", ".so")


def looks_like_local_path(name: str) -> bool:
    """Whether `name` can only be meant as a local path (never a Hub repo id, which is `name` or `org/name`).

    True for an absolute path, one that starts with `./`, `../` or `~`, one with an OS separator other than `/` or
    more than one `/`, and one that exists on disk.
    """
    if os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    if (os.sep != "/" and os.sep in name) or "\\" in name or name.count("/") > 1:
        return True
    return os.path.exists(name)
