"""gill_pipeline: GILL (Generating Images with multimodal Language Models) as a diffusers pipeline."""

from .constants import LIBRARY_VERSION as __version__  # constants imports nothing: safe before _import_notices

from . import _import_notices  # noqa: F401  (before anything imports diffusers: see the module)
from . import _deprecated

_deprecated.install()  # old module paths (gill_pipeline.loading, .cli, .tiny, ...) keep working, with a FutureWarning
from .models import GILLMapper, GILLModel, OpenCLIPVisionModel
from .pipeline import (
    DecodingSettings,
    GILLConversation,
    GILLDecoder,
    GILLImage,
    GILLPast,
    GILLPipeline,
    GILLPipelineOutput,
    GILLStreamer,
    assemble_gill_pipeline,
)
from .retrieval import RetrievalIndex, build_retrieval_index

__all__ = [
    "GILLPipeline",
    "GILLPipelineOutput",
    "GILLImage",
    "GILLConversation",
    "GILLPast",
    "GILLStreamer",
    "GILLModel",
    "GILLMapper",
    "OpenCLIPVisionModel",
    "GILLDecoder",
    "DecodingSettings",
    "assemble_gill_pipeline",
    "RetrievalIndex",
    "build_retrieval_index",
]
