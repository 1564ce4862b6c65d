"""Self-describing checkpoints: model config + weights + optimizer + step, written atomically.

Layout: ``weights/<output>/ckpt_<step>.pt``. A checkpoint is a dict::

    {"format": "ldr-rcn-checkpoint", "version": 1, "model_config": {...}, "model": state_dict,
     "optimizer": state_dict | None, "step": int, "epoch": int, "train_args": {...}}

``train.py`` adds ``rng`` (torch / numpy / augmentation generator states, :func:`rng_state`),
``distill`` (critic and its optimiser), ``input_normalisation`` (how images were scaled for the
network), ``val`` (validation metrics at this step, if any), ``best`` (best validated step so far)
and ``n_params``. The run folder is locked while a training writes to it (:class:`RunLock`) and
old checkpoints are pruned (:func:`prune_checkpoints`).

Loading uses ``torch.load(weights_only=True)``: only tensors and plain containers are accepted, so a
checkpoint cannot execute code.
"""
from __future__ import annotations

import os
import re

import torch

from .errors import ToolkitError
from .outputs import OutputError, atomic_save, os_error_reason

FORMAT = "ldr-rcn-checkpoint"
VERSION = 1
# What only a training run needs: a shipped model and a --fresh_optimizer start leave it behind.
TRAINING_STATE = ("optimizer", "distill", "rng", "rng_ranks")
_CKPT = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(ToolkitError):
    """A checkpoint that is missing, unreadable or not ours; the message names the file."""


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
        from .tf_bundle import is_tf_folder

        if is_tf_folder(folder):
            raise CheckpointError(f"{folder}: a TensorFlow-1 checkpoint folder; convert it once with "
                                  f"'python import_tf.py {folder}' and use {folder.rstrip(os.sep)}-pt")
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


def load_weights(model, state: dict, what: str = "model") -> None:
    """``model.load_state_dict(state[what])`` with one clear :class:`CheckpointError` line when the
    stored weights do not fit the model (another architecture, width or stem layout)."""
    weights = state.get(what)
    if not isinstance(weights, dict):
        raise CheckpointError(f"{state.get('path', 'checkpoint')}: '{what}' holds no weights")
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} tensors of another shape (e.g. {k}: stored {tuple(weights[k].shape)}, "
                         f"model {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unknown (e.g. {unexpected[0]})")
        raise CheckpointError(f"{state.get('path', 'checkpoint')}: stored {what} weights do not fit the "
                              f"architecture it describes ({'; '.join(parts)}); the file is from another "
                              f"model or was edited")
    try:
        model.load_state_dict(weights)
    except (RuntimeError, ValueError, TypeError) as e:
        line = str(e).strip().splitlines()
        raise CheckpointError(f"{state.get('path', 'checkpoint')}: cannot load {what} weights: "
                              f"{line[-1] if line else type(e).__name__}") from None


def prune_checkpoints(folder: str, keep_last: int, protect=()) -> list:
    """Delete all but the ``keep_last`` newest checkpoints of ``folder`` (``0``: keep all), never
    one whose step is in ``protect`` (e.g. the best validation step). Returns the removed paths."""
    if keep_last <= 0:
        return []
    found = list_checkpoints(folder)
    keep = set(sorted(found)[-keep_last:]) | {int(s) for s in protect if s is not None}
    removed = []
    for step, path in sorted(found.items()):
        if step not in keep:
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    return removed


class RunLockError(ToolkitError):
    """Another process holds the run folder."""


class RunLock:
    """An exclusive lock on a run folder (``<folder>/.lock``, a POSIX record lock, ``fcntl.lockf``),
    held while a training writes there. The operating system releases it when the process ends,
    even on ``kill -9``, so a stale lock never blocks a resume. A POSIX lock belongs to the process
    and is not inherited by forked DataLoader workers (an ``flock`` would be, and a killed
    trainer's orphaned workers would keep the folder locked until they notice). The file records the holder's host and pid
    for the error message."""

    NAME = ".lock"

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, self.NAME)
        self._fd = None

    def acquire(self) -> "RunLock":
        import fcntl
        import socket

        self._created = []
        folder = os.path.abspath(self.folder)
        while not os.path.exists(folder):
            self._created.append(folder)
            folder = os.path.dirname(folder)
        try:
            os.makedirs(self.folder, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{self.folder}: cannot create the run folder ({os_error_reason(e, self.folder)})") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunLockError(f"{self.folder}: in use by another training ({holder}); wait for it to finish, "
                               f"or choose another --output") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock. A run folder that received no checkpoint (a run that failed at start-up) is
        removed again, with the parent folders this lock created, so a failed start leaves nothing."""
        if self._fd is None:
            return
        empty = not list_checkpoints(self.folder) and os.listdir(self.folder) == [self.NAME]
        if empty:
            os.remove(self.path)
        os.close(self._fd)
        self._fd = None
        if empty:
            for folder in self._created:
                try:
                    os.rmdir(folder)
                except OSError:
                    break

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def rng_state(generators: dict | None = None) -> dict:
    """The random state a training needs to continue exactly: torch (CPU and CUDA), numpy's global
    generator and any named ``torch.Generator`` (e.g. augmentation)."""
    import numpy as np

    out = {"torch": torch.get_rng_state(), "numpy": _numpy_state_to_plain(np.random.get_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    for name, gen in (generators or {}).items():
        out[f"gen:{name}"] = gen.get_state()
    return out


def restore_rng_state(state: dict, generators: dict | None = None) -> None:
    """Undo :func:`rng_state` (missing entries are left as they are)."""
    import numpy as np

    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (generators or {}).items():
        if f"gen:{name}" in state:
            gen.set_state(state[f"gen:{name}"])


def _numpy_state_to_plain(state) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state_from_plain(plain: dict):
    import numpy as np

    return (plain["name"], plain["keys"].numpy().astype(np.uint32), plain["pos"], plain["has_gauss"],
            plain["cached"])
