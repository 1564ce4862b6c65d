"""The CPU-first pieces: Lite network, flow upsampling, oneDNN routing, the fast inference path, benchmark.py."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from network import DEFAULT_PRESET, Lite, ModelConfig, build_model, count_parameters, layers
from network.base_networks import SizeError
from network.inference import FastRegistration, prepare, register, set_threads, tune_allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tolerances of the fast path against the plain path (same weights): convolutions in another memory
# layout and backend sum in another order, so flows agree to ~1e-6 voxels per cascade; we allow 1e-4.
FLOW_ATOL = 1e-4
IMAGE_ATOL = 1e-4


def pair(size, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 1, *size)
    return torch.rand(shape, generator=g), torch.rand(shape, generator=g)


def loud(model, std=0.3):
    """Give every flow-predicting layer visible weights so flows are voxels, not 1e-5."""
    torch.manual_seed(1)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)) and (
                name.endswith("flow") or name.endswith("final") or "conv_W" in name or "conv_b" in name):
            scale = 1e-3 if "conv_" in name else std / 20 if name.endswith("final") else std   # VTN: x20 output
            torch.nn.init.normal_(module.weight, 0.0, scale)
    return model


# ------------------------------------------------------------------------------------------- Lite
def test_lite_parameter_count_and_layer_table():
    net = Lite(16)
    assert count_parameters(net) == 157_435
    assert count_parameters(Lite(16, flow_level=1)) == 163_715
    widths = [(m.in_channels, m.out_channels, m.stride[0]) for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert widths == [(2, 8, 2), (8, 16, 2), (16, 32, 2), (32, 32, 2), (32, 32, 1), (64, 32, 1), (48, 16, 1),
                      (16, 16, 1), (16, 3, 1)]


def test_lite_predicts_at_quarter_resolution_and_upsamples():
    net = Lite(8)
    fixed, moving = pair((32, 16, 48))
    captured = {}
    net.flow.register_forward_hook(lambda m, i, o: captured.setdefault("low", o))
    flow = net(fixed, moving)["flow"]
    assert flow.shape == (1, 3, 32, 16, 48)
    assert captured["low"].shape == (1, 3, 8, 4, 12)
    expected = 4 * F.interpolate(captured["low"], scale_factor=4, mode="trilinear", align_corners=False)
    assert torch.allclose(flow, expected * net.flow_multiplier, atol=1e-6)
    with pytest.raises(SizeError):
        net(*pair((24, 32, 32)))


def test_lite_constant_flow_upsamples_to_the_same_constant_in_voxels():
    net = Lite(8, flow_level=1)
    with torch.no_grad():
        net.flow.weight.zero_()
        net.flow.bias.copy_(torch.tensor([0.5, -1.0, 0.25]))     # low-resolution voxels (half size)
    flow = net(*pair((16, 16, 32)))["flow"]
    for c, v in enumerate([1.0, -2.0, 0.5]):                        # x2 in full-resolution voxels
        assert torch.allclose(flow[:, c], torch.full_like(flow[:, c], v), atol=1e-6)


def test_lite_presets_and_training_step():
    assert DEFAULT_PRESET["Lite"] == "lite"
    model = build_model(dict(base_network="Lite", n_cascades=2, preset="lite", image_size=[32, 32, 32]))
    assert model.affine is None and len(model.cascades) == 2 and model.config.flow_multiplier == 0.5
    model = build_model(dict(base_network="Lite", n_cascades=1, preset="lite-affine", image_size=[48, 48, 48]))
    assert type(model.affine).__name__ == "LDRAffine"
    for preset, counts in (("lite", (157_435, 314_870, 472_305)), ("lite-affine", (490_315, 647_750, 805_185))):
        for n, count in zip((1, 2, 3), counts):                    # the README's preset table, at 128^3
            big = build_model(dict(base_network="Lite", preset=preset, n_cascades=n, image_size=[128] * 3))
            assert count_parameters(big) == count
    out = model(*pair((48, 48, 48)))
    out["warped"].mean().backward()
    assert model.cascades[0].flow.weight.grad is not None
    with pytest.raises(ValueError):
        ModelConfig(base_network="Lite", preset="ldr-brain")


# ------------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("factor", [1, 2, 4])
def test_upsample_flow_matches_interpolate(factor):
    g = torch.Generator().manual_seed(0)
    flow = torch.randn(2, 3, 3, 5, 4, generator=g, dtype=torch.float64)
    expected = factor * F.interpolate(flow, scale_factor=factor, mode="trilinear", align_corners=False)
    assert torch.allclose(layers.upsample_flow(flow, factor), expected, atol=1e-12)


def test_upsample_flow_gradient():
    flow = torch.randn(1, 3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: layers.upsample_flow(f, 2), (flow,))


@pytest.mark.parametrize("stride,cin,size", [(1, 16, 8), (2, 2, 16), (1, 3, 12)])
def test_onednn_conv3d_matches_plain_convolution_and_gradients(stride, cin, size):
    torch.manual_seed(0)
    conv = layers.Conv3d(cin, 5, 3, stride, padding=1)
    x = torch.randn(1, cin, size, size, size, requires_grad=True)
    y = conv(x)
    y.square().sum().backward()
    grads = x.grad.clone(), conv.weight.grad.clone()
    x.grad = None
    conv.weight.grad = None
    with layers.plain_pytorch():
        y_ref = conv(x)
        y_ref.square().sum().backward()
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(grads[0], x.grad, atol=1e-4) and torch.allclose(grads[1], conv.weight.grad, atol=1e-3)


def test_onednn_routing_is_used_and_can_be_switched_off():
    conv = layers.Conv3d(16, 16, 3, padding=1)
    x = torch.randn(1, 16, 8, 8, 8)
    with torch.profiler.profile() as prof:
        conv(x)
    assert any(e.name == "aten::mkldnn_convolution" for e in prof.events())
    with layers.plain_pytorch(), torch.profiler.profile() as prof:
        conv(x)
    assert not any(e.name == "aten::mkldnn_convolution" for e in prof.events())  # heuristic picks im2col here
    assert layers.ONEDNN_CONV3D and layers.PARALLEL_WARP                             # restored after the block


# ------------------------------------------------------------------------------------------- fast path
CASES = [("Lite", "lite", 1, 32), ("Lite", "lite", 2, 32), ("Lite", "lite-affine", 1, 48),
         ("LDR", "ldr-brain", 2, 48), ("LDR", "ldr-liver", 1, 32), ("LDR", "plain", 1, 32),
         ("VoxelMorph", "plain", 1, 32), ("VTN", "rcn", 2, 64)]


@pytest.mark.parametrize("base,preset,n,size", CASES)
def test_fast_path_matches_plain_path(base, preset, n, size):
    torch.manual_seed(0)
    model = loud(build_model(dict(base_network=base, preset=preset, n_cascades=n, image_size=[size] * 3)))
    fixed, moving = pair((size,) * 3, seed=2)
    seg = (moving * 4).floor().to(torch.uint8)
    model.eval()
    with layers.plain_pytorch(), torch.no_grad():
        plain = model(fixed, moving)
        plain_seg = layers.warp(seg.float(), plain["flow"], mode="nearest")
    assert plain["flow"].abs().max() > 0.2, "test model should predict visible flows"
    prepare(model)
    fast = register(model, fixed, moving, seg)
    assert fast["flow"].shape == plain["flow"].shape and fast["warped_seg"].dtype == torch.uint8
    assert torch.allclose(fast["flow"], plain["flow"], atol=FLOW_ATOL, rtol=0)
    assert torch.allclose(fast["warped"], plain["warped"], atol=IMAGE_ATOL, rtol=0)
    # nearest-neighbour labels may differ only where a sample lands on a rounding tie
    assert (fast["warped_seg"].float() != plain_seg).float().mean() < 1e-3


def test_fast_path_batch_and_rep_and_module():
    torch.manual_seed(0)
    model = loud(build_model(dict(base_network="Lite", preset="lite", n_cascades=1, image_size=[32] * 3)))
    fixed, moving = pair((32,) * 3, batch=2)
    with torch.no_grad():
        plain = model.eval()(fixed, moving, rep=2)["flow"]
    fast = FastRegistration(model)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert torch.allclose(register(model, fixed, moving, rep=2)["flow"], plain, atol=FLOW_ATOL)
    flow, warped = fast(fixed[:1], moving[:1])
    assert flow.shape == (1, 3, 32, 32, 32) and warped.shape == (1, 1, 32, 32, 32)
    with pytest.raises(ValueError, match="seg must have shape"):
        register(model, fixed, moving, seg=torch.zeros(2, 1, 16, 32, 32))
    with pytest.raises(ValueError, match="image must have shape"):
        register(model, fixed[:, 0], moving[:, 0])


def test_set_threads():
    old = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_threads(None) == 1
        with pytest.raises(ValueError):
            set_threads(0)
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------- benchmark.py
def test_benchmark_cli_prints_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark.py"), "--size", "64", "--models",
                        "lite,vtn-1,vtn-10", "--runs", "1", "--warmup", "0", "--threads", "2", "--plain",
                        "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "| Lite (ours), 1 cascade, no affine |" in r.stdout and "vs VTN-10" in r.stdout
    result = json.loads(out.read_text())
    rows = {row["key"]: row for row in result["results"][0]["rows"]}
    assert set(rows) == {"lite", "vtn-1", "vtn-10", "net-LDR", "net-VTN", "net-VoxelMorph", "net-Lite"}
    assert rows["vtn-1"]["vs_vtn1"] == pytest.approx(1.0)
    assert rows["lite"]["vs_vtn10"] == pytest.approx(rows["vtn-10"]["seconds_per_pair"]
                                                     / rows["lite"]["seconds_per_pair"])
    # GFLOP counts come from the flop counter: one LDR cascade is ~110 GFLOP at 128^3, so 1/8 of it at 64^3
    assert rows["net-LDR"]["gflop_per_pair"] == pytest.approx(110.33 / 8, rel=0.01)
    assert rows["vtn-10"]["gflop_per_pair"] > 9 * rows["net-VTN"]["gflop_per_pair"]
    assert rows["lite"]["params"] == 157_435 and rows["lite"]["plain_seconds_per_pair"] > 0
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp_")]


def test_benchmark_rejects_unknown_model(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark.py"), "--models", "lite,nope"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown model(s) ['nope']" in r.stderr


def test_tune_allocator_switches_both_ways():
    if not os.path.exists("/proc/self/maps") or sys.platform != "linux":
        pytest.skip("glibc mallopt is Linux-only")
    assert tune_allocator(True) is True
    model = build_model(dict(base_network="Lite", preset="lite", n_cascades=1, image_size=[32] * 3))
    prepare(model)
    out = register(model, *pair((32,) * 3))                   # results do not depend on the allocator
    assert tune_allocator(False) is True
    assert torch.equal(out["flow"], register(model, *pair((32,) * 3))["flow"])
