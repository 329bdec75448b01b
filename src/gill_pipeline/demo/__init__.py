"""`gill demo`: a web page to chat with a GILL pipeline (gradio, installed with the `demo` extra).

Nothing here imports gradio until a page is built, so `gill --help` and the chat CLI work without it.
"""

from .app import build_demo
from .backend import ChatBackend
from .launch import main

__all__ = ["build_demo", "ChatBackend", "main"]
