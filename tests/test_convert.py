"""Converting the reference GILL release: a synthetic checkpoint in the reference layout, compared with a small
reimplementation of the reference's inference math; and the REAL released decision head."""

import argparse
import copy
import json
import os

import pytest
import torch
from torch import nn

from conftest import SHARED_DATA, random_image
from gill_pipeline.conversion.convert_original import (
    CheckpointError,
    build_gill_model_from_reference,
    convert_original_checkpoint,
    convert_original_to_folder,
    load_reference_decision_head,
    load_reference_pickle,
)
from gill_pipeline.models.gill_model import GILLModel
from gill_pipeline.pipeline import DecodingSettings, GILLPipeline
from gill_pipeline.testing import build_tiny_lm, build_tiny_stable_diffusion, build_tiny_tokenizer, build_tiny_vision_encoder

REAL_DECISION = os.path.join(SHARED_DATA, "decision_model.pth.tar")
REAL_ARGS = os.path.join(SHARED_DATA, "model_args.json")


def needs_shared_file(path: str):
    """A fresh clone has no ../shared: such a test is skipped there, with the file it needs as the reason."""
    return pytest.mark.skipif(
        not os.path.isfile(path), reason=f"needs {os.path.normpath(path)} (../shared beside the checkout, as in CI)"
    )
R = 8  # [IMG] tokens, as in the release
PROMPT_TEXT = "This is my dog."
MIN_TEXT, SCALE, STEPS = 2, 1e5, 5  # [IMG0] forced at step 2, as the reference notebooks force it


class ReferenceTextFcLayer(nn.Module):
    """The reference's `TextFcLayer` in 'gill_mapper' mode (same parameter names), at a test size."""

    def __init__(self, in_dim, out_dim, num_output_tokens, hidden=32):
        super().__init__()
        self.fc = nn.Linear(in_dim, hidden)
        self.tfm = nn.Transformer(
            batch_first=True, norm_first=True, d_model=hidden, num_encoder_layers=1, num_decoder_layers=1,
            dim_feedforward=hidden * 4, dropout=0.0, nhead=4,
        )
        self.model = nn.Linear(hidden, out_dim)
        self.query_embs = nn.Parameter(torch.randn(1, num_output_tokens, hidden))

    def forward(self, x, input_embs):
        x = self.fc(x + input_embs)
        x = self.tfm(x, self.query_embs.repeat(x.shape[0], 1, 1))
        return self.model(x)


class Reference(nn.Module):
    """The reference GILLModel's learned parts, named as in its state dict (`model.` is added when saving)."""

    def __init__(self, lm_dim, vision_dim, cond_dim, cond_length, ret_dim=8, k=4):
        super().__init__()
        self.input_embeddings = nn.Embedding(R, lm_dim)  # only the [IMG] rows, as the pruned release stores them
        self.visual_embeddings = nn.Linear(vision_dim, lm_dim * k)
        self.visual_fc = nn.Linear(vision_dim, ret_dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.ret_text_hidden_fcs = nn.ModuleList([nn.Module()])
        self.ret_text_hidden_fcs[0].model = nn.Linear(lm_dim, ret_dim)
        self.gen_text_hidden_fcs = nn.ModuleList([ReferenceTextFcLayer(lm_dim, cond_dim, cond_length)])


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Tiny base models and a synthetic release in the reference layout (random weights)."""
    root = tmp_path_factory.mktemp("release")
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    # Like OPT (tokenizer 50265, embedding rows 50272), the LM has a few unused rows past the tokenizer.
    llm = build_tiny_lm("opt", len(tokenizer) + 8, tokenizer).eval()
    sd = build_tiny_stable_diffusion(cross_attention_dim=32)
    encoder, processor = build_tiny_vision_encoder()
    lm_dim = llm.get_input_embeddings().embedding_dim
    ref = Reference(lm_dim, encoder.config.hidden_size, 32, sd.tokenizer.model_max_length).eval()
    decision = nn.Sequential(nn.Dropout(0.5), nn.Linear(lm_dim, 2)).eval()
    img_ids = list(range(len(tokenizer) + 1, len(tokenizer) + 1 + R))  # after the `<|image|>` token
    args = {
        "opt_version": "facebook/opt-6.7b", "visual_encoder": "openai/clip-vit-large-patch14", "n_visual_tokens": 4,
        "ret_emb_dim": 8, "gen_emb_dim": 32, "text_emb_layers": [-1], "text_fc_mode": "gill_mapper",
        "ret_text_fc_mode": "linear", "num_tokens": R, "num_clip_tokens": sd.tokenizer.model_max_length,
        "share_ret_gen": True, "norm_image_embed": "none", "retrieval_token_idx": img_ids, "gen_token_idx": img_ids,
    }
    paths = {"args": root / "model_args.json", "ckpt": root / "pretrained_ckpt.pth.tar", "decision": root / "decision_model.pth.tar"}
    paths["args"].write_text(json.dumps(args))
    torch.save({"state_dict": {f"model.{k}": v for k, v in ref.state_dict().items()}}, paths["ckpt"])
    torch.save({"state_dict": decision.state_dict()}, paths["decision"])
    return dict(
        tokenizer=tokenizer, llm=llm, sd=sd, encoder=encoder, processor=processor, ref=ref, decision=decision,
        img_ids=img_ids, args=args, paths={k: str(v) for k, v in paths.items()}, root=root,
    )


def convert(release, **kwargs):
    p = release["paths"]
    return convert_original_checkpoint(
        p["args"], p["ckpt"], p["decision"], language_model=release["llm"], tokenizer=release["tokenizer"],
        stable_diffusion=release["sd"], image_encoder=release["encoder"], feature_extractor=release["processor"],
        **kwargs,
    )


@pytest.fixture(scope="module")
def converted(release):
    pipe = convert(release)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def reference_run(release, image, min_text=MIN_TEXT):
    """The reference's inference: resized OPT embedding with the 8 learned rows, full re-run decoding, heads."""
    ref, tokenizer = release["ref"], copy.deepcopy(release["tokenizer"])
    tokenizer.add_special_tokens({"cls_token": "<|image|>"})
    for i in range(R):
        tokenizer.add_tokens(f"[IMG{i}]")
    lm = copy.deepcopy(release["llm"])
    lm.resize_token_embeddings(len(tokenizer))
    lm.get_input_embeddings().weight[-R:] = ref.input_embeddings.weight
    embed = lm.get_input_embeddings()
    pixels = release["processor"](images=[image], return_tensors="pt").pixel_values
    pooled = release["encoder"](pixel_values=pixels).pooler_output
    visual = ref.visual_embeddings(pooled).reshape(1, 4, -1)
    ids = [tokenizer.bos_token_id] + tokenizer(PROMPT_TEXT, add_special_tokens=False).input_ids
    embeddings = torch.cat([visual, embed(torch.tensor([ids]))], dim=1)
    input_len, out = embeddings.shape[1], []
    img_ids = release["img_ids"]
    for step in range(STEPS):
        output = lm(inputs_embeds=embeddings, use_cache=False, output_hidden_states=True)
        hidden = output.hidden_states[-1]
        logits = output.logits[:, -1, :].clone()
        logits[:, img_ids[1:]] = float("-inf")
        if step < min_text:
            logits[:, img_ids] = float("-inf")
        else:
            logits[:, img_ids[0]] = logits[:, img_ids[0]].abs() * SCALE
        token = int(logits.argmax(-1))
        new = img_ids if token == img_ids[0] else [token]
        out += new
        embeddings = torch.cat([embeddings, embed(torch.tensor([new]))], dim=1)
    generated_hidden = hidden[0, input_len:]
    if img_ids[0] not in out:
        return dict(tokens=out, hidden=generated_hidden)
    start = out.index(img_ids[0])
    img_hidden = generated_hidden[start : start + R]
    mapper_out = ref.gen_text_hidden_fcs[0](img_hidden[None], ref.input_embeddings.weight[None])
    h0 = img_hidden[:1]
    text_ret = nn.functional.normalize(ref.ret_text_hidden_fcs[0].model(h0), dim=-1)
    decision_probs = release["decision"](h0).softmax(-1)
    return dict(tokens=out, img_hidden=img_hidden, mapper=mapper_out, text_ret=text_ret, decision=decision_probs,
                pooled=pooled, tokenizer=tokenizer)


@torch.no_grad()
def test_converted_pipeline_behaves_like_the_reference(release, converted):
    image = random_image(3)
    expected = reference_run(release, image)
    pipe = converted
    assert pipe.img_token_ids == release["img_ids"] == release["args"]["gen_token_idx"]
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.img_token_ids) == [f"[IMG{i}]" for i in range(R)]
    assert pipe.tokenizer.cls_token == "<|image|>" and pipe.tokenizer.cls_token_id == release["img_ids"][0] - 1

    prompt = pipe.encode_interleaved([image, PROMPT_TEXT], torch.device("cpu"), "inputs")
    for use_cache in (True, False):
        settings = DecodingSettings(max_new_tokens=STEPS, min_text_tokens=MIN_TEXT, img_logit_scale=SCALE, use_cache=use_cache)
        seq = pipe.decode([prompt], settings)[0]
        # Same tokens (the reference ignores EOS; this pipeline stops there).
        n = len(seq.token_ids)
        assert seq.token_ids == expected["tokens"][:n]
        assert n == len(expected["tokens"]) or expected["tokens"][n] in pipe._eos_token_ids()
        img_hidden = seq.img_hidden_states(0, R)
        torch.testing.assert_close(img_hidden, expected["img_hidden"], atol=1e-4, rtol=1e-4)

    # Same mapper output (prompt embeddings), decision and retrieval scores.
    torch.testing.assert_close(pipe.gill.map_to_prompt_embeds(img_hidden[None]), expected["mapper"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pipe.gill.decide(img_hidden[:1]), expected["decision"], atol=1e-5, rtol=1e-5)
    ref = release["ref"]
    pooled = torch.cat([expected["pooled"], release["encoder"](
        pixel_values=release["processor"](images=[random_image(s) for s in (4, 5)], return_tensors="pt").pixel_values
    ).pooler_output])
    # The reference's retrieval set: normalised visual_fc outputs times exp(logit_scale); scores = set @ text.T.
    ref_set = nn.functional.normalize(ref.visual_fc(pooled), dim=-1) * ref.logit_scale.exp()
    ref_scores = ref_set @ expected["text_ret"].T
    ours = pipe.gill.image_retrieval_embeds(pooled) @ pipe.gill.text_retrieval_embeds(img_hidden[:1]).T
    torch.testing.assert_close(ours * pipe.gill.logit_scale.exp(), ref_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pipe.gill.encode_visual_prefix(expected["pooled"]), ref.visual_embeddings(expected["pooled"]).reshape(1, 4, -1))

    # The image: the reference hands the mapper output to the stock SD pipeline, which encodes "" for guidance.
    sd = release["sd"]
    sd.set_progress_bar_config(disable=True)
    ref_image = sd(prompt_embeds=expected["mapper"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="pt").images[0]
    out = pipe([image, PROMPT_TEXT], max_new_tokens=STEPS, min_text_tokens=MIN_TEXT, img_logit_scale=SCALE,
               num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.gill_images[0][0].image, ref_image, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_text_only_decoding_matches_the_reference(release, converted):
    image = random_image(7)
    expected = reference_run(release, image, min_text=STEPS)  # [IMG0] never allowed: text only
    prompt = converted.encode_interleaved([image, PROMPT_TEXT], torch.device("cpu"), "inputs")
    settings = DecodingSettings(max_new_tokens=STEPS, min_text_tokens=STEPS)
    seq = converted.decode([prompt], settings)[0]
    n = len(seq.token_ids)
    assert n > 0 and seq.token_ids == expected["tokens"][:n]
    torch.testing.assert_close(torch.stack(seq.hidden_states), expected["hidden"][: len(seq.hidden_states)], atol=1e-4, rtol=1e-4)


def test_converted_folder_round_trip_and_card(release, converted, tmp_path):
    from huggingface_hub import ModelCard

    p = release["paths"]
    common = dict(language_model=release["llm"], tokenizer=release["tokenizer"], stable_diffusion=release["sd"],
                  image_encoder=release["encoder"], feature_extractor=release["processor"])
    whole = convert_original_to_folder(tmp_path / "whole", p["args"], p["ckpt"], p["decision"], **common)
    loaded = GILLPipeline.from_pretrained(whole)
    for key, value in converted.gill.state_dict().items():
        torch.testing.assert_close(loaded.gill.state_dict()[key], value)
    assert loaded.img_token_ids == release["img_ids"]
    card = ModelCard.load(os.path.join(whole, "README.md"))
    assert card.data.library_name == "gill_pipeline" and "0.641" in card.text
    learned = convert_original_to_folder(
        tmp_path / "learned", p["args"], p["ckpt"], p["decision"], learned_weights_only=True,
        base_models={"llm": "facebook/opt-6.7b", "stable_diffusion": "org/sd", "image_encoder": "openai/clip"}, **common,
    )
    assert sorted(os.listdir(learned)) == ["README.md", "feature_extractor", "gill", "gill_learned_weights.json", "scheduler", "tokenizer"]
    back = GILLPipeline.from_pretrained(learned, llm=release["llm"], vae=None, unet=None, image_encoder=release["encoder"])
    assert back.img_token_ids == release["img_ids"] and back.tokenizer.cls_token == "<|image|>"
    torch.testing.assert_close(back.gill.mapper.query_embs, converted.gill.mapper.query_embs)


def test_prefixes_and_full_embedding_matrix_are_accepted(release, tmp_path):
    state = {f"module.model.{k}": v for k, v in release["ref"].state_dict().items()}
    state["module.model.input_embeddings.weight"] = torch.cat([torch.randn(5, state["module.model.input_embeddings.weight"].shape[1]), state["module.model.input_embeddings.weight"]])
    torch.save({"state_dict": state, "epoch": 3, "best_acc1": torch.tensor(0.5)}, tmp_path / "ckpt.pth.tar")
    torch.save({"state_dict": {f"module.{k}": v for k, v in release["decision"].state_dict().items()}}, tmp_path / "dec.pth.tar")
    gill = build_gill_model_from_reference(tmp_path / "ckpt.pth.tar", release["paths"]["args"], tmp_path / "dec.pth.tar")
    torch.testing.assert_close(gill.img_input_embeddings, release["ref"].input_embeddings.weight)
    torch.testing.assert_close(gill.decision_head[1].weight, release["decision"][1].weight)


def test_unexpected_and_missing_keys_are_listed(release, tmp_path):
    state = {f"model.{k}": v for k, v in release["ref"].state_dict().items()}
    torch.save({"state_dict": {**state, "model.extra.weight": torch.zeros(1)}}, tmp_path / "extra.pth.tar")
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.extra\.weight"):
        build_gill_model_from_reference(tmp_path / "extra.pth.tar", release["paths"]["args"])
    state.pop("model.gen_text_hidden_fcs.0.tfm.decoder.norm.weight")
    torch.save({"state_dict": state}, tmp_path / "missing.pth.tar")
    with pytest.raises(CheckpointError, match=r"missing.*mapper\.tfm\.decoder\.norm\.weight"):
        build_gill_model_from_reference(tmp_path / "missing.pth.tar", release["paths"]["args"])


def test_a_pickle_that_needs_more_than_weights_only_is_refused(release, tmp_path):
    path = tmp_path / "unsafe.pth.tar"
    torch.save({"state_dict": release["decision"].state_dict(), "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(CheckpointError, match=r"Refusing to load the reference decision model .*unsafe\.pth\.tar"):
        load_reference_decision_head(GILLModel(16, 16, 32, 32, cond_length=4, mapper_hidden_dim=8, mapper_heads=2), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_reference_pickle(tmp_path / "nope.pth.tar")


def test_wrong_tokenizer_or_base_model_is_an_error(release, tmp_path):
    args = dict(release["args"], gen_token_idx=[i + 100 for i in release["img_ids"]])
    args["retrieval_token_idx"] = args["gen_token_idx"]
    (tmp_path / "args.json").write_text(json.dumps(args))
    p = release["paths"]
    with pytest.raises(CheckpointError, match="not the tokenizer"):
        convert_original_checkpoint(
            str(tmp_path / "args.json"), p["ckpt"], p["decision"], language_model=release["llm"],
            tokenizer=release["tokenizer"], stable_diffusion=release["sd"], image_encoder=release["encoder"],
        )
    with pytest.raises(CheckpointError, match="UNet cross-attention width"):
        convert(dict(release, sd=build_tiny_stable_diffusion(cross_attention_dim=16)))
    with pytest.raises(CheckpointError, match="text_fc_mode"):
        (tmp_path / "bad.json").write_text(json.dumps(dict(release["args"], text_fc_mode="linear")))
        build_gill_model_from_reference(p["ckpt"], str(tmp_path / "bad.json"))


@needs_shared_file(REAL_DECISION)
def test_real_decision_head_file_loads():
    """The released decision head ([2, 4096]) into a GILLModel with the release's LM width (tiny otherwise)."""
    gill = GILLModel(
        lm_input_dim=4096, lm_hidden_dim=4096, vision_dim=8, cond_dim=8, cond_length=2, num_visual_tokens=1,
        retrieval_dim=4, mapper_hidden_dim=8, mapper_encoder_layers=1, mapper_decoder_layers=1, mapper_heads=2,
    ).eval()
    load_reference_decision_head(gill, REAL_DECISION)
    raw = torch.load(REAL_DECISION, map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(gill.decision_head[1].weight, raw["1.weight"])
    torch.testing.assert_close(gill.decision_head[1].bias, raw["1.bias"])
    h = torch.randn(3, 4096)
    torch.testing.assert_close(gill.decide(h), (h @ raw["1.weight"].T + raw["1.bias"]).softmax(-1))
    with pytest.raises(CheckpointError, match=r"\(2, 4096\).*lm_hidden_dim|LM hidden width is 16"):
        load_reference_decision_head(GILLModel(16, 16, 8, 8, cond_length=2, mapper_hidden_dim=8, mapper_heads=2), REAL_DECISION)


@needs_shared_file(REAL_ARGS)
def test_real_model_args_are_supported():
    from gill_pipeline.conversion.convert_original import read_model_args

    args = read_model_args(REAL_ARGS)
    assert args["gen_token_idx"] == list(range(50266, 50274))
