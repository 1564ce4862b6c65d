"""Array operations shared by the NIfTI readers and the scripts: intensity normalisation, centre
crop / zero pad, and mapping a flow on the cropped grid back to the original fixed grid."""
from __future__ import annotations

import numpy as np
import torch

NORMALISATIONS = ("l2r", "uint8", "none")


def normalise_l2r(array) -> np.ndarray:
    """Estienne et al.'s recipe: z-score with the mean/std of the voxels > 0 (applied to every voxel),
    clip to [-5, 5], then min-max over the whole volume to [0, 1]. float32. A volume without
    positive voxels, or a constant one, gives zeros."""
    a = np.asarray(array, dtype=np.float64)
    foreground = a[a > 0]
    if foreground.size == 0:
        return np.zeros(a.shape, np.float32)
    std = foreground.std()
    z = np.clip((a - foreground.mean()) / (std if std > 0 else 1.0), -5.0, 5.0)
    lo, hi = z.min(), z.max()
    if hi - lo <= 0:
        return np.zeros(a.shape, np.float32)
    return ((z - lo) / (hi - lo)).astype(np.float32)


def normalise(array, mode: str = "l2r") -> np.ndarray:
    """``"l2r"`` (:func:`normalise_l2r`), ``"uint8"`` (``/ 255``) or ``"none"`` (as stored); float32."""
    if mode == "l2r":
        return normalise_l2r(array)
    if mode == "uint8":
        return (np.asarray(array, dtype=np.float32) / np.float32(255.0)).astype(np.float32)
    if mode == "none":
        return np.asarray(array, dtype=np.float32)
    raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {mode!r}")


def crop_or_pad(array, size):
    """Centre crop or symmetric zero pad the last ``len(size)`` axes of ``array`` independently.

    Per axis of length ``n``: cropping starts at ``(n - size) // 2``; padding puts ``(size - n) // 2``
    zeros before. Returns ``(array, offset)``, ``offset`` (tuple of ints) = the original index of
    output voxel 0 along each axis (negative when padded): ``out[q] = in[q + offset]``.
    """
    array = np.asarray(array)
    size = tuple(int(s) for s in size)
    lead = array.ndim - len(size)
    if lead < 0:
        raise ValueError(f"array of shape {array.shape} has fewer axes than size {size}")
    offset, slices, pads = [], [slice(None)] * lead, [(0, 0)] * lead
    for n, s in zip(array.shape[lead:], size):
        if s < 1:
            raise ValueError(f"crop size must be positive, got {size}")
        if n >= s:
            start = (n - s) // 2
            slices.append(slice(start, start + s))
            pads.append((0, 0))
        else:
            before = (s - n) // 2
            start = -before
            slices.append(slice(None))
            pads.append((before, s - n - before))
        offset.append(start)
    out = array[tuple(slices)]
    if any(p != (0, 0) for p in pads):
        out = np.pad(out, pads)
    return np.ascontiguousarray(out), tuple(offset)


def uncrop_flow(flow, fixed_offset, moving_offset, original_fixed_shape):
    """A flow between cropped images -> the displacement on the original fixed grid.

    ``flow`` ``(3, *C)`` (numpy or torch; channel ``c`` moves axis ``c``, voxels) is the pull-back
    displacement between the cropped fixed image ``F_c(q) = F(q + o_f)`` and the cropped moving image
    ``M_c(q) = M(q + o_m)`` (``o_f``, ``o_m``: :func:`crop_or_pad` offsets), i.e. ``F_c(q)`` matches
    ``M_c(q + u_c(q))``. For ``p = q + o_f`` this is ``F(p)`` matching ``M(p + u_c(p - o_f) + o_m - o_f)``,
    so on the original fixed grid::

        u_orig(p) = u_c(p - o_f) + o_m - o_f

    for ``p`` inside the crop window; outside it (where the network saw nothing) the value of the
    nearest window voxel is repeated (edge replication, per axis). Returns ``(3, *original_fixed_shape)``
    of the input's type and dtype.
    """
    is_torch = isinstance(flow, torch.Tensor)
    u = flow.detach().cpu().numpy() if is_torch else np.asarray(flow)
    shape = tuple(int(s) for s in original_fixed_shape)
    if u.ndim != len(shape) + 1 or u.shape[0] != len(shape):
        raise ValueError(f"flow must have shape ({len(shape)}, X, Y, Z), got {tuple(u.shape)}")
    o_f = np.asarray(fixed_offset, dtype=np.int64).reshape(-1)
    o_m = np.asarray(moving_offset, dtype=np.int64).reshape(-1)
    index = [np.clip(np.arange(n) - o, 0, c - 1) for n, o, c in zip(shape, o_f, u.shape[1:])]
    out = u[(slice(None),) + np.ix_(*index)]
    shift = (o_m - o_f).astype(u.dtype).reshape((-1,) + (1,) * len(shape))
    out = (out + shift).astype(u.dtype, copy=False)
    if is_torch:
        return torch.from_numpy(np.ascontiguousarray(out)).to(device=flow.device, dtype=flow.dtype)
    return out


__all__ = ["normalise", "normalise_l2r", "crop_or_pad", "uncrop_flow", "NORMALISATIONS"]
