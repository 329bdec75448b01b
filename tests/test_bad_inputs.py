"""Bad input gets a clear ValueError/TypeError that names the argument and shows the value."""

import os

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import FAST_CALL, random_image
from gill_pipeline import GILLPipeline
from gill_pipeline.serialization.folder import PipelineFolderError
from gill_pipeline.pipeline.inputs import to_rgb_pil


@pytest.mark.parametrize(
    "inputs,error,pattern",
    [
        (None, ValueError, r"`prompt`.*got None"),
        ([], ValueError, r"`prompt` is empty"),
        ([[]], ValueError, r"`prompt\[0\]` is empty"),
        ([["ok"], []], ValueError, r"`prompt\[1\]` is empty"),
        (42, TypeError, r"`prompt`.*got int: 42"),
        (["a dog", 3.5], TypeError, r"`prompt\[1\]`.*got float: 3.5"),
        (["a dog", {"x": 1}], TypeError, r"`prompt\[1\]`.*got dict"),
        ([["a dog"], "a cat"], ValueError, r"mixes lists and single elements"),
        ([[["a dog"]]], ValueError, r"`prompt\[0\]\[0\]` is a list"),
    ],
)
def test_bad_structure(opt_pipe, inputs, error, pattern):
    with pytest.raises(error, match=pattern):
        opt_pipe(inputs, **FAST_CALL)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(output_type="jpeg"), r"`output_type`.*'jpeg'"),
        (dict(num_inference_steps=0), r"`num_inference_steps`.*got 0"),
        (dict(num_inference_steps=-3), r"`num_inference_steps`.*got -3"),
        (dict(max_images=-1), r"`max_images`.*got -1"),
        (dict(max_new_tokens=0), r"`max_new_tokens`.*got 0"),
        (dict(temperature=0.0), r"`temperature`.*got 0.0"),
        (dict(top_p=1.5), r"`top_p`.*got 1.5"),
        (dict(min_text_tokens=-2), r"`min_text_tokens`.*got -2"),
        (dict(num_images_per_prompt=0), r"`num_images_per_prompt`.*got 0"),
        (dict(guidance_scale=-1.0), r"`guidance_scale`.*got -1.0"),
        (dict(image_mode="paint"), r"`image_mode`.*'paint'"),
        (dict(image_mode="retrieve"), r"image_mode='retrieve'.*no(ne)? .*retrieval"),
        (dict(generator=[torch.Generator(), torch.Generator()]), r"`generator` is a list of 2.*1 inputs"),
        (dict(latents=torch.zeros(2, 4, 8, 8)), r"`latents` has 2 rows.*`num_images_per_prompt` is 1"),
        (dict(callback_on_step_end_tensor_inputs=["foo"]), r"`callback_on_step_end_tensor_inputs`"),
        (dict(max_new_tokens=True), r"`max_new_tokens`.*got True"),
        (dict(temperature=float("inf")), r"`temperature`.*got inf"),
        (dict(guidance_scale="7"), r"`guidance_scale`.*got '7'"),
        (dict(img_logit_scale=float("nan")), r"`img_logit_scale`.*got nan"),
        (dict(num_inference_steps=2.0), r"`num_inference_steps`.*got 2.0"),
    ],
)
def test_bad_arguments(opt_pipe, kwargs, pattern):
    settings = dict(FAST_CALL)
    settings.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        opt_pipe(["This is my dog."], **settings)


def test_input_longer_than_the_context(opt_pipe):
    limit = opt_pipe.llm.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"`prompt\[1\]` is \d+ LM positions long.*context of {limit}"):
        opt_pipe([["short"], ["This is my dog. " * 60]], **FAST_CALL)


def test_tiny_image_is_refused(opt_pipe):
    tiny = PIL.Image.new("RGB", (1, 1))
    with pytest.raises(ValueError, match=r"`prompt\[1\]` is 1x1 pixels"):
        opt_pipe(["a dog", tiny], **FAST_CALL)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "1", "P", "CMYK", "I;16"])
def test_odd_image_modes_are_converted(opt_pipe, mode):
    image = random_image(0, mode="RGB")
    if mode == "I;16":
        image = PIL.Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)
        assert image.mode == "I;16"
    else:
        image = image.convert(mode)
    rgb = to_rgb_pil(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    out = opt_pipe(["a dog", image], max_new_tokens=2, max_images=0)
    assert len(out.outputs) == 1


def test_sixteen_bit_images_are_scaled_not_clipped():
    grey = np.full((16, 16), 32768, dtype=np.uint16)
    rgb = np.asarray(to_rgb_pil(PIL.Image.fromarray(grey)))
    assert abs(int(rgb[0, 0, 0]) - 128) <= 1  # PIL's own convert would clip this to 255


def test_transparent_pixels_become_white():
    image = PIL.Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    assert to_rgb_pil(image).getpixel((0, 0)) == (255, 255, 255)


def test_float_mode_is_refused():
    image = PIL.Image.fromarray(np.zeros((16, 16), dtype=np.float32))
    with pytest.raises(ValueError, match=r"mode 'F'"):
        to_rgb_pil(image, "inputs[0]")


def test_numpy_and_tensor_images(opt_pipe):
    array = np.array(random_image(1))
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    device = torch.device("cpu")
    from_pil = opt_pipe.encode_interleaved(["x", random_image(1)], device, "inputs")
    from_np = opt_pipe.encode_interleaved(["x", array], device, "inputs")
    from_pt = opt_pipe.encode_interleaved(["x", tensor], device, "inputs")
    torch.testing.assert_close(from_pil, from_np)
    torch.testing.assert_close(from_pil, from_pt)
    # Float arrays in [0, 1] (diffusers' "np" output) are images too; 0..255 floats and other dtypes are refused.
    from_float_np = opt_pipe.encode_interleaved(["x", array.astype(np.float32) / 255], device, "inputs")
    torch.testing.assert_close(from_pil, from_float_np)
    with pytest.raises(ValueError, match=r"`image` is a float array with values in \[0.000, 25\d.000\]"):
        to_rgb_pil(array.astype(np.float64))
    with pytest.raises(ValueError, match=r"`image` is a float array with NaN"):
        to_rgb_pil(np.full((16, 16, 3), np.nan))
    with pytest.raises(TypeError, match=r"`image` is a numpy array of dtype int32"):
        to_rgb_pil(array.astype(np.int32))
    with pytest.raises(ValueError, match=r"float tensor with values in \[0.000, 25\d.000\]"):
        to_rgb_pil(tensor * 255)
    with pytest.raises(ValueError, match=r"tensor of shape \(2, 3, 32, 32\)"):
        to_rgb_pil(tensor[None].repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match=r"numpy array of shape \(32, 32, 2\)"):
        to_rgb_pil(array[..., :2].copy())


def test_missing_weights_file_is_named(saved_copy):
    path = saved_copy / "gill" / "diffusion_pytorch_model.safetensors"
    os.remove(path)
    with pytest.raises(PipelineFolderError, match=str(saved_copy / "gill")):
        GILLPipeline.from_pretrained(saved_copy)


def test_corrupted_weights_file_is_named(saved_copy):
    path = saved_copy / "unet" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(PipelineFolderError, match=rf"Corrupted safetensors file: {path}"):
        GILLPipeline.from_pretrained(saved_copy)


def test_missing_component_folder_and_index_are_named(saved_copy):
    import shutil

    shutil.rmtree(saved_copy / "vae")
    with pytest.raises(PipelineFolderError, match=rf"Missing folder: {saved_copy / 'vae'}"):
        GILLPipeline.from_pretrained(saved_copy)
    os.remove(saved_copy / "model_index.json")
    with pytest.raises(PipelineFolderError, match=rf"Missing file: {saved_copy / 'model_index.json'}"):
        GILLPipeline.from_pretrained(saved_copy)


def test_wrong_number_of_img_token_ids(opt_pipe):
    components = dict(opt_pipe.components)
    with pytest.raises(ValueError, match=r"`img_token_ids` has 2 ids"):
        GILLPipeline(**components, img_token_ids=[1, 2])


def test_empty_text_without_bos_is_a_named_error():
    pipe = __import__("conftest").make_pipeline("qwen2")
    pipe.tokenizer.bos_token = None
    assert pipe.tokenizer.bos_token_id is None
    with pytest.raises(ValueError, match=r"`prompt\[1\]` has no tokens"):
        pipe([["a dog"], [""]], **FAST_CALL)
    out = pipe(["", "a dog"], max_new_tokens=2, max_images=0)  # empty segments beside real text are fine
    assert len(out.outputs) == 1


# ----------------------------------------------------------------------------------------------------------------------
# Every argument is checked before the LM runs (nothing decodes for nothing)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def lm_must_not_run(opt_pipe, monkeypatch):
    def fail(*args, **kwargs):
        pytest.fail("the LM ran before the bad argument was reported")

    monkeypatch.setattr(opt_pipe, "decode", fail)
    monkeypatch.setattr(opt_pipe, "encode_interleaved", fail)
    return opt_pipe


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        # latents: channels, size, dtype, values (the tiny UNet takes (n, 4, 8, 8) for its default 16x16 images)
        (dict(latents=torch.zeros(1, 3, 8, 8)), r"`latents` has shape \(1, 3, 8, 8\).*\(num_images_per_prompt, 4, 8, 8\)"),
        (dict(latents=torch.zeros(1, 4, 5, 5)), r"`latents` has shape \(1, 4, 5, 5\)"),
        (dict(latents=torch.zeros(1, 4, 16, 16), height=16, width=24), r"`latents` has shape .*16x24"),
        (dict(latents=torch.zeros(1, 4, 8, 8, dtype=torch.long)), r"`latents` must be a floating-point.*int64"),
        (dict(latents=torch.full((1, 4, 8, 8), float("nan"))), r"`latents` contains NaN"),
        (dict(latents=np.zeros((1, 4, 8, 8))), r"`latents` must be a tensor of shape.*got ndarray"),
        # generators
        (dict(generator=42), r"`generator` must be a `torch.Generator`.*int 42"),
        (dict(generator=[7]), r"`generator` must be a `torch.Generator`.*int 7"),
        # image sizes: zero, negative, strings, bools, floats, sizes the decoder cannot take
        (dict(height=0), r"`height` must be a positive integer, got 0"),
        (dict(width=-16), r"`width` must be a positive integer, got -16"),
        (dict(height="64"), r"`height` must be a positive integer, got '64'"),
        (dict(width=True), r"`width` must be a positive integer, got True"),
        (dict(height=64.0), r"`height` must be a positive integer, got 64.0"),
        (dict(height=12), r"`height` must be a multiple of 8.*got 12"),
        # flags are booleans, not truthy values
        (dict(do_sample="no"), r"`do_sample` must be True or False, got str 'no'"),
        (dict(return_dict=1), r"`return_dict` must be True or False, got int 1"),
        (dict(use_cache="yes"), r"`use_cache` must be True or False"),
        (dict(stop_at_newline=None), r"`stop_at_newline` must be True or False, got NoneType"),
        # callbacks
        (dict(callback_on_step_end="x"), r"`callback_on_step_end` must be a callable.*'x'"),
        (dict(callback_on_step_end_tensor_inputs="latents"), r"`callback_on_step_end_tensor_inputs` must be a list"),
        # decoder options
        (dict(guidance_rescale=2.0), r"`guidance_rescale` must be in \[0, 1\], got 2.0"),
        (dict(guidance_rescale="0.5"), r"`guidance_rescale`.*'0.5'"),
        (dict(eta=-1.0), r"`eta` must be a finite number >= 0.0, got -1.0"),
        (dict(timesteps=[900, 500], sigmas=[1.0, 0.5]), r"only one of `timesteps` and `sigmas`"),
        (dict(timesteps="abc"), r"`timesteps` must be a non-empty list of finite numbers, got 'abc'"),
        (dict(sigmas=[1.0, float("nan")]), r"`sigmas` must be a non-empty list of finite numbers"),
        (dict(cross_attention_kwargs="scale"), r"`cross_attention_kwargs` must be a dict or None.*'scale'"),
        # the rest
        (dict(output_type=None), r"`output_type` must be one of"),
        (dict(image_mode=["auto"]), r"`image_mode` must be one of"),
        (dict(max_images=1.5), r"`max_images` must be an integer >= 0, got 1.5"),
        (dict(top_p=0), r"`top_p` must be a positive finite number, got 0"),
        (dict(num_images_per_prompt=True), r"`num_images_per_prompt` must be a positive integer, got True"),
        (dict(min_text_tokens="2"), r"`min_text_tokens`.*'2'"),
    ],
)
def test_every_argument_is_checked_before_the_lm_runs(lm_must_not_run, kwargs, pattern):
    settings = dict(FAST_CALL)
    settings.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=pattern):
        lm_must_not_run(["This is my dog.", random_image(0)], **settings)


def _closed_image():
    image = random_image(0)
    image.close()
    return image


@pytest.mark.parametrize(
    "element,pattern",
    [
        (torch.full((3, 16, 16), float("nan")), r"`prompt\[1\]` is a float tensor with NaN or infinite values"),
        (torch.full((3, 16, 16), float("inf")), r"`prompt\[1\]` is a float tensor with NaN or infinite values"),
        (_closed_image(), r"`prompt\[1\]` is a PIL image that cannot be read: Operation on closed image"),
        ("a lone \ud800 surrogate", r"`prompt\[1\]` is text that cannot be encoded as UTF-8: character '\\ud800' at position 7"),
    ],
    ids=["nan-pixels", "inf-pixels", "closed-pil", "lone-surrogate"],
)
def test_unreadable_elements_are_named_before_the_lm_runs(lm_must_not_run, element, pattern):
    with pytest.raises(ValueError, match=pattern):
        lm_must_not_run(["This is my dog.", element], **FAST_CALL)


def test_both_prompt_forms_name_the_argument_used(opt_pipe):
    with pytest.raises(TypeError, match=r"`prompt\[1\]`.*got float"):
        opt_pipe(["a dog", 3.5], **FAST_CALL)
    with pytest.raises(TypeError, match=r"`inputs\[1\]`.*got float"):
        opt_pipe(inputs=["a dog", 3.5], **FAST_CALL)
