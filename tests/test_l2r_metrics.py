"""Tests for the Learn2Reg scoring section of network/metrics.py, against brute-force / scipy references."""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from data_util.submission import apply_displacement
from network.metrics import (L2R_KEYS, dice30, hausdorff95, l2r_jacobian_determinant, l2r_jacobian_stats,
                             l2r_pair_scores, summarise_l2r, warp_labels_nearest)


def smooth_flow(shape, amplitude, seed=0, sigma=2.0):
    """Random smooth flow ``(1, 3, *shape)`` float64 with max |u| = amplitude."""
    rng = np.random.default_rng(seed)
    u = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(3)])
    return torch.from_numpy(u * (amplitude / np.abs(u).max())).unsqueeze(0)


def ball(shape, centre, radius):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return ((grid - np.asarray(centre)) ** 2).sum(-1) <= radius ** 2


# ================================================================================================
# HD95
# ================================================================================================

def brute_hd95(a, b, spacing, percentile=95):
    structure = ndimage.generate_binary_structure(3, 1)
    sa = np.argwhere(a & ~ndimage.binary_erosion(a, structure, border_value=0)) * np.asarray(spacing)
    sb = np.argwhere(b & ~ndimage.binary_erosion(b, structure, border_value=0)) * np.asarray(spacing)
    d = cdist(sa, sb)
    return max(np.percentile(d.min(1), percentile), np.percentile(d.min(0), percentile))


def test_hd95_single_voxels_identical_and_empty():
    a = np.zeros((12, 12, 12), bool)
    b = np.zeros((12, 12, 12), bool)
    a[3, 6, 6] = True
    b[8, 6, 6] = True
    assert hausdorff95(a, b) == pytest.approx(5.0)
    assert hausdorff95(a, b, spacing=(2, 1, 1)) == pytest.approx(10.0)
    assert hausdorff95(a, b, spacing=(1, 3, 3)) == pytest.approx(5.0)
    assert hausdorff95(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(5.0)
    assert hausdorff95(a, a) == 0.0
    blob = ball((12, 12, 12), (6, 6, 6), 3)
    assert hausdorff95(blob, blob) == 0.0
    empty = np.zeros_like(a)
    assert math.isnan(hausdorff95(empty, empty))
    assert hausdorff95(a, empty) == math.inf
    assert hausdorff95(empty, b) == math.inf


@pytest.mark.parametrize("spacing", [(1, 1, 1), (1.5, 0.7, 2.0)])
def test_hd95_blobs_match_brute_force(spacing):
    shape = (24, 24, 24)
    a = ball(shape, (9, 10, 11), 6)
    b = ball(shape, (13, 9, 12), 4) | ball(shape, (16, 16, 8), 3)
    b[:, :, :3] = True                     # touches the array edge: edge voxels are surface voxels
    b[:, :, :3] &= ball(shape, (12, 12, 0), 7)[:, :, :3]
    assert hausdorff95(a, b, spacing) == pytest.approx(brute_hd95(a, b, spacing), rel=1e-12)
    assert hausdorff95(b, a, spacing) == pytest.approx(brute_hd95(a, b, spacing), rel=1e-12)
    assert hausdorff95(a, b, spacing, percentile=100) == pytest.approx(brute_hd95(a, b, spacing, 100), rel=1e-12)
    assert hausdorff95(a, b, spacing, percentile=100) > hausdorff95(a, b, spacing)
    # a full box: every voxel on the array edge is surface, none inside the array is
    full = np.ones((8, 8, 8), bool)
    assert hausdorff95(full, full) == 0.0
    inner = np.zeros((8, 8, 8), bool)
    inner[1:7, 1:7, 1:7] = True
    assert hausdorff95(full, inner) == pytest.approx(brute_hd95(full, inner, (1, 1, 1)))
    # the box's 296 surface voxels: 216 face voxels at 1, 72 edge voxels at sqrt 2, 8 corners at sqrt 3
    assert hausdorff95(full, inner) == pytest.approx(math.sqrt(2))


# ================================================================================================
# Jacobian (central differences, 2-voxel crop)
# ================================================================================================

def numpy_l2r_jacdet(disp):
    """The organisers' recipe: scipy correlate with [-0.5, 0, 0.5] (zero padding), crop [2:-2]."""
    kernel = np.array([-0.5, 0.0, 0.5])
    grads = []
    for axis in range(3):
        k = kernel.reshape([3 if d == axis else 1 for d in range(3)])
        grads.append(np.stack([ndimage.correlate(disp[c], k, mode="constant", cval=0.0) for c in range(3)]))
    jac = np.stack(grads, 1) + np.eye(3).reshape(3, 3, 1, 1, 1)      # jac[c, d] = delta + du_c/dx_d
    jac = jac[:, :, 2:-2, 2:-2, 2:-2]
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))


def test_l2r_jacobian_zero_flow_and_shape():
    det = l2r_jacobian_determinant(torch.zeros(2, 3, 9, 10, 11))
    assert det.shape == (2, 5, 6, 7) and det.dtype == torch.float64
    assert torch.all(det == 1)
    stats = l2r_jacobian_stats(torch.zeros(2, 3, 9, 10, 11))
    assert stats["sdlogj_l2r"].tolist() == [0.0, 0.0] and stats["fold_pct"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=">= 5"):
        l2r_jacobian_determinant(torch.zeros(1, 3, 9, 4, 9))


def test_l2r_jacobian_linear_flow_is_det_A():
    A = np.array([[1.2, 0.3, -0.1], [0.05, 0.8, 0.25], [-0.2, 0.1, 1.1]])
    shape = (9, 8, 10)
    x = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    u = np.einsum("cd,d...->c...", A - np.eye(3), x)
    det = l2r_jacobian_determinant(torch.from_numpy(u)[None])
    assert det.shape == (1, 5, 4, 6)
    np.testing.assert_allclose(det.numpy(), np.linalg.det(A), rtol=0, atol=1e-12)


def test_l2r_fold_percentage_hand_built():
    # u_0 = -3 (x_0 - 5) for x_0 >= 5, only on the slab y <= 3: central differences give
    # du_0/dx_0 = -1.5 at x_0 = 5 and -3 beyond, so J = 1 + du_0/dx_0 < 0 there (the du_0/dy terms
    # do not change det). Cropped interior: x_0 in 2..13 (9 of 12 folded), y in 2..5 (2 of 4 in slab).
    X, Y, Z = 16, 8, 7
    u = torch.zeros(1, 3, X, Y, Z, dtype=torch.float64)
    ramp = -3.0 * (torch.arange(X, dtype=torch.float64) - 5).clamp_min(0)
    u[0, 0, :, :4, :] = ramp.view(X, 1, 1)
    det = l2r_jacobian_determinant(u)
    np.testing.assert_allclose(det.numpy()[0], numpy_l2r_jacdet(u[0].numpy()), atol=1e-12)
    assert l2r_jacobian_stats(u)["fold_pct"].item() == pytest.approx(100.0 * (9 / 12) * (2 / 4))


@pytest.mark.parametrize("offset", [3.0, 15.0])
def test_sdlogj_matches_organisers_recipe(offset):
    u = torch.cat([smooth_flow((12, 14, 10), 3.0, seed=s) for s in (1, 2)])
    ref_det = np.stack([numpy_l2r_jacdet(u[i].numpy()) for i in range(2)])
    np.testing.assert_allclose(l2r_jacobian_determinant(u).numpy(), ref_det, atol=1e-12)
    ref = [np.log(np.clip(d + offset, 1e-9, 1e9)).std() for d in ref_det]
    stats = l2r_jacobian_stats(u, offset=offset)
    np.testing.assert_allclose(stats["sdlogj_l2r"].numpy(), ref, rtol=1e-12)
    assert np.all(stats["sdlogj_l2r"].numpy() > 0)
    np.testing.assert_allclose(stats["fold_pct"].numpy(), [100.0 * (d <= 0).mean() for d in ref_det])


# ================================================================================================
# nearest-neighbour label warp
# ================================================================================================

def test_warp_labels_nearest_shift_identity_and_dtype():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 5, (2, 1, 6, 7, 8)))
    flow = torch.zeros(2, 3, 6, 7, 8)
    same = warp_labels_nearest(labels, flow)
    assert same.dtype == labels.dtype and torch.equal(same, labels)
    flow[:, 0] = 1.0
    shifted = warp_labels_nearest(labels, flow)
    assert torch.equal(shifted[:, :, :-1], labels[:, :, 1:])
    assert torch.all(shifted[:, :, -1] == 0)
    # float labels above 2^24 are copied exactly
    big = labels.double() + 2.0 ** 40
    assert torch.equal(warp_labels_nearest(big, torch.zeros(2, 3, 6, 7, 8)), big)


@pytest.mark.parametrize("integer", [True, False])
def test_warp_labels_nearest_matches_map_coordinates(integer):
    rng = np.random.default_rng(1)
    shape = (10, 9, 11)
    labels = rng.integers(0, 6, shape).astype(np.float32)
    if integer:
        disp = rng.integers(-3, 4, (3, *shape)).astype(np.float32)
    else:
        disp = rng.uniform(-3, 3, (3, *shape)).astype(np.float32)
    ours = warp_labels_nearest(torch.from_numpy(labels)[None, None], torch.from_numpy(disp)[None])[0, 0]
    ref = apply_displacement(labels, disp, order=0)
    assert np.array_equal(ours.numpy(), ref)
    assert (ref == 0).mean() > (labels == 0).mean()      # some samples fell outside


# ================================================================================================
# per-pair scores and aggregation
# ================================================================================================

def two_label_map(shape=(16, 14, 12)):
    seg = np.zeros(shape, np.float32)
    seg[ball(shape, (6, 6, 6), 3)] = 1
    seg[ball(shape, (10, 8, 6), 2)] = 2
    return seg


def test_l2r_pair_scores_identical_maps_zero_flow():
    seg = torch.from_numpy(two_label_map())[None, None].repeat(2, 1, 1, 1, 1)
    rows = l2r_pair_scores(seg, seg, torch.zeros(2, 3, *seg.shape[2:]), [1, 2], spacing=(2.0, 1.0, 1.0))
    assert len(rows) == 2
    for r in rows:
        assert r["dice"] == 1 and r["dice_1"] == 1 and r["dice_2"] == 1 and r["dice_before"] == 1
        assert r["hd95"] == 0 and r["hd95_mm"] == 0 and r["hd95_1"] == 0 and r["hd95_2"] == 0
        assert r["sdlogj_l2r"] == 0 and r["fold_pct"] == 0
        assert set(L2R_KEYS) <= set(r)


def test_l2r_pair_scores_skips_label_absent_from_moving():
    fixed = two_label_map()
    moving = fixed.copy()
    moving[moving == 2] = 0
    moving = np.roll(moving, 1, axis=1)
    r = l2r_pair_scores(torch.from_numpy(fixed)[None, None], torch.from_numpy(moving)[None, None],
                        torch.zeros(1, 3, *fixed.shape), [1, 2])[0]
    assert math.isnan(r["dice_2"]) and math.isnan(r["hd95_2"])
    assert 0 < r["dice_1"] < 1 and r["dice"] == r["dice_1"] and r["hd95"] == r["hd95_1"] == pytest.approx(1.0)


def test_l2r_pair_scores_flow_undoes_integer_shift():
    fixed = two_label_map()
    moving = np.roll(fixed, 2, axis=0)                   # moving(p + 2 e_0) = fixed(p)
    flow = torch.zeros(1, 3, *fixed.shape)
    flow[:, 0] = 2.0
    spacings = torch.tensor([[1.0, 2.0, 3.0]])
    r = l2r_pair_scores(torch.from_numpy(fixed)[None, None], torch.from_numpy(moving + 0.2)[None, None],
                        flow, [1, 2], spacing=spacings)[0]
    assert r["dice_before"] < 0.9
    assert r["dice"] == 1 and r["dice_1"] == 1 and r["dice_2"] == 1
    assert r["hd95"] == 0 and r["hd95_mm"] == 0


def test_l2r_pair_scores_empty_warped_label_uses_diagonal():
    fixed = two_label_map()
    flow = torch.zeros(1, 3, *fixed.shape)
    flow[:, 0] = 100.0                                    # everything samples outside: warped map is all 0
    r = l2r_pair_scores(torch.from_numpy(fixed)[None, None], torch.from_numpy(fixed)[None, None], flow, [1, 2],
                        spacing=(2.0, 1.0, 1.0))[0]
    diag = math.sqrt(15 ** 2 + 13 ** 2 + 11 ** 2)
    diag_mm = math.sqrt(30 ** 2 + 13 ** 2 + 11 ** 2)
    assert r["dice"] == 0 and r["hd95_1"] == pytest.approx(diag) and r["hd95"] == pytest.approx(diag)
    assert r["hd95_mm"] == pytest.approx(diag_mm)


def test_summarise_l2r_p30_and_nan():
    vals = [0.5, 0.9, 0.7, math.nan, 0.6, 0.8, 0.65]
    rows = [{"id1": "1", "id2": "2", "dice": v, "hd95": 2.0 * i} for i, v in enumerate(vals)]
    s = summarise_l2r(rows)
    assert set(s) == {"dice", "hd95"}
    finite = np.array([v for v in vals if not math.isnan(v)])
    assert s["dice"]["n"] == 6
    assert s["dice"]["p30"] == pytest.approx(np.quantile(finite, 0.3))
    assert s["dice"]["mean"] == pytest.approx(finite.mean()) and s["dice"]["std"] == pytest.approx(finite.std())
    assert dice30(rows) == pytest.approx(np.quantile(finite, 0.3))
    assert s["hd95"]["n"] == 7
    assert summarise_l2r(rows, ["fold_pct"])["fold_pct"]["n"] == 0
