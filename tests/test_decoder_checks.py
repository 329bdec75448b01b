"""Fit checks (issue 22): every decoder fact readable from configs (scheduler kind, image size against the DiT's
patch, VAE against the denoiser and the family, components swapped after loading), and the tokenizer and image
encoder against the LM and the learned weights, refused by name BEFORE the LM runs, at assembly, load and call."""

import copy

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    LCMScheduler,
    PixArtTransformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

from gill_pipeline import GILLPipeline
from gill_pipeline.decoders import DECODER_FAMILIES
from gill_pipeline.testing import (
    build_tiny_decoder,
    build_tiny_gill_pipeline_with_decoder,
    build_tiny_lm,
    build_tiny_stable_diffusion,
    build_tiny_tokenizer,
    build_tiny_vision_encoder,
)

FAMILIES = ["sd", "sdxl", "sd3", "flux-dev", "flux-schnell", "pixart-sigma", "sana"]
PROMPT = ["This is my dog."]


@pytest.fixture(scope="module")
def built():
    pipes, decoders = {}, {}

    def pipe(name):
        if name not in pipes:
            pipes[name] = build_tiny_gill_pipeline_with_decoder(name)[0]
        return pipes[name]

    def decoder(name):
        if name not in decoders:
            decoders[name] = build_tiny_decoder(name)
        return decoders[name]

    return pipe, decoder


def vae_kl(blocks=2, **kwargs):
    """A tiny AutoencoderKL with `2 ** (blocks - 1)` pixels per latent."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(4,) * blocks, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=4, layers_per_block=1, norm_num_groups=2,
        sample_size=32, **kwargs,
    )


def generate_call(pipe, **kwargs):
    size = 2 * pipe.image_size_multiple
    settings = dict(
        max_new_tokens=4, min_text_tokens=1, img_logit_scale=100.0, max_images=1, image_mode="generate",
        num_inference_steps=2, height=size, width=size, output_type="pt", generator=torch.Generator().manual_seed(0),
    )
    settings.update(kwargs)
    return pipe(PROMPT, **settings)


class LMWatch:
    """Counts LM forwards and fails `pipe.decode`: a refused call must not reach either."""

    def __init__(self, pipe, monkeypatch):
        self.calls = []
        self.handle = pipe.llm.register_forward_pre_hook(lambda *args: self.calls.append(1))

        def decode(*args, **kwargs):
            raise AssertionError("the LM decoded although the call should have been refused")

        monkeypatch.setattr(pipe, "decode", decode)

    def close(self):
        self.handle.remove()


def refused_before_lm(pipe, monkeypatch, match, **call):
    watch = LMWatch(pipe, monkeypatch)
    try:
        with pytest.raises(ValueError, match=match):
            generate_call(pipe, **call)
    finally:
        watch.close()
        monkeypatch.undo()
    assert watch.calls == []


# (family, component, bad value built from the tiny decoders, expected message): each is a wrong component assigned
# after loading, the common way to swap a scheduler, a VAE or a denoiser.
BAD_COMPONENTS = [
    # A scheduler of the wrong kind for the family (flow matching against noise prediction).
    ("sdxl", "scheduler", lambda d: FlowMatchEulerDiscreteScheduler(), r"`scheduler` is a flow-matching.*StableDiffusionXL"),
    ("pixart-sigma", "scheduler", lambda d: FlowMatchEulerDiscreteScheduler(), r"`scheduler` is a flow-matching.*PixArt"),
    ("sd", "scheduler", lambda d: FlowMatchEulerDiscreteScheduler(), r"`scheduler` is a flow-matching.*noise prediction"),
    ("flux-dev", "scheduler", lambda d: EulerDiscreteScheduler(), r"`scheduler` is a noise-prediction.*FluxPipeline"),
    ("sd3", "scheduler", lambda d: DDIMScheduler(), r"`scheduler` is a noise-prediction.*StableDiffusion3"),
    ("sana", "scheduler", lambda d: DDIMScheduler(), r"`scheduler` is a noise-prediction.*SanaPipeline"),
    # The right kind, but its `set_timesteps` does not take what the stock pipeline passes.
    ("flux-schnell", "scheduler", lambda d: FlowMatchHeunDiscreteScheduler(), r"`scheduler` \(FlowMatchHeun.*`mu`"),
    (
        "flux-dev", "scheduler", lambda d: DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True),
        r"`scheduler` \(DPMSolverMultistepScheduler\) cannot take the timesteps a FluxPipeline sets",
    ),
    (
        "sana", "scheduler", lambda d: FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        r"use_dynamic_shifting=True.*SanaPipeline passes none",
    ),
    # A VAE of another family: latent channels, class, shift factor.
    ("sd3", "vae", lambda d: d("flux-dev").vae, r"`vae` \(AutoencoderKL\) has latent_channels=1.*in_channels=4"),
    ("flux-dev", "vae", lambda d: d("sd3").vae, r"`vae` .*latent_channels=4.*in_channels=4.*4 x latent_channels"),
    ("sana", "vae", lambda d: d("sd").vae, r"`vae` is of class AutoencoderKL.*SanaPipeline decodes with AutoencoderDC"),
    ("sdxl", "vae", lambda d: d("sd3").vae, r"`vae` .*shift_factor=0.0609.*never adds a shift"),
    ("sd3", "vae", lambda d: d("sdxl").vae, r"`vae` .*no `shift_factor`.*StableDiffusion3Pipeline"),
    # Same class and channels, another latent space (Flux's scale and shift on an SD3 decoder): the recorded one wins.
    (
        "sd3", "vae", lambda d: vae_kl(scaling_factor=0.3611, shift_factor=0.1159),
        r"`vae` \(AutoencoderKL\) has scaling_factor=0.3611.*scaling_factor=1.5035",
    ),
    # A denoiser of another family, width or guidance; a denoiser in the slot the family does not use.
    ("sdxl", "unet", lambda d: d("sd").unet, r"`unet` is of class UNet2DConditionModel of a StableDiffusionPipeline, but .* StableDiffusionXLPipeline"),
    ("sd", "transformer", lambda d: d("sd3").transformer, r"`transformer` is of class SD3Transformer2DModel.*set `transformer` to None"),
    ("sd3", "transformer", lambda d: d("flux-dev").transformer, r"`transformer` is of class FluxTransformer2DModel of a FluxPipeline.*StableDiffusion3Pipeline"),
    ("flux-dev", "transformer", lambda d: d("flux-schnell").transformer, r"`transformer` does not fit: .*guides with 'none'"),
    (
        "pixart-sigma", "transformer",
        lambda d: PixArtTransformer2DModel(
            sample_size=16, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=24,
            in_channels=4, cross_attention_dim=16, out_channels=8, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
        ),
        r"`transformer` does not fit: .*`caption_channels`=24",
    ),
]


@pytest.mark.parametrize(
    "family, component, make, match", BAD_COMPONENTS, ids=[f"{f}-{c}-{i}" for i, (f, c, _, _) in enumerate(BAD_COMPONENTS)]
)
def test_a_component_that_does_not_fit_is_refused_by_name_before_the_lm_runs(family, component, make, match, built, monkeypatch):
    get_pipe, get_decoder = built
    pipe = get_pipe(family)
    original = getattr(pipe, component)
    setattr(pipe, component, make(get_decoder))
    try:
        refused_before_lm(pipe, monkeypatch, match)
    finally:
        setattr(pipe, component, original)


def test_pixart_size_is_a_multiple_of_the_latent_patch_not_only_of_the_vae_scale(built, monkeypatch):
    # A factor-8 VAE and the DiT's patch 2: a side must be a multiple of 16. 72 is a multiple of 8; it used to pass the
    # check and fail inside the first denoising step, after the LM had run.
    pipe = built[0]("pixart-sigma")
    original = pipe.vae
    pipe.vae = vae_kl(blocks=4)
    try:
        assert pipe.vae_scale_factor == 8 and pipe.image_size_multiple == 16
        refused_before_lm(pipe, monkeypatch, r"`height` must be a multiple of 16.*got 72", height=72, width=64)
        out = generate_call(pipe, height=32, width=48)
        assert tuple(out.gill_images[0][0].image.shape) == (3, 32, 48)
    finally:
        pipe.vae = original
    assert pipe.vae_scale_factor == 2  # read from the VAE in place, not the one the pipeline was built with


@pytest.mark.parametrize("family", ["sd3", "flux-dev", "sana"])
def test_size_multiple_follows_patch_packing_and_the_stock_check(family, built):
    pipe = built[0](family)
    family_adapter = next(f for f in DECODER_FAMILIES if f.pipeline_class.__name__ == pipe.gill.conditioning_layout.pipeline_class)
    patch = pipe.transformer.config.get("patch_size") or 1
    latent_patch = pipe.vae_scale_factor * patch * family_adapter.latent_packing
    assert pipe.image_size_multiple % latent_patch == 0 and pipe.image_size_multiple % family_adapter.size_multiple == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_still_generates_with_its_own_modules(family, built):
    pipe = built[0](family)
    out = generate_call(pipe)
    size = 2 * pipe.image_size_multiple
    images = out.gill_images[0]
    assert len(images) == 1 and images[0].source == "generated"
    assert tuple(images[0].image.shape) == (3, size, size) and torch.isfinite(images[0].image).all()


@pytest.mark.parametrize(
    "family, make",
    [
        ("sd", lambda: LCMScheduler()),  # not a KarrasDiffusionSchedulers member, still noise prediction
        ("sdxl", lambda: DPMSolverMultistepScheduler()),
        ("flux-dev", lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)),
        ("sana", lambda: DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)),
    ],
)
def test_a_scheduler_of_the_right_kind_is_accepted_and_runs(family, make, built):
    pipe = built[0](family)
    original = pipe.scheduler
    pipe.scheduler = make()
    try:
        out = generate_call(pipe)
        assert out.gill_images[0][0].source == "generated"
    finally:
        pipe.scheduler = original


def test_scheduler_kind_is_read_from_diffusers():
    from gill_pipeline.decoders.schedulers import is_flow_matching_scheduler

    flows = [f.pipeline_class.__name__ for f in DECODER_FAMILIES if f.flow_matching]
    assert sorted(flows) == ["FluxPipeline", "SanaPipeline", "StableDiffusion3Pipeline"]
    assert is_flow_matching_scheduler(FlowMatchHeunDiscreteScheduler)
    assert not is_flow_matching_scheduler(DPMSolverMultistepScheduler())
    assert is_flow_matching_scheduler(DPMSolverMultistepScheduler(prediction_type="flow_prediction"))


# ------------------------------------------------------------------------------------------------------------------
# The tokenizer against the LM's vocabulary, the image encoder against the learned weights
# ------------------------------------------------------------------------------------------------------------------
def oversized_tokenizer(tokenizer):
    bigger = copy.deepcopy(tokenizer)
    bigger.add_tokens(["<not-in-the-lm>"])
    return bigger


def clip_text_model(hidden_size):
    torch.manual_seed(0)
    return CLIPTextModel(
        CLIPTextConfig(hidden_size=hidden_size, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=99)
    )


def other_width_vision_model(hidden_size):
    torch.manual_seed(0)
    return CLIPVisionModel(
        CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1, image_size=32, patch_size=8)
    )


def test_a_tokenizer_past_the_lm_vocabulary_is_refused_at_call(built, monkeypatch):
    pipe = built[0]("sd")
    rows = pipe.llm.get_input_embeddings().num_embeddings
    assert max(pipe.img_token_ids) >= rows  # the [IMG] ids lie past the LM's rows: they are GILL's, and accepted
    original = pipe.tokenizer
    pipe.tokenizer = oversized_tokenizer(original)
    try:
        refused_before_lm(pipe, monkeypatch, rf"`tokenizer` has {len(pipe.tokenizer)} token ids.*{rows} input embedding rows")
    finally:
        pipe.tokenizer = original


def test_a_text_model_or_another_width_as_image_encoder_is_refused_at_call(built, monkeypatch):
    pipe = built[0]("sd")
    width = pipe.gill.config.vision_dim
    original = pipe.image_encoder
    try:
        pipe.image_encoder = clip_text_model(width)
        refused_before_lm(pipe, monkeypatch, r"`image_encoder` must be a vision encoder.*CLIPTextModel")
        pipe.image_encoder = other_width_vision_model(width + 8)
        refused_before_lm(pipe, monkeypatch, rf"`image_encoder` \(CLIPVisionModel\) gives features of width {width + 8}.*{width}")
    finally:
        pipe.image_encoder = original


def test_misfits_are_refused_when_the_pipeline_is_built(built):
    pipe = built[0]("sd")
    components = dict(pipe.components)
    with pytest.raises(ValueError, match=r"`tokenizer` has .* token ids"):
        GILLPipeline(**{**components, "tokenizer": oversized_tokenizer(pipe.tokenizer)}, img_token_ids=pipe.img_token_ids)
    with pytest.raises(ValueError, match=r"`image_encoder` must be a vision encoder.*CLIPTextModel"):
        GILLPipeline(**{**components, "image_encoder": clip_text_model(pipe.gill.config.vision_dim)}, img_token_ids=pipe.img_token_ids)


def base_models():
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    llm = build_tiny_lm("opt", len(tokenizer), tokenizer)
    encoder, processor = build_tiny_vision_encoder()
    return tokenizer, llm, build_tiny_stable_diffusion(cross_attention_dim=32), encoder, processor


def test_misfits_are_refused_at_assembly():
    tokenizer, llm, sd, encoder, processor = base_models()
    kwargs = dict(language_model=llm, stable_diffusion=sd, feature_extractor=processor, num_img_tokens=2)
    with pytest.raises(ValueError, match=r"`tokenizer` has .* token ids"):
        GILLPipeline.from_base_models(tokenizer=oversized_tokenizer(tokenizer), image_encoder=encoder, **kwargs)
    with pytest.raises(ValueError, match=r"`image_encoder` must be a vision encoder.*CLIPTextModel"):
        GILLPipeline.from_base_models(tokenizer=tokenizer, image_encoder=clip_text_model(32), **kwargs)


def test_misfits_are_refused_at_load(built, tmp_path):
    pipe = built[0]("sd")
    pipe.save_pretrained(tmp_path)
    oversized_tokenizer(pipe.tokenizer).save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(ValueError, match=r"`tokenizer` has .* token ids"):
        GILLPipeline.from_pretrained(tmp_path)
