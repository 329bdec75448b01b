from .assembly import assemble_gill_pipeline
from .decoding import DecodingSettings, GILLDecoder
from .pipeline_gill import GILLPipeline
from .pipeline_output import GILLImage, GILLPipelineOutput

__all__ = [
    "GILLPipeline",
    "GILLPipelineOutput",
    "GILLImage",
    "GILLDecoder",
    "DecodingSettings",
    "assemble_gill_pipeline",
]
