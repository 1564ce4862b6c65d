"""Registration losses (DESIGN.md §4). Per-sample functions return ``(B,)`` tensors.

:class:`RegistrationLoss` combines them for a :class:`RecursiveCascadeNetwork` output and returns
``(total, components)`` where ``components`` maps a name to a scalar tensor, so logging is generic.
As in RCN, every term is summed over the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def correlation_loss(fixed: torch.Tensor, warped: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``1 - Pearson correlation`` over all voxels of each sample; ``(B,)``."""
    a, b = _flat(fixed), _flat(warped)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    cov = (a * b).mean(1)
    return 1.0 - cov / torch.sqrt(a.pow(2).mean(1) * b.pow(2).mean(1) + eps)


def lncc_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """``1 - mean local squared correlation`` in a ``window^3`` box; ``(B,)``. Images ``(B, 1, X, Y, Z)``."""
    if window % 2 != 1:
        raise ValueError("LNCC window must be odd")
    kernel = torch.ones(1, 1, window, window, window, device=fixed.device, dtype=fixed.dtype)
    pad = window // 2

    def box(x):
        return F.conv3d(x, kernel, padding=pad)

    n = float(window ** 3)
    s_i, s_j = box(fixed), box(warped)
    s_ii, s_jj, s_ij = box(fixed * fixed), box(warped * warped), box(fixed * warped)
    cross = s_ij - s_i * s_j / n
    var_i = (s_ii - s_i * s_i / n).clamp_min(0)
    var_j = (s_jj - s_j * s_j / n).clamp_min(0)
    cc = cross * cross / (var_i * var_j + eps)
    return 1.0 - _flat(cc).mean(1)


def mse_loss(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference; ``(B,)``."""
    return _flat((fixed - warped) ** 2).mean(1)


SIMILARITY = {"corr": correlation_loss, "lncc": lncc_loss, "mse": mse_loss}


def smoothness_loss(flow: torch.Tensor) -> torch.Tensor:
    """RCN regulariser: ``0.5 * sum of squared forward differences / voxel count``; ``(B,)``."""
    n = flow[0, 0].numel()
    total = 0.0
    for axis in (2, 3, 4):
        d = torch.diff(flow, dim=axis)
        total = total + _flat(d * d).sum(1)
    return 0.5 * total / n


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
    """Unsupervised RCN loss on a cascade output.

    ``similarity(fixed, final warped) + reg_weight * sum_k smoothness(flow_k)
    + det_weight * det(A) + ortho_weight * ortho(A)``, each summed over the batch.
    """

    def __init__(self, similarity: str = "corr", reg_weight: float = 1.0,
                 det_weight: float = 0.1, ortho_weight: float = 0.1, lncc_window: int = 9):
        if similarity not in SIMILARITY:
            raise ValueError(f"unknown similarity {similarity!r}; choose from {sorted(SIMILARITY)}")
        self.similarity = similarity
        self.reg_weight = reg_weight
        self.det_weight = det_weight
        self.ortho_weight = ortho_weight
        self.lncc_window = lncc_window

    def similarity_term(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        if self.similarity == "lncc":
            return lncc_loss(fixed, warped, self.lncc_window)
        return SIMILARITY[self.similarity](fixed, warped)

    def __call__(self, fixed: torch.Tensor, output: dict):
        comps = {"sim": self.similarity_term(fixed, output["warped"]).sum()}
        reg = [smoothness_loss(f).sum() for f, d in zip(output["flows"], output["deformable"]) if d]
        comps["reg"] = torch.stack(reg).sum() if reg else fixed.new_zeros(())
        total = comps["sim"] + self.reg_weight * comps["reg"]
        if output.get("affine") is not None:
            A = output["affine"]["A"]
            comps["det"] = affine_det_loss(A).sum()
            comps["ortho"] = affine_ortho_loss(A).sum()
            total = total + self.det_weight * comps["det"] + self.ortho_weight * comps["ortho"]
        comps["total"] = total
        return total, comps
