"""The `gill` command line, run in-process: convert-original, push (through the fake Hub), generate, errors."""

import argparse
import os

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard

from fake_hub import FakeHub
from gill_pipeline.commands import build_parser, main, options
from gill_pipeline.commands import generate as generate_command
from gill_pipeline.commands.options import CLIError
from gill_pipeline.serialization.folder import PipelineFolderError
from gill_pipeline.pipeline import GILLPipeline
from test_convert import release  # noqa: F401 (the synthetic reference release fixture)

TOKEN = "hf_fake_token"


@pytest.fixture(scope="module")
def base_dirs(release, tmp_path_factory):  # noqa: F811
    """The release's tiny base models saved as local folders, as `--language-model` etc. take them."""
    root = tmp_path_factory.mktemp("bases")
    release["llm"].save_pretrained(root / "lm")
    release["tokenizer"].save_pretrained(root / "lm")
    release["sd"].save_pretrained(root / "sd")
    release["encoder"].save_pretrained(root / "clip")
    release["processor"].save_pretrained(root / "clip")
    return ["--language-model", str(root / "lm"), "--stable-diffusion", str(root / "sd"), "--image-encoder", str(root / "clip")]


def convert_args(release, out, base_dirs, *extra):  # noqa: F811
    return ["convert-original", "--release-dir", str(release["root"]), "--output-dir", str(out), *base_dirs, *extra]


def test_convert_original_writes_a_loadable_pipeline(release, base_dirs, tmp_path, capsys):  # noqa: F811
    assert main(convert_args(release, tmp_path / "whole", base_dirs)) == 0
    assert "Converted" in capsys.readouterr().out
    pipe = GILLPipeline.from_pretrained(str(tmp_path / "whole"))
    torch.testing.assert_close(pipe.gill.decision_head[1].weight, release["decision"][1].weight)
    assert pipe.img_token_ids == release["img_ids"]
    # A non-empty output folder is refused unless --overwrite.
    assert main(convert_args(release, tmp_path / "whole", base_dirs)) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_convert_learned_weights_only_then_push_with_card(release, base_dirs, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "learned"
    assert main(convert_args(release, out, base_dirs, "--learned-weights-only")) == 0
    assert os.path.isfile(out / "gill_learned_weights.json") and not os.path.exists(out / "llm")
    with FakeHub() as hub:
        code = main(["push", str(out), "org/gill-cli", "--token", TOKEN, "--dataset", "cc3m", "--metric", "fid=12.5"])
        assert code == 0, capsys.readouterr().err
        files = hub.files("org/gill-cli")
    assert "gill/diffusion_pytorch_model.safetensors" in files
    assert "Pushed the GILL learned weights to org/gill-cli" in capsys.readouterr().out
    (tmp_path / "README.md").write_bytes(files["README.md"])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "gill_pipeline" and card.data.datasets == ["cc3m"] and "12.5" in card.text


def test_push_learned_weights_only_from_a_whole_pipeline_folder(tmp_path, capsys):
    from conftest import make_pipeline

    pipe = make_pipeline("opt")
    pipe.save_pretrained(tmp_path / "whole")
    with FakeHub() as hub:
        assert main(["push", str(tmp_path / "whole"), "org/learned", "--learned-weights-only", "--token", TOKEN]) == 0
        assert main(["push", str(tmp_path / "whole"), "org/whole", "--token", TOKEN]) == 0
        learned, whole = hub.files("org/learned"), hub.files("org/whole")
    assert "gill_learned_weights.json" in learned and "model_index.json" not in learned
    assert "model_index.json" in whole and "README.md" in whole
    assert os.path.isfile(tmp_path / "whole" / "README.md")  # the card is written into the folder pushed


def test_push_keeps_remote_files_unless_told_to_delete_them_and_names_them(tmp_path, capsys, caplog):
    from conftest import make_pipeline

    folder = make_pipeline("opt").save_learned_weights(tmp_path / "learned")
    with FakeHub() as hub:
        api = HfApi(token=TOKEN)
        api.create_repo("org/mine")
        api.create_commit("org/mine", [CommitOperationAdd("notes.txt", b"mine"), CommitOperationAdd("README.md", b"my card")],
                          commit_message="user files")
        assert main(["push", folder, "org/mine", "--token", TOKEN]) == 0, capsys.readouterr().err
        files = hub.files("org/mine")
        assert files["notes.txt"] == b"mine" and files["README.md"] == b"my card"
        assert "gill_learned_weights.json" in files
        caplog.clear()
        assert main(["push", folder, "org/mine", "--token", TOKEN, "--delete-remote-files", "--overwrite-model-card"]) == 0
        files = hub.files("org/mine")
    # Logged as a warning (on stderr outside pytest) before the commit that deletes.
    assert any("Deleting" in r.getMessage() and "notes.txt" in r.getMessage() for r in caplog.records)
    assert "notes.txt" not in files and files["README.md"] != b"my card" and "gill_learned_weights.json" in files


def test_push_that_would_mix_a_pipeline_and_learned_weights_is_one_line_error(tmp_path, capsys):
    from conftest import make_pipeline

    pipe = make_pipeline("opt")
    pipe.save_pretrained(tmp_path / "whole")
    learned = pipe.save_learned_weights(tmp_path / "learned")
    with FakeHub() as hub:
        assert main(["push", str(tmp_path / "whole"), "org/both", "--token", TOKEN]) == 0
        commits = len(hub.repos["org/both"].commits)
        assert main(["push", learned, "org/both", "--token", TOKEN]) == 2
        assert len(hub.repos["org/both"].commits) == commits
    err = capsys.readouterr().err
    assert "model_index.json" in err and "--delete-remote-files" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["push", "/no/such/folder", "org/x"], "folder not found: /no/such/folder"),
        (["convert-original", "--output-dir", "x"], "give --release-dir, or both --model-args and --checkpoint"),
        (["convert-original", "--model-args", "/no/args.json", "--checkpoint", "/no/ckpt", "--output-dir", "x"],
         "--model-args: file not found: /no/args.json"),
    ],
)
def test_user_errors_are_one_plain_line_with_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_bad_metric_and_unsafe_pickle_are_plain_errors(release, base_dirs, tmp_path, capsys):  # noqa: F811
    from conftest import make_pipeline

    make_pipeline("opt").save_learned_weights(tmp_path / "learned")
    assert main(["push", str(tmp_path / "learned"), "org/x", "--metric", "oops"]) == 2
    assert "NAME=NUMBER" in capsys.readouterr().err
    unsafe = tmp_path / "unsafe.pth.tar"
    torch.save({"state_dict": {}, "args": argparse.Namespace(a=1)}, unsafe)
    argv = ["convert-original", "--model-args", release["paths"]["args"], "--checkpoint", str(unsafe),
            "--output-dir", str(tmp_path / "out"), *base_dirs]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Refusing to load the reference checkpoint" in err and str(unsafe) in err and "Traceback" not in err


def test_every_option_has_help_text():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("generate", "convert-original", "push"):
        sub = subparsers.choices[name]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"`gill {name}` option {action.option_strings or action.dest} has no help text"


def test_generate_still_works(tmp_path, capsys):
    argv = ["generate", "A dog.", "--max-new-tokens", "3", "--steps", "1", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    assert os.path.isfile(tmp_path / "answer.txt")


# ----------------------------------------------------------------------------------------------------------------
# Every bad argument is one line and exit code 2 (issue 11, section 5)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "gill: error: the following arguments are required: command"),
        (["nonsense"], "invalid choice: 'nonsense'"),
        (["push"], "gill push: error: the following arguments are required: folder, repo_id"),
        (["generate", "--device", "bogus"], "argument --device: 'bogus' is not a torch device"),
        (["generate", "--device", "meta"], "argument --device: 'meta' is not a device to run on here"),
        (["generate", "--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
        (["generate", "--max-new-tokens", "many"], "argument --max-new-tokens: expected a positive integer"),
        (["generate", "--temperature", "nan"], "argument --temperature: expected a positive finite number"),
        (["generate", "--top-p", "1.5"], "argument --top-p: expected a number in (0, 1]"),
        (["generate", "--guidance-scale", "-1"], "argument --guidance-scale: expected a non-negative finite number"),
        (["generate", "--max-images", "-2"], "argument --max-images: expected a non-negative integer"),
        (["generate", "--seed", "-1"], "argument --seed: expected an integer seed"),
        (["generate", "--dtype", "auto"], "argument --dtype: `--dtype`='auto' is not supported"),
        (["generate", "--image-mode", "sometimes"], "argument --image-mode: invalid choice: 'sometimes'"),
        (["generate", "--model", "/no/such/dir"], "No such folder: '/no/such/dir'"),
        (["generate", "--model", "./no_such_model"], "No such folder: './no_such_model'"),
        (["generate", "--model", "tiny-random", "--retrieval-index", "./no_index"], "--retrieval-index: no such folder"),
        (["generate", "--model", "tiny-random", "missing.png"], "image file not found: missing.png"),
        (["convert-original", "--output-dir", "x", "--mapper-heads", "0"], "argument --mapper-heads: expected a positive"),
        (["convert-original", "--output-dir", "x", "--dtype", "int8"], "argument --dtype: `--dtype` must be"),
        (["convert-original", "--release-dir", "/no/release", "--output-dir", "x"], "--release-dir '/no/release' is not"),
    ],
)
def test_bad_arguments_are_one_line_with_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "usage:" not in err and err.count("\n") == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line(capsys):
    assert main(["generate", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "'cuda': cuda is not available on this machine" in err and err.count("\n") == 1


def test_unreadable_image_and_bad_output_dir_are_one_line(tmp_path, capsys):
    not_an_image = tmp_path / "photo.png"
    not_an_image.write_text("not an image")
    assert main(["generate", "--model", "tiny-random", str(not_an_image)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read image {not_an_image}" in err and err.count("\n") == 1
    a_file = tmp_path / "answer"
    a_file.write_text("")
    assert main(["generate", "--model", "tiny-random", "--output-dir", str(a_file)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert main(["convert-original", "--model-args", str(a_file), "--checkpoint", str(a_file), "--output-dir",
                 str(a_file)]) == 2
    assert "--output-dir: " in capsys.readouterr().err


def test_generate_help_shows_the_defaults_a_run_uses(capsys, monkeypatch):
    import inspect

    from gill_pipeline.bundled.presets import PRESETS, SHAPES_MODEL

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside "shapes-world"
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "a dog example" not in text
    defaults = inspect.signature(GILLPipeline.__call__).parameters
    assert f"{defaults['max_new_tokens'].default} with other models" in text
    assert f"{defaults['num_inference_steps'].default} with other models" in text
    shapes = PRESETS[SHAPES_MODEL]["settings"]
    assert f"{shapes['steps']} with '{SHAPES_MODEL}'" in text and f"{shapes['guidance_scale']} with '{SHAPES_MODEL}'" in text
    assert f"{shapes['image_mode']} with '{SHAPES_MODEL}'" in text


@pytest.mark.parametrize(
    "name, notice",
    [
        ("transformers.utils.import_utils", "`CLIPImageProcessor` requires torchvision (not installed); falling back to `X`"),
        ("diffusers.quantizers.torchao.torchao_quantizer",
         "Unable to import `torchao` Tensor objects. This may affect loading checkpoints serialized with `torchao`"),
        ("torch.utils._pytree", "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
                                "torch.compile as an opaque value type."),
    ],
)
def test_library_import_notices_are_dropped_and_others_kept(caplog, name, notice):
    import logging

    import gill_pipeline  # noqa: F401  (installs the filters)

    logger = logging.getLogger(name)
    with caplog.at_level(logging.WARNING, logger=name):
        logger.warning(notice)
        logger.warning("another notice")
    assert [r.getMessage() for r in caplog.records] == ["another notice"]


@pytest.mark.slow
def test_generate_output_has_no_library_notices(tmp_path):
    import subprocess
    import sys

    argv = [sys.executable, "-m", "gill_pipeline", "generate", "--model", "tiny-random", "--max-new-tokens", "2",
            "--steps", "1", "--output-dir", str(tmp_path)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torchvision" not in result.stderr and "[transformers]" not in result.stderr
    assert "Loading pipeline components" not in result.stderr and "Loading weights" not in result.stderr
    assert "Answer:" in result.stdout


# ----------------------------------------------------------------------------------------------------------------
# User errors are one line with exit code 2; anything else is a bug or a failure of the machine: its traceback and
# exit code 1 (issue 20; docs/cli.md, "Errors and exit codes")
# ----------------------------------------------------------------------------------------------------------------
USER_ERROR_CASES = [
    CLIError("--output-dir: x exists and is not a folder"),
    ValueError("`max_images` must be a non-negative integer, got -1."),
    FileNotFoundError("No such file: 'stories.json'"),
    PipelineFolderError("Missing file: gill/config.json"),
    ImportError("FID uses torchmetrics: `pip install gill-pipeline[eval]`"),
]
INTERNAL_ERROR_CASES = [
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    AssertionError("rows out of step"),
    KeyError("image_mode"),
    TypeError("'NoneType' object is not subscriptable"),
]


def failing_generate(monkeypatch, error):
    def run_generate(args):
        raise error

    monkeypatch.setattr(generate_command, "run_generate", run_generate)


@pytest.mark.parametrize("error", USER_ERROR_CASES, ids=lambda e: type(e).__name__)
def test_a_user_error_is_one_line_with_exit_code_2(error, monkeypatch, capsys):
    failing_generate(monkeypatch, error)
    assert main(["generate"]) == 2
    err = capsys.readouterr().err
    assert err == f"gill generate: error: {error}\n"


@pytest.mark.parametrize("error", INTERNAL_ERROR_CASES, ids=lambda e: type(e).__name__)
def test_any_other_error_shows_its_traceback_with_exit_code_1(error, monkeypatch, capsys):
    failing_generate(monkeypatch, error)
    assert main(["generate"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in run_generate" in err
    assert err.splitlines()[-1] == (
        f"gill generate: internal error: {type(error).__name__}: {str(error)} (not a usage error; the traceback above "
        "shows where)"
    )


def test_verbose_shows_the_traceback_of_a_user_error_too(monkeypatch, capsys):
    failing_generate(monkeypatch, ValueError("`steps` must be a positive integer, got 0."))
    assert main(["generate", "--verbose"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in run_generate" in err
    assert err.splitlines()[-1] == "gill generate: error: `steps` must be a positive integer, got 0."


def test_every_subcommand_takes_verbose():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        groups = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        if groups:  # `evaluate PROTOCOL`, `index ACTION`: each of them takes it
            assert all("--verbose" in p._option_string_actions for p in groups[0].choices.values()), name
        else:
            assert "--verbose" in sub._option_string_actions, name


def test_evaluate_requires_a_model_before_loading_anything(monkeypatch, tmp_path, capsys):
    loaded = []
    monkeypatch.setattr(options, "load_pipeline", lambda *args: loaded.append(args))
    argv = ["evaluate", "decision", "--decisions", str(tmp_path / "d.tsv"), "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == "gill evaluate decision: error: the following arguments are required: --model\n"
    assert loaded == [] and not os.path.exists(tmp_path / "out")


def test_python_m_gill_pipeline_is_the_gill_command():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "gill_pipeline", "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("usage: gill ")
    assert result.stdout == build_parser().format_help().replace(build_parser().prog, "gill")
