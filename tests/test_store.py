"""LocalStore: name validation, atomic writes, commit markers, rank completeness, store resolution.

Everything written is checked with plain pyarrow / json, not with the package's own reader, except
where the reader itself is under test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from mldbg_callbacks.core.trace_core import TraceCore
from mldbg_callbacks.errors import InvalidNameError, MLDebuggerError, NoTracesError
from mldbg_callbacks.store import LocalStore, RemoteStore, resolve_store
from mldbg_callbacks.tasks.classification import ClassificationCodec
from mldbg_callbacks.training import ClassificationTracer
from mldbg_callbacks.core.vectors import decode_vectors, vector_table

from trace_helpers import barrier

MODEL, VERSION = "m", "v1"


# -- helpers ---------------------------------------------------------------------------------------
def identity(x):
    return x


def make_tracer(store, **kwargs) -> ClassificationTracer:
    kwargs.setdefault("feature_layer", False)
    return ClassificationTracer(identity, kwargs.pop("model_name", MODEL), kwargs.pop("version_name", VERSION),
                                store=store, **kwargs)


def rank_dir(root: Path, dataset_type="train", n_epoch=0, rank=0, model=MODEL, version=VERSION) -> Path:
    return Path(root) / model / version / "traces" / f"dataset_type={dataset_type}" / f"n_epoch={n_epoch}" / f"rank={rank}"


def small_table(ids, num_classes=3, seed=0) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = [str(i) for i in ids]
    logits = rng.standard_normal((len(ids), num_classes)).astype(np.float32)
    return vector_table({
        "input_id": pa.array(ids, pa.string()),
        "label": pa.array(rng.integers(0, num_classes, len(ids)), pa.int64()),
        "logits": logits,  # a vector column, as the codec writes it
    })


def all_files(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.is_file()]


# -- name validation -------------------------------------------------------------------------------
BAD_NAMES = [
    pytest.param("a/b", "path separator", id="slash"),
    pytest.param("a\\b", "path separator", id="backslash"),
    pytest.param("..", "'..'", id="dotdot"),
    pytest.param("../escape", "path separator", id="parent-path"),
    pytest.param("a..b", "'..'", id="inner-dotdot"),
    pytest.param("a\nb", "control character", id="newline"),
    pytest.param("a\x00b", "control character", id="nul"),
    pytest.param("tab\t", "control character", id="tab"),
    pytest.param("del\x7f", "control character", id="del"),
    pytest.param("", "must not be empty", id="empty"),
    pytest.param(".hidden", "not a valid name", id="leading-dot"),
    pytest.param("with space", "not a valid name", id="space"),
    pytest.param("x" * 129, "not a valid name", id="too-long"),
    pytest.param(5, "must be a string", id="int"),
    pytest.param(None, "must be a string", id="none"),
    pytest.param(b"bytes", "must be a string", id="bytes"),
    pytest.param(Path("p"), "must be a string", id="path-object"),
]


@pytest.mark.parametrize("bad, hint", BAD_NAMES)
@pytest.mark.parametrize("argument", ["model_name", "version_name"])
def test_constructor_rejects_bad_names(tmp_path, argument, bad, hint):
    names = {"model_name": MODEL, "version_name": VERSION, argument: bad}
    with pytest.raises(InvalidNameError) as info:
        ClassificationTracer(identity, store=tmp_path / "store", feature_layer=False, **names)
    message = str(info.value)
    assert argument in message and hint in message
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "store").exists() and not (tmp_path / "escape").exists()


@pytest.mark.parametrize("bad, hint", BAD_NAMES)
@pytest.mark.parametrize("strict", [False, True])
def test_record_rejects_bad_dataset_type(tmp_path, bad, hint, strict):
    tracer = make_tracer(tmp_path / "store", strict=strict)
    with pytest.raises(InvalidNameError) as info:  # a usage error: raised even with strict=False
        tracer.record(np.zeros((2, 3), np.float32), np.array([0, 1]), input_ids=np.array([0, 1]),
                      dataset_type=bad)
    assert "dataset_type" in str(info.value) and hint in str(info.value)
    tracer.wait_for_save()
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.parquet"))
    assert not (tmp_path / "escape").exists()


def test_tracer_call_rejects_bad_dataset_type(tmp_path):
    tracer = make_tracer(tmp_path / "store")
    with pytest.raises(InvalidNameError, match="dataset_type"):
        tracer(np.zeros((2, 3), np.float32), np.array([0, 1]), input_ids=[0, 1], dataset_type="../val")


@pytest.mark.parametrize("name", ["resnet18", "v1.2-rc+1@gpu", "A_b", "0", "x" * 128, "train"])
def test_good_names_are_accepted_and_become_directories(tmp_path, name):
    tracer = ClassificationTracer(identity, name, name, store=tmp_path, feature_layer=False)
    tracer.record(np.eye(3, dtype=np.float32) * 5, np.arange(3), input_ids=np.arange(3), dataset_type=name)
    tracer.wait_for_save()
    marker = rank_dir(tmp_path, dataset_type=name, model=name, version=name) / "_COMMITTED"
    assert marker.is_file()


def test_reader_validates_names(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(InvalidNameError, match="model_name"):
        store.partitions("../etc", VERSION)
    with pytest.raises(InvalidNameError, match="dataset_type"):
        store.read_traces(MODEL, VERSION, "a/b", [0])


# -- atomic writes ---------------------------------------------------------------------------------
def test_no_temporary_files_left_after_a_run(tmp_path, rng):
    core = TraceCore(ClassificationCodec(), LocalStore(tmp_path).run(MODEL, VERSION), rows_per_part=5)
    for epoch in range(3):
        for start in range(0, 24, 8):
            ids = np.arange(start, start + 8)
            core.record(rng.standard_normal((8, 4)).astype(np.float32), rng.integers(0, 4, 8), input_ids=ids,
                        n_epoch=epoch, features=rng.standard_normal((8, 6)).astype(np.float32))
    core.wait_for_save()
    names = [p.name for p in all_files(tmp_path)]
    assert names, "nothing was written"
    assert not [n for n in names if n.startswith(".tmp-")]
    assert {n for n in names if not n.endswith(".parquet")} == {"_COMMITTED", "_meta.json"}
    for part in tmp_path.rglob("*.parquet"):
        pq.read_table(part)  # every file is a complete Parquet file


def test_failed_part_write_leaves_no_file(tmp_path, monkeypatch):
    import mldbg_callbacks.store.local as local

    writer = LocalStore(tmp_path).run(MODEL, VERSION)

    def half_write(table, where, **kwargs):
        with open(where, "wb") as handle:
            handle.write(b"PAR1 truncated")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local.pq, "write_table", half_write)
    with pytest.raises(OSError, match="No space left"):
        writer.write_part("train", 0, 0, small_table(range(4)))
    leftovers = all_files(tmp_path)
    assert leftovers == [], leftovers


def test_failed_commit_keeps_previous_marker(tmp_path, monkeypatch):
    import mldbg_callbacks.store.local as local

    writer = LocalStore(tmp_path).run(MODEL, VERSION)
    part = writer.write_part("train", 0, 0, small_table(range(4)))
    writer.commit("train", 0, 0, [part], 4, 1)
    marker = rank_dir(tmp_path) / "_COMMITTED"
    before = marker.read_bytes()

    def broken_fsync(fd):  # the new marker is written to its temporary file, then the disk fails
        raise OSError(5, "I/O error")

    part2 = writer.write_part("train", 0, 0, small_table(range(4, 8)))
    monkeypatch.setattr(local.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="I/O error"):
        writer.commit("train", 0, 0, [part2], 4, 1)
    monkeypatch.undo()
    assert marker.read_bytes() == before
    assert json.loads(before)["parts"] == [part]
    assert not [p for p in all_files(tmp_path) if p.name.startswith(".tmp-")]


# -- commit markers --------------------------------------------------------------------------------
def test_reader_ignores_spilled_but_uncommitted_parts(tmp_path, rng):
    store = LocalStore(tmp_path)
    core = TraceCore(ClassificationCodec(), store.run(MODEL, VERSION), rows_per_part=4)
    logits = rng.standard_normal((10, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 10)
    core.record(logits[:5], labels[:5], input_ids=np.arange(5))
    core.record(logits[5:], labels[5:], input_ids=np.arange(5, 10))
    barrier(core)

    folder = rank_dir(tmp_path)
    spilled = sorted(folder.glob("*.parquet"))
    assert len(spilled) == 2, "rows_per_part=4 should have spilled each 5-row batch"
    assert not (folder / "_COMMITTED").exists()
    (partition,) = store.partitions(MODEL, VERSION)
    assert partition.ranks_committed == () and partition.ranks_pending == (0,)
    assert not partition.complete and partition.rows == 0
    with pytest.raises(NoTracesError):
        store.read_traces(MODEL, VERSION, "train", [0])

    core.wait_for_save(n_epoch=0)
    (partition,) = store.partitions(MODEL, VERSION)
    assert partition.complete and partition.ranks_committed == (0,) and partition.rows == 10
    table = store.read_traces(MODEL, VERSION, "train", [0]).sort_by("input_id")
    order = np.argsort([str(i) for i in range(10)])
    assert table.column("input_id").to_pylist() == sorted(str(i) for i in range(10))
    np.testing.assert_array_equal(table.column("label").to_numpy(), labels[order])
    np.testing.assert_array_equal(decode_vectors(table, "logits"), logits[order])
    assert set(table.column("n_epoch").to_pylist()) == {0} and set(table.column("rank").to_pylist()) == {0}


def test_reader_uses_only_parts_listed_in_the_marker(tmp_path):
    store = LocalStore(tmp_path)
    writer = store.run(MODEL, VERSION)
    committed = writer.write_part("train", 0, 0, small_table(["a", "b", "c"]))
    writer.commit("train", 0, 0, [committed], 3, 1)
    orphan = writer.write_part("train", 0, 0, small_table(["x", "y"]))  # e.g. spilled, then the process died
    assert (rank_dir(tmp_path) / f"_pending-{orphan}").is_file()
    assert not (rank_dir(tmp_path) / orphan).exists()
    assert json.loads((rank_dir(tmp_path) / "_COMMITTED").read_text())["parts"] == [committed]

    table = store.read_traces(MODEL, VERSION, "train", [0])
    assert sorted(table.column("input_id").to_pylist()) == ["a", "b", "c"]
    (partition,) = store.partitions(MODEL, VERSION)
    assert partition.rows == 3 and partition.complete
    # readers that know nothing of _COMMITTED skip the pending part too (pyarrow ignores '_' prefixes)
    plain = ds.dataset(tmp_path / MODEL / VERSION / "traces", format="parquet", partitioning="hive").to_table()
    assert sorted(plain.column("input_id").to_pylist()) == ["a", "b", "c"]


def test_commits_accumulate_parts_and_rows(tmp_path):
    store = LocalStore(tmp_path)
    writer = store.run(MODEL, VERSION)
    p1 = writer.write_part("train", 0, 0, small_table(["a", "b"]))
    writer.commit("train", 0, 0, [p1], 2, 1)
    p2 = writer.write_part("train", 0, 0, small_table(["c"]))
    writer.commit("train", 0, 0, [p2], 1, 1)
    marker = json.loads((rank_dir(tmp_path) / "_COMMITTED").read_text())
    assert marker == {"parts": [p1, p2], "rows": 3, "world_size": 1}
    assert p1 != p2
    assert sorted(store.read_traces(MODEL, VERSION, "train", [0]).column("input_id").to_pylist()) == ["a", "b", "c"]


def test_partial_rank_commit_is_incomplete(tmp_path):
    store = LocalStore(tmp_path)
    rank0 = store.run(MODEL, VERSION)
    rank1 = store.run(MODEL, VERSION)  # another process: its own writer
    part0 = rank0.write_part("train", 0, 0, small_table(["a", "b"]))
    rank0.commit("train", 0, 0, [part0], 2, world_size=2)
    part1 = rank1.write_part("train", 0, 1, small_table(["c", "d", "e"]))

    (partition,) = store.partitions(MODEL, VERSION)
    assert partition.ranks_committed == (0,) and partition.ranks_pending == (1,)
    assert partition.world_size == 2 and partition.rows == 2
    assert partition.complete is False
    assert sorted(store.read_traces(MODEL, VERSION, "train", [0]).column("input_id").to_pylist()) == ["a", "b"]
    frame = store.partitions_frame(MODEL, VERSION)
    assert frame.to_dict("records") == [dict(dataset_type="train", n_epoch=0, rows=2, complete=False,
                                             ranks_committed=1, world_size=2)]

    rank1.commit("train", 0, 1, [part1], 3, world_size=2)
    (partition,) = store.partitions(MODEL, VERSION)
    assert partition.complete and partition.ranks_committed == (0, 1) and partition.rows == 5
    table = store.read_traces(MODEL, VERSION, "train", [0])
    by_rank = {r: sorted(i for i, rr in zip(table.column("input_id").to_pylist(), table.column("rank").to_pylist())
                         if rr == r) for r in (0, 1)}
    assert by_rank == {0: ["a", "b"], 1: ["c", "d", "e"]}


def test_missing_rank_without_any_folder_is_incomplete(tmp_path):
    store = LocalStore(tmp_path)
    writer = store.run(MODEL, VERSION)
    part = writer.write_part("val", 3, 0, small_table(["a"]))
    writer.commit("val", 3, 0, [part], 1, world_size=4)
    (partition,) = store.partitions(MODEL, VERSION)
    assert (partition.dataset_type, partition.n_epoch, partition.world_size) == ("val", 3, 4)
    assert not partition.complete


def test_partitions_of_an_empty_store(tmp_path):
    store = LocalStore(tmp_path / "nothing")
    assert store.partitions(MODEL, VERSION) == []
    assert store.list_models() == []
    with pytest.raises(NoTracesError, match="MLD_HOME"):
        store.read_meta(MODEL, VERSION)


# -- store resolution ------------------------------------------------------------------------------
def test_api_endpoint_selects_the_remote_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLD_API_ENDPOINT", "https://api.example.invalid/")
    monkeypatch.setenv("MLD_API_KEY", "mldbg_secret")
    monkeypatch.setenv("MLD_HOME", str(tmp_path / "home"))
    store = resolve_store(None)
    assert isinstance(store, RemoteStore) and store.endpoint == "https://api.example.invalid"
    assert isinstance(resolve_store("http://localhost:8000"), RemoteStore)
    assert not (tmp_path / "home").exists()


def test_remote_store_without_key_names_the_fix(monkeypatch):
    monkeypatch.delenv("MLD_API_KEY", raising=False)
    with pytest.raises(MLDebuggerError, match="MLD_API_KEY.*mldbg keys create"):
        resolve_store("http://localhost:8000")


def test_explicit_store_wins_over_api_endpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("MLD_API_ENDPOINT", "https://api.example.invalid")
    assert resolve_store(tmp_path / "explicit").root == (tmp_path / "explicit").resolve()


def test_mld_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLD_HOME", str(tmp_path / "home"))
    assert resolve_store(None).root == (tmp_path / "home").resolve()
    tracer = ClassificationTracer(identity, MODEL, VERSION, feature_layer=False)
    tracer.record(np.eye(2, dtype=np.float32), np.array([0, 1]), input_ids=np.array([7, 8]))
    tracer.wait_for_save()
    assert (rank_dir(tmp_path / "home") / "_COMMITTED").is_file()


def test_default_store_is_mldbg_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLD_HOME", raising=False)
    monkeypatch.delenv("MLD_API_ENDPOINT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_store().root == (tmp_path / "mldbg").resolve()
    tracer = ClassificationTracer(identity, MODEL, VERSION, feature_layer=False)
    tracer.record(np.eye(2, dtype=np.float32), np.array([0, 1]), input_ids=np.array([7, 8]))
    tracer.wait_for_save()
    assert (rank_dir(tmp_path / "mldbg") / "_COMMITTED").is_file()


def test_file_url_and_store_instance(tmp_path):
    assert resolve_store(f"file://{tmp_path}/s").root == (tmp_path / "s").resolve()
    store = LocalStore(tmp_path / "t")
    assert resolve_store(store) is store
    assert ClassificationTracer(identity, MODEL, VERSION, store=store, feature_layer=False).store is store


# -- the Parquet contract --------------------------------------------------------------------------
def test_parquet_is_readable_with_plain_pyarrow_dataset(tmp_path, rng):
    num_classes, width = 4, 6
    tracer = ClassificationTracer(identity, MODEL, VERSION, store=tmp_path, feature_layer=False)
    expected = {}
    for dataset_type in ("train", "val"):
        for epoch in (0, 1):
            logits = rng.standard_normal((6, num_classes)).astype(np.float32)
            labels = rng.integers(0, num_classes, 6)
            features = rng.standard_normal((6, width)).astype(np.float32)
            ids = np.array([f"{dataset_type}-{i}" for i in range(6)])
            tracer.record(logits, labels, input_ids=ids, dataset_type=dataset_type, n_epoch=epoch, features=features)
            for i in range(6):
                expected[(dataset_type, epoch, ids[i])] = (labels[i], logits[i], features[i])
    tracer.wait_for_save()

    dataset = ds.dataset(tmp_path / MODEL / VERSION / "traces", format="parquet", partitioning="hive")
    table = dataset.to_table()
    assert set(table.column_names) == {"input_id", "label", "logits", "features", "dataset_type", "n_epoch", "rank"}
    schema = table.schema
    assert schema.field("input_id").type == pa.string()
    assert schema.field("label").type == pa.int64()
    # vectors: fixed-size binary whose field metadata says how to decode it (docs/storage.md)
    assert schema.field("logits").type == pa.binary(4 * num_classes)
    assert schema.field("logits").metadata == {b"mldbg.dtype": b"<f4", b"mldbg.width": str(num_classes).encode()}
    assert schema.field("features").type == pa.binary(2 * width)
    assert schema.field("features").metadata == {b"mldbg.dtype": b"<f2", b"mldbg.width": str(width).encode()}
    assert table.num_rows == len(expected)
    rows = table.to_pylist()
    for row in rows:
        label, logits, features = expected[(row["dataset_type"], int(row["n_epoch"]), row["input_id"])]
        assert row["rank"] == 0 and row["label"] == label
        np.testing.assert_array_equal(np.frombuffer(row["logits"], "<f4"), logits)
        np.testing.assert_array_equal(np.frombuffer(row["features"], "<f2"), features.astype(np.float16))
    assert len({(r["dataset_type"], r["n_epoch"], r["input_id"]) for r in rows}) == len(expected)

    meta = json.loads((tmp_path / MODEL / VERSION / "_meta.json").read_text())
    assert meta["task"] == "classification" and meta["num_classes"] == num_classes
    assert meta["output_kind"] == "logits" and meta["feature_dim"] == width
    assert meta["model_name"] == MODEL and meta["version_name"] == VERSION


def test_plain_pandas_can_read_one_partition(tmp_path):
    import pandas as pd

    tracer = make_tracer(tmp_path)
    tracer.record(np.eye(3, dtype=np.float32) * 4, np.array([0, 1, 2]), input_ids=np.array([10, 11, 12]), n_epoch=2)
    tracer.wait_for_save()
    frame = pd.read_parquet(rank_dir(tmp_path, n_epoch=2))
    assert sorted(frame["input_id"]) == ["10", "11", "12"]
    assert frame.set_index("input_id")["label"].to_dict() == {"10": 0, "11": 1, "12": 2}


def test_meta_refuses_a_second_task_in_one_version(tmp_path):
    writer = LocalStore(tmp_path).run(MODEL, VERSION)
    writer.write_meta({"task": "classification", "num_classes": 3})
    with pytest.raises(ValueError, match="another version_name"):
        writer.write_meta({"task": "object_detection"})
    assert json.loads((tmp_path / MODEL / VERSION / "_meta.json").read_text())["task"] == "classification"


def test_run_writers_of_different_processes_never_share_part_names(tmp_path):
    store = LocalStore(tmp_path)
    a, b = store.run(MODEL, VERSION), store.run(MODEL, VERSION)
    names = {a.write_part("train", 0, 0, small_table(["a"])), b.write_part("train", 0, 0, small_table(["b"]))}
    assert len(names) == 2
    assert len(list(rank_dir(tmp_path).glob("*.parquet"))) == 2


def test_store_root_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = LocalStore("relative/dir")
    monkeypatch.chdir(os.path.dirname(tmp_path))
    assert store.root == tmp_path / "relative" / "dir"
