"""Named constants: component and file names of the saved formats, the `[IMG]` token text, the reference defaults of
GILL, decision classes and the choices of the pipeline's arguments.

This module is at the bottom of the package: it imports nothing from it, and every module may import it. Sizes of the
networks never live here; they come from the components' configs.
"""

# Sent with every Hub download (`library_name=`) and written into model cards.
LIBRARY_NAME = "gill_pipeline"
# `gill_pipeline.__version__`, written into learned-weights manifests; the same as pyproject.toml's `version`.
LIBRARY_VERSION = "0.1.0"

# Component names: the keys of a saved pipeline's `model_index.json` and the folders that hold them. A diffusers
# decoder checkpoint on the Hub keeps its parts in folders of the same names (`vae/`, `unet/`, `scheduler/`).
GILL_COMPONENT = "gill"
LLM_COMPONENT = "llm"
TOKENIZER_COMPONENT = "tokenizer"
IMAGE_ENCODER_COMPONENT = "image_encoder"
FEATURE_EXTRACTOR_COMPONENT = "feature_extractor"
VAE_COMPONENT = "vae"
UNET_COMPONENT = "unet"
TRANSFORMER_COMPONENT = "transformer"
SCHEDULER_COMPONENT = "scheduler"

# Files of a saved pipeline, as diffusers and transformers write them.
MODEL_INDEX_FILE = "model_index.json"
MODEL_CONFIG_FILE = "config.json"
SAFETENSORS_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG_FILE = "scheduler_config.json"
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")

# A model card, as the Hub reads it.
MODEL_CARD_FILE = "README.md"

# The manifest of a learned-weights folder (see `gill_pipeline.serialization.learned_weights`).
LEARNED_WEIGHTS_MANIFEST_FILE = "gill_learned_weights.json"

# The LM's LoRA adapter beside a pipeline's components, as peft writes it.
LORA_FOLDER = "llm_lora"
LORA_CONFIG_FILE = "adapter_config.json"
LORA_WEIGHTS_FILE = "adapter_model.safetensors"

# Weight files that unpickle (and so may run code) when read; refused unless a loader is given `allow_pickle=True`.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".tar")
# Code files: never imported from a model folder.
CODE_SUFFIXES = (".py", ".pyc", ".so")

# The text of the `[IMG]` tokens; `{i}` is the index inside the group.
IMG_TOKEN_TEMPLATE = "[IMG{i}]"

# Reference settings of the GILL paper (kohjingyu/gill); each can be overridden where it is used.
DEFAULT_NUM_IMG_TOKENS = 8
DEFAULT_NUM_VISUAL_TOKENS = 4
DEFAULT_RETRIEVAL_DIM = 256
DEFAULT_MAPPER_WIDTH = 512
DEFAULT_MAPPER_ENCODER_LAYERS = 4
DEFAULT_MAPPER_DECODER_LAYERS = 4
DEFAULT_MAPPER_HEADS = 4
DEFAULT_LOGIT_SCALE_INIT = 2.6592600345611572  # log(1 / 0.07), as in CLIP

# Decision head classes.
DECISION_GENERATE = 0
DECISION_RETRIEVE = 1

# "both": every [IMG] group gets a generated AND a retrieved image; the decision head picks which is shown first.
IMAGE_MODES = ("auto", "generate", "retrieve", "both")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def __getattr__(name: str):
    # `CONFIG_FILE` was a second name of MODEL_CONFIG_FILE; kept readable for a release.
    if name == "CONFIG_FILE":
        import warnings

        warnings.warn("`constants.CONFIG_FILE` is `constants.MODEL_CONFIG_FILE`.", FutureWarning, stacklevel=2)
        return MODEL_CONFIG_FILE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
