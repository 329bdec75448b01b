"""Whether a name given to a loader is a local path or a Hub repo id (`name` or `org/name`)."""

import os


def looks_like_local_path(name: str) -> bool:
    """Whether `name` can only be meant as a local path (never a Hub repo id, which is `name` or `org/name`).

    True for an absolute path, one that starts with `./`, `../` or `~`, one with an OS separator other than `/` or
    more than one `/`, and one that exists on disk.
    """
    if os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    if (os.sep != "/" and os.sep in name) or "\\" in name or name.count("/") > 1:
        return True
    return os.path.exists(name)


def name_or_path(value, name: str) -> str:
    """`value` (a `str` or `os.PathLike`: a local path or a Hub repo id) as a string; a TypeError/ValueError naming
    `name` for anything else (None, a number, an empty string), not an error from deep inside `os` or the Hub."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(
            f"`{name}` must be a local folder or a Hub repo id (`str` or `os.PathLike`), got {type(value).__name__} "
            f"{value!r:.100}."
        )
    if not value.strip():
        raise ValueError(f"`{name}` must be a local folder or a Hub repo id, got the empty string {value!r}.")
    return value


def missing_folder_reason(path: str) -> str:
    """Why a local path is not a folder to load: `"it is a file"` or `"it does not exist"`."""
    return "it is a file" if os.path.isfile(os.path.expanduser(path)) else "it does not exist"
