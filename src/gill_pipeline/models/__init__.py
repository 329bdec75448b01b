from .gill_model import GILLModel
from .mapper import GILLMapper

__all__ = ["GILLModel", "GILLMapper"]
