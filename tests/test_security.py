"""Nothing pickled unless the user opts in, nothing imported from a folder, no remote code (issue 11, section 3;
docs/security.md).

A "bomb" is a pickle that, when unpickled without `weights_only=True`, creates a marker file: every test checks that
the marker never appears.
"""

import json
import os
import pickle
import re

import pytest
import torch

from conftest import header_bomb_png, make_pipeline, random_image
from gill_pipeline import GILLPipeline
from gill_pipeline.serialization.folder import PipelineFolderError, UnsafeFileError
from training.setup_models import attach_image_decoder


class Bomb:
    """Unpickling this runs `open(marker, "w")`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_bomb(path, marker):
    torch.save({"weight": Bomb(marker)}, path)


@pytest.fixture()
def pipe_dir(saved_copy):
    """A saved tiny pipeline of this test's own (conftest's `saved_copy`)."""
    return saved_copy


# ----------------------------------------------------------------------------------------------------------------
# Pickles
# ----------------------------------------------------------------------------------------------------------------
def test_a_pickle_beside_the_safetensors_is_refused_before_it_is_read(pipe_dir, tmp_path):
    marker = tmp_path / "ran"
    write_bomb(pipe_dir / "llm" / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeFileError, match=rf"pickled file {pipe_dir / 'llm' / 'pytorch_model.bin'}.*allow_pickle"):
        GILLPipeline.from_pretrained(pipe_dir)
    assert not marker.exists()


def test_allow_pickle_reads_pickled_weights_with_weights_only(pipe_dir, tmp_path, opt_pipe):
    # A plain state dict as the only LM weights: read with allow_pickle=True, and equal to the original.
    os.remove(pipe_dir / "llm" / "model.safetensors")
    torch.save(opt_pipe.llm.state_dict(), pipe_dir / "llm" / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError):
        GILLPipeline.from_pretrained(pipe_dir)
    loaded = GILLPipeline.from_pretrained(pipe_dir, allow_pickle=True)
    torch.testing.assert_close(loaded.llm.get_input_embeddings().weight, opt_pipe.llm.get_input_embeddings().weight)
    # A bomb in its place is refused by torch.load(weights_only=True), even with allow_pickle=True.
    marker = tmp_path / "ran"
    write_bomb(pipe_dir / "llm" / "pytorch_model.bin", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        GILLPipeline.from_pretrained(pipe_dir, allow_pickle=True)
    assert not marker.exists()


def test_use_safetensors_false_needs_allow_pickle(saved_opt):
    with pytest.raises(ValueError, match="allow_pickle=True"):
        GILLPipeline.from_pretrained(saved_opt, use_safetensors=False)


def test_learned_weights_refuse_pickles(opt_pipe, tmp_path):
    folder = opt_pipe.save_learned_weights(tmp_path / "learned")
    gill_dir = os.path.join(folder, "gill")
    marker = tmp_path / "ran"
    write_bomb(os.path.join(gill_dir, "diffusion_pytorch_model.bin"), marker)
    kwargs = dict(llm=opt_pipe.llm, vae=None, unet=None, image_encoder=None)
    with pytest.raises(UnsafeFileError, match="diffusion_pytorch_model.bin"):
        GILLPipeline.from_pretrained(folder, **kwargs)
    # With allow_pickle, the safetensors file is still what is read.
    loaded = GILLPipeline.from_pretrained(folder, allow_pickle=True, **kwargs)
    torch.testing.assert_close(loaded.gill.logit_scale, opt_pipe.gill.logit_scale)
    assert not marker.exists()


def test_a_pickled_lora_adapter_is_refused(pipe_dir, tmp_path):
    lora = pipe_dir / "llm_lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    write_bomb(lora / "adapter_model.bin", tmp_path / "ran")
    with pytest.raises(UnsafeFileError, match="adapter_model.bin"):
        GILLPipeline.from_pretrained(pipe_dir)
    assert not (tmp_path / "ran").exists()


def test_from_base_models_refuses_pickled_weights(opt_pipe, tmp_path):
    lm_dir = tmp_path / "lm"
    opt_pipe.llm.save_pretrained(lm_dir)
    os.remove(lm_dir / "model.safetensors")
    torch.save(opt_pipe.llm.state_dict(), lm_dir / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):
        GILLPipeline.from_base_models(str(lm_dir), stable_diffusion=None, image_encoder=None, tokenizer=opt_pipe.tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# Code and classes named by a folder
# ----------------------------------------------------------------------------------------------------------------
def test_a_code_file_in_the_folder_is_refused_even_with_allow_pickle(pipe_dir, tmp_path):
    marker = tmp_path / "ran"
    (pipe_dir / "unet" / "transformers.py").write_text(f"open({str(marker)!r}, 'w')\n")
    with pytest.raises(UnsafeFileError, match="code file"):
        GILLPipeline.from_pretrained(pipe_dir, allow_pickle=True)
    assert not marker.exists()


@pytest.mark.parametrize(
    "entry",
    [["subprocess", "Popen"], ["os", "system"], ["my_module", "UNet2DConditionModel"], ["gill_pipeline_evil", "X"]],
)
def test_classes_from_other_libraries_are_refused(pipe_dir, entry):
    index = json.loads((pipe_dir / "model_index.json").read_text())
    index["unet"] = entry
    (pipe_dir / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeFileError, match=rf"refusing the class '{entry[1]}' of library '{entry[0]}'"):
        GILLPipeline.from_pretrained(pipe_dir)


def test_a_custom_pipeline_class_is_refused(pipe_dir):
    index = json.loads((pipe_dir / "model_index.json").read_text())
    index["_class_name"] = ["my_pipeline", "MyPipeline"]
    (pipe_dir / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineFolderError, match="custom pipeline code is never loaded"):
        GILLPipeline.from_pretrained(pipe_dir)


@pytest.mark.parametrize(
    "kwargs", [{"trust_remote_code": True}, {"custom_pipeline": "my_pipeline"}, {"custom_revision": "main"}]
)
def test_remote_code_arguments_are_refused(saved_opt, opt_pipe, tmp_path, kwargs):
    with pytest.raises(ValueError, match=rf"`{next(iter(kwargs))}`=.* is not accepted"):
        GILLPipeline.from_pretrained(saved_opt, **kwargs)
    folder = opt_pipe.save_learned_weights(tmp_path / "learned")
    with pytest.raises(ValueError, match="is not accepted"):
        GILLPipeline.from_pretrained(folder, llm=opt_pipe.llm, llm_kwargs=kwargs)
    with pytest.raises(ValueError, match="is not accepted"):
        GILLPipeline.from_base_models(opt_pipe.llm, None, None, tokenizer=opt_pipe.tokenizer, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# training/setup_models.py: attaching an image decoder from a (possibly downloaded) folder
# ----------------------------------------------------------------------------------------------------------------
def test_attach_image_decoder_never_imports_a_module_named_by_the_folder(pipe_dir, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "evil_decoder.py").write_text(
        f"open({str(marker)!r}, 'w')\nclass UNet2DConditionModel:\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)  # the module would be importable from the working directory
    monkeypatch.syspath_prepend(str(tmp_path))
    index = json.loads((pipe_dir / "model_index.json").read_text())
    index["unet"] = ["evil_decoder", "UNet2DConditionModel"]
    (pipe_dir / "model_index.json").write_text(json.dumps(index))
    pipe = make_pipeline("opt")
    with pytest.raises(PipelineFolderError, match="refusing the class 'UNet2DConditionModel' of library 'evil_decoder'"):
        attach_image_decoder(pipe, str(pipe_dir))
    assert not marker.exists()


def test_attach_image_decoder_refuses_a_non_decoder_class_and_pickles(pipe_dir, tmp_path):
    index_path = pipe_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index["scheduler"] = ["diffusers", "AutoencoderKL"]
    index_path.write_text(json.dumps(index))
    pipe = make_pipeline("opt")
    with pytest.raises(PipelineFolderError, match="AutoencoderKL is not a diffusers SchedulerMixin"):
        attach_image_decoder(pipe, str(pipe_dir))
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    index_path.write_text(json.dumps(index))
    write_bomb(pipe_dir / "unet" / "diffusion_pytorch_model.bin", tmp_path / "ran")
    with pytest.raises(UnsafeFileError):
        attach_image_decoder(pipe, str(pipe_dir))
    assert not (tmp_path / "ran").exists()


def test_attach_image_decoder_still_loads_a_good_folder(saved_opt):
    pipe = make_pipeline("opt", seed=1)
    attach_image_decoder(pipe, str(saved_opt))
    reference = GILLPipeline.from_pretrained(saved_opt)
    torch.testing.assert_close(pipe.unet.conv_in.weight, reference.unet.conv_in.weight)


# ----------------------------------------------------------------------------------------------------------------
# Image files: one pixel limit everywhere an image is read from a path, an upload or bytes (gill_pipeline.utils.image_io)
# ----------------------------------------------------------------------------------------------------------------
LIMIT_TEXT = "above the limit of 67,108,864 pixels"  # image_io.MAX_IMAGE_PIXELS, 8192 x 8192


@pytest.fixture()
def bomb(tmp_path):
    return header_bomb_png(tmp_path / "bomb.png")


def _not_loaded(*args, **kwargs):
    raise AssertionError("the model was loaded although an input was refused")


@pytest.mark.parametrize("size", [(20000, 20000), (10000, 10000)])  # above PIL's error limit; in its warning band
def test_library_refuses_an_image_above_the_limit_before_decoding_it(tmp_path, size, recwarn):
    from gill_pipeline.utils.image_io import ImageTooLargeError, read_image

    path = header_bomb_png(tmp_path / "big.png", *size)
    pixels = f"{size[0]}x{size[1]} pixels ({size[0] * size[1]:,})"
    with pytest.raises(ImageTooLargeError, match=re.escape(f"The image {path} is {pixels}, {LIMIT_TEXT}")):
        read_image(path)
    with open(path, "rb") as f:  # bytes and file objects too
        data = f.read()
    with pytest.raises(ValueError, match=re.escape(f"The image upload.png is {pixels}")):
        read_image(data, name="upload.png")
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]  # no PIL warning on top


def test_library_pixel_limit_is_configurable_and_checked(tmp_path):
    from gill_pipeline.utils import image_io

    path = tmp_path / "small.png"
    random_image(0, 32).save(path)
    assert image_io.read_image(path).size == (32, 32)
    with pytest.raises(image_io.ImageTooLargeError, match=r"32x32 pixels \(1,024\), above the limit of 1,000 pixels"):
        image_io.read_image(path, max_pixels=1000)
    with pytest.raises(ValueError, match=r"`max_pixels` must be a positive integer \(pixels\), got 0"):
        image_io.read_image(path, max_pixels=0)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(path.read_bytes()[:60])
    with pytest.raises(image_io.UnreadableImageError, match=f"Cannot read the image {truncated}"):
        image_io.read_image(truncated)
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        image_io.read_image(tmp_path / "nowhere.png")


def test_gill_generate_refuses_an_image_bomb_in_one_line_before_loading(bomb, tmp_path, capsys, monkeypatch):
    from gill_pipeline.commands import generate, main

    monkeypatch.setattr(generate, "load_model", _not_loaded)
    assert main(["generate", "--model", "tiny-random", "look:", bomb, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gill generate: error: The image {bomb} is 20000x20000 pixels") and LIMIT_TEXT in err
    assert "--max-image-pixels" in err and err.count("\n") == 1 and "Traceback" not in err
    small = tmp_path / "small.png"
    random_image(0, 32).save(small)
    assert main(["generate", "--model", "tiny-random", str(small), "--max-image-pixels", "1000"]) == 2
    assert "above the limit of 1,000 pixels" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny-random", str(small), "--max-image-pixels", "-5"]) == 2
    assert "argument --max-image-pixels: expected a positive integer, got '-5'" in capsys.readouterr().err


def test_gill_chat_refuses_an_image_bomb_in_one_line_and_goes_on(bomb, opt_pipe, tmp_path, capsys, monkeypatch):
    import io

    from gill_pipeline.commands import chat, main

    monkeypatch.setattr(chat, "load_model", lambda args: opt_pipe)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{bomb}\nwhat is in {bomb} here\n"))
    assert main(["chat", "--model", "tiny-random", "--output-dir", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in err  # both turns refused, one line each; the chat went on
    assert all(line.startswith(f"gill chat: error: The image {bomb} is 20000x20000") and LIMIT_TEXT in line for line in lines)


def test_demo_upload_of_an_image_bomb_is_a_clear_page_error(bomb, opt_pipe, tmp_path):
    from gill_pipeline.demo.backend import ChatBackend

    backend = ChatBackend(opt_pipe, images_dir=str(tmp_path))
    settings = ("auto", 2, 1.0, 0, 4)  # image_mode, steps, guidance, seed, max_new_tokens
    with pytest.raises(ValueError, match=rf"The image 'bomb.png' is 20000x20000 pixels \(400,000,000\), {LIMIT_TEXT}"):
        list(backend.answer({"text": "hi", "files": [bomb]}, [], None, *settings))
    small = tmp_path / "small.png"
    random_image(0, 32).save(small)
    strict = ChatBackend(opt_pipe, images_dir=str(tmp_path), max_image_pixels=1000)
    with pytest.raises(ValueError, match="'small.png' is 32x32 pixels"):
        list(strict.answer({"text": "", "files": [str(small)]}, [], None, *settings))
    with pytest.raises(ValueError, match="`max_image_pixels` must be a positive integer"):
        ChatBackend(opt_pipe, max_image_pixels=-1)
    # On the page: gradio's error popup with the message, not its generic "Error".
    gr = pytest.importorskip("gradio")
    from gill_pipeline.demo.app import _user_errors

    with pytest.raises(gr.Error, match="'bomb.png' is 20000x20000 pixels"):
        list(_user_errors(backend.answer)({"text": "hi", "files": [bomb]}, [], None, *settings))


def test_retrieval_index_images_above_the_limit_are_load_errors(bomb, tmp_path):
    from gill_pipeline.retrieval.image_loading import ImageLoadError, load_record_image

    with pytest.raises(ImageLoadError, match=rf"The image {bomb} is 20000x20000 pixels .*{LIMIT_TEXT}"):
        load_record_image({"id": "a", "path": "bomb.png"}, str(tmp_path))
    data = open(bomb, "rb").read()
    (tmp_path / "shard.tar").write_bytes(b"x" * 10 + data)
    with pytest.raises(ImageLoadError, match=r"shard.tar \(offset 10\) is 20000x20000"):
        load_record_image({"id": "b", "path": "shard.tar", "offset": 10, "size": len(data)}, str(tmp_path))
