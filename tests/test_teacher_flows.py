"""Tests for data_util.teacher_flows: HDF5 teacher-flow store, published pickles, safe unpickling."""
import json
import os
import pickle

import h5py
import numpy as np
import pytest
import torch

from data_util.teacher_flows import (STORE_FORMAT, STORE_VERSION, TeacherFlowError, TeacherFlows,
                                     TeacherFlowWriter, pair_key, safe_load_flow_pickle)

SIZE = (8, 10, 12)  # non-cubic so a wrong transpose cannot pass
TEACHER = {"network": "VTN", "checkpoint_sha256": "abc123"}


def flow(seed, size=SIZE):
    return np.random.default_rng(seed).uniform(-4, 4, (3,) + size).astype(np.float32)


def manifest(teacher=TEACHER):
    return {"teacher": teacher, "dataset": "synth"}


def dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return str(path)


def close_to_f16(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# HDF5 store
# ------------------------------------------------------------------------------------------------

def test_pair_key():
    assert pair_key("synth_train_000", "synth_train_001") == "synth_train_000-synth_train_001"


def test_round_trip_and_layout(tmp_path):
    out = str(tmp_path / "flows.h5")
    a, b = flow(0), torch.from_numpy(flow(1))
    with TeacherFlowWriter(out, manifest(), SIZE) as writer:
        writer.write(pair_key("s0", "s1"), a)
        writer.write(pair_key("s1", "s0"), b)
        assert "s0-s1" in writer and "nope" not in writer and len(writer) == 2
        assert not os.path.exists(out) and os.path.exists(out + ".partial")
    assert os.path.exists(out) and not os.path.exists(out + ".partial")

    flows = TeacherFlows(out, SIZE)
    assert flows.keys() == ["s0-s1", "s1-s0"] and len(flows) == 2 and "s0-s1" in flows
    got = flows.get("s0-s1")
    assert got.dtype == np.float32 and got.shape == (3,) + SIZE
    close_to_f16(got, a)
    close_to_f16(flows.get("s1-s0"), b.numpy())

    [(file, n, stored)] = flows.sources()
    assert file == out and n == 2
    assert stored["format"] == STORE_FORMAT and stored["version"] == STORE_VERSION
    assert stored["image_size"] == list(SIZE) and stored["teacher"] == TEACHER
    assert stored["dataset"] == "synth" and "channel c moves axis c" in stored["layout"]

    with h5py.File(out, "r") as f:
        assert json.loads(f.attrs["manifest"]) == stored
        ds = f["flows/s0-s1"]
        assert ds.dtype == np.float16 and ds.shape == (3,) + SIZE and ds.chunks == (3,) + SIZE
        assert ds.compression == "gzip" and ds.compression_opts == 1 and ds.shuffle
        assert ds.attrs["complete"] == 1
    flows.close()


def test_resume_after_close_and_append_to_finished_store(tmp_path):
    out = str(tmp_path / "flows.h5")
    writer = TeacherFlowWriter(out, manifest(), SIZE)
    writer.write("a-b", flow(0))
    writer.write("b-a", flow(1))
    writer.close()
    assert os.path.exists(out + ".partial") and not os.path.exists(out)

    writer = TeacherFlowWriter(out, manifest(), SIZE)
    assert writer.keys() == ["a-b", "b-a"]
    writer.write("a-c", flow(2))
    writer.write("a-b", flow(3))  # overwrite
    writer.finish()
    assert os.path.exists(out) and not os.path.exists(out + ".partial")
    flows = TeacherFlows(out, SIZE)
    assert flows.keys() == ["a-b", "a-c", "b-a"]
    close_to_f16(flows.get("a-b"), flow(3))
    flows.close()

    # a finished store can be reopened to add pairs; the original manifest is kept
    with TeacherFlowWriter(out, dict(manifest(), dataset="other"), SIZE) as writer:
        assert len(writer) == 3 and not os.path.exists(out)
        writer.write("c-a", flow(4))
    flows = TeacherFlows(out, SIZE)
    assert len(flows) == 4 and flows.sources()[0][2]["dataset"] == "synth"


def test_interrupted_dataset_is_dropped_on_resume(tmp_path):
    out = str(tmp_path / "flows.h5")
    writer = TeacherFlowWriter(out, manifest(), SIZE)
    writer.write("a-b", flow(0))
    writer.close()
    with h5py.File(out + ".partial", "a") as f:
        f["flows"].create_dataset("b-a", data=np.zeros((3,) + SIZE, np.float16))
    # the reader ignores it too
    assert TeacherFlows(out + ".partial", SIZE).keys() == ["a-b"]
    writer = TeacherFlowWriter(out, manifest(), SIZE)
    assert writer.keys() == ["a-b"] and "b-a" not in writer
    writer.close()
    with h5py.File(out + ".partial", "r") as f:
        assert list(f["flows"]) == ["a-b"]


def test_incompatible_store_is_refused(tmp_path):
    out = str(tmp_path / "flows.h5")
    with TeacherFlowWriter(out, manifest(), SIZE) as writer:
        writer.write("a-b", flow(0))
    with pytest.raises(TeacherFlowError, match="different teacher/image size") as info:
        TeacherFlowWriter(out, manifest({"network": "VTN", "checkpoint_sha256": "other"}), SIZE)
    assert out in str(info.value)
    with pytest.raises(TeacherFlowError, match="different teacher/image size") as info:
        TeacherFlowWriter(out, manifest(), (8, 8, 8))
    assert out in str(info.value)
    # nothing was moved or changed
    assert os.path.exists(out) and not os.path.exists(out + ".partial")
    assert TeacherFlows(out, SIZE).keys() == ["a-b"]
    with pytest.raises(TeacherFlowError, match="image size"):
        TeacherFlows(out, (8, 8, 8))


def test_writer_refuses_bad_flows(tmp_path):
    out = str(tmp_path / "flows.h5")
    writer = TeacherFlowWriter(out, manifest(), SIZE)
    with pytest.raises(TeacherFlowError, match=r"pair 'a-b' has shape \(8, 10, 12, 3\), expected "
                                               r"\(3, 8, 10, 12\)"):
        writer.write("a-b", flow(0).transpose(1, 2, 3, 0))
    bad = flow(0)
    bad[1, 2, 3, 4] = np.nan
    with pytest.raises(TeacherFlowError, match="pair 'b-a' contains NaN/inf"):
        writer.write("b-a", bad)
    bad[1, 2, 3, 4] = 70000.0
    with pytest.raises(TeacherFlowError, match="pair 'c-a'.*float16 range"):
        writer.write("c-a", bad)
    assert len(writer) == 0
    writer.close()


def test_not_a_store(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(TeacherFlowError, match="not a readable teacher-flow store") as info:
        TeacherFlows(str(junk), SIZE)
    assert str(junk) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(TeacherFlowError, match="not a readable teacher-flow store"):
        TeacherFlowWriter(str(junk), manifest(), SIZE)
    other = str(tmp_path / "other.h5")
    with h5py.File(other, "w") as f:
        f["volume"] = np.zeros(3)
    with pytest.raises(TeacherFlowError, match="not a readable teacher-flow store") as info:
        TeacherFlows(other, SIZE)
    assert other in str(info.value)


# ------------------------------------------------------------------------------------------------
# published pickles
# ------------------------------------------------------------------------------------------------

def test_published_pickle_layout(tmp_path):
    arr = flow(5).transpose(1, 2, 3, 0).astype(np.float16)  # channels-last, as released
    path = dump(tmp_path / "Liver.pkl", {"a-b": arr})
    flows = TeacherFlows(path, SIZE)
    assert flows.keys() == ["a-b"] and flows.sources() == [(path, 1, None)]
    got = flows.get("a-b")
    assert got.dtype == np.float32 and got.shape == (3,) + SIZE and got.flags.c_contiguous
    np.testing.assert_array_equal(got, arr.transpose(3, 0, 1, 2).astype(np.float32))


def test_wrong_shape_pickle_flow_refused_on_get(tmp_path):
    path = dump(tmp_path / "t.pkl", {"a-b": np.zeros((3,) + SIZE, np.float16)})
    flows = TeacherFlows(path, SIZE)
    with pytest.raises(TeacherFlowError, match="pair 'a-b' has shape") as info:
        flows.get("a-b")
    assert path in str(info.value)


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_code_execution_pickle_is_refused(tmp_path):
    target = tmp_path / "pwned"
    path = dump(tmp_path / "evil.pkl", {"a-b": _Exploit(target)})
    with pytest.raises(TeacherFlowError, match="refusing to unpickle '.*system'"):
        safe_load_flow_pickle(path)
    with pytest.raises(TeacherFlowError, match="refusing to unpickle"):
        TeacherFlows(path, SIZE)
    assert not target.exists()


@pytest.mark.parametrize("obj, message", [
    ([np.zeros((2, 2), np.float16)], "got list"),
    ({"a-b": "not an array"}, "pair 'a-b' is a str"),
    ({"a-b": np.zeros((2, 2), np.int32)}, "pair 'a-b' has dtype int32"),
    ({"a-b": np.array([1.0, "x"], dtype=object)}, "pair 'a-b' has dtype object"),
    ({("a", "b"): np.zeros((2, 2), np.float16)}, "keys must be str"),
])
def test_unexpected_pickle_contents_are_refused(tmp_path, obj, message):
    path = dump(tmp_path / "bad.pkl", obj)
    with pytest.raises(TeacherFlowError, match=message) as info:
        safe_load_flow_pickle(path)
    assert path in str(info.value)


def test_truncated_and_missing_pickle(tmp_path):
    good = dump(tmp_path / "good.pkl", {"a-b": np.zeros(SIZE + (3,), np.float16)})
    assert list(safe_load_flow_pickle(good)) == ["a-b"]
    data = open(good, "rb").read()
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TeacherFlowError, match="truncated or corrupt pickle") as info:
        safe_load_flow_pickle(cut)
    assert str(cut) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(TeacherFlowError, match="no such file"):
        safe_load_flow_pickle(tmp_path / "missing.pkl")


# ------------------------------------------------------------------------------------------------
# directories, errors, pickling
# ------------------------------------------------------------------------------------------------

def test_directory_union_of_one_teachers_files(tmp_path):
    """Published pickles split over several files (no overlapping keys) read as one index; a
    leftover .partial store and other files are ignored. Mixing teachers is refused (test_faults_data)."""
    dump(tmp_path / "a_published.pkl", {"x-y": flow(6).transpose(1, 2, 3, 0).astype(np.float16),
                                        "p-q": flow(8).transpose(1, 2, 3, 0)})
    dump(tmp_path / "b_published.pkl", {"y-x": flow(9).transpose(1, 2, 3, 0)})
    leftover = TeacherFlowWriter(str(tmp_path / "c_store.h5"), manifest(), SIZE)
    leftover.write("z-z", flow(10))
    leftover.close()  # c_store.h5.partial is ignored
    (tmp_path / "notes.txt").write_text("ignored")

    flows = TeacherFlows(tmp_path, SIZE)
    assert flows.keys() == ["p-q", "x-y", "y-x"]
    assert [(os.path.basename(f), n) for f, n, _ in flows.sources()] == [("a_published.pkl", 2),
                                                                       ("b_published.pkl", 1)]
    close_to_f16(flows.get("x-y"), flow(6))
    close_to_f16(flows.get("y-x"), flow(9))

    stores = tmp_path / "stores"
    stores.mkdir()
    for name, key in (("run_3.h5", "x-y"), ("run_1000.h5", "y-x")):   # one teacher, disjoint pairs
        with TeacherFlowWriter(str(stores / name), manifest(), SIZE) as writer:
            writer.write(key, flow(len(name)))
    assert TeacherFlows(stores, SIZE).keys() == ["x-y", "y-x"]


def test_missing_paths_and_keys(tmp_path):
    with pytest.raises(TeacherFlowError, match="no such file or directory"):
        TeacherFlows(tmp_path / "missing", SIZE)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TeacherFlowError, match=r"no teacher-flow files \(\*\.h5 store or \*\.pkl\)"):
        TeacherFlows(empty, SIZE)
    path = dump(tmp_path / "t.pkl", {"a-b": np.zeros(SIZE + (3,), np.float16)})
    with pytest.raises(TeacherFlowError, match="no teacher flow for pair 'b-a'"):
        TeacherFlows(path, SIZE).get("b-a")


def test_pickle_nonfinite_flow_refused_on_get(tmp_path):
    arr = np.zeros(SIZE + (3,), np.float16)
    arr[0, 0, 0, 1] = np.inf
    flows = TeacherFlows(dump(tmp_path / "t.pkl", {"a-b": arr}), SIZE)
    with pytest.raises(TeacherFlowError, match="pair 'a-b' contains NaN/inf"):
        flows.get("a-b")


def test_reader_is_picklable_after_get(tmp_path):
    out = str(tmp_path / "flows.h5")
    with TeacherFlowWriter(out, manifest(), SIZE) as writer:
        writer.write("a-b", flow(0))
    flows = TeacherFlows(out, SIZE)
    first = flows.get("a-b")
    clone = pickle.loads(pickle.dumps(flows))
    np.testing.assert_array_equal(clone.get("a-b"), first)
    assert clone.keys() == ["a-b"]
    clone.close()
    flows.close()
    np.testing.assert_array_equal(flows.get("a-b"), first)  # reopened on demand
    flows.close()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_published_pickle_every_protocol(tmp_path, protocol):
    arr = np.arange(4 * 4 * 4 * 3, dtype=np.float16).reshape(4, 4, 4, 3)
    path = tmp_path / "flows.pkl"
    with open(path, "wb") as f:
        pickle.dump({"a-b": arr}, f, protocol=protocol)
    np.testing.assert_array_equal(TeacherFlows(str(path), (4, 4, 4)).get("a-b"), arr.transpose(3, 0, 1, 2))
