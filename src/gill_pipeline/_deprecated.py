"""Old import paths of modules that moved when the package was laid out by concern (docs/architecture.md), kept working with a `FutureWarning`.

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

_P = "gill_pipeline."
_COMMANDS = ("commands", "commands.options", "commands.generate", "commands.convert", "commands.push")

# old module -> the modules that now hold its names, searched in order.
MOVED_MODULES: dict[str, tuple[str, ...]] = {
    _P + old: tuple(_P + home for home in homes)
    for old, homes in {
        "loading": ("serialization.folder",),
        "learned_weights": ("serialization.learned_weights",),
        "hub": ("serialization.hub",),
        "push": ("serialization.push",),
        "lora": ("serialization.lora",),
        "components": ("serialization.components",),
        "base_models": ("serialization.base_models",),
        "model_card": ("serialization.model_card",),
        "convert_original": ("conversion.convert_original",),
        "file_names": ("constants", "serialization.paths"),
        "model_dims": ("models.dims",),
        "tiny": ("testing.tiny",),
        "tiny_decoders": ("testing.tiny_decoders",),
        "cli": _COMMANDS + ("bundled.presets", "demo.settings"),
        "chat_cli": ("commands.chat",),
        "demo.launch": ("commands.demo", "demo.server"),
        "demo.options": ("commands.options",),
        "evaluation.command": ("commands.evaluate",),
    }.items()
}

# The old `add_<name>_parser` functions are each command module's `add_parser` now.
_PARSERS = {"generate": "generate", "convert_original": "convert", "push": "push", "evaluate": "evaluate",
            "chat": "chat", "demo": "demo"}


def _parser(name: str) -> dict[str, tuple[str, str]]:
    return {f"add_{name}_parser": (_P + "commands." + _PARSERS[name], "add_parser")}


# Names that were renamed when they moved: old module -> {old name: (new module, new name)}.
RENAMED: dict[str, dict[str, tuple[str, str]]] = {
    _P + "cli": {
        **{old: new for name in _PARSERS for old, new in _parser(name).items()},
        "_default_help": (_P + "commands.options", "default_help"),
        "_one_line": (_P + "commands.options", "one_line"),
    },
    _P + "chat_cli": _parser("chat"),
    _P + "demo.launch": _parser("demo"),
    _P + "evaluation.command": _parser("evaluate"),
    _P + "file_names": {
        old: (_P + "constants", new) for old, new in {
            "FEATURE_EXTRACTOR_FOLDER": "FEATURE_EXTRACTOR_COMPONENT",
            "SCHEDULER_FOLDER": "SCHEDULER_COMPONENT",
            "SD_SCHEDULER_SUBFOLDER": "SCHEDULER_COMPONENT",
            "SD_VAE_SUBFOLDER": "VAE_COMPONENT",
            "SD_UNET_SUBFOLDER": "UNET_COMPONENT",
        }.items()
    },
}


class _MovedModule(types.ModuleType):
    """Reads every attribute from the modules that now hold the old module's names."""

    def __init__(self, name: str, homes: tuple[str, ...]):
        super().__init__(name, f"moved to {', '.join(homes)}")
        self.__dict__["_homes"] = homes

    def __getattr__(self, attr: str):
        renamed = RENAMED.get(self.__name__, {}).get(attr)
        if renamed is not None:
            return getattr(importlib.import_module(renamed[0]), renamed[1])
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
        if len(homes) == 1 and spec.name not in RENAMED:
            return importlib.import_module(homes[0])
        return _MovedModule(spec.name, homes)

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
