"""`gill chat`: a multi-turn chat with a GILL pipeline in the terminal (see docs/demo.md).

Each line you type is one turn. A line that is the path of an image file, or a word of it that is one, is read as
that image, in place; the rest is text. Answers stream as they are decoded; each image in an answer is written to
`--output-dir` and its path printed with its source and the decision head's probabilities. `/reset` forgets the
conversation, `/quit` (or end of input) leaves. A user error in a turn (a missing image file, a value the pipeline
refuses) prints one line and the chat goes on; any other error ends it with its traceback (docs/cli.md).
"""

import os
import sys

from ..bundled.presets import RANDOM_MODEL
from ..demo.rendering import describe_image
from ..demo.settings import call_kwargs, preset_settings
from ..demo.streaming import stream_turn
from ..utils.image_io import MAX_IMAGE_PIXELS
from ..pipeline import GILLConversation
from .options import (
    USER_ERRORS,
    add_image_limit_option,
    add_model_options,
    add_retrieval_options,
    add_subcommand,
    add_turn_options,
    check_output_dir,
    is_image_path,
    load_model,
    model_name,
    read_image_file,
    report_error,
    run,
    settings_from_args,
)

COMMANDS = {"/reset": "forget the conversation", "/quit": "leave, as end of input does", "/help": "show this help"}
USER_PROMPT, ANSWER_PROMPT = "you> ", "gill> "


def parse_line(line: str, max_pixels: int = MAX_IMAGE_PIXELS) -> list:
    """A typed line -> the turn's content: image paths (the whole line, or single words) become images, in place;
    images above `max_pixels` are refused (one line, and the chat goes on)."""
    line = line.strip()
    if is_image_path(line) and os.path.isfile(os.path.expanduser(line)):
        return [_read_image(line, max_pixels)]
    content, words = [], []
    for word in line.split():
        if is_image_path(word):
            if words:
                content.append(" ".join(words))
                words = []
            content.append(_read_image(word, max_pixels))
        else:
            words.append(word)
    if words:
        content.append(" ".join(words))
    return content


def _is_command(line: str) -> bool:
    # One word starting with "/" that is no file and names no image: absolute image paths are content.
    return line.startswith("/") and len(line.split()) == 1 and not is_image_path(line) and not os.path.exists(line)


def _read_image(path: str, max_pixels: int):
    return read_image_file(os.path.expanduser(path), max_pixels)


class TerminalChat:
    """One chat session: reads turns from `stdin`, writes answers to `stdout` and user errors (one line each; with
    `verbose`, after their traceback) to `stderr`."""

    def __init__(
        self, pipe, settings: dict, seed: int, output_dir: str, stdin=None, stdout=None, stderr=None,
        verbose: bool = False, max_image_pixels: int = MAX_IMAGE_PIXELS,
    ):
        self.pipe, self.settings, self.seed, self.output_dir, self.verbose = pipe, settings, seed, output_dir, verbose
        self.max_image_pixels = max_image_pixels
        self.stdin, self.stdout, self.stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
        self.conversation = GILLConversation(pipe)
        self.turn = 0
        self._answer_started = False

    def run(self) -> int:
        interactive = self.stdin.isatty()
        if interactive:
            self._say("Chat with GILL. Type a message; image file paths are read as images. " + self._help())
        while True:
            if interactive:
                self.stdout.write(USER_PROMPT)
                self.stdout.flush()
            line = self.stdin.readline()
            if not line:  # end of input
                return 0
            line = line.strip()
            if not line:
                continue
            if _is_command(line):
                if line == "/quit":
                    return 0
                self._command(line)
                continue
            self._answer_started = False
            try:
                self._answer(parse_line(line, self.max_image_pixels))
            except USER_ERRORS as error:
                if self._answer_started:  # the error goes below the half-written answer
                    self.stdout.write("\n")
                    self.stdout.flush()
                report_error(error, "gill chat", verbose=self.verbose, file=self.stderr)

    def _command(self, line: str) -> None:
        if line == "/reset":
            self.conversation.reset()
            self._say("(conversation reset)")
        elif line == "/help":
            self._say(self._help())
        else:
            print(f"gill chat: error: unknown command {line!r}; {self._help()}", file=self.stderr, flush=True)

    def _help(self) -> str:
        return "Commands: " + ", ".join(f"{name} ({what})" for name, what in COMMANDS.items()) + "."

    def _say(self, text: str) -> None:
        print(text, file=self.stdout, flush=True)

    def _answer(self, content: list) -> None:
        self.turn += 1
        kwargs = call_kwargs(self.settings, seed=self.seed)
        image_number, at_line_start = 0, True
        for event in stream_turn(self.conversation, content, self.pipe.tokenizer, output_type="pil", **kwargs):
            if event.kind == "text" and not event.value:
                continue
            if event.kind in ("text", "image") and not self._answer_started:
                self.stdout.write(ANSWER_PROMPT)
                self._answer_started, at_line_start = True, False
            if event.kind == "text":
                self.stdout.write(event.value)
                at_line_start = event.value.endswith("\n")
            elif event.kind == "image":
                if not at_line_start:
                    self.stdout.write("\n")
                for path, description in self._write_image(event.value, image_number):
                    self.stdout.write(f"[image: {path} ({description})]\n")
                image_number, at_line_start = image_number + 1, True
            self.stdout.flush()
        if not self._answer_started:
            self.stdout.write(ANSWER_PROMPT + "(no answer)")
            at_line_start = False
        if not at_line_start:
            self.stdout.write("\n")
        self.stdout.flush()

    def _write_image(self, image, number: int) -> list[tuple[str, str]]:
        """Writes the image (and its `image_mode="both"` alternatives) as PNG; returns (path, description) pairs."""
        os.makedirs(self.output_dir, exist_ok=True)
        written = []
        for suffix, shown in [("", image)] + [("_alternative", alt) for alt in image.alternatives or []]:
            path = os.path.join(self.output_dir, f"turn{self.turn}_image{number}_{shown.source}{suffix}.png")
            shown.image.save(path)
            written.append((path, ("alternative: " if suffix else "") + describe_image(shown)))
        return written


def run_chat(args) -> int:
    check_output_dir(args.output_dir)
    settings = {**preset_settings(model_name(args)), **settings_from_args(args)}
    pipe = load_model(args)
    return TerminalChat(
        pipe, settings, args.seed, args.output_dir, verbose=args.verbose, max_image_pixels=args.max_image_pixels
    ).run()


def add_parser(subparsers) -> None:
    p = add_subcommand(
        subparsers,
        "chat",
        "Chat with a GILL pipeline in the terminal; image paths are read as images, answer images are written.",
        "A multi-turn chat in the terminal. Each line is one turn; the path of an image file (the whole line, or a "
        "word of it) is read as that image. Answers stream; their images are written to --output-dir (as "
        "turnN_imageI_SOURCE.png, replacing files of an earlier chat there) and their paths printed. "
        f"{', '.join(COMMANDS)}; end of input also quits. Without --model, uses the bundled shapes-world model when "
        f"installed, else {RANDOM_MODEL!r}.",
        run=run_chat,
    )
    add_model_options(p)
    add_retrieval_options(p)
    add_turn_options(p)
    add_image_limit_option(p)
    p.add_argument("--output-dir", default="gill_chat", help="where the answers' images go (default: %(default)s)")


def main(argv: list[str] | None = None) -> int:
    """`gill chat ARGS` alone (the same exit codes as every `gill` command)."""
    return run([add_parser], ["chat", *(sys.argv[1:] if argv is None else argv)])
