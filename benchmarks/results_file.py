"""One section of a results file (e.g. benchmarks/results/real_size.md, written by several benchmarks) replaced, or
appended, leaving the other sections as they are."""

import os


def replace_section(path: str, heading: str, text: str, title: str = "# Results\n\n") -> None:
    """Writes `text` (which starts with `heading`, a `## ...` line) as that section of `path`: the old section, up to
    the next `## ` heading, is removed and the new one appended; a missing file starts with `title`."""
    old = open(path).read() if os.path.isfile(path) else title
    if heading in old:
        start = old.index(heading)
        rest = old[start + len(heading):]
        end = rest.find("\n## ")
        old = old[:start] + (rest[end + 1:] if end >= 0 else "")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")
