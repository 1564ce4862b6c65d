"""Writing outputs safely: one file at a time (:func:`atomic_output`) or a whole folder as a set
(:class:`OutputSet`).

Every writer here follows the same rules:

* the data go to a temporary sibling first and are renamed into place only when complete, so a
  reader never sees a half-written file and an interrupted write leaves the old output intact;
* temporary names carry the host and process id (``.tmp_<host>_<pid>_...``); :func:`clean_stale_temps`
  removes the ones whose process is gone (a ``kill -9`` mid-write), so they do not pile up;
* outputs get the usual permissions (``0666`` / ``0777`` minus the umask, as ``open()`` would give),
  not ``mkstemp``'s private ``0600``, so colleagues on a shared server can read them;
* a failing write (full disk, quota, permission, read-only file system, ...) raises
  :class:`OutputError` with one line naming the path and the reason.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager

from .errors import ToolkitError

_HOST = socket.gethostname().replace("_", "-").replace(os.sep, "-") or "host"
TEMP_PREFIX = ".tmp_"
_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EROFS: "read-only file system", errno.ENOENT: "no such file or folder",
            errno.ENOTDIR: "a parent is not a folder", errno.EISDIR: "is a folder",
            errno.ENAMETOOLONG: "file name too long", errno.EFBIG: "file too large"}


class OutputError(ToolkitError):
    """An output could not be written; the message is one line naming the path and the reason."""


def os_error_reason(exc: BaseException, path: str | None = None) -> str:
    """A short reason for a failed write: ``errno`` when there is one (also the ``errno = N`` that
    HDF5 puts in its messages), else the free space of ``path``'s file system when it is (almost)
    full, else the exception's first line."""
    code = getattr(exc, "errno", None)
    found = re.search(r"errno = (\d+)", str(exc))
    if code is None and found:
        code = int(found.group(1))
    if code in _REASONS:
        return _REASONS[code]
    if path is not None:
        try:
            if shutil.disk_usage(_existing_parent(path)).free < 1 << 20:
                return "no space left on device"
        except OSError:
            pass
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_folder(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot create folder ({os_error_reason(e, folder)})") from None


def temp_prefix(stem: str = "") -> str:
    """``.tmp_<host>_<pid>_<stem>``: the prefix of this process's temporary names."""
    return f"{TEMP_PREFIX}{_HOST}_{os.getpid()}_{stem}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: str) -> list:
    """Remove temporary files and staging folders in ``folder`` left by processes of this host
    that no longer run (killed mid-write). Returns the removed paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(TEMP_PREFIX):
            continue
        parts = name[len(TEMP_PREFIX):].split("_", 2)
        if len(parts) < 3 or parts[0] != _HOST or not parts[1].isdigit():
            continue
        if int(parts[1]) == os.getpid() or _pid_alive(int(parts[1])):
            continue
        path = os.path.join(folder, name)
        try:
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def _suffix(path: str) -> str:
    stem, suffix = os.path.splitext(path)
    if suffix.lower() == ".gz":                  # keep ".nii.gz": writers pick the format by suffix
        suffix = os.path.splitext(stem)[1] + suffix
    return suffix


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    except OSError:
        pass


def move_into_place(staged: str, final: str) -> None:
    """Rename ``staged`` to ``final`` in one step (same file system): the move every writer here ends
    with, also the teacher-flow store's "partial file becomes the store". Raises ``OSError``."""
    os.replace(staged, final)


@contextmanager
def atomic_output(path: str):
    """Yield a temporary file name beside ``path``; rename it to ``path`` if the block succeeds,
    remove it otherwise. Write errors become :class:`OutputError` naming ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    _make_folder(folder)
    clean_stale_temps(folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=_suffix(path), dir=folder)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({os_error_reason(e, folder)})") from None
    try:
        yield tmp
        move_into_place(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save and h5py report write failures as RuntimeError
        _remove(tmp)
        if isinstance(e, OutputError):
            raise
        raise OutputError(f"{path}: cannot write ({os_error_reason(e, folder)})") from None
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_save(obj, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


class OutputSet:
    """A folder written as one set: files go to a staging folder beside ``final``, and
    :meth:`commit` swaps the whole folder into place, so ``final`` holds either the complete old
    set or the complete new one, never a mix. Use as a context manager (commit on success,
    discard on error)::

        with OutputSet("evaluate/run-1000-2") as out:
            atomic-free writes to out.path("report.json"), out.path("pairs.csv"), ...
    """

    def __init__(self, final: str):
        self.final = os.path.abspath(final)
        self.shown = final
        if os.path.exists(self.final) and not os.path.isdir(self.final):
            raise OutputError(f"{final}: exists and is not a folder")
        parent = os.path.dirname(self.final)
        _make_folder(parent)
        clean_stale_temps(parent)
        try:
            self.staging = tempfile.mkdtemp(prefix=temp_prefix("staging-"), dir=parent)
            os.chmod(self.staging, 0o777 & ~_umask())
        except OSError as e:
            raise OutputError(f"{final}: cannot write ({os_error_reason(e, parent)})") from None
        self.committed = False

    def path(self, name: str) -> str:
        """Where to write ``name`` (a plain file name) inside the staging folder."""
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"output set member must be a plain file name, got {name!r}")
        return os.path.join(self.staging, name)

    def commit(self) -> str:
        """Move the staged set into place (replacing any old set); returns ``final``."""
        parent = os.path.dirname(self.final)
        old = None
        try:
            for name in os.listdir(self.staging):        # normal permissions for every member
                member = os.path.join(self.staging, name)
                if os.path.isfile(member):
                    os.chmod(member, 0o666 & ~_umask())
            if os.path.exists(self.final):
                old = tempfile.mkdtemp(prefix=temp_prefix("old-"), dir=parent)
                move_into_place(self.final, os.path.join(old, "set"))
            move_into_place(self.staging, self.final)
        except OSError as e:
            if old is not None and not os.path.exists(self.final):   # put the old set back
                move_into_place(os.path.join(old, "set"), self.final)
            self.discard()
            raise OutputError(f"{self.shown}: cannot write ({os_error_reason(e, parent)})") from None
        finally:
            if old is not None:
                _remove(old)
        self.committed = True
        return self.final

    def discard(self) -> None:
        _remove(self.staging)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.discard()
        return False


__all__ = ["OutputError", "OutputSet", "atomic_output", "atomic_save", "atomic_write_text", "clean_stale_temps",
           "os_error_reason", "temp_prefix"]
