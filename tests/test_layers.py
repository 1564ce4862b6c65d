"""Tests for network/layers.py: pull-back warp, flow composition, point sampling (DESIGN.md §2)."""
import math

import pytest
import torch

from network import layers
from network.layers import (SpatialTransformer, compose_flows, identity_grid,
                            sample_flow_at_points, warp)

SHAPE = (7, 8, 9)  # non-cubic on purpose: an axis mix-up changes the shapes/values


def rand_image(shape=SHAPE, batch=2, channels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, *shape, generator=g, dtype=torch.float64)


def const_flow(vec, shape=SHAPE, batch=2):
    f = torch.zeros(batch, 3, *shape, dtype=torch.float64)
    for c in range(3):
        f[:, c] = vec[c]
    return f


# ------------------------------------------------------------------------------------------------
# identity grid and identity warp
# ------------------------------------------------------------------------------------------------

def test_identity_grid_channel_c_holds_index_along_axis_c():
    g = identity_grid((3, 4, 5))
    assert g.shape == (1, 3, 3, 4, 5)
    assert g[0, 0, 2, 1, 3] == 2 and g[0, 1, 2, 1, 3] == 1 and g[0, 2, 2, 1, 3] == 3
    assert torch.equal(g[0, 0, :, 0, 0], torch.arange(3.0))
    assert torch.equal(g[0, 1, 0, :, 0], torch.arange(4.0))
    assert torch.equal(g[0, 2, 0, 0, :], torch.arange(5.0))


def test_identity_flow_leaves_image_unchanged():
    img = rand_image()
    out = warp(img, torch.zeros(2, 3, *SHAPE, dtype=torch.float64))
    assert out.shape == img.shape
    assert torch.allclose(out, img, atol=1e-10)


def test_identity_warp_float32_and_nearest():
    img = rand_image().float()
    zero = torch.zeros(2, 3, *SHAPE)
    assert torch.allclose(warp(img, zero), img, atol=1e-6)
    assert torch.allclose(warp(img, zero, mode="nearest"), img, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# integer and fractional shifts, axis by axis
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [2, -1])
def test_integer_shift_moves_image_along_that_axis(axis, shift):
    """warped(p) = moving(p + u(p)), channel c displaces array axis c."""
    img = rand_image()
    vec = [0.0, 0.0, 0.0]
    vec[axis] = float(shift)
    out = warp(img, const_flow(vec))
    n = SHAPE[axis]
    # interior voxels: p + shift stays inside the volume
    lo, hi = max(0, -shift), n - max(0, shift)
    dst = [slice(None)] * 5
    src = [slice(None)] * 5
    dst[2 + axis] = slice(lo, hi)
    src[2 + axis] = slice(lo + shift, hi + shift)
    assert torch.allclose(out[tuple(dst)], img[tuple(src)], atol=1e-10)
    # a hand-picked voxel, written out explicitly
    p = [3, 3, 3]
    q = list(p)
    q[axis] += shift
    assert out[1, 1, p[0], p[1], p[2]].item() == pytest.approx(img[1, 1, q[0], q[1], q[2]].item(), abs=1e-10)
    # and the other axes were not moved: the result is not the image shifted along another axis
    other = (axis + 1) % 3
    src_wrong = [slice(None)] * 5
    src_wrong[2 + other] = slice(2, 4)
    dst_wrong = [slice(None)] * 5
    dst_wrong[2 + other] = slice(0, 2)
    assert not torch.allclose(out[tuple(dst_wrong)], img[tuple(src_wrong)], atol=1e-3)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_samples_outside_clamp_to_border(axis):
    img = rand_image()
    vec = [0.0, 0.0, 0.0]
    vec[axis] = 100.0
    out = warp(img, const_flow(vec))
    idx = [slice(None)] * 5
    idx[2 + axis] = slice(SHAPE[axis] - 1, SHAPE[axis])
    last = img[tuple(idx)]
    assert torch.allclose(out, last.expand_as(out), atol=1e-10)
    vec[axis] = -100.0
    out = warp(img, const_flow(vec))
    idx[2 + axis] = slice(0, 1)
    assert torch.allclose(out, img[tuple(idx)].expand_as(out), atol=1e-10)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_fractional_shift_is_linear_interpolation(axis):
    img = rand_image()
    vec = [0.0, 0.0, 0.0]
    vec[axis] = 0.25
    out = warp(img, const_flow(vec))
    n = SHAPE[axis]
    a = [slice(None)] * 5
    b = [slice(None)] * 5
    d = [slice(None)] * 5
    a[2 + axis] = slice(0, n - 1)
    b[2 + axis] = slice(1, n)
    d[2 + axis] = slice(0, n - 1)
    expected = 0.75 * img[tuple(a)] + 0.25 * img[tuple(b)]
    assert torch.allclose(out[tuple(d)], expected, atol=1e-10)


def test_fractional_shift_on_all_axes_is_trilinear():
    img = rand_image()
    dx, dy, dz = 0.3, 0.6, 0.2
    out = warp(img, const_flow([dx, dy, dz]))
    x, y, z = 2, 4, 5
    expected = 0.0
    for i, wx in ((0, 1 - dx), (1, dx)):
        for j, wy in ((0, 1 - dy), (1, dy)):
            for k, wz in ((0, 1 - dz), (1, dz)):
                expected += wx * wy * wz * img[0, 1, x + i, y + j, z + k].item()
    assert out[0, 1, x, y, z].item() == pytest.approx(expected, abs=1e-10)


def test_varying_flow_pulls_each_voxel_separately():
    img = rand_image(batch=1, channels=1)
    flow = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    flow[0, 0, 1, 2, 3] = 2.0   # voxel (1,2,3) reads (3,2,3)
    flow[0, 2, 4, 5, 6] = -3.0  # voxel (4,5,6) reads (4,5,3)
    out = warp(img, flow)
    assert out[0, 0, 1, 2, 3] == pytest.approx(img[0, 0, 3, 2, 3].item(), abs=1e-10)
    assert out[0, 0, 4, 5, 6] == pytest.approx(img[0, 0, 4, 5, 3].item(), abs=1e-10)
    assert out[0, 0, 0, 0, 0] == pytest.approx(img[0, 0, 0, 0, 0].item(), abs=1e-10)


def test_nearest_mode_rounds():
    img = rand_image()
    out = warp(img, const_flow([0.0, 0.0, 0.7]), mode="nearest")
    assert torch.allclose(out[..., :-1], img[..., 1:], atol=1e-10)


def test_batch_broadcast_of_flow_and_image():
    img = rand_image(batch=2)
    flow = const_flow([1.0, 0.0, 0.0], batch=1)
    out = warp(img, flow)
    assert out.shape == img.shape
    assert torch.allclose(out[:, :, :-1], img[:, :, 1:], atol=1e-10)
    one = rand_image(batch=1)
    flows = torch.cat([const_flow([1.0, 0, 0], batch=1), const_flow([0, 0, -1.0], batch=1)])
    out = warp(one, flows)
    assert out.shape == (2, 2, *SHAPE)
    assert torch.allclose(out[0, :, :-1], one[0, :, 1:], atol=1e-10)
    assert torch.allclose(out[1, :, :, :, 1:], one[0, :, :, :, :-1], atol=1e-10)


# ------------------------------------------------------------------------------------------------
# composition
# ------------------------------------------------------------------------------------------------

def _smooth_setup(S=32):
    g = identity_grid((S, S, S), dtype=torch.float64)[0]
    x, y, z = g
    img = (torch.sin(2 * math.pi * x / S) * torch.cos(2 * math.pi * y / S)
           + 0.5 * torch.sin(2 * math.pi * z / S + 0.3))[None, None]

    def smooth(a, ph):
        return torch.stack([a * torch.sin(2 * math.pi * y / S + ph),
                            a * torch.cos(2 * math.pi * z / S + ph),
                            a * torch.sin(2 * math.pi * x / S + 2 * ph)])[None]

    return img, smooth(2.0, 0.1), smooth(1.5, 1.3)


def test_compose_equals_warping_step_by_step():
    """agg = warp(prev, new) + new  =>  warp(img, agg) ~= warp(warp(img, prev), new)."""
    img, prev, new = _smooth_setup()
    step_by_step = warp(warp(img, prev), new)
    m = slice(4, 28)  # stay away from the clamped border

    def err(flow):
        return (warp(img, flow) - step_by_step)[..., m, m, m].abs().mean().item()

    composed = err(compose_flows(prev, new))
    naive_sum = err(prev + new)
    swapped = err(compose_flows(new, prev))
    assert composed < 0.01
    assert composed < 0.2 * naive_sum
    assert composed < 0.2 * swapped


def test_compose_with_constant_flows_is_exact_sum_and_pointwise_definition():
    prev = const_flow([1.0, -2.0, 0.5], batch=1)
    new = const_flow([0.5, 1.0, 2.0], batch=1)
    assert torch.allclose(compose_flows(prev, new), prev + new, atol=1e-10)
    # pointwise: agg(p) = new(p) + prev(p + new(p)); prev varies along axis 0 only
    g = identity_grid(SHAPE, dtype=torch.float64)
    prev = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    prev[:, 1] = 0.1 * g[:, 0] ** 2
    new = const_flow([2.0, 0.0, 0.0], batch=1)
    agg = compose_flows(prev, new)
    assert agg[0, 1, 3, 2, 2].item() == pytest.approx(0.1 * 25, abs=1e-10)
    assert agg[0, 0, 3, 2, 2].item() == pytest.approx(2.0, abs=1e-10)


def test_compose_zero_flows():
    f = rand_image(channels=3)
    zero = torch.zeros_like(f)
    assert torch.allclose(compose_flows(f, zero), f, atol=1e-10)
    assert torch.allclose(compose_flows(zero, f), f, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# sampling at points
# ------------------------------------------------------------------------------------------------

def test_sample_flow_at_integer_points():
    flow = rand_image(channels=3, seed=3)
    pts = torch.tensor([[[0, 0, 0], [6, 7, 8], [2, 5, 1]],
                        [[1, 2, 3], [3, 3, 3], [6, 0, 8]]], dtype=torch.float64)
    out = sample_flow_at_points(flow, pts)
    assert out.shape == (2, 3, 3)
    for b in range(2):
        for n in range(3):
            x, y, z = (int(v) for v in pts[b, n])
            assert torch.allclose(out[b, n], flow[b, :, x, y, z], atol=1e-10)


def test_sample_flow_at_fractional_points():
    flow = rand_image(channels=3, batch=1, seed=4)
    out = sample_flow_at_points(flow, torch.tensor([[[2.0, 3.5, 4.0], [1.25, 2.0, 3.75]]]))
    exp0 = 0.5 * (flow[0, :, 2, 3, 4] + flow[0, :, 2, 4, 4])
    exp1 = (0.75 * 0.25 * flow[0, :, 1, 2, 3] + 0.75 * 0.75 * flow[0, :, 1, 2, 4]
            + 0.25 * 0.25 * flow[0, :, 2, 2, 3] + 0.25 * 0.75 * flow[0, :, 2, 2, 4])
    assert torch.allclose(out[0, 0], exp0, atol=1e-10)
    assert torch.allclose(out[0, 1], exp1, atol=1e-10)


def test_sample_linear_flow_is_exact_anywhere_inside():
    g = identity_grid(SHAPE, dtype=torch.float64)
    flow = torch.cat([2 * g[:, 0:1] + 1, -g[:, 1:2], 0.5 * g[:, 2:3] + g[:, 0:1]], dim=1)
    pts = torch.tensor([[[1.3, 2.7, 4.1], [5.9, 0.2, 7.5]]], dtype=torch.float64)
    out = sample_flow_at_points(flow, pts)
    for n in range(2):
        x, y, z = pts[0, n].tolist()
        assert out[0, n].tolist() == pytest.approx([2 * x + 1, -y, 0.5 * z + x], abs=1e-9)


# ------------------------------------------------------------------------------------------------
# SpatialTransformer
# ------------------------------------------------------------------------------------------------

def test_spatial_transformer_matches_warp_and_grid_is_cached():
    st = SpatialTransformer()
    img = rand_image()
    flow = 1.5 * rand_image(channels=3, seed=7) - 0.5
    out1 = st(img, flow)
    base = layers._base_grid(flow.shape[2:], flow.device, flow.dtype)[0]
    assert torch.equal(out1, st(img, flow))
    assert layers._base_grid(flow.shape[2:], flow.device, flow.dtype)[0] is base  # cached, not rebuilt
    assert torch.allclose(out1, warp(img, flow), atol=1e-12)
    img2 = rand_image(shape=(5, 6, 4))
    flow2 = rand_image(shape=(5, 6, 4), channels=3, seed=8)
    assert torch.allclose(st(img2, flow2), warp(img2, flow2), atol=1e-12)


def _reference_warp(image, flow, mode="bilinear"):
    """Plain grid_sample with a flipped (z, y, x) grid: the textbook formulation, no caching or slabs."""
    grid = layers.identity_grid(flow.shape[2:], dtype=flow.dtype) + flow
    sample = layers._normalised_grid(grid, flow.shape[2:])
    return torch.nn.functional.grid_sample(image, sample, mode=mode, padding_mode="border", align_corners=True)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("channels", [1, 3])
def test_warp_slabs_match_reference(threads, channels):
    """The parallel-slab CPU path (no autograd) equals the single-call path and the textbook warp."""
    img = rand_image(shape=(6, 5, 7), batch=1, channels=channels, seed=3)
    flow = 3.0 * rand_image(shape=(6, 5, 7), batch=1, channels=3, seed=4) - 1.5
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert layers._cpu_split(img, flow) == {1: 1, 2: 2, 3: 3}[threads]   # 6 slices: 1, 2 or 3 slabs
        with torch.no_grad():
            fast = warp(img, flow)
            near = warp(img, flow, mode="nearest")
    finally:
        torch.set_num_threads(old)
    single = warp(img, flow.clone().requires_grad_(True)).detach()      # autograd: one grid_sample call
    assert torch.equal(fast, single)
    assert torch.allclose(fast, _reference_warp(img, flow), atol=1e-5)
    assert torch.allclose(near, _reference_warp(img, flow, "nearest"), atol=1e-6) or \
        (near != _reference_warp(img, flow, "nearest")).float().mean() < 0.01   # rounding ties only


def test_warp_grid_usable_under_inference_then_autograd():
    img = rand_image(shape=(4, 4, 4))
    flow = rand_image(shape=(4, 4, 4), channels=3, seed=9)
    with torch.inference_mode():
        warp(img, flow)                                   # first use of this shape builds the cache here
    f = flow.clone().requires_grad_(True)
    warp(img, f).sum().backward()                         # the cached grid is not an inference tensor
    assert f.grad is not None and torch.isfinite(f.grad).all()

def test_spatial_transformer_nearest_mode():
    st = SpatialTransformer(mode="nearest")
    img = rand_image()
    flow = const_flow([0.0, 0.6, 0.0])
    assert torch.allclose(st(img, flow), warp(img, flow, mode="nearest"), atol=1e-12)
    assert torch.allclose(st(img, flow)[:, :, :, :-1], img[:, :, :, 1:], atol=1e-12)


# ------------------------------------------------------------------------------------------------
# shape errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("img_shape,flow_shape", [
    ((2, 1, 7, 8, 9), (2, 2, 7, 8, 9)),   # flow with 2 channels
    ((2, 1, 7, 8, 9), (2, 3, 7, 8)),      # 4-D flow
    ((2, 7, 8, 9), (2, 3, 7, 8, 9)),      # 4-D image
    ((2, 1, 7, 8, 9), (2, 3, 7, 8, 10)),  # spatial sizes differ
    ((2, 1, 7, 8, 9), (3, 3, 7, 8, 9)),   # batch sizes differ (neither is 1)
])
def test_warp_shape_errors(img_shape, flow_shape):
    with pytest.raises(ValueError):
        warp(torch.zeros(img_shape), torch.zeros(flow_shape))


def test_compose_and_sample_shape_errors():
    with pytest.raises(ValueError):
        compose_flows(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError):
        sample_flow_at_points(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 5, 2))
    with pytest.raises(ValueError):
        sample_flow_at_points(torch.zeros(1, 3, 4, 4, 4), torch.zeros(5, 3))
    with pytest.raises(ValueError):
        sample_flow_at_points(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 5, 3))


def test_torch_export_does_not_poison_the_grid_caches():
    """torch.export traces with fake tensors; the warp and upsampling caches must not keep them."""
    class Net(torch.nn.Module):
        def forward(self, image, flow):
            return warp(image, layers.upsample_flow(flow, 2))

    layers._BASE_GRIDS.clear()
    layers._INTERP.clear()
    image = torch.rand(1, 1, 6, 4, 8)
    flow = torch.rand(1, 3, 3, 2, 4)
    torch.export.export(Net(), (image, flow))
    assert not layers._BASE_GRIDS and not layers._INTERP
    out = Net()(image, flow)
    assert type(out) is torch.Tensor and torch.isfinite(out).all()
