"""Tests for data_util/submission.py: Learn2Reg displacement files, checked against the organisers' warp."""
import os

import numpy as np
import pytest
import torch
from scipy import ndimage

from data_util.submission import (apply_displacement, read_displacement, submission_name, write_displacement,
                                  write_submission)
from network.layers import warp
from network.metrics import warp_labels_nearest

SHAPE = (16, 14, 12)


def smooth(shape, amplitude, seed, sigma=2.0):
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return a * (amplitude / np.abs(a).max())


def smooth_flow(amplitude=1.5, seed=0):
    """Random smooth torch flow ``(1, 3, *SHAPE)`` float32, max |u| = amplitude voxels."""
    u = np.stack([smooth(SHAPE, amplitude, seed + c) for c in range(3)])
    return torch.from_numpy(u).float()[None]


def test_submission_name():
    assert submission_name(2, 17) == "disp_0002_0017.npz"
    assert submission_name("0002", "17") == "disp_0002_0017.npz"
    assert submission_name(np.int64(3), 12345) == "disp_0003_12345.npz"
    assert submission_name("case_a", 3) == "disp_case_a_0003.npz"


def test_write_read_roundtrip_and_organisers_warp(tmp_path):
    flow = smooth_flow()
    path = write_displacement(str(tmp_path), 3, 12, flow)
    assert os.path.basename(path) == "disp_0003_0012.npz"
    assert sorted(os.listdir(tmp_path)) == ["disp_0003_0012.npz"]          # no temporary left behind
    with np.load(path) as f:
        assert f.files == ["arr_0"]
        assert f["arr_0"].dtype == np.float16 and f["arr_0"].shape == (3, *SHAPE)
    disp = read_displacement(path)
    assert disp.dtype == np.float32 and disp.shape == (3, *SHAPE)
    np.testing.assert_allclose(disp, flow[0].numpy(), rtol=2.0 ** -11, atol=1e-7)

    # trilinear: the organisers' map_coordinates(order=1) on the read-back field = our warp, inside the
    # volume (|u| <= 1.5, so interior samples never reach the border where the padding rules differ)
    moving = smooth(SHAPE, 1.0, seed=10) + 0.5
    ours = warp(torch.from_numpy(moving).float()[None, None], flow)[0, 0].numpy()
    ref = apply_displacement(moving, disp, order=1)
    inner = (slice(2, -2),) * 3
    value_range = moving.max() - moving.min()
    assert np.abs(ours[inner] - ref[inner]).max() < 1e-2 * value_range

    # nearest neighbour on a label map: float16 rounding may flip a few nearest-neighbour choices
    labels = np.digitize(smooth(SHAPE, 1.0, seed=20, sigma=1.5), [-0.4, 0.0, 0.3]).astype(np.float32)
    ours = warp_labels_nearest(torch.from_numpy(labels)[None, None], flow)[0, 0].numpy()
    ref = apply_displacement(labels, disp, order=0)
    assert (ours == ref).mean() >= 0.99
    # with the unrounded field the two agree exactly, everywhere
    assert np.array_equal(ours, apply_displacement(labels, flow[0].numpy(), order=0))


def test_write_accepts_numpy_and_3d_shape_and_write_submission(tmp_path):
    flow = smooth_flow(seed=5)[0].numpy()
    paths = write_submission(str(tmp_path), [(1, 2, flow), ("0004", "0007", torch.from_numpy(flow)[None])])
    assert [os.path.relpath(p, tmp_path) for p in paths] == [os.path.join("task_04", "disp_0001_0002.npz"),
                                                              os.path.join("task_04", "disp_0004_0007.npz")]
    assert np.array_equal(read_displacement(paths[0]), read_displacement(paths[1]))
    other = write_submission(str(tmp_path), [(1, 2, flow)], task=3)
    assert os.path.relpath(other[0], tmp_path) == os.path.join("task_03", "disp_0001_0002.npz")


def test_write_rejects_bad_flows_and_leaves_no_file(tmp_path):
    flow = smooth_flow()
    flow[0, 1, 3, 4, 5] = float("nan")
    with pytest.raises(ValueError, match=r"\(3, 12\).*non-finite"):
        write_displacement(str(tmp_path), 3, 12, flow)
    big = torch.zeros(3, *SHAPE)
    big[0, 0, 0, 0] = 70000.0
    with pytest.raises(ValueError, match="float16"):
        write_displacement(str(tmp_path), 3, 12, big)
    with pytest.raises(ValueError, match=r"\(3, X, Y, Z\)"):
        write_displacement(str(tmp_path), 3, 12, torch.zeros(2, *SHAPE))
    assert os.listdir(tmp_path) == []


def _save(path, **arrays):
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    return str(path)


def test_read_rejects_bad_files(tmp_path):
    good = np.zeros((3, *SHAPE), np.float16)
    text = tmp_path / "disp_text.npz"
    text.write_text("not an archive\n")
    nan = good.copy()
    nan[1, 2, 3, 4] = np.nan
    cases = {
        str(tmp_path / "disp_missing.npz"): "not found",
        str(text): "not an npz",
        _save(tmp_path / "disp_nokey.npz", disp=good): "arr_0",
        _save(tmp_path / "disp_twochan.npz", arr_0=good[:2]): "shape",
        _save(tmp_path / "disp_flat.npz", arr_0=good[0]): "shape",
        _save(tmp_path / "disp_int.npz", arr_0=good.astype(np.int16)): "float",
        _save(tmp_path / "disp_nan.npz", arr_0=nan): "non-finite",
    }
    for path, reason in cases.items():
        with pytest.raises(ValueError, match=reason) as err:
            read_displacement(path)
        assert os.path.basename(path) in str(err.value) and "\n" not in str(err.value)
    # other float dtypes are accepted
    assert read_displacement(_save(tmp_path / "disp_f32.npz", arr_0=good.astype(np.float32))).dtype == np.float32


def test_apply_displacement_shift():
    moving = np.arange(np.prod(SHAPE), dtype=np.float64).reshape(SHAPE)
    disp = np.zeros((3, *SHAPE), np.float16)
    disp[2] = 1.0
    out = apply_displacement(moving, disp, order=0)
    assert np.array_equal(out[:, :, :-1], moving[:, :, 1:]) and np.all(out[:, :, -1] == 0)
