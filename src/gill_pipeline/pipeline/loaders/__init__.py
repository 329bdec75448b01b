"""Mixins of `GILLPipeline`, as diffusers keeps them in `loaders/`: learned weights / LoRA / Hub, and retrieval."""

from .learned_weights import GILLLoaderMixin
from .retrieval import RetrievalMixin

__all__ = ["GILLLoaderMixin", "RetrievalMixin"]
