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
