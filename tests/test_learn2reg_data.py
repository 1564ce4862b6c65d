"""Tests for data_util.learn2reg (Learn2Reg-style NIfTI datasets) and data_util.synthetic_hippocampus."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from data_util.dataset import DatasetError, RCNDataset
from data_util.formats import make_dataset_loader, open_dataset
from data_util.learn2reg import (L2RPairDataset, Learn2RegDataset, crop_or_pad, make_l2r_loader, normalise, normalise_l2r, uncrop_flow)
from data_util.synthetic_hippocampus import generate, validation_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (20, 24, 20)
CROP = (16, 16, 16)


def write_nifti(path, data):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), str(path))
    return str(path)


def one_line(exc_info, *names):
    message = str(exc_info.value)
    assert "\n" not in message
    for name in names:
        assert str(name) in message, message
    return message


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("hippo")
    return generate(out, n_train=4, n_val=2, shape=SHAPE, crop=CROP, seed=3)


def small_dataset(tmp_path, ids=(1, 2, 3), pairs_text="fixed, moving\n1, 2\n2, 1\n", shape=(6, 7, 8),
                  bad_label=None, nan_id=None):
    """A hand-made learn2reg dataset: random positive images, label maps, a pairs CSV."""
    rng = np.random.default_rng(0)
    for i in ids:
        image = rng.uniform(1, 100, shape).astype(np.float32)
        if i == nan_id:
            image[1, 1, 1] = np.nan
        write_nifti(tmp_path / "img" / f"case_{i:03d}.nii.gz", image)
        write_nifti(tmp_path / "lab" / f"case_{i:03d}.nii.gz",
                    rng.integers(0, 3, (6, 7, 9) if i == bad_label else shape).astype(np.uint8))
    (tmp_path / "pairs.csv").write_text(pairs_text)
    config = {"format": "learn2reg", "root": ".", "image": "img/case_{id:03d}.nii.gz",
              "label": "lab/case_{id:03d}.nii.gz", "labels": {"a": 1, "b": 2}, "crop": [4, 8, 8],
              "splits": {"1": {"ids": "*", "exclude": ["2"]}, "2": {"pairs": "pairs.csv"}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


# ------------------------------------------------------------------------------------------------
# the generated dataset through open_dataset
# ------------------------------------------------------------------------------------------------

def test_generated_pairs_match_csv(tiny):
    folder = os.path.dirname(tiny)
    text = open(os.path.join(folder, "pairs_val.csv")).read().splitlines()
    assert text[0] == "fixed, moving"
    listed = [tuple(v.strip() for v in line.split(",")) for line in text[1:]]
    gen = json.load(open(tiny))["generator"]
    a, b = (str(i) for i in gen["val_ids"])
    assert listed == [(a, b), (b, a)]
    ds = open_dataset(tiny)
    assert isinstance(ds, Learn2RegDataset)
    assert ds.pairs("2") == listed and ds.num_pairs("2") == 2
    assert ds.ids("1") == [str(i) for i in gen["train_ids"]]            # "*" minus the validation scans
    assert ds.num_pairs("1") == 12 and len(ds.pairs("1")) == 12
    assert ds.image_size == CROP and ds.segmentation_class_value == {"head": 1, "tail": 2}
    assert ds.scheme_names == ["1", "2"]


def test_training_loader_random_and_deterministic(tiny):
    ds = open_dataset(tiny)

    def ids(seed, n=12):
        out = []
        for _, batch in zip(range(n), make_dataset_loader(ds, "1", 2, loop=True, seed=seed)):
            assert batch["voxel1"].shape == (2, 1) + CROP
            out += list(zip(batch["id1"], batch["id2"]))
        return out

    first = ids(0)
    assert all(f != m for f, m in first)
    assert first == ids(0) and first != ids(1)
    train = set(ds.ids("1"))
    assert {i for p in first for i in p} <= train
    movings = [m for _, m in first[:4]]                                   # one pass = a permutation
    assert sorted(movings) == sorted(train)
    orders = {tuple(m for _, m in ids(seed, 2)) for seed in range(6)}     # ... a random one
    assert len(orders) > 1


def test_items_keys_shapes_values(tiny):
    ds = open_dataset(tiny)
    batch = next(iter(make_l2r_loader(ds, "2", batch_size=2)))
    assert set(batch) == {"voxel1", "voxel2", "seg1", "seg2", "has_seg1", "has_seg2", "id1", "id2",
                          "spacing1", "offset1", "offset2", "shape1"}
    for k in ("voxel1", "voxel2", "seg1", "seg2"):
        assert batch[k].shape == (2, 1) + CROP and batch[k].dtype == torch.float32
    for k in ("voxel1", "voxel2"):
        assert batch[k].min() >= 0 and batch[k].max() <= 1 and batch[k].max() > 0.5
    for k in ("seg1", "seg2"):
        assert set(torch.unique(batch[k]).tolist()) <= {0.0, 1.0, 2.0} and batch[k].max() == 2
    assert batch["has_seg1"].all() and batch["has_seg2"].all()
    assert batch["spacing1"].dtype == torch.float32 and batch["spacing1"].shape == (2, 3)
    assert torch.allclose(batch["spacing1"], torch.ones(2, 3))
    assert batch["offset1"].dtype == torch.int64 and batch["offset1"].tolist() == [[2, 4, 2]] * 2
    assert batch["shape1"].dtype == torch.int64 and batch["shape1"].tolist() == [list(SHAPE)] * 2
    assert list(batch["id1"]) == [p[0] for p in ds.pairs("2")]
    scan = ds.load(ds.pairs("2")[0][0])
    raw = np.asarray(nib.load(ds.image_path(scan["id"])).dataobj)
    assert scan["original_shape"] == SHAPE and scan["offset"] == (2, 4, 2)
    np.testing.assert_allclose(scan["volume"], normalise_l2r(raw)[2:18, 4:20, 2:18], atol=1e-6)
    assert len(make_l2r_loader(ds, "1", limit=5).dataset) == 5


def test_generator_deterministic_and_refuses_foreign_folder(tmp_path, tiny):
    again = generate(tmp_path / "a", n_train=4, n_val=2, shape=SHAPE, crop=CROP, seed=3)
    name = os.path.join("img", "hippocampus_001.nii.gz")
    a = np.asarray(nib.load(os.path.join(os.path.dirname(again), name)).dataobj)
    b = np.asarray(nib.load(os.path.join(os.path.dirname(tiny), name)).dataobj)
    np.testing.assert_array_equal(a, b)
    generate(tmp_path / "a", n_train=2, n_val=2, shape=SHAPE, crop=CROP, seed=4)   # own output: replaced
    assert len(os.listdir(tmp_path / "a" / "img")) == 4
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        generate(tmp_path / "b", n_train=2, n_val=2, shape=SHAPE)
    assert validation_pairs([5, 1, 9, 7]) == [(1, 9), (5, 7), (7, 5), (9, 1)]


# ------------------------------------------------------------------------------------------------
# array helpers
# ------------------------------------------------------------------------------------------------

def test_normalise_l2r_by_hand():
    values = np.array([0.0] * 21 + [100.0] * 50 + [110.0] * 50)
    a = values.reshape(1, 11, 11)
    # voxels > 0: mean 105, std 5 -> z(0) = -21 clipped to -5, z(100) = -1, z(110) = 1
    # min-max over [-5, 1]: 0 -> 0, 100 -> 4 / 6, 110 -> 1 (a plain min-max would give 100 -> 0.909)
    out = normalise_l2r(a)
    assert out.dtype == np.float32 and out.shape == a.shape
    np.testing.assert_allclose(out.ravel(), [0] * 21 + [4 / 6] * 50 + [1] * 50, rtol=1e-6)
    np.testing.assert_allclose(normalise(np.array([0, 51, 255]), "uint8"), [0, 0.2, 1])
    assert not normalise_l2r(np.zeros((2, 2, 2))).any()


def test_crop_or_pad_offsets():
    a = np.arange(5 * 8 * 3).reshape(5, 8, 3) + 1
    out, offset = crop_or_pad(a, (4, 4, 6))
    assert out.shape == (4, 4, 6) and offset == (0, 2, -1)                # crop 5->4, crop 8->4, pad 3->6
    for q in np.ndindex(out.shape):
        p = tuple(np.add(q, offset))
        inside = all(0 <= v < n for v, n in zip(p, a.shape))
        assert out[q] == (a[p] if inside else 0)
    out, offset = crop_or_pad(np.ones((2, 7, 9, 4)), (3, 3, 6))          # leading channel axis kept
    assert out.shape == (2, 3, 3, 6) and offset == (2, 3, -1)
    assert out[:, :, :, 0].sum() == 0 and out[:, :, :, 5].sum() == 0 and out[:, :, :, 1:5].all()


def test_uncrop_flow_known_translation():
    shape_f, shape_m, crop = (18, 21, 12), (14, 25, 17), (16, 16, 16)
    t = np.array([2, -1, 3])                                              # F(p) = M(p + t)
    g = lambda x, y, z: np.sin(0.3 * x) + np.cos(0.2 * y + 0.1 * z) + 0.01 * x * z  # noqa: E731
    fixed = g(*np.indices(shape_f))
    moving = g(*(np.indices(shape_m) - t[:, None, None, None]))
    fixed_c, o_f = crop_or_pad(fixed, crop)
    moving_c, o_m = crop_or_pad(moving, crop)
    assert min(o_f) < 0 < max(o_f) and min(o_m) < 0 < max(o_m)            # crops and pads in both
    u_c = np.broadcast_to((t + np.array(o_f) - np.array(o_m))[:, None, None, None], (3,) + crop).astype(np.float32)
    checked = 0
    for q in np.ndindex(crop):                                             # u_c really aligns the crops
        r = tuple(np.add(q, u_c[:, 0, 0, 0].astype(int)))
        p, pm = np.add(q, o_f), np.add(r, o_m)
        if all(0 <= v < n for v, n in zip(p, shape_f)) and all(0 <= v < n for v, n in zip(pm, shape_m)) \
                and all(0 <= v < c for v, c in zip(r, crop)):
            assert np.isclose(fixed_c[q], moving_c[r])
            checked += 1
    assert checked > 100
    u = uncrop_flow(u_c, o_f, o_m, shape_f)
    assert u.shape == (3,) + shape_f and u.dtype == np.float32
    np.testing.assert_array_equal(u, np.broadcast_to(t[:, None, None, None], u.shape))
    # a varying flow: inside the window u_c(p - o_f) + o_m - o_f, outside the nearest window value
    ramp = np.broadcast_to(np.arange(16.0)[:, None, None], crop)
    u_c = np.stack([ramp, 2 * ramp, np.zeros(crop)]).astype(np.float32)
    u = uncrop_flow(torch.from_numpy(u_c), o_f, o_m, shape_f)
    assert isinstance(u, torch.Tensor) and u.shape == (3,) + shape_f
    u = u.numpy()
    shift = np.array(o_m) - np.array(o_f)
    assert o_f[0] == 1
    np.testing.assert_allclose(u[0, 5, 3, 3], (5 - 1) + shift[0])
    np.testing.assert_allclose(u[0, 0, 3, 3], 0 + shift[0])               # before the window: edge value
    np.testing.assert_allclose(u[0, 17, 3, 3], 15 + shift[0])             # after it: edge value
    np.testing.assert_allclose(u[1, 17, 0, 0], 30 + shift[1])
    np.testing.assert_allclose(u[2], shift[2])


# ------------------------------------------------------------------------------------------------
# the real config and the Learn2Reg 2021+ reader
# ------------------------------------------------------------------------------------------------

def test_hippocampus_json_parses():
    ds = open_dataset(os.path.join(ROOT, "datasets", "hippocampus.json"), check_files=False)
    assert isinstance(ds, Learn2RegDataset)
    pairs = ds.pairs("2")
    assert len(pairs) == 60 and ds.num_pairs("2") == 60
    assert pairs[0] == ("311", "394") and pairs[29] == ("351", "352")
    assert pairs[30:] == [(m, f) for f, m in reversed(pairs[:30])]
    assert ds.image_size == (64, 64, 64) and ds.normalisation == "l2r"
    assert ds.segmentation_class_value == {"head": 1, "tail": 2}
    assert ds.image_path("311").endswith(os.path.join("img", "hippocampus_311.nii.gz"))
    assert ds.label_path(7).endswith(os.path.join("label", "hippocampus_007.nii.gz"))


def test_learn2reg_2021_dataset_json(tmp_path):
    names = [f"HIP_{i:04d}_0000" for i in range(1, 6)]
    rng = np.random.default_rng(1)
    for name in names:
        write_nifti(tmp_path / "imagesTr" / f"{name}.nii.gz", rng.uniform(0, 50, (6, 6, 6)).astype(np.float32))
        write_nifti(tmp_path / "labelsTr" / f"{name}.nii.gz", rng.integers(0, 3, (6, 6, 6)).astype(np.uint8))
    config = {"name": "HIP", "labels": {"0": "background", "1": "head", "2": "tail"},
              "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names[:4]],
              "registration_val": [{"fixed": f"./imagesTr/{names[3]}.nii.gz", "moving": f"./imagesTr/{names[2]}.nii.gz"},
                                   {"fixed": f"./imagesTr/{names[2]}.nii.gz", "moving": f"./imagesTr/{names[4]}.nii.gz"}]}
    path = tmp_path / "HIP_dataset.json"
    path.write_text(json.dumps(config))
    ds = open_dataset(path)
    assert isinstance(ds, Learn2RegDataset)
    assert ds.ids("1") == names[:2] and ds.pairs("2") == [(names[3], names[2]), (names[2], names[4])]
    assert ds.label_path(names[4]) == str(tmp_path / "labelsTr" / f"{names[4]}.nii.gz")   # not in 'training'

    assert ds.segmentation_class_value == {"head": 1, "tail": 2} and ds.image_size == (6, 6, 6)
    item = next(iter(make_dataset_loader(ds, "2")))
    assert item["id1"] == [names[3]] and item["voxel1"].shape == (1, 1, 6, 6, 6) and item["has_seg2"].all()
    assert item["offset1"].tolist() == [[0, 0, 0]]
    with pytest.raises(DatasetError, match="teacher flows"):
        make_dataset_loader(ds, "2", teacher_flows=object())


def test_pairs_json_with_paths_and_glob_ids(tmp_path):
    path = small_dataset(tmp_path)
    (tmp_path / "pairs.json").write_text(json.dumps(
        {"registration_val": [{"fixed": "./imagesTr/case_003.nii.gz", "moving": 1}]}))
    config = json.loads(open(path).read())
    config["splits"]["2"] = {"pairs": "pairs.json"}
    open(path, "w").write(json.dumps(config))
    ds = open_dataset(path, crop=(6, 7, 8))
    assert ds.pairs("2") == [("3", "1")] and ds.ids("1") == ["2"]       # "case_002.nii.gz" -> "2"
    assert ds.load("3")["offset"] == (0, 0, 0)
    with pytest.raises(DatasetError, match="at least 2"):
        make_l2r_loader(ds, "1", loop=True)


# ------------------------------------------------------------------------------------------------
# bad inputs: one-line DatasetError naming the file
# ------------------------------------------------------------------------------------------------

def test_missing_image_for_pair_id(tmp_path):
    path = small_dataset(tmp_path, pairs_text="fixed, moving\n1, 7\n")
    with pytest.raises(DatasetError) as exc:
        open_dataset(path)
    one_line(exc, tmp_path / "img" / "case_007.nii.gz", "not found", "pairs.csv")
    ds = open_dataset(path, check_files=False)                           # and when loading lazily
    with pytest.raises(DatasetError) as exc:
        ds.load("7")
    one_line(exc, tmp_path / "img" / "case_007.nii.gz")


def test_label_shape_mismatch(tmp_path):
    path = small_dataset(tmp_path, bad_label=2)
    with pytest.raises(DatasetError) as exc:
        open_dataset(path)
    one_line(exc, tmp_path / "lab" / "case_002.nii.gz", "(6, 7, 9)")
    ds = open_dataset(path, check_files=False)
    ds.load("1")
    with pytest.raises(DatasetError) as exc:
        ds.load("2")
    one_line(exc, tmp_path / "lab" / "case_002.nii.gz", "shape")


def test_nan_image(tmp_path):
    path = small_dataset(tmp_path, nan_id=2)
    ds = open_dataset(path)                                              # headers are fine
    with pytest.raises(DatasetError) as exc:
        next(iter(make_l2r_loader(ds, "2")))
    one_line(exc, tmp_path / "img" / "case_002.nii.gz", "NaN")


def test_csv_without_moving_column(tmp_path):
    path = small_dataset(tmp_path, pairs_text="fixed, other\n1, 2\n")
    with pytest.raises(DatasetError) as exc:
        open_dataset(path, check_files=False)
    one_line(exc, tmp_path / "pairs.csv", "'moving'")


def test_paired_and_other_config_errors(tmp_path):
    path = small_dataset(tmp_path)
    with pytest.raises(DatasetError) as exc:
        open_dataset(path, paired=True)
    one_line(exc, path, "paired")
    assert open_dataset(path, paired=False).num_pairs("1") == 0          # only scan 3 left: no pairs
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError) as exc:
        open_dataset(tmp_path / "bad.json")
    one_line(exc, tmp_path / "bad.json", "invalid JSON")
    with pytest.raises(DatasetError) as exc:
        open_dataset(os.path.join(ROOT, "datasets", "liver.json"), check_files=False, crop=(8, 8, 8))
    one_line(exc, "liver.json", "crop")
    assert isinstance(open_dataset(os.path.join(ROOT, "datasets", "liver.json"), check_files=False), RCNDataset)
    ds = open_dataset(path, check_files=False)
    assert len(L2RPairDataset(ds, ds.pairs("2"))) == 2
