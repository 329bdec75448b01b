"""The gradio page: a chat with image upload, streamed answers with their images, settings and a reset button."""

import functools
import inspect
import os

from ..constants import IMAGE_MODES
from .backend import ChatBackend

TITLE = "GILL: chat with images"
# Element ids the browser test and any page automation find things by.
ELEMENT_IDS = dict(chatbot="gill-chatbot", input="gill-input", status="gill-status", reset="gill-reset")


def offline_environment() -> None:
    """Keeps gradio off the network: no usage analytics or version check (read when gradio is imported and when a
    page is built). Call before importing gradio; a value the user set is kept."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _user_errors(callback):
    """Shows a user error (a bad upload or setting, a pipeline check) as gradio's error popup in one line, instead of
    the generic 'Error' gradio shows for other exceptions. Generator callbacks (streamed) stay generators, as gradio
    streams only those."""
    import gradio as gr

    def one_line(error):
        return gr.Error(" ".join(str(error).split()))

    if inspect.isgeneratorfunction(callback):

        @functools.wraps(callback)
        def stream(*args):
            try:
                yield from callback(*args)
            except (ValueError, TypeError) as error:
                raise one_line(error) from error

        return stream

    @functools.wraps(callback)
    def call(*args):
        try:
            return callback(*args)
        except (ValueError, TypeError) as error:
            raise one_line(error) from error

    return call


def build_demo(
    pipe, model: str | None = None, settings: dict | None = None, images_dir: str | None = None,
    max_image_pixels: int | None = None,
):
    r"""
    Builds the demo page for `pipe` (not launched: call `.launch()` on the result, or use `gill demo`).

    Args:
        pipe ([`GILLPipeline`]):
            The pipeline to talk to.
        model (`str`, *optional*):
            The built-in model's name (`"shapes-world"`, `"tiny-random"`), whose preset gives the starting settings.
        settings (`dict`, *optional*):
            Starting settings over the preset (`settings.CALL_ARGUMENTS` option names, and `seed`).
        images_dir (`str`, *optional*):
            Where the answer's images are written for the page (default: a new temporary folder).
        max_image_pixels (`int`, *optional*):
            Largest uploaded image accepted, in pixels (default: `gill_pipeline.utils.image_io.MAX_IMAGE_PIXELS`, 64 MP).

    Returns:
        `gradio.Blocks`: the page; `demo.gill_backend` is its [`ChatBackend`].
    """
    offline_environment()
    import gradio as gr

    backend = ChatBackend(
        pipe, model=model, settings=settings, images_dir=images_dir, max_image_pixels=max_image_pixels
    )
    start = backend.page_defaults()
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(
            f"## {TITLE}\nUpload an image and/or type a message. GILL answers with text, and with images it "
            "**generates** or **retrieves**; each image is labelled with its source and the decision head's "
            "probabilities."
        )
        conversation = gr.State(None)
        pending = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                # No "share" button (it is for Hugging Face Spaces discussions). The height follows the window.
                chatbot = gr.Chatbot(
                    label="Conversation", elem_id=ELEMENT_IDS["chatbot"], height="72vh", min_height=420,
                    buttons=["copy", "copy_all"],
                )
                status = gr.Markdown("", elem_id=ELEMENT_IDS["status"])
                box = gr.MultimodalTextbox(
                    placeholder="Type a message, attach an image with the clip button, press Enter",
                    file_types=["image"],
                    file_count="multiple",
                    show_label=False,
                    elem_id=ELEMENT_IDS["input"],
                )
                reset = gr.Button("Reset conversation", elem_id=ELEMENT_IDS["reset"])
            with gr.Column(scale=1):
                gr.Markdown("### Settings")
                image_mode = gr.Dropdown(
                    list(IMAGE_MODES), value=start["image_mode"], label="Image mode",
                    info="auto: the decision head chooses; both: generated and retrieved",
                )
                steps = gr.Slider(1, max(100, start["steps"]), value=start["steps"], step=1, label="Denoising steps")
                guidance = gr.Slider(
                    0.0, max(20.0, start["guidance_scale"]), value=start["guidance_scale"], step=0.5,
                    label="Guidance scale",
                )
                seed = gr.Number(value=start["seed"], precision=0, minimum=0, label="Seed")
                max_tokens = gr.Slider(
                    1, max(256, start["max_new_tokens"]), value=start["max_new_tokens"], step=1,
                    label="Max new tokens",
                )
        settings_inputs = [image_mode, steps, guidance, seed, max_tokens]

        def take_turn(message, history):
            # The box is locked until the answer is complete: a turn sent meanwhile would start from the
            # conversation as it was before this one.
            history, _, waiting = backend.user_message(message, history)
            return history, gr.MultimodalTextbox(value=None, interactive=False), waiting

        box.submit(_user_errors(take_turn), [box, chatbot], [chatbot, box, pending], queue=False).then(
            # One turn at a time: every session shares the one pipeline.
            _user_errors(backend.answer), [pending, chatbot, conversation, *settings_inputs],
            [chatbot, conversation, status], concurrency_limit=1, concurrency_id="gill-pipeline",
        ).then(lambda: gr.MultimodalTextbox(interactive=True), None, [box], queue=False)
        reset.click(backend.reset, None, [chatbot, conversation, status, pending], queue=False)
    demo.gill_backend = backend
    return demo
