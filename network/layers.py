"""Spatial transformer (warp), flow composition, point sampling, flow upsampling, and the 3D
convolution layer all networks use (:class:`Conv3d`, oneDNN on the CPU).

Conventions (docs/conventions.md), used everywhere in this package:

* images are ``(B, C, X, Y, Z)``, flows are ``(B, 3, X, Y, Z)``;
* a flow is a displacement in **voxel units**; channel ``c`` displaces array axis ``c``;
* warping pulls back: ``warped(p) = moving(p + u(p))``, trilinear, border clamping;
* composition: ``agg_k = warp(agg_{k-1}, flow_k) + flow_k`` (apply ``agg_{k-1}`` first, then ``flow_k``
  in the pull-back sense, i.e. ``moving(p + flow_k(p) + agg_{k-1}(p + flow_k(p)))``).
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


def check_flow(flow: torch.Tensor, name: str = "flow") -> None:
    """Raise ``ValueError`` unless ``flow`` is ``(B, 3, X, Y, Z)``."""
    if flow.dim() != 5 or flow.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B, 3, X, Y, Z), got {tuple(flow.shape)}")


def identity_grid(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates ``(1, 3, X, Y, Z)``: channel ``c`` holds the index along axis ``c``."""
    axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def _normalised_grid(coords: torch.Tensor, shape) -> torch.Tensor:
    """Voxel coordinates ``(B, 3, ...)`` -> grid_sample grid ``(B, ..., 3)`` in [-1, 1], (z, y, x) order."""
    scale = torch.tensor([max(s - 1, 1) for s in shape], device=coords.device, dtype=coords.dtype)
    scale = scale.view(1, 3, *([1] * (coords.dim() - 2)))
    norm = coords * (2.0 / scale) - 1.0
    return norm.movedim(1, -1).flip(-1)


def as_float32(value):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.float()
    if isinstance(value, dict):
        return {k: as_float32(v) for k, v in value.items()}
    return value


def float32_math(fn):
    """Run ``fn`` in float32 inside a mixed-precision (autocast) region: autocast off and its floating
    tensor arguments (and those in dict arguments) cast to float32. Warping, composition, Jacobians and
    losses lose accuracy in bfloat16 (8 bits of mantissa is 0.1 voxel at 30 voxels of displacement)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
        if not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*[as_float32(a) for a in args], **{k: as_float32(v) for k, v in kwargs.items()})
    return wrapper


def _onednn_applies(x: torch.Tensor) -> bool:
    return (ONEDNN_CONV3D and x.device.type == "cpu" and x.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()
            and not torch.jit.is_scripting() and not torch.compiler.is_compiling())


ONEDNN_CONV3D = True   # False: let PyTorch pick the convolution backend itself
PARALLEL_WARP = True   # False: one grid_sample call per warp, as plain PyTorch does


@contextmanager
def plain_pytorch():
    """Turn off this module's CPU speed-ups (oneDNN routing, parallel warp slabs) inside the block.

    For comparisons with the unoptimised path and for FLOP counting (PyTorch's counter does not know
    ``aten.mkldnn_convolution``). Results agree to float rounding either way.
    """
    global ONEDNN_CONV3D, PARALLEL_WARP
    saved = ONEDNN_CONV3D, PARALLEL_WARP
    ONEDNN_CONV3D = PARALLEL_WARP = False
    try:
        yield
    finally:
        ONEDNN_CONV3D, PARALLEL_WARP = saved


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that sends float32 CPU inputs straight to oneDNN (``aten.mkldnn_convolution``).

    PyTorch's backend heuristic, tuned for 2D, runs a batch-1 3D convolution whose ``C * D * H`` is
    at most 20480 (e.g. 16 channels at 32^3) on a slow im2col path, up to 25x slower than oneDNN on
    2 cores. Same weights, same results to float rounding, autograd included; traced/exported graphs
    and other devices use the ordinary path.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias):
        if self.padding_mode == "zeros" and not isinstance(self.padding, str) and _onednn_applies(input):
            return torch.ops.aten.mkldnn_convolution(input, weight, bias, self.padding, self.stride,
                                                     self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


PADDINGS = ("symmetric", "tf")


class TFSameConv3d(Conv3d):
    """:class:`Conv3d` with TensorFlow's ``"SAME"`` padding, for weights imported from TF-1 checkpoints.

    TF pads ``max((ceil(n / s) - 1) * s + k - n, 0)`` voxels per axis and puts the odd one *after*
    the data: a 3^3 stride-2 convolution of an even size pads (0, 1), where PyTorch's ``padding=1``
    pads (1, 1) and so samples a grid shifted by one voxel. Stride-1 convolutions are the same in both.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = True):
        super().__init__(cin, cout, kernel, stride, padding=0, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for n, k, s in zip(reversed(x.shape[2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((-(-int(n) // s) - 1) * s + k - int(n), 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


def same_conv3d(cin: int, cout: int, kernel: int = 3, stride: int = 1, bias: bool = True,
                padding: str = "symmetric") -> Conv3d:
    """A "same"-size convolution: PyTorch's symmetric ``kernel // 2`` padding, or TF's (``"tf"``)."""
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if padding == "tf":
        return TFSameConv3d(cin, cout, kernel, stride, bias=bias)
    return Conv3d(cin, cout, kernel, stride, padding=kernel // 2, bias=bias)


_BASE_GRIDS: dict = {}


def _tracing() -> bool:
    """True while torch.export / torch.compile trace the model: tensors then are fake, never cache them."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _base_grid(shape, device, dtype):
    """Cached normalised identity grid ``(1, X, Y, Z, 3)`` (channel c = axis c) and its scale ``(3,)``.

    Built outside inference mode so the cached tensors can also take part in autograd.
    """
    key = (tuple(int(s) for s in shape), torch.device(device), dtype)
    if _tracing():
        scale = torch.tensor([2.0 / max(s - 1, 1) for s in key[0]], device=device, dtype=dtype)
        return identity_grid(key[0], device, dtype).movedim(1, -1) * scale - 1.0, scale
    if key not in _BASE_GRIDS:
        if len(_BASE_GRIDS) >= 16:
            _BASE_GRIDS.clear()
        with torch.inference_mode(False), torch.no_grad():
            scale = torch.tensor([2.0 / max(s - 1, 1) for s in key[0]], device=device, dtype=dtype)
            base = identity_grid(key[0], device, dtype).movedim(1, -1) * scale - 1.0
            _BASE_GRIDS[key] = (base.contiguous(), scale)
    return _BASE_GRIDS[key]


def _cpu_split(image: torch.Tensor, flow: torch.Tensor) -> int:
    """How many slabs along axis 0 to sample in parallel (CPU grid_sample parallelises over the batch only)."""
    if (not PARALLEL_WARP or image.device.type != "cpu" or image.shape[0] != 1 or image.requires_grad
            or flow.requires_grad):
        return 1
    k = min(torch.get_num_threads(), flow.shape[2])
    while k > 1 and flow.shape[2] % k:
        k -= 1
    return k


@float32_math
def warp(image: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Pull-back warp ``image`` ``(B, C, X, Y, Z)`` by voxel displacement ``flow`` ``(B, 3, X, Y, Z)``.

    ``mode`` is ``"bilinear"`` (trilinear in 3D) or ``"nearest"``. Samples outside the volume clamp to
    the border. The normalised identity grid is cached per (shape, device, dtype); without autograd,
    a batch-1 warp on the CPU is sampled as parallel slabs along axis 0 (same result, bit for bit).
    """
    check_flow(flow)
    if image.dim() != 5:
        raise ValueError(f"image must have shape (B, C, X, Y, Z), got {tuple(image.shape)}")
    if image.shape[2:] != flow.shape[2:]:
        raise ValueError(f"image {tuple(image.shape[2:])} and flow {tuple(flow.shape[2:])} sizes differ")
    if image.shape[0] != flow.shape[0]:
        if flow.shape[0] == 1:
            flow = flow.expand(image.shape[0], *flow.shape[1:])
        elif image.shape[0] == 1:
            image = image.expand(flow.shape[0], *image.shape[1:])
        else:
            raise ValueError(f"batch sizes differ: image {image.shape[0]}, flow {flow.shape[0]}")
    shape = tuple(flow.shape[2:])
    base, scale = _base_grid(shape, flow.device, flow.dtype)
    # grid_sample reads grid[..., 0] along the input's last axis: give it the image with axes reversed
    # (a view), so grid channel c can stay flow channel c and no flip copy is needed.
    sample = torch.addcmul(base, flow.movedim(1, -1), scale).to(image.dtype)
    source = image.permute(0, 1, 4, 3, 2)
    k = _cpu_split(image, flow)
    if k == 1:
        return F.grid_sample(source, sample, mode=mode, padding_mode="border", align_corners=True)
    C = image.shape[1]
    slabs = sample.view(k, shape[0] // k, *shape[1:], 3)
    out = F.grid_sample(source.expand(k, *source.shape[1:]), slabs, mode=mode, padding_mode="border",
                        align_corners=True)                                   # (k, C, X/k, Y, Z)
    if C == 1:
        return out.view(1, 1, *shape)
    return out.transpose(0, 1).reshape(1, C, *shape)


@float32_math
def compose_flows(previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Aggregate flow after applying ``previous`` then ``new``: ``warp(previous, new) + new``."""
    return warp(previous, new) + new


_INTERP: dict = {}


def _linear_upsample_matrix(n_in: int, factor: int, device, dtype) -> torch.Tensor:
    """``(n_in * factor, n_in)`` matrix of 1D linear interpolation, half-pixel centres (align_corners=False)."""
    key = (n_in, factor, torch.device(device), dtype)
    if key not in _INTERP or _tracing():
        if len(_INTERP) >= 32:
            _INTERP.clear()
        with torch.inference_mode(False), torch.no_grad():
            n_out = n_in * factor
            pos = ((torch.arange(n_out, dtype=torch.float64) + 0.5) / factor - 0.5).clamp(min=0)
            i0 = pos.floor().long().clamp(max=n_in - 1)
            i1 = (i0 + 1).clamp(max=n_in - 1)
            w = pos - i0
            m = torch.zeros(n_out, n_in, dtype=torch.float64)
            rows = torch.arange(n_out)
            m.index_put_((rows, i0), 1 - w, accumulate=True)
            m.index_put_((rows, i1), w, accumulate=True)
            m = m.to(device=device, dtype=dtype)
        if _tracing():
            return m
        _INTERP[key] = m
    return _INTERP[key]


def upsample_flow(flow: torch.Tensor, factor: int) -> torch.Tensor:
    """Trilinearly upsample a voxel flow ``(B, 3, x, y, z)`` by an integer ``factor`` and rescale it.

    Equals ``factor * F.interpolate(flow, scale_factor=factor, mode="trilinear", align_corners=False)``
    (to float rounding), computed as three separable matrix products, which is about twice as fast on
    the CPU. Displacements are multiplied by ``factor`` because they are measured in voxels.
    """
    check_flow(flow)
    if factor == 1:
        return flow
    B, C, X, Y, Z = flow.shape
    mx, my, mz = (_linear_upsample_matrix(n, factor, flow.device, flow.dtype) for n in (X, Y, Z))
    out = torch.matmul(flow.contiguous(), mz.t() * factor)          # (B, 3, X, Y, fZ)
    out = torch.matmul(my, out)                                      # (B, 3, X, fY, fZ)
    out = torch.matmul(mx, out.reshape(B, C, X, -1))                 # (B, 3, fX, fY * fZ)
    return out.view(B, C, X * factor, Y * factor, Z * factor)


def sample_flow_at_points(flow: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinearly sample ``flow`` ``(B, 3, X, Y, Z)`` at voxel coordinates ``points`` ``(B, N, 3)``.

    Returns displacements ``(B, N, 3)`` in voxels (border clamping outside the volume).
    """
    check_flow(flow)
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (B, N, 3), got {tuple(points.shape)}")
    coords = points.to(flow.dtype).movedim(-1, 1).view(points.shape[0], 3, points.shape[1], 1, 1)
    sample = _normalised_grid(coords, flow.shape[2:])
    out = F.grid_sample(flow, sample, mode="bilinear", padding_mode="border", align_corners=True)
    return out.view(flow.shape[0], 3, points.shape[1]).transpose(1, 2)


class SpatialTransformer(nn.Module):
    """:func:`warp` as a module (``forward``) plus flow composition (``compose``)."""

    def __init__(self, mode: str = "bilinear"):
        super().__init__()
        self.mode = mode

    def forward(self, image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return warp(image, flow, self.mode)

    def compose(self, previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return compose_flows(previous, new)


def integrate_spatial_gradient(gradient: torch.Tensor) -> torch.Tensor:
    """Displacement ``(B, 3, X, Y, Z)`` (voxels) from a per-axis spatial gradient ``(B, 3, X, Y, Z)``.

    Channel ``c`` is the derivative of the sampling position along axis ``c`` (in half-voxel units),
    integrated by a cumulative sum: ``p_c(i) = 2 * sum_{k <= i} g_c(k) - 1`` and ``u_c = p_c - i``.
    ``g = 0.5`` everywhere gives the identity; ``g > 0`` makes ``p_c`` strictly increasing along axis
    ``c``, so the mapping cannot fold along an axis. This is the voxel form of the recipe's
    ``(4 cumsum(g) - 2) / (N - 1) - 1`` grid (``align_corners=True``).
    """
    check_flow(gradient, "spatial gradient")
    parts = []
    for c in range(3):
        axis = 2 + c
        n = gradient.shape[axis]
        index = torch.arange(n, device=gradient.device, dtype=gradient.dtype).view(
            [n if d == axis else 1 for d in range(5)])
        parts.append(2.0 * torch.cumsum(gradient[:, c:c + 1], dim=axis) - 1.0 - index)
    return torch.cat(parts, dim=1)


def spatial_gradient_of(flow: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`integrate_spatial_gradient`: ``g_c(i) = (u_c(i) - u_c(i-1) + 1) / 2`` with
    ``u_c(-1) = 0``; ``(B, 3, X, Y, Z)``. Defined for any flow (the spatial-gradient regulariser uses it)."""
    check_flow(flow)
    parts = []
    for c in range(3):
        axis = 2 + c
        u = flow[:, c:c + 1]
        previous = F.pad(u.narrow(axis, 0, u.shape[axis] - 1), _front_pad(axis))
        parts.append((u - previous + 1.0) / 2.0)
    return torch.cat(parts, dim=1)


def _front_pad(axis: int) -> tuple:
    """``F.pad`` spec adding one zero slice at the start of ``axis`` (2, 3 or 4) of a 5-D tensor."""
    pad = [0] * 6
    pad[2 * (4 - axis)] = 1
    return tuple(pad)
