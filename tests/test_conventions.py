"""diffusers conventions that work, not just exist: `from_pipe`, `prompt=`, plain `images`, callbacks and the state
they read, the decoder options users know from diffusers, and the `__call__` docstring example."""

import re

import PIL.Image
import pytest
import torch
from conftest import FAST_CALL, make_pipeline, random_image
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback, SDCFGCutoffCallback

from gill_pipeline import GILLPipeline
from gill_pipeline.bundled import bundle_available
from gill_pipeline.pipeline import pipeline_gill

DOG = ["This is my dog.", random_image(0), "Show me him in the snow."]
# A huge [IMG0] scale makes the tiny random LM produce an [IMG] group right away.
IMAGE_CALL = dict(FAST_CALL, img_logit_scale=1e4, max_images=1, num_inference_steps=3)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    """A pipeline of this module's own (some tests swap its scheduler)."""
    return make_pipeline("opt")


def stock_sd(pipe):
    sd = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=None, tokenizer=None, unet=pipe.unet, scheduler=pipe.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    return sd


def embeds_for(pipe, seed=0):
    shape = pipe.gill.uncond_prompt_embeds.shape
    return torch.randn(1, *shape[1:], generator=seeded(seed))


def ours_and_stock(pipe, **kwargs):
    """The same denoising through `GILLPipeline.generate_images` and through the stock SD pipeline."""
    embeds = embeds_for(pipe)
    settings = dict(num_inference_steps=3, guidance_scale=5.0, output_type="pt")
    ours = pipe.generate_images(embeds, generators=seeded(), **settings, **kwargs)
    sd = stock_sd(pipe)
    stock = sd(
        prompt_embeds=embeds, negative_prompt_embeds=pipe.gill.uncond_prompt_embeds, generator=seeded(),
        **settings, **kwargs,
    ).images
    ours_and_stock.stock_num_timesteps = sd.num_timesteps
    return ours, stock


# ----------------------------------------------------------------------------------------------------------------------
# Components, prompt=, images
# ----------------------------------------------------------------------------------------------------------------------
def test_from_pipe_keeps_every_component_and_answers_the_same(opt_pipe):
    new = GILLPipeline.from_pipe(opt_pipe, dtype=torch.float32)
    for name, component in opt_pipe.components.items():
        assert getattr(new, name) is component, f"`from_pipe` dropped or replaced `{name}`"
    assert new.img_token_ids == opt_pipe.img_token_ids
    a = opt_pipe(DOG, generator=seeded(), **IMAGE_CALL)
    b = new(DOG, generator=seeded(), **IMAGE_CALL)
    assert a.texts == b.texts and len(a.images) == len(b.images) == 1
    torch.testing.assert_close(a.images[0], b.images[0], atol=0, rtol=0)


def test_prompt_keyword_and_inputs_alias(opt_pipe):
    positional = opt_pipe(DOG, generator=seeded(), **IMAGE_CALL)
    keyword = opt_pipe(prompt=DOG, generator=seeded(), **IMAGE_CALL)
    alias = opt_pipe(inputs=DOG, generator=seeded(), **IMAGE_CALL)
    assert positional.texts == keyword.texts == alias.texts
    torch.testing.assert_close(positional.images[0], keyword.images[0], atol=0, rtol=0)
    torch.testing.assert_close(positional.images[0], alias.images[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="`prompt` or as `inputs`"):
        opt_pipe(prompt=DOG, inputs=DOG, **IMAGE_CALL)


def test_images_are_the_shown_images_in_order(opt_pipe):
    out = opt_pipe([DOG, ["A lake."]], generator=[seeded(1), seeded(2)], **dict(IMAGE_CALL, output_type="pil"))
    objects = [image for answer in out.gill_images for image in answer]
    assert len(out.images) == len(objects) == 2
    for image, obj in zip(out.images, objects):
        assert isinstance(image, PIL.Image.Image) and image is obj.image
    assert out.texts == ["".join(x for x in answer if isinstance(x, str)) for answer in out.outputs]


# ----------------------------------------------------------------------------------------------------------------------
# Callbacks and the state they read
# ----------------------------------------------------------------------------------------------------------------------
def test_callback_sees_the_pipeline_state(opt_pipe):
    seen = []

    def record(pipe, step, timestep, callback_kwargs):
        seen.append((pipe, step, pipe.num_timesteps, pipe.guidance_scale, pipe.do_classifier_free_guidance))
        assert set(callback_kwargs) == {"latents", "prompt_embeds"}
        return callback_kwargs

    opt_pipe(DOG, guidance_scale=6.0, callback_on_step_end=record,
             callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **IMAGE_CALL)
    assert [s[1] for s in seen] == [0, 1, 2]
    assert all(s[0] is opt_pipe and s[2] == 3 and s[3] == 6.0 and s[4] is True for s in seen)
    assert opt_pipe.num_timesteps == 3


def test_interrupt_stops_the_denoising_loop(opt_pipe):
    steps = []

    def stop_after_first(pipe, step, timestep, callback_kwargs):
        steps.append(step)
        pipe._interrupt = True
        return callback_kwargs

    interrupted = opt_pipe(DOG, generator=seeded(), callback_on_step_end=stop_after_first, **IMAGE_CALL)
    assert steps == [0], "the loop must stop once `pipe._interrupt` is set"
    full = opt_pipe(DOG, generator=seeded(), **IMAGE_CALL)
    assert not opt_pipe.interrupt, "each call starts uninterrupted"
    assert not torch.equal(interrupted.images[0], full.images[0])


def test_diffusers_cfg_cutoff_callback_works_as_in_stable_diffusion(pipe):
    ours, stock = ours_and_stock(pipe, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1),
                                 callback_on_step_end_tensor_inputs=["prompt_embeds"])
    # In our call the callback's tensor inputs come from the callback itself, as in diffusers.
    torch.testing.assert_close(ours, stock, atol=0, rtol=0)
    assert pipe.guidance_scale == 0.0 and not pipe.do_classifier_free_guidance  # the callback's change, seen by us
    without, _ = ours_and_stock(pipe)
    assert not torch.equal(ours, without), "cutting guidance off must change the image"
    out = pipe(DOG, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5), **IMAGE_CALL)
    assert len(out.images) == 1


def test_multi_pipeline_callbacks_run_in_order(opt_pipe):
    order = []

    class Tag(PipelineCallback):
        tensor_inputs = ["latents"]

        def __init__(self, tag):
            super().__init__(cutoff_step_ratio=None, cutoff_step_index=0)
            self.tag = tag

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            order.append((self.tag, step_index))
            return callback_kwargs

    opt_pipe(DOG, callback_on_step_end=MultiPipelineCallbacks([Tag("a"), Tag("b")]), **IMAGE_CALL)
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]


# ----------------------------------------------------------------------------------------------------------------------
# Decoder options users know from diffusers
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options", [dict(eta=1.0), dict(guidance_rescale=0.7)], ids=["eta", "guidance_rescale"]
)
def test_decoder_options_pass_through_like_stable_diffusion(pipe, options):
    ours, stock = ours_and_stock(pipe, **options)
    torch.testing.assert_close(ours, stock, atol=0, rtol=0)
    plain, _ = ours_and_stock(pipe)
    assert not torch.equal(ours, plain), f"{options} must change the image"
    # ... and through the whole call.
    a = pipe(DOG, generator=seeded(), **IMAGE_CALL)
    b = pipe(DOG, generator=seeded(), **IMAGE_CALL, **options)
    assert a.texts == b.texts and not torch.equal(a.images[0], b.images[0])


def test_custom_timesteps_and_sigmas_with_a_scheduler_that_takes_them(pipe):
    original = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
    try:
        for options in (dict(timesteps=[900, 500, 100]), dict(sigmas=[8.0, 2.0, 0.5])):
            ours, stock = ours_and_stock(pipe, **options)
            torch.testing.assert_close(ours, stock, atol=0, rtol=0)
            assert pipe.num_timesteps == ours_and_stock.stock_num_timesteps > 0
    finally:
        pipe.scheduler = original


def test_options_the_scheduler_does_not_take_are_refused_before_decoding(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "decode", lambda *a, **k: pytest.fail("the LM ran before the check"))
    with pytest.raises(ValueError, match=r"`timesteps` was given.*DDIMScheduler"):
        pipe(DOG, timesteps=[900, 500], **IMAGE_CALL)
    original = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
    try:
        with pytest.raises(ValueError, match=r"`eta`=0.5.*EulerDiscreteScheduler"):
            pipe(DOG, eta=0.5, **IMAGE_CALL)
    finally:
        pipe.scheduler = original


def test_cross_attention_kwargs_reach_the_unet(pipe, monkeypatch):
    seen = []
    forward = pipe.unet.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("cross_attention_kwargs"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    pipe(DOG, cross_attention_kwargs={"scale": 1.0}, **IMAGE_CALL)
    assert seen and all(kwargs == {"scale": 1.0} for kwargs in seen)


# ----------------------------------------------------------------------------------------------------------------------
# The docstring example runs
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not bundle_available(), reason="the bundled shapes-world pipeline is not in this checkout")
def test_call_docstring_example_runs(tmp_path, monkeypatch):
    assert "Examples:" in GILLPipeline.__call__.__doc__ and ">>> " in GILLPipeline.__call__.__doc__
    lines = re.findall(r"^\s*(?:>>>|\.\.\.) ?(.*)$", pipeline_gill.EXAMPLE_DOC_STRING, flags=re.MULTILINE)
    code = "\n".join(lines)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "EXAMPLE_DOC_STRING", "exec"), namespace)
    assert (tmp_path / "answer.png").is_file()
    assert namespace["out"].texts[0].strip()


@pytest.mark.parametrize("family,expected", [("flux-schnell", False), ("flux-dev", False), ("sdxl", True)])
def test_do_classifier_free_guidance_follows_the_decoder_family(family, expected):
    from gill_pipeline.testing import build_tiny_gill_pipeline_with_decoder

    pipe, _ = build_tiny_gill_pipeline_with_decoder(family)
    pipe._guidance_scale = 5.0
    assert pipe.do_classifier_free_guidance is expected
