"""The decoder layer on tiny random decoders of every family: layouts read from the decoders, the stock pipeline run
from precomputed conditioning giving the stock `prompt=` images, schedulers, guidance, batching, saving without
text encoders, and refusals."""

import inspect
import os

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)
from safetensors.torch import load_file, save_file

from gill_pipeline.decoders import (
    ConditioningLayout,
    build_decoder_pipeline,
    conditioning_mse,
    default_negative_conditioning,
    encode_conditioning,
    load_decoder,
    read_conditioning_layout,
    run_decoder,
)
from gill_pipeline.testing import TINY_DECODER_BUILDERS, build_tiny_decoder

FAMILIES = sorted(TINY_DECODER_BUILDERS)
CAPTIONS = ["a red cat", "a small dog in the lake"]
SIZE = dict(height=32, width=32, num_inference_steps=2)
# Stock `prompt=` calls need the same fixed settings GILL passes (resolution binning rejects tiny models).
STOCK_EXTRA = {"pixart-sigma": {"use_resolution_binning": False}, "sana": {"use_resolution_binning": False}}
TOLERANCE = 1e-5  # same images; SD3's stock path repeats/views tensors and differs at ~1e-6

SD_SCHEDULERS = [
    DDIMScheduler,
    PNDMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    UniPCMultistepScheduler,
]
FLOW_SCHEDULERS = [
    (FlowMatchEulerDiscreteScheduler, {}),
    (FlowMatchHeunDiscreteScheduler, {}),
    (DPMSolverMultistepScheduler, {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}),
    (UniPCMultistepScheduler, {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}),
]
# FlowMatchHeun takes no custom sigmas, which FluxPipeline always passes.
SCHEDULERS = {
    "sd": [(cls, {"skip_prk_steps": True} if cls is PNDMScheduler else {}) for cls in SD_SCHEDULERS],
    "sdxl": [(cls, {"skip_prk_steps": True} if cls is PNDMScheduler else {}) for cls in SD_SCHEDULERS],
    "pixart-sigma": [(cls, {"skip_prk_steps": True} if cls is PNDMScheduler else {}) for cls in SD_SCHEDULERS],
    "sd3": FLOW_SCHEDULERS,
    "sana": FLOW_SCHEDULERS,
    "flux-dev": [case for case in FLOW_SCHEDULERS if case[0] is not FlowMatchHeunDiscreteScheduler],
    "flux-schnell": [case for case in FLOW_SCHEDULERS if case[0] is not FlowMatchHeunDiscreteScheduler],
}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def stock(pipe, name, prompts, seed=0, **kwargs):
    kwargs = {**SIZE, **STOCK_EXTRA.get(name, {}), "output_type": "pt", **kwargs}
    return pipe(prompt=prompts, generator=kwargs.pop("generator", gen(seed)), **kwargs).images


def ours(pipe, conditioning, negatives, seed=0, **kwargs):
    kwargs = {**SIZE, "output_type": "pt", **kwargs}
    return run_decoder(pipe, conditioning, negatives, generator=kwargs.pop("generator", gen(seed)), **kwargs)


def expected_layout_sizes(name, pipe):
    """Per-prompt shapes from the tiny models' CONFIGS (the layout reads them through the encoders' outputs)."""
    def call_default(argument):
        return inspect.signature(type(pipe).__call__).parameters[argument].default

    if name == "sd":
        return {"prompt_embeds": [pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size]}
    if name == "sdxl":
        width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        return {
            "prompt_embeds": [pipe.tokenizer.model_max_length, width],
            "pooled_prompt_embeds": [pipe.text_encoder_2.config.projection_dim],
        }
    if name == "sd3":
        length = pipe.tokenizer.model_max_length + call_default("max_sequence_length")
        pooled = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
        return {"prompt_embeds": [length, pipe.text_encoder_3.config.d_model], "pooled_prompt_embeds": [pooled]}
    if name.startswith("flux"):
        return {
            "prompt_embeds": [call_default("max_sequence_length"), pipe.text_encoder_2.config.d_model],
            "pooled_prompt_embeds": [pipe.text_encoder.config.hidden_size],
        }
    width = pipe.text_encoder.config.d_model if name == "pixart-sigma" else pipe.text_encoder.config.hidden_size
    length = call_default("max_sequence_length")
    return {"prompt_embeds": [length, width], "prompt_attention_mask": [length]}


@pytest.fixture(scope="module")
def decoders():
    cache = {}

    def get(name):
        if name not in cache:
            pipe = build_tiny_decoder(name)
            cache[name] = (pipe, encode_conditioning(pipe, CAPTIONS), default_negative_conditioning(pipe))
        return cache[name]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_layout_is_read_from_the_decoder(name):
    pipe = build_tiny_decoder(name)
    layout = read_conditioning_layout(pipe)
    assert layout.pipeline_class == type(pipe).__name__
    assert {t.name: t.shape for t in layout.tensors} == expected_layout_sizes(name, pipe)
    assert layout.guidance == {"flux-dev": "embedding", "flux-schnell": "none"}.get(name, "cfg")
    assert layout.padding == ("masked" if name in ("pixart-sigma", "sana") else "attended")
    assert layout.has_negatives == (not name.startswith("flux"))
    assert ConditioningLayout.from_json_string(layout.to_json_string()) == layout
    # The widths are the denoiser's own (what a mapper's output heads are sized to).
    denoiser = pipe.unet if name in ("sd", "sdxl") else pipe.transformer
    key = {"sd": "cross_attention_dim", "sdxl": "cross_attention_dim", "pixart-sigma": "caption_channels",
           "sana": "caption_channels"}.get(name, "joint_attention_dim")
    assert layout.tensor("prompt_embeds").width == denoiser.config[key]


def test_layout_follows_the_models_not_a_table():
    """A different tiny SD (wider text encoder, longer tokenizer) gives a different layout."""
    from gill_pipeline.testing import build_tiny_stable_diffusion

    torch.manual_seed(0)
    layout = read_conditioning_layout(build_tiny_stable_diffusion(cross_attention_dim=24, text_length=20))
    assert layout.tensor("prompt_embeds").shape == [20, 24]


def test_mismatched_text_encoder_is_refused():
    pipe = build_tiny_decoder("sd")
    other = build_tiny_decoder("sdxl")
    pipe.register_modules(text_encoder=other.text_encoder, tokenizer=other.tokenizer)  # width 16, not 32
    with pytest.raises(ValueError, match="cross_attention_dim"):
        read_conditioning_layout(pipe)


@pytest.mark.parametrize("name", FAMILIES)
def test_run_decoder_gives_the_stock_prompt_images(name, decoders):
    pipe, cond, neg = decoders(name)
    expected = stock(pipe, name, CAPTIONS)
    got = ours(pipe, cond, neg)
    assert got.shape == expected.shape == (2, 3, 32, 32)
    assert (got - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("name", FAMILIES)
def test_guidance_on_and_off(name, decoders):
    pipe, cond, neg = decoders(name)
    low, high = ours(pipe, cond, neg, guidance_scale=1.0), ours(pipe, cond, neg, guidance_scale=6.0)
    if name == "flux-schnell":
        assert torch.equal(low, high)  # no guidance at all
        return
    assert (low - high).abs().max() > 1e-4
    # Guidance off needs no negatives (Flux-dev never uses them: its scale is an embedding).
    unguided = ours(pipe, cond, None, guidance_scale=1.0)
    assert (unguided - stock(pipe, name, CAPTIONS, guidance_scale=1.0)).abs().max() <= TOLERANCE


@pytest.mark.parametrize("name", FAMILIES)
def test_default_negatives_are_what_the_stock_pipeline_uses(name, decoders):
    pipe, cond, neg = decoders(name)
    if name.startswith("flux"):
        assert neg == {}
        return
    assert sorted(neg) == sorted(cond)
    empty = encode_conditioning(pipe, [""])
    if name == "sdxl":  # force_zeros_for_empty_prompt: zeros, not the encoded empty prompt
        assert all(torch.count_nonzero(value) == 0 for value in neg.values())
        assert (empty["prompt_embeds"] - neg["prompt_embeds"]).abs().max() > 1e-3
    elif name == "sana":  # the complex human instruction is prepended to prompts, never to negatives
        assert (empty["prompt_embeds"] - neg["prompt_embeds"]).abs().max() > 1e-3
    else:
        assert all(torch.equal(empty[key], neg[key]) for key in neg)


def test_sdxl_without_forced_zero_negatives_uses_the_encoded_empty_prompt():
    pipe = build_tiny_decoder("sdxl")
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    neg = default_negative_conditioning(pipe)
    assert torch.equal(neg["prompt_embeds"], encode_conditioning(pipe, [""])["prompt_embeds"])
    got = ours(pipe, encode_conditioning(pipe, CAPTIONS), neg)
    assert (got - stock(pipe, "sdxl", CAPTIONS)).abs().max() <= TOLERANCE


@pytest.mark.parametrize("name", FAMILIES)
def test_every_compatible_scheduler(name):
    for scheduler_class, overrides in SCHEDULERS[name]:
        pipe = build_tiny_decoder(name)
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **overrides)
        cond, neg = encode_conditioning(pipe, CAPTIONS[:1]), default_negative_conditioning(pipe)
        got, expected = ours(pipe, cond, neg), stock(pipe, name, CAPTIONS[:1])
        assert torch.isfinite(got).all(), scheduler_class.__name__
        assert (got - expected).abs().max() <= TOLERANCE, scheduler_class.__name__


@pytest.mark.parametrize("name", FAMILIES)
def test_images_per_prompt_equal_single_calls(name, decoders):
    pipe, cond, neg = decoders(name)
    batched = ours(pipe, cond, neg, num_images_per_prompt=2, generator=[gen(s) for s in range(4)])
    assert batched.shape[0] == 4
    for i in range(2):
        single = {key: value[i : i + 1] for key, value in cond.items()}
        alone = ours(pipe, single, neg, num_images_per_prompt=2, generator=[gen(2 * i), gen(2 * i + 1)])
        assert (batched[2 * i : 2 * i + 2] - alone).abs().max() <= 1e-4
    # And the same images as the stock pipeline given the prompts, except where the stock one is wrong: Sana
    # repeats embeddings per prompt (c0, c0, c1, c1) but masks per batch (m0, m1, m0, m1).
    expected = stock(pipe, name, CAPTIONS, num_images_per_prompt=2, generator=[gen(s) for s in range(4)])
    assert ((batched - expected).abs().max() <= TOLERANCE) == (name != "sana")


@pytest.mark.parametrize("name", ["sd", "flux-dev", "sana"])
def test_padded_positions_matter_only_where_the_family_attends_to_them(name, decoders):
    pipe, cond, neg = decoders(name)
    layout = read_conditioning_layout(pipe)
    if layout.padding == "masked":
        padded = cond["prompt_attention_mask"] == 0
    else:  # the last position of a short caption is padding (an end/pad token's state)
        padded = torch.zeros(cond["prompt_embeds"].shape[:2], dtype=torch.bool)
        padded[:, -1] = True
    assert padded.any()
    changed = dict(cond, prompt_embeds=cond["prompt_embeds"].clone())
    changed["prompt_embeds"][padded] += 5.0
    delta = (ours(pipe, cond, neg) - ours(pipe, changed, neg)).abs().max()
    assert (delta == 0) == (layout.padding == "masked")


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_without_text_encoders_runs_from_stored_negatives(name, decoders, tmp_path):
    pipe, cond, neg = decoders(name)
    expected = ours(pipe, cond, neg)
    build_decoder_pipeline(pipe).save_pretrained(tmp_path / "decoder")
    if neg:
        save_file({key: value.contiguous() for key, value in neg.items()}, tmp_path / "negatives.safetensors")
    saved = os.listdir(tmp_path / "decoder")
    assert not any(entry.startswith("text_encoder") for entry in saved), saved

    reloaded = load_decoder(tmp_path / "decoder")
    assert reloaded.text_encoder is None and reloaded.tokenizer is None
    stored = load_file(tmp_path / "negatives.safetensors") if neg else None
    got = run_decoder(reloaded, cond, stored, generator=gen(0), output_type="pt", **SIZE)
    assert (got - expected).abs().max() <= 1e-5  # memory-mapped weights may take other CPU kernel paths
    with pytest.raises(ValueError, match="without"):
        read_conditioning_layout(reloaded)


def test_a_full_checkpoint_loads_without_its_text_encoders(decoders, tmp_path):
    pipe, cond, _ = decoders("flux-dev")
    pipe.save_pretrained(tmp_path / "full")
    assert os.path.isdir(tmp_path / "full" / "text_encoder_2")
    reloaded = load_decoder(tmp_path / "full")
    assert reloaded.text_encoder is None and reloaded.text_encoder_2 is None and reloaded.tokenizer_2 is None
    assert (ours(reloaded, cond, None) - ours(pipe, cond, None)).abs().max() <= 1e-5
    with_text = load_decoder(tmp_path / "full", text_encoders=True)
    assert torch.equal(encode_conditioning(with_text, CAPTIONS)["prompt_embeds"], cond["prompt_embeds"])


def test_components_alone_are_enough():
    pipe = build_tiny_decoder("flux-dev")
    cond = encode_conditioning(pipe, CAPTIONS[:1])
    parts = {key: getattr(pipe, key) for key in ("transformer", "vae", "scheduler")}
    assert torch.equal(ours(parts, cond, None), ours(pipe, cond, None))


def test_unsupported_pipeline_class_is_refused():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    ddpm = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match="`DDPMPipeline` cannot serve as a GILL decoder.*Supported pipeline classes"):
        read_conditioning_layout(ddpm)
    with pytest.raises(ValueError, match="`DDPMPipeline` cannot serve"):
        run_decoder(ddpm, {"prompt_embeds": torch.zeros(1, 4, 8)})
    with pytest.raises(ValueError, match="No supported decoder family has the denoiser.*UNet2DModel"):
        run_decoder({"unet": unet, "scheduler": DDPMScheduler()}, {"prompt_embeds": torch.zeros(1, 4, 8)})


def test_bad_conditioning_is_refused(decoders):
    pipe, cond, neg = decoders("pixart-sigma")
    layout = read_conditioning_layout(pipe)
    with pytest.raises(ValueError, match="must hold exactly"):
        run_decoder(pipe, {"prompt_embeds": cond["prompt_embeds"]}, neg)
    with pytest.raises(ValueError, match="`negative_conditioning` must hold"):
        run_decoder(pipe, cond, {"prompt_embeds": neg["prompt_embeds"]})
    with pytest.raises(ValueError, match="pass `negative_conditioning`"):
        run_decoder(pipe, cond, None, guidance_scale=4.0)
    with pytest.raises(ValueError, match="per-prompt shape"):
        short = {key: value[:, :10] for key, value in cond.items()}
        run_decoder(pipe, short, neg, layout=layout)
    with pytest.raises(ValueError, match="`callback_on_step_end`"):
        run_decoder(pipe, cond, neg, callback_on_step_end=lambda *args: {}, **SIZE)
    with pytest.raises(ValueError, match="`num_images_per_prompt`"):
        run_decoder(pipe, cond, neg, num_images_per_prompt=0)


def test_step_callback_reaches_the_stock_loop(decoders):
    pipe, cond, neg = decoders("sd3")
    steps = []

    def callback(stock_pipe, step, timestep, kwargs):
        steps.append(step)
        return kwargs

    ours(pipe, cond, neg, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
    assert steps == [0, 1]


@pytest.mark.parametrize("name", ["sdxl", "sana"])
def test_conditioning_loss_covers_every_learned_tensor_and_respects_masks(name, decoders):
    pipe, cond, _ = decoders(name)
    layout = read_conditioning_layout(pipe)
    assert conditioning_mse(cond, cond, layout)["total"] == 0
    moved = {key: value.clone() for key, value in cond.items()}
    if name == "sana":  # a change at padded positions only: no loss; at a real position: loss
        padded = cond["prompt_attention_mask"] == 0
        moved["prompt_embeds"][padded] += 1.0
        assert conditioning_mse(moved, cond, layout)["total"] == 0
        moved["prompt_embeds"][:, 0] += 1.0
        losses = conditioning_mse(moved, cond, layout)
        assert losses["prompt_embeds"] > 0 and sorted(losses) == ["prompt_embeds", "total"]
    else:  # attended: every position counts, and the pooled embedding has its own term
        moved["prompt_embeds"][:, -1] += 1.0
        moved["pooled_prompt_embeds"] += 1.0
        losses = conditioning_mse(moved, cond, layout)
        assert losses["prompt_embeds"] > 0 and losses["pooled_prompt_embeds"] == pytest.approx(1.0)
        assert losses["total"] == pytest.approx(losses["prompt_embeds"] + losses["pooled_prompt_embeds"])
    with pytest.raises(ValueError, match="`predicted` has no `prompt_embeds`"):
        conditioning_mse({}, cond, layout)
