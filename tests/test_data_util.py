"""Tests for data_util: RCN dataset layout, pairs, loaders, augmentation, synthetic data."""
import itertools
import json
import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import h5py
import numpy as np
import pytest
import torch

from data_util import (DatasetError, PairDataset, RCNDataset, augment_moving,
                       bspline_weights, generate, interpolate_control_grid, invert_points,
                       landmark_mask, make_loader, random_ffd_flow, sample_power)
from data_util import synthetic
from network.layers import identity_grid, sample_flow_at_points

SHARED = "/work/shared/reference/datasets"
S = 16  # volume size of the hand-made fixtures


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------

def scan(value, seg=True, points=6, shape=(S, S, S)):
    out = {"volume": np.full(shape, value, dtype=np.uint8)}
    out["volume"].flat[0] = 0  # not constant: blank scans are refused
    if seg:
        out["segmentation"] = np.where(np.arange(shape[0])[:, None, None] < shape[0] // 2, 255, 0) \
            .astype(np.uint8).repeat(shape[1], 1).repeat(shape[2], 2)
    if points:
        p = np.arange(points * 3, dtype=np.float32).reshape(points, 3) % S
        p[1] = -1
        out["point"] = p
    return out


def write_h5(path, groups):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, data in groups.items():
            group = f.create_group(key)
            for name, value in data.items():
                group.create_dataset(name, data=value)


def write_json(path, config):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(config, f)
    return str(path)


@pytest.fixture
def layout(tmp_path):
    """Published-style layout: default "/" file, two prefixed files, nested keys, an atlas."""
    cfg = tmp_path / "cfg"
    write_h5(str(cfg / "data" / "a.h5"), {"s1": scan(10), "s2": scan(20, seg=False),
                                          "s3": scan(30, points=4), "atlas": scan(5)})
    write_h5(str(cfg / "data" / "b.h5"), {"x/1": scan(40), "x/2": scan(50, points=0)})
    write_h5(str(cfg / "data" / "default.h5"), {"c/y": scan(60), "c/z": scan(70)})
    config = {"files": {"/": {"type": "HDF5", "path": "data/default.h5"},
                        "a": {"type": "HDF5", "path": "data/a.h5"},
                        "b": {"type": "HDF5", "path": "data/b.h5"}},
              "image_size": [S, S, S], "image_type": "test",
              "subsets": {"sa": ["a/s1", "a/s2", "a/s3"], "sb": ["b/x/1", "b/x/2"],
                          "sc": ["c/y", "c/z"], "five": ["a/s1", "a/s2", "a/s3", "b/x/1", "b/x/2"]},
              "schemes": {"1": {"sa": 0.75, "sc": 0.25}, "2": {"sb": 1.0}, "mix": {"sa": 1.0, "sb": 1.0},
                          "five": {"five": 1.0}}}
    path = write_json(cfg / "test.json", config)
    other = tmp_path / "elsewhere"
    other.mkdir()
    return {"json": path, "config": config, "dir": cfg, "cwd": other}


def with_config(layout, **changes):
    config = dict(layout["config"], **changes)
    return write_json(layout["dir"] / "changed.json", config)


# ------------------------------------------------------------------------------------------------
# dataset: lookup, ids, loading
# ------------------------------------------------------------------------------------------------

def test_entry_lookup_ids_and_load(layout, monkeypatch):
    monkeypatch.chdir(layout["cwd"])  # paths resolve relative to the JSON directory
    ds = RCNDataset(layout["json"])
    assert ds.scheme_names == ["1", "2", "mix", "five"]
    assert ds.image_size == (S, S, S) and ds.image_type == "test"
    assert ds.atlas is None and ds.segmentation_class_value is None and ds.n_points == 6
    assert ds.locate("a/s1") == (str(layout["dir"] / "data" / "a.h5"), "s1")
    assert ds.locate("b/x/1") == (str(layout["dir"] / "data" / "b.h5"), "x/1")
    assert ds.locate("c/y") == (str(layout["dir"] / "data" / "default.h5"), "c/y")
    s1, s2, nested, default = (ds.load(e) for e in ("a/s1", "a/s2", "b/x/1", "c/y"))
    assert [s1["id"], nested["id"], default["id"]] == ["a_s1", "b_x_1", "c_y"]
    assert s1["volume"].dtype == np.float32 and s1["volume"].shape == (S, S, S) and s1["volume"].max() == 10
    assert default["volume"].max() == 60 and nested["volume"].max() == 40
    assert s1["segmentation"].dtype == np.float32 and set(np.unique(s1["segmentation"])) == {0, 255}
    assert s2["segmentation"] is None
    assert s1["point"].shape == (6, 3) and (s1["point"][1] == -1).all()
    assert ds.load("b/x/2")["point"] is None
    s1["volume"][:] = 0  # returned arrays are fresh copies, the cache is untouched
    assert ds.load("a/s1")["volume"].max() == 10
    ds.close()


def test_paths_resolve_cwd_first(layout, monkeypatch):
    cwd = layout["cwd"]
    write_h5(str(cwd / "data" / "a.h5"), {"s1": scan(99), "s2": scan(99), "s3": scan(99), "atlas": scan(99)})
    monkeypatch.chdir(cwd)
    ds = RCNDataset(layout["json"], splits=["1"])
    assert ds.files["a"] == str(cwd / "data" / "a.h5")
    assert ds.load("a/s1")["volume"].max() == 99
    assert ds.files["/"] == str(layout["dir"] / "data" / "default.h5")


def test_pair_orders_all_paired_atlas(layout):
    ds = RCNDataset(layout["json"])
    a = ["a/s1", "a/s2", "a/s3"]
    assert ds.pairs("1")[:6] == [(a[0], a[1]), (a[0], a[2]), (a[1], a[0]), (a[1], a[2]), (a[2], a[0]), (a[2], a[1])]
    assert ds.pairs(1)[6:] == [("c/y", "c/z"), ("c/z", "c/y")]  # subsets concatenated in scheme order
    assert ds.num_pairs("five") == len(ds.pairs("five")) == 20
    assert len(ds.pairs("mix")) == 6 + 2
    paired = RCNDataset(layout["json"], paired=True)
    assert paired.pairs("five") == [("a/s1", "a/s2"), ("a/s2", "a/s1"), ("a/s3", "b/x/1"), ("b/x/1", "a/s3")]
    atlas = RCNDataset(with_config(layout, atlas="a/atlas"))
    assert atlas.atlas == "a/atlas"
    assert atlas.pairs("five") == [("a/atlas", e) for e in layout["config"]["subsets"]["five"]]
    with_atlas_listed = RCNDataset(with_config(layout, atlas="a/s2"))
    assert with_atlas_listed.pairs("1")[:2] == [("a/s2", "a/s1"), ("a/s2", "a/s3")]
    with pytest.raises(DatasetError, match=r"unknown scheme/split 'nope'.*'1', '2', 'mix', 'five'"):
        ds.pairs("nope")


def test_keyed_pairs_select_the_split_pairs_named_by_teacher_keys(layout):
    ds = RCNDataset(layout["json"])
    keys = ["a_s1-a_s2", "a_s3-a_s1", "c_z-c_y",       # pairs of split 1
            "a_s1-c_y",                                 # two subsets of the split: RCN never forms it
            "b_x_1-b_x_2", "a_s1-a_s1", "nope-a_s1"]    # another split, same scan, unknown id
    assert ds.keyed_pairs("1", keys) == [("a/s1", "a/s2"), ("a/s3", "a/s1"), ("c/z", "c/y")]
    assert ds.keyed_pairs(2, keys) == [("b/x/1", "b/x/2")]   # ids with '_' from '/' and keys with '-'
    paired = RCNDataset(layout["json"], paired=True)
    assert paired.keyed_pairs("five", ["a_s2-a_s1", "a_s1-a_s3", "b_x_1-a_s3"]) == [("a/s2", "a/s1"),
                                                                                   ("b/x/1", "a/s3")]
    atlas = RCNDataset(with_config(layout, atlas="a/atlas"))
    assert atlas.keyed_pairs("five", ["a_atlas-a_s2", "a_s1-a_s2"]) == [("a/atlas", "a/s2")]


def test_augmentation_refuses_batches_with_stored_teacher_flows():
    batch = {"voxel2": torch.zeros(1, 1, S, S, S), "teacher_flow": torch.zeros(1, 3, S, S, S),
             "id1": ["a"], "id2": ["b"]}
    with pytest.raises(ValueError, match="unaugmented pairs"):
        augment_moving(batch, torch.Generator().manual_seed(0))


def test_pair_dataset_items_and_padding(layout):
    ds = RCNDataset(layout["json"])
    item = PairDataset(ds, ds.pairs("five"))[("a/s3", "b/x/2")]
    assert item["id1"] == "a_s3" and item["id2"] == "b_x_2"
    assert item["voxel1"].shape == (1, S, S, S) and item["voxel1"].dtype == torch.float32
    assert torch.allclose(item["voxel1"].flatten()[1:], torch.tensor(30 / 255)) and item["voxel1"].min() == 0
    assert item["seg1"].max() == 255 and item["has_seg1"] and item["has_seg2"]
    assert item["point1"].shape == (6, 3) and (item["point1"][4:] == -1).all()  # 4 landmarks padded
    assert (item["point2"] == -1).all()  # no landmarks at all
    no_seg = PairDataset(ds)[("a/s1", "a/s2")]
    assert not no_seg["has_seg2"] and no_seg["seg2"].shape == (1, S, S, S) and no_seg["seg2"].abs().sum() == 0
    assert landmark_mask(item["point1"]).tolist() == [True, False, True, True, False, False]


def test_eval_loader_is_ordered_and_collates(layout):
    ds = RCNDataset(layout["json"])
    batches = list(make_loader(ds, "five", batch_size=3))
    assert [len(b["id1"]) for b in batches] == [3] * 6 + [2]
    ids = [(i1, i2) for b in batches for i1, i2 in zip(b["id1"], b["id2"])]
    assert ids == [(f.replace("/", "_"), m.replace("/", "_")) for f, m in ds.pairs("five")]
    assert batches[0]["voxel2"].shape == (3, 1, S, S, S) and batches[0]["has_seg1"].dtype == torch.bool
    assert batches[0]["point1"].shape == (3, 6, 3)


def test_training_loader_random_and_fractions(layout):
    ds = RCNDataset(layout["json"])
    first = [b["id1"] + b["id2"] for b in itertools.islice(make_loader(ds, "1", batch_size=4, loop=True, seed=3), 5)]
    again = [b["id1"] + b["id2"] for b in itertools.islice(make_loader(ds, "1", batch_size=4, loop=True, seed=3), 5)]
    assert first == again
    batches = list(itertools.islice(ds.batch_iterator("1", 8, seed=0), 200))
    assert all(len(b) == 8 for b in batches)
    pairs = [p for b in batches for p in b]
    from_sc = np.mean([p[0].startswith("c/") for p in pairs])
    assert abs(from_sc - 0.25) < 0.04
    assert all(f != m for f, m in pairs) and set(pairs) == set(ds.pairs("1"))


def test_loader_workers(layout):
    ds = RCNDataset(layout["json"])
    ds.load("a/s1")  # a handle opened in the parent must not be reused by the workers
    loader = make_loader(ds, "five", batch_size=4, num_workers=2)
    ids = [i for b in loader for i in b["id2"]]
    assert ids == [m.replace("/", "_") for _, m in ds.pairs("five")]
    batch = next(iter(make_loader(ds, "1", batch_size=2, loop=True, num_workers=2, seed=1)))
    assert batch["voxel1"].shape == (2, 1, S, S, S)


def test_published_configs_pair_counts():
    for name in ("liver.json", "brain.json"):
        shipped = os.path.join(ROOT, "datasets", name)
        if os.path.isdir(SHARED):
            with open(shipped, "rb") as a, open(os.path.join(SHARED, name), "rb") as b:
                assert a.read() == b.read(), f"datasets/{name} must be the published config verbatim"
    liver = RCNDataset(os.path.join(ROOT, "datasets", "liver.json"), check_files=False)
    assert liver.image_size == (128, 128, 128) and liver.image_type == "liver"
    assert liver.num_pairs("sliver") == len(liver.pairs("sliver")) == 342
    assert liver.pairs("sliver")[0] == ("yanx/10", "yanx/11")
    assert len(liver.pairs("lits")) == 17030
    assert liver.locate("yanx/10") == (os.path.abspath("datasets/sliver_val.h5"), "10")
    pigs = RCNDataset(os.path.join(ROOT, "datasets", "liver.json"), paired=True, check_files=False)
    lspig = pigs.pairs("lspig")
    assert len(lspig) == 34 and lspig[:2] == [("pigs/2017_02_aftergas", "pigs/2017_02_pregas"),
                                             ("pigs/2017_02_pregas", "pigs/2017_02_aftergas")]
    brain = RCNDataset(os.path.join(ROOT, "datasets", "brain.json"), check_files=False)
    lpba = brain.pairs("2")
    assert len(lpba) == 39 and all(f == "lpba/S01" for f, _ in lpba) and lpba[0][1] == "lpba/S02"
    assert len(brain.segmentation_class_value) == 56 and brain.num_pairs("1") == 2302


# ------------------------------------------------------------------------------------------------
# dataset: errors (one line naming the file)
# ------------------------------------------------------------------------------------------------

def _raises(path_fragment, build):
    with pytest.raises(DatasetError) as info:
        build()
    message = str(info.value)
    assert "\n" not in message and path_fragment in message, message
    return message


def test_config_errors(tmp_path):
    _raises("missing.json", lambda: RCNDataset(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "invalid JSON" in _raises("bad.json", lambda: RCNDataset(bad))
    partial = write_json(tmp_path / "partial.json", {"files": {}})
    assert "'subsets'" in _raises("partial.json", lambda: RCNDataset(partial))


def test_file_and_key_errors(layout, tmp_path):
    missing_file = with_config(layout, files={"/": {"type": "HDF5", "path": "data/nothere.h5"}})
    assert "not found" in _raises("nothere.h5", lambda: RCNDataset(missing_file))
    subsets = dict(layout["config"]["subsets"], sa=["a/s1", "a/ghost"])
    message = _raises("a.h5", lambda: RCNDataset(with_config(layout, subsets=subsets)))
    assert "changed.json" in message and "'ghost'" in message
    _raises("a.h5", lambda: RCNDataset(with_config(layout, atlas="a/none")))
    corrupt = layout["dir"] / "data" / "default.h5"
    corrupt.write_bytes(os.urandom(2048))
    assert "corrupt" in _raises("default.h5", lambda: RCNDataset(layout["json"]))
    RCNDataset(layout["json"], splits=["2"])  # validation restricted to the files a split uses


def test_content_errors(layout):
    data = layout["dir"] / "data"
    cases = {"shape.h5": ({"k": scan(1, shape=(S, S, S + 1))}, "expected image_size"),
             "flat.h5": ({"k": scan(1, seg=False, shape=(S, S * S))}, "must be 3-D"),
             "novol.h5": ({"k": {"segmentation": np.zeros((S, S, S), np.uint8)}}, "no 'volume'"),
             "points.h5": ({"k": dict(scan(1, points=0), point=np.zeros((6, 2), np.float32))}, "(N, 3)")}
    for name, (groups, problem) in cases.items():
        write_h5(str(data / name), groups)
        path = with_config(layout, files={"/": {"type": "HDF5", "path": f"data/{name}"}},
                           subsets={"s": ["k"]}, schemes={"1": {"s": 1.0}})
        assert problem in _raises(name, lambda: RCNDataset(path))
    nan = {"volume": np.full((S, S, S), np.nan, np.float32)}
    write_h5(str(data / "nan.h5"), {"k": nan})
    path = with_config(layout, files={"/": {"type": "HDF5", "path": "data/nan.h5"}},
                       subsets={"s": ["k"]}, schemes={"1": {"s": 1.0}})
    assert "NaN" in _raises("nan.h5", lambda: RCNDataset(path))  # validate() samples values
    ds = RCNDataset(path, check_files=False)  # every load checks its entry's values
    assert "NaN" in _raises("nan.h5", lambda: ds.load("k"))


def test_default_image_size_from_first_volume(layout):
    config = {k: v for k, v in layout["config"].items() if k != "image_size"}
    path = write_json(layout["dir"] / "nosize.json", config)
    assert RCNDataset(path).image_size == (S, S, S)
    assert RCNDataset(path, check_files=False).image_size is None


# ------------------------------------------------------------------------------------------------
# augmentation
# ------------------------------------------------------------------------------------------------

def test_ffd_sampling_and_interpolation():
    w = bspline_weights(32, 5)
    assert w.shape == (32, 5) and torch.allclose(w.sum(1), torch.ones(32))
    const = interpolate_control_grid(torch.full((1, 3, 5, 5, 5), 2.5), (12, 10, 8))
    assert const.shape == (1, 3, 12, 10, 8) and torch.allclose(const, torch.full_like(const, 2.5))
    v = sample_power(-0.4, 0.4, 3, (10000,), torch.Generator().manual_seed(0))
    assert v.abs().max() <= 0.4 + 1e-6 and (v.abs() < 0.05).float().mean() > 0.4  # concentrated near 0
    a = random_ffd_flow(2, (32, 24, 16), generator=torch.Generator().manual_seed(1))
    b = random_ffd_flow(2, (32, 24, 16), generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 32, 24, 16) and torch.equal(a, b)
    limits = torch.tensor([8, 6, 4]).view(1, 3, 1, 1, 1) * 0.4
    assert (a.abs() <= limits + 1e-4).all() and a.abs().max() > 0.1


def _blob_batch(centres, size=32, sigma=1.5):
    grid = identity_grid((size,) * 3)
    blobs = [torch.exp(-((grid[0] - torch.tensor(c).view(3, 1, 1, 1)) ** 2).sum(0) / (2 * sigma ** 2))
             for c in centres]
    voxel = torch.stack(blobs)[:, None]
    points = torch.tensor([[c, [-1.0, -1.0, -1.0]] for c in centres])
    return {"voxel1": voxel.clone(), "voxel2": voxel, "seg2": (voxel > 0.3).float() * 255, "point2": points,
            "id2": [str(i) for i in range(len(centres))]}


def test_augment_moves_landmarks_with_the_image():
    centres = [[10.0, 12.0, 20.0], [20.0, 16.0, 9.0], [16.0, 21.0, 15.0], [8.0, 24.0, 11.0]]
    batch = _blob_batch(centres)
    out = augment_moving(batch, torch.Generator().manual_seed(0), magnitude=0.9)
    assert out["aug_flow"].shape == (4, 3, 32, 32, 32) and out["id2"] == batch["id2"]
    assert torch.equal(out["voxel1"], batch["voxel1"])
    moved = out["point2"][:, 0]
    assert (out["point2"][:, 1] == -1).all()  # missing landmarks stay missing
    assert (moved - torch.tensor(centres)).norm(dim=1).max() > 1.0  # the test moves something
    grid = identity_grid((32,) * 3)[0].view(3, -1)
    for b in range(4):
        image = out["voxel2"][b, 0].flatten()
        argmax = grid[:, image.argmax()]
        assert (argmax - moved[b]).abs().max() <= 1.0
        weights = torch.where(image > 0.5 * image.max(), image, torch.zeros_like(image))
        centroid = (grid * weights).sum(1) / weights.sum()
        assert (centroid - moved[b]).norm() < 0.6
    seg_from_image = out["voxel2"] > 0.3
    agree = (seg_from_image == (out["seg2"] > 0)).float().mean()
    assert agree > 0.995 and set(out["seg2"].unique().tolist()) <= {0.0, 255.0}


def test_augment_identity_when_ffd_is_zero():
    batch = _blob_batch([[10.0, 12.0, 20.0]])
    out = augment_moving(batch, torch.Generator().manual_seed(0), magnitude=0.0)
    assert out["aug_flow"].abs().max() == 0
    assert torch.allclose(out["voxel2"], batch["voxel2"], atol=1e-6)
    assert torch.equal(out["seg2"], batch["seg2"]) and torch.allclose(out["point2"], batch["point2"])


def test_invert_points_solves_pullback():
    flow = random_ffd_flow(1, (24, 24, 24), magnitude=0.9, generator=torch.Generator().manual_seed(5))
    q = torch.tensor([[[5.0, 6.0, 7.0], [12.0, 12.0, 12.0], [-1.0, -1.0, -1.0]]])
    p = invert_points(q, flow)
    residual = p[:, :2] + sample_flow_at_points(flow, p[:, :2]) - q[:, :2]
    assert residual.abs().max() < 1e-3 and (p[:, 2] == -1).all()


# ------------------------------------------------------------------------------------------------
# synthetic data
# ------------------------------------------------------------------------------------------------

def test_synthetic_roundtrip_and_determinism(tmp_path, capsys):
    path = generate(tmp_path / "a", size=32, n_train=4, n_val=2, seed=7)
    again = generate(tmp_path / "b", size=32, n_train=4, n_val=2, seed=7)
    other = generate(tmp_path / "c", size=32, n_train=4, n_val=2, seed=8)
    assert sorted(os.listdir(tmp_path / "a")) == ["synthetic.h5", "synthetic.json"]  # no temp files left
    ds = RCNDataset(path)
    assert ds.image_size == (32, 32, 32) and ds.image_type == "synthetic"
    assert ds.segmentation_class_value == {"1": 1, "2": 2, "3": 3, "4": 4}
    assert ds.num_pairs("1") == 12 and ds.num_pairs("2") == ds.num_pairs("val") == 2
    assert ds.subsets["synth-train"][0] == "synth/train_000"
    scans = [ds.load(e) for e in ds.subsets["synth-train"] + ds.subsets["synth-val"]]
    with h5py.File(tmp_path / "a" / "synthetic.h5", "r") as f:
        group = f["synth/train_000"]
        assert group["volume"].dtype == np.uint8 and group["segmentation"].dtype == np.uint8
        assert group["deformation"].dtype == np.float16 and group["deformation"].shape == (3, 32, 32, 32)
        assert group["point"].shape == (6, 3)
    for s in scans:
        assert 20 < s["volume"].mean() < 150 and s["volume"].max() > 200
        assert set(np.unique(s["segmentation"]).tolist()) == {0, 1, 2, 3, 4}
        valid = landmark_mask(torch.from_numpy(s["point"])).numpy()
        assert valid.sum() >= 4 and ((s["point"][valid] >= 0) & (s["point"][valid] <= 31)).all()
        liver_centre = tuple(np.round(s["point"][0]).astype(int))
        assert not valid[0] or s["segmentation"][liver_centre] == 1
    ds2 = RCNDataset(again)
    for e in ds.subsets["synth-train"]:
        a, b = ds.load(e), ds2.load(e)
        assert all(np.array_equal(a[k], b[k]) for k in ("volume", "segmentation", "point"))
    assert not np.array_equal(RCNDataset(other).load("synth/train_000")["volume"], scans[0]["volume"])
    dice = [2 * ((a["segmentation"] == k) & (b["segmentation"] == k)).sum()
            / ((a["segmentation"] == k).sum() + (b["segmentation"] == k).sum())
            for a, b in itertools.combinations(scans, 2) for k in range(1, 5)]
    assert 0.2 < np.mean(dice) < 0.95
    synthetic.main(["--out", str(tmp_path / "cli"), "--size", "16", "--train", "2", "--val", "1"])
    assert "synthetic.json" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "cli")


def test_synthetic_true_pair_flow_registers_shared_anatomy(tmp_path):
    from data_util.synthetic import true_pair_flow
    from network.layers import warp
    from network.metrics import segmentation_scores
    path = generate(tmp_path / "s", size=32, n_train=0, n_val=3, seed=3, anatomy="shared")
    ds = RCNDataset(path)
    with h5py.File(tmp_path / "s" / "synthetic.h5", "r") as f:
        deformations = {e: f[e]["deformation"][()] for e in ds.subsets["synth-val"]}
    for fixed, moving in ds.pairs("2"):
        flow = true_pair_flow(deformations[fixed], deformations[moving])[None]
        seg_f = torch.from_numpy(ds.load(fixed)["segmentation"])[None, None]
        seg_m = torch.from_numpy(ds.load(moving)["segmentation"])[None, None]
        before = float(segmentation_scores(seg_f, seg_m, None, [1, 2, 3, 4])[0])
        after = float(segmentation_scores(seg_f, seg_m, flow, [1, 2, 3, 4])[0])
        assert before < 0.85 and after > 0.9 and after > before + 0.1
        img_f = torch.from_numpy(ds.load(fixed)["volume"])[None, None]
        img_m = torch.from_numpy(ds.load(moving)["volume"])[None, None]
        err_after = (warp(img_m, flow) - img_f).abs().mean()
        assert err_after < 0.5 * (img_m - img_f).abs().mean()


def test_synthetic_per_scan_anatomy_and_bad_option(tmp_path):
    path = generate(tmp_path / "p", size=16, n_train=2, n_val=0, seed=0, anatomy="per-scan")
    assert json.load(open(path))["synthetic"]["anatomy"] == "per-scan"
    with pytest.raises(ValueError):
        generate(tmp_path / "q", size=16, n_train=1, n_val=0, anatomy="other")


def test_abdomen_ct_pairs_carry_their_known_transform(tmp_path):
    """The CT benchmark's phantom pairs: HU values, 4 labels, and the stored transform explains the
    moving image (reading the moving labels at phi^-1 of each fixed voxel gives the fixed labels)."""
    import nibabel as nib
    from scipy import ndimage
    from data_util.preprocess import grid_points, world_to_voxel
    from network.metrics import dice_per_label
    pairs = synthetic.AbdomenPairs(str(tmp_path), magnitude=8.0, spacing=9.0, size=32)
    pair = pairs.write(0)
    fixed = np.asarray(nib.load(pair["fixed"]).dataobj)
    assert fixed.min() == -1000 and 0 < np.median(fixed[pairs.fixed_labels == 1]) < 200      # air, liver in HU
    assert sorted(np.unique(pairs.fixed_labels)) == [0, 1, 2, 3, 4] and pairs.modality == "ct"
    x = grid_points(pairs.grid, 0, pairs.grid.shape[2])
    vox = world_to_voxel(pairs.grid.affine, pair["transform"].inverse(x)).reshape(3, -1)
    back = ndimage.map_coordinates(pair["moving_labels"], vox, order=0).reshape(pairs.grid.shape)
    recovered = dice_per_label(pairs.fixed_labels, back, (1, 2, 3, 4))
    unregistered = dice_per_label(pairs.fixed_labels, pair["moving_labels"], (1, 2, 3, 4))
    assert min(recovered.values()) > 0.85 and np.mean(list(unregistered.values())) < np.mean(list(recovered.values())) - 0.1
    with pytest.raises(ValueError, match="one contrast"):
        synthetic.AbdomenPairs(str(tmp_path / "x"), contrast="inverted", size=32)
