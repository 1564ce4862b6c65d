"""Registration metrics (DESIGN.md §7), shared by training-time validation and ``eval.py``.

All functions work on torch tensors with the package conventions: flows ``(B, 3, X, Y, Z)`` in
voxels, segmentations ``(B, 1, X, Y, Z)`` as stored (0/255 masks or integer label values),
landmarks ``(B, N, 3)`` in voxel coordinates with ``-1`` rows meaning "missing".
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .layers import check_flow, sample_flow_at_points, warp


def dice_jaccard(a: torch.Tensor, b: torch.Tensor):
    """Dice and Jaccard of boolean masks ``(B, ...)``: ``(B,)`` each; NaN Dice where both are empty.

    ``Jacc = |A∩B| / max(0.01, |A∪B|)`` (RCN).
    """
    a = a.reshape(a.shape[0], -1).bool()
    b = b.reshape(b.shape[0], -1).bool()
    inter = (a & b).sum(1).double()
    sizes = a.sum(1).double() + b.sum(1).double()
    union = (a | b).sum(1).double()
    dice = torch.where(sizes > 0, 2 * inter / sizes.clamp_min(1), torch.full_like(sizes, math.nan))
    jacc = torch.where(sizes > 0, inter / union.clamp_min(0.01), torch.full_like(sizes, math.nan))
    return dice, jacc


def label_masks(seg: torch.Tensor, class_values=None) -> torch.Tensor:
    """0/255 float masks ``(B, L, X, Y, Z)``: one per label value, or the stored mask itself if None."""
    if class_values is None:
        return seg.float()
    return torch.cat([((seg - v).abs() < 0.5).float() * 255.0 for v in class_values], dim=1)


def segmentation_scores(fixed_seg: torch.Tensor, moving_seg: torch.Tensor, flow: torch.Tensor | None,
                        class_values=None):
    """Dice and Jaccard averaged over labels after warping the moving segmentation; ``(B,)`` each.

    Each label is warped as its own 0/255 mask trilinearly and thresholded at 128 (RCN). ``flow=None``
    scores the unregistered pair. Labels absent from both images are left out of the mean.
    """
    fixed_masks = label_masks(fixed_seg, class_values) > 128
    moving_masks = label_masks(moving_seg, class_values)
    warped = moving_masks if flow is None else warp(moving_masks, flow)
    warped = warped > 128
    b, n_labels = fixed_masks.shape[:2]
    dice, jacc = dice_jaccard(fixed_masks.transpose(0, 1).reshape(b * n_labels, -1),
                              warped.transpose(0, 1).reshape(b * n_labels, -1))
    dice = dice.view(n_labels, b)
    jacc = jacc.view(n_labels, b)
    return torch.nanmean(dice, 0), torch.nanmean(jacc, 0)


def landmark_distance(flow: torch.Tensor, fixed_points: torch.Tensor, moving_points: torch.Tensor,
                      spacing=None) -> torch.Tensor:
    """Mean ``|| p_fixed + u(p_fixed) - p_moving ||`` over landmarks present in both; ``(B,)``.

    In voxels, or in mm when ``spacing`` (3 values) is given. NaN for pairs without landmarks.
    """
    check_flow(flow)
    valid = (fixed_points >= 0).all(-1) & (moving_points >= 0).all(-1)
    moved = fixed_points + sample_flow_at_points(flow, fixed_points.clamp_min(0))
    diff = moved - moving_points
    if spacing is not None:
        diff = diff * torch.as_tensor(spacing, dtype=diff.dtype, device=diff.device)
    dist = diff.norm(dim=-1)
    count = valid.sum(1)
    total = (dist * valid).sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


def jacobian_determinant(flow: torch.Tensor) -> torch.Tensor:
    """``det(I + ∇u)`` with forward differences; ``(B, X-1, Y-1, Z-1)``."""
    check_flow(flow)
    u = flow.double()
    dx = u[:, :, 1:, :-1, :-1] - u[:, :, :-1, :-1, :-1]
    dy = u[:, :, :-1, 1:, :-1] - u[:, :, :-1, :-1, :-1]
    dz = u[:, :, :-1, :-1, 1:] - u[:, :, :-1, :-1, :-1]
    # J[c, d] = d(x_c + u_c) / d x_d
    J = torch.stack([dx, dy, dz], dim=2)                      # (B, 3 comp, 3 deriv, ...)
    J = J + torch.eye(3, dtype=u.dtype, device=u.device).view(1, 3, 3, 1, 1, 1)
    J = J.permute(0, 3, 4, 5, 1, 2)
    return torch.linalg.det(J)


def jacobian_stats(flow: torch.Tensor) -> dict:
    """Per-sample ``jac_std`` (std of det), ``jac_nonpos_pct`` (% det <= 0), ``sdlogj`` (std of log det).

    ``sdlogj`` clips det to ``[1e-9, 1e9]`` before the log (Learn2Reg). Values are ``(B,)`` float64.
    """
    det = jacobian_determinant(flow).reshape(flow.shape[0], -1)
    logdet = torch.log(det.clamp(1e-9, 1e9))
    return {"jac_std": det.std(1, unbiased=False),
            "jac_nonpos_pct": (det <= 0).double().mean(1) * 100.0,
            "sdlogj": logdet.std(1, unbiased=False)}


def pair_metrics(batch: dict, flow: torch.Tensor, class_values=None, spacing=None) -> list:
    """Metrics for every pair of a batch as a list of dicts (keys below), NaN where not defined.

    ``batch`` holds ``seg1``, ``seg2`` ``(B, 1, X, Y, Z)``, optional ``point1``, ``point2`` ``(B, N, 3)``,
    ``id1``, ``id2``; ``flow`` is the final aggregated flow.
    """
    b = flow.shape[0]
    nan = torch.full((b,), math.nan, dtype=torch.float64)
    has_seg = batch.get("has_seg1", torch.ones(b, dtype=torch.bool))
    has_seg = has_seg.bool().cpu() & batch.get("has_seg2", torch.ones(b, dtype=torch.bool)).bool().cpu()
    if has_seg.any():
        dice, jacc = segmentation_scores(batch["seg1"], batch["seg2"], flow, class_values)
        dice0, jacc0 = segmentation_scores(batch["seg1"], batch["seg2"], None, class_values)
        dice, jacc, dice0, jacc0 = (torch.where(has_seg, t.cpu(), nan) for t in (dice, jacc, dice0, jacc0))
    else:
        dice = jacc = dice0 = jacc0 = nan
    if "point1" in batch:
        lm = landmark_distance(flow, batch["point1"].to(flow), batch["point2"].to(flow), spacing).cpu()
        lm0 = landmark_distance(torch.zeros_like(flow), batch["point1"].to(flow), batch["point2"].to(flow),
                                spacing).cpu()
    else:
        lm = lm0 = nan
    jac = {k: v.cpu() for k, v in jacobian_stats(flow).items()}
    rows = []
    for i in range(b):
        rows.append({"id1": str(batch["id1"][i]), "id2": str(batch["id2"][i]),
                     "dice": float(dice[i]), "jacc": float(jacc[i]), "landmark_dist": float(lm[i]),
                     "dice_before": float(dice0[i]), "jacc_before": float(jacc0[i]),
                     "landmark_dist_before": float(lm0[i]),
                     **{k: float(v[i]) for k, v in jac.items()}})
    return rows


METRIC_KEYS = ["dice", "jacc", "landmark_dist", "jac_std", "jac_nonpos_pct", "sdlogj",
               "dice_before", "jacc_before", "landmark_dist_before"]


def summarise(rows: list, keys=METRIC_KEYS) -> dict:
    """``{key: (mean, std, count)}`` over pairs, ignoring NaN entries."""
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in rows if k in r], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        out[k] = (float(vals.mean()) if vals.size else math.nan,
                  float(vals.std()) if vals.size else math.nan, int(vals.size))
    return out
