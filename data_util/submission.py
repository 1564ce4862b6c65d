"""Learn2Reg challenge submissions: write, read and apply displacement files.

Layout (Learn2Reg 2020): one file per pair, ``task_04/disp_{fixed:04d}_{moving:04d}.npz``, holding a
single array ``arr_0`` (what ``np.savez_compressed(path, arr)`` names it), float16, shape
``(3, X, Y, Z)`` in the NIfTI voxel axis order (as nibabel's ``get_fdata`` returns it). It is a
displacement in voxels, channel ``c`` displacing axis ``c``, pulled back from the fixed grid: the
organisers evaluate ``map_coordinates(moving, identity + disp, order=0)`` with
``identity = np.meshgrid(arange(X), arange(Y), arange(Z), indexing="ij")``.

That is this package's flow convention (docs/conventions.md; arrays loaded with nibabel without
reorientation): the file is just ``flow[0].numpy().astype(float16)``, no axis reversal.
"""
from __future__ import annotations

import logging
import os
import zipfile

import numpy as np
import torch
from scipy import ndimage

from network.outputs import atomic_output

logger = logging.getLogger(__name__)

FLOAT16_MAX = float(np.finfo(np.float16).max)   # 65504


def _id_text(value) -> str:
    text = str(value)
    return f"{int(text):04d}" if text.isdigit() else text


def submission_name(fixed_id, moving_id) -> str:
    """``disp_{fixed}_{moving}.npz``: integer ids (or digit strings) zero-padded to 4 digits, other ids verbatim.

    ``(2, 17)`` -> ``"disp_0002_0017.npz"``; ``("0002", "17")`` too; ``("case_a", 3)`` -> ``"disp_case_a_0003.npz"``.
    """
    return f"disp_{_id_text(fixed_id)}_{_id_text(moving_id)}.npz"


def _flow_array(flow, what: str) -> np.ndarray:
    """A ``(3, X, Y, Z)`` or ``(1, 3, X, Y, Z)`` torch/numpy flow -> float64 ``(3, X, Y, Z)`` array."""
    if isinstance(flow, torch.Tensor):
        flow = flow.detach().cpu().double().numpy()
    arr = np.asarray(flow, dtype=np.float64)
    if arr.ndim == 5 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 4 or arr.shape[0] != 3:
        raise ValueError(f"{what}: flow must have shape (3, X, Y, Z) or (1, 3, X, Y, Z), got {tuple(arr.shape)}")
    return arr


def write_displacement(folder: str, fixed_id, moving_id, flow) -> str:
    """Write one pair's flow (voxels, ``(3, X, Y, Z)`` or ``(1, 3, X, Y, Z)``) as a float16 submission file.

    The file is ``folder/submission_name(fixed_id, moving_id)``, written atomically (a temporary file
    renamed on success, so a failure leaves nothing behind). Raises ``ValueError`` naming the pair for
    non-finite values or values beyond the float16 range (|u| > 65504). Returns the path.
    """
    path = os.path.join(folder, submission_name(fixed_id, moving_id))
    what = f"pair ({fixed_id}, {moving_id})"
    arr = _flow_array(flow, what)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: flow has {int((~np.isfinite(arr)).sum())} non-finite values")
    peak = float(np.abs(arr).max()) if arr.size else 0.0
    if peak > FLOAT16_MAX:
        raise ValueError(f"{what}: |flow| reaches {peak:g} voxels, beyond the float16 range ({FLOAT16_MAX:g})")
    with atomic_output(path) as tmp:
        # a file object: np.savez_compressed would append ".npz" to a temporary name without it
        with open(tmp, "wb") as f:
            np.savez_compressed(f, arr.astype(np.float16))
    return path


def read_displacement(path: str) -> np.ndarray:
    """Read and check a submission file; float32 ``(3, X, Y, Z)`` displacement in voxels.

    Any float dtype is accepted (the challenge asks for float16; others are logged at INFO level).
    Raises one ``ValueError`` line naming the file for a missing file, a file that is not an npz
    archive or cannot be read, a missing ``arr_0``, a shape other than ``(3, X, Y, Z)``, a non-float
    dtype or non-finite values.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an npz (zip) archive")
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            arr = archive["arr_0"] if "arr_0" in names else None
    except Exception as e:  # zipfile / zlib / pickle errors on a corrupt or unsafe archive
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: unreadable npz archive: {type(e).__name__}: {first}") from None
    if arr is None:
        raise ValueError(f"{path}: no 'arr_0' array (has {sorted(names)})")
    if arr.ndim != 4 or arr.shape[0] != 3:
        raise ValueError(f"{path}: arr_0 must have shape (3, X, Y, Z), got {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{path}: arr_0 must be a float array (float16), got {arr.dtype}")
    if arr.dtype != np.float16:
        logger.info("%s: arr_0 is %s, the challenge asks for float16", path, arr.dtype)
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: arr_0 has {int((~np.isfinite(arr)).sum())} non-finite values")
    return arr.astype(np.float32)


def apply_displacement(moving: np.ndarray, disp: np.ndarray, order: int = 0) -> np.ndarray:
    """The organisers' warp: ``map_coordinates(moving, identity + disp, order=order)``, 0 outside.

    ``moving`` ``(X, Y, Z)``, ``disp`` ``(3, X, Y, Z)`` in voxels (any float dtype, used in float64);
    returns an ``(X, Y, Z)`` array of ``moving``'s dtype. Reference implementation for tests.
    """
    moving = np.asarray(moving)
    disp = np.asarray(disp, dtype=np.float64)
    if moving.ndim != 3 or disp.shape != (3, *moving.shape):
        raise ValueError(f"need moving (X, Y, Z) and disp (3, X, Y, Z), got {moving.shape} and {disp.shape}")
    identity = np.stack(np.meshgrid(*[np.arange(s) for s in moving.shape], indexing="ij"))
    return ndimage.map_coordinates(moving, identity + disp, order=order, mode="constant", cval=0.0)


def write_submission(folder: str, pairs_and_flows, task: int = 4) -> list:
    """Write ``(fixed_id, moving_id, flow)`` triples into ``folder/task_{task:02d}/``; returns the paths."""
    out = os.path.join(folder, f"task_{int(task):02d}")
    os.makedirs(out, exist_ok=True)
    return [write_displacement(out, fixed_id, moving_id, flow) for fixed_id, moving_id, flow in pairs_and_flows]
