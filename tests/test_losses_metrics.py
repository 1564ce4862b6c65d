"""Tests for network/losses.py and network/metrics.py (DESIGN.md §4, §7), against hand-computed values."""
import math


import pytest
import torch

from network import RegistrationLoss, build_model
from network.base_networks import affine_flow
from network.layers import identity_grid
from network.layers import warp
from network.losses import (affine_det_loss, affine_ortho_loss, correlation_loss, lncc_loss, mind_loss,
                            mind_ssc, mse_loss, smoothness_loss)
from network.metrics import (METRIC_KEYS, dice_jaccard, jacobian_determinant, jacobian_stats,
                             landmark_distance, pair_metrics, segmentation_scores, summarise)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ================================================================================================
# losses
# ================================================================================================

def test_correlation_loss_identical_affine_and_negated():
    a = rand(2, 1, 8, 8, 8)
    assert correlation_loss(a, a).shape == (2,)
    assert correlation_loss(a, a).tolist() == pytest.approx([0, 0], abs=1e-3)
    assert correlation_loss(a, 3.0 * a + 0.7).tolist() == pytest.approx([0, 0], abs=1e-3)
    assert correlation_loss(a, -a).tolist() == pytest.approx([2, 2], abs=1e-3)
    assert correlation_loss(a, -2.0 * a + 5.0).tolist() == pytest.approx([2, 2], abs=1e-3)
    # independent noise: about 1
    assert correlation_loss(a, rand(2, 1, 8, 8, 8, seed=1)).tolist() == pytest.approx([1, 1], abs=0.15)


def test_correlation_loss_hand_value():
    # a = 1,2,3,4 ; b = 1,3,2,4 : cov = 1, var = 1.25 each -> r = 0.8
    a = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 1, 2, 2)
    b = torch.tensor([1.0, 3.0, 2.0, 4.0], dtype=torch.float64).view(1, 1, 1, 2, 2)
    assert correlation_loss(a, b).item() == pytest.approx(0.2, abs=1e-5)


def test_correlation_loss_per_sample():
    a = rand(2, 1, 6, 6, 6)
    w = torch.stack([a[0], -a[1]])
    assert correlation_loss(a, w).tolist() == pytest.approx([0, 2], abs=1e-3)


def test_lncc_loss():
    a = rand(2, 1, 12, 12, 12)
    assert lncc_loss(a, a).shape == (2,)
    assert lncc_loss(a, a).tolist() == pytest.approx([0, 0], abs=1e-3)
    # a positive scaling (zero padding at the border breaks an offset, not a scale)
    assert lncc_loss(a, 2.0 * a).tolist() == pytest.approx([0, 0], abs=1e-3)
    # independent noise: far from 0 (zero padding correlates the borders, so not quite 1)
    assert (lncc_loss(a, rand(2, 1, 12, 12, 12, seed=9)) > 0.5).all()
    assert lncc_loss(a, a, window=3).tolist() == pytest.approx([0, 0], abs=1e-3)
    with pytest.raises(ValueError):
        lncc_loss(a, a, window=4)


def test_mind_loss_ignores_contrast_and_sees_motion():
    a = rand(2, 1, 16, 16, 16)
    assert mind_loss(a, a).shape == (2,)
    # intensities through any affine map, inverted included, leave MIND-SSC unchanged
    assert mind_loss(a, 1.0 - a).tolist() == pytest.approx([0, 0], abs=1e-12)
    assert mind_loss(a, 3.0 * a + 0.2).tolist() == pytest.approx([0, 0], abs=1e-12)
    assert (mind_loss(a, torch.roll(a, 2, dims=2)) > 1e-2).all()
    # on the full grid with dilation d it is the mean squared descriptor distance
    b = rand(2, 1, 16, 16, 16, seed=3)
    want = ((mind_ssc(a, 1, 2) - mind_ssc(b, 1, 2)) ** 2).mean((1, 2, 3, 4))
    assert torch.allclose(mind_loss(a, b, downsample=1, dilation=2), want)


def test_mind_ssc_normalises_each_image_of_a_batch_on_its_own():
    a = rand(2, 1, 12, 12, 12)
    both = mind_ssc(torch.cat([a[:1], 10.0 * a[1:]]))
    assert torch.allclose(both[0], mind_ssc(a[:1])[0]) and torch.allclose(both[1], mind_ssc(a[1:])[0])


def test_mind_training_similarity_registers_across_contrasts():
    """A smooth image against a shifted, inverted copy: away from the border (where the warp reads
    outside the image) the MIND term vanishes at the true displacement, not at none; RegistrationLoss
    reports the same term as mind_loss."""
    base = torch.nn.functional.avg_pool3d(rand(1, 1, 32, 32, 32), 5, stride=1, padding=2)
    moving = 1.0 - torch.roll(base, 2, dims=2)             # fixed(p) = 1 - moving(p + 2 e_x)
    true = torch.zeros(1, 3, 32, 32, 32, dtype=torch.float64)
    true[:, 0] = 2.0
    inner = (slice(None), slice(None)) + (slice(4, -4),) * 3
    warped = warp(moving, true)
    assert mind_loss(base[inner], warped[inner]).item() < 1e-12
    assert mind_loss(base[inner], moving[inner]).item() > 1e-2
    loss = RegistrationLoss(similarity="mind", reg_weight=0.0)
    _, comps = loss(base, {"warped": warped, "flows": [true], "deformable": [True], "flow": true})
    assert comps["sim"].item() == pytest.approx(mind_loss(base, warped).item())


def test_mse_loss_hand_value():
    a = torch.zeros(2, 1, 2, 2, 2, dtype=torch.float64)
    b = a.clone()
    b[0, 0, 0, 0, 0] = 2.0            # (4) / 8
    b[1] = 0.5                        # 0.25
    assert mse_loss(a, b).tolist() == pytest.approx([0.5, 0.25])


def test_smoothness_of_constant_flow_is_zero():
    f = torch.ones(2, 3, 5, 4, 3, dtype=torch.float64) * torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1, 1)
    assert smoothness_loss(f).tolist() == [0.0, 0.0]


def test_smoothness_of_linear_ramp_hand_formula():
    X, Y, Z = 5, 4, 3
    g = identity_grid((X, Y, Z), dtype=torch.float64)[0]
    a0, a1 = 0.7, -1.3
    f = torch.zeros(2, 3, X, Y, Z, dtype=torch.float64)
    f[0, 0] = a0 * g[0]                   # u_x = a x
    f[1, 0] = a1 * g[0]
    expected = [0.5 * a * a * (X - 1) * Y * Z / (X * Y * Z) for a in (a0, a1)]
    assert smoothness_loss(f).tolist() == pytest.approx(expected, rel=1e-12)
    # u_z = b y: differences along y only, (Y-1) of them per column
    bcoef = 2.0
    f = torch.zeros(1, 3, X, Y, Z, dtype=torch.float64)
    f[0, 2] = bcoef * g[1]
    assert smoothness_loss(f).item() == pytest.approx(0.5 * bcoef ** 2 * X * (Y - 1) * Z / (X * Y * Z))
    # a translation added to the ramp changes nothing
    f[0, 1] += 4.0
    assert smoothness_loss(f).item() == pytest.approx(0.5 * bcoef ** 2 * (Y - 1) / Y)


def _rotation(deg_z, deg_x):
    cz, sz = math.cos(math.radians(deg_z)), math.sin(math.radians(deg_z))
    cx, sx = math.cos(math.radians(deg_x)), math.sin(math.radians(deg_x))
    Rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    Rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    return Rz @ Rx


def test_affine_det_and_ortho_losses():
    I = torch.eye(3, dtype=torch.float64)
    R = _rotation(30, 50)
    A = torch.stack([I, R, torch.diag(torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)),
                     1.1 * I, torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))])
    det = affine_det_loss(A)
    ortho = affine_ortho_loss(A)
    assert det.shape == ortho.shape == (5,)
    # identity and rotation: both 0
    assert det[:2].tolist() == pytest.approx([0, 0], abs=1e-12)
    assert ortho[:2].tolist() == pytest.approx([0, 0], abs=1e-6)
    # scaling diag(2,1,1): det 2 -> 0.5 * 1^2; eig(AᵀA) = 4,1,1 -> 4+1+1 + 1/4+1+1 - 6 = 2.25
    assert det[2].item() == pytest.approx(0.5, abs=1e-12)
    assert ortho[2].item() == pytest.approx(2.25, abs=1e-4)
    # uniform 1.1: det 1.331 ; eig 1.21 x3
    assert det[3].item() == pytest.approx(0.5 * 0.331 ** 2, abs=1e-12)
    assert ortho[3].item() == pytest.approx(3 * 1.21 + 3 / 1.21 - 6, abs=1e-4)
    # a reflection is orthogonal (ortho 0) but has det -1
    assert ortho[4].item() == pytest.approx(0, abs=1e-6)
    assert det[4].item() == pytest.approx(2.0, abs=1e-12)


def _fake_output(with_affine):
    B, shape = 2, (6, 5, 4)
    g = identity_grid(shape, dtype=torch.float64)[0]
    ramp_a = torch.zeros(B, 3, *shape, dtype=torch.float64)
    ramp_a[:, 0] = 0.5 * g[0]                      # per sample 0.5*0.25*(5/6)
    ramp_b = torch.zeros(B, 3, *shape, dtype=torch.float64)
    ramp_b[:, 1] = 1.0 * g[1]                      # per sample 0.5*1*(4/5)
    out = {"flows": [ramp_a, ramp_b], "deformable": [True, True], "affine": None}
    if with_affine:
        W = torch.zeros(B, 3, 3, dtype=torch.float64)
        W[0, 0, 0] = 1.0                               # A0 = diag(2,1,1), A1 = I
        A = W + torch.eye(3, dtype=torch.float64)
        aff = affine_flow(W, torch.zeros(B, 3, dtype=torch.float64), shape)
        out["flows"] = [aff] + out["flows"]          # not deformable: no smoothness on it
        out["deformable"] = [False, True, True]
        out["affine"] = {"W": W, "b": torch.zeros(B, 3, dtype=torch.float64), "A": A}
    return out


def test_registration_loss_components_and_total():
    fixed = rand(2, 1, 6, 5, 4)
    out = _fake_output(with_affine=True)
    out["warped"] = torch.stack([fixed[0], -fixed[1]])       # sim 0 + 2
    total, comps = RegistrationLoss(reg_weight=2.0)(fixed, out)
    assert set(comps) == {"sim", "reg", "det", "ortho", "total"}
    reg = 2 * (0.5 * 0.25 * 5 / 6 + 0.5 * 1.0 * 4 / 5)
    assert comps["sim"].item() == pytest.approx(2.0, abs=1e-3)
    assert comps["reg"].item() == pytest.approx(reg, rel=1e-9)
    assert comps["det"].item() == pytest.approx(0.5, abs=1e-9)
    assert comps["ortho"].item() == pytest.approx(2.25, abs=1e-4)
    expected = comps["sim"].item() + 2.0 * reg + 0.1 * 0.5 + 0.1 * comps["ortho"].item()
    assert total.item() == pytest.approx(expected, rel=1e-9)
    assert comps["total"] is total
    # custom affine weights are used
    total2, _ = RegistrationLoss(reg_weight=2.0, det_weight=1.0, ortho_weight=0.0)(fixed, out)
    assert total2.item() == pytest.approx(comps["sim"].item() + 2.0 * reg + 0.5, rel=1e-9)


def test_registration_loss_without_affine_and_other_similarities():
    fixed = rand(2, 1, 6, 5, 4)
    out = _fake_output(with_affine=False)
    out["warped"] = fixed + 0.5
    total, comps = RegistrationLoss(similarity="mse", reg_weight=0.5)(fixed, out)
    assert set(comps) == {"sim", "reg", "total"}
    reg = 2 * (0.5 * 0.25 * 5 / 6 + 0.5 * 1.0 * 4 / 5)
    assert comps["sim"].item() == pytest.approx(2 * 0.25)
    assert total.item() == pytest.approx(0.5 + 0.5 * reg)
    _, comps = RegistrationLoss(similarity="lncc", lncc_window=3)(fixed, dict(out, warped=fixed))
    assert comps["sim"].item() == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError):
        RegistrationLoss(similarity="ssim")


def test_registration_loss_on_model_output_backpropagates():
    torch.manual_seed(0)
    model = build_model(dict(base_network="LDR", preset="plain", image_size=[16] * 3, channels=2))
    fixed, moving = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    total, comps = RegistrationLoss()(fixed, model(fixed, moving))
    assert set(comps) == {"sim", "reg", "total"}
    assert torch.isfinite(total)
    total.backward()
    grad = model.cascades[0].flow.weight.grad
    assert grad is not None and grad.abs().sum() > 0


# ================================================================================================
# Jacobian
# ================================================================================================

def _linear_flow(M, shape=(6, 7, 5), centred=True):
    M = torch.as_tensor(M, dtype=torch.float64)
    g = identity_grid(shape, dtype=torch.float64)[0]
    if centred:
        g = g - torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64).view(3, 1, 1, 1)
    return torch.einsum("ij,jxyz->ixyz", M, g)[None]


def test_jacobian_of_affine_flow_is_constant_det():
    M = [[0.1, 0.2, 0.0], [0.0, -0.3, 0.1], [0.05, 0.0, 0.2]]
    # I + M = [[1.1,0.2,0],[0,0.7,0.1],[0.05,0,1.2]] -> 1.1*0.84 - 0.2*(0 - 0.005) = 0.925
    flow = _linear_flow(M)
    det = jacobian_determinant(flow)
    assert det.shape == (1, 5, 6, 4)
    assert torch.allclose(det, torch.full_like(det, 0.925), atol=1e-12)
    stats = jacobian_stats(flow)
    assert stats["jac_std"].item() == pytest.approx(0.0, abs=1e-12)
    assert stats["jac_nonpos_pct"].item() == 0.0
    assert stats["sdlogj"].item() == pytest.approx(0.0, abs=1e-12)
    # the same in float32 (the usual dtype of flows)
    stats32 = jacobian_stats(flow.float())
    assert stats32["jac_std"].item() == pytest.approx(0.0, abs=1e-5)


def test_jacobian_distinguishes_derivative_directions():
    # u_x = 0.5 y only: J = [[1, .5, 0],[0,1,0],[0,0,1]] -> det 1 ; u_x = 0.5 x -> det 1.5
    assert torch.allclose(jacobian_determinant(_linear_flow([[0, 0.5, 0], [0, 0, 0], [0, 0, 0]])),
                          torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(jacobian_determinant(_linear_flow([[0.5, 0, 0], [0, 0, 0], [0, 0, 0]])),
                          torch.tensor(1.5, dtype=torch.float64))
    # shear pair: I + M = [[1, 2, 0], [3, 1, 0], [0, 0, 1]] -> det 1 - 6 = -5
    assert torch.allclose(jacobian_determinant(_linear_flow([[0, 2, 0], [3, 0, 0], [0, 0, 0]])),
                          torch.tensor(-5.0, dtype=torch.float64))


def test_jacobian_of_reflection_like_flow():
    flow = _linear_flow([[-2.0, 0, 0], [0, 0, 0], [0, 0, 0]])    # det(I+M) = -1
    stats = jacobian_stats(flow)
    assert stats["jac_nonpos_pct"].item() == 100.0
    assert stats["jac_std"].item() == pytest.approx(0.0, abs=1e-12)
    assert stats["sdlogj"].item() == pytest.approx(0.0, abs=1e-12)


def test_jacobian_stats_mixed_folding_hand_values():
    X, Y, Z = 6, 4, 4
    steps = torch.tensor([-2.0, -2.0, 0.5, 0.5, 0.5], dtype=torch.float64)   # det = 1 + step
    u0 = torch.cat([torch.zeros(1, dtype=torch.float64), steps.cumsum(0)])
    flow = torch.zeros(1, 3, X, Y, Z, dtype=torch.float64)
    flow[0, 0] = u0.view(X, 1, 1)
    stats = jacobian_stats(flow)
    # dets: -1, -1, 1.5, 1.5, 1.5 (fraction 0.4 non-positive)
    assert stats["jac_nonpos_pct"].item() == pytest.approx(40.0)
    assert stats["jac_std"].item() == pytest.approx(math.sqrt(1.5), rel=1e-9)
    expected_sdlogj = (math.log(1.5) - math.log(1e-9)) * math.sqrt(0.4 * 0.6)
    assert stats["sdlogj"].item() == pytest.approx(expected_sdlogj, rel=1e-9)


# ================================================================================================
# Dice / Jaccard
# ================================================================================================

def _cube(shape, lo, hi):
    m = torch.zeros(shape, dtype=torch.bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def test_dice_jaccard_overlapping_cubes():
    a = _cube((10, 10, 10), (1, 1, 1), (5, 5, 5))       # 64 voxels
    b = _cube((10, 10, 10), (3, 3, 3), (7, 7, 7))       # 64 voxels, intersection 2^3 = 8, union 120
    c = _cube((10, 10, 10), (2, 3, 4), (4, 6, 9))       # 2*3*5 = 30 voxels, inside? partly
    dice, jacc = dice_jaccard(torch.stack([a, a, a]), torch.stack([b, a, c]))
    assert dice[0].item() == pytest.approx(16 / 128)
    assert jacc[0].item() == pytest.approx(8 / 120)
    assert dice[1].item() == 1.0 and jacc[1].item() == 1.0
    # a ∩ c: x 2..3 (2), y 3..4 (2), z 4 (1) -> 4 ; union 64 + 30 - 4 = 90
    assert dice[2].item() == pytest.approx(8 / 94)
    assert jacc[2].item() == pytest.approx(4 / 90)


def test_dice_jaccard_empty_masks():
    empty = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    full = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    full[0, 1, 1, 1] = True
    dice, jacc = dice_jaccard(empty, empty)
    assert math.isnan(dice.item())
    # both empty: left out (NaN) so that label means skip it, like Dice
    assert math.isnan(jacc.item())
    dice, jacc = dice_jaccard(empty, full)
    assert dice.item() == 0.0 and jacc.item() == 0.0
    dice, jacc = dice_jaccard(full, full)
    assert dice.item() == 1.0 and jacc.item() == 1.0


def test_segmentation_scores_binary_masks_0_255():
    S = (10, 10, 10)
    fixed = (_cube(S, (1, 1, 1), (5, 5, 5)).double() * 255)[None, None]
    moving = (_cube(S, (3, 3, 3), (7, 7, 7)).double() * 255)[None, None]
    dice, jacc = segmentation_scores(fixed, moving, None)
    assert dice.item() == pytest.approx(16 / 128) and jacc.item() == pytest.approx(8 / 120)
    # warped(p) = moving(p + 2): the moving cube lands exactly on the fixed cube
    flow = torch.full((1, 3, *S), 2.0, dtype=torch.float64)
    dice, jacc = segmentation_scores(fixed, moving, flow)
    assert dice.item() == pytest.approx(1.0) and jacc.item() == pytest.approx(1.0)
    # a half-voxel shift: trilinear 0/255 -> 127.5 at the edge, thresholded away (> 128)
    flow = torch.zeros(1, 3, *S, dtype=torch.float64)
    flow[:, 0] = 2.5
    dice, _ = segmentation_scores(fixed, moving, flow)
    # warped cube covers x in [1, 4) only (3 of 4 slices) and y, z shifted by 0 -> y,z in 3..6
    # fixed x 1..4, y 1..4 ; warped x 1..3 (0.5 -> p+2.5 in [3, 6.5] -> p in 1..3), y 3..6, z 3..6
    inter = 3 * 2 * 2
    assert dice.item() == pytest.approx(2 * inter / (64 + 3 * 4 * 4))


def test_segmentation_scores_with_label_values():
    S = (16, 16, 16)
    fixed = torch.zeros(1, 1, *S)
    moving = torch.zeros(1, 1, *S)
    fixed[0, 0, 1:5, 1:5, 1:5] = 10
    moving[0, 0, 3:7, 3:7, 3:7] = 10
    fixed[0, 0, 9:12, 1:4, 1:4] = 20
    moving[0, 0, 9:12, 1:4, 1:4] = 20
    fixed[0, 0, 1:3, 10:14, 10:14] = 30           # only in the fixed image
    values = [10, 20, 30, 40]                      # 40 is absent from both: left out
    # sample 0 as built; sample 1 scores the fixed image against itself
    segs_f = torch.cat([fixed, fixed])
    segs_m = torch.cat([moving, fixed])
    dice, jacc = segmentation_scores(segs_f, segs_m, None, class_values=values)
    assert dice.shape == (2,)
    assert dice[0].item() == pytest.approx((16 / 128 + 1.0 + 0.0) / 3)
    assert jacc[0].item() == pytest.approx((8 / 120 + 1.0 + 0.0) / 3)
    assert dice[1].item() == pytest.approx(1.0) and jacc[1].item() == pytest.approx(1.0)
    # shift by (2, 2, 2): label 10 aligns; label 20 moves to x 7..9, y 0..1, z 0..1 (12 voxels),
    # overlapping the fixed label 20 (27 voxels) in the single voxel (9, 1, 1)
    flow = torch.full((2, 3, *S), 2.0)
    flow[1] = 0.0
    dice, jacc = segmentation_scores(segs_f, segs_m, flow, class_values=values)
    assert dice[0].item() == pytest.approx((1.0 + 2 / 39 + 0.0) / 3)
    assert jacc[0].item() == pytest.approx((1.0 + 1 / 38 + 0.0) / 3)
    assert dice[1].item() == pytest.approx(1.0)


# ================================================================================================
# landmarks
# ================================================================================================

def test_landmark_distance_constant_flow_missing_rows_and_spacing():
    S = (10, 10, 10)
    flow = torch.zeros(2, 3, *S, dtype=torch.float64)
    flow[:, 0], flow[:, 1], flow[:, 2] = 1.0, -2.0, 0.5
    p_fixed = torch.tensor([[[2, 3, 4], [5, 5, 5], [-1, -1, -1], [4, 4, 4]],
                            [[-1, -1, -1], [1, 1, 1], [2, 2, 2], [3, 3, 3]]], dtype=torch.float64)
    p_moving = torch.tensor([[[3, 1, 4.5], [7, 3, 5], [1, 1, 1], [-1, -1, -1]],
                             [[1, 1, 1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]]], dtype=torch.float64)
    d = landmark_distance(flow, p_fixed, p_moving)
    # row 0: exact (0); row 1: (6, 3, 5.5) vs (7, 3, 5) -> sqrt(1.25); rows 2, 3 missing
    assert d[0].item() == pytest.approx(math.sqrt(1.25) / 2)
    assert math.isnan(d[1].item())          # every pair of rows has a missing side
    d_mm = landmark_distance(flow, p_fixed, p_moving, spacing=(2.0, 1.0, 3.0))
    # row 1 in mm: (-2, 0, 1.5) -> 2.5
    assert d_mm[0].item() == pytest.approx(2.5 / 2)


def test_landmark_distance_uses_trilinear_flow():
    S = (8, 8, 8)
    g = identity_grid(S, dtype=torch.float64)
    flow = torch.cat([0.5 * g[:, 0:1], torch.zeros(1, 2, *S, dtype=torch.float64)], dim=1)  # u_x = x / 2
    d = landmark_distance(flow, torch.tensor([[[3.0, 1.0, 1.0]]], dtype=torch.float64),
                          torch.tensor([[[4.5, 1.0, 1.0]]], dtype=torch.float64))
    assert d.item() == pytest.approx(0.0, abs=1e-9)
    d = landmark_distance(flow, torch.tensor([[[2.5, 1.0, 1.0]]], dtype=torch.float64),
                          torch.tensor([[[2.5, 1.0, 1.0]]], dtype=torch.float64))
    assert d.item() == pytest.approx(1.25, abs=1e-9)


# ================================================================================================
# pair metrics
# ================================================================================================

def _batch():
    S = (10, 10, 10)
    seg1 = (_cube(S, (1, 1, 1), (5, 5, 5)).float() * 255)[None, None]
    seg2 = (_cube(S, (3, 3, 3), (7, 7, 7)).float() * 255)[None, None]
    return {"seg1": seg1, "seg2": seg2, "id1": ["a"], "id2": ["b"],
            "point1": torch.tensor([[[2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]]]),
            "point2": torch.tensor([[[4.0, 4.0, 4.0], [3.0, 3.0, 3.0]]])}


def test_pair_metrics_keys_and_values():
    batch = _batch()
    flow = torch.full((1, 3, 10, 10, 10), 2.0)
    rows = pair_metrics(batch, flow)
    assert len(rows) == 1
    r = rows[0]
    assert set(r) == set(METRIC_KEYS) | {"id1", "id2"}
    assert r["id1"] == "a" and r["id2"] == "b"
    assert r["dice"] == pytest.approx(1.0) and r["jacc"] == pytest.approx(1.0)
    assert r["dice_before"] == pytest.approx(16 / 128) and r["jacc_before"] == pytest.approx(8 / 120)
    assert r["landmark_dist"] == pytest.approx(0.0, abs=1e-5)
    assert r["landmark_dist_before"] == pytest.approx(math.sqrt(12), rel=1e-6)
    assert r["jac_std"] == pytest.approx(0.0, abs=1e-9)
    assert r["jac_nonpos_pct"] == 0.0
    assert r["sdlogj"] == pytest.approx(0.0, abs=1e-9)


def test_pair_metrics_without_landmarks_or_segmentations():
    batch = _batch()
    del batch["point1"], batch["point2"]
    batch["has_seg1"] = torch.tensor([False])
    rows = pair_metrics(batch, torch.zeros(1, 3, 10, 10, 10))
    r = rows[0]
    for k in ("dice", "jacc", "dice_before", "jacc_before", "landmark_dist", "landmark_dist_before"):
        assert math.isnan(r[k]), k
    assert r["jac_std"] == 0.0
    s = summarise(rows + [dict(r, dice=0.5), dict(r, dice=0.7)])
    assert s["dice"][0] == pytest.approx(0.6) and s["dice"][2] == 2
    assert s["dice"][1] == pytest.approx(0.1)
    assert math.isnan(s["landmark_dist"][0]) and s["landmark_dist"][2] == 0
