from .gill_model import GILLModel
from .mapper import GILLMapper
from .open_clip_vision import OpenCLIPVisionModel

__all__ = ["GILLModel", "GILLMapper", "OpenCLIPVisionModel"]
