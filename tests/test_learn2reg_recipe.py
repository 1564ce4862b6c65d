"""Learn2Reg hippocampus recipe: spatial-gradient network, its regulariser, soft Dice, symmetric training,
deep supervision and joint affine augmentation (hand-computed cases)."""
import math

import pytest
import torch

from data_util.augmentation import (affine_about_centre_flow, augment_pair_affine, random_affine,
                                    rotation_matrix)
from network import ModelConfig, RegistrationLoss, build_model, count_parameters
from network.base_networks import SpatialGradientNet
from network.layers import integrate_spatial_gradient, spatial_gradient_of, warp
from network.losses import one_hot, overlap_mask, soft_dice_loss, spatial_gradient_l1_loss
from network.training import forward_and_loss


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ---- spatial-gradient parameterisation ----------------------------------------------------------

@pytest.mark.parametrize("shape", [(16, 16, 16), (5, 7, 9)])
def test_constant_half_gradient_integrates_to_identity(shape):
    g = torch.full((2, 3) + shape, 0.5, dtype=torch.float64)
    u = integrate_spatial_gradient(g)
    assert u.shape == g.shape
    assert u.abs().max().item() < 1e-12


def test_integration_hand_values():
    # g_0 = 1 (a stretch by 2 along axis 0): p_0(i) = 2 (i + 1) - 1 = 2i + 1, so u_0(i) = i + 1
    g = torch.full((1, 3, 4, 3, 2), 0.5, dtype=torch.float64)
    g[:, 0] = 1.0
    u = integrate_spatial_gradient(g)
    assert u[0, 0, :, 0, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert u[0, 1].abs().max() == 0 and u[0, 2].abs().max() == 0
    # g_2 = 0.25 on axis 2 (compression): p_2 = 0.5 (k + 1) - 1, u_2 = p_2 - k
    g = torch.full((1, 3, 2, 2, 4), 0.5, dtype=torch.float64)
    g[:, 2] = 0.25
    assert integrate_spatial_gradient(g)[0, 2, 0, 0].tolist() == [-0.5, -1.0, -1.5, -2.0]


def test_positive_gradients_never_fold_along_an_axis():
    g = torch.sigmoid(4 * torch.randn(1, 3, 12, 10, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    u = integrate_spatial_gradient(g)
    for c in range(3):
        axis = 2 + c
        n = u.shape[axis]
        index = torch.arange(n, dtype=u.dtype).view([n if d == axis else 1 for d in range(5)])
        position = u[:, c:c + 1] + index
        assert (torch.diff(position, dim=axis) > 0).all()


def test_spatial_gradient_of_inverts_integration():
    g = rand(2, 3, 6, 7, 8, seed=1).double()
    assert torch.allclose(spatial_gradient_of(integrate_spatial_gradient(g)), g, atol=1e-12)
    u = torch.randn(1, 3, 5, 5, 5, dtype=torch.float64)
    assert torch.allclose(integrate_spatial_gradient(spatial_gradient_of(u)), u, atol=1e-12)


def test_untrained_network_is_the_identity_and_size_checked():
    net = SpatialGradientNet(channels=1)
    x, y = rand(2, 1, 32, 48, 32, seed=2), rand(2, 1, 32, 48, 32, seed=3)
    out = net(x, y)
    assert out["flow"].shape == (2, 3, 32, 48, 32)
    assert out["flow"].abs().max().item() == 0.0               # zero-initialised head: sigmoid(0) = 0.5
    assert torch.allclose(out["gradient"], torch.full_like(out["gradient"], 0.5))
    with pytest.raises(ValueError, match="divisible by 16"):
        net(rand(1, 1, 40, 32, 32), rand(1, 1, 40, 32, 32))
    with pytest.raises(ValueError, match=">= 32"):
        net(rand(1, 1, 16, 32, 32), rand(1, 1, 16, 32, 32))


def test_siamese_encoder_and_difference_skips():
    """One encoder for both images; the decoder sees enc(moving) - enc(fixed) at all 5 levels."""
    net = SpatialGradientNet(channels=1)
    seen = []
    decode = net.decode
    net.decode = lambda skips: seen.append(skips) or decode(skips)
    x, y = rand(1, 1, 32, 32, 32, seed=4), rand(1, 1, 32, 32, 32, seed=5)
    net(x, y)
    net(y, x)
    ex, ey = net.encode(x), net.encode(y)
    assert len(seen[0]) == 5 and [t.shape[-1] for t in seen[0]] == [32, 16, 8, 4, 2]
    for k in range(5):
        assert torch.allclose(seen[0][k], ey[k] - ex[k], atol=1e-6)
        assert torch.allclose(seen[1][k], -seen[0][k], atol=1e-6)


def test_parameter_count_of_the_released_recipe():
    # the released FrontiersNet builds one conv per block (its --classic-vnet counts never reach the blocks)
    assert count_parameters(SpatialGradientNet(channels=8)) == 16_919_811
    assert count_parameters(SpatialGradientNet(channels=8, deep_supervision=True)) == 16_997_583


def test_deep_supervision_flows_in_training_only():
    config = ModelConfig(base_network="SpatialGradient", preset="plain", image_size=(32, 32, 32), channels=1,
                         deep_supervision=True)
    model = build_model(config)
    x, y = rand(1, 1, 32, 32, 32, seed=6), rand(1, 1, 32, 32, 32, seed=7)
    out = model(x, y)
    assert len(out["deep_warped"]) == 4 and all(w.shape == x.shape for w in out["deep_warped"])
    model.eval()
    assert "deep_warped" not in model(x, y)
    with pytest.raises(ValueError, match="deep supervision"):
        ModelConfig(base_network="LDR", preset="plain", image_size=(16, 16, 16), deep_supervision=True)


def test_deep_supervision_similarity_is_averaged_over_scales():
    fixed = rand(1, 1, 8, 8, 8, seed=8)
    warps = [rand(1, 1, 8, 8, 8, seed=s) for s in (9, 10, 11)]
    zero = torch.zeros(1, 3, 8, 8, 8)
    out = {"warped": warps[0], "deep_warped": warps[1:], "flows": [zero], "deformable": [True], "flow": zero}
    loss = RegistrationLoss("mse", reg_weight=0.0)
    _, comps = loss(fixed, out)
    expected = sum(((fixed - w) ** 2).mean() for w in warps) / 3
    assert comps["sim"].item() == pytest.approx(expected.item(), rel=1e-6)


# ---- losses ---------------------------------------------------------------------------------

def cube(lo, hi, size=16):
    m = torch.zeros(1, 1, size, size, size)
    m[:, :, lo:hi, 4:12, 4:12] = 1
    return m


def test_soft_dice_zero_for_identical_and_decreasing_with_overlap():
    fixed = cube(4, 12)
    assert soft_dice_loss(fixed, fixed).item() == pytest.approx(0.0, abs=1e-6)
    losses = [soft_dice_loss(cube(4 + s, 12 + s), fixed).item() for s in (4, 3, 2, 1, 0)]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    # hand value: shift 4 -> overlap 4 of 8 slabs: 1 - (2*256 + 1) / (512 + 512 + 1)
    assert losses[0] == pytest.approx(1 - 513 / 1025, rel=1e-6)
    # labels absent from both maps cost nothing (smoothing 1); several labels are averaged
    empty = torch.zeros_like(fixed)
    assert soft_dice_loss(empty, empty).item() == 0.0
    two = torch.cat([fixed, cube(0, 4)], 1)
    assert soft_dice_loss(two, two).item() == pytest.approx(0.0, abs=1e-6)
    half = torch.cat([fixed, torch.zeros_like(fixed)], 1)
    assert soft_dice_loss(half, two).item() == pytest.approx(0.5 * (1 - 1 / (256 + 1)), rel=1e-5)


def test_one_hot_label_values():
    seg = torch.tensor([0.0, 1.0, 2.0, 2.0, 7.0]).view(1, 1, 5, 1, 1)
    oh = one_hot(seg, [1, 2, 7])
    assert oh.shape == (1, 3, 5, 1, 1)
    assert oh[0, :, :, 0, 0].tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]


def test_dice_term_follows_the_warp_and_respects_missing_labels():
    fixed_seg = cube(4, 12) * 2
    moving_seg = cube(5, 13) * 2                  # moving label one voxel further along axis 0
    shift = torch.zeros(1, 3, 16, 16, 16)
    shift[:, 0] = 1.0                              # pull back from one voxel further: aligns them
    loss = RegistrationLoss("mse", reg_weight=0.0, dice_weight=1.0, label_values=[2])
    img = torch.zeros(1, 1, 16, 16, 16)
    aligned = {"warped": img, "flows": [shift], "deformable": [True], "flow": shift}
    identity = {"warped": img, "flows": [shift * 0], "deformable": [True], "flow": shift * 0}
    _, good = loss(img, aligned, fixed_seg=fixed_seg, moving_seg=moving_seg)
    _, bad = loss(img, identity, fixed_seg=fixed_seg, moving_seg=moving_seg)
    assert good["dice"].item() < 1e-3 < bad["dice"].item()
    _, none = loss(img, identity, fixed_seg=fixed_seg, moving_seg=moving_seg, seg_valid=torch.tensor([False]))
    assert none["dice"].item() == 0.0
    with pytest.raises(ValueError, match="label"):
        RegistrationLoss(dice_weight=1.0)


def test_spatial_gradient_regulariser_hand_value():
    assert spatial_gradient_l1_loss(torch.zeros(2, 3, 4, 4, 4)).tolist() == [0.0, 0.0]
    # u_0(i) = i: |g - 0.5| = |u(i) - u(i-1)| / 2 = 0.5 for i >= 1, 0 at i = 0; other channels 0
    u = torch.zeros(1, 3, 4, 5, 6)
    u[:, 0] = torch.arange(4.0).view(4, 1, 1)
    assert spatial_gradient_l1_loss(u).item() == pytest.approx(0.5 * (3 / 4) / 3)
    # a shear (u_0 = j, varying along axis 1) is only seen through the first slice's |u_0(0)| / 2 term
    # (u(-1) = 0): mean of j / 2 over j = 0..4 is 1, on 1/4 of the voxels of 1 of 3 channels
    shear = torch.zeros(1, 3, 4, 5, 6)
    shear[:, 0] = torch.arange(5.0).view(1, 5, 1)
    assert spatial_gradient_l1_loss(shear).item() == pytest.approx(1.0 / 4 / 3)


def test_overlap_mask_restricts_the_similarity():
    fixed, moving = rand(1, 1, 8, 8, 8, seed=12), rand(1, 1, 8, 8, 8, seed=13)
    fixed[:, :, :4] = 0
    warped = rand(1, 1, 8, 8, 8, seed=14)
    zero = torch.zeros(1, 3, 8, 8, 8)
    out = {"warped": warped, "flows": [zero], "deformable": [True], "flow": zero}
    _, comps = RegistrationLoss("mse", 0.0, mask_overlap=True)(fixed, out, moving=moving)
    m = overlap_mask(fixed, moving)
    assert m[:, :, :4].sum() == 0 and m[:, :, 4:].sum() == 4 * 64
    assert comps["sim"].item() == pytest.approx((((fixed - warped) * m) ** 2).mean().item(), rel=1e-6)


# ---- symmetric training ---------------------------------------------------------------------

class SpyModel(torch.nn.Module):
    """Records which images it registers; predicts a constant shift so losses differ per direction."""

    def __init__(self):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor(0.3))
        self.calls = []

    def forward(self, fixed, moving):
        self.calls.append((fixed, moving))
        flow = torch.zeros(fixed.shape[0], 3, *fixed.shape[2:]) + self.shift
        return {"flow": flow, "flows": [flow], "deformable": [True], "warped": warp(moving, flow), "affine": None}


def test_symmetric_training_runs_both_directions_and_averages():
    batch = {"voxel1": rand(2, 1, 8, 8, 8, seed=15), "voxel2": rand(2, 1, 8, 8, 8, seed=16),
             "seg1": (rand(2, 1, 8, 8, 8, seed=17) > 0.5).float(), "seg2": (rand(2, 1, 8, 8, 8, seed=18) > 0.5).float(),
             "has_seg1": torch.tensor([True, True]), "has_seg2": torch.tensor([True, True])}
    loss_fn = RegistrationLoss("lncc", 0.1, regulariser="gradient_l1", dice_weight=1.0, label_values=[1])
    model = SpyModel()
    out, loss, comps = forward_and_loss(model, loss_fn, batch, symmetric=True)
    assert len(model.calls) == 2
    assert model.calls[0][0] is batch["voxel1"] and model.calls[0][1] is batch["voxel2"]
    assert model.calls[1][0] is batch["voxel2"] and model.calls[1][1] is batch["voxel1"]
    # each direction on its own, labels swapped with the images
    single = SpyModel()
    _, forward, cf = forward_and_loss(single, loss_fn, batch)
    swapped = {"voxel1": batch["voxel2"], "voxel2": batch["voxel1"], "seg1": batch["seg2"], "seg2": batch["seg1"],
               "has_seg1": batch["has_seg2"], "has_seg2": batch["has_seg1"]}
    _, backward, cb = forward_and_loss(single, loss_fn, swapped)
    assert forward.item() != pytest.approx(backward.item())
    assert loss.item() == pytest.approx((forward.item() + backward.item()) / 2, rel=1e-6)
    assert comps["dice"].item() == pytest.approx((cf["dice"].item() + cb["dice"].item()) / 2, rel=1e-6)
    assert out["flow"].shape == (2, 3, 8, 8, 8)
    loss.backward()
    assert model.shift.grad is not None
    _, _, _ = forward_and_loss(model, loss_fn, batch, symmetric=False)
    assert len(model.calls) == 3


# ---- joint affine augmentation --------------------------------------------------------------

def test_rotation_matrix_and_random_affine_ranges():
    R = rotation_matrix(2, math.pi / 2)
    assert torch.allclose(R @ torch.tensor([1.0, 0, 0], dtype=torch.float64),
                          torch.tensor([0, 1.0, 0], dtype=torch.float64), atol=1e-12)
    A, t = random_affine(64, 20, 10, 0.2, torch.Generator().manual_seed(0))
    dets = torch.linalg.det(A)
    zooms = dets ** (1 / 3)
    assert ((zooms > 0.8 - 1e-9) & (zooms < 1.2 + 1e-9)).all()
    assert (t.abs() <= 10).all()
    rot = A / zooms.view(-1, 1, 1)
    angles = torch.arccos(((rot.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1))
    assert (angles <= math.radians(20) + 1e-6).all()
    # one rotation axis per draw: exactly one diagonal entry of the rotation stays 1
    assert ((rot.diagonal(dim1=1, dim2=2) - 1).abs() < 1e-9).sum(1).ge(1).all()


def test_affine_flow_hand_value():
    A = torch.eye(3, dtype=torch.float64)[None] * 2
    t = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    u = affine_about_centre_flow(A, t, (5, 5, 5), dtype=torch.float64)
    # centre (2, 2, 2): u(p) = (p - c) + t
    assert u[0, :, 2, 2, 2].tolist() == [1.0, 0.0, -1.0]
    assert u[0, :, 4, 0, 3].tolist() == [3.0, -2.0, 0.0]


def test_joint_affine_augmentation_keeps_the_pair_consistent():
    img = torch.zeros(2, 1, 24, 24, 24)
    img[:, :, 6:10, 8:12, 10:14] = 1.0
    seg = img * 3
    points = torch.tensor([[[7.5, 9.5, 11.5], [-1, -1, -1]]] * 2)
    batch = {"voxel1": img.clone(), "voxel2": img.clone(), "seg1": seg.clone(), "seg2": seg.clone(),
             "point1": points.clone(), "point2": points.clone()}
    out = augment_pair_affine(batch, torch.Generator().manual_seed(1), max_rotation=15, max_translation=3)
    # the same transform on both images: an identical pair stays identical
    assert torch.equal(out["voxel1"], out["voxel2"]) and torch.equal(out["seg1"], out["seg2"])
    assert not torch.equal(out["voxel1"], img)
    assert set(out["seg1"].unique().tolist()) <= {0.0, 3.0}
    assert torch.equal(out["point2"][:, 1], points[:, 1])              # missing landmark stays missing
    # the landmark follows the blob: its new position is the warped blob's centre of mass
    for b in range(2):
        w = out["voxel1"][b, 0]
        grid = torch.stack(torch.meshgrid(*[torch.arange(24.0)] * 3, indexing="ij"))
        com = (grid * w).flatten(1).sum(1) / w.sum()
        assert torch.allclose(out["point1"][b, 0], com, atol=0.35)
    # zero ranges: the identity
    same = augment_pair_affine(batch, torch.Generator().manual_seed(1), 0.0, 0.0, 0.0)
    assert torch.allclose(same["voxel1"], img, atol=1e-5)
    with pytest.raises(ValueError, match="teacher"):
        augment_pair_affine(dict(batch, teacher_flow=torch.zeros(2, 3, 24, 24, 24)))


@pytest.mark.parametrize("shape", [(12, 11, 10), (5, 6, 7)])
def test_separable_box_sum_equals_the_full_box_convolution(shape):
    from network.losses import box_sum
    x = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full = torch.nn.functional.conv3d(x.reshape(6, 1, *shape), torch.ones(1, 1, 9, 9, 9, dtype=torch.float64),
                                      padding=4).reshape(2, 3, *shape)
    assert torch.allclose(box_sum(x, 9), full, atol=1e-10)
