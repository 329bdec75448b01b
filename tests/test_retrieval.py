"""Retrieval: building, saving, loading and searching an index; safe image loading; the retrieve-or-generate
decision and `image_mode` in the pipeline. Everything offline, on images made here."""

import copy
import importlib.util
import io
import json
import logging as std_logging
import os
import tarfile

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import FAST_CALL, make_pipeline, random_image
from diffusers.utils import logging as diffusers_logging

from gill_pipeline import GILLImage
from gill_pipeline.retrieval import (
    RETRIEVAL_ID_INFO_KEY,
    CaptionTSVSource,
    ExactSearcher,
    FaissSearcher,
    ImageLoadError,
    IndexWeightsMismatchError,
    RetrievalIndex,
    RetrievalIndexError,
    UnsafeImagePathError,
    build_retrieval_index,
    calibrate_min_similarity,
    embed_images,
    resolve_local_path,
)
from gill_pipeline.retrieval import build as build_module
from gill_pipeline.retrieval import image_loading
from gill_pipeline.retrieval.serialization import INDEX_CONFIG_FILE, PROBE_FILE

SHARED_TSV = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gill_original", "cc3m_val.tsv")
NUM_IMAGES = 12
# Many [IMG] groups, right away: a huge [IMG0] logit scale makes the tiny random LM produce them.
IMAGE_CALL = dict(FAST_CALL, img_logit_scale=1e4, max_images=2)


def write_images(folder, seeds, size=32, captions=True):
    os.makedirs(folder, exist_ok=True)
    for seed in seeds:
        random_image(seed, size=size).save(os.path.join(folder, f"img{seed:03d}.png"))
        if captions:
            with open(os.path.join(folder, f"img{seed:03d}.txt"), "w") as f:
                f.write(f"caption {seed}")
    return folder


@pytest.fixture(scope="module")
def pipe():
    """A pipeline of our own: the tests set its retrieval index and decision head."""
    pipe = make_pipeline("opt")
    pipe.gill.eval()
    return pipe


@pytest.fixture(scope="module")
def built(pipe, tmp_path_factory):
    """(index folder, image folder) of an index built from NUM_IMAGES images saved in the same folder."""
    folder = write_images(str(tmp_path_factory.mktemp("photos")), range(NUM_IMAGES))
    build_retrieval_index(pipe, folder, folder, batch_size=5, progress=False)
    return folder


@pytest.fixture
def with_index(pipe, built):
    pipe.load_retrieval_index(built)
    yield pipe
    pipe.retrieval_index = None


@pytest.fixture
def decision(pipe):
    """Sets the decision head by hand: `decision("retrieve")` makes every [IMG] group retrieve, and so on."""
    head = pipe.gill.decision_head[1]
    saved = {k: v.clone() for k, v in head.state_dict().items()}

    def set_choice(choice):
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([5.0, -5.0] if choice == "generate" else [-5.0, 5.0]))

    yield set_choice
    head.load_state_dict(saved)


@pytest.fixture
def warnings_of_retrieval(caplog):
    """Captures the library's warnings (diffusers' loggers do not propagate to the root logger by default)."""
    library = std_logging.getLogger("gill_pipeline")
    library.addHandler(caplog.handler)
    diffusers_logging.enable_propagation()
    yield caplog
    library.removeHandler(caplog.handler)
    diffusers_logging.disable_propagation()


def random_unit_rows(n, dim, seed):
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def index_of(pipe, n, dim=None, dtype=torch.float32, seed=0, image_root=None, prefix="r"):
    """An index of `n` random unit rows (no images) in `pipe`'s retrieval space, with ids `{prefix}0`, ..."""
    index = RetrievalIndex.empty(pipe, dtype=dtype, image_root=image_root)
    rows = random_unit_rows(n, dim or pipe.gill.config.retrieval_dim, seed)
    index.add_embeddings(rows, [{"id": f"{prefix}{i}", "path": f"{prefix}{i}.png"} for i in range(n)])
    return index


def img_hidden_for(pipe, seed=0, n=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, pipe.num_img_tokens, pipe.gill.config.lm_hidden_dim, generator=generator)


# ------------------------------------------------------------------------------------------------------------------
# Build, save, load
# ------------------------------------------------------------------------------------------------------------------
def test_build_save_load_round_trip(pipe, built):
    index = RetrievalIndex.from_pretrained(built)
    assert len(index) == NUM_IMAGES and index.dim == pipe.gill.config.retrieval_dim
    assert index.dtype == torch.float16 and index.image_root == built
    assert index.records[3] == {"id": "img003.png", "path": "img003.png", "caption": "caption 3"}
    files = set(os.listdir(built))
    assert {INDEX_CONFIG_FILE, PROBE_FILE, "embeddings-00000.safetensors", "metadata-00000.jsonl"} <= files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".pkl", ".npy", ".tmp"))]
    # Stored rows are the normalised image-side embeddings of the images, in fp16.
    images = [PIL.Image.open(os.path.join(built, f"img{i:03d}.png")).convert("RGB") for i in range(NUM_IMAGES)]
    expected = embed_images(pipe, images)
    torch.testing.assert_close(index.embeddings.float(), expected, atol=2e-3, rtol=0)
    torch.testing.assert_close(index.embeddings.float().norm(dim=-1), torch.ones(NUM_IMAGES), atol=2e-3, rtol=0)
    # Each image finds itself first.
    result = index.search(expected, k=3)
    assert result.rows[:, 0].tolist() == list(range(NUM_IMAGES))
    assert (result.scores[:, :-1] >= result.scores[:, 1:]).all()


def test_shards_and_fp32_round_trip(pipe, tmp_path):
    index = index_of(pipe, 23, dtype=torch.float32)
    index.save_pretrained(tmp_path, max_shard_rows=10)
    config = json.loads((tmp_path / INDEX_CONFIG_FILE).read_text())
    assert [s["num_rows"] for s in config["shards"]] == [10, 10, 3]
    assert config["dtype"] == "float32" and config["weights"]["retrieval_dim"] == index.dim
    loaded = RetrievalIndex.from_pretrained(tmp_path)
    assert torch.equal(loaded.embeddings, index.embeddings) and loaded.records == index.records


def test_loading_refuses_malformed_folders(pipe, tmp_path):
    with pytest.raises(RetrievalIndexError, match="has no retrieval_index.json"):
        RetrievalIndex.from_pretrained(tmp_path)
    index_of(pipe, 4).save_pretrained(tmp_path)
    config = json.loads((tmp_path / INDEX_CONFIG_FILE).read_text())
    config["shards"][0]["embeddings"] = "../elsewhere.safetensors"
    (tmp_path / INDEX_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(RetrievalIndexError, match="plain file names"):
        RetrievalIndex.from_pretrained(tmp_path)
    config["shards"][0]["embeddings"] = "embeddings-00000.safetensors"
    config["shards"][0]["num_rows"] = 5
    (tmp_path / INDEX_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(RetrievalIndexError, match="5 rows"):
        RetrievalIndex.from_pretrained(tmp_path)


def test_duplicate_ids_are_an_error(pipe):
    index = index_of(pipe, 3)
    with pytest.raises(ValueError, match="'r1' is already in the index"):
        index.add_embeddings(random_unit_rows(1, index.dim, 1), [{"id": "r1", "path": "x.png"}])


def test_build_from_caption_tsv(pipe, tmp_path):
    write_images(str(tmp_path / "images"), range(4), captions=False)
    lines = ["caption\timage"] + [f"a picture number {i}\timg{i:03d}" for i in range(4)] + ["gone\timg999"]
    (tmp_path / "captions.tsv").write_text("\n".join(lines) + "\n")
    source = CaptionTSVSource(tmp_path / "captions.tsv", image_root=tmp_path / "images", image_suffix=".png")
    index = build_retrieval_index(pipe, source, tmp_path / "index", progress=False, num_workers=0)
    # The missing image is skipped; the others carry their captions.
    assert index.ids == [f"img{i:03d}" for i in range(4)]
    assert index.records[2]["caption"] == "a picture number 2" and index.records[2]["path"] == "img002.png"
    loaded = RetrievalIndex.from_pretrained(tmp_path / "index", image_root=tmp_path / "images")
    assert np.array_equal(np.asarray(loaded.load_image(loaded.records[1])), np.asarray(random_image(1)))


@pytest.mark.skipif(not os.path.isfile(SHARED_TSV), reason=f"needs {os.path.normpath(SHARED_TSV)} (../shared, as in CI)")
def test_reads_the_reference_caption_file_format():
    records = list(CaptionTSVSource(SHARED_TSV))
    assert records and records[0]["id"] == "0_1595581236"
    assert records[0]["caption"] == "author : a life in photography -- in pictures"
    with pytest.raises(ValueError, match="`image_column`='url' is not a column"):
        CaptionTSVSource(SHARED_TSV, image_column="url")


def test_build_from_webdataset_shards(pipe, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(2):
        with tarfile.open(shards / f"{shard:05d}.tar", "w") as tar:
            for i in range(3):
                key, seed = f"s{shard}_{i}", 10 * shard + i
                buffer = io.BytesIO()
                random_image(seed).save(buffer, format="PNG")
                for suffix, data in (("png", buffer.getvalue()), ("txt", f"caption {seed}".encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    index = build_retrieval_index(pipe, str(shards), tmp_path / "index", progress=False)
    assert len(index) == 6 and index.records[4]["id"] == "s1_1" and index.records[4]["caption"] == "caption 11"
    loaded = RetrievalIndex.from_pretrained(tmp_path / "index", image_root=shards)
    # Images are read in place from the tar shards.
    assert np.array_equal(np.asarray(loaded.load_image(loaded.records[4])), np.asarray(random_image(11)))


def test_adding_images_writes_only_new_shards(pipe, tmp_path):
    folder = write_images(str(tmp_path), range(6))
    first = build_retrieval_index(pipe, folder, folder, progress=False)
    first_shard = os.path.join(folder, "embeddings-00000.safetensors")
    before = (os.path.getmtime(first_shard), first.embeddings.clone())
    write_images(folder, range(6, 10))
    grown = build_retrieval_index(pipe, folder, folder, progress=False)
    assert len(grown) == 10 and grown.ids[:6] == first.ids
    assert torch.equal(grown.embeddings[:6], before[1])
    config = json.loads(open(os.path.join(folder, INDEX_CONFIG_FILE)).read())
    assert [s["num_rows"] for s in config["shards"]] == [6, 4]
    assert os.path.getmtime(first_shard) == before[0]
    assert len(RetrievalIndex.from_pretrained(folder)) == 10


def test_build_resumes_after_an_interruption(pipe, tmp_path, monkeypatch):
    folder = write_images(str(tmp_path / "photos"), range(10))
    reference = build_retrieval_index(pipe, folder, tmp_path / "reference", batch_size=3, progress=False)
    embedded, calls = [], {"n": 0}
    real = build_module.embed_images

    def flaky(pipe, images, device=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        embedded.extend(images)
        return real(pipe, images, device)

    monkeypatch.setattr(build_module, "embed_images", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_retrieval_index(pipe, folder, tmp_path / "index", batch_size=3, max_shard_rows=3, progress=False)
    assert len(RetrievalIndex.from_pretrained(tmp_path / "index")) == 6
    index = build_retrieval_index(pipe, folder, tmp_path / "index", batch_size=3, max_shard_rows=3, progress=False)
    # Only the 4 images not saved before the interruption were embedded again.
    assert len(embedded) == 6 + 4 and len(index) == 10
    assert index.ids == reference.ids
    torch.testing.assert_close(index.embeddings, reference.embeddings, atol=1e-3, rtol=0)


def _folder_files(folder):
    """The files of an index folder, and the ones its config names (shards, config, probes)."""
    config = json.loads(open(os.path.join(folder, INDEX_CONFIG_FILE)).read())
    keys = ("embeddings", "metadata", "row_index")
    named = {INDEX_CONFIG_FILE, PROBE_FILE, config["sorted_ids"]} | {s[key] for s in config["shards"] for key in keys}
    return set(os.listdir(folder)), named


def test_a_dtype_change_saved_in_place_rewrites_every_shard(pipe, tmp_path):
    index_of(pipe, 5, dtype=torch.float16).save_pretrained(tmp_path, max_shard_rows=2)
    loaded = RetrievalIndex.from_pretrained(tmp_path, image_root=str(tmp_path))
    loaded.to(dtype=torch.float32)
    loaded.add_embeddings(random_unit_rows(1, loaded.dim, 9), [{"id": "new", "path": "new.png"}])
    loaded.save_pretrained(tmp_path, max_shard_rows=2)
    again = RetrievalIndex.from_pretrained(tmp_path, image_root=str(tmp_path))
    assert again.dtype == torch.float32 and again.ids == loaded.ids
    assert torch.equal(again.embeddings, loaded.embeddings)
    # No shard of the old dtype is left behind.
    files, named = _folder_files(tmp_path)
    assert files == named
    # And back to fp16, in place, from the object that wrote the fp32 shards.
    again.to(dtype=torch.float16).save_pretrained(tmp_path)
    assert RetrievalIndex.from_pretrained(tmp_path, image_root=str(tmp_path)).dtype == torch.float16
    # A round trip through fp16 rounds the rows: saved again, the folder holds the rounded rows, as in memory.
    index_of(pipe, 3, dtype=torch.float32).save_pretrained(tmp_path)
    rounded = RetrievalIndex.from_pretrained(tmp_path, image_root=str(tmp_path))
    rounded.to(dtype=torch.float16).to(dtype=torch.float32).save_pretrained(tmp_path)
    assert torch.equal(RetrievalIndex.from_pretrained(tmp_path, image_root=str(tmp_path)).embeddings, rounded.embeddings)


def test_saving_in_place_after_another_index_was_saved_there_rewrites(pipe, tmp_path):
    index_of(pipe, 4).save_pretrained(tmp_path, max_shard_rows=2)
    mine = RetrievalIndex.from_pretrained(tmp_path, image_root=str(tmp_path))
    # Another index takes the folder: other rows of the same width, then another width.
    narrow = RetrievalIndex(random_unit_rows(3, 8, 6), [{"id": f"o{i}", "path": f"o{i}.png"} for i in range(3)],
                            {"retrieval_dim": 8}, {})
    for other in (index_of(pipe, 4, seed=5, prefix="o"), narrow):
        other.save_pretrained(tmp_path, max_shard_rows=3)
        mine.save_pretrained(tmp_path, max_shard_rows=2)
        again = RetrievalIndex.from_pretrained(tmp_path, image_root=str(tmp_path))
        assert again.ids == mine.ids and torch.equal(again.embeddings, mine.embeddings)
        files, named = _folder_files(tmp_path)
        assert files == named


def test_settings_changed_in_place_survive_an_incremental_save(pipe, tmp_path):
    index_of(pipe, 4).save_pretrained(tmp_path, max_shard_rows=2)
    first_shard = os.path.join(tmp_path, "embeddings-00000.safetensors")
    mtime = os.path.getmtime(first_shard)
    loaded = RetrievalIndex.from_pretrained(tmp_path, image_root=str(tmp_path))
    loaded.min_similarity = 0.3
    has_faiss = importlib.util.find_spec("faiss") is not None
    if has_faiss:
        loaded.use_faiss("Flat")  # saved with the set (its own files), read back without a rebuild
    loaded.add_embeddings(random_unit_rows(1, loaded.dim, 9), [{"id": "new", "path": "new.png"}])
    loaded.save_pretrained(tmp_path, max_shard_rows=2)
    assert os.path.getmtime(first_shard) == mtime, "same dtype and rows: only the new rows are written"
    again = RetrievalIndex.from_pretrained(tmp_path, image_root=str(tmp_path))
    assert again.min_similarity == 0.3 and again.ids == loaded.ids
    assert again.search_backend == ("faiss:Flat" if has_faiss else "exact")
    assert torch.equal(again.embeddings, loaded.embeddings)


@pytest.mark.parametrize("change", ["dtype", "other index"])
def test_an_interrupted_save_leaves_the_previous_index_readable(pipe, tmp_path, monkeypatch, change):
    previous = index_of(pipe, 4, dtype=torch.float16)
    previous.save_pretrained(tmp_path, max_shard_rows=2)
    if change == "dtype":
        index = RetrievalIndex.from_pretrained(tmp_path, image_root=str(tmp_path)).to(dtype=torch.float32)
    else:
        index = index_of(pipe, 4, dtype=torch.float16, seed=7, prefix="o")
    real_replace, calls = os.replace, {"n": 0}

    def replace_then_fail(source, target):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_then_fail)
    with pytest.raises(KeyboardInterrupt):
        index.save_pretrained(tmp_path, max_shard_rows=2)
    monkeypatch.setattr(os, "replace", real_replace)
    loaded = RetrievalIndex.from_pretrained(tmp_path, image_root=str(tmp_path))
    assert loaded.dtype == torch.float16 and loaded.ids == previous.ids
    assert torch.equal(loaded.embeddings, previous.embeddings)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    # Saving again completes the change.
    index.save_pretrained(tmp_path, max_shard_rows=2)
    loaded = RetrievalIndex.from_pretrained(tmp_path, image_root=str(tmp_path))
    assert loaded.ids == index.ids and torch.equal(loaded.embeddings, index.embeddings)
    files, named = _folder_files(tmp_path)
    assert files == named


# ------------------------------------------------------------------------------------------------------------------
# Search
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_exact_search_equals_full_product(dtype):
    rows = random_unit_rows(3000, 32, 0)
    queries = random_unit_rows(7, 32, 1)
    searcher = ExactSearcher(rows.to(dtype), max_scores_in_memory=7 * 250)  # 12 chunks
    result = searcher.search(queries, k=10)
    expected = (queries @ rows.to(dtype).float().t()).topk(10, dim=1)
    assert torch.equal(result.rows, expected.indices)
    torch.testing.assert_close(result.scores, expected.values, atol=1e-5, rtol=0)
    assert ExactSearcher(rows[:4]).search(queries, k=6).rows[:, 4:].eq(-1).all()


@pytest.mark.parametrize(
    "factory, params, min_agreement",
    [("Flat", {}, 1.0), ("IVF16,Flat", {"nprobe": 16}, 1.0), ("HNSW32", {"ef_search": 128}, 0.95)],
)
def test_faiss_top10_agrees_with_exact_search(pipe, factory, params, min_agreement):
    pytest.importorskip("faiss")
    index = index_of(pipe, 4000, seed=2)
    queries = random_unit_rows(200, index.dim, 3)
    exact = index.search(queries, k=10)
    assert index.search_backend == "exact"
    index.use_faiss(factory, **params)
    approx = index.search(queries, k=10)
    agree = [set(a) == set(b) for a, b in zip(exact.rows.tolist(), approx.rows.tolist())]
    assert np.mean(agree) >= min_agreement
    # The same interface keeps working when rows are added.
    index.add_embeddings(queries[:1], [{"id": "new", "path": "new.png"}])
    assert index.search(queries[:1], k=1).rows.item() == len(index) - 1


def test_missing_faiss_is_a_clear_error(pipe, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)
    with pytest.raises(ImportError, match=r"pip install gill-pipeline\[faiss\]"):
        index_of(pipe, 10).use_faiss()


def test_search_excludes_ids(pipe):
    index = index_of(pipe, 50)
    queries = index.embeddings[:2].clone()
    plain = index.search(queries, k=5)
    assert plain.rows[:, 0].tolist() == [0, 1]
    excluded = index.search(queries, k=5, exclude_ids=[{"r0"}, {"r1", "r7"}])
    assert 0 not in excluded.rows[0] and 1 not in excluded.rows[1] and 7 not in excluded.rows[1]
    assert excluded.rows[0].tolist() == [r for r in index.search(queries[:1], k=6).rows[0].tolist() if r != 0][:5]


# ------------------------------------------------------------------------------------------------------------------
# Loading retrieved images safely
# ------------------------------------------------------------------------------------------------------------------
def test_paths_escaping_the_root_are_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    random_image(0).save(tmp_path / "secret.png")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    for path in ("../secret.png", str(tmp_path / "secret.png"), "sub/../../secret.png", "link.png"):
        with pytest.raises(UnsafeImagePathError, match="Refusing"):
            resolve_local_path(str(root), path)
    assert resolve_local_path(str(root), "sub/../a.png") == os.path.join(os.path.realpath(root), "a.png")


def _index_with_bad_best(pipe, tmp_path, bad_path):
    """An index whose best row for a known query points at `bad_path`; the second best is a real image."""
    root = tmp_path / "root"
    write_images(str(root), [1])
    index = RetrievalIndex.empty(pipe, dtype=torch.float32, image_root=str(root))
    rows = random_unit_rows(2, index.dim, 0)
    index.add_embeddings(rows, [{"id": "bad", "path": bad_path}, {"id": "good", "path": "img001.png"}])
    query = torch.nn.functional.normalize(rows[0] + 0.1 * rows[1], dim=-1)[None]
    assert index.search(query, k=2).rows[0].tolist() == [0, 1]
    return index, query


@pytest.mark.parametrize("bad_path", ["../secret.png", "missing.png", "broken.png", "https://example.com/a.png"])
def test_unloadable_candidate_is_skipped_for_the_next(pipe, tmp_path, warnings_of_retrieval, bad_path, monkeypatch):
    random_image(9).save(tmp_path / "secret.png")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "broken.png").write_bytes(b"not an image")
    monkeypatch.setattr(image_loading, "_download", lambda url, timeout: pytest.fail("downloaded without opt-in"))
    index, query = _index_with_bad_best(pipe, tmp_path, bad_path)
    (found,) = index.retrieve(query)
    assert found.record["id"] == "good" and found.rank == 1 and found.skipped_ids == ["bad"]
    assert np.array_equal(np.asarray(found.image), np.asarray(random_image(1)))
    assert "Skipping retrieval candidate 'bad'" in warnings_of_retrieval.text


def test_urls_load_only_with_opt_in(pipe, tmp_path, monkeypatch):
    buffer = io.BytesIO()
    random_image(5).save(buffer, format="PNG")
    monkeypatch.setattr(image_loading, "_download", lambda url, timeout: buffer.getvalue())
    index, query = _index_with_bad_best(pipe, tmp_path, "https://example.com/a.png")
    assert index.retrieve(query)[0].record["id"] == "good"
    index.allow_urls = True
    (found,) = index.retrieve(query)
    assert found.record["id"] == "bad" and np.array_equal(np.asarray(found.image), np.asarray(random_image(5)))


def test_gives_up_with_an_error_when_nothing_loads(pipe, tmp_path):
    index = RetrievalIndex.empty(pipe, image_root=str(tmp_path))
    index.add_embeddings(random_unit_rows(3, index.dim, 0), [{"id": f"m{i}", "path": f"m{i}.png"} for i in range(3)])
    with pytest.raises(ImageLoadError, match="No image left to retrieve"):
        index.retrieve(random_unit_rows(1, index.dim, 1))


# ------------------------------------------------------------------------------------------------------------------
# Weights the index was built with
# ------------------------------------------------------------------------------------------------------------------
def test_index_from_other_weights_is_an_error(pipe, built):
    other = copy.deepcopy(pipe)
    with torch.no_grad():
        other.gill.ret_image_proj.weight.add_(torch.randn_like(other.gill.ret_image_proj.weight))
    with pytest.raises(IndexWeightsMismatchError, match="built with other learned weights.*SHA-256"):
        other.load_retrieval_index(built)
    assert other.retrieval_index is None


def test_index_from_another_vision_encoder_is_an_error(pipe, built):
    other = copy.deepcopy(pipe)
    with torch.no_grad():
        for p in other.image_encoder.parameters():
            p.add_(0.5 * torch.randn_like(p))
    with pytest.raises(IndexWeightsMismatchError, match="another vision encoder"):
        other.load_retrieval_index(built)


def test_same_weights_in_another_dtype_are_accepted(pipe, built):
    other = copy.deepcopy(pipe)
    with torch.no_grad():
        for p in list(other.gill.ret_image_proj.parameters()) + list(other.image_encoder.parameters()):
            p.copy_(p.bfloat16().float())  # what loading the checkpoint in bf16 does to the weights
    index = other.load_retrieval_index(built)
    other_sha = RetrievalIndex.empty(other).fingerprint["ret_image_proj_sha256"]
    assert index.fingerprint["ret_image_proj_sha256"] != other_sha


def test_retrieval_width_mismatch_is_an_error(pipe, built):
    narrow = make_pipeline("opt", retrieval_dim=8)
    with pytest.raises(IndexWeightsMismatchError, match="16-wide embeddings.*8 wide"):
        narrow.load_retrieval_index(built)


# ------------------------------------------------------------------------------------------------------------------
# In the pipeline
# ------------------------------------------------------------------------------------------------------------------
def _images(output):
    return [x for x in output.outputs[0] if isinstance(x, GILLImage)]


@pytest.mark.parametrize("choice", ["retrieve", "generate"])
def test_decision_head_picks_the_mode(with_index, decision, choice):
    decision(choice)
    images = _images(with_index("Show me", image_mode="auto", **IMAGE_CALL))
    assert images, "the call must produce [IMG] groups"
    expected = "retrieved" if choice == "retrieve" else "generated"
    assert all(image.source == expected for image in images)
    probs = images[0].decision_probs
    assert (probs[1] > 0.99) if choice == "retrieve" else (probs[0] > 0.99)


def test_auto_generates_without_an_index(pipe, decision):
    decision("retrieve")
    assert pipe.retrieval_index is None
    assert all(i.source == "generated" for i in _images(pipe("Show me", image_mode="auto", **IMAGE_CALL)))


@pytest.mark.parametrize("choice", ["retrieve", "generate"])
def test_both_returns_both_candidates(with_index, decision, choice):
    decision(choice)
    images = _images(with_index("Show me", image_mode="both", **IMAGE_CALL))
    assert len(images) == 2
    shown = "retrieved" if choice == "retrieve" else "generated"
    for image in images:
        assert image.source == shown
        (other,) = image.alternatives
        assert other.source == ({"retrieved", "generated"} - {shown}).pop()
        retrieved = image if image.source == "retrieved" else other
        assert retrieved.metadata["id"] in with_index.retrieval_index and retrieved.scores["similarity"]
        assert other.decision_probs == image.decision_probs and other.prompt_embeds_index == image.prompt_embeds_index


def test_retrieved_images_carry_source_scores_and_metadata(with_index, decision):
    decision("retrieve")
    images = _images(with_index("Show me", image_mode="retrieve", **IMAGE_CALL))
    assert len(images) == 2
    ids = [image.metadata["id"] for image in images]
    assert len(set(ids)) == 2, "an image already shown in the answer is not retrieved again"
    index = with_index.retrieval_index
    for image in images:
        assert image.source == "retrieved" and image.metadata["caption"].startswith("caption ")
        stored = index.embeddings[index.row_of(image.metadata["id"])].float()
        assert -1.0 <= image.scores["similarity"][0] <= 1.0 + 1e-3
        assert isinstance(image.image, torch.Tensor) and image.image.shape[0] == 3 and stored.shape[0] == index.dim


def test_images_shown_earlier_or_given_as_input_are_not_retrieved_again(with_index):
    h = img_hidden_for(with_index, seed=3).expand(3, -1, -1)
    # Three groups of one answer with the same query still get three different images, best first.
    first = with_index.retrieve_images(h, [(0, 0), (0, 1), (0, 2)], [["text"]], "pil")
    ids = [image.metadata["id"] for image in first]
    best = with_index.retrieval_index.search(with_index.gill.text_retrieval_embeds(h[:1, 0]), k=3)
    assert ids == [with_index.retrieval_index.records[r]["id"] for r in best.rows[0].tolist()]
    # A retrieved image given back as input is not shown again; another answer of the batch is not affected.
    shown = first[0].image
    assert shown.info[RETRIEVAL_ID_INFO_KEY] == ids[0]
    again = with_index.retrieve_images(h[:2], [(0, 0), (1, 0)], [[shown, "text"], ["text"]], "pil")
    assert again[0].metadata["id"] == ids[1] and again[1].metadata["id"] == ids[0]


def test_output_types_of_retrieved_images(with_index):
    h = img_hidden_for(with_index, seed=4)
    pil = with_index.retrieve_images(h, [(0, 0)], [["t"]], "pil")[0].image
    array = with_index.retrieve_images(h, [(0, 0)], [["t"]], "np")[0].image
    tensor = with_index.retrieve_images(h, [(0, 0)], [["t"]], "pt")[0].image
    assert isinstance(pil, PIL.Image.Image) and array.shape == (32, 32, 3) and tensor.shape == (3, 32, 32)
    np.testing.assert_allclose(array, np.asarray(pil) / 255.0, atol=1e-6)
    np.testing.assert_allclose(tensor.permute(1, 2, 0).numpy(), array, atol=1e-6)


def test_image_modes_needing_an_index_are_checked(pipe):
    for mode in ("retrieve", "both"):
        with pytest.raises(ValueError, match=f"`image_mode='{mode}'` needs a retrieval set"):
            pipe("Show me", image_mode=mode, **IMAGE_CALL)


def test_generated_candidates_are_ranked_by_similarity(pipe, decision):
    decision("generate")
    images = _images(pipe("Show me", image_mode="generate", num_images_per_prompt=3, **IMAGE_CALL))
    similarity = images[0].scores["similarity"]
    assert len(similarity) == 3 and similarity == sorted(similarity, reverse=True)
    assert len(images[0].candidates) == 3


# ------------------------------------------------------------------------------------------------------------------
# Hub
# ------------------------------------------------------------------------------------------------------------------
def test_push_and_load_through_the_hub(pipe, built, tmp_path):
    from fake_hub import FakeHub

    index = RetrievalIndex.from_pretrained(built)
    with FakeHub() as hub:
        index.push_to_hub("org/photos-index", include_images=True, token="fake")
        assert {INDEX_CONFIG_FILE, "img003.png"} <= set(hub.files("org/photos-index"))
        pipe.load_retrieval_index("org/photos-index", cache_dir=str(tmp_path / "cache"))
    try:
        loaded = pipe.retrieval_index
        assert loaded.ids == index.ids and torch.equal(loaded.embeddings, index.embeddings)
        # The images came along, inside the snapshot: retrieval reads them there.
        (found,) = loaded.retrieve(index.embeddings[3:4].float())
        assert found.record["id"] == "img003.png" and loaded.image_root.startswith(str(tmp_path / "cache"))
    finally:
        pipe.retrieval_index = None


# ------------------------------------------------------------------------------------------------------------------
# An answer asking for more images than the retrieval set can give
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def two_image_index(pipe, tmp_path):
    folder = write_images(str(tmp_path / "two"), range(2))
    build_retrieval_index(pipe, folder, folder, progress=False)
    pipe.load_retrieval_index(folder)
    yield pipe
    pipe.retrieval_index = None


def test_retrieval_running_out_falls_back_to_generation(two_image_index, decision):
    decision("retrieve")
    out = two_image_index("Show me", image_mode="retrieve", **dict(IMAGE_CALL, max_images=3))
    images = out.gill_images[0]
    assert [image.source for image in images] == ["retrieved", "retrieved", "generated"]
    assert "fallback" in images[2].metadata and images[2].decision_probs[1] > 0.99
    assert len(out.warnings[0]) == 1 and "no image left" in out.warnings[0][0]
    assert out.texts[0] is not None and len(out.images) == 3


def test_retrieval_running_out_without_a_decoder_keeps_the_text(two_image_index, decision):
    decision("retrieve")
    unet, vae = two_image_index.unet, two_image_index.vae
    two_image_index.unet = two_image_index.vae = None  # a retrieval-only pipeline
    try:
        out = two_image_index("Show me", image_mode="retrieve", **dict(IMAGE_CALL, max_images=3))
    finally:
        two_image_index.unet, two_image_index.vae = unet, vae
    assert [image.source for image in out.gill_images[0]] == ["retrieved", "retrieved"]
    assert any("left out" in message for message in out.warnings[0])


def test_retrieve_can_return_none_instead_of_raising(pipe, tmp_path):
    index = index_of(pipe, 1, image_root=str(tmp_path))  # its only image file does not exist
    queries = random_unit_rows(1, pipe.gill.config.retrieval_dim, 1)
    with pytest.raises(ImageLoadError):
        index.retrieve(queries)
    assert index.retrieve(queries, allow_missing=True) == [None]


def test_streamed_retrieved_images_arrive_before_any_denoising(two_image_index, decision):
    from gill_pipeline import GILLStreamer

    decision("retrieve")
    arrivals = []

    class Recording(GILLStreamer):
        def put_image(self, image):
            arrivals.append((image.source, self.progress))
            super().put_image(image)

    streamer = Recording(two_image_index.tokenizer)
    out = two_image_index("Show me", image_mode="retrieve", streamer=streamer, **dict(IMAGE_CALL, max_images=3))
    assert [source for source, _ in arrivals] == ["retrieved", "retrieved", "generated"]
    assert arrivals[0][1] is None and arrivals[1][1] is None, "retrieved images are delivered when ready"
    assert arrivals[2][1] == (IMAGE_CALL["num_inference_steps"],) * 2 and len(out.images) == 3


# ------------------------------------------------------------------------------------------------------------------
# The retrieval set's similarity floor (`min_similarity`)
# ------------------------------------------------------------------------------------------------------------------
def test_min_similarity_is_saved_loaded_and_checked(pipe, tmp_path):
    index = index_of(pipe, 4)
    assert index.min_similarity is None
    index.min_similarity = 0.25
    index.save_pretrained(tmp_path)
    assert RetrievalIndex.from_pretrained(tmp_path, image_root=str(tmp_path)).min_similarity == 0.25
    for bad in (1.5, -2, "0.3", True, float("nan")):
        with pytest.raises(ValueError, match=r"`min_similarity` must be None or a cosine similarity in \[-1, 1\]"):
            index.min_similarity = bad
    assert index.min_similarity == 0.25, "a refused value leaves the floor as it was"
    config_path = os.path.join(tmp_path, INDEX_CONFIG_FILE)
    with open(config_path) as f:
        config = json.load(f)
    config["min_similarity"] = 7
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(RetrievalIndexError, match="retrieval_index.json: `min_similarity` must be"):
        RetrievalIndex.from_pretrained(tmp_path)


def test_an_index_saved_without_a_floor_has_none(pipe, tmp_path):
    index_of(pipe, 3).save_pretrained(tmp_path)
    config_path = os.path.join(tmp_path, INDEX_CONFIG_FILE)
    with open(config_path) as f:
        config = json.load(f)
    config.pop("min_similarity")  # as written before the floor existed
    with open(config_path, "w") as f:
        json.dump(config, f)
    assert RetrievalIndex.from_pretrained(tmp_path, image_root=str(tmp_path)).min_similarity is None


def test_calibrate_min_similarity_separates_present_from_absent():
    present = torch.tensor([0.9, 0.85, 0.8, 0.75])
    absent = torch.tensor([0.5, 0.6, 0.7])
    floor = calibrate_min_similarity(present, absent)
    assert 0.7 < floor <= 0.75
    # Overlapping scores: the floor maximises the balanced accuracy (here 0.6 keeps 3/4 and refuses 2/3).
    overlap = calibrate_min_similarity(torch.tensor([0.9, 0.8, 0.65, 0.55]), torch.tensor([0.5, 0.6, 0.7]))
    kept = (torch.tensor([0.9, 0.8, 0.65, 0.55]) >= overlap).float().mean()
    refused = (torch.tensor([0.5, 0.6, 0.7]) < overlap).float().mean()
    for t in torch.linspace(0.4, 1.0, 61):
        k = (torch.tensor([0.9, 0.8, 0.65, 0.55]) >= t).float().mean()
        r = (torch.tensor([0.5, 0.6, 0.7]) < t).float().mean()
        assert (k + r) / 2 <= (kept + refused) / 2 + 1e-6
    with pytest.raises(ValueError, match="`present` and `absent` must both be non-empty"):
        calibrate_min_similarity(torch.tensor([]), absent)


@pytest.mark.parametrize("mode", ["auto", "both"])
def test_a_match_below_the_floor_is_generated_instead(with_index, decision, mode):
    decision("retrieve")
    index = with_index.retrieval_index
    try:
        index.min_similarity = 1.0  # no match is that good: every group the head sends to retrieval is generated
        images = _images(with_index("Show me", image_mode=mode, **IMAGE_CALL))
        assert images
        for image in images:
            assert image.source == "generated" and "below the retrieval set's min_similarity" in image.metadata["fallback"]
            (retrieved,) = image.alternatives
            assert retrieved.source == "retrieved" and retrieved.metadata["below_min_similarity"] == 1.0
        index.min_similarity = -1.0  # every match is good enough: the head's choice stands
        assert all(i.source == "retrieved" for i in _images(with_index("Show me", image_mode=mode, **IMAGE_CALL)))
        # A forced mode is never overruled.
        index.min_similarity = 1.0
        assert all(i.source == "retrieved" for i in _images(with_index("Show me", image_mode="retrieve", **IMAGE_CALL)))
    finally:
        index.min_similarity = None


def test_a_streamed_answer_shows_only_the_generated_image_below_the_floor(with_index, decision):
    from gill_pipeline import GILLStreamer

    decision("retrieve")
    arrivals = []

    class Recording(GILLStreamer):
        def put_image(self, image):
            arrivals.append(image.source)
            super().put_image(image)

    index = with_index.retrieval_index
    try:
        index.min_similarity = 1.0
        out = with_index("Show me", image_mode="auto", streamer=Recording(with_index.tokenizer), **IMAGE_CALL)
    finally:
        index.min_similarity = None
    assert arrivals and set(arrivals) == {"generated"}  # the overruled retrieved images are not streamed
    assert [image.source for image in out.gill_images[0]] == arrivals


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exact_search_of_a_memory_mapped_set_goes_block_by_block(tmp_path, monkeypatch, dtype):
    rows = random_unit_rows(2000, 32, 3)
    rows[1500:1600] = rows[:100]  # equal rows in different blocks: ties ordered by row, whatever the blocks
    rows[1234] = rows[7]
    queries = torch.cat([random_unit_rows(5, 32, 4), rows[[7, 42]]])
    records = [{"id": f"r{i}", "path": f"{i}.png"} for i in range(len(rows))]
    in_memory = RetrievalIndex(rows.to(dtype), records, {"retrieval_dim": 32}, {})
    expected = in_memory.search(queries, k=20)
    assert expected.rows[5, :2].tolist() == [7, 1234] and expected.rows[6, :2].tolist() == [42, 1542]
    in_memory.save_pretrained(tmp_path, max_shard_rows=300)  # 7 shards, the last one short
    loaded = RetrievalIndex.from_pretrained(tmp_path, image_root=str(tmp_path), mmap=True)
    blocks = [id(b) for b in loaded._blocks if b.shape[0]]
    assert len(blocks) == 7

    def joined(self):
        raise AssertionError("the search joined the blocks into one tensor")

    monkeypatch.setattr(RetrievalIndex, "embeddings", property(joined))
    for k in (1, 20, 2000, 2500):
        got, want = loaded.search(queries, k=k), in_memory.search(queries, k=k)
        assert torch.equal(got.rows, want.rows), k
        assert torch.equal(got.scores, want.scores), k
    # Small chunks cross the block edges: the same answer again.
    loaded._current_searcher().max_scores_in_memory = 7 * 113
    assert torch.equal(loaded.search(queries, k=20).rows, expected.rows)
    assert [id(b) for b in loaded._blocks if b.shape[0]] == blocks  # still the memory-mapped blocks, not joined
    monkeypatch.undo()
    torch.testing.assert_close(loaded.embeddings.float(), rows.to(dtype).float())  # for callers that need one
