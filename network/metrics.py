"""Registration metrics, shared by training-time validation and ``eval.py``.

All functions work on torch tensors with the package conventions: flows ``(B, 3, X, Y, Z)`` in
voxels, segmentations ``(B, 1, X, Y, Z)`` as stored (0/255 masks or integer label values),
landmarks ``(B, N, 3)`` in voxel coordinates with ``-1`` rows meaning "missing".

The last section reproduces the Learn2Reg challenge scoring (nearest-neighbour label warp, Dice with
skipped labels, HD95, SDlogJ on central differences, 30th-percentile aggregation).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from .layers import check_flow, identity_grid, sample_flow_at_points, warp


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


def mask_dice(a, b) -> float:
    """Dice of two boolean masks of one shape (numpy arrays or tensors); NaN when both are empty."""
    a = torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a)
    b = torch.as_tensor(np.asarray(b) if not torch.is_tensor(b) else b)
    return float(dice_jaccard(a[None], b[None])[0][0])


def dice_per_label(a, b, labels) -> dict:
    """``{int(value): Dice}`` of each label value between two label maps of one shape (NaN where the
    label is in neither)."""
    return {int(v): mask_dice(a == v, b == v) for v in labels}


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


JACOBIAN_DIFFERENCES = ("forward", "central", "l2r")


def jacobian_determinant(flow: torch.Tensor, differences: str = "forward") -> torch.Tensor:
    """``det(I + ∇u)`` of a voxel displacement ``flow`` ``(B, 3, X, Y, Z)``, float64 (the only Jacobian
    determinant in the toolkit; every caller picks its finite differences):

    * ``"forward"``: ``u[i+1] - u[i]``; ``(B, X-1, Y-1, Z-1)`` (RCN's folding metric);
    * ``"central"``: ``(u[i+1] - u[i-1]) / 2``, one-sided at the border (``numpy.gradient``);
      ``(B, X, Y, Z)`` (the Jacobian map ``register.py`` writes);
    * ``"l2r"``: central differences, then a 2-voxel border cropped on every axis, as the Learn2Reg
      evaluation computes it; ``(B, X-4, Y-4, Z-4)``, every spatial size at least 5.
    """
    check_flow(flow)
    u = flow.double()
    if differences == "forward":
        c = slice(None, -1)
        grad = [u[:, :, 1:, c, c] - u[:, :, c, c, c], u[:, :, c, 1:, c] - u[:, :, c, c, c],
                u[:, :, c, c, 1:] - u[:, :, c, c, c]]
    elif differences == "central":
        grad = list(torch.gradient(u, dim=(2, 3, 4))) if min(u.shape[2:]) >= 2 else [torch.zeros_like(u)] * 3
    elif differences == "l2r":
        shape = tuple(flow.shape[2:])
        if min(shape) < 5:
            raise ValueError(f"the Learn2Reg Jacobian needs every spatial size >= 5 (2-voxel crop), got {shape}")
        c = slice(2, -2)
        grad = [(u[:, :, 3:-1, c, c] - u[:, :, 1:-3, c, c]) * 0.5, (u[:, :, c, 3:-1, c] - u[:, :, c, 1:-3, c]) * 0.5,
                (u[:, :, c, c, 3:-1] - u[:, :, c, c, 1:-3]) * 0.5]
    else:
        raise ValueError(f"differences must be one of {JACOBIAN_DIFFERENCES}, got {differences!r}")
    # J[i][j] = delta_ij + d u_i / d x_j, grad[j][:, i] = d u_i / d x_j
    J = [[grad[j][:, i] + (1.0 if i == j else 0.0) for j in range(3)] for i in range(3)]
    return (J[0][0] * (J[1][1] * J[2][2] - J[1][2] * J[2][1])
            - J[0][1] * (J[1][0] * J[2][2] - J[1][2] * J[2][0])
            + J[0][2] * (J[1][0] * J[2][1] - J[1][1] * J[2][0]))


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


# ================================================================================================
# Learn2Reg challenge scoring
# ================================================================================================
# Follows the organisers' evaluation of Learn2Reg 2020 Task 4 (per pair): the moving label map is
# warped by nearest neighbour at ``identity + disp`` (scipy ``map_coordinates(order=0)``, 0 outside);
# Dice and HD95 per label, skipping labels absent from the fixed or the unwarped moving map;
# SDlogJ = std of ``log(clip(J + offset, 1e-9, 1e9))`` with J from central differences, 2-voxel
# border cropped. Pairs are aggregated by mean, std and 30th percentile ("Dice30").

def warp_labels_nearest(labels: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour pull-back of a label map ``(B, 1, X, Y, Z)`` by a voxel flow ``(B, 3, X, Y, Z)``.

    Same shape and dtype as ``labels``; values are copied, never interpolated or cast. Matches scipy
    ``map_coordinates(labels, identity + flow, order=0, mode="constant", cval=0)`` exactly: the sample
    point ``p = x + u(x)`` (float64) is taken from voxel ``floor(p + 0.5)`` (ties round up), and points
    outside ``[0, n - 1]`` on any axis give 0. ``grid_sample(mode="nearest", padding_mode="zeros")``
    is not used because it rounds ties to even and counts ``[-0.5, n - 0.5)`` as inside.
    """
    check_flow(flow)
    if labels.dim() != 5 or labels.shape[1] != 1:
        raise ValueError(f"labels must have shape (B, 1, X, Y, Z), got {tuple(labels.shape)}")
    if labels.shape[2:] != flow.shape[2:]:
        raise ValueError(f"labels {tuple(labels.shape[2:])} and flow {tuple(flow.shape[2:])} sizes differ")
    if labels.shape[0] != flow.shape[0]:
        raise ValueError(f"batch sizes differ: labels {labels.shape[0]}, flow {flow.shape[0]}")
    b = flow.shape[0]
    shape = tuple(flow.shape[2:])
    coords = identity_grid(shape, flow.device, torch.float64) + flow.double()         # (B, 3, X, Y, Z)
    upper = torch.tensor([s - 1 for s in shape], device=flow.device, dtype=torch.float64).view(1, 3, 1, 1, 1)
    inside = ((coords >= 0) & (coords <= upper)).all(1)                                # (B, X, Y, Z)
    idx = torch.minimum(torch.floor(coords + 0.5), upper).clamp_min(0).long()
    lin = (idx[:, 0] * shape[1] + idx[:, 1]) * shape[2] + idx[:, 2]
    out = torch.gather(labels.reshape(b, -1), 1, lin.reshape(b, -1)).view(b, 1, *shape)
    return torch.where(inside.unsqueeze(1), out, torch.zeros((), dtype=out.dtype, device=out.device))


def _as_bool_array(mask) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 3:
        raise ValueError(f"masks must be 3-D, got shape {mask.shape}")
    return mask


def hausdorff95(a, b, spacing=(1.0, 1.0, 1.0), percentile: float = 95.0) -> float:
    """Robust (percentile) Hausdorff distance between two boolean 3-D masks (numpy or torch), a float.

    Surface voxels are ``mask & ~binary_erosion(mask)`` (6-connected, voxels on the array edge count as
    surface). For every surface voxel of A, the Euclidean distance to the nearest surface voxel of B
    (in the units of ``spacing``, one value per axis: mm, or voxels with the default ones), and vice
    versa; the result is ``max(percentile(d_AB), percentile(d_BA))`` (numpy, linear interpolation).
    NaN if both masks are empty, inf if exactly one is.

    Each surface voxel counts once, as in MONAI; DeepMind's ``surface-distance`` (used by the
    Learn2Reg organisers) weights distances by surfel area, so values can differ slightly.
    """
    a, b = _as_bool_array(a), _as_bool_array(b)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    if not a.any() and not b.any():
        return math.nan
    if not a.any() or not b.any():
        return math.inf
    # crop to the masks' bounding box (much faster on large volumes) without changing the result:
    # distances are relative, and a mask voxel on the box edge is surface with or without the crop
    nz = np.nonzero(a | b)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in nz)
    a, b = a[box], b[box]
    structure = ndimage.generate_binary_structure(3, 1)
    surf_a = a & ~ndimage.binary_erosion(a, structure=structure, border_value=0)
    surf_b = b & ~ndimage.binary_erosion(b, structure=structure, border_value=0)
    sampling = [float(s) for s in spacing]
    d_ab = ndimage.distance_transform_edt(~surf_b, sampling=sampling)[surf_a]
    d_ba = ndimage.distance_transform_edt(~surf_a, sampling=sampling)[surf_b]
    return float(max(np.percentile(d_ab, percentile), np.percentile(d_ba, percentile)))


def l2r_jacobian_determinant(flow: torch.Tensor) -> torch.Tensor:
    """``jacobian_determinant(flow, "l2r")``: the Learn2Reg evaluation's Jacobian determinant."""
    return jacobian_determinant(flow, "l2r")


def l2r_jacobian_stats(flow: torch.Tensor, offset: float = 3.0) -> dict:
    """Learn2Reg smoothness scores per pair, ``(B,)`` float64 each (on the cropped Jacobian above).

    ``sdlogj_l2r``: population std (numpy ``.std()``) of ``log(clip(J + offset, 1e-9, 1e9))``; the
    current organisers' script uses ``offset = 3``, an older copy (Estienne et al.) 15.
    ``fold_pct``: percentage of those voxels with ``J <= 0`` (J without offset).
    """
    det = l2r_jacobian_determinant(flow).reshape(flow.shape[0], -1)
    logdet = torch.log((det + offset).clamp(1e-9, 1e9))
    return {"sdlogj_l2r": logdet.std(1, unbiased=False),
            "fold_pct": (det <= 0).double().mean(1) * 100.0}


def _pair_spacings(spacing, b: int) -> np.ndarray:
    """``None``, 3 values or ``(B, 3)`` per-pair spacings -> ``(B, 3)`` float64 array."""
    if spacing is None:
        return np.ones((b, 3))
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.detach().cpu().numpy()
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape == (3,):
        return np.tile(sp, (b, 1))
    if sp.shape == (b, 3):
        return sp
    raise ValueError(f"spacing must have 3 values or shape (B, 3) = ({b}, 3), got shape {sp.shape}")


def l2r_pair_scores(fixed_seg: torch.Tensor, moving_seg: torch.Tensor, flow: torch.Tensor, labels,
                    spacing=None, sdlogj_offset: float = 3.0) -> list:
    """Learn2Reg scores of every pair of a batch, as a list of dicts (one per pair).

    ``fixed_seg``, ``moving_seg`` are ``(B, 1, X, Y, Z)`` label maps (compared by exact equality after
    rounding to the nearest integer), ``flow`` ``(B, 3, X, Y, Z)`` the voxel flow, ``labels`` the label
    values to score. The moving map is warped with :func:`warp_labels_nearest`. A label absent from the
    fixed or the unwarped moving map is skipped (NaN). Keys:

    * ``dice_<v>`` per label, ``dice`` (mean over non-skipped labels, NaN if none), ``dice_before``
      (same without warping);
    * ``hd95_<v>`` per label and ``hd95``, their mean, in voxels; ``hd95_mm`` the mean in mm, with
      ``spacing`` (3 values, or ``(B, 3)`` per pair; default ones). When the warped mask of a scored
      label is empty (infinite HD) the volume diagonal ``|(shape - 1) * spacing|`` is used instead,
      the largest distance possible inside the volume;
    * ``sdlogj_l2r`` and ``fold_pct`` from :func:`l2r_jacobian_stats` with ``sdlogj_offset``.
    """
    check_flow(flow)
    b = flow.shape[0]
    shape = tuple(flow.shape[2:])
    if tuple(fixed_seg.shape) != (b, 1, *shape):
        raise ValueError(f"fixed_seg must have shape {(b, 1, *shape)} like the flow, got {tuple(fixed_seg.shape)}")
    spacings = _pair_spacings(spacing, b)
    labels = [int(round(float(v))) for v in labels]
    warped = warp_labels_nearest(moving_seg, flow)
    fixed_np = torch.round(fixed_seg.detach().double()).cpu().numpy()[:, 0]
    moving_np = torch.round(moving_seg.detach().double()).cpu().numpy()[:, 0]
    warped_np = torch.round(warped.detach().double()).cpu().numpy()[:, 0]
    jac = {k: v.cpu() for k, v in l2r_jacobian_stats(flow, sdlogj_offset).items()}
    extent = np.array([s - 1 for s in shape], dtype=np.float64)
    rows = []
    for i in range(b):
        row = {}
        dice, dice0, hd, hd_mm = [], [], [], []
        diag = float(np.linalg.norm(extent))
        diag_mm = float(np.linalg.norm(extent * spacings[i]))
        for v in labels:
            f, m, w = fixed_np[i] == v, moving_np[i] == v, warped_np[i] == v
            if not f.any() or not m.any():
                row[f"dice_{v}"] = row[f"hd95_{v}"] = math.nan
                continue
            d = mask_dice(f, w)
            dice.append(d)
            dice0.append(mask_dice(f, m))
            h = hausdorff95(f, w)
            h = diag if math.isinf(h) else h
            if np.all(spacings[i] == 1.0):
                h_mm = h
            else:
                h_mm = hausdorff95(f, w, spacing=spacings[i])
                h_mm = diag_mm if math.isinf(h_mm) else h_mm
            row[f"dice_{v}"], row[f"hd95_{v}"] = d, h
            hd.append(h)
            hd_mm.append(h_mm)
        mean = (lambda xs: float(np.mean(xs)) if xs else math.nan)
        row.update({"dice": mean(dice), "dice_before": mean(dice0), "hd95": mean(hd), "hd95_mm": mean(hd_mm),
                    **{k: float(t[i]) for k, t in jac.items()}})
        rows.append(row)
    return rows


L2R_KEYS = ["dice", "dice_before", "hd95", "hd95_mm", "sdlogj_l2r", "fold_pct"]


def summarise_l2r(rows: list, keys=None) -> dict:
    """``{key: {"mean", "std", "p30", "n"}}`` over pairs, ignoring NaN (and inf) entries.

    ``std`` is the population std (numpy ``.std()``, as :func:`summarise`); ``p30`` is the 30th
    percentile with linear interpolation (``np.quantile(v, 0.3)``, as pandas' ``quantile``), the
    challenge's "Dice30" for ``dice``. ``keys`` defaults to every numeric key of the rows (first-seen
    order) except ``id1``/``id2``. Statistics are NaN, ``n`` 0, for a key without finite values.
    """
    if keys is None:
        keys = []
        for r in rows:
            for k, v in r.items():
                if (k not in ("id1", "id2") and k not in keys and not isinstance(v, bool)
                        and isinstance(v, (int, float, np.number))):
                    keys.append(k)
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in rows if k in r], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        if vals.size:
            out[k] = {"mean": float(vals.mean()), "std": float(vals.std()),
                      "p30": float(np.quantile(vals, 0.3)), "n": int(vals.size)}
        else:
            out[k] = {"mean": math.nan, "std": math.nan, "p30": math.nan, "n": 0}
    return out


def dice30(rows: list) -> float:
    """The challenge's Dice30: 30th percentile of the per-pair ``dice`` (``summarise_l2r`` ``p30``)."""
    return summarise_l2r(rows, ["dice"])["dice"]["p30"]


def score_batch(batch: dict, flow: torch.Tensor, class_values=None, spacing=None, l2r_labels=None,
                sdlogj_offset: float = 3.0) -> list:
    """The metric rows of one batch, as validation and ``eval.py`` report them: :func:`pair_metrics`,
    plus the Learn2Reg scores (:func:`l2r_pair_scores`) as ``l2r_<key>`` when ``l2r_labels`` is given.
    ``spacing``: voxel size (mm) where the batch has no ``spacing1``."""
    rows = pair_metrics(batch, flow, class_values, spacing)
    if l2r_labels:
        voxel = batch.get("spacing1", spacing)
        scores = l2r_pair_scores(batch["seg1"], batch["seg2"], flow, l2r_labels,
                                 spacing=voxel.cpu() if torch.is_tensor(voxel) else voxel, sdlogj_offset=sdlogj_offset)
        for row, score in zip(rows, scores):
            row.update({f"l2r_{k}": v for k, v in score.items()})
    return rows

