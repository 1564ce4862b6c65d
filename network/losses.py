"""Registration losses. Per-sample functions return ``(B,)`` tensors.

:class:`RegistrationLoss` combines them for a :class:`RecursiveCascadeNetwork` output and returns
``(total, components)`` where ``components`` maps a name to a scalar tensor, so logging is generic.
As in RCN, every term is summed over the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layers import spatial_gradient_of, warp


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def correlation_loss(fixed: torch.Tensor, warped: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``1 - Pearson correlation`` over all voxels of each sample; ``(B,)``."""
    a, b = _flat(fixed), _flat(warped)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    cov = (a * b).mean(1)
    return 1.0 - cov / torch.sqrt(a.pow(2).mean(1) * b.pow(2).mean(1) + eps)


def _box_along(x: torch.Tensor, dim: int, window: int, replicate: bool) -> torch.Tensor:
    """Sum of ``window`` neighbours along ``dim`` (centred), by a cumulative sum."""
    r = window // 2
    x = x.movedim(dim, -1)
    if replicate:
        x = torch.cat([x[..., :1].expand(*x.shape[:-1], r), x, x[..., -1:].expand(*x.shape[:-1], r)], dim=-1)
    else:
        x = F.pad(x, (r, r))
    c = F.pad(x, (1, 0)).cumsum(-1)
    return (c[..., window:] - c[..., :-window]).movedim(-1, dim)


def box_sum(x: torch.Tensor, window: int, padding: str = "zeros") -> torch.Tensor:
    """Sum over a ``window^3`` box centred on every voxel, per channel; same shape. ``padding``:
    ``zeros`` (outside counts 0) or ``replicate`` (edge values repeat).

    Separable, one cumulative sum per axis: a few operations per voxel whatever the window.
    """
    if window % 2 != 1 or window < 1:
        raise ValueError(f"box window must be odd and positive, got {window}")
    if padding not in ("zeros", "replicate"):
        raise ValueError(f"box padding must be zeros or replicate, got {padding!r}")
    if window == 1:
        return x
    for dim in (2, 3, 4):
        x = _box_along(x, dim, window, padding == "replicate")
    return x


class LocalSquaredCorrelation:
    """Squared correlation with one fixed image in a ``window^3`` box around every voxel (zero
    padding): ``LocalSquaredCorrelation(fixed, window)(warped)`` is ``(B, 1, X, Y, Z)`` in [0, 1].
    The fixed image's box sums are computed once, for repeated calls (instance optimisation)."""

    def __init__(self, fixed: torch.Tensor, window: int = 9, eps: float = 1e-5):
        if window % 2 != 1:
            raise ValueError("LNCC window must be odd")
        self.fixed, self.window, self.eps, self.n = fixed, window, eps, float(window ** 3)
        # separable box filter (a cumulative sum per axis, zero padding)
        s_i, s_ii = box_sum(torch.cat([fixed, fixed * fixed], dim=1), window).split(1, dim=1)
        self.s_i, self.var_i = s_i, (s_ii - s_i * s_i / self.n).clamp_min(0)

    def __call__(self, warped: torch.Tensor) -> torch.Tensor:
        stacked = torch.cat([warped, warped * warped, self.fixed * warped], dim=1)
        s_j, s_jj, s_ij = box_sum(stacked, self.window).split(1, dim=1)
        cross = s_ij - self.s_i * s_j / self.n
        var_j = (s_jj - s_j * s_j / self.n).clamp_min(0)
        return cross * cross / (self.var_i * var_j + self.eps)


def local_squared_correlation(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9,
                              eps: float = 1e-5) -> torch.Tensor:
    """Squared correlation of the two images in a ``window^3`` box around every voxel (zero
    padding), ``(B, 1, X, Y, Z)`` in [0, 1]. Images ``(B, 1, X, Y, Z)``."""
    return LocalSquaredCorrelation(fixed, window, eps)(warped)


def lncc_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """``1 - mean local squared correlation`` in a ``window^3`` box; ``(B,)``. Images ``(B, 1, X, Y, Z)``."""
    return 1.0 - _flat(local_squared_correlation(fixed, warped, window, eps)).mean(1)


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a ``window^3`` box centred on every voxel, edges replicated; same shape."""
    return box_sum(x, window, padding="replicate") / float(window ** 3)


# the six face neighbours of a voxel, and the 12 pairs of them at distance sqrt(2) (MIND-SSC)
_SIX = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
MIND_PAIRS = tuple((a, b) for i, a in enumerate(_SIX) for b in _SIX[i + 1:]
                   if sum((p - q) ** 2 for p, q in zip(a, b)) == 2)


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2, eps: float = 1e-6) -> torch.Tensor:
    """MIND-SSC descriptors ``(B, 12, X, Y, Z)`` of ``image`` ``(B, 1, X, Y, Z)`` (Heinrich et al. 2013).

    For each of the 12 pairs ``(a, b)`` of face neighbours at distance sqrt(2) (offsets scaled by
    ``dilation`` voxels), ``D_ab(x)`` = mean over a ``(2 radius + 1)^3`` patch of
    ``(I(x + a) - I(x + b))^2`` (edges replicated). Then ``D' = D - min_pairs D``,
    ``V = mean_pairs D'`` clamped to [1e-3, 1e3] x its image mean (and >= eps), and
    ``MIND = exp(-D' / V)``: in (0, 1], 1 for the most similar pair at every voxel.
    """
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"MIND-SSC needs an image (B, 1, X, Y, Z), got {tuple(image.shape)}")
    d, r = dilation, radius
    # one 3^3 kernel per pair, +1 at a and -1 at b, dilated by d: a single convolution gives all 12
    kernel = image.new_zeros(len(MIND_PAIRS), 1, 3, 3, 3)
    for k, (a, b) in enumerate(MIND_PAIRS):
        kernel[(k, 0, *(1 + c for c in a))] = 1.0
        kernel[(k, 0, *(1 + c for c in b))] = -1.0
    dist = F.conv3d(F.pad(image, (d,) * 6, mode="replicate"), kernel, dilation=d) ** 2
    if r > 0:
        dist = F.avg_pool3d(F.pad(dist, (r,) * 6, mode="replicate"), 2 * r + 1, stride=1)
    dist = dist - dist.min(1, keepdim=True).values
    var = dist.mean(1, keepdim=True)
    level = var.mean((2, 3, 4), keepdim=True)
    var = torch.maximum(torch.minimum(var, level * 1e3), (level * 1e-3).clamp_min(eps))
    return torch.exp(-dist / var)


def mind_loss(fixed: torch.Tensor, warped: torch.Tensor, downsample: int = 2, radius: int = 1,
              dilation: int = 1) -> torch.Tensor:
    """Mean squared distance of the MIND-SSC descriptors (:func:`mind_ssc`) of the two images; ``(B,)``.

    Depends on local self-similarity, not on intensities, so it works across contrasts. Computed on
    a grid ``downsample`` times coarser (both images averaged over blocks): the defaults compare
    intensities 2 voxels apart on the full grid, as the refinement's MIND does, at 1/8 of the cost.
    Images ``(B, 1, X, Y, Z)``."""
    if downsample > 1:
        fixed, warped = F.avg_pool3d(fixed, downsample), F.avg_pool3d(warped, downsample)
    return _flat((mind_ssc(fixed, radius, dilation) - mind_ssc(warped, radius, dilation)) ** 2).mean(1)


def mse_loss(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference; ``(B,)``."""
    return _flat((fixed - warped) ** 2).mean(1)


SIMILARITY = {"corr": correlation_loss, "lncc": lncc_loss, "mind": mind_loss, "mse": mse_loss}


def one_hot(labels: torch.Tensor, values) -> torch.Tensor:
    """Float one-hot maps ``(B, L, X, Y, Z)`` of a label map ``(B, 1, X, Y, Z)``, one channel per value
    in ``values`` (background left out unless listed)."""
    if labels.dim() != 5 or labels.shape[1] != 1:
        raise ValueError(f"label map must have shape (B, 1, X, Y, Z), got {tuple(labels.shape)}")
    return torch.cat([((labels - v).abs() < 0.5).to(torch.float32) for v in values], dim=1)


def soft_dice_loss(warped: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(xy) + s) / (sum(x^2) + sum(y^2) + s)`` per channel, averaged over channels; ``(B,)``.

    ``warped``, ``target``: soft or hard label maps ``(B, L, X, Y, Z)`` in [0, 1] (e.g. warped one-hot
    moving labels and one-hot fixed labels). 0 for identical maps; ``smooth`` (1, as in the recipe)
    keeps labels absent from both maps at 0 loss.
    """
    if warped.shape != target.shape:
        raise ValueError(f"soft Dice needs equal shapes, got {tuple(warped.shape)} and {tuple(target.shape)}")
    x, y = warped.flatten(2), target.flatten(2)
    dice = (2 * (x * y).sum(2) + smooth) / ((x * x).sum(2) + (y * y).sum(2) + smooth)
    return (1.0 - dice).mean(1)


def smoothness_loss(flow: torch.Tensor) -> torch.Tensor:
    """RCN regulariser: ``0.5 * sum of squared forward differences / voxel count``; ``(B,)``."""
    n = flow[0, 0].numel()
    total = 0.0
    for axis in (2, 3, 4):
        d = torch.diff(flow, dim=axis)
        total = total + _flat(d * d).sum(1)
    return 0.5 * total / n


def spatial_gradient_l1_loss(flow: torch.Tensor) -> torch.Tensor:
    """Learn2Reg hippocampus recipe regulariser ``mean |g - 0.5|`` over channels and voxels; ``(B,)``.

    ``g`` is the per-axis spatial gradient of the sampling grid
    (:func:`network.layers.spatial_gradient_of`), so ``g - 0.5 = (u_c(i) - u_c(i-1)) / 2``
    along axis ``c`` (``u_c(-1) = 0``): it penalises axis-wise stretching and compression only.
    """
    return _flat((spatial_gradient_of(flow) - 0.5).abs()).mean(1)


REGULARISERS = {"smooth": smoothness_loss, "gradient_l1": spatial_gradient_l1_loss}


def overlap_mask(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """``(fixed > 0) & (moving > 0)`` as float ``(B, 1, X, Y, Z)``: the recipe's similarity mask."""
    return ((fixed > 0) & (moving > 0)).to(fixed.dtype)


def affine_det_loss(A: torch.Tensor) -> torch.Tensor:
    """``0.5 * (det A - 1)^2`` per sample; ``A`` is ``(B, 3, 3)``."""
    return 0.5 * (torch.linalg.det(A) - 1.0) ** 2


def affine_ortho_loss(A: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``k1+k2+k3 + 1/k1+1/k2+1/k3 - 6`` over the eigenvalues ``k`` of ``AᵀA + eps I``; ``(B,)``.

    Written with the elementary symmetric polynomials (no eigendecomposition), as in RCN.
    """
    eye = torch.eye(3, device=A.device, dtype=A.dtype)
    C = A.transpose(1, 2) @ A + eps * eye
    s1 = C.diagonal(dim1=1, dim2=2).sum(-1)                                  # k1 + k2 + k3
    s2 = 0.5 * (s1 ** 2 - (C * C.transpose(1, 2)).sum((1, 2)))               # k1k2 + k2k3 + k1k3
    s3 = torch.linalg.det(C)                                                 # k1 k2 k3
    return s1 + (1 + eps) ** 2 * s2 / s3 - 6.0 * (1 + eps)


class RegistrationLoss:
    """Registration loss on a :class:`~network.recursive_cascaded_networks.RecursiveCascadeNetwork` output.

    ``sim + reg_weight * reg + dice_weight * dice + det_weight * det + ortho_weight * ortho``, each
    summed over the batch, where

    * ``sim``: similarity (``corr`` (RCN), ``lncc``, ``mind`` (:func:`mind_loss`), ``mse``) between the
      fixed image and the final warped image; with ``output["deep_warped"]`` (deep supervision) the
      mean over the final and every deep-supervision warp; with ``mask_overlap`` both images are
      multiplied by :func:`overlap_mask` of the (unwarped) input pair first (the Learn2Reg recipe);
    * ``reg``: ``regulariser`` (``smooth`` (RCN) or ``gradient_l1`` (the recipe)) summed over every
      deformable stage's own flow;
    * ``dice``: :func:`soft_dice_loss` between the moving labels warped by the final flow (one-hot,
      trilinear) and the fixed labels, over ``label_values`` (needs ``fixed_seg`` / ``moving_seg``;
      pairs where ``seg_valid`` ``(B,)`` is False, i.e. without both label maps, contribute 0); with
      ``dice_downsample`` f > 1 on a grid f times coarser (one-hot maps and the flow averaged over
      f^3 blocks, the flow divided by f): f^3 times cheaper for many labels;
    * ``det``, ``ortho``: affine stem terms (only with an affine stem).
    ``__call__`` returns ``(total, components)``; every component is a scalar tensor.
    """

    def __init__(self, similarity: str = "corr", reg_weight: float = 1.0, det_weight: float = 0.1,
                 ortho_weight: float = 0.1, lncc_window: int = 9, regulariser: str = "smooth",
                 dice_weight: float = 0.0, label_values=None, mask_overlap: bool = False,
                 dice_downsample: int = 1):
        if similarity not in SIMILARITY:
            raise ValueError(f"unknown similarity {similarity!r}; choose from {sorted(SIMILARITY)}")
        if regulariser not in REGULARISERS:
            raise ValueError(f"unknown regulariser {regulariser!r}; choose from {sorted(REGULARISERS)}")
        if dice_weight > 0 and not label_values:
            raise ValueError("the Dice term needs the label values to score (label_values)")
        self.similarity = similarity
        self.reg_weight = reg_weight
        self.det_weight = det_weight
        self.ortho_weight = ortho_weight
        self.lncc_window = lncc_window
        self.regulariser = regulariser
        self.dice_weight = dice_weight
        self.label_values = list(label_values) if label_values else None
        self.mask_overlap = mask_overlap
        if int(dice_downsample) < 1:
            raise ValueError(f"dice_downsample must be >= 1, got {dice_downsample}")
        self.dice_downsample = int(dice_downsample)

    def similarity_term(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        if self.similarity == "lncc":
            return lncc_loss(fixed, warped, self.lncc_window)
        return SIMILARITY[self.similarity](fixed, warped)

    def __call__(self, fixed: torch.Tensor, output: dict, moving: torch.Tensor | None = None,
                 fixed_seg: torch.Tensor | None = None, moving_seg: torch.Tensor | None = None,
                 seg_valid: torch.Tensor | None = None):
        warps = [output["warped"]] + list(output.get("deep_warped", []))
        target = fixed
        if self.mask_overlap:
            if moving is None:
                raise ValueError("mask_overlap needs the moving image")
            mask = overlap_mask(fixed, moving)
            target, warps = fixed * mask, [w * mask for w in warps]
        comps = {"sim": torch.stack([self.similarity_term(target, w) for w in warps]).mean(0).sum()}
        reg_fn = REGULARISERS[self.regulariser]
        reg = [reg_fn(f).sum() for f, d in zip(output["flows"], output["deformable"]) if d]
        comps["reg"] = torch.stack(reg).sum() if reg else fixed.new_zeros(())
        total = comps["sim"] + self.reg_weight * comps["reg"]
        if self.dice_weight > 0:
            if fixed_seg is None or moving_seg is None:
                raise ValueError("the Dice term needs fixed and moving label maps")
            moving_maps, fixed_maps = one_hot(moving_seg, self.label_values), one_hot(fixed_seg, self.label_values)
            flow, f = output["flow"], self.dice_downsample
            if f > 1:
                moving_maps, fixed_maps = F.avg_pool3d(moving_maps, f), F.avg_pool3d(fixed_maps, f)
                flow = F.avg_pool3d(flow, f) / f
            dice = soft_dice_loss(warp(moving_maps, flow), fixed_maps)
            if seg_valid is not None:
                dice = dice * seg_valid.to(device=dice.device, dtype=dice.dtype)
            comps["dice"] = dice.sum()
            total = total + self.dice_weight * comps["dice"]
        if output.get("affine") is not None:
            A = output["affine"]["A"]
            comps["det"] = affine_det_loss(A).sum()
            comps["ortho"] = affine_ortho_loss(A).sum()
            total = total + self.det_weight * comps["det"] + self.ortho_weight * comps["ortho"]
        comps["total"] = total
        return total, comps
