"""Teacher deformations for ALDK distillation: a resumable HDF5 store and readers.

Conventions: a flow is a displacement field in voxels with layout ``(3, X, Y, Z)`` (channel ``c``
moves axis ``c``), the fixed-to-moving pull-back used everywhere else in the project. A pair key is
``f"{fixed_id}-{moving_id}"`` built with :func:`pair_key` from scan ids such as
``"synth_train_000"``; keys are only ever built, never parsed (ids may contain ``-``).

Two on-disk formats are read:

(a) Our HDF5 store (written by :class:`TeacherFlowWriter`): one file whose root attribute
    ``manifest`` is a JSON string (``format`` = :data:`STORE_FORMAT`, ``version`` =
    :data:`STORE_VERSION`, ``image_size``, ``layout``, ``teacher`` fingerprint and whatever else the
    caller recorded), and a group ``flows/`` holding one dataset per pair key, shape
    ``(3, X, Y, Z)``, dtype float16, chunked ``(3, min(X, 32), min(Y, 32), min(Z, 32))``, gzip
    level 1 with the shuffle filter. Each dataset gets the attribute ``complete = 1`` after its data
    is written; a dataset without it is the remains of an interrupted write and is ignored by the
    reader and deleted when the writer resumes. While being written the store lives at
    ``<out>.partial``; ``<out>`` appears (atomically, ``os.replace``) only when the writer finishes.

(b) The published LDR_ALDK pickles ``Teacher_deformations/{Liver,Brain}/*.pkl``: a pickled plain
    dict ``"idFixed-idMoving" -> float16 ndarray (X, Y, Z, 3)`` (channels-last, 128^3 in the
    release). They are loaded with :func:`safe_load_flow_pickle`, a restricted unpickler that only
    rebuilds numpy arrays (never a bare ``pickle.load``), and transposed to ``(3, X, Y, Z)``.

All errors are :class:`TeacherFlowError` with a one-line message naming the file, the problem and
the pair key when one is involved.
"""
from __future__ import annotations

import codecs
import ctypes
import json
import os
import pickle
import shutil
import struct
import tempfile

import h5py
import numpy as np

from network.errors import ToolkitError
from network.outputs import move_into_place, os_error_reason

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
try:
    from numpy._core.numeric import _frombuffer as _np_frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.numeric import _frombuffer as _np_frombuffer

STORE_FORMAT = "ldr-teacher-flows"
STORE_VERSION = 1
LAYOUT = "(3,X,Y,Z) float16 voxel displacement, channel c moves axis c, fixed-to-moving pull-back"
FLOAT16_MAX = 65504.0
PARTIAL_SUFFIX = ".partial"
SPACE_MARGIN = 256 << 10  # bytes kept free beyond what a write needs (HDF5 metadata, chunk index)
RESUME_HINT = "the pairs stored so far are kept: free space (or fix the folder) and run the same command again to resume"

# Exceptions a truncated or corrupt pickle stream can raise inside the restricted unpickler.
_PICKLE_ERRORS = (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError,
                  AttributeError, OverflowError, MemoryError, struct.error)

# The only globals a pickled dict of numpy arrays needs (protocols 0-5).
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    # protocol 5 rebuilds arrays from a byte buffer
    ("numpy.core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_frombuffer,
}


class TeacherFlowError(ToolkitError):
    """A teacher-flow file is missing, unreadable, unsafe or inconsistent (one-line message)."""


def pair_key(fixed_id: str, moving_id: str) -> str:
    """Key of the pair (fixed, moving): ``pair_key("a", "b") == "a-b"``."""
    return f"{fixed_id}-{moving_id}"


def _one_line(exc) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ------------------------------------------------------------------------------------------------
# published pickles
# ------------------------------------------------------------------------------------------------

class _FlowUnpickler(pickle.Unpickler):
    """Rebuilds only numpy arrays; every other global (and persistent ids) is refused."""

    def __init__(self, file, path):
        super().__init__(file)
        self._path = path

    def find_class(self, module, name):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise TeacherFlowError(f"{self._path}: refusing to unpickle '{module}.{name}': only a dict "
                                   f"of str -> numpy arrays is allowed") from None

    def persistent_load(self, pid):
        raise TeacherFlowError(f"{self._path}: refusing to unpickle a persistent id: only a dict of "
                               f"str -> numpy arrays is allowed")


def _is_float_dtype(dtype) -> bool:
    return dtype.kind == "f" and dtype.itemsize in (2, 4, 8)


def safe_load_flow_pickle(path) -> dict:
    """Load a published LDR_ALDK teacher pickle: a plain dict ``str -> floating numpy array``.

    Never a bare ``pickle.load``: a :class:`pickle.Unpickler` subclass allows only the globals
    needed to rebuild numpy arrays (``numpy.core.multiarray._reconstruct``,
    ``numpy._core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``,
    ``_codecs.encode``) and refuses persistent ids, so nothing else can be constructed or called.
    The result must be a dict whose keys are str and whose values are float16/32/64 ndarrays.
    """
    path = os.fspath(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise TeacherFlowError(f"{path}: no such file") from None
    except OSError as exc:
        raise TeacherFlowError(f"{path}: cannot read ({_one_line(exc)})") from None
    with handle:
        try:
            data = _FlowUnpickler(handle, path).load()
        except _PICKLE_ERRORS as exc:
            raise TeacherFlowError(f"{path}: truncated or corrupt pickle ({_one_line(exc)})") from None
    if not isinstance(data, dict):
        raise TeacherFlowError(f"{path}: expected a pickled dict of pair key -> numpy array, got "
                               f"{type(data).__name__}")
    for key, value in data.items():
        if not isinstance(key, str):
            raise TeacherFlowError(f"{path}: pair keys must be str, got {type(key).__name__} {key!r}")
        if not isinstance(value, np.ndarray):
            raise TeacherFlowError(f"{path}: teacher flow for pair '{key}' is a "
                                   f"{type(value).__name__}, expected a numpy array")
        if not _is_float_dtype(value.dtype):
            raise TeacherFlowError(f"{path}: teacher flow for pair '{key}' has dtype {value.dtype}, "
                                   f"expected float16/float32/float64")
    return data


# ------------------------------------------------------------------------------------------------
# HDF5 store
# ------------------------------------------------------------------------------------------------

def _image_size(image_size) -> tuple:
    try:
        size = tuple(int(s) for s in image_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise TeacherFlowError(f"image_size must be three positive ints, got {image_size!r}")
    return size


def _read_manifest(handle, path) -> dict:
    """Validated manifest of an open store (``TeacherFlowError`` when it is not one of ours)."""
    if "manifest" not in handle.attrs:
        raise TeacherFlowError(f"{path}: not a readable teacher-flow store (no 'manifest' attribute)")
    raw = handle.attrs["manifest"]
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        manifest = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise TeacherFlowError(f"{path}: not a readable teacher-flow store (manifest is not JSON: "
                               f"{_one_line(exc)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise TeacherFlowError(f"{path}: not a readable teacher-flow store (format {found!r}, "
                               f"expected {STORE_FORMAT!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or version > STORE_VERSION:
        raise TeacherFlowError(f"{path}: not a readable teacher-flow store (version {version!r}, this "
                               f"code reads up to {STORE_VERSION})")
    if "flows" not in handle or not isinstance(handle["flows"], h5py.Group):
        raise TeacherFlowError(f"{path}: not a readable teacher-flow store (no 'flows' group)")
    return manifest


def _open_h5(path, mode="r") -> h5py.File:
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise TeacherFlowError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise TeacherFlowError(f"{path}: not a readable teacher-flow store ({_one_line(exc)})") from None


def _read_store_manifest(path) -> dict:
    with _open_h5(path, "r") as handle:
        return _read_manifest(handle, path)


def _is_complete(dataset) -> bool:
    return isinstance(dataset, h5py.Dataset) and int(dataset.attrs.get("complete", 0)) == 1


def _json_normalised(value):
    return json.loads(json.dumps(value))


def _leak(*objects) -> None:
    """Keep HDF5 handles alive until the process ends. After a failed write (e.g. a full disk) the
    HDF5 library can no longer close the file: closing it, or Python freeing the handles at exit,
    crashes the process (segmentation fault). Leaked, they are never freed; the process ends
    cleanly, and everything written before the failure (complete pairs) stays readable."""
    for obj in objects:
        handle = getattr(obj, "id", None)
        if handle is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(handle))


class TeacherFlowWriter:
    """Resumable, atomic writer of a teacher-flow HDF5 store (a context manager).

    Data goes to ``path + ".partial"``; ``path`` itself appears only on :meth:`finish`
    (``os.replace``). Opening a finished store moves it back to the partial name so more pairs can
    be appended; opening an existing partial resumes it, dropping datasets of interrupted writes
    (no ``complete == 1`` attribute). An existing store must have been written for the same
    ``image_size`` and the same ``manifest["teacher"]`` fingerprint. If both ``path`` and its partial
    exist the writer refuses to guess which one to keep.

    Before each pair the writer checks that its folder has room for the pair (uncompressed size
    plus :data:`SPACE_MARGIN`), so a full disk stops the run with a :class:`TeacherFlowError` before
    HDF5 touches the file; a write error HDF5 reports anyway becomes a :class:`TeacherFlowError`
    too. Either way the partial store keeps the pairs written so far and a rerun resumes it.
    An unwritable folder is refused at construction.
    """

    def __init__(self, path, manifest: dict, image_size):
        self.path = os.fspath(path)
        self.partial = self.path + PARTIAL_SUFFIX
        self.image_size = _image_size(image_size)
        try:
            text = json.dumps(dict(manifest, format=STORE_FORMAT, version=STORE_VERSION,
                                   image_size=list(self.image_size), layout=LAYOUT))
        except (TypeError, ValueError) as exc:
            raise TeacherFlowError(f"{self.path}: manifest is not JSON-serialisable "
                                   f"({_one_line(exc)})") from None
        teacher = _json_normalised(manifest.get("teacher"))
        self._file = None
        self._finished = False

        self._check_folder()
        final_exists, partial_exists = os.path.exists(self.path), os.path.exists(self.partial)
        if final_exists and partial_exists:
            raise TeacherFlowError(f"{self.path}: both the finished store and {self.partial} exist; "
                                   f"delete one of them")
        if final_exists or partial_exists:
            existing = self.path if final_exists else self.partial
            stored = _read_store_manifest(existing)
            if stored.get("image_size") != list(self.image_size) or stored.get("teacher") != teacher:
                raise TeacherFlowError(f"{existing}: existing store was written by a different "
                                       f"teacher/image size; choose another --out or delete it")
            self._check_space(SPACE_MARGIN, "resuming the store")
            if final_exists:
                move_into_place(self.path, self.partial)
            self._file = _open_h5(self.partial, "a")
            try:
                self.manifest = _read_manifest(self._file, self.partial)
                flows = self._file["flows"]
                for key in [k for k in flows if not _is_complete(flows[k])]:
                    del flows[key]
                self._file.flush()
            except BaseException:
                self._file.close()
                raise
        else:
            self._check_space(SPACE_MARGIN + len(text), "a new store")
            try:
                self._file = h5py.File(self.partial, "w")
                self._file.attrs["manifest"] = text
                self._file.create_group("flows")
                self._file.flush()
            except (OSError, RuntimeError, ValueError) as exc:
                _leak(self._file)
                self._file = None
                raise TeacherFlowError(f"{self.partial}: cannot create the store "
                                       f"({os_error_reason(exc, self.partial)})") from None
            self.manifest = json.loads(text)

    # ---- room to write -----------------------------------------------------------------------

    def _check_folder(self) -> None:
        """Refuse a folder that cannot be created or written, naming the reason."""
        folder = os.path.dirname(os.path.abspath(self.partial))
        try:
            os.makedirs(folder, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".tmp_probe_", dir=folder)
            os.close(fd)
            os.remove(probe)
        except OSError as exc:
            raise TeacherFlowError(f"{self.partial}: cannot write the teacher-flow store here "
                                   f"({os_error_reason(exc, folder)})") from None

    def _check_space(self, need: int, what: str) -> None:
        folder = os.path.dirname(os.path.abspath(self.partial))
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return
        if free < need + SPACE_MARGIN:
            mib = lambda n: f"{n / 2 ** 20:.2f} MiB"  # noqa: E731
            hint = f"; {RESUME_HINT}" if self._file is not None or os.path.exists(self.partial) else ""
            raise TeacherFlowError(f"{self.partial}: no space left on device for {what} (needs about "
                                   f"{mib(need + SPACE_MARGIN)}, {mib(free)} free){hint}")

    # ---- index -----------------------------------------------------------------------------

    def _flows(self) -> h5py.Group:
        if self._file is None:
            raise TeacherFlowError(f"{self.partial}: writer is closed")
        return self._file["flows"]

    def __contains__(self, key) -> bool:
        flows = self._flows()
        return isinstance(key, str) and key in flows and _is_complete(flows[key])

    def keys(self) -> list:
        flows = self._flows()
        return sorted(k for k in flows if _is_complete(flows[k]))

    def __len__(self) -> int:
        return len(self.keys())

    # ---- writing ---------------------------------------------------------------------------

    def write(self, key: str, flow) -> None:
        """Store ``flow`` (``(3, X, Y, Z)`` ndarray or tensor, voxels) as float16 under ``key``."""
        flows = self._flows()
        if not isinstance(key, str) or not key or "/" in key or key in (".", ".."):
            raise TeacherFlowError(f"{self.partial}: invalid pair key {key!r} (non-empty str without '/')")
        if hasattr(flow, "detach"):
            tensor = flow.detach().cpu()
            try:
                flow = np.asarray(tensor)
            except TypeError:  # e.g. bfloat16, which numpy cannot represent
                flow = np.asarray(tensor.float())
        else:
            flow = np.asarray(flow)
        expected = (3,) + self.image_size
        if tuple(flow.shape) != expected:
            raise TeacherFlowError(f"{self.partial}: teacher flow for pair '{key}' has shape "
                                   f"{tuple(flow.shape)}, expected {expected}")
        if flow.dtype.kind not in "fiu":
            raise TeacherFlowError(f"{self.partial}: teacher flow for pair '{key}' has dtype "
                                   f"{flow.dtype}, expected a real number type")
        if not np.isfinite(flow).all():
            raise TeacherFlowError(f"{self.partial}: teacher flow for pair '{key}' contains NaN/inf")
        peak = float(np.abs(flow).max()) if flow.size else 0.0
        if peak > FLOAT16_MAX:
            raise TeacherFlowError(f"{self.partial}: teacher flow for pair '{key}' has |value| {peak:g} "
                                   f"beyond the float16 range ({FLOAT16_MAX:g})")
        data = flow.astype(np.float16)
        self._check_space(data.nbytes + data.nbytes // 8, f"teacher flow of pair '{key}'")
        chunks = (3,) + tuple(min(s, 32) for s in self.image_size)
        dataset = None
        try:
            if key in flows:
                del flows[key]
            dataset = flows.create_dataset(key, data=data, chunks=chunks,
                                           compression="gzip", compression_opts=1, shuffle=True)
            self._file.flush()              # the data is on disk before the pair is marked complete
            dataset.attrs["complete"] = 1
            self._file.flush()
        except (OSError, RuntimeError, ValueError) as exc:
            _leak(self._file, flows, dataset)
            self._file = None
            raise TeacherFlowError(f"{self.partial}: cannot write teacher flow of pair '{key}' "
                                   f"({os_error_reason(exc, self.partial)}); {RESUME_HINT}") from None

    # ---- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close without finishing: the partial file stays and a later writer resumes it."""
        if self._file is not None:
            handle, self._file = self._file, None
            try:
                handle.close()
            except (OSError, RuntimeError, ValueError) as exc:
                _leak(handle)
                raise TeacherFlowError(f"{self.partial}: cannot close the store ({os_error_reason(exc, self.partial)}); "
                                       f"{RESUME_HINT}") from None

    def finish(self) -> None:
        """Close and atomically move the partial file to ``path``."""
        if self._finished:
            return
        self.close()
        try:
            move_into_place(self.partial, self.path)
        except OSError as exc:
            raise TeacherFlowError(f"{self.path}: cannot move the finished store into place "
                                   f"({os_error_reason(exc, self.path)}); {RESUME_HINT}") from None
        self._finished = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finish()
        else:
            self.close()
        return False


# ------------------------------------------------------------------------------------------------
# reader
# ------------------------------------------------------------------------------------------------

def _kind(path) -> str:
    lower = path.lower()
    if lower.endswith((".h5", ".hdf5")):
        return "h5"
    if lower.endswith((".pkl", ".pickle")):
        return "pkl"
    return "h5" if h5py.is_hdf5(path) else "pkl"


class TeacherFlows:
    """Read-only index of teacher flows from one ``.h5`` store, one ``.pkl`` file or a directory.

    A directory contributes every ``*.h5`` and ``*.pkl`` file directly inside it, in sorted name
    order (``*.partial`` files are ignored), and must hold the flows of one teacher, each pair once:
    its stores must share one ``manifest["teacher"]`` fingerprint, stores are not mixed with
    published pickles (whose teacher is unknown), and no pair key may appear in more than one file
    (e.g. the published LDR_ALDK pickles, split over several files, are fine). Otherwise
    :class:`TeacherFlowError` lists the conflicting files: pass one file with
    ``--pretrained_flow_path FILE``. Stores are indexed at construction and opened lazily per
    process (picklable for DataLoader workers); pickles are loaded into memory with
    :func:`safe_load_flow_pickle`. :meth:`get` returns float32 ``(3, X, Y, Z)`` voxel displacements.
    """

    def __init__(self, path, image_size):
        self.path = os.fspath(path)
        self.image_size = _image_size(image_size)
        if os.path.isdir(self.path):
            files = [os.path.join(self.path, name) for name in sorted(os.listdir(self.path))
                     if name.endswith((".h5", ".pkl"))
                     and os.path.isfile(os.path.join(self.path, name))]
            if not files:
                raise TeacherFlowError(f"{self.path}: no teacher-flow files (*.h5 store or *.pkl)")
        elif os.path.exists(self.path):
            files = [self.path]
        else:
            raise TeacherFlowError(f"{self.path}: no such file or directory")

        self._files = []      # (path, kind)
        self._manifests = []  # dict for stores, None for pickles
        self._counts = []
        self._pickles = {}    # source index -> dict of arrays
        self._index = {}      # key -> source index (later files win)
        for i, file in enumerate(files):
            kind = _kind(file)
            if kind == "h5":
                with _open_h5(file, "r") as handle:
                    manifest = _read_manifest(handle, file)
                    flows = handle["flows"]
                    keys = [k for k in flows if _is_complete(flows[k])]
                stored = manifest.get("image_size")
                if stored is not None and list(stored) != list(self.image_size):
                    raise TeacherFlowError(f"{file}: store holds flows of image size {tuple(stored)}, "
                                           f"expected {self.image_size}")
            else:
                data = safe_load_flow_pickle(file)
                self._pickles[i] = data
                manifest, keys = None, list(data)
            self._files.append((file, kind))
            self._manifests.append(manifest)
            self._counts.append(len(keys))
            for key in keys:
                self._index.setdefault(key, i)
            self._refuse_mixing(i, keys)
        self._pid = os.getpid()
        self._handles = {}

    def _teacher(self, i: int) -> str:
        """What identifies the teacher of source ``i``: its store's fingerprint, or the published pickles."""
        if self._manifests[i] is None:
            return "published LDR_ALDK pickles (teacher unknown)"
        return json.dumps(self._manifests[i].get("teacher"), sort_keys=True)

    def _refuse_mixing(self, i: int, keys) -> None:
        """Refuse a directory whose file ``i`` comes from another teacher than the files before it,
        or repeats one of their pair keys."""
        if i == 0:
            return
        names = lambda sources: ", ".join(os.path.basename(self._files[j][0]) for j in sources)  # noqa: E731
        advice = "a folder must hold one teacher's flows, each pair once: pass one file with --pretrained_flow_path FILE"
        others = [j for j in range(i) if self._teacher(j) != self._teacher(i)]
        if others:
            raise TeacherFlowError(f"{self.path}: teacher-flow files of different teachers: "
                                   f"{os.path.basename(self._files[i][0])} vs {names(others)} (teacher fingerprints "
                                   f"{self._teacher(i)[:80]} vs {self._teacher(others[0])[:80]}); {advice}")
        repeated = [key for key in keys if self._index[key] != i]
        if repeated:
            first = sorted({self._index[key] for key in repeated})
            raise TeacherFlowError(f"{self.path}: pair '{repeated[0]}'"
                                   + (f" (and {len(repeated) - 1} more)" if len(repeated) > 1 else "")
                                   + f" is in both {names(first)} and {os.path.basename(self._files[i][0])}; "
                                   f"{advice}")

    # ---- index -----------------------------------------------------------------------------

    def keys(self) -> list:
        return sorted(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key) -> bool:
        return key in self._index

    def sources(self) -> list:
        """``[(file_path, n_keys, manifest_or_None), ...]`` in reading order."""
        return [(file, n, manifest) for (file, _), n, manifest
                in zip(self._files, self._counts, self._manifests)]

    # ---- reading ---------------------------------------------------------------------------

    def _handle(self, i: int) -> h5py.File:
        if self._pid != os.getpid():  # forked worker: never reuse the parent's HDF5 handles
            self._pid = os.getpid()
            self._handles = {}
        handle = self._handles.get(i)
        if handle is None:
            handle = self._handles[i] = _open_h5(self._files[i][0], "r")
        return handle

    def get(self, key: str) -> np.ndarray:
        """Teacher flow of pair ``key`` as float32 ``(3, X, Y, Z)`` voxel displacements."""
        i = self._index.get(key) if isinstance(key, str) else None
        if i is None:
            raise TeacherFlowError(f"{self.path}: no teacher flow for pair '{key}'")
        file, kind = self._files[i]
        if kind == "h5":
            expected = (3,) + self.image_size
            try:
                dataset = self._handle(i)["flows"][key]
                shape = tuple(dataset.shape)
                if shape == expected:
                    flow = dataset[()].astype(np.float32)
            except (OSError, KeyError, ValueError) as exc:
                raise TeacherFlowError(f"{file}: cannot read teacher flow for pair '{key}' "
                                       f"({_one_line(exc)})") from None
        else:
            expected = self.image_size + (3,)
            array = self._pickles[i][key]
            shape = tuple(array.shape)
            if shape == expected:
                flow = np.ascontiguousarray(array.transpose(3, 0, 1, 2), dtype=np.float32)
        if shape != expected:
            raise TeacherFlowError(f"{file}: teacher flow for pair '{key}' has shape {shape}, "
                                   f"expected {expected}")
        if not np.isfinite(flow).all():
            raise TeacherFlowError(f"{file}: teacher flow for pair '{key}' contains NaN/inf")
        return flow

    # ---- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the HDF5 handles this process opened (they are reopened on demand)."""
        if self._pid == os.getpid():
            for handle in self._handles.values():
                handle.close()
        self._handles = {}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_pid=None, _handles={})
        return state
