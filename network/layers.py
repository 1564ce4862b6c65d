"""Spatial transformer (warp), flow composition and point sampling.

Conventions (DESIGN.md §2), used everywhere in this package:

* images are ``(B, C, X, Y, Z)``, flows are ``(B, 3, X, Y, Z)``;
* a flow is a displacement in **voxel units**; channel ``c`` displaces array axis ``c``;
* warping pulls back: ``warped(p) = moving(p + u(p))``, trilinear, border clamping;
* composition: ``agg_k = warp(agg_{k-1}, flow_k) + flow_k`` (apply ``agg_{k-1}`` first, then ``flow_k``
  in the pull-back sense, i.e. ``moving(p + flow_k(p) + agg_{k-1}(p + flow_k(p)))``).
"""
from __future__ import annotations

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


def warp(image: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear",
         grid: torch.Tensor | None = None) -> torch.Tensor:
    """Pull-back warp ``image`` ``(B, C, X, Y, Z)`` by voxel displacement ``flow`` ``(B, 3, X, Y, Z)``.

    ``mode`` is ``"bilinear"`` (trilinear in 3D) or ``"nearest"``. Samples outside the volume clamp to
    the border. ``grid`` may pass a precomputed :func:`identity_grid` of the flow's spatial shape.
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
    shape = flow.shape[2:]
    if grid is None:
        grid = identity_grid(shape, flow.device, flow.dtype)
    sample = _normalised_grid(grid + flow, shape)
    return F.grid_sample(image, sample.to(image.dtype), mode=mode, padding_mode="border", align_corners=True)


def compose_flows(previous: torch.Tensor, new: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
    """Aggregate flow after applying ``previous`` then ``new``: ``warp(previous, new) + new``."""
    return warp(previous, new, grid=grid) + new


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
    """:func:`warp` as a module; the identity grid is built once per (shape, device, dtype)."""

    def __init__(self, mode: str = "bilinear"):
        super().__init__()
        self.mode = mode
        self._grid_key = None
        self._grid = None

    def grid(self, flow: torch.Tensor) -> torch.Tensor:
        key = (tuple(flow.shape[2:]), flow.device, flow.dtype)
        if key != self._grid_key:
            self._grid = identity_grid(key[0], flow.device, flow.dtype)
            self._grid_key = key
        return self._grid

    def forward(self, image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return warp(image, flow, self.mode, grid=self.grid(flow))

    def compose(self, previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return compose_flows(previous, new, grid=self.grid(new))
