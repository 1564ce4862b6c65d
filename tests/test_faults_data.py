"""Trustworthy runs, data side: bad dataset values, badly typed dataset JSON, mixed teacher-flow
folders, and full or read-only output folders of the data writers all end in one clear error line
(naming the file or flag and the problem), a non-zero exit, no traceback and nothing half-written."""
import json
import os
import pickle
import subprocess
import sys

import h5py
import numpy as np
import pytest

from data_util import DatasetError, RCNDataset
from data_util.formats import open_dataset
from data_util.learn2reg import Learn2RegDataset
from data_util.teacher_flows import TeacherFlowError, TeacherFlows, TeacherFlowWriter
from faults import ROOT, assert_clean_error, full_disk, leftovers, read_only_dir, run_script  # noqa: F401

S = 16


def volume(seed=0, shape=(S, S, S)):
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def good_scan(seed=0):
    seg = np.zeros((S, S, S), np.uint8)
    seg[4:10, 4:10, 4:10] = 255
    points = np.array([[0, 0, 0], [-1, -1, -1], [S - 1, 7.5, S - 0.5], [-0.5, 3, 3]], np.float32)
    return {"volume": volume(seed), "segmentation": seg, "point": points}


def write_dataset(folder, groups, **config):
    os.makedirs(folder, exist_ok=True)
    with h5py.File(os.path.join(folder, "d.h5"), "w") as f:
        for key, data in groups.items():
            for name, value in data.items():
                f.create_dataset(f"{key}/{name}", data=value)
    cfg = {"files": {"/": {"type": "HDF5", "path": "d.h5"}}, "image_size": [S, S, S],
           "subsets": {"t": list(groups)}, "schemes": {"1": {"t": 1.0}}}
    cfg.update(config)
    path = os.path.join(folder, "d.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def one_line(exc_info, *needles):
    message = str(exc_info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle.lower() in message.lower(), f"{needle!r} not in {message!r}"
    return message


# ------------------------------------------------------------------------------------------------
# 1. HDF5 dataset values
# ------------------------------------------------------------------------------------------------

def _bad(name):
    scan = good_scan(1)
    if name == "normalised":
        scan["volume"] = np.random.default_rng(0).random((S, S, S)).astype(np.float32)
    elif name == "hounsfield":
        scan["volume"] = np.random.default_rng(0).integers(-1000, 1500, (S, S, S)).astype(np.int16)
    elif name == "above_255":
        scan["volume"] = np.random.default_rng(0).integers(0, 4000, (S, S, S)).astype(np.uint16)
    elif name == "all_zero":
        scan["volume"] = np.zeros((S, S, S), np.uint8)
    elif name == "constant":
        scan["volume"] = np.full((S, S, S), 80, np.uint8)
    elif name == "seg_fractional":
        scan["segmentation"] = scan["segmentation"].astype(np.float32) * 0.5   # 127.5 after linear resampling
    elif name == "seg_negative":
        scan["segmentation"] = scan["segmentation"].astype(np.int16) - 1
    elif name == "point_outside":
        scan["point"][2] = [3, S + 2, 4]
    elif name == "point_partly_missing":
        scan["point"][2] = [-1, 5, 5]
    elif name == "nan":
        scan["volume"] = scan["volume"].astype(np.float32)
        scan["volume"][1, 2, 3] = np.nan
    elif name == "bool_volume":
        scan["volume"] = scan["volume"] > 100
    return scan


VALUE_CASES = {"normalised": "looks normalised", "hounsfield": "convert_dataset.py",
               "above_255": "outside the 0..255", "all_zero": "all zero", "constant": "constant (80",
               "seg_fractional": "non-integer values (e.g. 127.5)", "seg_negative": "negative values",
               "point_outside": "landmark point 2 (3, 18, 4) lies outside", "point_partly_missing": "landmark point 2",
               "nan": "NaN", "bool_volume": "dtype bool"}


@pytest.mark.parametrize("case", sorted(VALUE_CASES))
def test_bad_dataset_values_are_refused_at_validation_and_on_load(tmp_path, case):
    groups = {"a": good_scan(0), "b": good_scan(2), "bad": _bad(case), "c": good_scan(3)}
    path = write_dataset(str(tmp_path), groups)
    with pytest.raises(DatasetError) as info:
        RCNDataset(path)                                  # validate(): the sampled entries include the last one
    one_line(info, "d.h5", "'bad'", VALUE_CASES[case])
    ds = RCNDataset(path, check_files=False)
    ds.load("a")
    with pytest.raises(DatasetError) as info:             # every load checks its own entry in full
        ds.load("bad")
    one_line(info, "d.h5", "'bad'", VALUE_CASES[case])


def test_validate_samples_a_few_entries_and_load_checks_the_rest(tmp_path):
    groups = {f"s{i}": good_scan(i) for i in range(7)}
    groups["s1"] = _bad("normalised")                    # not among first/middle/last
    path = write_dataset(str(tmp_path), groups)
    ds = RCNDataset(path)
    with pytest.raises(DatasetError) as info:
        ds.load("s1")
    one_line(info, "'s1'", "looks normalised")


def test_published_layouts_stay_valid(tmp_path):
    labels = np.random.default_rng(0).choice([0, 21, 22, 181], (S, S, S)).astype(np.int32)
    groups = {"mask": good_scan(0), "labels": dict(good_scan(1), segmentation=labels),
              "float_255": dict(good_scan(2), volume=good_scan(2)["volume"].astype(np.float32)),
              "no_extras": {"volume": volume(3)}}
    ds = RCNDataset(write_dataset(str(tmp_path), groups))
    for entry in groups:
        assert ds.load(entry)["volume"].max() > 1


# ------------------------------------------------------------------------------------------------
# 2. dataset JSON with wrong types
# ------------------------------------------------------------------------------------------------

RCN_JSON_CASES = [("image_size", "abc"), ("image_size", [16, 16, "x"]), ("subsets", 5), ("subsets", {"t": 5}),
                  ("schemes", {"1": 5}), ("schemes", {"1": {"t": "0.5"}}), ("schemes", {"1": {"t": None}}),
                  ("segmentation_class_value", ["1", "2"]), ("segmentation_class_value", {"liver": "1"}),
                  ("files", {"/": {"path": 5}}), ("atlas", 5), ("image_type", ["x"])]


@pytest.mark.parametrize("key,value", RCN_JSON_CASES)
def test_rcn_json_wrong_types(tmp_path, key, value):
    path = write_dataset(str(tmp_path), {"a": good_scan(0), "b": good_scan(1)}, **{key: value})
    with pytest.raises(DatasetError) as info:
        open_dataset(path)
    one_line(info, "d.json", key.rstrip("s") if key != "files" else "files['/'].path")


def _l2r(tmp_path, constant=False, labels_float=False, **changes):
    import nibabel as nib

    rng = np.random.default_rng(0)
    for sub in ("img", "label"):
        os.makedirs(tmp_path / sub, exist_ok=True)
    for i in (1, 2, 3):
        image = rng.random((S, S, S)).astype(np.float32)
        if constant and i == 2:
            image[:] = 0
        label = rng.integers(0, 3, (S, S, S)).astype(np.float32)
        if labels_float and i == 2:
            label = label * 0.5
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "img" / f"h_{i:03d}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / "label" / f"h_{i:03d}.nii.gz"))
    cfg = {"format": "learn2reg", "root": ".", "image": "img/h_{id:03d}.nii.gz", "label": "label/h_{id:03d}.nii.gz",
           "labels": {"a": 1, "b": 2}, "splits": {"1": {"ids": "*"}}}
    cfg.update(changes)
    path = tmp_path / "l2r.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("key,value", [("labels", ["a", "b"]), ("labels", {"a": "1"}), ("crop", "abc"),
                                       ("crop", ["1", "2", "3"]), ("root", 5), ("splits", {"1": {"ids": 5}}),
                                       ("normalisation", 5), ("description", ["x"])])
def test_learn2reg_json_wrong_types(tmp_path, key, value):
    path = _l2r(tmp_path, **{key: value})
    with pytest.raises(DatasetError) as info:
        open_dataset(path)
    one_line(info, "l2r.json", key.rstrip("s"))


def test_learn2reg_2021_json_wrong_types(tmp_path):
    _l2r(tmp_path)
    for key, value in (("training", "x"), ("labels", ["a"]), ("registration_val", 5)):
        cfg = {"training": [{"image": "img/h_001.nii.gz", "label": "label/h_001.nii.gz"}],
               "registration_val": [{"fixed": "img/h_002.nii.gz", "moving": "img/h_003.nii.gz"}],
               "labels": {"0": "background", "1": "a"}}
        cfg[key] = value
        (tmp_path / "dataset.json").write_text(json.dumps(cfg))
        with pytest.raises(DatasetError) as info:
            open_dataset(str(tmp_path / "dataset.json"))
        one_line(info, "dataset.json")


def test_learn2reg_blank_image_and_fractional_labels(tmp_path):
    ds = Learn2RegDataset(_l2r(tmp_path, constant=True))
    ds.load("1")
    with pytest.raises(DatasetError) as info:
        ds.load("2")
    one_line(info, "h_002.nii.gz", "all zero")
    ds = Learn2RegDataset(_l2r(tmp_path / "f", labels_float=True))
    with pytest.raises(DatasetError) as info:
        ds.load("2")
    one_line(info, "label/h_002.nii.gz", "non-integer")


# ------------------------------------------------------------------------------------------------
# 3. teacher-flow folders must hold one teacher's flows
# ------------------------------------------------------------------------------------------------

SIZE = (4, 5, 6)


def _store(path, teacher, keys):
    with TeacherFlowWriter(str(path), {"teacher": teacher}, SIZE) as writer:
        for key in keys:
            writer.write(key, np.zeros((3,) + SIZE, np.float32))


def _pickle(path, keys):
    with open(path, "wb") as f:
        pickle.dump({k: np.zeros(SIZE + (3,), np.float16) for k in keys}, f)


def test_teacher_folder_refuses_stores_of_different_teachers(tmp_path):
    _store(tmp_path / "vtn_3.h5", {"step": 3}, ["a-b"])
    _store(tmp_path / "vtn_1000.h5", {"step": 1000}, ["b-a"])
    with pytest.raises(TeacherFlowError) as info:
        TeacherFlows(tmp_path, SIZE)
    one_line(info, "different teachers", "vtn_3.h5", "vtn_1000.h5", "--pretrained_flow_path FILE")
    assert TeacherFlows(tmp_path / "vtn_3.h5", SIZE).keys() == ["a-b"]    # one file is fine


def test_teacher_folder_refuses_a_pair_in_two_files(tmp_path):
    _store(tmp_path / "run_1000.h5", {"step": 5}, ["a-b", "c-d"])
    _store(tmp_path / "run_3.h5", {"step": 5}, ["a-b"])
    with pytest.raises(TeacherFlowError) as info:
        TeacherFlows(tmp_path, SIZE)
    one_line(info, "pair 'a-b'", "run_1000.h5", "run_3.h5", "--pretrained_flow_path FILE")
    pkl = tmp_path / "pkl"
    pkl.mkdir()
    _pickle(pkl / "part_1.pkl", ["a-b", "x-y"])
    _pickle(pkl / "part_2.pkl", ["x-y", "y-x"])
    with pytest.raises(TeacherFlowError) as info:
        TeacherFlows(pkl, SIZE)
    one_line(info, "pair 'x-y'", "part_1.pkl", "part_2.pkl")


def test_teacher_folder_refuses_stores_mixed_with_published_pickles(tmp_path):
    _pickle(tmp_path / "published.pkl", ["a-b"])
    _store(tmp_path / "ours.h5", {"step": 1}, ["b-a"])
    with pytest.raises(TeacherFlowError) as info:
        TeacherFlows(tmp_path, SIZE)
    one_line(info, "different teachers", "ours.h5", "published.pkl", "--pretrained_flow_path FILE")


def test_teacher_folder_of_disjoint_published_pickles_is_fine(tmp_path):
    _pickle(tmp_path / "part_1.pkl", ["a-b"])
    _pickle(tmp_path / "part_2.pkl", ["b-a"])
    assert TeacherFlows(tmp_path, SIZE).keys() == ["a-b", "b-a"]


# ------------------------------------------------------------------------------------------------
# 4. full disks and read-only folders
# ------------------------------------------------------------------------------------------------

def run_module(module, *args, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_synthetic_generator_on_a_full_disk(full_disk):
    out = os.path.join(full_disk("256k"), "data")
    proc = run_module("data_util.synthetic", "--out", out, "--size", 32, "--train", 2, "--val", 1)
    assert_clean_error(proc, "synthetic.h5", "no space left on device")
    assert proc.returncode not in (-11, 139)
    assert os.listdir(out) == [] and leftovers(out) == []


def test_synthetic_generator_in_a_read_only_folder(read_only_dir):
    proc = run_module("data_util.synthetic", "--out", read_only_dir, "--size", 16, "--train", 1, "--val", 0)
    assert_clean_error(proc, read_only_dir)
    assert os.listdir(read_only_dir) == []


@pytest.mark.parametrize("flag,value", [("--size", "0"), ("--train", "-1"), ("--ffd_std", "nan"),
                                        ("--seed", "-2"), ("--name", "../x")])
def test_synthetic_generator_refuses_nonsense_flags(tmp_path, flag, value):
    proc = run_module("data_util.synthetic", "--out", tmp_path / "d", flag, value)
    assert_clean_error(proc, flag)
    assert not (tmp_path / "d").exists()


def test_hippocampus_generator_on_a_full_disk_and_bad_flags(full_disk, tmp_path):
    out = os.path.join(full_disk("256k"), "hippo")
    proc = run_module("data_util.synthetic_hippocampus", "--out", out, "--n_train", 2, "--n_val", 2)
    assert_clean_error(proc, out, "no space left on device")
    assert not os.path.exists(out) and leftovers(os.path.dirname(out)) == []
    proc = run_module("data_util.synthetic_hippocampus", "--out", tmp_path / "h", "--n_train", "nan")
    assert_clean_error(proc, "--n_train")
    proc = run_module("data_util.synthetic_hippocampus", "--out", tmp_path / "h", "--shape", 16, 0, 16)
    assert_clean_error(proc, "--shape")
    assert not (tmp_path / "h").exists()


def test_teacher_store_on_a_full_disk_stops_before_hdf5_and_resumes(full_disk, tmp_path):
    out = os.path.join(full_disk("1m"), "flows.h5")
    rng = np.random.default_rng(0)
    writer = TeacherFlowWriter(out, {"teacher": {"step": 1}}, (S, S, S))
    with pytest.raises(TeacherFlowError) as info:
        for i in range(100):
            writer.write(f"p{i}-q", rng.normal(size=(3, S, S, S)).astype(np.float32))
    one_line(info, "flows.h5.partial", "no space left on device", "run the same command again to resume")
    writer.close()
    stored = i
    assert stored > 0 and not os.path.exists(out)
    copy = tmp_path / "flows.h5.partial"
    copy.write_bytes(open(out + ".partial", "rb").read())
    resumed = TeacherFlowWriter(str(tmp_path / "flows.h5"), {"teacher": {"step": 1}}, (S, S, S))
    assert len(resumed) == stored
    resumed.finish()


_HDF5_FAILURE = """
import sys, numpy as np
from data_util.teacher_flows import TeacherFlowError, TeacherFlowWriter
TeacherFlowWriter._check_space = lambda *args: None       # let HDF5 itself hit the full disk
writer = TeacherFlowWriter(sys.argv[1], {"teacher": 1}, (16, 16, 16))
try:
    for i in range(100):
        writer.write(f"p{i}-q", np.random.default_rng(i).normal(size=(3, 16, 16, 16)))
except TeacherFlowError as e:
    writer.close()
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def test_teacher_store_hdf5_write_error_is_one_line_not_a_crash(full_disk):
    out = os.path.join(full_disk("1m"), "flows.h5")
    proc = subprocess.run([sys.executable, "-c", _HDF5_FAILURE, out], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])       # not -11 / 139 (segfault)
    assert "Traceback" not in proc.stderr and "Segmentation" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "flows.h5.partial" in line and "no space left on device" in line and "resume" in line


def test_teacher_store_in_a_read_only_folder(read_only_dir):
    with pytest.raises(TeacherFlowError) as info:
        TeacherFlowWriter(os.path.join(read_only_dir, "flows.h5"), {"teacher": 1}, (S, S, S))
    one_line(info, "flows.h5.partial", "cannot write")
    assert os.listdir(read_only_dir) == []


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
    """A tiny dataset and an (untrained) teacher checkpoint, made in-process (no train.py run)."""
    from data_util.synthetic import generate
    from network import ModelConfig, build_model, save_checkpoint

    d = tmp_path_factory.mktemp("teacher")
    generate(str(d / "data"), size=32, n_train=3, n_val=0, seed=0)
    config = ModelConfig(base_network="LDR", preset="plain", image_size=(32, 32, 32), channels=4)
    save_checkpoint(str(d / "weights" / "t"), build_model(config), config.to_dict(), step=1,
                    train_args={"dataset": "data/synthetic.json"})
    return d


def test_extract_teacher_on_a_full_disk_keeps_a_resumable_partial(teacher_workdir, full_disk):
    small = full_disk("640k")
    out = os.path.join(small, "t.h5")
    proc = run_script("extract_teacher.py", "-c", "weights/t", "--workers", 0, "--out", out, cwd=teacher_workdir)
    assert proc.returncode not in (-11, 139), proc.stderr[-2000:]
    assert_clean_error(proc, "t.h5.partial", "no space left on device", "resume")
    assert not os.path.exists(out) and os.path.exists(out + ".partial")
    assert [p for p in leftovers(small) if not p.endswith(".partial")] == []
    roomy = teacher_workdir / "resumed"
    roomy.mkdir()
    (roomy / "t.h5.partial").write_bytes(open(out + ".partial", "rb").read())
    proc = run_script("extract_teacher.py", "-c", "weights/t", "--workers", 0, "--out", roomy / "t.h5",
                      cwd=teacher_workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert " 0 already stored" not in proc.stdout and "already stored" in proc.stdout   # resumed, not restarted


def test_extract_teacher_read_only_out_and_bad_flags(teacher_workdir, read_only_dir):
    out = os.path.join(read_only_dir, "t.h5")
    proc = run_script("extract_teacher.py", "-c", "weights/t", "--workers", 0, "--out", out, cwd=teacher_workdir)
    assert_clean_error(proc, "t.h5.partial", "cannot write")
    assert os.listdir(read_only_dir) == []
    for flag, value in (("--batch", "0"), ("--limit", "-1"), ("--workers", "nan")):
        proc = run_script("extract_teacher.py", "-c", "weights/t", flag, value, cwd=teacher_workdir)
        assert_clean_error(proc, flag)


def test_extract_teacher_refuses_a_dataset_with_normalised_volumes(teacher_workdir, tmp_path):
    groups = {"a": _bad("normalised"), "b": good_scan(1)}
    bad = write_dataset(str(tmp_path), {k: dict(v, volume=np.resize(v["volume"], (32, 32, 32)),
                                                segmentation=np.resize(v["segmentation"], (32, 32, 32)))
                                        for k, v in groups.items()}, image_size=[32, 32, 32])
    proc = run_script("extract_teacher.py", "-c", "weights/t", "-d", bad, "--workers", 0,
                      "--out", tmp_path / "t.h5", cwd=teacher_workdir)
    assert_clean_error(proc, "d.h5", "'a'", "looks normalised")
    assert not os.path.exists(tmp_path / "t.h5") and leftovers(tmp_path) == []
