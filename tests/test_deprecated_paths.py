"""Import paths from before the layout by concern still work, with a FutureWarning that names the new path."""

import importlib
import sys
import warnings

import pytest

from gill_pipeline._deprecated import MOVED_MODULES, RENAMED

# old module, a name it had, where that name lives now
CASES = [
    ("gill_pipeline.loading", "PipelineFolderError", "gill_pipeline.serialization.folder"),
    ("gill_pipeline.learned_weights", "save_learned_weights", "gill_pipeline.serialization.learned_weights"),
    ("gill_pipeline.hub", "push_folder_to_hub", "gill_pipeline.serialization.hub"),
    ("gill_pipeline.push", "push_pipeline_to_hub", "gill_pipeline.serialization.push"),
    ("gill_pipeline.lora", "load_llm_lora", "gill_pipeline.serialization.lora"),
    ("gill_pipeline.components", "pipeline_from_parts", "gill_pipeline.serialization.components"),
    ("gill_pipeline.base_models", "normalize_base_models", "gill_pipeline.serialization.base_models"),
    ("gill_pipeline.model_card", "write_model_card", "gill_pipeline.serialization.model_card"),
    ("gill_pipeline.convert_original", "map_reference_keys", "gill_pipeline.conversion.convert_original"),
    ("gill_pipeline.file_names", "LORA_FOLDER", "gill_pipeline.constants"),
    ("gill_pipeline.file_names", "looks_like_local_path", "gill_pipeline.serialization.paths"),
    ("gill_pipeline.model_dims", "lm_dims", "gill_pipeline.models.dims"),
    ("gill_pipeline.tiny", "build_tiny_gill_pipeline", "gill_pipeline.testing.tiny"),
    ("gill_pipeline.tiny_decoders", "build_tiny_decoder", "gill_pipeline.testing.tiny_decoders"),
    ("gill_pipeline.cli", "main", "gill_pipeline.commands"),
    ("gill_pipeline.cli", "load_pipeline", "gill_pipeline.commands.options"),
    ("gill_pipeline.cli", "write_answer", "gill_pipeline.commands.generate"),
    ("gill_pipeline.cli", "PRESETS", "gill_pipeline.bundled.presets"),
    ("gill_pipeline.cli", "CALL_ARGUMENTS", "gill_pipeline.demo.settings"),
    ("gill_pipeline.chat_cli", "TerminalChat", "gill_pipeline.commands.chat"),
    ("gill_pipeline.demo.launch", "serve", "gill_pipeline.demo.server"),
    ("gill_pipeline.demo.options", "add_model_options", "gill_pipeline.commands.options"),
    ("gill_pipeline.evaluation.command", "run_vist", "gill_pipeline.commands.evaluate"),
]


def _fresh_import(name):
    sys.modules.pop(name, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(name)
    return module, [w for w in caught if issubclass(w.category, FutureWarning)]


@pytest.mark.parametrize("old, name, home", CASES, ids=[f"{c[0]}.{c[1]}" for c in CASES])
def test_old_path_gives_the_same_object_with_a_warning(old, name, home):
    module, caught = _fresh_import(old)
    assert caught and home.split(".")[1] in str(caught[0].message), [str(w.message) for w in caught]
    assert getattr(module, name) is getattr(importlib.import_module(home), name)


def test_every_old_module_imports_and_its_homes_exist():
    for old, homes in MOVED_MODULES.items():
        module, _ = _fresh_import(old)
        for home in homes:
            importlib.import_module(home)
        for attr, (new_module, new_name) in RENAMED.get(old, {}).items():
            assert getattr(module, attr) is getattr(importlib.import_module(new_module), new_name)


def test_renamed_names_and_removed_constant():
    cli, _ = _fresh_import("gill_pipeline.cli")
    from gill_pipeline.commands import generate

    assert cli.add_generate_parser is generate.add_parser
    from gill_pipeline import constants

    with pytest.warns(FutureWarning, match="MODEL_CONFIG_FILE"):
        assert constants.CONFIG_FILE == constants.MODEL_CONFIG_FILE
    with pytest.raises(AttributeError, match="no attribute 'NOT_A_NAME'"):
        constants.NOT_A_NAME


def test_an_unknown_old_name_is_an_attribute_error_naming_the_new_homes():
    module, _ = _fresh_import("gill_pipeline.file_names")
    with pytest.raises(AttributeError, match="serialization.paths"):
        module.NOT_A_NAME
