"""A retrieval set's records as a `RecordTable`: read by byte offset from the saved JSON Lines files through their
row index files (offsets + id hashes), the same records, rows and lookups as a list; folders without row index files
(saved by older versions) load; stale or corrupt row index files are noticed and read past; repeated ids refused."""

import copy
import json
import logging as std_logging
import os
import pickle

import numpy as np
import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from gill_pipeline.retrieval import RetrievalIndex, RetrievalIndexError
from gill_pipeline.retrieval import record_table
from gill_pipeline.retrieval.record_table import JsonlShard, RecordTable, id_hashes
from gill_pipeline.retrieval.serialization import INDEX_CONFIG_FILE

DIM = 8


def unit_rows(n, seed=0):
    return torch.nn.functional.normalize(torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)), dim=-1)


def records_of(n, prefix="r"):
    """Local files, URLs and webdataset members, with non-ASCII captions and nested fields."""
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"id": f"{prefix}{i}", "path": f"images/{i}.png", "caption": f"café nº{i}"})
        elif i % 3 == 1:
            out.append({"id": f"{prefix}{i}", "path": f"https://example.com/{i}.jpg", "caption": "a \"quoted\"\nline"})
        else:
            out.append({"id": f"{prefix}{i}", "path": "shards/00000.tar", "member": f"{i}.jpg", "offset": 512 * i,
                        "size": 100 + i, "extra": {"tags": ["x", i]}})
    return out


def saved_set(folder, n=23, max_shard_rows=7):
    records = records_of(n)
    index = RetrievalIndex(unit_rows(n), records, {"retrieval_dim": DIM}, {}, image_root=str(folder))
    index.save_pretrained(folder, max_shard_rows=max_shard_rows)
    return index, records


def config_of(folder):
    return json.loads((folder / INDEX_CONFIG_FILE).read_text())


@pytest.fixture
def retrieval_warnings(caplog):
    diffusers_logging.enable_propagation()
    caplog.set_level(std_logging.WARNING, logger="gill_pipeline.retrieval")
    yield caplog
    diffusers_logging.disable_propagation()


def check_same_as_list(table, records):
    assert len(table) == len(records)
    assert list(table) == records and table == records
    assert [table[row] for row in range(len(records))] == records
    assert table[-1] == records[-1] and table[3:17:2] == records[3:17:2] and table[:] == records
    for row, record in enumerate(records):
        assert table.row_of(record["id"]) == row and record["id"] in table
    assert "missing" not in table and table.get_row("missing") is None and 3 not in table
    with pytest.raises(KeyError, match="No image with id 'missing'"):
        table.row_of("missing")
    with pytest.raises(IndexError, match="Row 23 is out of range for 23 records"):
        table[len(records)]
    with pytest.raises(TypeError, match="indexed by row"):
        table["r1"]


def test_a_saved_multi_shard_set_gives_the_records_rows_and_lookups_of_the_list(tmp_path):
    index, records = saved_set(tmp_path)
    config = config_of(tmp_path)
    assert [s["row_index"] for s in config["shards"]] == [f"metadata-0000{i}.rows.safetensors" for i in range(4)]
    loaded = RetrievalIndex.from_pretrained(tmp_path)
    assert isinstance(loaded.records, RecordTable) and len(loaded.records.shards) == 4
    assert all(s.row_index is not None for s in loaded.records.shards)  # read through the row index files
    check_same_as_list(loaded.records, records)
    check_same_as_list(index.records, records)  # a set made in memory answers the same way
    assert loaded.ids == [r["id"] for r in records] and loaded.row_of("r20") == 20 and "r20" in loaded
    assert loaded.records.num_urls == sum(r["path"].startswith("https://") for r in records)
    # A record read is a copy: changing it changes nothing in the set.
    loaded.records[0]["caption"] = "changed"
    index.records[0]["caption"] = "changed"
    assert loaded.records[0] == index.records[0] == records[0]
    # Copies and pickles (another process) read the same files.
    check_same_as_list(copy.deepcopy(loaded.records), records)
    check_same_as_list(pickle.loads(pickle.dumps(loaded.records)), records)
    # Search excludes by id through the table.
    queries = unit_rows(23)[[4, 9]]
    best = loaded.search(queries, k=3, exclude_ids=[{"r4", "nope"}, set()])
    assert 4 not in best.rows[0].tolist() and best.rows[1, 0].item() == 9
    # The JSON Lines files stay the source of truth: every record there, one per line, as older versions read them.
    lines = [json.loads(line) for s in config["shards"] for line in open(tmp_path / s["metadata"], encoding="utf-8")]
    assert lines == records


def test_rows_added_to_a_loaded_set_and_saved_in_place(tmp_path):
    saved_set(tmp_path)
    loaded = RetrievalIndex.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'r5' is already in the index"):
        loaded.add_embeddings(unit_rows(1, 5), [{"id": "r5", "path": "x.png"}])
    more = records_of(5, prefix="new")
    loaded.add_embeddings(unit_rows(5, 1), more)
    check_same = records_of(23) + more
    assert list(loaded.records) == check_same and loaded.row_of("new4") == 27
    loaded.save_pretrained(tmp_path, max_shard_rows=7)  # appends one shard
    assert [s["num_rows"] for s in config_of(tmp_path)["shards"]] == [7, 7, 7, 2, 5]
    again = RetrievalIndex.from_pretrained(tmp_path)
    assert again.records == check_same and again.row_of("new2") == 25
    # Saved elsewhere: the rows read from files are copied as they are, the ones in memory written.
    again.save_pretrained(tmp_path / "copy", max_shard_rows=10)
    assert RetrievalIndex.from_pretrained(tmp_path / "copy").records == check_same


def test_a_folder_without_row_index_files_loads_and_a_save_in_place_adds_them(tmp_path, retrieval_warnings):
    _, records = saved_set(tmp_path)
    config = config_of(tmp_path)
    for shard in config["shards"]:  # as older versions saved it
        os.remove(tmp_path / shard.pop("row_index"))
    (tmp_path / INDEX_CONFIG_FILE).write_text(json.dumps(config))
    loaded = RetrievalIndex.from_pretrained(tmp_path)
    assert all(s.row_index is None for s in loaded.records.shards)  # made by one streamed pass
    check_same_as_list(loaded.records, records)
    assert not [r for r in retrieval_warnings.records if "row index" in r.getMessage()]
    loaded.save_pretrained(tmp_path)  # nothing new to write but the row index files
    assert all(os.path.isfile(tmp_path / s["row_index"]) for s in config_of(tmp_path)["shards"])
    again = RetrievalIndex.from_pretrained(tmp_path)
    assert all(s.row_index is not None for s in again.records.shards)
    check_same_as_list(again.records, records)


@pytest.mark.parametrize("edit", ["longer", "same_size"])
def test_a_row_index_made_stale_by_an_edit_is_noticed_and_read_past(tmp_path, retrieval_warnings, edit):
    _, records = saved_set(tmp_path)
    path = tmp_path / "metadata-00001.jsonl"
    text = path.read_text(encoding="utf-8")
    if edit == "longer":
        text = text.replace('"id": "r7"', '"id": "r7-edited"')
        records[7]["id"] = "r7-edited"
    else:  # same size: only the SHA-256 tells
        text = text.replace('"id": "r8"', '"id": "rX"')
        records[8]["id"] = "rX"
    stat = os.stat(path)
    path.write_text(text, encoding="utf-8")
    # Edited after the row index was written (within one clock tick, the times could not tell).
    os.utime(path, ns=(stat.st_atime_ns, os.stat(tmp_path / "metadata-00001.rows.safetensors").st_mtime_ns + 10**9))
    assert (os.stat(path).st_size == stat.st_size) == (edit == "same_size")
    loaded = RetrievalIndex.from_pretrained(tmp_path)
    messages = " ".join(r.getMessage() for r in retrieval_warnings.records)
    assert f"Ignoring the row index {tmp_path / 'metadata-00001.rows.safetensors'}" in messages
    assert "stale" in messages and messages.count("Ignoring the row index") == 1
    check_same_as_list(loaded.records, records)
    loaded.save_pretrained(tmp_path)  # writes a row index that matches the file again
    retrieval_warnings.clear()
    check_same_as_list(RetrievalIndex.from_pretrained(tmp_path).records, records)
    assert "Ignoring the row index" not in " ".join(r.getMessage() for r in retrieval_warnings.records)


def test_a_corrupt_row_index_is_noticed_and_read_past(tmp_path, retrieval_warnings):
    _, records = saved_set(tmp_path)
    (tmp_path / "metadata-00002.rows.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    loaded = RetrievalIndex.from_pretrained(tmp_path)
    messages = " ".join(r.getMessage() for r in retrieval_warnings.records)
    assert f"Ignoring the row index {tmp_path / 'metadata-00002.rows.safetensors'}: it cannot be read" in messages
    check_same_as_list(loaded.records, records)


def test_a_row_index_of_another_file_of_the_same_size_is_refused(tmp_path, retrieval_warnings):
    one, other = tmp_path / "one.jsonl", tmp_path / "other.jsonl"
    one.write_text('{"id": "a", "path": "a.png"}\n{"id": "b", "path": "b.png"}\n', encoding="utf-8")
    other.write_text('{"id": "c", "path": "c.png"}\n{"id": "d", "path": "d.png"}\n', encoding="utf-8")
    JsonlShard.scan(str(one)).write_row_index(str(tmp_path / "other.rows.safetensors"))  # newer than `other`
    shard = JsonlShard.read(str(other), str(tmp_path / "other.rows.safetensors"))
    assert shard.row_index is None and [shard.record(i)["id"] for i in range(2)] == ["c", "d"]
    message = " ".join(r.getMessage() for r in retrieval_warnings.records)
    assert f"record 0 of {other} is not the one it describes: it is stale" in message


def test_repeated_ids_across_shards_are_refused_naming_the_id(tmp_path):
    saved_set(tmp_path)
    path = tmp_path / "metadata-00002.jsonl"
    path.write_text(path.read_text(encoding="utf-8").replace('"id": "r16"', '"id": "r3"'), encoding="utf-8")
    with pytest.raises(RetrievalIndexError, match=r"The id 'r3' appears twice in .*: rows 3 \(.*metadata-00000.jsonl, "
                                                  r"record 3\) and 16 \(.*metadata-00002.jsonl, record 2\)"):
        RetrievalIndex.from_pretrained(tmp_path)


def test_a_missing_metadata_file_is_named(tmp_path):
    saved_set(tmp_path)
    os.remove(tmp_path / "metadata-00001.jsonl")
    with pytest.raises(RetrievalIndexError, match=f"Missing file of the retrieval index: .*metadata-00001.jsonl"):
        RetrievalIndex.from_pretrained(tmp_path)


def test_a_bad_record_is_named_by_file_and_line(tmp_path):
    saved_set(tmp_path)
    path = tmp_path / "metadata-00001.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = json.dumps({"id": "r9", "path": ""})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(RetrievalIndexError, match=r"metadata-00001.jsonl, line 3: a record needs a non-empty string "
                                                  "`path`"):
        RetrievalIndex.from_pretrained(tmp_path)
    lines[2] = "{not json"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(RetrievalIndexError, match=r"metadata-00001.jsonl, line 3: not a JSON line"):
        RetrievalIndex.from_pretrained(tmp_path)


def test_ids_sharing_a_hash_are_told_apart_by_their_records(tmp_path, monkeypatch):
    """Every id hashed to one of 3 values: lookups read the records to compare ids; no false repeat."""
    _, records = saved_set(tmp_path)
    real = record_table.id_hashes
    monkeypatch.setattr(record_table, "id_hashes", lambda ids: real(ids) % np.uint64(3))
    for name in os.listdir(tmp_path):
        if name.endswith(".rows.safetensors"):
            os.remove(tmp_path / name)  # made again with the colliding hashes
    loaded = RetrievalIndex.from_pretrained(tmp_path)
    check_same_as_list(loaded.records, records)
    with pytest.raises(ValueError, match="'r5' is already in the index"):
        loaded.add_embeddings(unit_rows(1, 2), [{"id": "r5", "path": "x.png"}])
    loaded.add_embeddings(unit_rows(2, 2), [{"id": "fresh", "path": "x.png"}, {"id": "new", "path": "y.png"}])
    assert loaded.row_of("fresh") == 23 and loaded.row_of("new") == 24 and loaded.row_of("r22") == 22
    path = tmp_path / "metadata-00003.jsonl"
    path.write_text(path.read_text(encoding="utf-8").replace('"id": "r22"', '"id": "r0"'), encoding="utf-8")
    with pytest.raises(RetrievalIndexError, match="The id 'r0' appears twice"):
        RetrievalIndex.from_pretrained(tmp_path)


def test_scan_and_row_index_agree(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('\n{"id": "a", "path": "a.png"}\n\n{"id": "b", "path": "http://x/b.png"}', encoding="utf-8")
    shard = JsonlShard.scan(str(path))  # blank lines and no final line end
    assert len(shard) == 2 and shard.record(1) == {"id": "b", "path": "http://x/b.png"} and shard.num_urls == 1
    assert np.array_equal(shard.hashes, id_hashes(["a", "b"]))
    shard.write_row_index(str(tmp_path / "m.rows.safetensors"))
    read = JsonlShard.read(str(path), str(tmp_path / "m.rows.safetensors"))
    assert read.row_index is not None and np.array_equal(read.offsets, shard.offsets)
    assert RecordTable.from_shards([read], "here") == [{"id": "a", "path": "a.png"}, shard.record(1)]


def test_a_set_is_checked_against_a_source_by_id_hash_without_parsing_a_record(tmp_path, monkeypatch):
    saved_set(tmp_path)
    loaded = RetrievalIndex.from_pretrained(tmp_path)
    loaded.records.append([{"id": "added", "path": "a.png"}])  # a row in memory counts too
    ids = [r["id"] for r in records_of(23)] + ["added"]
    assert np.array_equal(loaded.records.row_hashes(), id_hashes(ids))

    def no_parsing(*args):
        raise AssertionError("a record was parsed")

    monkeypatch.setattr(JsonlShard, "record", no_parsing)
    table = loaded.records
    assert table.is_ordered_subset_of(ids)
    assert table.is_ordered_subset_of(ids[:5] + ["unreadable"] + ids[5:])  # images that failed are left out
    assert not table.is_ordered_subset_of(ids[:-1])  # fewer ids than rows
    assert not table.is_ordered_subset_of(ids[1:] + ids[:1])  # the same ids in another order
    assert not table.is_ordered_subset_of(ids[:3] + ["other"] + ids[4:])  # one id differs
    assert not table.is_ordered_subset_of(ids[:3] + ["other"] + ids[3:5] + ids[6:] + ["more"])


def test_sorted_ids_are_saved_and_mapped_at_load_and_a_stale_or_corrupt_file_is_read_past(tmp_path, caplog):
    _, records = saved_set(tmp_path)
    assert config_of(tmp_path)["sorted_ids"] == record_table.SORTED_IDS_FILE
    sidecar = tmp_path / record_table.SORTED_IDS_FILE
    loaded = RetrievalIndex.from_pretrained(tmp_path)
    table = loaded.records
    # Mapped from the file (not sorted again), and the same lookups as a list.
    assert table._sorted_ids_file == os.path.realpath(sidecar) and isinstance(table._sorted_hashes, np.memmap)
    check_same_as_list(table, records)
    assert np.array_equal(table._sorted_hashes, np.sort(id_hashes(r["id"] for r in records)))

    # Rows added and saved in place: the file is rewritten for the new shards and maps again.
    loaded.add_embeddings(unit_rows(3, 1), records_of(3, prefix="new"))
    loaded.save_pretrained(tmp_path, max_shard_rows=7)
    again = RetrievalIndex.from_pretrained(tmp_path).records
    assert again._sorted_ids_file is not None and again.row_of("new2") == 25 and again == records + records_of(3, "new")
    good = sidecar.read_bytes()

    diffusers_logging.enable_propagation()
    caplog.set_level(std_logging.INFO, logger="gill_pipeline.retrieval")
    try:
        # A file from another set (other record files), a swapped pair of rows, garbage: each is read past, with the
        # reason logged, and the lookups are those of the records.
        other = tmp_path / "other"
        saved_set(other, n=26)
        arrays = record_table._mmap_safetensors_arrays(str(sidecar))
        swapped = {"hashes": np.array(arrays["hashes"]), "rows": np.array(arrays["rows"])}
        swapped["rows"][[0, -1]] = swapped["rows"][[-1, 0]]
        from safetensors import safe_open
        from safetensors.numpy import save_file

        with safe_open(str(sidecar), framework="np") as f:
            metadata = f.metadata()
        for bad, reason in [((other / record_table.SORTED_IDS_FILE).read_bytes(), "other record files"),
                            (None, "do not match the rows' id hashes"), (b"not a safetensors file", "cannot be read")]:
            if bad is None:
                save_file(swapped, str(sidecar), metadata=metadata)
            else:
                sidecar.write_bytes(bad)
            caplog.clear()
            table = RetrievalIndex.from_pretrained(tmp_path).records
            assert table._sorted_ids_file is None and reason in caplog.text, caplog.text
            assert table == records + records_of(3, "new")
            assert [table.row_of(r["id"]) for r in table] == list(range(26))
    finally:
        diffusers_logging.disable_propagation()
    # A config naming anything but the one file name is not followed.
    sidecar.write_bytes(good)
    config = config_of(tmp_path)
    config["sorted_ids"] = "../other/" + record_table.SORTED_IDS_FILE
    (tmp_path / INDEX_CONFIG_FILE).write_text(json.dumps(config))
    assert RetrievalIndex.from_pretrained(tmp_path).records._sorted_ids_file is None
