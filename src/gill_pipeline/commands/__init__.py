"""The `gill` command line (docs/cli.md): `gill generate`, `gill chat`, `gill demo`, `gill evaluate`,
`gill convert-original`, `gill push`, `gill serve`, `gill index build`.

One module per subcommand, each with `add_parser(subparsers)`; `options.py` holds what they share (the options
declared once, argument types, the model loader, errors -> exit codes). No subcommand imports another, and the
libraries (`demo/`, `evaluation/`, ...) import nothing from here. Run it as `gill ...`, `python -m gill_pipeline ...`,
or in-process as `gill_pipeline.commands.main([...])`.
"""

from . import chat, convert, demo, evaluate, generate, index, options, push, serve

# `gill --help` lists the subcommands in this order.
SUBCOMMANDS = (
    generate.add_parser, convert.add_parser, push.add_parser, evaluate.add_parser, chat.add_parser, demo.add_parser,
    serve.add_parser, index.add_parser,
)


def build_parser():
    """The whole `gill` parser."""
    return options.build_parser(SUBCOMMANDS)


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand (`argv` default: `sys.argv[1:]`); returns the exit code: 0, 2 for a user error (one line
    on stderr), 1 for any other error (its traceback), 130 when interrupted (docs/cli.md)."""
    return options.run(SUBCOMMANDS, argv)


__all__ = ["main", "build_parser", "SUBCOMMANDS"]
