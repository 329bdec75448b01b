"""Named constants: file names, component names and the reference defaults of GILL.

Sizes of the networks never live here; they come from the components' configs.
"""

# Component names inside a saved GILL pipeline folder (keys of `model_index.json`).
GILL_COMPONENT = "gill"
LLM_COMPONENT = "llm"
TOKENIZER_COMPONENT = "tokenizer"
IMAGE_ENCODER_COMPONENT = "image_encoder"
FEATURE_EXTRACTOR_COMPONENT = "feature_extractor"

# Weight and config file names, as diffusers / transformers write them.
MODEL_INDEX_FILE = "model_index.json"
CONFIG_FILE = "config.json"
SAFETENSORS_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

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
