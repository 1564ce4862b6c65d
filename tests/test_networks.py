"""Tests for network/base_networks.py and network/recursive_cascaded_networks.py (DESIGN.md §2-§3)."""
import math


import pytest
import torch

import network
from network import (LDR, VTN, LDRAffine, ModelConfig, SizeError, VoxelMorph, VTNAffine,
                     build_model, compose_flows, count_parameters, identity_grid, warp)
from network.base_networks import affine_flow


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rand_pair(shape, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 1, *shape, generator=g), torch.rand(batch, 1, *shape, generator=g))


# ------------------------------------------------------------------------------------------------
# parameter counts (DESIGN.md §3)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,expected", [
    (lambda: LDR(16), 280_659),
    (lambda: VoxelMorph(16), 300_547),
    (lambda: VTN(16), 28_252_203),
    (lambda: LDRAffine((128, 128, 128), 16), 332_880),
    (lambda: VTNAffine((128, 128, 128), 16), 14_166_288),
], ids=["LDR", "VoxelMorph", "VTN", "LDRAffine128", "VTNAffine128"])
def test_base_network_parameter_counts(make, expected):
    assert count_parameters(make()) == expected


def test_default_channels_is_16():
    assert count_parameters(LDR()) == 280_659
    assert count_parameters(VoxelMorph()) == 300_547


def test_affine_stem_parameter_count_depends_on_size():
    # kernel of the valid convs = remaining grid; 12 output channels * 8c inputs * kernel volume
    small = count_parameters(LDRAffine((64, 64, 64)))     # pooled grid 1^3
    big = count_parameters(LDRAffine((128, 128, 128)))    # pooled grid 3^3
    assert big - small == 12 * 128 * (27 - 1)


@pytest.mark.parametrize("cfg,expected", [
    (dict(base_network="LDR", preset="ldr-brain", n_cascades=1), 613_539),
    (dict(base_network="LDR", preset="ldr-liver", n_cascades=1), 561_318),
    (dict(base_network="LDR", preset="ldr-liver", n_cascades=2), 1_122_636),
    (dict(base_network="VTN", preset="rcn", n_cascades=1), 42_418_491),
], ids=["ldr-brain-1", "ldr-liver-1", "ldr-liver-2", "rcn-VTN-1"])
def test_preset_parameter_counts(cfg, expected):
    model = build_model(dict(cfg, image_size=[128, 128, 128]))
    assert count_parameters(model) == expected


def test_rep_shares_weights():
    cfg = dict(base_network="LDR", preset="ldr-brain", n_cascades=2, image_size=[48, 48, 48], channels=4)
    m1 = build_model(dict(cfg, rep=1))
    m3 = build_model(dict(cfg, rep=3))
    assert count_parameters(m1) == count_parameters(m3)
    stages = list(m3.stages())
    assert len(stages) == 6
    assert stages[0] is stages[1] is stages[2] and stages[3] is stages[4] is stages[5]
    assert stages[0] is not stages[3]


# ------------------------------------------------------------------------------------------------
# forward at sizes other than 128, and size errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,shape", [
    (lambda: LDR(16), (32, 32, 32)),
    (lambda: LDR(8), (48, 32, 16)),
    (lambda: VoxelMorph(16), (32, 32, 32)),
    (lambda: VoxelMorph(8), (16, 32, 48)),
    (lambda: VTN(4), (64, 64, 128)),
], ids=["LDR32", "LDR48x32x16", "VM32", "VM16x32x48", "VTN4-64x64x128"])
def test_deformable_forward_shapes(make, shape):
    net = make().eval()
    fixed, moving = rand_pair(shape)
    with torch.no_grad():
        out = net(fixed, moving)
    assert out["flow"].shape == (fixed.shape[0], 3, *shape)
    assert torch.isfinite(out["flow"]).all()


def test_vtn_forward_64():
    net = VTN(16).eval()
    fixed, moving = rand_pair((64, 64, 64))
    with torch.no_grad():
        flow = net(fixed, moving)["flow"]
    assert flow.shape == (1, 3, 64, 64, 64)
    assert torch.isfinite(flow).all()
    # near-identity start (final layer initialised N(0, 1e-5))
    assert flow.abs().max() < 0.5


def test_flow_layers_start_near_identity():
    for net in (LDR(16), VoxelMorph(16)):
        assert net.flow.weight.std() < 1e-4
        assert torch.all(net.flow.bias == 0)
    assert VTN(4).final.weight.std() < 1e-4
    head = LDRAffine((64, 64, 64), 4).head
    assert head.conv_W.weight.std() < 1e-4 and head.conv_b.weight.std() < 1e-4


def test_flow_multiplier_scales_output():
    torch.manual_seed(1)
    a = LDR(4, flow_multiplier=1.0)
    for p in a.flow.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    b = LDR(4, flow_multiplier=0.25)
    b.load_state_dict(a.state_dict())
    fixed, moving = rand_pair((16, 16, 16))
    with torch.no_grad():
        fa, fb = a(fixed, moving)["flow"], b(fixed, moving)["flow"]
    assert fa.abs().mean() > 1e-3
    assert torch.allclose(fb, 0.25 * fa, atol=1e-6)


@pytest.mark.parametrize("make,shape,stride", [
    (lambda: LDR(4), (24, 24, 24), 16),
    (lambda: LDR(4), (32, 32, 40), 16),
    (lambda: VoxelMorph(4), (16, 16, 8), 16),
    (lambda: VTN(4), (32, 32, 32), 64),
    (lambda: VTN(4), (64, 64, 96), 64),
])
def test_size_not_divisible_raises_size_error(make, shape, stride):
    net = make()
    fixed, moving = rand_pair(shape)
    with pytest.raises(SizeError, match=f"divisible by {stride}") as info:
        net(fixed, moving)
    assert isinstance(info.value, ValueError)
    assert str(tuple(shape)) in str(info.value)


def test_size_error_is_exported_value_error():
    assert issubclass(network.SizeError, ValueError)


def test_affine_stems_refuse_bad_sizes():
    with pytest.raises(SizeError, match="48"):
        LDRAffine((32, 32, 32), 4)            # divisible by 16 but too small for the pooling
    with pytest.raises(SizeError, match="divisible by 16"):
        LDRAffine((48, 48, 40), 4)
    with pytest.raises(SizeError, match="divisible by 64"):
        VTNAffine((32, 32, 32), 4)
    with pytest.raises(SizeError, match="divisible by 64"):
        VTNAffine((64, 64, 96), 4)
    with pytest.raises(SizeError):
        build_model(dict(base_network="LDR", preset="ldr-brain", image_size=[32, 32, 32], channels=4))
    with pytest.raises(SizeError, match="64"):
        build_model(dict(base_network="LDR", preset="rcn", image_size=[48, 48, 48], channels=4))
    # an affine stem built for one size refuses another
    stem = LDRAffine((64, 64, 64), 4)
    fixed, moving = rand_pair((48, 48, 48))
    with pytest.raises(SizeError, match="built for"):
        stem(fixed, moving)


def test_model_refuses_bad_inputs():
    model = build_model(dict(base_network="LDR", preset="ldr-liver", image_size=[32, 32, 32], channels=4))
    fixed, moving = rand_pair((32, 32, 40))
    with pytest.raises(SizeError, match="divisible by 16"):
        model(fixed, moving)
    fixed, moving = rand_pair((32, 32, 32))
    with pytest.raises(ValueError):
        model(fixed, moving[:, :, :, :, :16])
    with pytest.raises(ValueError):
        model(torch.cat([fixed, fixed], 1), torch.cat([moving, moving], 1))
    with pytest.raises(SizeError):
        build_model(dict(base_network="LDR", preset="ldr-liver", image_size=[40, 40, 40], channels=4))


# ------------------------------------------------------------------------------------------------
# affine stems
# ------------------------------------------------------------------------------------------------

def test_affine_flow_is_W_x_plus_b_on_centred_coordinates():
    W = torch.tensor([[[0.1, 0.2, 0.0], [0.0, -0.1, 0.3], [0.05, 0.0, 0.2]],
                      [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    b = torch.tensor([[1.0, -2.0, 0.5], [3.0, 4.0, -5.0]], dtype=torch.float64)
    flow = affine_flow(W, b, (4, 5, 6))          # centre (1.5, 2, 2.5)
    assert flow.shape == (2, 3, 4, 5, 6)
    # voxel (0,0,0): centred (-1.5, -2, -2.5)
    assert flow[0, :, 0, 0, 0].tolist() == pytest.approx([0.45, -2.55, -0.075], abs=1e-12)
    # voxel (3,4,5): centred (1.5, 2, 2.5)
    assert flow[0, :, 3, 4, 5].tolist() == pytest.approx([1.55, -1.45, 1.075], abs=1e-12)
    # voxel (1,3,2): centred (-0.5, 1, -0.5)
    assert flow[0, :, 1, 3, 2].tolist() == pytest.approx([1.15, -2.25, 0.375], abs=1e-12)
    # zero W: a pure translation by b, per sample
    assert torch.allclose(flow[1], b[1].view(3, 1, 1, 1).expand(3, 4, 5, 6))


@pytest.mark.parametrize("make,shape", [
    (lambda: LDRAffine((48, 64, 80), 4), (48, 64, 80)),
    (lambda: VTNAffine((64, 64, 64), 4), (64, 64, 64)),
], ids=["LDRAffine-48x64x80", "VTNAffine-64"])
def test_affine_stem_outputs_consistent(make, shape):
    stem = make().eval()
    for conv in (stem.head.conv_W, stem.head.conv_b):
        torch.nn.init.normal_(conv.weight, 0, 0.01)
    fixed, moving = rand_pair(shape, batch=2)
    with torch.no_grad():
        out = stem(fixed, moving)
    assert out["W"].shape == (2, 3, 3) and out["b"].shape == (2, 3) and out["A"].shape == (2, 3, 3)
    assert out["flow"].shape == (2, 3, *shape)
    assert torch.allclose(out["A"], out["W"] + torch.eye(3))
    assert out["W"].abs().max() > 0
    assert torch.allclose(out["flow"], affine_flow(out["W"], out["b"], shape), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# model configuration and presets
# ------------------------------------------------------------------------------------------------

def test_model_config_presets():
    c = ModelConfig(base_network="LDR", preset="ldr-liver", n_cascades=2)
    assert c.affine is None and c.nets_per_cascade == 2
    assert c.flow_multiplier == pytest.approx(1 / 3)
    c = ModelConfig(base_network="LDR", preset="ldr-brain", n_cascades=4)
    assert c.affine == "LDRAffine" and c.nets_per_cascade == 1
    assert c.flow_multiplier == pytest.approx(0.25)
    c = ModelConfig(base_network="VTN", preset="rcn", n_cascades=2)
    assert c.affine == "VTNAffine" and c.flow_multiplier == pytest.approx(0.5)
    c = ModelConfig(base_network="VoxelMorph", preset="plain", n_cascades=5)
    assert c.affine is None and c.flow_multiplier == pytest.approx(0.2)


def test_model_uses_preset_multiplier_and_layout():
    m = build_model(dict(base_network="LDR", preset="ldr-liver", n_cascades=2, image_size=[32] * 3, channels=4))
    assert m.affine is None and len(m.cascades) == 4
    assert all(net.flow_multiplier == pytest.approx(1 / 3) for net in m.cascades)
    m = build_model(dict(base_network="VTN", preset="rcn", n_cascades=3, image_size=[64] * 3, channels=4))
    assert isinstance(m.affine, VTNAffine) and len(m.cascades) == 3
    assert all(isinstance(n, VTN) and n.flow_multiplier == pytest.approx(1 / 3) for n in m.cascades)


def test_model_config_round_trip_and_errors():
    c = ModelConfig(base_network="VoxelMorph", preset="rcn", n_cascades=3, image_size=(64, 64, 128),
                    channels=8, rep=2)
    d = c.to_dict()
    assert d["image_size"] == [64, 64, 128]
    c2 = ModelConfig.from_dict(d)
    assert c2 == c
    with pytest.raises(ValueError):
        ModelConfig.from_dict(dict(d, bogus=1))
    with pytest.raises(ValueError):
        ModelConfig(base_network="VTN", preset="ldr-brain")
    with pytest.raises(ValueError):
        ModelConfig(base_network="Nope")
    with pytest.raises(ValueError):
        ModelConfig(preset="nope")
    with pytest.raises(ValueError):
        ModelConfig(n_cascades=0)
    with pytest.raises(ValueError):
        ModelConfig(image_size=(64, 64))


# ------------------------------------------------------------------------------------------------
# cascades: composition, warped image, shared repetitions
# ------------------------------------------------------------------------------------------------

def _smooth_field(shape, amp, phase):
    x, y, z = identity_grid(shape)[0]
    X, Y, Z = shape
    return amp * torch.stack([torch.sin(2 * math.pi * y / Y + phase),
                              torch.cos(2 * math.pi * z / Z + phase),
                              torch.sin(2 * math.pi * x / X + 2 * phase)])[None]


def _record_and_perturb(net, shape, calls):
    """Record each call's (fixed, moving) and add a smooth field to its flow (so flows vary in space)."""
    def hook(module, inputs, output):
        calls.append((inputs[0].clone(), inputs[1].clone()))
        field = _smooth_field(shape, 1.5, 0.7 * len(calls))
        return {"flow": output["flow"] + field}
    return net.register_forward_hook(hook)


def test_cascade_without_affine_composes_and_warps_original_moving():
    shape = (16, 16, 16)
    model = build_model(dict(base_network="LDR", preset="ldr-liver", n_cascades=1, image_size=list(shape),
                             channels=4, rep=2)).eval()
    calls = []
    for net in model.cascades:
        _record_and_perturb(net, shape, calls)
    fixed, moving = rand_pair(shape, seed=3)
    with torch.no_grad():
        out = model(fixed, moving, return_all_warped=True)
    flows, agg = out["flows"], out["agg_flows"]
    assert len(flows) == len(agg) == 4 == len(calls)          # 2 nets x rep 2
    assert out["deformable"] == [True] * 4
    assert out["affine"] is None
    assert torch.equal(agg[0], flows[0])
    for k in range(1, 4):
        expected = compose_flows(agg[k - 1], flows[k])
        assert torch.allclose(agg[k], expected, atol=1e-5)
        # composition is not the naive sum of flows (the test would not notice otherwise)
        assert (agg[k] - (agg[k - 1] + flows[k])).abs().max() > 0.1
    assert out["flow"] is agg[-1]
    assert torch.allclose(out["warped"], warp(moving, agg[-1]), atol=1e-6)
    for k in range(4):
        assert torch.allclose(out["warped_all"][k], warp(moving, agg[k]), atol=1e-6)
        assert torch.equal(calls[k][0], fixed)
    # every stage sees the ORIGINAL moving image warped by the current aggregated flow
    assert torch.equal(calls[0][1], moving)
    for k in range(1, 4):
        assert torch.allclose(calls[k][1], warp(moving, agg[k - 1]), atol=1e-6)
    for k in range(2, 4):   # not the previous stage's warped image warped again
        assert not torch.allclose(calls[k][1], warp(calls[k - 1][1], flows[k - 1]), atol=1e-3)


class StubNet(torch.nn.Module):
    """Cheap stand-in for a deformable cascade: a smooth flow that depends on the call and the input."""

    def __init__(self, shape, phase):
        super().__init__()
        self.shape, self.phase = shape, phase
        self.calls = []

    def forward(self, fixed, moving):
        self.calls.append((fixed.clone(), moving.clone()))
        field = _smooth_field(self.shape, 1.5, self.phase + 0.9 * len(self.calls))
        return {"flow": field + moving.mean()}


def test_cascade_with_affine_stem_uses_exact_linear_composition():
    shape = (48, 48, 48)
    model = build_model(dict(base_network="LDR", preset="ldr-brain", n_cascades=2, image_size=list(shape),
                             channels=4)).eval()
    W = torch.tensor([[[0.05, -0.10, 0.02], [0.08, 0.03, 0.0], [-0.04, 0.06, -0.05]]])
    b = torch.tensor([[1.0, -2.0, 0.5]])
    A = W + torch.eye(3)

    def affine_hook(module, inputs, output):
        return {"flow": affine_flow(W, b, shape), "W": W, "b": b, "A": A}

    model.affine.register_forward_hook(affine_hook)
    model.cascades[0] = StubNet(shape, 0.3)
    model.cascades[1] = StubNet(shape, 1.1)
    fixed, moving = rand_pair(shape, seed=5)
    with torch.no_grad():
        out = model(fixed, moving)
    flows, agg = out["flows"], out["agg_flows"]
    aff = affine_flow(W, b, shape)
    assert out["deformable"] == [False, True, True]
    assert len(flows) == len(agg) == 3
    assert torch.allclose(flows[0], aff) and torch.allclose(agg[0], aff)
    assert torch.equal(out["affine"]["A"], A)
    # first deformable after the affine stem: agg = affine + A u, exactly
    exact = aff + torch.einsum("ij,bjxyz->bixyz", A[0], flows[1])
    assert torch.allclose(agg[1], exact, atol=1e-5)
    assert (agg[1] - (aff + flows[1])).abs().max() > 0.05      # A u != u
    # ... which agrees with warp-composition wherever p + u(p) stays inside the volume
    pos = identity_grid(shape) + flows[1]
    inside = ((pos >= 0) & (pos <= torch.tensor(shape).view(1, 3, 1, 1, 1) - 1)).all(1, keepdim=True)
    assert inside.float().mean() > 0.5
    diff = (agg[1] - compose_flows(aff, flows[1])).abs()
    assert diff.masked_select(inside.expand_as(diff)).max() < 1e-3
    # second deformable: warp composition
    assert torch.allclose(agg[2], compose_flows(agg[1], flows[2]), atol=1e-5)
    assert torch.allclose(out["warped"], warp(moving, agg[2]), atol=1e-6)
    # inputs: the affinely warped moving image, then the moving image warped by agg[1]
    assert torch.allclose(model.cascades[0].calls[0][1], warp(moving, aff), atol=1e-6)
    assert torch.allclose(model.cascades[1].calls[0][1], warp(moving, agg[1]), atol=1e-6)


def test_rep_adds_stages_at_train_and_test_time():
    shape = (48, 48, 48)
    model = build_model(dict(base_network="LDR", preset="ldr-brain", n_cascades=2, image_size=list(shape),
                             channels=4, rep=2)).eval()
    stubs = [StubNet(shape, 0.0), StubNet(shape, 1.0)]
    model.cascades[0], model.cascades[1] = stubs
    fixed, moving = rand_pair(shape)
    with torch.no_grad():
        out = model(fixed, moving)
        assert len(out["flows"]) == 1 + 2 * 2
        assert out["deformable"] == [False] + [True] * 4
        assert [len(s.calls) for s in stubs] == [2, 2]
        out3 = model(fixed, moving, rep=3)
    assert len(out3["flows"]) == 1 + 2 * 3
    assert [len(s.calls) for s in stubs] == [5, 5]
    # RCN order c0, c0, c0, c1, c1, c1: stage 2 (c0's second call) sees the image warped by agg[1]
    assert torch.allclose(stubs[0].calls[3][1], warp(moving, out3["agg_flows"][1]), atol=1e-6)
    assert torch.allclose(stubs[1].calls[2][1], warp(moving, out3["agg_flows"][3]), atol=1e-6)
    assert torch.allclose(out3["warped"], warp(moving, out3["flow"]), atol=1e-6)


def test_rcn_vtn_model_forward_64():
    shape = (64, 64, 64)
    model = build_model(dict(base_network="VTN", preset="rcn", n_cascades=2, image_size=list(shape),
                             channels=4)).eval()
    fixed, moving = rand_pair(shape)
    with torch.no_grad():
        out = model(fixed, moving)
    assert len(out["flows"]) == 3 and out["deformable"] == [False, True, True]
    assert out["flow"].shape == (1, 3, *shape)
    assert out["warped"].shape == (1, 1, *shape)
    assert set(out["affine"]) >= {"W", "b", "A"}
    assert torch.allclose(out["warped"], warp(moving, out["flow"]), atol=1e-6)
