"""GILLPipeline end to end, in the manner of diffusers' own pipeline tests."""

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import FAST_CALL, make_pipeline, random_image
from gill_pipeline import GILLPipeline, GILLPipelineOutput

# Forces one image after two words, so every call exercises the mapper and the denoising loop.
WITH_IMAGE = dict(FAST_CALL, min_text_tokens=2, img_logit_scale=1e4, max_images=1)
DOG = ["This is my dog.", random_image(0), "Show me what he would look like in the snow."]


def call(pipe, inputs, seed=0, **kwargs):
    settings = dict(WITH_IMAGE)
    settings.update(kwargs)
    return pipe(inputs, generator=torch.Generator().manual_seed(seed), **settings)


def answer_signature(answer):
    """Text segments as they are, images as tensors: for comparing answers."""
    return [x if isinstance(x, str) else x.image for x in answer]


def assert_same_answers(a, b, atol=1e-4):
    assert len(a) == len(b)
    for answer_a, answer_b in zip(a, b):
        sig_a, sig_b = answer_signature(answer_a), answer_signature(answer_b)
        assert [type(x) for x in sig_a] == [type(x) for x in sig_b]
        for x, y in zip(sig_a, sig_b):
            if isinstance(x, str):
                assert x == y
            else:
                torch.testing.assert_close(x, y, atol=atol, rtol=0)


@pytest.mark.parametrize("lm_type", ["opt", "gpt2", "llama", "qwen2"])
def test_any_causal_lm_runs_the_whole_pipeline(lm_type):
    pipe = make_pipeline(lm_type)
    out = call(pipe, DOG)
    assert isinstance(out, GILLPipelineOutput)
    (answer,) = out.outputs
    images = out.gill_images[0]
    assert len(images) == 1 and images[0].source == "generated"
    image = images[0].image
    assert image.shape == (3, 16, 16) and 0 <= image.min() and image.max() <= 1
    assert isinstance(answer[0], str) and len(answer[0]) > 0  # two words, then the image
    p_gen, p_ret = images[0].decision_probs
    assert abs(p_gen + p_ret - 1) < 1e-5


@pytest.mark.parametrize("cross_attention_dim,scheduler", [(32, "ddim"), (24, "pndm"), (24, "euler")])
def test_unet_widths_and_schedulers(cross_attention_dim, scheduler):
    pipe = make_pipeline("opt", cross_attention_dim=cross_attention_dim, scheduler=scheduler)
    assert pipe.gill.config.cond_dim == cross_attention_dim
    assert pipe.gill.uncond_prompt_embeds.shape[-1] == cross_attention_dim
    a = call(pipe, DOG, seed=1)
    b = call(pipe, DOG, seed=1)
    assert_same_answers(a.outputs, b.outputs, atol=0)
    c = call(pipe, DOG, seed=2)
    assert not torch.equal(a.gill_images[0][0].image, c.gill_images[0][0].image)


def test_save_load_round_trip(tmp_path, llama_pipe):
    before = call(llama_pipe, DOG)
    llama_pipe.save_pretrained(tmp_path)
    loaded = GILLPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.img_token_ids == llama_pipe.img_token_ids
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.img_token_ids) == ["[IMG0]", "[IMG1]", "[IMG2]", "[IMG3]"]
    after = call(loaded, DOG)
    assert_same_answers(before.outputs, after.outputs, atol=5e-4)
    for name in ("img_input_embeddings", "img_output_embeddings", "uncond_prompt_embeds"):
        torch.testing.assert_close(getattr(loaded.gill, name), getattr(llama_pipe.gill, name), atol=0, rtol=0)


def test_learned_weights_are_small_and_separate(tmp_path, opt_pipe):
    opt_pipe.save_pretrained(tmp_path)
    gill_dir = tmp_path / "gill"
    assert sorted(p.name for p in gill_dir.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    from safetensors.torch import load_file

    state = load_file(gill_dir / "diffusion_pytorch_model.safetensors")
    assert "uncond_prompt_embeds" in state
    assert state["img_input_embeddings"].shape == (opt_pipe.num_img_tokens, opt_pipe.gill.config.lm_input_dim)
    assert not any(k.startswith("llm") for k in state)


def test_optional_components_none_survive_save_load(tmp_path, opt_pipe):
    components = dict(opt_pipe.components)
    for name in ("image_encoder", "feature_extractor", "vae", "unet", "scheduler"):
        components[name] = None
    text_only = GILLPipeline(**components, img_token_ids=opt_pipe.img_token_ids)
    text_only.save_pretrained(tmp_path)
    loaded = GILLPipeline.from_pretrained(tmp_path)
    for name in ("image_encoder", "feature_extractor", "vae", "unet", "scheduler"):
        assert getattr(loaded, name) is None
    out = loaded(["This is my dog."], max_new_tokens=4, max_images=0)
    assert len(out.texts[0]) > 0 and out.gill_images == [[]]
    with pytest.raises(ValueError, match="image_mode='generate'.*unet"):
        loaded(["This is my dog."], image_mode="generate")
    with pytest.raises(ValueError, match="image_encoder"):
        loaded(["A dog", random_image(0)], max_new_tokens=2, max_images=0)


def test_batch_equals_one_by_one(opt_pipe):
    inputs = [DOG, ["Here is a picture of a cat", random_image(3)], ["A photo of a mountain lake"]]
    generators = [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    batched = opt_pipe(inputs, generator=generators, **WITH_IMAGE)
    singles = [
        opt_pipe(x, generator=torch.Generator().manual_seed(s), **WITH_IMAGE).outputs[0]
        for x, s in zip(inputs, (0, 1, 2))
    ]
    assert_same_answers(batched.outputs, singles, atol=1e-4)


def test_batch_sampling_equals_one_by_one(opt_pipe):
    inputs = [DOG, ["A photo of a mountain lake"]]
    kwargs = dict(FAST_CALL, max_new_tokens=8, do_sample=True, temperature=1.3, img_logit_scale=3.0)
    batched = opt_pipe(inputs, generator=[torch.Generator().manual_seed(s) for s in (5, 6)], **kwargs)
    singles = [opt_pipe(x, generator=torch.Generator().manual_seed(s), **kwargs).outputs[0] for x, s in zip(inputs, (5, 6))]
    assert_same_answers(batched.outputs, singles, atol=1e-4)


def test_dict_and_tuple_outputs_equal(opt_pipe):
    as_dict = call(opt_pipe, DOG)
    images, texts, outputs, warnings = call(opt_pipe, DOG, return_dict=False)
    assert_same_answers(as_dict.outputs, outputs, atol=0)
    assert texts == as_dict.texts and warnings == as_dict.warnings == [[]]
    assert len(images) == len(as_dict.images) == len(as_dict.gill_images[0])
    for a, b in zip(images, as_dict.images):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_same_generator_same_output_and_unbatched_input_forms(opt_pipe):
    a = call(opt_pipe, DOG, seed=7)
    b = call(opt_pipe, [DOG], seed=7)  # a batch of one
    assert_same_answers(a.outputs, b.outputs, atol=0)
    text_only = opt_pipe("This is my dog.", max_new_tokens=4, max_images=0)  # a bare string is one input
    assert len(text_only.outputs) == 1 and isinstance(text_only.outputs[0][0], str)


def test_every_input_image_is_used(opt_pipe):
    base = ["Two pictures:", random_image(0), random_image(1), "which one?"]
    changed = ["Two pictures:", random_image(0), random_image(5), "which one?"]
    device = torch.device("cpu")
    e_base = opt_pipe.encode_interleaved(base, device, "inputs")
    e_changed = opt_pipe.encode_interleaved(changed, device, "inputs")
    k = opt_pipe.gill.config.num_visual_tokens
    n_text_1 = len(opt_pipe.tokenizer("Two pictures:", add_special_tokens=False).input_ids) + 1  # + BOS
    assert e_base.shape == e_changed.shape
    torch.testing.assert_close(e_base[: n_text_1 + k], e_changed[: n_text_1 + k])  # first image identical
    assert not torch.allclose(e_base[n_text_1 + k : n_text_1 + 2 * k], e_changed[n_text_1 + k : n_text_1 + 2 * k])


def test_bos_once_before_the_first_text(opt_pipe):
    tok = opt_pipe.tokenizer
    embeds = opt_pipe.encode_interleaved([random_image(0), "a dog", "in snow"], torch.device("cpu"), "inputs")
    ids = [tok.bos_token_id] + tok("a dog", add_special_tokens=False).input_ids + tok("in snow", add_special_tokens=False).input_ids
    expected = opt_pipe.llm.get_input_embeddings()(torch.tensor(ids))
    k = opt_pipe.gill.config.num_visual_tokens
    assert embeds.shape[0] == k + len(ids)
    torch.testing.assert_close(embeds[k:], expected)


def test_images_only_input_ends_with_bos(opt_pipe):
    """[image prefix][BOS], the start of GILL's captioning sequences, when the input has no text."""
    embeds = opt_pipe.encode_interleaved([random_image(0)], torch.device("cpu"), "inputs")
    k = opt_pipe.gill.config.num_visual_tokens
    assert embeds.shape[0] == k + 1
    bos = opt_pipe.llm.get_input_embeddings()(torch.tensor([opt_pipe.tokenizer.bos_token_id]))
    torch.testing.assert_close(embeds[k:], bos)


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types(opt_pipe, output_type):
    out = call(opt_pipe, DOG, output_type=output_type)
    image = out.gill_images[0][0].image
    if output_type == "pil":
        assert isinstance(image, PIL.Image.Image) and image.size == (16, 16)
    elif output_type == "np":
        assert isinstance(image, np.ndarray) and image.shape == (16, 16, 3)
    elif output_type == "pt":
        assert isinstance(image, torch.Tensor) and image.shape == (3, 16, 16)
    else:
        assert isinstance(image, torch.Tensor) and image.shape == (4, 8, 8)


def test_latents_and_height_width(opt_pipe):
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    a = call(opt_pipe, DOG, latents=latents, height=8, width=8, seed=1)
    b = call(opt_pipe, DOG, latents=latents, height=8, width=8, seed=2)
    assert a.gill_images[0][0].image.shape == (3, 8, 8)
    torch.testing.assert_close(a.gill_images[0][0].image, b.gill_images[0][0].image)  # the latents, not the seed, decide


def test_num_images_per_prompt_ranks_candidates(opt_pipe):
    out = call(opt_pipe, DOG, num_images_per_prompt=3)
    image = out.gill_images[0][0]
    assert len(image.candidates) == 3
    similarity = image.scores["similarity"]
    assert similarity == sorted(similarity, reverse=True)
    assert image.image is image.candidates[0]
    # The ranking uses the retrieval space: recompute the best candidate's score by hand.
    seq_hidden = opt_pipe.decode(
        [opt_pipe.encode_interleaved(DOG, torch.device("cpu"), "inputs")],
        __import__("gill_pipeline").DecodingSettings(max_new_tokens=6, min_text_tokens=2, img_logit_scale=1e4, max_images=1),
    )[0].img_hidden_states(0, opt_pipe.num_img_tokens)
    score = opt_pipe.rank_candidates(image.image[None], seq_hidden[0])
    assert abs(float(score[0]) - similarity[0]) < 1e-4


def test_callback_on_step_end(opt_pipe):
    seen = []

    def callback(pipe, step, timestep, kwargs):
        assert pipe is opt_pipe
        seen.append((step, kwargs["latents"].shape))
        return kwargs

    call(opt_pipe, DOG, num_inference_steps=3, callback_on_step_end=callback)
    assert [s for s, _ in seen] == [0, 1, 2]


def test_guidance_uses_stored_empty_prompt_embedding():
    pipe = make_pipeline("opt")
    a = call(pipe, DOG, guidance_scale=5.0)
    pipe.gill.uncond_prompt_embeds.add_(1.0)
    b = call(pipe, DOG, guidance_scale=5.0)
    c = call(pipe, DOG, guidance_scale=1.0)  # no guidance: the empty-prompt embedding is not read
    pipe.gill.uncond_prompt_embeds.sub_(1.0)
    d = call(pipe, DOG, guidance_scale=1.0)
    assert not torch.allclose(a.gill_images[0][0].image, b.gill_images[0][0].image)
    torch.testing.assert_close(c.gill_images[0][0].image, d.gill_images[0][0].image)


def test_to_dtype_moves_every_component():
    pipe = make_pipeline("opt")
    pipe.to(dtype=torch.bfloat16)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            dtypes = {p.dtype for p in component.parameters()} | {
                b.dtype for b in component.buffers() if b.is_floating_point()
            }
            assert dtypes == {torch.bfloat16}, (name, dtypes)
    out = call(pipe, DOG)
    assert out.gill_images[0][0].image.dtype == torch.bfloat16  # "pt" keeps the pipeline's dtype, as in diffusers
    assert torch.isfinite(out.gill_images[0][0].image.float()).all()
    array = call(pipe, DOG, output_type="np").gill_images[0][0].image
    assert array.dtype == np.float32 and np.isfinite(array).all()


def test_lm_embedding_matrix_is_not_changed():
    from gill_pipeline.testing import build_tiny_lm, build_tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    llm = build_tiny_lm("llama", len(tokenizer), tokenizer)
    before_in = llm.get_input_embeddings().weight.clone()
    before_out = llm.get_output_embeddings().weight.clone()
    from gill_pipeline.testing import build_tiny_stable_diffusion, build_tiny_vision_encoder

    encoder, processor = build_tiny_vision_encoder()
    pipe = GILLPipeline.from_base_models(
        language_model=llm, tokenizer=tokenizer, stable_diffusion=build_tiny_stable_diffusion(), image_encoder=encoder,
        feature_extractor=processor, num_img_tokens=8, mapper_hidden_dim=32, mapper_heads=2,
        mapper_encoder_layers=1, mapper_decoder_layers=1,
    )
    assert torch.equal(llm.get_input_embeddings().weight, before_in)
    assert torch.equal(llm.get_output_embeddings().weight, before_out)
    assert "[IMG0]" not in tokenizer.get_vocab()  # the user's tokenizer is untouched; the pipeline has a copy
    assert pipe.tokenizer.convert_tokens_to_ids("[IMG0]") == pipe.img_token_ids[0]
    assert pipe.num_img_tokens == 8 and pipe.gill.img_output_embeddings is not None  # Llama is untied
    out = call(pipe, DOG)
    assert len(out.gill_images[0]) == 1


def test_model_cpu_offload_is_configured(opt_pipe):
    assert opt_pipe.model_cpu_offload_seq.split("->") == ["image_encoder", "llm", "unet", "transformer", "vae"]
    assert "gill" in opt_pipe._exclude_from_cpu_offload


def test_a_single_generated_image_is_not_run_through_the_vision_tower(opt_pipe, monkeypatch):
    # Ranking needs several candidates; with one, the CLIP vision forward would be pure cost (issue 18).
    calls = []
    monkeypatch.setattr(type(opt_pipe), "rank_candidates", lambda self, *a: calls.append(a) or None)
    out = call(opt_pipe, DOG)
    image = out.gill_images[0][0]
    assert image.source == "generated" and image.scores == {} and len(image.candidates) == 1
    assert calls == []
