"""Loading says what is wrong, by file, before any weight is read: local paths, dtype names, component configs of
the wrong kind, parts that do not fit each other (issue 11, section 2)."""

import copy
import json
import os
import shutil

import pytest
import torch

from conftest import make_pipeline
from gill_pipeline import GILLPipeline
from gill_pipeline.serialization.folder import PipelineFolderError, resolve_dtype
from gill_pipeline.testing import build_tiny_tokenizer


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama_saved")
    make_pipeline("llama").save_pretrained(folder)
    return folder


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------------------------------------------
# Local paths are never taken for Hub repo ids
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["/no/such/dir", "./no_such_dir", "../no_such_dir", "~/no_such_gill_dir", "a/b/c"])
def test_a_missing_local_path_is_no_such_folder(name):
    with pytest.raises(PipelineFolderError, match="No such folder") as error:
        GILLPipeline.from_pretrained(name)
    assert "Repo id must be" not in str(error.value)


def test_a_file_is_not_a_folder(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(PipelineFolderError, match="No such folder.*it is a file"):
        GILLPipeline.from_pretrained(str(path))


def test_an_org_name_whose_org_is_a_local_folder_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(OSError, match="there is a local folder 'outputs', but not 'outputs/run1'"):
        GILLPipeline.from_pretrained("outputs/run1")


def test_from_base_models_names_a_missing_local_folder(opt_pipe):
    with pytest.raises(PipelineFolderError, match="`language_model`: no such folder '/no/such/lm'"):
        GILLPipeline.from_base_models("/no/such/lm", stable_diffusion=None, image_encoder=None)


# ----------------------------------------------------------------------------------------------------------------
# dtype names
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, dtype",
    [("float16", torch.float16), ("fp16", torch.float16), ("torch.float16", torch.float16), ("bf16", torch.bfloat16),
     ("bfloat16", torch.bfloat16), ("float32", torch.float32), ("FP32", torch.float32), (torch.bfloat16, torch.bfloat16)],
)
def test_dtype_names_resolve(name, dtype):
    assert resolve_dtype(name) is dtype


@pytest.mark.parametrize(
    "value, error, message",
    [("auto", ValueError, "'auto' is not supported"), ("float8", ValueError, "one of"),
     (torch.int8, ValueError, "floating-point"), (16, TypeError, "got int 16")],
)
def test_bad_dtypes_are_refused(value, error, message):
    with pytest.raises(error, match=message):
        resolve_dtype(value)


def test_a_dtype_name_loads_that_dtype(saved_opt):
    pipe = GILLPipeline.from_pretrained(saved_opt, dtype="bf16")
    assert pipe.llm.dtype == torch.bfloat16 and pipe.unet.dtype == torch.bfloat16 and pipe.gill.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="`torch_dtype`='auto'"):
        GILLPipeline.from_pretrained(saved_opt, torch_dtype="auto")


def test_a_dtype_name_loads_learned_weights_in_that_dtype(opt_pipe, tmp_path):
    folder = opt_pipe.save_learned_weights(tmp_path / "learned")
    pipe = GILLPipeline.from_pretrained(folder, llm=opt_pipe.llm, vae=None, unet=None, image_encoder=None, dtype="fp16")
    assert pipe.gill.dtype == torch.float16
    with pytest.raises(ValueError, match="`dtype` must be"):
        GILLPipeline.from_pretrained(folder, llm=opt_pipe.llm, vae=None, unet=None, image_encoder=None, dtype="half8")


def test_from_base_models_takes_a_dtype_name():
    pipe = make_pipeline("opt", dtype="bfloat16")
    assert pipe.llm.dtype == torch.bfloat16 and pipe.gill.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="`dtype` must be"):
        make_pipeline("opt", dtype="float64x")


# ----------------------------------------------------------------------------------------------------------------
# Component configs: present, JSON objects, of the right kind
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "component, text, reason", [("gill", "{not json", ""), ("llm", "[1, 2]", ".*holds a list, not a JSON object")]
)
def test_a_corrupted_config_is_named(saved_copy, component, text, reason):
    path = saved_copy / component / "config.json"
    path.write_text(text)
    with pytest.raises(PipelineFolderError, match=rf"Corrupted JSON file: {path}{reason}"):
        GILLPipeline.from_pretrained(saved_copy)


def test_a_vae_config_in_the_unet_folder_is_the_wrong_kind(saved_copy):
    unet_config = saved_copy / "unet" / "config.json"
    shutil.copy(saved_copy / "vae" / "config.json", unet_config)
    with pytest.raises(PipelineFolderError, match=rf"Wrong kind of model: {unet_config} describes"):
        GILLPipeline.from_pretrained(saved_copy)


def test_an_lm_config_in_the_vision_folder_is_the_wrong_kind(saved_copy):
    shutil.copy(saved_copy / "llm" / "config.json", saved_copy / "image_encoder" / "config.json")
    with pytest.raises(PipelineFolderError, match="model_type 'opt', but component `image_encoder` is loaded as"):
        GILLPipeline.from_pretrained(saved_copy)


def test_a_missing_tokenizer_is_named(saved_copy):
    for name in os.listdir(saved_copy / "tokenizer"):
        if name.startswith("tokenizer"):
            os.remove(saved_copy / "tokenizer" / name)
    (saved_copy / "tokenizer" / "special_tokens_map.json").write_text("{}")
    with pytest.raises(PipelineFolderError, match=rf"{saved_copy / 'tokenizer'} \(component `tokenizer`\) has none of"):
        GILLPipeline.from_pretrained(saved_copy)


# ----------------------------------------------------------------------------------------------------------------
# Parts that do not fit each other: refused at load time, from the config files
# ----------------------------------------------------------------------------------------------------------------
def test_a_gill_folder_from_another_pipeline_is_refused(saved_copy, saved_llama):
    shutil.rmtree(saved_copy / "gill")
    shutil.copytree(saved_llama / "gill", saved_copy / "gill")
    with pytest.raises(ValueError, match=r"The LM .*llm/config.json \(OPTForCausalLM\) has input/hidden widths .* "
                       r"but the learned weights .*gill/config.json fit"):
        GILLPipeline.from_pretrained(saved_copy)


def test_an_lm_of_another_width_is_refused(saved_copy, saved_llama):
    shutil.rmtree(saved_copy / "llm")
    shutil.copytree(saved_llama / "llm", saved_copy / "llm")
    edit_json(saved_copy / "model_index.json", llm=["transformers", "LlamaForCausalLM"])
    with pytest.raises(ValueError, match="LlamaForCausalLM.*it is not the LM they were trained with"):
        GILLPipeline.from_pretrained(saved_copy)


def test_a_unet_of_another_cross_attention_width_is_refused_before_its_weights_are_read(saved_copy):
    # The weights no longer match the config either: the fit error must come first, naming the file.
    unet_config = saved_copy / "unet" / "config.json"
    edit_json(unet_config, cross_attention_dim=48)
    with pytest.raises(ValueError, match=rf"The UNet {unet_config}'s cross-attention width is 48"):
        GILLPipeline.from_pretrained(saved_copy)


def test_a_tokenizer_without_the_img_tokens_is_refused(saved_copy):
    shutil.rmtree(saved_copy / "tokenizer")
    build_tiny_tokenizer().save_pretrained(saved_copy / "tokenizer")
    with pytest.raises(ValueError, match=r"tokenizer .* has no tokens \['\[IMG0\]'"):
        GILLPipeline.from_pretrained(saved_copy)


def test_img_token_ids_other_than_the_tokenizer_gives_are_refused(saved_copy):
    index = json.loads((saved_copy / "model_index.json").read_text())
    edit_json(saved_copy / "model_index.json", img_token_ids=list(reversed(index["img_token_ids"])))
    with pytest.raises(ValueError, match="gives the \\[IMG\\] tokens .* but .*model_index.json records"):
        GILLPipeline.from_pretrained(saved_copy)


def test_a_passed_component_that_does_not_fit_is_refused(saved_opt, llama_pipe):
    with pytest.raises(ValueError, match="not the LM they were trained with|untied"):
        GILLPipeline.from_pretrained(saved_opt, llm=llama_pipe.llm)


# ----------------------------------------------------------------------------------------------------------------
# Learned-weights folders
# ----------------------------------------------------------------------------------------------------------------
def test_learned_weights_without_their_safetensors_are_named(opt_pipe, tmp_path):
    folder = opt_pipe.save_learned_weights(tmp_path / "learned")
    os.remove(os.path.join(folder, "gill", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(PipelineFolderError, match=r"Missing weights: no \.safetensors file in .*gill"):
        GILLPipeline.from_pretrained(folder, llm=opt_pipe.llm, vae=None, unet=None, image_encoder=None)


def test_learned_weights_without_their_tokenizer_are_named(opt_pipe, tmp_path):
    folder = opt_pipe.save_learned_weights(tmp_path / "learned")
    shutil.rmtree(os.path.join(folder, "tokenizer"))
    with pytest.raises(PipelineFolderError, match=rf"Missing folder: {os.path.join(folder, 'tokenizer')}"):
        GILLPipeline.from_pretrained(folder, llm=opt_pipe.llm, vae=None, unet=None, image_encoder=None)


def test_a_manifest_that_is_not_an_object_is_named(opt_pipe, tmp_path):
    folder = opt_pipe.save_learned_weights(tmp_path / "learned")
    path = os.path.join(folder, "gill_learned_weights.json")
    with open(path, "w") as f:
        f.write('"just a string"')
    with pytest.raises(PipelineFolderError, match=rf"Corrupted JSON file: {path} \(the learned-weights manifest\)"):
        GILLPipeline.from_pretrained(folder, llm=opt_pipe.llm)


def test_one_version_and_one_constants_module(tmp_path):
    """The version written into learned-weights manifests is the package's and pyproject's; the names of the saved
    formats have one home (`gill_pipeline.constants`, which imports nothing from the package)."""
    import ast
    import tomllib

    import gill_pipeline
    from gill_pipeline import constants

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["version"] == gill_pipeline.__version__ == constants.LIBRARY_VERSION
    make_pipeline("opt").save_learned_weights(tmp_path / "learned")
    with open(tmp_path / "learned" / constants.LEARNED_WEIGHTS_MANIFEST_FILE, encoding="utf-8") as f:
        assert json.load(f)["gill_pipeline_version"] == gill_pipeline.__version__
    with open(constants.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    from_package = [
        node for node in ast.walk(tree)
        if (isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("gill_pipeline")))
        or (isinstance(node, ast.Import) and any(a.name.startswith("gill_pipeline") for a in node.names))
    ]
    assert not from_package


def _mapped_fraction(module) -> float:
    """Fraction of `module`'s parameter bytes that live in memory-mapped safetensors files (not copies)."""
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].endswith(".safetensors"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                maps.append((start, end))
    total = mapped = 0
    for p in module.parameters():
        size = p.numel() * p.element_size()
        total += size
        mapped += size if any(a <= p.data_ptr() < b for a, b in maps) else 0
    return mapped / total


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's memory maps (Linux)")
def test_every_component_loads_in_the_dtype_it_was_saved_in_without_a_copy(opt_pipe, tmp_path):
    # diffusers alone loads the UNet and VAE of a bf16 folder in float32 (a second, wider copy); GILL keeps each
    # component as saved, memory-mapped, like transformers 5 does for the LM. The learned module stays fp32 here:
    # mixed folders load component by component.
    pipe = GILLPipeline(**copy.deepcopy(opt_pipe.components))  # the session's shared pipeline stays fp32
    pipe.to(dtype=torch.bfloat16)
    pipe.gill.to(torch.float32)
    pipe.save_pretrained(tmp_path)
    loaded = GILLPipeline.from_pretrained(tmp_path)
    for name in ("llm", "image_encoder", "unet", "vae"):
        assert getattr(loaded, name).dtype == torch.bfloat16, name
        assert _mapped_fraction(getattr(loaded, name)) == 1.0, name
    assert loaded.gill.dtype == torch.float32
    # An explicit dtype still wins, for every component.
    wide = GILLPipeline.from_pretrained(tmp_path, dtype=torch.float32)
    assert {getattr(wide, n).dtype for n in ("llm", "unet", "vae", "gill")} == {torch.float32}
