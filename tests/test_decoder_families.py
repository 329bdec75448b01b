"""GILL over every decoder family (issue 10): assembly, generation, schedulers, guidance, batches, save/load, training
and learned-weights sharing, on tiny random decoders built from configs (`gill_pipeline.testing`)."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from fake_hub import FakeHub
from gill_pipeline import GILLPipeline
from gill_pipeline.decoders import default_negative_conditioning, encode_conditioning, read_conditioning_layout
from gill_pipeline.decoders.conditioning import NEGATIVE_PREFIX
from gill_pipeline.constants import LEARNED_WEIGHTS_MANIFEST_FILE
from gill_pipeline.serialization.hub import push_folder_to_hub
from gill_pipeline.testing import build_tiny_gill_pipeline_with_decoder
from training.losses import generation_loss

FAMILIES = ["sd", "sdxl", "sd3", "flux-dev", "flux-schnell", "pixart-sigma", "sana"]
TOKEN = "hf_fake_token"
CAPTIONS = ["a red cat", "a dog in the snow"]


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_tiny_gill_pipeline_with_decoder(name)
        return cache[name]

    return get


def denoiser_of(pipe):
    return {"unet": pipe.unet} if pipe.unet is not None else {"transformer": pipe.transformer}


def img_hidden(pipe, n=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, pipe.num_img_tokens, pipe.gill.config.lm_hidden_dim, generator=generator)


def generate(pipe, conditioning, seeds, **kwargs):
    size = 2 * pipe.image_size_multiple
    settings = dict(num_inference_steps=2, height=size, width=size, guidance_scale=3.0)
    settings.update(kwargs)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe.generate_images(conditioning, generators=generators, **settings)


@pytest.mark.parametrize("name", FAMILIES)
def test_assembly_records_the_layout_and_sizes_every_head_from_it(name, built):
    pipe, decoder = built(name)
    layout = read_conditioning_layout(decoder)
    recorded = pipe.gill.conditioning_layout
    # SD 1.x/2.x keeps GILL's original config (no recorded layout, read as the SD layout without encode settings).
    for field in ("family", "pipeline_class", "tensors", "guidance", "padding"):
        assert getattr(recorded, field) == getattr(layout, field)
    assert (pipe.gill.config.conditioning_layout is None) == (name == "sd")
    sequence = next(t for t in layout.tensors if t.kind == "sequence")
    assert pipe.gill.mapper.model.out_features == sequence.width
    assert pipe.gill.mapper.query_embs.shape[1] == sequence.length
    pooled = [t for t in layout.tensors if t.kind == "pooled"]
    if pooled:
        assert pipe.gill.mapper.pooled_head.out_features == pooled[0].width
    else:
        assert pipe.gill.mapper.pooled_head is None
    outputs = pipe.gill.map_to_conditioning(img_hidden(pipe))
    assert sorted(outputs) == sorted(layout.names)
    for tensor in layout.tensors:
        assert list(outputs[tensor.name].shape[1:]) == tensor.shape
    # One stored negative per tensor that has one (pooled and masks included; none for Flux).
    stored = pipe.gill.negative_conditioning()
    expected = default_negative_conditioning(decoder)
    assert sorted(stored) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(stored[key].to(value.dtype), value.cpu(), atol=0, rtol=0)
    # The decoder's text encoders are not part of the GILL pipeline.
    assert not any("text_encoder" in key for key in pipe.components)


@pytest.mark.parametrize("name", FAMILIES)
def test_assembly_without_text_encoders(name, built):
    pipe, decoder = built(name)
    components = dict(decoder.components)
    for key in list(components):
        if key.startswith(("text_encoder", "tokenizer")):
            components[key] = None
    bare = type(decoder)(**components)
    base = dict(language_model=pipe.llm, tokenizer=decoder.tokenizer, image_encoder=pipe.image_encoder)
    with pytest.raises(ValueError, match=rf"{type(decoder).__name__}.*text_encoder.*conditioning_layout"):
        GILLPipeline.from_base_models(stable_diffusion=bare, **base)
    # With the layout and negatives read once from the full pipeline, the learned parts are the same.
    again, _ = build_tiny_gill_pipeline_with_decoder(
        name,
        conditioning_layout=read_conditioning_layout(decoder),
        negative_conditioning=default_negative_conditioning(decoder),
    )
    full_state, bare_state = pipe.gill.state_dict(), again.gill.state_dict()
    assert sorted(full_state) == sorted(bare_state)
    for key in full_state:
        torch.testing.assert_close(full_state[key], bare_state[key], atol=0, rtol=0)


def test_unsupported_decoder_is_refused_at_assembly(built):
    from diffusers import DDPMPipeline, UNet2DModel

    pipe, _ = built("sd")
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2, norm_num_groups=8, layers_per_block=1,
    )
    ddpm = DDPMPipeline(unet, EulerDiscreteScheduler())
    with pytest.raises(ValueError, match="`DDPMPipeline` cannot serve as a GILL decoder.*prompt_embeds"):
        GILLPipeline.from_base_models(
            language_model=pipe.llm, tokenizer=pipe.tokenizer, stable_diffusion=ddpm, image_encoder=pipe.image_encoder
        )


@pytest.mark.parametrize("name", FAMILIES)
def test_batch_equals_single_calls(name, built):
    pipe, _ = built(name)
    conditioning = pipe.gill.map_to_conditioning(img_hidden(pipe))
    both = generate(pipe, conditioning, seeds=[1, 2])
    assert both.shape[0] == 2 and both.min() >= 0 and both.max() <= 1
    for i in range(2):
        single = generate(pipe, {k: v[i : i + 1] for k, v in conditioning.items()}, seeds=[1 + i])
        torch.testing.assert_close(single[0], both[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_guidance_on_and_off(name, built):
    pipe, _ = built(name)
    conditioning = pipe.gill.map_to_conditioning(img_hidden(pipe, n=1))
    off = generate(pipe, conditioning, seeds=[0], guidance_scale=1.0)
    on = generate(pipe, conditioning, seeds=[0], guidance_scale=4.0)
    if name == "flux-schnell":  # timestep-distilled: no guidance at all
        torch.testing.assert_close(on, off, atol=0, rtol=0)
    else:
        assert (on - off).abs().max() > 1e-4


@pytest.mark.parametrize(
    "name, scheduler_class",
    [("sd", EulerDiscreteScheduler), ("sdxl", DPMSolverMultistepScheduler), ("pixart-sigma", EulerDiscreteScheduler)]
    + [(name, FlowMatchEulerDiscreteScheduler) for name in ("sd3", "flux-dev", "sana")],
)
def test_a_swapped_scheduler_runs_through_the_family_pipeline(name, scheduler_class, built):
    # The decoder layer's tests run every compatible scheduler of each family against the stock pipeline; here one
    # swapped scheduler per family shows GILL hands the pipeline's own scheduler to it.
    pipe, _ = built(name)
    swapped = GILLPipeline(**{**pipe.components, "scheduler": scheduler_class.from_config(pipe.scheduler.config)})
    swapped.set_progress_bar_config(disable=True)
    conditioning = pipe.gill.map_to_conditioning(img_hidden(pipe, n=1))
    images = generate(swapped, conditioning, seeds=[0], num_inference_steps=3)
    assert torch.isfinite(images).all() and swapped.num_timesteps == 3


@pytest.mark.parametrize("name", FAMILIES)
def test_whole_call_produces_an_image(name, built):
    pipe, _ = built(name)
    size = 2 * pipe.image_size_multiple
    out = pipe(
        ["This is my dog."], max_new_tokens=4, min_text_tokens=1, img_logit_scale=100.0, max_images=1,
        image_mode="generate", num_inference_steps=2, height=size, width=size, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    images = out.gill_images[0]
    assert len(images) == 1 and images[0].source == "generated"
    assert tuple(images[0].image.shape) == (3, size, size)


def test_options_the_family_does_not_take_are_refused_before_the_lm_runs(built):
    pipe, _ = built("pixart-sigma")
    calls = []
    handle = pipe.llm.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="`guidance_rescale`=0.5.*PixArtSigmaPipeline"):
            pipe(["This is my dog."], max_new_tokens=2, guidance_rescale=0.5)
    finally:
        handle.remove()
    assert calls == []


def test_flux_latents_are_checked_packed(built):
    pipe, _ = built("flux-dev")
    size = 2 * pipe.image_size_multiple
    positions = (size // (2 * pipe.vae_scale_factor)) ** 2
    good = torch.randn(1, positions, pipe.transformer.config.in_channels)
    pipe._check_latents(good, size, size, 1)
    with pytest.raises(ValueError, match="positions"):
        pipe._check_latents(torch.randn(1, 4, size // 8, size // 8), size, size, 1)
    conditioning = pipe.gill.map_to_conditioning(img_hidden(pipe, n=2))
    images = pipe.generate_images(conditioning, latents=good, num_inference_steps=2, height=size, width=size)
    torch.testing.assert_close(images[0], images[0])  # ran with the given latents for both groups
    assert images.shape[0] == 2


@pytest.mark.parametrize("name", FAMILIES)
def test_save_load_equality(name, built, tmp_path):
    pipe, _ = built(name)
    pipe.save_pretrained(tmp_path)
    loaded = GILLPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.gill.conditioning_layout == pipe.gill.conditioning_layout
    hidden = img_hidden(pipe, n=1)
    expected = generate(pipe, pipe.gill.map_to_conditioning(hidden), seeds=[0])
    got = generate(loaded, loaded.gill.map_to_conditioning(hidden), seeds=[0])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_training_step_on_the_family_targets(name, built):
    pipe, decoder = built(name)
    gill = type(pipe.gill).from_config(pipe.gill.config)
    gill.load_state_dict(pipe.gill.state_dict())
    gill.train()
    targets = encode_conditioning(decoder, CAPTIONS)
    hidden = img_hidden(pipe)
    optimizer = torch.optim.AdamW(gill.mapper.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = generation_loss(gill, hidden, targets)
        optimizer.zero_grad()
        loss.backward()
        losses.append(float(loss.detach()))
        for head in (gill.mapper.model, gill.mapper.pooled_head):
            if head is not None:
                assert head.weight.grad.abs().sum() > 0
        optimizer.step()
    assert losses[-1] < losses[0]


def test_masked_families_leave_padded_target_positions_out_of_the_loss(built):
    pipe, decoder = built("pixart-sigma")
    targets = encode_conditioning(decoder, CAPTIONS)
    hidden = img_hidden(pipe)
    loss = generation_loss(pipe.gill, hidden, targets)
    changed = dict(targets)
    padded = targets["prompt_attention_mask"] == 0
    changed["prompt_embeds"] = targets["prompt_embeds"].masked_fill(padded[..., None], 1e3)
    assert torch.equal(generation_loss(pipe.gill, hidden, changed), loss)


def test_fewer_queries_than_positions(built):
    _, decoder = built("flux-schnell")
    pipe, _ = build_tiny_gill_pipeline_with_decoder("flux-schnell", mapper_num_queries=16)
    assert pipe.gill.mapper.query_embs.shape[1] == 16
    outputs = pipe.gill.map_to_conditioning(img_hidden(pipe))
    assert outputs["prompt_embeds"].shape[1] == read_conditioning_layout(decoder).tensor("prompt_embeds").length
    loss = generation_loss(pipe.gill, img_hidden(pipe), encode_conditioning(decoder, CAPTIONS))
    loss.backward()
    assert pipe.gill.mapper.upsample.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", FAMILIES)
def test_learned_weights_round_trip_through_the_hub(name, built, tmp_path):
    pipe, _ = built(name)
    with FakeHub():
        base = tmp_path / "base"
        base_pipeline_class = pipe.gill.conditioning_layout.pipeline_class
        # The base checkpoint as a stock pipeline folder without text encoders (what load_decoder reads).
        pipe._decoder_pipeline().save_pretrained(base)
        push_folder_to_hub(str(base), f"tiny/{name}", token=TOKEN)
        pipe.push_learned_weights(
            f"org/gill-{name}", token=TOKEN, base_models={"llm": "tiny/lm", "stable_diffusion": f"tiny/{name}"}
        )
        folder = tmp_path / "pulled"
        pipe.save_learned_weights(folder, base_models={"llm": "tiny/lm", "stable_diffusion": f"tiny/{name}"})
        manifest = (folder / LEARNED_WEIGHTS_MANIFEST_FILE).read_text()
        assert base_pipeline_class in manifest and f"tiny/{name}" in manifest
        loaded = GILLPipeline.from_pretrained(
            f"org/gill-{name}", token=TOKEN, llm=pipe.llm, image_encoder=pipe.image_encoder,
            cache_dir=str(tmp_path / "cache"),
        )
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.transformer if loaded.transformer is not None else loaded.unet) is type(
        pipe.transformer if pipe.transformer is not None else pipe.unet
    )
    hidden = img_hidden(pipe, n=1)
    expected = generate(pipe, pipe.gill.map_to_conditioning(hidden), seeds=[0])
    got = generate(loaded, loaded.gill.map_to_conditioning(hidden), seeds=[0])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_learned_weights_refuse_another_family_naming_both(built, tmp_path):
    pipe, _ = built("sdxl")
    other, _ = built("sd3")
    pipe.save_learned_weights(tmp_path)
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline.*trained for StableDiffusionXLPipeline"):
        GILLPipeline.from_pretrained(
            tmp_path, llm=pipe.llm, image_encoder=pipe.image_encoder, vae=other.vae, transformer=other.transformer
        )
    dev, _ = built("flux-dev")
    schnell, _ = built("flux-schnell")
    schnell.save_learned_weights(tmp_path / "schnell")
    with pytest.raises(ValueError, match="guides with 'embedding'.*FluxPipeline"):
        GILLPipeline.from_pretrained(
            tmp_path / "schnell", llm=schnell.llm, image_encoder=schnell.image_encoder, vae=dev.vae,
            transformer=dev.transformer,
        )


def test_model_card_names_the_decoder(built, tmp_path):
    from gill_pipeline.serialization.model_card import build_model_card

    pipe, _ = built("flux-dev")
    pipe.save_learned_weights(tmp_path)
    card = str(build_model_card(str(tmp_path)))
    assert "Image decoder: `FluxPipeline` (family `flux`, guidance `embedding`)" in card


def test_negative_names_match_the_call_arguments(built):
    pipe, decoder = built("pixart-sigma")
    for tensor in pipe.gill.conditioning_layout.tensors:
        assert tensor.negative_name == NEGATIVE_PREFIX + tensor.name


def test_a_whole_pipeline_with_another_family_decoder_is_refused(built, tmp_path):
    pipe, _ = built("flux-dev")
    other, _ = built("sana")
    pipe.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="SanaPipeline.*trained for FluxPipeline"):
        GILLPipeline.from_pretrained(tmp_path, vae=other.vae, transformer=other.transformer)


def test_mapper_queries_measurement_runs():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu", "mapper_queries.py")
    spec = importlib.util.spec_from_file_location("mapper_queries", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--tiny", "--repeats", "1"])
    # Every family measured with one query per position, and the long ones with fewer queries too.
    assert {row[0] for row in rows} == set(module.REAL_LAYOUTS)
    assert any(row[4] < row[1] for row in rows) and all(row[5] > 0 and row[6] > 0 for row in rows)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_compatible_scheduler_through_gill(name, built):
    # The same images as the decoder's stock pipeline fed the mapper's conditioning and the stored negatives, for
    # every scheduler the family takes (the list tests/test_decoders.py checks against the stock `prompt=` path).
    from gill_pipeline.decoders import run_decoder
    from test_decoders import SCHEDULERS

    pipe, decoder = built(name)
    conditioning = pipe.gill.map_to_conditioning(img_hidden(pipe, n=1))
    size = 2 * pipe.image_size_multiple
    for scheduler_class, overrides in SCHEDULERS[name]:
        scheduler = scheduler_class.from_config(pipe.scheduler.config, **overrides)
        swapped = GILLPipeline(**{**pipe.components, "scheduler": scheduler})
        swapped.set_progress_bar_config(disable=True)
        got = generate(swapped, conditioning, seeds=[0])
        stock = type(decoder)(**{**decoder.components, "scheduler": scheduler})
        stock.set_progress_bar_config(disable=True)
        expected = run_decoder(
            stock, conditioning, pipe.gill.negative_conditioning() or None, height=size, width=size,
            num_inference_steps=2, guidance_scale=3.0, generator=[torch.Generator().manual_seed(0)], output_type="pt",
        )
        assert torch.isfinite(got).all(), scheduler_class.__name__
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=scheduler_class.__name__)


@pytest.mark.parametrize("name", ["sdxl", "flux-dev"])
def test_assembly_from_a_checkpoint_folder(name, built, tmp_path):
    # A path is read as the family its model_index.json names, loaded with its text encoders for assembly only.
    from gill_pipeline.testing import build_tiny_tokenizer

    pipe, decoder = built(name)
    decoder.save_pretrained(tmp_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = build_tiny_tokenizer()
    from_path = GILLPipeline.from_base_models(
        language_model=pipe.llm, tokenizer=tokenizer, stable_diffusion=str(tmp_path), image_encoder=pipe.image_encoder,
        num_img_tokens=4, retrieval_dim=16, mapper_hidden_dim=32, mapper_encoder_layers=1, mapper_decoder_layers=1,
        mapper_heads=2,
    )
    assert from_path.gill.conditioning_layout == pipe.gill.conditioning_layout
    assert not any(key.startswith("text_encoder") for key in from_path.components)
    expected = pipe.gill.state_dict()
    for key, value in from_path.gill.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["sdxl", "flux-schnell"])
def test_assembly_from_a_checkpoint_folder_with_the_layout_skips_its_text_encoders(name, built, tmp_path):
    # With the layout (and the negatives, where the family has some) given, the checkpoint is loaded without its text
    # encoders: their folders are deleted here, and assembly gives the same learned parts (Flux's T5 is 9.5 GB).
    import shutil

    from gill_pipeline.testing import build_tiny_tokenizer

    pipe, decoder = built(name)
    decoder.save_pretrained(tmp_path)
    for folder in tmp_path.glob("text_encoder*"):
        shutil.rmtree(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = build_tiny_tokenizer()
    from_path = GILLPipeline.from_base_models(
        language_model=pipe.llm, tokenizer=tokenizer, decoder=str(tmp_path), image_encoder=pipe.image_encoder,
        conditioning_layout=read_conditioning_layout(decoder).to_dict(),
        negative_conditioning=default_negative_conditioning(decoder), num_img_tokens=4, retrieval_dim=16,
        mapper_hidden_dim=32, mapper_encoder_layers=1, mapper_decoder_layers=1, mapper_heads=2,
    )
    assert from_path.gill.conditioning_layout == pipe.gill.conditioning_layout
    expected = pipe.gill.state_dict()
    for key, value in from_path.gill.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=0, rtol=0)
    # Without the negatives SDXL still loads its text encoders (to read them), whose weights are gone here.
    if name == "sdxl":
        with pytest.raises(OSError, match=r"no file named model\.safetensors"):
            GILLPipeline.from_base_models(
                language_model=pipe.llm, tokenizer=tokenizer, decoder=str(tmp_path), image_encoder=pipe.image_encoder,
                conditioning_layout=read_conditioning_layout(decoder),
            )
