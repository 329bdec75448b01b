"""Hub push/pull through an in-process fake Hub: whole pipelines, learned weights only, model cards, offline cache."""

import json
import logging

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub import constants as hf_constants

from conftest import FAST_CALL, make_pipeline
from fake_hub import FakeHub
from gill_pipeline import GILLPipeline
from gill_pipeline.constants import LEARNED_WEIGHTS_MANIFEST_FILE
from gill_pipeline.serialization.base_models import record_base_models
from gill_pipeline.serialization.hub import HubLoadError, push_folder_to_hub
from gill_pipeline.serialization.model_card import ModelCardInfo

TOKEN = "hf_fake_token"
BASE = {"llm": "tiny/opt", "stable_diffusion": "tiny/sd", "image_encoder": "tiny/clip"}
PROMPT = ["This is my dog.", "Show me"]
CALL = dict(FAST_CALL, min_text_tokens=1, img_logit_scale=100.0, max_images=1)
INFO = ModelCardInfo(datasets=["cc3m"], metrics={"clip_similarity": 0.641}, metrics_source="a test")


def run(pipe):
    out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **CALL)
    images = [image.image for image in out.gill_images[0]]
    return out.texts[0], images


def assert_same_outputs(a, b):
    assert a[0] == b[0]
    assert len(a[1]) == len(b[1]) > 0
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def pipe():
    return make_pipeline("opt")


@pytest.fixture(scope="module")
def expected(pipe):
    return run(pipe)


@pytest.fixture(scope="module")
def hub(pipe, tmp_path_factory):
    """A fake Hub holding the tiny base models under `BASE`'s ids; yields (hub, cache_dir)."""
    root = tmp_path_factory.mktemp("bases")
    with FakeHub() as fake:
        pipe.llm.save_pretrained(root / "opt")
        pipe.tokenizer.save_pretrained(root / "opt")
        push_folder_to_hub(str(root / "opt"), BASE["llm"], token=TOKEN)
        for name in ("vae", "unet", "scheduler"):
            getattr(pipe, name).save_pretrained(root / "sd" / name)
        push_folder_to_hub(str(root / "sd"), BASE["stable_diffusion"], token=TOKEN)
        pipe.image_encoder.save_pretrained(root / "clip")
        push_folder_to_hub(str(root / "clip"), BASE["image_encoder"], token=TOKEN)
        yield fake, str(tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture(scope="module")
def pushed(pipe, hub):
    """Pushes the whole pipeline and its learned weights once; returns the commit URLs."""
    fake, _ = hub
    whole = pipe.push_to_hub("org/gill-whole", token=TOKEN, card_info=INFO)
    learned = pipe.push_learned_weights("org/gill-learned", token=TOKEN, base_models=BASE, card_info=INFO)
    return whole, learned


def test_push_whole_pipeline_and_pull_it_back(pipe, expected, hub, pushed):
    fake, cache = hub
    files = fake.files("org/gill-whole")
    assert "model_index.json" in files and "gill/diffusion_pytorch_model.safetensors" in files
    assert "llm/config.json" in files and "README.md" in files
    loaded = GILLPipeline.from_pretrained("org/gill-whole", cache_dir=cache)
    loaded.set_progress_bar_config(disable=True)
    assert_same_outputs(run(loaded), expected)
    # Downloads say which library asks.
    assert any(m == "GET" and "/resolve/" in p for m, p, _ in fake.requests)


def test_push_learned_weights_only_is_small_and_records_base_models(hub, pushed):
    fake, _ = hub
    files = fake.files("org/gill-learned")
    assert not any(p.startswith(("llm/", "unet/", "vae/", "image_encoder/")) for p in files)
    assert "model_index.json" not in files
    manifest = json.loads(files[LEARNED_WEIGHTS_MANIFEST_FILE])
    assert {role: entry["repo_id"] for role, entry in manifest["base_models"].items()} == BASE
    assert manifest["img_tokens"] == [f"[IMG{i}]" for i in range(len(manifest["img_token_ids"]))]
    whole_size = sum(len(c) for c in fake.files("org/gill-whole").values())
    assert sum(len(c) for c in files.values()) < whole_size / 2


def test_pull_learned_weights_loads_recorded_base_models(expected, hub, pushed):
    fake, cache = hub
    loaded = GILLPipeline.from_pretrained("org/gill-learned", cache_dir=cache, token=TOKEN)
    loaded.set_progress_bar_config(disable=True)
    assert_same_outputs(run(loaded), expected)
    assert loaded.config.base_models["llm"]["repo_id"] == BASE["llm"]
    requested = " ".join(fake.requested_paths())
    for repo in BASE.values():
        assert repo in requested


def test_pull_learned_weights_with_components_passed_in(pipe, expected, hub, pushed):
    _, cache = hub
    loaded = GILLPipeline.from_pretrained(
        "org/gill-learned", cache_dir=cache, llm=pipe.llm, image_encoder=pipe.image_encoder, vae=pipe.vae, unet=pipe.unet
    )
    assert loaded.llm is pipe.llm
    loaded.set_progress_bar_config(disable=True)
    assert_same_outputs(run(loaded), expected)
    text_only = GILLPipeline.from_pretrained("org/gill-learned", cache_dir=cache, llm=pipe.llm, vae=None, unet=None)
    assert text_only.unet is None and text_only.scheduler is None


def test_dtype_passes_through(hub, pushed):
    _, cache = hub
    loaded = GILLPipeline.from_pretrained("org/gill-learned", cache_dir=cache, dtype=torch.bfloat16)
    assert loaded.llm.dtype == torch.bfloat16 and loaded.gill.dtype == torch.bfloat16
    assert loaded.unet.dtype == torch.bfloat16


def test_revision_of_learned_weights(pipe, hub, pushed):
    fake, cache = hub
    first = fake.head_sha("org/gill-learned")
    other = make_pipeline("opt", seed=1)
    other.push_learned_weights("org/gill-learned", token=TOKEN, base_models=BASE)
    latest = GILLPipeline.from_pretrained("org/gill-learned", cache_dir=cache, llm=pipe.llm)
    old = GILLPipeline.from_pretrained("org/gill-learned", cache_dir=cache, llm=pipe.llm, revision=first)
    torch.testing.assert_close(old.gill.logit_scale, pipe.gill.logit_scale)
    assert not torch.equal(latest.gill.mapper.query_embs, pipe.gill.mapper.query_embs)
    torch.testing.assert_close(old.gill.mapper.query_embs, pipe.gill.mapper.query_embs)
    pipe.push_learned_weights("org/gill-learned", token=TOKEN, base_models=BASE, card_info=INFO)  # restore


@pytest.mark.parametrize("repo", ["org/gill-whole", "org/gill-learned"])
def test_model_card_is_present_and_parses(hub, pushed, repo, tmp_path):
    fake, _ = hub
    path = tmp_path / "README.md"
    path.write_bytes(fake.files(repo)["README.md"])
    card = ModelCard.load(path)
    assert card.data.library_name == "gill_pipeline"
    assert card.data.pipeline_tag == "any-to-any"
    assert "gill" in card.data.tags
    assert card.data.datasets == ["cc3m"]
    assert "clip_similarity" in card.text and "0.641" in card.text
    assert f'GILLPipeline.from_pretrained("{repo}"' in card.text
    if repo == "org/gill-learned":
        assert sorted(card.data.base_model) == sorted(BASE.values())


def test_offline_warm_cache_works_and_cold_cache_names_the_repo(expected, hub, pushed, monkeypatch, tmp_path):
    _, cache = hub
    # Warm the cache for both repos while the fake Hub answers (earlier tests may have already).
    GILLPipeline.from_pretrained("org/gill-whole", cache_dir=cache)
    GILLPipeline.from_pretrained("org/gill-learned", cache_dir=cache)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    for repo in ("org/gill-whole", "org/gill-learned"):
        loaded = GILLPipeline.from_pretrained(repo, cache_dir=cache)
        loaded.set_progress_bar_config(disable=True)
        assert_same_outputs(run(loaded), expected)
        with pytest.raises(HubLoadError, match=repo) as error:
            GILLPipeline.from_pretrained(repo, cache_dir=str(tmp_path / "cold"))
        assert "HF_HUB_OFFLINE" in str(error.value)


def test_local_files_only_with_cold_base_model_cache_names_the_base_model(hub, pushed, tmp_path):
    _, cache = hub
    import shutil

    from huggingface_hub import snapshot_download

    learned = snapshot_download("org/gill-learned", cache_dir=cache)
    local = tmp_path / "learned"
    shutil.copytree(learned, local)
    with pytest.raises(HubLoadError, match="tiny/opt") as error:
        GILLPipeline.from_pretrained(str(local), cache_dir=str(tmp_path / "cold"), local_files_only=True)
    assert "base LM" in str(error.value)


def test_learned_weights_without_record_ask_for_the_model(pipe, tmp_path):
    folder = pipe.save_learned_weights(tmp_path / "learned")
    with pytest.raises(ValueError, match="`llm=`"):
        GILLPipeline.from_pretrained(folder)
    with pytest.raises(TypeError, match="unknown_argument"):
        GILLPipeline.from_pretrained(folder, llm=pipe.llm, unknown_argument=1)


def test_learned_weights_refuse_a_base_model_that_does_not_fit(pipe, tmp_path):
    folder = pipe.save_learned_weights(tmp_path / "learned")
    llama = make_pipeline("llama")
    with pytest.raises(ValueError, match="not the LM they were trained with|untied"):
        GILLPipeline.from_pretrained(folder, llm=llama.llm, vae=None, unet=None, image_encoder=None)


def test_record_base_models_from_ids_and_objects(pipe, tmp_path):
    record = record_base_models("org/lm", "org/sd", "org/clip", revision="v1")
    assert record["llm"] == {"repo_id": "org/lm", "revision": "v1"}
    assert record["image_encoder"]["class_name"] == "CLIPVisionModel"
    assert record_base_models(pipe.llm, None, pipe.image_encoder)["llm"] is None
    assert record_base_models(str(tmp_path), None, None)["llm"] is None  # a local path cannot be shared


def test_a_recorded_base_model_of_the_wrong_kind_is_named(pipe, hub, pushed, tmp_path):
    _, cache = hub
    # The LM recorded is a CLIP vision repo: named before any weight is downloaded.
    folder = pipe.save_learned_weights(tmp_path / "lm_is_clip", base_models=dict(BASE, llm=BASE["image_encoder"]))
    with pytest.raises(HubLoadError, match=r"base LM 'tiny/clip'.*not a causal LM.*model_type 'clip_vision_model'"):
        GILLPipeline.from_pretrained(folder, cache_dir=cache)
    # The vision encoder recorded is the OPT repo.
    folder = pipe.save_learned_weights(tmp_path / "clip_is_lm", base_models=dict(BASE, image_encoder=BASE["llm"]))
    with pytest.raises(HubLoadError, match=r"base vision encoder 'tiny/opt'.*Wrong kind of model.*model_type 'opt'"):
        GILLPipeline.from_pretrained(folder, cache_dir=cache, llm=pipe.llm, vae=None, unet=None)
    # Stable Diffusion recorded as the OPT repo: no vae/ there.
    folder = pipe.save_learned_weights(tmp_path / "sd_is_lm", base_models=dict(BASE, stable_diffusion=BASE["llm"]))
    with pytest.raises(HubLoadError, match=r"base Stable Diffusion vae 'tiny/opt'"):
        GILLPipeline.from_pretrained(folder, cache_dir=cache, llm=pipe.llm, image_encoder=None)


# --------------------------------------------------------------------------------------------------------------
# Pushing never loses what a repo already holds
# --------------------------------------------------------------------------------------------------------------
USER_CARD = b"# My GILL\n\nNotes the user wrote on the Hub.\n"


def seed_repo(repo_id: str, files: dict[str, bytes]) -> None:
    """A repo holding `files`, made with huggingface_hub alone (not with the code under test)."""
    api = HfApi(token=TOKEN)
    api.create_repo(repo_id, exist_ok=True)
    api.create_commit(
        repo_id, [CommitOperationAdd(path, content) for path, content in files.items()], commit_message="user files"
    )


def small_folder(root, files: dict[str, str]) -> str:
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return str(root)


def test_push_keeps_remote_files_and_the_remote_card_by_default(tmp_path):
    folder = small_folder(tmp_path, {"gill/config.json": "{}", "README.md": "our generated card"})
    with FakeHub() as fake:
        seed_repo("org/keep", {"README.md": USER_CARD, "notes.txt": b"mine", "extra/other.safetensors": b"w"})
        push_folder_to_hub(folder, "org/keep", token=TOKEN)
        files = fake.files("org/keep")
    assert files["notes.txt"] == b"mine" and files["extra/other.safetensors"] == b"w"
    assert files["README.md"] == USER_CARD  # the user's card is not overwritten
    assert files["gill/config.json"] == b"{}" and ".gitattributes" in files


def test_push_writes_our_card_where_the_repo_has_none_and_overwrites_only_when_asked(tmp_path):
    folder = small_folder(tmp_path, {"gill/config.json": "{}", "README.md": "our generated card"})
    with FakeHub() as fake:
        push_folder_to_hub(folder, "org/card", token=TOKEN)
        assert fake.files("org/card")["README.md"] == b"our generated card"
        seed_repo("org/card", {"README.md": USER_CARD})
        push_folder_to_hub(folder, "org/card", token=TOKEN)
        assert fake.files("org/card")["README.md"] == USER_CARD
        push_folder_to_hub(folder, "org/card", token=TOKEN, overwrite_model_card=True)
        assert fake.files("org/card")["README.md"] == b"our generated card"


def test_delete_remote_files_is_explicit_and_names_what_it_deletes(tmp_path, caplog):
    folder = small_folder(tmp_path, {"gill/config.json": "{}"})
    with FakeHub() as fake:
        seed_repo("org/delete", {"notes.txt": b"mine", "extra/other.safetensors": b"w", "README.md": USER_CARD})
        with caplog.at_level(logging.WARNING, logger="gill_pipeline.serialization.hub"):
            push_folder_to_hub(folder, "org/delete", token=TOKEN, delete_remote_files=True)
        files = fake.files("org/delete")
    assert sorted(files) == [".gitattributes", "README.md", "gill/config.json"]  # the card only goes when asked
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "notes.txt" in logged and "extra/other.safetensors" in logged and "org/delete" in logged


def test_old_replace_argument_still_works_with_a_warning(tmp_path):
    folder = small_folder(tmp_path, {"gill/config.json": "{}"})
    with FakeHub() as fake:
        seed_repo("org/replace", {"notes.txt": b"mine"})
        with pytest.warns(FutureWarning, match="delete_remote_files"):
            push_folder_to_hub(folder, "org/replace", token=TOKEN, replace=False)
        assert "notes.txt" in fake.files("org/replace")
        with pytest.warns(FutureWarning, match="delete_remote_files"):
            push_folder_to_hub(folder, "org/replace", token=TOKEN, replace=True)
        assert "notes.txt" not in fake.files("org/replace")


def test_pipeline_push_keeps_the_users_card_and_files(pipe, expected, hub):
    fake, cache = hub
    seed_repo("org/gill-user", {"README.md": USER_CARD, "samples/cat.png": b"png"})
    pipe.push_to_hub("org/gill-user", token=TOKEN, card_info=INFO)
    files = fake.files("org/gill-user")
    assert files["README.md"] == USER_CARD and files["samples/cat.png"] == b"png"
    loaded = GILLPipeline.from_pretrained("org/gill-user", cache_dir=cache)
    loaded.set_progress_bar_config(disable=True)
    assert_same_outputs(run(loaded), expected)


def test_a_push_that_would_mix_formats_is_refused_before_any_commit(pipe, hub, pushed):
    fake, cache = hub
    # Learned weights onto a repo that holds a whole pipeline: its model_index.json would win at load time.
    commits = len(fake.repos["org/gill-whole"].commits)
    with pytest.raises(ValueError, match=r"org/gill-whole.*model_index\.json.*delete_remote_files=True"):
        pipe.push_learned_weights("org/gill-whole", token=TOKEN, base_models=BASE)
    assert len(fake.repos["org/gill-whole"].commits) == commits
    # Asked for, the repo becomes a learned-weights repo and loads as one.
    seed_repo("org/gill-switch", fake.files("org/gill-whole"))
    pipe.push_learned_weights("org/gill-switch", token=TOKEN, base_models=BASE, delete_remote_files=True)
    files = fake.files("org/gill-switch")
    assert LEARNED_WEIGHTS_MANIFEST_FILE in files and "model_index.json" not in files
    assert not any(p.startswith("llm/") for p in files)
    loaded = GILLPipeline.from_pretrained("org/gill-switch", cache_dir=cache, llm=pipe.llm)
    assert loaded.llm is pipe.llm


def test_a_stale_lora_adapter_on_the_repo_is_refused(pipe, hub, tmp_path):
    fake, _ = hub
    seed_repo("org/gill-lora", {"llm_lora/adapter_config.json": b"{}", "llm_lora/adapter_model.safetensors": b"x"})
    with pytest.raises(ValueError, match=r"llm_lora/adapter_config\.json"):
        pipe.push_learned_weights("org/gill-lora", token=TOKEN, base_models=BASE)
