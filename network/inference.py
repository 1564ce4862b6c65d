"""Fast inference path: one pair (or batch) in, final flow + warped image (+ warped labels) out.

:func:`register` runs a :class:`~network.recursive_cascaded_networks.RecursiveCascadeNetwork` the way
deployment needs it and nothing more:

* ``torch.inference_mode`` (no autograd bookkeeping), weights frozen, ``eval()``;
* ``channels_last_3d`` activations, the layout oneDNN's 3D convolutions are fastest in on the CPU
  (the model's :class:`~network.layers.Conv3d` always uses oneDNN there);
* the model's own cascade loop (:meth:`~network.recursive_cascaded_networks.RecursiveCascadeNetwork.cascade`)
  with only the warps it needs (each stage's input, the final image, the labels), on a cached
  sampling grid, sampled in parallel slabs on the CPU (:func:`~network.layers.warp`);
* no per-stage lists, losses or metrics;
* optionally (:func:`tune_allocator`, used by ``eval.py`` and ``benchmark.py``) freed memory stays
  in the process, so the next pair's 100 MB activations do not page-fault in again.

It gives the same flow as ``model(fixed, moving)["flow"]`` up to float rounding (the convolutions sum
in another order; ``tests/test_inference.py`` states the tolerance).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import warp
from .recursive_cascaded_networks import RecursiveCascadeNetwork

CHANNELS_LAST = torch.channels_last_3d


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op CPU threads (None: leave PyTorch's default). Returns the count in use."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3          # glibc mallopt parameters
_GLIBC_DEFAULTS = 128 * 1024


def tune_allocator(keep_freed_memory: bool = True) -> bool:
    """Let glibc keep freed memory for reuse (True) or restore its defaults and trim (False).

    glibc serves every allocation above 128 KiB-32 MiB with a fresh ``mmap`` and gives it back on
    free, so each registration page-faults its large activations in again (measured here: 1.3-1.6x
    slower end to end at 128^3). Keeping them costs resident memory up to the peak of one
    registration. Process-wide; returns False where glibc's ``mallopt`` is not available.
    """
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        value = (1 << 30) if keep_freed_memory else _GLIBC_DEFAULTS
        ok = libc.mallopt(_M_MMAP_THRESHOLD, value) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, value) == 1
        if not keep_freed_memory:
            libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def prepare(model: RecursiveCascadeNetwork, channels_last: bool = True) -> RecursiveCascadeNetwork:
    """Put ``model`` in inference state in place: ``eval()``, no parameter gradients, memory layout."""
    model.eval()
    model.requires_grad_(False)
    if channels_last:
        model.to(memory_format=CHANNELS_LAST)
    return model


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=CHANNELS_LAST) if channels_last else x


@torch.inference_mode()
def register(model: RecursiveCascadeNetwork, fixed: torch.Tensor, moving: torch.Tensor,
             seg: torch.Tensor | None = None, channels_last: bool = True, rep: int | None = None) -> dict:
    """Register ``moving`` to ``fixed`` (``(B, 1, X, Y, Z)``, in [0, 1]) with the fast path.

    Returns ``{"flow": (B, 3, X, Y, Z) voxels, "warped": (B, 1, X, Y, Z)}`` and, when ``seg``
    (moving label map ``(B, 1, X, Y, Z)``, any numeric dtype) is given, ``"warped_seg"`` warped with
    nearest-neighbour sampling in ``seg``'s dtype. Call :func:`prepare` on the model once beforehand.
    """
    model.check_input(fixed, moving)
    fixed, moving = _layout(fixed, channels_last), _layout(moving, channels_last)
    for stage in model.cascade(fixed, moving, rep):
        pass
    agg = stage.agg
    out = {"flow": agg, "warped": stage.warped}
    if seg is not None:
        if seg.shape[0] != moving.shape[0] or seg.shape[1] != 1 or seg.shape[2:] != moving.shape[2:]:
            raise ValueError(f"seg must have shape {(moving.shape[0], 1, *moving.shape[2:])}, got {tuple(seg.shape)}")
        out["warped_seg"] = warp(seg.to(agg.dtype), agg, mode="nearest").to(seg.dtype)
    return out


class FastRegistration(nn.Module):
    """:func:`register` as a module ``(fixed, moving) -> (flow, warped)``, for tracing and export.

    The wrapped model is put in inference state (:func:`prepare`) when this is built.
    """

    def __init__(self, model: RecursiveCascadeNetwork, channels_last: bool = True):
        super().__init__()
        self.model = prepare(model, channels_last)
        self.channels_last = channels_last

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor):
        out = register(self.model, fixed, moving, channels_last=self.channels_last)
        return out["flow"], out["warped"]


__all__ = ["register", "prepare", "set_threads", "tune_allocator", "FastRegistration"]
