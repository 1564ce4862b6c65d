"""Self-describing checkpoints: model config + weights + optimizer + step, written atomically.

Layout: ``weights/<output>/ckpt_<step>.pt``. A checkpoint is a dict::

    {"format": "ldr-rcn-checkpoint", "version": 1, "model_config": {...}, "model": state_dict,
     "optimizer": state_dict | None, "step": int, "epoch": int, "train_args": {...}}

Loading uses ``torch.load(weights_only=True)``: only tensors and plain containers are accepted, so a
checkpoint cannot execute code.
"""
from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager

import torch

FORMAT = "ldr-rcn-checkpoint"
VERSION = 1
_CKPT = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or not ours; the message names the file."""


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def atomic_output(path: str):
    """Yield a temporary file name in ``path``'s folder; rename it to ``path`` if the block succeeds,
    remove it otherwise."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, suffix = os.path.splitext(path)
    if suffix.lower() == ".gz":                  # keep ".nii.gz": writers pick the format by suffix
        suffix = os.path.splitext(stem)[1] + suffix
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)           # mkstemp makes 0600; give the usual permissions
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to a temporary file in ``path``'s folder, then rename it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(folder: str, model, model_config: dict, step: int, epoch: int = 0,
                    optimizer=None, train_args: dict | None = None, extra: dict | None = None) -> str:
    path = os.path.join(folder, f"ckpt_{step}.pt")
    state = {"format": FORMAT, "version": VERSION, "model_config": dict(model_config),
             "model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
             "step": int(step), "epoch": int(epoch), "train_args": dict(train_args or {})}
    if extra:
        state.update(extra)
    atomic_save(state, path)
    return path


def list_checkpoints(folder: str) -> dict:
    """``{step: path}`` of the checkpoints in ``folder``."""
    out = {}
    for name in os.listdir(folder):
        m = _CKPT.match(name)
        if m:
            out[int(m.group(1))] = os.path.join(folder, name)
    return out


def resolve_checkpoint(spec: str) -> str:
    """``DIR`` (latest step), ``DIR:STEP`` or a ``.pt`` file -> checkpoint file path."""
    folder, step = spec, None
    m = re.match(r"^(.*):(\d+)$", spec)
    if m and not os.path.isfile(spec):
        folder, step = m.group(1), int(m.group(2))
    if os.path.isfile(folder):
        return folder
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: checkpoint folder or file not found")
    found = list_checkpoints(folder)
    if not found:
        raise CheckpointError(f"{folder}: no ckpt_<step>.pt files in this folder")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise CheckpointError(f"{folder}: no checkpoint for step {step} (have {sorted(found)})")
    return found[step]


def load_checkpoint(spec: str, map_location="cpu") -> dict:
    """Load and validate a checkpoint; raises :class:`CheckpointError` with the file name."""
    path = resolve_checkpoint(spec)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises many types on corrupt input (IndexError, KeyError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, corrupt or unsafe): {first}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    for key in ("model_config", "model", "step"):
        if key not in state:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    state["path"] = path
    return state
