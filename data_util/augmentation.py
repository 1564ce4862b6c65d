"""Training augmentation.

* RCN (:func:`augment_moving`): a random smooth free-form deformation (FFD) of the MOVING image only,
  together with its segmentation and landmarks (RCN ``framework.py`` / ``transform.py``).
* Learn2Reg hippocampus recipe (:func:`augment_pair_affine`): one random affine transform per pair
  applied to BOTH images and their labels (a new, still unregistered pair).
 Layouts: images ``(B, 1, X, Y, Z)``, flows ``(B, 3, X, Y, Z)`` in
voxel units with channel ``c`` displacing axis ``c``; pull-back warping ``warped(p) = moving(p + u(p))``.
"""
from __future__ import annotations

import torch

from network.layers import sample_flow_at_points, warp


def bspline_weights(size: int, control_points: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Cubic B-spline interpolation matrix ``(size, control_points)``.

    Control point ``k`` sits at voxel ``k * (size - 1) / (control_points - 1)``; voxel ``x`` gets
    ``sum_k B3((x - t_k) / h) c_k``. Rows are normalised to sum to 1 so a constant control grid
    gives a constant field (also at the borders).
    """
    if control_points < 2:
        raise ValueError(f"control_points must be >= 2, got {control_points}")
    x = torch.arange(size, device=device, dtype=torch.float64)
    spacing = max(size - 1, 1) / (control_points - 1)
    knots = torch.arange(control_points, device=device, dtype=torch.float64) * spacing
    t = ((x[:, None] - knots[None, :]) / spacing).abs()
    weights = torch.where(t < 1, 2.0 / 3.0 - t ** 2 + t ** 3 / 2,
                          torch.where(t < 2, (2 - t) ** 3 / 6, torch.zeros_like(t)))
    return (weights / weights.sum(1, keepdim=True)).to(dtype)


def interpolate_control_grid(control: torch.Tensor, shape) -> torch.Tensor:
    """Dense field ``(B, C, X, Y, Z)`` from a control grid ``(B, C, n, m, k)`` (cubic B-spline,
    separable tensor product)."""
    wx, wy, wz = (bspline_weights(s, n, control.device, control.dtype)
                  for s, n in zip(shape, control.shape[2:]))
    return torch.einsum("bcijk,xi,yj,zk->bcxyz", control, wx, wy, wz)


def sample_power(low: float, high: float, k: float, size, generator=None) -> torch.Tensor:
    """RCN ``sample_power``: uniform on [-1, 1] scaled by ``r ** (1/k)`` then ``|v| ** k`` with its
    sign, so values lie in [low, high] concentrated near the centre (``r = (high - low) / 2``)."""
    r = (high - low) / 2
    v = (torch.rand(size, generator=generator, dtype=torch.float64) * 2 - 1) * r ** (1.0 / k)
    return (v.abs() ** k * v.sign() + (high + low) / 2).float()


def random_ffd_flow(batch: int, shape, control_points: int = 5, magnitude: float = 0.4,
                    power: float = 3.0, generator: torch.Generator | None = None,
                    device=None, dtype=torch.float32) -> torch.Tensor:
    """Random smooth FFD displacement ``(batch, 3, X, Y, Z)`` in voxels (RCN augmentation).

    Control grid ``(batch, 3, n, n, n)`` with ``n = control_points``, values from
    ``sample_power(-magnitude, magnitude, power)`` times ``shape[c] // 4`` voxels for channel ``c``
    (at most 0.1 of the size per axis with the defaults), interpolated with cubic B-splines.
    ``generator`` (a CPU ``torch.Generator``) makes it reproducible.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be (X, Y, Z), got {shape}")
    n = control_points
    control = sample_power(-magnitude, magnitude, power, (batch, 3, n, n, n), generator)
    scale = torch.tensor([s // 4 for s in shape], dtype=control.dtype).view(1, 3, 1, 1, 1)
    control = (control * scale).to(device=device, dtype=dtype)
    return interpolate_control_grid(control, shape)


def invert_points(points: torch.Tensor, flow: torch.Tensor, iterations: int = 10) -> torch.Tensor:
    """Move landmarks through a pull-back warp: for each ``q`` solve ``p + u(p) = q``.

    ``points`` ``(B, N, 3)`` voxel coordinates in the original (unwarped) image, ``flow`` ``u``
    ``(B, 3, X, Y, Z)``. Fixed-point iteration ``p <- q - u(p)`` (converges for smooth, moderate
    fields). Rows equal to -1 (missing) stay -1.
    """
    q = points.to(flow.dtype)
    p = q.clone()
    for _ in range(iterations):
        p = q - sample_flow_at_points(flow, p)
    missing = (points == -1).all(-1, keepdim=True)
    return torch.where(missing, points.to(p.dtype), p).to(points.dtype)


def augment_moving(batch: dict, generator: torch.Generator | None = None, control_points: int = 5,
                   magnitude: float = 0.4, flow: torch.Tensor | None = None) -> dict:
    """Return a new batch dict with the moving image deformed by a random FFD.

    ``voxel2`` ``(B, 1, X, Y, Z)`` is warped trilinearly, ``seg2`` (if present) with nearest
    neighbour, ``point2`` ``(B, N, 3)`` (if present) mapped by :func:`invert_points` so landmarks
    stay on the same anatomy. The FFD flow ``(B, 3, X, Y, Z)`` (voxels) is returned under
    ``aug_flow``; ``flow`` may pass one explicitly instead of sampling. Other keys are copied.
    A batch with stored ``teacher_flow`` is refused (those flows belong to the unaugmented pair; an
    online teacher must be run on the augmented batch instead).
    """
    if "teacher_flow" in batch:
        raise ValueError("this batch carries stored teacher flows computed for the unaugmented pairs "
                         f"{list(batch.get('id1', []))} / {list(batch.get('id2', []))}; augmenting the "
                         "moving image would pair them with images they were not computed for")
    moving = batch["voxel2"]
    if flow is None:
        flow = random_ffd_flow(moving.shape[0], moving.shape[2:], control_points, magnitude,
                               generator=generator, device=moving.device, dtype=moving.dtype)
    out = dict(batch)
    out["voxel2"] = warp(moving, flow)
    if batch.get("seg2") is not None:
        out["seg2"] = warp(batch["seg2"], flow.to(batch["seg2"].dtype), mode="nearest")
    if batch.get("point2") is not None:
        out["point2"] = invert_points(batch["point2"], flow)
    out["aug_flow"] = flow
    return out


def rotation_matrix(axis: int, angle: float) -> torch.Tensor:
    """Rotation ``(3, 3)`` float64 by ``angle`` radians about array axis ``axis`` (0, 1 or 2)."""
    i, j = [a for a in range(3) if a != axis]
    R = torch.eye(3, dtype=torch.float64)
    c, s = torch.cos(torch.tensor(angle, dtype=torch.float64)), torch.sin(torch.tensor(angle, dtype=torch.float64))
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


def random_affine(batch: int, max_rotation: float = 20.0, max_translation: float = 10.0, max_zoom: float = 0.2,
                  generator: torch.Generator | None = None):
    """Random ``(A (B, 3, 3), t (B, 3))`` float64 as in the Learn2Reg hippocampus recipe: a rotation
    of up to ``max_rotation`` degrees about ONE random axis, an isotropic zoom in
    ``[1 - max_zoom, 1 + max_zoom]``, a translation of up to ``max_translation`` voxels per axis."""
    def uniform(size):
        return torch.rand(size, generator=generator, dtype=torch.float64) * 2 - 1

    axes = torch.randint(0, 3, (batch,), generator=generator)
    angles = uniform(batch) * max_rotation * torch.pi / 180.0
    zooms = 1.0 + uniform(batch) * max_zoom
    t = uniform((batch, 3)) * max_translation
    A = torch.stack([zooms[b] * rotation_matrix(int(axes[b]), float(angles[b])) for b in range(batch)])
    return A, t


def affine_about_centre_flow(A: torch.Tensor, t: torch.Tensor, shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Pull-back displacement ``(B, 3, X, Y, Z)`` (voxels) of ``p -> A (p - c) + c + t``, ``c`` the
    volume centre: ``u(p) = (A - I)(p - c) + t``."""
    shape = tuple(int(s) for s in shape)
    centre = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64)
    axes = [torch.arange(s, dtype=torch.float64) - centre[k] for k, s in enumerate(shape)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))                     # (3, X, Y, Z)
    M = A.to(torch.float64) - torch.eye(3, dtype=torch.float64)
    flow = torch.einsum("bij,jxyz->bixyz", M, grid) + t.to(torch.float64).view(-1, 3, 1, 1, 1)
    return flow.to(device=device, dtype=dtype)


def augment_pair_affine(batch: dict, generator: torch.Generator | None = None, max_rotation: float = 20.0,
                        max_translation: float = 10.0, max_zoom: float = 0.2) -> dict:
    """Return a new batch with ONE random affine transform per pair applied to both images
    (trilinear), both label maps (nearest) and landmarks (exact inverse map), so the pair stays
    consistent (the recipe's joint augmentation; :func:`random_affine` gives the ranges).

    ``voxel1``/``voxel2`` ``(B, 1, X, Y, Z)``; optional ``seg1``/``seg2``, ``point1``/``point2``
    ``(B, N, 3)`` (-1 rows stay missing). The displacement is returned under ``aug_flow``.
    Stored teacher flows are refused (they belong to the unaugmented pair).
    """
    if "teacher_flow" in batch:
        raise ValueError("this batch carries stored teacher flows computed for the unaugmented pairs; "
                         "augmenting the pair would pair them with images they were not computed for")
    fixed = batch["voxel1"]
    shape = fixed.shape[2:]
    A, t = random_affine(fixed.shape[0], max_rotation, max_translation, max_zoom, generator)
    flow = affine_about_centre_flow(A, t, shape, device=fixed.device, dtype=fixed.dtype)
    out = dict(batch)
    for k in (1, 2):
        out[f"voxel{k}"] = warp(batch[f"voxel{k}"], flow)
        if batch.get(f"seg{k}") is not None:
            out[f"seg{k}"] = warp(batch[f"seg{k}"], flow.to(batch[f"seg{k}"].dtype), mode="nearest")
        if batch.get(f"point{k}") is not None:
            out[f"point{k}"] = _inverse_affine_points(batch[f"point{k}"], A, t, shape)
    out["aug_flow"] = flow
    return out


def _inverse_affine_points(points: torch.Tensor, A: torch.Tensor, t: torch.Tensor, shape) -> torch.Tensor:
    """Where the point ``q`` lands after warping by ``p -> A (p - c) + c + t``: ``A^-1 (q - c - t) + c``."""
    centre = torch.tensor([(s - 1) / 2 for s in shape], dtype=torch.float64)
    q = points.to(torch.float64).cpu()
    p = torch.einsum("bij,bnj->bni", torch.linalg.inv(A), q - centre - t[:, None, :]) + centre
    missing = (points == -1).all(-1, keepdim=True).cpu()
    return torch.where(missing, q, p).to(device=points.device, dtype=points.dtype)
