"""Retrieval sets past memory: FAISS indexes saved with the set and read back memory-mapped, shards merged, codes-only
search and exact re-ranking, the measured parameter choice, refusals of files that do not match, and images read
from inside webdataset tar shards."""

import io
import json
import os
import tarfile

import numpy as np
import PIL.Image
import pytest
import torch

from gill_pipeline.retrieval import (RetrievalIndex, RetrievalIndexError, choose_faiss_params, load_record_image,
                                     tune_and_measure_recall, tune_search_params)
from gill_pipeline.retrieval import faiss_shards
from gill_pipeline.retrieval.image_loading import ImageLoadError
from gill_pipeline.retrieval.serialization import INDEX_CONFIG_FILE

faiss = pytest.importorskip("faiss")

DIM = 32


def clustered(n: int, seed: int = 0) -> torch.Tensor:
    from benchmarks.synthetic_clip import ClusteredEmbeddings

    return torch.from_numpy(ClusteredEmbeddings(dim=DIM, num_clusters=64, rank=4, seed=seed).chunk(0, rows=n))


def make_index(n: int = 3000, seed: int = 0) -> RetrievalIndex:
    records = [{"id": f"r{i}", "path": f"{i}.png"} for i in range(n)]
    return RetrievalIndex(clustered(n, seed), records, {"retrieval_dim": DIM}, {})


def load(folder, **kwargs) -> RetrievalIndex:
    return RetrievalIndex.from_pretrained(folder, image_root=str(folder), **kwargs)


@pytest.fixture(scope="module")
def queries():
    return clustered(40, seed=5)


def test_saved_faiss_index_is_read_back_memory_mapped_without_training(tmp_path, queries, monkeypatch):
    index = make_index().use_faiss("IVF32,PQ8x4fs", nprobe=8, rerank=4)
    before = index.search(queries, k=10)
    index.save_pretrained(tmp_path)
    config = json.load(open(tmp_path / INDEX_CONFIG_FILE))["faiss"]
    assert config["factory"] == "IVF32,PQ8x4fs" and config["metric"] == "inner_product"
    assert config["nprobe"] == 8 and config["rerank"] == 4 and config["files"][0]["num_rows"] == 3000
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".pkl", ".pickle", ".tmp"))]

    flags, real_read = [], faiss.read_index
    monkeypatch.setattr(faiss, "read_index", lambda path, f=0: flags.append(f) or real_read(path, f))

    def no_training(*args, **kwargs):
        raise AssertionError("a load must not train")

    monkeypatch.setattr(faiss_shards, "train_index", no_training)
    monkeypatch.setattr(faiss.Index, "train", no_training)
    loaded = load(tmp_path)
    assert loaded.search_backend == "faiss:IVF32,PQ8x4fs" and loaded.faiss_settings.nprobe == 8
    assert any(f & faiss.IO_FLAG_MMAP == faiss.IO_FLAG_MMAP for f in flags)
    after = loaded.search(queries, k=10)
    assert torch.equal(before.rows, after.rows)
    torch.testing.assert_close(before.scores, after.scores)


def test_codes_only_set_and_reranking(tmp_path, queries):
    index = make_index().use_faiss("IVF32,PQ8x4fs", nprobe=32, rerank=10)
    exact = make_index().search(queries, k=10)
    reranked = index.search(queries, k=10)
    codes = index._current_searcher().search(queries, 10, rerank=False)
    # Re-ranked scores are the exact cosine similarities of the rows returned.
    rows = index.embeddings[reranked.rows.clamp(min=0)]
    torch.testing.assert_close(reranked.scores, torch.einsum("qkd,qd->qk", rows, queries), atol=1e-5, rtol=0)

    def recall(result):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(result.rows.tolist(), exact.rows.tolist())])

    assert recall(reranked) >= recall(codes) + 0.2 and recall(reranked) >= 0.7
    index.save_pretrained(tmp_path, save_embeddings=False)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("embeddings-")]
    loaded = load(tmp_path)
    assert not loaded.has_embeddings and len(loaded) == 3000
    assert torch.equal(loaded.search(queries, k=10).rows, codes.rows)
    with pytest.raises(RetrievalIndexError, match="without its embeddings"):
        loaded.add_embeddings(queries[:1], [{"id": "new", "path": "new.png"}])
    with pytest.raises(ValueError, match="save_embeddings=False"):
        loaded.save_pretrained(tmp_path / "again")


def test_shards_merged_equal_one_index_and_exact_search(tmp_path, queries):
    exact = make_index().search(queries, k=10)
    single = make_index().use_faiss("Flat").search(queries, k=10)
    sharded = make_index().use_faiss("Flat", max_rows_per_file=700)
    assert len(sharded._current_searcher().indexes) == 5
    assert torch.equal(sharded.search(queries, k=10).rows, single.rows)
    assert torch.equal(single.rows, exact.rows)
    sharded.save_pretrained(tmp_path)
    names = [f["file"] for f in json.load(open(tmp_path / INDEX_CONFIG_FILE))["faiss"]["files"]]
    assert names == [f"faiss-{i:05d}.index" for i in range(5)]
    loaded = load(tmp_path, mmap=True)
    assert torch.equal(loaded.search(queries, k=10).rows, exact.rows)
    # Rows added after a load go to a new shard; saving again keeps the files already there.
    mtime = os.path.getmtime(tmp_path / "faiss-00000.index")
    loaded.add_embeddings(queries[:1], [{"id": "new", "path": "new.png"}])
    assert loaded.search(queries[:1], k=1).rows.item() == 3000
    loaded.save_pretrained(tmp_path)
    assert os.path.getmtime(tmp_path / "faiss-00000.index") == mtime
    assert load(tmp_path).search(queries[:1], k=1).rows.item() == 3000


def test_parameter_choice_meets_its_target_on_a_clustered_sample(tmp_path):
    rows = clustered(6000, seed=1)
    params = choose_faiss_params(rows, target_recall=0.9, max_bytes_per_image=24)
    assert params.met_target and params.recall_at_10 >= 0.9 and params.bytes_per_image <= 24
    assert all(t.get("bytes_per_image", 0) > 24 for t in params.tried if "skipped" in t)
    # Through the index: its choice meets the target too, and is what the saved config records. (Among candidates
    # that meet the target the fastest wins, so which one is a matter of timing on a shared machine.)
    index = make_index(6000, seed=1).use_faiss("auto", target_recall=0.9, max_bytes_per_image=24)
    chosen = index.faiss_settings
    assert chosen.choice["tuning_recall_at_10"] >= 0.9 and chosen.factory in {t["factory"] for t in params.tried}
    # The recall recorded is measured on the full index built (all 6000 rows), not taken from the tuning sample.
    assert chosen.recall_measurement["rows"] == 6000 and chosen.recall_measurement["queries"] == 200
    assert 0.8 <= chosen.recall_at_10 <= 1
    index.save_pretrained(tmp_path)
    saved = json.load(open(tmp_path / INDEX_CONFIG_FILE))["faiss"]
    assert saved["factory"] == chosen.factory and saved["recall_at_10"] == chosen.recall_at_10
    assert saved["choice"]["target_recall"] == 0.9 and saved["recall_measurement"] == chosen.recall_measurement
    assert load(tmp_path).faiss_settings.recall_measurement == chosen.recall_measurement


def test_memory_mapped_choice_keeps_to_codes_a_load_maps(tmp_path):
    index = make_index(3000, seed=4).use_faiss("auto", target_recall=0.9, max_bytes_per_image=16, memory_mapped=True)
    choice = index.faiss_settings.choice
    factories = {t["factory"] for t in choice["tried"]}
    assert choice["memory_mapped"] and len(factories) >= 2 and not any("fs" in f for f in factories), factories
    assert "fs" not in index.faiss_settings.factory and index.faiss_settings.recall_at_10 >= 0.8
    index.save_pretrained(tmp_path)
    # Read back memory-mapped: FAISS maps 8-bit PQ inverted lists (its block lists of fast-scan codes it reads).
    loaded = load(tmp_path, mmap=True)
    assert loaded.search_backend == f"faiss:{index.faiss_settings.factory}"
    with pytest.raises(ValueError, match="`memory_mapped` must be True or False, got 'yes'"):
        choose_faiss_params(clustered(400), memory_mapped="yes")


@pytest.mark.parametrize("change", ["rows", "factory", "width", "corrupt"])
def test_faiss_file_that_does_not_match_its_config_is_refused(tmp_path, change):
    make_index(2000).use_faiss("IVF16,Flat", nprobe=4).save_pretrained(tmp_path)
    config_path = tmp_path / INDEX_CONFIG_FILE
    config = json.load(open(config_path))
    file = tmp_path / "faiss-00000.index"
    if change == "rows":
        config["faiss"]["files"][0]["num_rows"] = 1999
        config["faiss"]["files"].append(dict(config["faiss"]["files"][0], first_row=1999, num_rows=1))
        json.dump(config, open(config_path, "w"))
        match = "holds 2000 rows"
    elif change == "factory":
        other = faiss.index_factory(DIM, "IVF16,PQ4x4fs", faiss.METRIC_INNER_PRODUCT)
        other.train(clustered(2000).numpy())
        other.add(clustered(2000).numpy())
        faiss.write_index(other, str(file))
        match = "IndexIVFPQFastScan"
    elif change == "width":
        faiss.write_index(faiss.IndexFlatIP(DIM * 2), str(file))
        match = "width 64"
    else:
        file.write_bytes(b"not a faiss index")
        match = "Corrupted FAISS index file"
    with pytest.raises(RetrievalIndexError, match=match) as error:
        load(tmp_path)
    assert "faiss-0000" in str(error.value)


def test_an_interrupted_faiss_save_leaves_the_previous_set_readable(tmp_path, queries, monkeypatch):
    previous = make_index().use_faiss("Flat")
    previous.save_pretrained(tmp_path)
    expected = previous.search(queries, k=5).rows
    changed = make_index(3000, seed=9).use_faiss("IVF16,Flat", nprobe=16)
    real_write = faiss.write_index

    def fail(index, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(faiss, "write_index", fail)
    with pytest.raises(KeyboardInterrupt):
        changed.save_pretrained(tmp_path)
    monkeypatch.setattr(faiss, "write_index", real_write)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    loaded = load(tmp_path)
    assert loaded.search_backend == "faiss:Flat" and torch.equal(loaded.search(queries, k=5).rows, expected)


def _ivf_searcher(index: RetrievalIndex, factory: str = "IVF32,PQ8x4fs", rows: bool = True):
    return faiss_shards.ShardedFaissSearcher.build(index.embeddings, faiss_shards.FaissSettings(factory, nprobe=1),
                                                   rows_of=(lambda r: index.embeddings[r]) if rows else None)


def test_search_params_are_tuned_on_the_full_index_to_the_target():
    index = make_index(3000, seed=3)
    searcher = _ivf_searcher(index)
    measured = tune_and_measure_recall(searcher, [index.embeddings], target_recall=0.95, num_queries=100, seed=1)
    tuning = measured["search_tuning"]
    # nprobe=1 without re-ranking is far from it; the chosen settings reach it on the tuning queries and are set.
    assert tuning["met_target"] and tuning["recall_at_10"] >= 0.95 and measured["queries"] == 100
    assert (searcher.settings.nprobe, searcher.settings.rerank) == (tuning["nprobe"], tuning["rerank"])
    first = next(t for t in tuning["tried"] if t["rerank"] == 1)
    assert first["recall_at_10"] < 0.95
    # A deeper re-ranking is only tried with a smaller nprobe than a shallower one needed (anything else is slower).
    met = [t for t in tuning["tried"] if t["recall_at_10"] >= 0.95]
    assert all(t["nprobe"] <= met[0]["nprobe"] for t in tuning["tried"] if t["rerank"] > met[0]["rerank"])
    # The recall returned is taken on the other 100 queries, and is what the searcher gives there.
    assert measured["recall_at_10"] >= 0.9

    # Without stored rows only the codes count: no re-ranking is tried, and an unreachable target gives the most
    # accurate setting with met_target False.
    codes = _ivf_searcher(index, "IVF32,PQ2x4fs", rows=False)
    queries = index.embeddings[:50]
    truth = [set(r.tolist()) for r in (queries @ index.embeddings.t()).topk(10, dim=1).indices]
    result = tune_search_params(codes, queries, truth, target_recall=1.0)
    assert not result["met_target"] and {t["rerank"] for t in result["tried"]} == {1}
    assert result["recall_at_10"] == max(t["recall_at_10"] for t in result["tried"]) < 1.0
    assert codes.settings.nprobe == result["nprobe"]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda i: i.use_faiss("IVF16,Flat", rerank=0), "`rerank`"),
        (lambda i: i.use_faiss("Flat", max_rows_per_file=0), "`max_rows_per_file`"),
        (lambda i: i.use_faiss("NotAFactory"), "`factory`='NotAFactory'"),
        (lambda i: i.use_faiss("IVF16,Flat", nprobe=-1), "`nprobe`"),
        (lambda i: i.save_pretrained("unused", save_embeddings=False), "needs a FAISS index"),
        (lambda i: choose_faiss_params(i.embeddings, target_recall=1.5), "`target_recall`"),
        (lambda i: choose_faiss_params(i.embeddings, max_bytes_per_image=0), "`max_bytes_per_image`"),
        (lambda i: choose_faiss_params(i.embeddings[:50]), "`embeddings` must be"),
        (lambda i: tune_search_params(_ivf_searcher(i), i.embeddings[:5], [set()] * 5, target_recall=0),
         "`target_recall`"),
        (lambda i: tune_search_params(_ivf_searcher(i), i.embeddings[:5], [set()] * 5, rerank_candidates=(0,)),
         "`rerank_candidates`"),
        (lambda i: tune_and_measure_recall(_ivf_searcher(i), [i.embeddings], num_queries=0), "`num_queries`"),
        (lambda i: i.use_faiss("auto", memory_mapped="yes"), "`memory_mapped` must be True or False, got 'yes'"),
        (lambda i: i.use_faiss("IVF16,Flat", memory_mapped=True), "needs `factory='auto'`, got 'IVF16,Flat'"),
    ],
)
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call(make_index(500))


# ------------------------------------------------------------------------------------------------------------------
# Images inside webdataset shards
# ------------------------------------------------------------------------------------------------------------------
def _png(color) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "shard-000.tar"
    with tarfile.open(path, "w") as tar:
        for key, color in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
            data = _png(color)
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    return tmp_path, members


def test_a_record_reads_only_its_member_of_a_tar_shard(shard, monkeypatch):
    root, members = shard
    b = members["b.png"]
    by_name = load_record_image({"id": "b", "path": "shard-000.tar", "member": "b.png"}, str(root))
    assert by_name.getpixel((0, 0)) == (0, 0, 255)
    reads = []
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "b" in mode and str(path).endswith(".tar"):
            real_read = f.read
            f.read = lambda size=-1: reads.append(size) or real_read(size)
        return f

    monkeypatch.setattr("builtins.open", counting_open)
    record = {"id": "b", "path": "shard-000.tar", "member": "b.png", "offset": b.offset_data, "size": b.size}
    assert load_record_image(record, str(root)).getpixel((0, 0)) == (0, 0, 255)
    assert sum(reads) == 512 + b.size  # the member's header and data, nothing else


@pytest.mark.parametrize(
    "record, match",
    [
        ({"id": "x", "path": "missing.tar", "member": "a.png"}, r"'x'.*missing.tar does not exist"),
        ({"id": "x", "path": "shard-000.tar", "member": "zzz.png"}, r"'x'.*no file member 'zzz.png'"),
        ({"id": "x", "path": "shard-000.tar", "member": "a.png", "offset": "12", "size": 3}, r"'x'.*`offset`"),
        ({"id": "x", "path": "shard-000.tar", "member": "b.png", "offset": "A", "size": "B"}, r"'x'.*`offset`"),
        ({"id": "x", "path": "shard-000.tar", "member": "b.png", "offset": "A", "size": 10**9}, r"'x'.*`offset`"),
        ({"id": "x", "path": "shard-000.tar"}, r"'x'.*needs `member`"),
    ],
)
def test_bad_tar_records_are_clear_errors(shard, record, match):
    root, members = shard
    record = dict(record)
    if record.get("offset") == "A":  # a stale offset: the other member's data, or a wrong size
        record["offset"], record["size"] = members["a.png"].offset_data, (
            members["a.png"].size if record["size"] == "B" else members["b.png"].size)
        match = r"'x'.*not the member 'b.png'"
    with pytest.raises(ImageLoadError, match=match):
        load_record_image(record, str(root))


def test_add_faiss_index_streams_a_saved_set(tmp_path, queries, monkeypatch):
    from gill_pipeline.retrieval import add_faiss_index
    from gill_pipeline.retrieval import faiss_build

    index = make_index()
    index.save_pretrained(tmp_path, max_shard_rows=1000)
    monkeypatch.setattr(faiss_build, "ADD_CHUNK_ROWS", 300)  # several chunks per shard
    settings = add_faiss_index(tmp_path, "Flat", max_rows_per_file=1300, sample_rows=500)
    assert settings.factory == "Flat"
    config = json.load(open(tmp_path / INDEX_CONFIG_FILE))["faiss"]
    assert [f["num_rows"] for f in config["files"]] == [1300, 1300, 400]
    loaded = load(tmp_path, mmap=True)
    assert loaded.search_backend == "faiss:Flat"
    assert torch.equal(loaded.search(queries, k=10).rows, index.search(queries, k=10).rows)
    with pytest.raises(ValueError, match="`sample_rows`"):
        add_faiss_index(tmp_path, "Flat", sample_rows=0)


def _faiss_files(folder) -> dict[str, bytes]:
    config = json.load(open(os.path.join(folder, INDEX_CONFIG_FILE)))["faiss"]
    names = [f["file"] for f in config["files"]] + [config["trained_file"]]
    return {name: open(os.path.join(folder, name), "rb").read() for name in names}


def test_a_set_with_a_faiss_index_loads_and_saves_where_faiss_cannot_be_imported(tmp_path, queries, monkeypatch,
                                                                                 caplog):
    import logging as std_logging
    import sys

    from diffusers.utils import logging as diffusers_logging

    index = make_index().use_faiss("IVF16,Flat", nprobe=4, max_rows_per_file=2000)
    approximate = index.search(queries, k=10)
    index.save_pretrained(tmp_path / "set", max_shard_rows=1000)
    make_index().use_faiss("Flat").save_pretrained(tmp_path / "codes", save_embeddings=False)
    # Another set with FAISS files of the same names where the copy goes: they must not be written over.
    make_index(500, seed=3).use_faiss("Flat").save_pretrained(tmp_path / "busy")
    original, busy = _faiss_files(tmp_path / "set"), _faiss_files(tmp_path / "busy")
    exact = make_index().search(queries, k=10)

    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    library = std_logging.getLogger("gill_pipeline")
    library.addHandler(caplog.handler)
    diffusers_logging.enable_propagation()
    try:
        loaded = load(tmp_path / "set", mmap=True)
    finally:
        library.removeHandler(caplog.handler)
        diffusers_logging.disable_propagation()
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "FAISS index" in message and "ignored" in message and "exact search" in message
    assert "faiss cannot be imported" in message
    assert loaded.search_backend == "exact" and torch.equal(loaded.search(queries, k=10).rows, exact.rows)
    hint = r"codes.*without its embeddings.*pip install \"gill_pipeline\[faiss\]\""
    with pytest.raises(RetrievalIndexError, match=hint):
        load(tmp_path / "codes")

    # Saves copy the FAISS files through: into the same folder (shards written again), another, one in use.
    loaded.to(dtype=torch.float16).save_pretrained(tmp_path / "set", max_shard_rows=700)  # every shard again
    loaded.save_pretrained(tmp_path / "copy")
    loaded.save_pretrained(tmp_path / "busy")
    loaded.save_pretrained(tmp_path / "codes_copy", save_embeddings=False)
    for folder in ("set", "copy", "busy", "codes_copy"):
        assert sorted(_faiss_files(tmp_path / folder).values()) == sorted(original.values()), folder
    assert set(_faiss_files(tmp_path / "busy")).isdisjoint(busy)  # new names; the old files removed after
    assert not [f for f in os.listdir(tmp_path / "busy") if f.endswith(".tmp") or f in busy]
    # Rows added since the load: the FAISS index cannot take them without faiss; refused before anything is written.
    grown = load(tmp_path / "copy")
    grown.add_embeddings(queries[:1], [{"id": "new", "path": "new.png"}])
    with pytest.raises(ValueError, match=r"drop_faiss_index\(\)"):
        grown.save_pretrained(tmp_path / "grown")
    assert not os.path.exists(tmp_path / "grown")
    grown.drop_faiss_index().save_pretrained(tmp_path / "grown")
    assert "faiss" not in json.load(open(tmp_path / "grown" / INDEX_CONFIG_FILE))

    monkeypatch.undo()  # faiss importable again: every copy searches with the same FAISS index
    for folder in ("set", "copy", "busy", "codes_copy"):
        again = load(tmp_path / folder)
        assert again.search_backend == "faiss:IVF16,Flat", folder
        assert torch.equal(again.search(queries, k=10).rows, approximate.rows), folder


def _full_recall(folder, rows: torch.Tensor, k: int = 10) -> float:
    """Recall@k of the set's saved FAISS index over every row of the set as a query (its own row left out)."""
    loaded = load(folder, mmap=True)
    found = loaded.search(rows, k=k + 1).rows.tolist()
    truth = (rows @ rows.t()).fill_diagonal_(-2).topk(k, dim=1).indices.tolist()
    return float(np.mean([len({r for r in f if r != q}.intersection(t[:k])) / k
                          for q, (f, t) in enumerate(zip(found, truth))]))


def test_add_faiss_index_records_the_recall_of_the_full_index_not_of_its_tuning_sample(tmp_path, monkeypatch):
    from gill_pipeline.retrieval import FaissParams, add_faiss_index
    from gill_pipeline.retrieval import faiss_build

    index = make_index(4000, seed=2)
    index.save_pretrained(tmp_path, max_shard_rows=900)
    # A tuning sample of 400 rows whose measurement says 0.123: what the config must not record as the set's recall.
    tuning = []

    def fake_choice(sample, **kwargs):
        tuning.append(sample.shape[0])
        return FaissParams("IVF16,PQ8x4fs", nprobe=2, rerank=1, recall_at_10=0.123, bytes_per_image=12.0,
                           ms_per_query=0.1, met_target=False, sample_rows=sample.shape[0] - 200)

    monkeypatch.setattr(faiss_build, "choose_faiss_params", fake_choice)
    monkeypatch.setattr(faiss_build, "DEFAULT_SAMPLE_ROWS", 400)
    settings = add_faiss_index(tmp_path, "auto", max_rows_per_file=1500)
    assert tuning == [400]
    saved = json.load(open(tmp_path / INDEX_CONFIG_FILE))["faiss"]
    assert saved["choice"]["tuning_recall_at_10"] == 0.123 and saved["choice"]["tuning_sample_rows"] == 200
    measurement = dict(saved["recall_measurement"])
    tuning = measurement.pop("search_tuning")
    assert measurement == {"rows": 4000, "queries": 200, "queries_outside_tuning_sample": True,
                           "tuning_sample_rows": 400}
    assert saved["recall_at_10"] == settings.recall_at_10 != 0.123
    # The sample's nprobe=2 without re-ranking misses the target on the full index: nprobe and the re-ranking depth
    # were re-tuned on 200 other rows of the full set, and are what the set is searched with.
    assert tuning["queries"] == 200 and tuning["target_recall"] == 0.95 and tuning["met_target"]
    assert (saved["nprobe"], saved["rerank"]) == (tuning["nprobe"], tuning["rerank"]) != (2, 1)
    assert (settings.nprobe, settings.rerank) == (tuning["nprobe"], tuning["rerank"])
    assert load(tmp_path).faiss_settings.rerank == tuning["rerank"]
    # What was recorded agrees with the recall of the saved index over every row of the set (200 of 4000 queries:
    # a sampling error of about 0.02), and reaches the target within it.
    full = _full_recall(tmp_path, index.embeddings)
    assert abs(saved["recall_at_10"] - full) < 0.08 and full >= 0.92
    # A hand-given factory is measured the same way; a FAISS "Flat" index finds everything exact search finds.
    flat = add_faiss_index(tmp_path, "Flat", sample_rows=500, recall_queries=50)
    assert flat.recall_at_10 == 1.0 and flat.recall_measurement["queries"] == 50
    assert add_faiss_index(tmp_path, "Flat", sample_rows=500, recall_queries=0).recall_at_10 is None
    with pytest.raises(ValueError, match="`recall_queries`"):
        add_faiss_index(tmp_path, "Flat", recall_queries=-1)
    # Refused before the folder is read: a folder that is not a set gives the argument's error, not the folder's.
    for bad, match in ((dict(memory_mapped=1), "`memory_mapped` must be True or False, got 1"),
                       (dict(factory="Flat", memory_mapped=True), "needs `factory='auto'`")):
        with pytest.raises(ValueError, match=match):
            add_faiss_index(tmp_path / "not-a-set", **bad)


def test_use_faiss_on_a_memory_mapped_set_reads_it_block_by_block(tmp_path, queries, monkeypatch):
    in_memory = make_index()
    expected = in_memory.use_faiss("IVF16,PQ8x4fs", nprobe=4, train_size=1000).search(queries, k=10)
    make_index().save_pretrained(tmp_path, max_shard_rows=700)
    loaded = load(tmp_path, mmap=True)

    def joined(*args):
        raise AssertionError("the FAISS build joined the blocks into one tensor")

    monkeypatch.setattr(RetrievalIndex, "embeddings", property(joined))
    monkeypatch.setattr(RetrievalIndex, "_row_range", joined)
    # The same training rows (drawn from the blocks as from one tensor) and every row added: the same index.
    got = loaded.use_faiss("IVF16,PQ8x4fs", nprobe=4, train_size=1000).search(queries, k=10)
    assert torch.equal(got.rows, expected.rows)
    torch.testing.assert_close(got.scores, expected.scores)
    assert len([b for b in loaded._blocks if b.shape[0]]) == 5


def _vm_flags_of(path) -> list[set]:
    """The VmFlags of this process's mappings of `path` (Linux /proc/self/smaps)."""
    flags, current = [], None
    for line in open("/proc/self/smaps"):
        if "-" in line.split(" ")[0] and len(line.split()) >= 5:
            current = line.split()[-1] if len(line.split()) >= 6 else None
        elif line.startswith("VmFlags:") and current == str(path):
            flags.append(set(line.split()[1:]))
    return flags


@pytest.mark.skipif(not os.path.isfile("/proc/self/smaps"), reason="needs Linux /proc")
def test_scattered_rows_of_a_memory_mapped_set_are_read_without_readahead(tmp_path, monkeypatch):
    from gill_pipeline.retrieval import page_advice
    from gill_pipeline.retrieval.search import gather_rows

    rows = clustered(5000)
    path = tmp_path / "rows.npy"
    np.save(path, rows.numpy())
    mapped = torch.from_numpy(np.load(path, mmap_mode="c"))
    blocks = [mapped[:2000], mapped[2000:]]
    wanted = torch.tensor([[4999, 3], [2000, 1999]])
    seen = []
    real = page_advice.random_access

    def spy(tensors):
        seen.append(_vm_flags_of(path))  # before: the kernel's default advice
        return real(tensors)

    monkeypatch.setattr("gill_pipeline.retrieval.search.random_access", spy)
    original_index = torch.Tensor.__getitem__

    def index_and_look(self, key):
        if self.data_ptr() in {b.data_ptr() for b in blocks}:
            seen.append(_vm_flags_of(path))  # while the rows are read
        return original_index(self, key)

    monkeypatch.setattr(torch.Tensor, "__getitem__", index_and_look)
    got = gather_rows(blocks, wanted)
    monkeypatch.undo()
    assert torch.equal(got, rows[wanted])  # the same rows, in the asked shape
    assert seen and all(not any("rr" in f for f in flags) for flags in seen[0::2]), seen
    assert all(any("rr" in f for f in flags) for flags in seen[1::2]), seen  # MADV_RANDOM while reading
    assert not any("rr" in f for f in _vm_flags_of(path))  # and the default back after
