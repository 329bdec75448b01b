from .assembly import assemble_gill_pipeline
from .conversation import GILLConversation, GILLPast
from .decoding import DecodingSettings, GILLDecoder
from .pipeline_gill import GILLPipeline
from .pipeline_output import GILLImage, GILLPipelineOutput
from .streaming import GILLStreamer

__all__ = [
    "GILLConversation",
    "GILLPast",
    "GILLStreamer",
    "GILLPipeline",
    "GILLPipelineOutput",
    "GILLImage",
    "GILLDecoder",
    "DecodingSettings",
    "assemble_gill_pipeline",
]
