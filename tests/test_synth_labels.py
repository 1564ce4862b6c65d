"""The on-the-fly label-map generator (data_util/synth_labels.py): config checks, determinism per
pair key, value ranges, the fields' geometry by hand, the resumable pair sequence, and the
coarse soft-Dice term it trains with."""
import importlib.util
import json
import math

import pytest
import torch

from data_util import DatasetError
from data_util.formats import make_dataset_loader, open_dataset
from data_util.synth_labels import (SequentialPairSampler, SynthDataset, SynthPairDataset, make_pair, shapes_map,
                                    smooth_field, synth_image, then_affine)
from network.layers import warp
from network.losses import RegistrationLoss
from network.metrics import jacobian_determinant
from network.training import resumed_loader

HAVE_TEMPLATE = importlib.util.find_spec("nilearn") is not None


def write_config(tmp_path, **changes):
    config = {"format": "synth", "image_size": [32, 32, 32], "maps": {"shapes": 1.0}, "n_labels": 6,
              "parts": 2, "seed": 3, "val_pairs": 3, **changes}
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("changes, needle", [
    ({"image_size": [32, 32]}, "image_size"),
    ({"maps": {"faces": 1.0}}, "maps"),
    ({"maps": {"shapes": -1.0}}, "maps"),
    ({"colour": 1}, "unknown synth dataset keys"),
    ({"maps": {"brain": 1.0}, "n_labels": 4, "parts": 2}, "n_labels >= 3 x parts"),
    ({"independent_contrast": 1.5}, "independent_contrast"),
    ({"independent_contrast": "half"}, "independent_contrast"),
    ({"independent_contrast": 0.5, "modality": "ct"}, "independent_contrast"),
    ({"still_pairs": -0.1}, "still_pairs"),
    ({"still_pairs": True}, "still_pairs"),
])
def test_bad_configs_name_the_file_and_the_key(tmp_path, changes, needle):
    path = write_config(tmp_path, **changes)
    with pytest.raises(DatasetError, match=needle) as e:
        open_dataset(str(path))
    assert str(path) in str(e.value)


def test_a_pair_is_a_function_of_its_key(tmp_path):
    ds = open_dataset(str(write_config(tmp_path)))
    assert isinstance(ds, SynthDataset) and ds.normalisation == "mri" and ds.register_affine == "affine"
    a, b = make_pair(ds.config, (0, 5)), make_pair(ds.config, (0, 5))
    for key in ("voxel1", "voxel2", "seg1", "seg2"):
        assert torch.equal(a[key], b[key])
    other = make_pair(ds.config, (0, 6))
    assert not torch.equal(a["voxel1"], other["voxel1"])
    stream = make_pair(ds.config, (1, 5))                     # another run seed: another sequence
    assert not torch.equal(a["voxel1"], stream["voxel1"])


def test_items_have_the_loader_layout_and_ranges(tmp_path):
    ds = open_dataset(str(write_config(tmp_path)))
    item = SynthPairDataset(ds)[(0, 0)]
    for k in (1, 2):
        v, s = item[f"voxel{k}"], item[f"seg{k}"]
        assert v.shape == (1, 32, 32, 32) and v.dtype == torch.float32
        assert float(v.min()) >= 0 and float(v.max()) <= 1 and float(v.max()) > 0.5
        assert torch.equal(s, s.round()) and 0 <= float(s.min()) and float(s.max()) <= 6
        assert item[f"has_seg{k}"] is True
    assert item["id1"].startswith("train0_000000_shapes")
    assert (item["seg1"] > 0).float().mean() > 0.1           # a head-sized foreground
    assert (item["seg1"] != item["seg2"]).any()               # the two views differ


def test_validation_split_is_fixed_and_disjoint(tmp_path):
    ds = open_dataset(str(write_config(tmp_path)))
    assert ds.num_pairs("2") == 3 and len(ds.pairs("2")) == 3
    ids = [b["id1"][0] for b in make_dataset_loader(ds, "2", 1)]
    assert ids == [f"val_{i:06d}_shapes_fixed" for i in range(3)]
    assert [b["id1"][0] for b in make_dataset_loader(ds, "2", 1, limit=2)] == ids[:2]
    with pytest.raises(DatasetError, match="endless"):
        ds.pairs("1")
    with pytest.raises(DatasetError, match="online teacher"):
        ds.keyed_pairs("1", ["a-b"])
    with pytest.raises(DatasetError, match="do not apply"):
        make_dataset_loader(ds, "1", 1, loop=True, teacher_flows=object())


def test_resumed_sequence_continues_the_uninterrupted_one(tmp_path):
    sampler = SequentialPairSampler(batch_size=2, seed=4)
    it = iter(sampler)
    first = [next(it) for _ in range(5)]
    assert first[0] == [(4, 0), (4, 1)] and first[3] == [(4, 6), (4, 7)]
    ds = open_dataset(str(write_config(tmp_path)))
    loader = make_dataset_loader(ds, "1", 2, loop=True, seed=4)
    resumed = iter(resumed_loader(loader, 3))
    assert list(next(resumed)["id1"]) == ["train4_000006_shapes_fixed", "train4_000007_shapes_fixed"]


def test_then_affine_by_hand():
    size = (5, 5, 5)
    shift = (torch.eye(3), torch.tensor([1.0, -2.0, 0.5]))
    d = then_affine(None, shift, size)
    assert torch.allclose(d, torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1).expand(1, 3, *size))
    # a quarter turn about axis 2 maps (x, y) -> (-y, x) about the centre (2, 2): at voxel (4, 2, 2)
    # the reading point is (2, 4, 2), a displacement of (-2, 2, 0)
    r = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    d = then_affine(None, (r, torch.zeros(3)), size)
    assert torch.allclose(d[0, :, 4, 2, 2], torch.tensor([-2.0, 2.0, 0.0]), atol=1e-6)
    # after a field: y = M (x + u(x) - c) + c, so a constant u adds M u
    u = torch.zeros(1, 3, *size)
    u[:, 0] = 1.0
    d = then_affine(u, (r, torch.zeros(3)), size)
    assert torch.allclose(d[0, :, 2, 2, 2], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)


def test_smooth_field_is_bounded_and_does_not_fold():
    gen = torch.Generator().manual_seed(0)
    assert smooth_field(gen, (24, 24, 24), 0.0, 8.0).abs().max() == 0
    u = smooth_field(gen, (32, 32, 32), 4.0, 10.0)
    assert u.shape == (1, 3, 32, 32, 32)
    assert 1.0 < float(u.norm(dim=1).max()) < 8.0             # integrated velocity of at most 4 voxels
    assert float(jacobian_determinant(u).min()) > 0


def test_images_follow_the_labels():
    gen = torch.Generator().manual_seed(1)
    labels = shapes_map(gen, (32, 32, 32), 4)
    means = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8])
    x = synth_image(gen, labels, means)[0]
    inside = [float(x[labels == k].mean()) for k in range(1, 5) if (labels == k).sum() > 200]
    assert len(inside) >= 2
    assert float(x[labels == 0].mean()) < min(inside)        # stripped background stays darkest


@pytest.mark.skipif(not HAVE_TEMPLATE, reason="nilearn (the ICBM152 template) is not installed")
def test_brain_maps_are_template_tissues_cut_into_parts(tmp_path):
    ds = open_dataset(str(write_config(tmp_path, maps={"brain": 1.0}, n_labels=6, parts=2)))
    ds.validate()
    item = SynthPairDataset(ds)[(0, 1)]
    assert "brain" in item["id1"]
    values = set(item["seg1"].unique().long().tolist())
    assert values <= set(range(7)) and len(values) >= 5     # background + most of 3 tissues x 2 parts


def test_coarse_dice_matches_the_full_resolution_term():
    torch.manual_seed(0)
    fixed = torch.zeros(1, 1, 32, 32, 32)
    fixed[:, :, 8:24, 8:24, 8:24] = 1
    fixed[:, :, 12:20, 12:20, 12:20] = 2
    moving = torch.roll(fixed, 2, dims=2)
    flow = torch.zeros(1, 3, 32, 32, 32)
    flow[:, 0] = 2.0                                          # reads moving 2 voxels on: undoes the roll
    out = {"warped": warp(moving, flow), "flow": flow, "flows": [flow], "deformable": [True]}
    img = torch.rand(1, 1, 32, 32, 32)
    full = RegistrationLoss(dice_weight=1, label_values=[1, 2])
    coarse = RegistrationLoss(dice_weight=1, label_values=[1, 2], dice_downsample=2)
    for loss in (full, coarse):
        _, comps = loss(img, out, moving=img, fixed_seg=fixed, moving_seg=moving)
        assert float(comps["dice"]) < 1e-6
    none = dict(out, flow=torch.zeros_like(flow))
    a = float(full(img, none, moving=img, fixed_seg=fixed, moving_seg=moving)[1]["dice"])
    b = float(coarse(img, none, moving=img, fixed_seg=fixed, moving_seg=moving)[1]["dice"])
    assert a > 0.1 and math.isclose(a, b, rel_tol=0.05)
    with pytest.raises(ValueError, match="dice_downsample"):
        RegistrationLoss(dice_downsample=0)


def test_ct_pairs_are_windowed_hounsfield_maps(tmp_path):
    ds = open_dataset(str(write_config(tmp_path, modality="ct")))
    assert ds.normalisation == "ct"
    item = make_pair(ds.config, (0, 2))
    x, labels = item["voxel1"][0], item["seg1"][0].long()
    assert float(x[labels == 0].mean()) < 0.05                # air outside the body: below the window
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    with pytest.raises(DatasetError, match="modality"):
        open_dataset(str(write_config(tmp_path, modality="pet")))


def test_brain_maps_without_the_template_fail_in_one_line(tmp_path, monkeypatch):
    import data_util.icbm as icbm
    from data_util.image_io import ImageError

    def absent(given=None):
        raise ImageError("nilearn is not installed")
    monkeypatch.setattr(icbm, "template_dir", absent)
    path = write_config(tmp_path, maps={"brain": 1.0}, n_labels=6, parts=2)
    with pytest.raises(DatasetError, match="ICBM152 template") as e:
        open_dataset(str(path))
    assert str(path) in str(e.value)


def _label_medians(item, k):
    """Median intensity of each foreground label of image ``k``."""
    v, s = item[f"voxel{k}"].flatten(), item[f"seg{k}"].flatten()
    return torch.stack([v[s == lab].median() for lab in s.unique() if lab > 0])


def _contrast_agreement(item) -> float:
    """Correlation of the per-label medians of the two images (both views carry the same labels)."""
    a, b = _label_medians(item, 1), _label_medians(item, 2)
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_independent_contrast_redraws_the_moving_intensities_only(tmp_path):
    same = open_dataset(str(write_config(tmp_path, image_size=[24, 24, 24])))
    assert same.config.independent_contrast == 0.0
    (tmp_path / "ic").mkdir()
    mixed = open_dataset(str(write_config(tmp_path / "ic", image_size=[24, 24, 24], independent_contrast=1.0)))
    agree_same, agree_mixed = [], []
    for index in range(4):
        a, b = make_pair(same.config, (0, index)), make_pair(mixed.config, (0, index))
        assert torch.equal(a["seg1"], b["seg1"]) and torch.equal(a["seg2"], b["seg2"])   # same anatomy
        agree_same.append(_contrast_agreement(a))
        agree_mixed.append(_contrast_agreement(b))
    assert min(agree_same) > 0.95                  # one contrast per pair: labels keep their intensities
    assert min(agree_mixed) < 0.6                  # the moving image's intensities are drawn afresh


def test_still_pairs_show_one_anatomy_in_two_scans(tmp_path):
    still = open_dataset(str(write_config(tmp_path, image_size=[24, 24, 24], still_pairs=1.0))).config
    for index in range(3):
        item = make_pair(still, (0, index))
        assert torch.equal(item["seg1"], item["seg2"])                      # nothing moved
        assert not torch.equal(item["voxel1"], item["voxel2"])              # two scans: own noise and bias
    (tmp_path / "half").mkdir()
    half = open_dataset(str(write_config(tmp_path / "half", image_size=[24, 24, 24], still_pairs=0.5))).config
    moved = [not torch.equal(p["seg1"], p["seg2"]) for p in (make_pair(half, (0, i)) for i in range(12))]
    assert 0 < sum(moved) < 12
