"""Reader for the RCN dataset layout (one JSON config + HDF5 files), pair generation and loaders.

JSON config (``datasets/liver.json``, ``datasets/brain.json``)::

    files:    {prefix: {"type": "HDF5", "path": "datasets/x.h5"}, ...}   ("/" is the default prefix)
    subsets:  {subset name: ["prefix/key", ...]}
    schemes:  {split name: {subset name: fraction}}     ("1" train, "2" validation, "sliver", ...)
    image_size (optional), image_type (optional), segmentation_class_value (optional), atlas (optional)

Each HDF5 group holds ``volume`` (uint8 ``(X, Y, Z)``, 0..255), optional ``segmentation``
(``(X, Y, Z)``, 0/255 or label values) and optional ``point`` (``(N, 3)`` voxel coordinates,
rows of -1 mark missing landmarks). Values are checked (:meth:`RCNDataset.validate` samples a
few entries per file, every load checks its entry): a volume must be 0..255 (not normalised to 0..1,
not Hounsfield units) and not constant, segmentation values integers >= 0, landmarks inside the
volume; a violation is a one-line :class:`DatasetError` naming the file, the entry and the problem.

Entry lookup follows RCN's FileManager: for entry ``"a/b/c"``, if ``"a"`` is a prefix in ``files``
the key ``"b/c"`` is read from that file; otherwise, if ``"/"`` is a prefix, the full key
``"a/b/c"`` is read from the default file. The scan id is the entry with ``/`` replaced by ``_``.

Pairs are ``(fixed_entry, moving_entry)``: image 1 is fixed, image 2 is moving (docs/conventions.md).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_util.interface import DatasetError, RegistrationDataset

DEFAULT_POINTS = 6
VALUE_SAMPLE = 3  # entries per file whose values validate() reads


def _shown(value, limit: int = 60) -> str:
    """A JSON value for an error message: its JSON text (shortened) and its JSON type."""
    kinds = {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer", float: "number",
             type(None): "null"}
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{text} ({kinds.get(type(value), type(value).__name__)})"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def scan_id(entry: str) -> str:
    """RCN scan id of an entry: ``"yanx/10"`` -> ``"yanx_10"``."""
    return entry.replace("/", "_")


def landmark_mask(points):
    """True for valid landmark rows of ``points`` ``(..., N, 3)``; rows equal to -1 are missing."""
    return ~(points == -1).all(-1)


# ----------------------------------------------------------------------------------------------
# pair spaces: the ordered pair list of one subset, indexable without materialising it
# ----------------------------------------------------------------------------------------------

class _PairSpace:
    """Ordered pairs of one subset in RCN order; ``pair(k)`` computes the k-th pair lazily.

    ``mode`` is ``"all"`` (for i: for j != i: (e_i, e_j)), ``"paired"`` ((e1, e2), (e2, e1),
    (e3, e4), ...; a trailing odd entry is dropped) or ``"atlas"`` ((atlas, e) for each e != atlas).
    """

    def __init__(self, entries, mode: str, atlas: str | None = None):
        self.mode = mode
        self.atlas = atlas
        if mode == "atlas":
            entries = [e for e in entries if e != atlas]
        self.entries = list(entries)
        n = len(self.entries)
        if mode == "all":
            self.size = n * (n - 1)
        elif mode == "paired":
            self.size = 2 * (n // 2)
        else:
            self.size = n

    def __len__(self) -> int:
        return self.size

    def pair(self, k: int) -> tuple:
        e = self.entries
        if self.mode == "all":
            i, j = divmod(int(k), len(e) - 1)
            return e[i], e[j + (j >= i)]
        if self.mode == "paired":
            a, b = e[2 * (k // 2)], e[2 * (k // 2) + 1]
            return (a, b) if k % 2 == 0 else (b, a)
        return self.atlas, e[k]

    def all_pairs(self) -> list:
        return [self.pair(k) for k in range(self.size)]


# ----------------------------------------------------------------------------------------------
# the dataset config
# ----------------------------------------------------------------------------------------------

class RCNDataset(RegistrationDataset):
    """An RCN dataset config with lazily opened HDF5 files.

    Args:
        json_path: the JSON config.
        paired: pair adjacent entries in both directions (RCN ``--paired``, LSPIG).
        check_files: validate at construction that every HDF5 file opens and every entry exists
            with a 3-D ``volume`` of the common shape, numeric dtypes and an ``(N, 3)`` ``point``
            (metadata), and that the values of a few entries per file fit the layout (see
            :meth:`validate`). ``False`` only parses the JSON.
        splits: restrict that validation to the subsets used by these schemes (e.g. ``["sliver"]``
            when only the SLIVER file is present); ``None`` validates every subset and the atlas.
        cache_size: raw scans kept per process (useful because all-pairs order reuses the fixed scan).

    Attributes: ``json_path``, ``files`` (prefix -> absolute HDF5 path), ``subsets`` (name -> entries),
    ``schemes`` (split -> {subset: fraction}), ``scheme_names``, ``image_size`` (tuple or None),
    ``image_type``, ``segmentation_class_value`` (dict or None), ``atlas`` (entry or None),
    ``paired``, ``n_points`` (landmark count used by :class:`PairDataset`).
    """

    def __init__(self, json_path, paired: bool = False, check_files: bool = True, splits=None,
                 cache_size: int = 4):
        self.json_path = os.path.abspath(os.fspath(json_path))
        self.paired = bool(paired)
        self.cache_size = int(cache_size)
        config = self._read_json()
        self._parse(config)
        self._pid = None
        self._handles = {}
        self._cache = OrderedDict()
        self.n_points = DEFAULT_POINTS
        if check_files:
            self.validate(splits)

    # ---- config parsing ------------------------------------------------------------------------

    def _error(self, message: str) -> DatasetError:
        return DatasetError(f"{self.json_path}: {message}")

    def _read_json(self) -> dict:
        if not os.path.isfile(self.json_path):
            raise DatasetError(f"{self.json_path}: dataset config not found")
        try:
            with open(self.json_path, "r", encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{self.json_path}: invalid JSON ({exc})") from None
        except OSError as exc:
            raise DatasetError(f"{self.json_path}: cannot read dataset config ({exc})") from None
        if not isinstance(config, dict):
            raise DatasetError(f"{self.json_path}: invalid config, expected a JSON object")
        missing = [k for k in ("files", "subsets", "schemes") if k not in config]
        if missing:
            raise DatasetError(f"{self.json_path}: missing key(s) {missing} in dataset config")
        return config

    def _parse(self, config: dict) -> None:
        if not isinstance(config["files"], dict) or not config["files"]:
            raise self._error("'files' must be a non-empty object prefix -> {type, path}")
        self._unresolved = {}
        self.files = {prefix: self._resolve(prefix, spec) for prefix, spec in config["files"].items()}
        if not isinstance(config["subsets"], dict):
            raise self._error(f"'subsets' must be an object subset name -> list of entries, "
                              f"got {_shown(config['subsets'])}")
        self.subsets = {}
        for name, entries in config["subsets"].items():
            if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
                raise self._error(f"subset '{name}' must be a list of entry strings, got {_shown(entries)}")
            self.subsets[name] = list(entries)
        if not isinstance(config["schemes"], dict):
            raise self._error(f"'schemes' must be an object split name -> {{subset: fraction}}, "
                              f"got {_shown(config['schemes'])}")
        self.schemes = {}
        for split, scheme in config["schemes"].items():
            if not isinstance(scheme, dict) or not scheme:
                raise self._error(f"scheme '{split}' must be a non-empty object subset -> fraction, "
                                  f"got {_shown(scheme)}")
            unknown = [s for s in scheme if s not in self.subsets]
            if unknown:
                raise self._error(f"scheme '{split}' uses unknown subset(s) {unknown}; "
                                  f"available: {sorted(self.subsets)}")
            for subset, fraction in scheme.items():
                if not _is_number(fraction) or fraction < 0:
                    raise self._error(f"scheme '{split}': fraction of subset '{subset}' must be a number "
                                      f">= 0, got {_shown(fraction)}")
            self.schemes[str(split)] = {s: float(f) for s, f in scheme.items()}
        size = config.get("image_size")
        if size is not None and (not isinstance(size, list) or len(size) != 3
                                 or not all(_is_int(v) and v > 0 for v in size)):
            raise self._error(f"'image_size' must be a list of 3 positive integers, got {_shown(size)}")
        self.image_size = tuple(int(s) for s in size) if size is not None else None
        for key in ("image_type", "atlas", "task"):
            if config.get(key) is not None and not isinstance(config[key], str):
                raise self._error(f"'{key}' must be a string, got {_shown(config[key])}")
        self.image_type = config.get("image_type")
        classes = config.get("segmentation_class_value")
        if classes is not None and (not isinstance(classes, dict) or not all(
                _is_int(v) and v >= 0 for v in classes.values())):
            raise self._error(f"'segmentation_class_value' must be an object class name -> integer label "
                              f"value >= 0, got {_shown(classes)}")
        self.segmentation_class_value = classes
        self.atlas = config.get("atlas")
        self.task = config.get("task", "registration")

    def _resolve(self, prefix: str, spec) -> str:
        if not isinstance(spec, dict) or "path" not in spec:
            raise self._error(f"files['{prefix}'] must be an object with a 'path'")
        kind = spec.get("type", "HDF5")
        if str(kind).upper() != "HDF5":
            raise self._error(f"files['{prefix}'] has unsupported type '{kind}' (only HDF5)")
        if not isinstance(spec["path"], str) or not spec["path"]:
            raise self._error(f"files['{prefix}'].path must be a file path string, got {_shown(spec['path'])}")
        path = os.path.expanduser(spec["path"])
        if os.path.isabs(path):
            return path
        candidates = [os.path.normpath(os.path.abspath(path)),
                      os.path.normpath(os.path.join(os.path.dirname(self.json_path), path))]
        for candidate in candidates:
            if os.path.exists(candidate):
                return candidate
        self._unresolved[candidates[0]] = f"files['{prefix}'] = '{spec['path']}'; looked in {candidates}"
        return candidates[0]

    @property
    def scheme_names(self) -> list:
        """Split names defined by ``schemes`` (e.g. ``["1", "2", "sliver", "lits", "lspig"]``)."""
        return list(self.schemes)

    def scheme(self, split) -> dict:
        """``{subset: fraction}`` of ``split`` (int or str); unknown names raise :class:`DatasetError`."""
        key = str(split)
        if key not in self.schemes:
            raise self._error(f"unknown scheme/split '{split}'; available: {self.scheme_names}")
        return self.schemes[key]

    # ---- entry lookup --------------------------------------------------------------------------

    def locate(self, entry: str) -> tuple:
        """``(hdf5_path, key)`` of an entry, following RCN's FileManager lookup."""
        prefix, sep, rest = entry.partition("/")
        if sep and prefix in self.files:
            return self.files[prefix], rest
        if "/" in self.files:
            return self.files["/"], entry
        raise self._error(f"entry '{entry}': prefix '{prefix}' is not in 'files' and there is no "
                          f"default '/' file; prefixes: {sorted(self.files)}")

    def _open(self, path: str) -> h5py.File:
        if not os.path.isfile(path):
            raise self._error(f"HDF5 file not found: {self._unresolved.get(path, path)}")
        try:
            return h5py.File(path, "r")
        except (OSError, ValueError) as exc:
            raise self._error(f"cannot open HDF5 file {path} (corrupt or unreadable: {exc})") from None

    def _file(self, path: str) -> h5py.File:
        """Per-process cached read-only handle (safe in DataLoader workers: reopened after fork)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._handles = {}
            self._cache = OrderedDict()
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = self._open(path)
        return handle

    def close(self) -> None:
        """Close the HDF5 handles this process opened."""
        if self._pid == os.getpid():
            for handle in self._handles.values():
                handle.close()
        self._handles = {}
        self._cache = OrderedDict()

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_pid=None, _handles={}, _cache=OrderedDict())
        return state

    # ---- validation (metadata and a sample of the values) ----------------------------------------

    def validate(self, splits=None) -> None:
        """Check files, keys, shapes, dtypes and landmark layouts of the entries used by ``splits``.

        Reads HDF5 metadata of every entry, plus, as a cheap sample, the full values (see
        :meth:`_check_values`) of up to :data:`VALUE_SAMPLE` entries per file (first, middle, last);
        every entry's values are checked again when it is loaded. Sets ``image_size`` (from the
        first volume if the JSON has none) and ``n_points`` (the largest landmark count found, 6 if none).
        """
        if isinstance(splits, (str, int)):
            splits = [splits]
        if splits is None:
            names = list(self.subsets)
        else:
            names = list(dict.fromkeys(s for split in splits for s in self.scheme(split)))
        by_file = OrderedDict()
        if self.atlas is not None:
            by_file.setdefault(self.locate(self.atlas)[0], []).append(("atlas", self.atlas))
        for name in names:
            for entry in self.subsets[name]:
                by_file.setdefault(self.locate(entry)[0], []).append((f"subset '{name}'", entry))
        counts = []
        for path, items in by_file.items():
            with self._open(path) as handle:
                for where, entry in items:
                    counts.append(self._check_entry(handle, path, where, entry))
                unique = list(dict.fromkeys(entry for _, entry in items))
                picks = sorted({0, len(unique) // 2, len(unique) - 1})[:VALUE_SAMPLE]
                for entry in [unique[i] for i in picks]:
                    self._check_sample(handle, path, entry)
        counts = [c for c in counts if c is not None]
        self.n_points = max(counts) if counts else DEFAULT_POINTS

    def _check_entry(self, handle, path, where, entry):
        key = self.locate(entry)[1]
        context = f"{where} entry '{entry}'"
        try:
            group = handle[key] if key in handle else None
        except (KeyError, OSError, ValueError) as exc:
            raise self._error(f"{context}: cannot read key '{key}' in HDF5 file {path} ({exc})") from None
        if group is None:
            raise self._error(f"{context}: key '{key}' not found in HDF5 file {path}")
        if not isinstance(group, h5py.Group) or "volume" not in group:
            raise self._error(f"{context}: HDF5 group '{key}' in {path} has no 'volume' dataset")
        for name in ("volume", "segmentation", "point"):
            if name in group:
                if not isinstance(group[name], h5py.Dataset):
                    raise self._error(f"{context}: '{name}' in {path} is not an HDF5 dataset")
                self._check_dtype(group[name].dtype, name, f"{context}: '{name}' in {path}")
        shape = tuple(group["volume"].shape)
        self._check_shape(shape, f"{context}: 'volume' in {path}")
        if "segmentation" in group and tuple(group["segmentation"].shape) != shape:
            raise self._error(f"{context}: 'segmentation' in {path} has shape "
                              f"{tuple(group['segmentation'].shape)}, volume has {shape}")
        if "point" in group:
            return self._check_points(tuple(group["point"].shape), f"{context}: 'point' in {path}")
        return None

    def _check_sample(self, handle, path, entry):
        group = handle[self.locate(entry)[1]]
        try:
            raw = {name: group[name][()] for name in ("volume", "segmentation", "point") if name in group}
        except (OSError, ValueError, KeyError) as exc:
            raise self._error(f"entry '{entry}': cannot read group '{self.locate(entry)[1]}' in {path} "
                              f"({exc})") from None
        self._check_values(raw, f"entry '{entry}' in {path}")

    def _check_dtype(self, dtype, name, context):
        if dtype.kind not in ("fiub" if name == "segmentation" else "fiu"):
            layout = {"volume": "uint8 0..255", "segmentation": "0/255 or integer label values",
                      "point": "float voxel coordinates"}[name]
            raise self._error(f"{context} has dtype {dtype}; the RCN layout stores {layout}")

    def _check_shape(self, shape, context):
        if len(shape) != 3:
            raise self._error(f"{context} must be 3-D, got shape {shape}")
        if self.image_size is None:
            self.image_size = shape
        elif shape != tuple(self.image_size):
            raise self._error(f"{context} has shape {shape}, expected image_size {tuple(self.image_size)}")

    def _check_points(self, shape, context) -> int:
        if len(shape) != 2 or shape[1] != 3:
            raise self._error(f"{context} must have shape (N, 3), got {shape}")
        return shape[0]

    def _check_values(self, raw, context) -> None:
        """Refuse values the RCN layout cannot hold (one line naming ``context`` and the problem):
        NaN/inf anywhere; a volume outside 0..255 (e.g. CT in Hounsfield units), a float volume in
        0..1 (already normalised), an all-zero or constant volume; non-integer or negative
        segmentation values; landmarks outside the volume (rows of -1 mark missing ones)."""
        for name in ("volume", "segmentation", "point"):
            value = raw.get(name)
            if value is not None:
                self._check_dtype(value.dtype, name, f"{context}: '{name}'")
                if value.dtype.kind == "f" and not np.isfinite(value).all():
                    raise self._error(f"{context}: '{name}' contains NaN or inf")
        volume = raw["volume"]
        if volume.size:
            lo, hi = volume.min(), volume.max()
            if lo < 0 or hi > 255:
                raise self._error(f"{context}: 'volume' has values {lo:g}..{hi:g} ({volume.dtype}), outside the "
                                  f"0..255 the RCN layout stores (e.g. CT in Hounsfield units); convert the scans "
                                  f"with convert_dataset.py")
            if lo == hi:
                what = "all zero" if hi == 0 else f"constant ({hi:g} everywhere)"
                raise self._error(f"{context}: 'volume' is {what}; an empty or blank scan cannot be registered")
            if volume.dtype.kind == "f" and hi <= 1:
                raise self._error(f"{context}: 'volume' is float with values {lo:g}..{hi:g}: it looks normalised, "
                                  f"but the RCN layout stores 0..255 (networks see volume/255); store "
                                  f"rint(255 * volume) as uint8 or convert the scans with convert_dataset.py")
        seg = raw.get("segmentation")
        if seg is not None and seg.size and seg.dtype.kind == "f":
            off = np.abs(seg - np.rint(seg)) > 1e-3
            if off.any():
                raise self._error(f"{context}: 'segmentation' has non-integer values (e.g. {seg[off][0]:g}); "
                                  f"segmentations must be 0/255 masks or integer label values (resample them "
                                  f"with nearest-neighbour interpolation)")
        if seg is not None and seg.size and seg.dtype.kind in "fi" and seg.min() < 0:
            raise self._error(f"{context}: 'segmentation' has negative values (e.g. {seg.min():g}); segmentations "
                              f"must be 0/255 masks or integer label values >= 0")
        points = raw.get("point")
        if points is not None and points.ndim == 2 and points.shape[1] == 3 and points.size:
            size = np.asarray(volume.shape[:3], dtype=np.float64)
            present = ~(points == -1).all(1)
            outside = present & ((points < -0.5) | (points > size - 0.5)).any(1)
            if outside.any():
                i = int(np.flatnonzero(outside)[0])
                where = ", ".join(f"{v:g}" for v in points[i])
                more = f" (and {int(outside.sum()) - 1} more)" if outside.sum() > 1 else ""
                raise self._error(f"{context}: landmark point {i} ({where}) lies outside the volume of shape "
                                  f"{tuple(volume.shape)}{more}; points are voxel coordinates within "
                                  f"[-0.5, size-0.5] per axis, rows of -1 mark missing landmarks")

    # ---- reading -------------------------------------------------------------------------------

    def _read_raw(self, entry: str) -> dict:
        path, key = self.locate(entry)
        handle = self._file(path)
        if key not in handle:
            raise self._error(f"entry '{entry}': key '{key}' not found in HDF5 file {path}")
        group = handle[key]
        if not isinstance(group, h5py.Group) or "volume" not in group:
            raise self._error(f"entry '{entry}': HDF5 group '{key}' in {path} has no 'volume' dataset")
        try:
            raw = {name: group[name][()] for name in ("volume", "segmentation", "point") if name in group}
        except (OSError, ValueError, KeyError) as exc:
            raise self._error(f"entry '{entry}': cannot read group '{key}' in {path} ({exc})") from None
        self._check_raw(raw, entry, path)
        return raw

    def _check_raw(self, raw, entry, path):
        context = f"entry '{entry}' in {path}"
        volume = raw["volume"]
        self._check_shape(tuple(volume.shape), f"{context}: 'volume'")
        if "segmentation" in raw and raw["segmentation"].shape != volume.shape:
            raise self._error(f"{context}: 'segmentation' shape {raw['segmentation'].shape} "
                              f"differs from volume shape {volume.shape}")
        if "point" in raw:
            self._check_points(tuple(raw["point"].shape), f"{context}: 'point'")
        self._check_values(raw, context)

    def load(self, entry: str) -> dict:
        """Read one scan.

        Returns ``{"id": str, "volume": float32 (X, Y, Z) in 0..255 as stored,
        "segmentation": float32 (X, Y, Z) raw stored values or None,
        "point": float32 (N, 3) voxel coordinates (-1 rows = missing) or None}``.
        Fresh arrays each call (the per-process cache keeps only the raw stored arrays).
        """
        self._file(self.locate(entry)[0])  # resets the cache after a fork
        raw = self._cache.get(entry)
        if raw is None:
            raw = self._read_raw(entry)
            self._cache[entry] = raw
            while len(self._cache) > max(self.cache_size, 0):
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(entry)
        as_float = lambda name: raw[name].astype(np.float32) if name in raw else None  # noqa: E731
        return {"id": scan_id(entry), "volume": as_float("volume"),
                "segmentation": as_float("segmentation"), "point": as_float("point")}

    # ---- pairs ---------------------------------------------------------------------------------

    def _space(self, subset: str) -> _PairSpace:
        if self.atlas is not None:
            return _PairSpace(self.subsets[subset], "atlas", self.atlas)
        return _PairSpace(self.subsets[subset], "paired" if self.paired else "all")

    def pairs(self, split) -> list:
        """Ordered ``(fixed_entry, moving_entry)`` pairs of a scheme (evaluation order).

        Subsets are concatenated in scheme order. Atlas mode: ``(atlas, scan)`` per scan (the atlas
        itself skipped); ``paired``: ``(e1, e2), (e2, e1), (e3, e4), ...``; otherwise all ordered
        pairs ``(e_i, e_j), i != j`` in RCN order (for i: for j).
        """
        return [p for subset in self.scheme(split) for p in self._space(subset).all_pairs()]

    def keyed_pairs(self, split, keys) -> list:
        """The pairs of ``split`` named by pair keys ``"<fixed id>-<moving id>"`` (teacher-flow stores).

        Keys naming scans outside the split, or pairs the split would not form (another subset, not
        adjacent with ``paired``, not from the atlas), are skipped. Returned in sorted key order.
        """
        spaces = [self._space(subset) for subset in self.scheme(split)]
        where = {}
        for s, space in enumerate(spaces):
            for position, entry in enumerate(space.entries):
                where.setdefault(scan_id(entry), (s, position, entry))
        atlas_id = scan_id(self.atlas) if self.atlas is not None else None
        out = []
        for key in sorted(keys):
            for cut in (i for i, ch in enumerate(key) if ch == "-"):
                a, b = key[:cut], key[cut + 1:]
                if b not in where or (a not in where and a != atlas_id):
                    continue
                s, j, moving = where[b]
                mode = spaces[s].mode
                if mode == "atlas":
                    ok = a == atlas_id
                    fixed = self.atlas
                else:
                    s_a, i, fixed = where[a]
                    ok = s_a == s and i != j and (mode == "all" or i // 2 == j // 2)
                if ok:
                    out.append((fixed, moving))
                    break
        return out

    def num_pairs(self, split) -> int:
        """``len(pairs(split))`` without building the list."""
        return sum(len(self._space(subset)) for subset in self.scheme(split))

    def _sampling_spaces(self, split):
        scheme = self.scheme(split)
        items = [(self._space(s), f) for s, f in scheme.items() if f > 0]
        items = [(space, f) for space, f in items if len(space) > 0]
        if not items:
            raise self._error(f"scheme '{split}' has no pairs to sample (empty subsets or zero fractions)")
        spaces, fractions = zip(*items)
        fractions = np.asarray(fractions, dtype=np.float64)
        return list(spaces), fractions / fractions.sum()

    def loader(self, split, batch_size: int = 1, loop: bool = False, num_workers: int = 0, seed: int = 0,
               limit: int | None = None, pairs=None, teacher_flows=None) -> DataLoader:
        """:func:`make_loader` over this dataset (the :class:`RegistrationDataset` interface)."""
        return make_loader(self, split, batch_size, loop=loop, num_workers=num_workers, seed=seed, limit=limit,
                           pairs=pairs, teacher_flows=teacher_flows)

    def batch_iterator(self, split, batch_size: int, seed: int = 0):
        """Infinite iterator of training batches, each a list of ``batch_size`` pairs (RCN style).

        Per batch, the counts per subset are drawn multinomially from the scheme fractions; each
        subset walks through a fresh random permutation of its pair list, reshuffled when exhausted
        (so every pair is seen once per pass). Deterministic for a seed.
        """
        rng = np.random.default_rng(seed)
        spaces, probs = self._sampling_spaces(split)
        orders = [rng.permutation(len(space)) for space in spaces]
        cursors = [0] * len(spaces)
        while True:
            batch = []
            for s, count in enumerate(rng.multinomial(batch_size, probs)):
                for _ in range(count):
                    if cursors[s] == len(orders[s]):
                        orders[s], cursors[s] = rng.permutation(len(spaces[s])), 0
                    batch.append(spaces[s].pair(int(orders[s][cursors[s]])))
                    cursors[s] += 1
            yield batch


# ----------------------------------------------------------------------------------------------
# torch side
# ----------------------------------------------------------------------------------------------

def _fit_points(points, n: int) -> np.ndarray:
    out = np.full((n, 3), -1.0, dtype=np.float32)
    if points is not None:
        k = min(n, points.shape[0])
        out[:k] = points[:k]
    return out


class PairDataset(Dataset):
    """Map-style dataset of registration pairs.

    ``dataset[i]`` uses ``pairs[i]``; ``dataset[(fixed_entry, moving_entry)]`` loads that pair
    directly (used by the infinite training sampler, in which case ``pairs`` may be ``None``).
    Each item is a dict:

    * ``voxel1``, ``voxel2``: float32 ``(1, X, Y, Z)``, ``volume / 255`` (fixed, moving);
    * ``seg1``, ``seg2``: float32 ``(1, X, Y, Z)``, raw stored values (0/255 or label values),
      zeros when absent; ``has_seg1``, ``has_seg2``: bool;
    * ``point1``, ``point2``: float32 ``(N, 3)`` voxel coordinates, ``N = dataset.n_points``
      (6 for the published data), padded/truncated, -1 rows = missing;
    * ``id1``, ``id2``: scan ids (``"yanx_10"``);
    * ``teacher_flow``: float32 ``(3, X, Y, Z)`` from ``teacher_flows`` (a
      :class:`data_util.teacher_flows.TeacherFlows`) under the key ``"<id1>-<id2>"``, when given.
    """

    def __init__(self, dataset: RCNDataset, pairs=None, teacher_flows=None):
        self.dataset = dataset
        self.pairs = list(pairs) if pairs is not None else None
        self.teacher_flows = teacher_flows

    def __len__(self) -> int:
        return len(self.pairs) if self.pairs is not None else 0

    def __getitem__(self, index):
        if isinstance(index, (tuple, list)):
            fixed, moving = index
        else:
            fixed, moving = self.pairs[index]
        item = {}
        for k, entry in ((1, fixed), (2, moving)):
            scan = self.dataset.load(entry)
            seg = scan["segmentation"]
            item[f"voxel{k}"] = torch.from_numpy(scan["volume"] / np.float32(255.0))[None]
            item[f"seg{k}"] = (torch.from_numpy(seg)[None] if seg is not None
                               else torch.zeros((1,) + scan["volume"].shape))
            item[f"has_seg{k}"] = seg is not None
            item[f"point{k}"] = torch.from_numpy(_fit_points(scan["point"], self.dataset.n_points))
            item[f"id{k}"] = scan["id"]
        if self.teacher_flows is not None:
            item["teacher_flow"] = torch.from_numpy(self.teacher_flows.get(f"{item['id1']}-{item['id2']}"))
        return item


class ListPairBatchSampler(Sampler):
    """Infinite batch sampler over an explicit pair list: a fresh random permutation per pass."""

    def __init__(self, pairs, batch_size: int, seed: int = 0):
        if not pairs:
            raise ValueError("no pairs to sample")
        self.pairs, self.batch_size, self.seed = list(pairs), batch_size, seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        order, cursor = rng.permutation(len(self.pairs)), 0
        while True:
            batch = []
            for _ in range(self.batch_size):
                if cursor == len(order):
                    order, cursor = rng.permutation(len(self.pairs)), 0
                batch.append(self.pairs[int(order[cursor])])
                cursor += 1
            yield batch


class RandomPairBatchSampler(Sampler):
    """Infinite batch sampler yielding lists of ``(fixed, moving)`` pairs (see
    :meth:`RCNDataset.batch_iterator`); use with ``DataLoader(PairDataset(ds), batch_sampler=...)``."""

    def __init__(self, dataset: RCNDataset, split, batch_size: int, seed: int = 0):
        dataset.scheme(split)
        self.dataset, self.split, self.batch_size, self.seed = dataset, split, batch_size, seed

    def __iter__(self):
        return self.dataset.batch_iterator(self.split, self.batch_size, self.seed)


def make_loader(dataset: RCNDataset, split, batch_size: int = 1, loop: bool = False,
                num_workers: int = 0, seed: int = 0, shuffle: bool = False,
                pin_memory: bool = False, limit: int | None = None, pairs=None,
                teacher_flows=None) -> DataLoader:
    """DataLoader of pair dicts (see :class:`PairDataset`; batched tensors get a leading ``B``).

    ``loop=True``: infinite random training loader (RCN sampling, deterministic for ``seed``).
    ``loop=False``: one finite pass over ``dataset.pairs(split)`` in order (``shuffle=True``
    permutes it once with ``seed``); the last batch may be smaller. ``limit`` keeps the first pairs.
    ``pairs``: use this ``(fixed, moving)`` list instead of the split's (both modes; ``loop`` then
    walks random permutations of it). ``teacher_flows``: attach ``teacher_flow`` to every item.
    """
    if loop:
        sampler = (RandomPairBatchSampler(dataset, split, batch_size, seed) if pairs is None
                   else ListPairBatchSampler(pairs, batch_size, seed))
        return DataLoader(PairDataset(dataset, teacher_flows=teacher_flows), batch_sampler=sampler,
                          num_workers=num_workers, pin_memory=pin_memory)
    pairs = dataset.pairs(split) if pairs is None else list(pairs)
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(pairs))
        pairs = [pairs[i] for i in order]
    if limit is not None:
        pairs = pairs[:limit]
    return DataLoader(PairDataset(dataset, pairs, teacher_flows), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, pin_memory=pin_memory)
