"""Old import paths of modules that moved in the 0.2 layout, kept working with a `FutureWarning`.

`import gill_pipeline.loading` (say) finds nothing on disk any more: the finder below answers it with a module whose
names are read from the modules that now hold them, and warns once with the new path. Public names exported from
`gill_pipeline` itself never moved. Installed by `gill_pipeline/__init__.py`; removed in a later minor release.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

# old module -> the modules that now hold its names, searched in order.
MOVED_MODULES: dict[str, tuple[str, ...]] = {}


class _MovedModule(types.ModuleType):
    """Reads every attribute from the modules that now hold the old module's names."""

    def __init__(self, name: str, homes: tuple[str, ...]):
        super().__init__(name, f"moved to {', '.join(homes)}")
        self.__dict__["_homes"] = homes

    def __getattr__(self, attr: str):
        for home in self.__dict__["_homes"]:
            module = importlib.import_module(home)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(self._homes)}) has no attribute {attr!r}")

    def __dir__(self):
        names = set()
        for home in self.__dict__["_homes"]:
            names.update(dir(importlib.import_module(home)))
        return sorted(names)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=False)

    def create_module(self, spec):
        homes = MOVED_MODULES[spec.name]
        warnings.warn(
            f"`{spec.name}` moved to `{homes[0]}`"
            + (f" (and {', '.join(f'`{h}`' for h in homes[1:])})" if len(homes) > 1 else "")
            + "; the old path will be removed in a later release.",
            FutureWarning,
            stacklevel=3,
        )
        if len(homes) == 1:
            return importlib.import_module(homes[0])
        return _MovedModule(spec.name, homes)

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
