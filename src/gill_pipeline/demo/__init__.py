"""A web page to chat with a GILL pipeline (gradio, installed with the `demo` extra); `gill demo` serves it.

Nothing here imports gradio until a page is built, so the package imports without it.
"""

from .app import build_demo
from .backend import ChatBackend
from .server import DEFAULT_HOST, serve

__all__ = ["build_demo", "ChatBackend", "serve", "DEFAULT_HOST"]
