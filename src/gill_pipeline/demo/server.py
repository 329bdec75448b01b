"""Serving a demo page on this machine, offline (`gill demo` calls it; so can a Python program)."""

import logging

DEFAULT_HOST = "127.0.0.1"
logger = logging.getLogger(__name__)


def serve(demo, host: str = DEFAULT_HOST, port: int | None = None, block: bool = True) -> str:
    """Serves a page from `build_demo` on `host:port` (port None: gradio's first free one from 7860), offline: no
    share link, no browser opened, server-side rendering off (it would need Node.js). Returns the page's address;
    with `block=True` only once the server stops (Ctrl+C), else at once (stop it with `demo.close()`)."""
    demo.queue()
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        enable_monitoring=False,
        allowed_paths=[demo.gill_backend.images_dir],
        prevent_thread_lock=True,
        quiet=True,  # gradio's banner suggests share=True; the address is logged below instead
    )
    logger.warning("The GILL demo is served on %s%s", url, " (Ctrl+C stops it)." if block else "")
    if block:
        demo.block_thread()
    return url
