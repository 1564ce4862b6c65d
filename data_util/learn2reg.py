"""Learn2Reg-style datasets: NIfTI images + label maps + pairs files (e.g. L2R 2020 Task 4, hippocampus).

Two config layouts are read.

**Our format** (``"format": "learn2reg"``, see ``datasets/hippocampus.json``)::

    {"format": "learn2reg",
     "root": "../data/L2R_Task4_HippocampusMRI/Training",  # CWD-relative, else JSON-folder-relative
                                                           # (the one holding image files wins)
     "image": "img/hippocampus_{id:03d}.nii.gz",           # one field ``id``, relative to root
     "label": "label/hippocampus_{id:03d}.nii.gz",         # optional
     "labels": {"head": 1, "tail": 2},                     # scored label name -> value
     "crop": [64, 64, 64],                                 # optional centre crop / zero pad
     "normalisation": "l2r",                               # "l2r" (default) | "uint8" | "none"
     "splits": {"1": {"ids": "*", "exclude": ["2"]},
                "2": {"pairs": "hippocampus_pairs_val.csv"}}}

A split is ``{"ids": [...] | "*" | "ids.txt"}`` (``"*"``: every id found by globbing the image
template; a ``.txt`` file: one id per line, ``#`` comments; finite passes use all ordered pairs
``i != j``, training draws random pairs), optionally with ``"exclude": [split, ...]`` (drops the
scans used by those splits), or ``{"pairs": "pairs.csv" | "pairs.json" | [[fixed, moving], ...]}``.
Pairs/ids files are looked up relative to the JSON's folder first, then the CWD.

Pairs files: a CSV whose header has ``fixed`` and ``moving`` columns (names and values are
whitespace-stripped, so the challenge's ``fixed, moving`` header works), or JSON: a list of
``{"fixed": .., "moving": ..}`` objects (or ``[fixed, moving]`` lists), or an object holding such a
list under ``"registration_val"`` or ``"pairs"``. A value that looks like a path (has a ``/`` or ends
in ``.nii``/``.nii.gz``), as in the Learn2Reg 2021+ ``dataset.json``, becomes an id by taking its
file name and removing the image template's fixed prefix and suffix
(``./imagesTr/hippocampus_311.nii.gz`` -> ``311``); a name that does not fit the template loses
only its ``.nii``/``.nii.gz`` extension.

Ids are strings. An all-digit id is formatted as an int when the template's field has a format spec
(so ``{id:03d}`` works), as the string otherwise. Items keep ids in the form the pairs/ids list
uses (``"311"``); ids found by globbing are written without leading zeros when the template
reproduces the file name from the int (``hippocampus_001.nii.gz`` -> ``"1"``). Two ids are the same
scan when they name the same image file.

**Learn2Reg 2021+ ``*_dataset.json``** (keys ``training`` = list of ``{"image", "label"}`` and
``registration_val`` = list of ``{"fixed", "moving"}``, paths relative to the JSON's folder): ids are
the image file names without ``.nii.gz``; split ``"1"`` = the training images not used in
``registration_val``, split ``"2"`` = the ``registration_val`` pairs; scored labels = the
``labels`` entry (value -> name; background 0 dropped); no crop; ``l2r`` normalisation.

Preprocessing of a scan (:meth:`Learn2RegDataset.load`): normalise the whole image
(:func:`normalise`), then centre crop / zero pad it and its label map (:func:`crop_or_pad`). Arrays
stay in nibabel voxel order, so a flow ``(3, X, Y, Z)`` moves axis ``c`` with channel ``c`` (the
Learn2Reg displacement order). Image 1 is fixed, image 2 is moving. All errors are
:class:`~data_util.dataset.DatasetError` with one line naming the file.
"""
from __future__ import annotations

import csv
import glob
import json
import numbers
import os
import string
from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_util.dataset import DatasetError, ListPairBatchSampler, RCNDataset, make_loader
from data_util.image_io import ImageError, load_nifti, read_geometry
from data_util.synth_labels import SynthDataset, is_synth_config, make_synth_loader

FORMAT = "learn2reg"
NORMALISATIONS = ("l2r", "uint8", "none")
DEFAULT_CACHE = 64
_NIFTI = (".nii.gz", ".nii")


# ----------------------------------------------------------------------------------------------
# array helpers
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# small parsing helpers
# ----------------------------------------------------------------------------------------------

def _id_sort_key(i: str):
    return (0, int(i), i) if i.isdigit() else (1, 0, i)


def _as_id(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DatasetError(f"{where}: an id must be an integer or a string, got {value!r}")
    text = str(value).strip()
    if not text:
        raise DatasetError(f"{where}: empty id")
    return text


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.lower().endswith(_NIFTI)


def _strip_nifti(name: str) -> str:
    for suffix in _NIFTI:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name


def _read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: {what} not found")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: invalid JSON ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read {what} ({exc})") from None


def _pair_records(data, path: str) -> list:
    """``[(fixed, moving), ...]`` raw values from a JSON pairs structure."""
    if isinstance(data, dict):
        for key in ("registration_val", "pairs"):
            if key in data:
                data = data[key]
                break
        else:
            raise DatasetError(f"{path}: pairs JSON object has neither 'registration_val' nor 'pairs'")
    if not isinstance(data, list):
        raise DatasetError(f"{path}: pairs must be a list of {{'fixed', 'moving'}} objects")
    out = []
    for n, record in enumerate(data):
        if isinstance(record, dict) and "fixed" in record and "moving" in record:
            out.append((record["fixed"], record["moving"]))
        elif isinstance(record, (list, tuple)) and len(record) == 2:
            out.append(tuple(record))
        else:
            raise DatasetError(f"{path}: pair {n} is not a {{'fixed', 'moving'}} object or a "
                               f"[fixed, moving] list: {str(record)[:60]}")
    return out


def read_pairs_csv(path: str) -> list:
    """Raw ``(fixed, moving)`` strings of a CSV with ``fixed`` and ``moving`` header columns."""
    try:
        with open(path, "r", encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DatasetError(f"{path}: pairs file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read pairs CSV ({exc})") from None
    rows = [(n + 1, [v.strip() for v in row]) for n, row in enumerate(rows) if any(v.strip() for v in row)]
    if not rows:
        raise DatasetError(f"{path}: empty pairs CSV (a 'fixed, moving' header is needed)")
    header = [h.lower() for h in rows[0][1]]
    for column in ("fixed", "moving"):
        if column not in header:
            raise DatasetError(f"{path}: no '{column}' column in the CSV header {rows[0][1]}")
    i, j = header.index("fixed"), header.index("moving")
    out = []
    for line, row in rows[1:]:
        if len(row) <= max(i, j) or not row[i] or not row[j]:
            raise DatasetError(f"{path}: line {line} lacks a fixed or moving value: {','.join(row)[:60]}")
        out.append((row[i], row[j]))
    return out


# ----------------------------------------------------------------------------------------------
# the dataset
# ----------------------------------------------------------------------------------------------

class Learn2RegDataset:
    """A Learn2Reg-style dataset (NIfTI files), see the module docstring for the config layouts.

    Args:
        json_path: our ``"format": "learn2reg"`` config or a Learn2Reg 2021+ ``*_dataset.json``.
        splits: splits :meth:`validate` checks at construction (``None``: all).
        check_files: run :meth:`validate` (headers only: files exist and are readable NIfTI,
            label shape = image shape, one common shape when there is no crop).
        crop: overrides the config's crop size (int or 3 ints).
        normalisation: overrides the config's ``"l2r"`` / ``"uint8"`` / ``"none"``.
        paired: accepted for :class:`RCNDataset` compatibility; must be ``False``.
        cache_size: scans kept in memory after :meth:`load` (LRU).

    Attributes: ``json_path``, ``root``, ``image_size`` (crop size, else the common shape once known),
    ``scheme_names``, ``segmentation_class_value`` (name -> value), ``label_values``, ``image_type``
    (``"learn2reg"``), ``crop``, ``normalisation``, ``paired`` (False), ``description``.
    """

    image_type = "learn2reg"
    paired = False
    atlas = None

    def __init__(self, json_path, splits=None, check_files: bool = True, crop=None, normalisation=None,
                 paired: bool = False, cache_size: int = DEFAULT_CACHE):
        self.json_path = os.path.abspath(os.fspath(json_path))
        if paired:
            raise DatasetError(f"{self.json_path}: paired=True (adjacent-pair mode) is for RCN HDF5 "
                               "datasets; a learn2reg dataset takes its pairs from its splits")
        self.cache_size = int(cache_size)
        self._cache = OrderedDict()
        self._folder = os.path.dirname(self.json_path)
        config = _read_json(self.json_path, "dataset config")
        if not isinstance(config, dict):
            raise self._error("invalid config, expected a JSON object")
        if config.get("format") == FORMAT:
            self._parse_ours(config)
        elif "training" in config and "registration_val" in config and config.get("format") is None:
            self._parse_l2r2021(config)
        else:
            raise self._error(f"not a learn2reg config ('format' is {config.get('format')!r}; expected "
                              f"'{FORMAT}', or Learn2Reg 'training' + 'registration_val' keys)")
        if crop is not None:
            self.crop = self._parse_crop(crop)
        if normalisation is not None:
            self.normalisation = self._parse_normalisation(normalisation)
        self.image_size = self.crop
        self.label_values = list(self.segmentation_class_value.values())
        if check_files:
            self.validate(splits)

    def _error(self, message: str) -> DatasetError:
        return DatasetError(f"{self.json_path}: {message}")

    def _parse_crop(self, crop):
        if crop is None:
            return None
        integer = lambda c: isinstance(c, numbers.Integral) and not isinstance(c, bool)  # noqa: E731
        if integer(crop):
            crop = [crop] * 3
        if not isinstance(crop, (list, tuple)) or len(crop) != 3 or not all(integer(c) and c > 0 for c in crop):
            raise self._error(f"'crop' must be 3 positive integers, got {crop!r}")
        return tuple(int(c) for c in crop)

    def _parse_normalisation(self, mode):
        if mode not in NORMALISATIONS:
            raise self._error(f"'normalisation' must be one of {list(NORMALISATIONS)}, got {mode!r}")
        return mode

    def _find(self, path: str) -> str:
        """A pairs/ids file: relative to the JSON's folder if it exists there, else to the CWD (the
        JSON-folder candidate when neither exists)."""
        path = os.path.expanduser(str(path))
        if os.path.isabs(path):
            return path
        by_json = os.path.normpath(os.path.join(self._folder, path))
        by_cwd = os.path.normpath(os.path.abspath(path))
        return by_cwd if not os.path.exists(by_json) and os.path.exists(by_cwd) else by_json

    def _find_root(self, root: str) -> str:
        """The data root: relative paths are tried against the CWD, then the JSON's folder; the first
        candidate holding files that match the image template wins, else the first that exists (so
        ``"root": "."`` next to the data works from any CWD), else the JSON-folder candidate."""
        root = os.path.expanduser(root)
        if os.path.isabs(root):
            return os.path.normpath(root)
        candidates = [os.path.normpath(os.path.abspath(root)), os.path.normpath(os.path.join(self._folder, root))]
        t = self._image
        pattern = glob.escape(t["prefix"]) + "*" + glob.escape(t["suffix"])
        for candidate in candidates:
            if os.path.isdir(candidate) and glob.glob(os.path.join(glob.escape(candidate), pattern)):
                return candidate
        for candidate in candidates:
            if os.path.isdir(candidate):
                return candidate
        return candidates[1]

    # ---- our format ---------------------------------------------------------------------------

    def _template(self, template, key: str):
        if not isinstance(template, str):
            raise self._error(f"'{key}' must be a path template string with one {{id}} field")
        try:
            parts = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise self._error(f"'{key}' template {template!r} is malformed ({exc})") from None
        fields = [(n, p) for n, p in enumerate(parts) if p[1] is not None]
        if len(fields) != 1 or fields[0][1][1] != "id" or fields[0][1][3]:
            raise self._error(f"'{key}' template {template!r} must have exactly one field {{id}} "
                              "(e.g. 'img/hippocampus_{id:03d}.nii.gz')")
        n = fields[0][0]
        prefix = "".join(p[0] for p in parts[:n + 1])
        suffix = "".join(p[0] for p in parts[n + 1:])
        if "{" in prefix + suffix or "}" in prefix + suffix:
            raise self._error(f"'{key}' template {template!r}: braces other than the {{id}} field")
        return {"template": template, "spec": fields[0][1][2] or "", "prefix": prefix, "suffix": suffix}

    def _format(self, template: dict, id_: str) -> str:
        value = int(id_) if id_.isdigit() and template["spec"] else id_
        try:
            name = template["template"].format(id=value)
        except (ValueError, TypeError) as exc:
            raise self._error(f"id '{id_}' does not fit the template {template['template']!r} ({exc})") from None
        return os.path.join(self.root, name)

    def _canonical(self, text: str) -> str:
        """The id string for a matched file-name middle part (leading zeros dropped when the template
        reproduces the name from the int)."""
        t = self._image
        if text.isdigit() and t["spec"]:
            try:
                if format(int(text), t["spec"]) == text:
                    return str(int(text))
            except ValueError:
                pass
        return text

    def _glob_ids(self) -> list:
        t = self._image
        pattern = os.path.join(glob.escape(self.root), glob.escape(t["prefix"]) + "*" + glob.escape(t["suffix"]))
        start = len(os.path.join(self.root, t["prefix"]))
        ids = []
        for path in glob.glob(pattern):
            middle = path[start:len(path) - len(t["suffix"])] if t["suffix"] else path[start:]
            if middle and not os.path.basename(middle).startswith(".") and "/" not in middle:
                ids.append(self._canonical(middle))
        return sorted(set(ids), key=_id_sort_key)

    def _value_to_id(self, value, where: str) -> str:
        text = _as_id(value, where)
        if not _looks_like_path(text):
            return text
        name = os.path.basename(text.replace("\\", "/"))
        if self._mode == "list":
            return _strip_nifti(name)
        prefix = os.path.basename(self._image["prefix"])
        suffix = self._image["suffix"]
        if "/" not in suffix and name.startswith(prefix) and name.endswith(suffix) \
                and len(name) > len(prefix) + len(suffix):
            return self._canonical(name[len(prefix):len(name) - len(suffix)])
        return _strip_nifti(name)

    def _read_ids_file(self, path: str) -> list:
        try:
            with open(path, "r", encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            raise DatasetError(f"{path}: ids file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{path}: cannot read ids file ({exc})") from None
        out = []
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(self._value_to_id(line, path))
        return out

    def _read_pairs(self, spec, where: str):
        """``(pairs, source)`` from a pairs file name or an inline list."""
        if isinstance(spec, list):
            records, source = _pair_records(spec, where), where
        elif isinstance(spec, str):
            source = self._find(spec)
            if not os.path.isfile(source):
                raise DatasetError(f"{source}: pairs file not found ({where})")
            if source.lower().endswith(".json"):
                records = _pair_records(_read_json(source, "pairs file"), source)
            else:
                records = read_pairs_csv(source)
        else:
            raise self._error(f"{where}: 'pairs' must be a file name or a list of [fixed, moving]")
        pairs = [(self._value_to_id(f, source), self._value_to_id(m, source)) for f, m in records]
        if not pairs:
            raise DatasetError(f"{source}: no pairs listed")
        return pairs, source

    def _parse_ours(self, config: dict) -> None:
        self._mode = "template"
        if not isinstance(config.get("description", ""), str):
            raise self._error(f"'description' must be a string, got {config['description']!r}")
        self.description = str(config.get("description", ""))
        for key in ("root", "image", "splits"):
            if key not in config:
                raise self._error(f"missing key '{key}' in learn2reg config")
        if not isinstance(config["root"], str):
            raise self._error("'root' must be a folder path string")
        self._image = self._template(config["image"], "image")
        self.root = self._find_root(config["root"])
        self._label = self._template(config["label"], "label") if config.get("label") else None
        labels = config.get("labels", {})
        if not isinstance(labels, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                   for v in labels.values()):
            raise self._error("'labels' must be an object label name -> integer value")
        self.segmentation_class_value = {str(k): int(v) for k, v in labels.items()}
        self.crop = self._parse_crop(config.get("crop"))
        self.normalisation = self._parse_normalisation(config.get("normalisation", "l2r"))
        splits = config["splits"]
        if not isinstance(splits, dict) or not splits:
            raise self._error("'splits' must be a non-empty object split name -> {ids|pairs}")
        self._splits = {}
        raw = {}
        globbed = None
        for name, spec in splits.items():
            name = str(name)
            where = f"split '{name}'"
            if not isinstance(spec, dict) or ("ids" in spec) == ("pairs" in spec):
                raise self._error(f"{where} must be an object with either 'ids' or 'pairs'")
            exclude = spec.get("exclude", [])
            if not isinstance(exclude, list):
                raise self._error(f"{where}: 'exclude' must be a list of split names")
            if "pairs" in spec:
                pairs, source = self._read_pairs(spec["pairs"], f"{self.json_path} {where}")
                ids = list(dict.fromkeys(i for p in pairs for i in p))
            else:
                ids_spec, pairs = spec["ids"], None
                if ids_spec == "*":
                    if globbed is None:
                        globbed = self._glob_ids()
                    ids, source = list(globbed), os.path.join(self.root, self._image["template"])
                elif isinstance(ids_spec, str):
                    source = self._find(ids_spec)
                    ids = self._read_ids_file(source)
                elif isinstance(ids_spec, list):
                    ids, source = [_as_id(v, f"{self.json_path} {where}") for v in ids_spec], self.json_path
                else:
                    raise self._error(f"{where}: 'ids' must be a list, '*' or an ids file name")
                ids = list(dict.fromkeys(ids))
            raw[name] = {"ids": ids, "pairs": pairs, "source": source, "exclude": [str(e) for e in exclude]}
        for name in raw:
            self._resolve_split(name, raw, ())
        self._splits = {name: self._splits[name] for name in raw}     # config order

    def _resolve_split(self, name, raw, stack):
        if name in self._splits:
            return self._splits[name]
        if name in stack:
            raise self._error(f"splits exclude each other in a cycle: {' -> '.join(stack + (name,))}")
        split = dict(raw[name])
        if split["exclude"]:
            excluded = set()
            for other in split["exclude"]:
                if other not in raw:
                    raise self._error(f"split '{name}' excludes unknown split '{other}'; "
                                      f"available: {list(raw)}")
                excluded.update(self._image_path(i) for i in self._resolve_split(other, raw, stack + (name,))["ids"])
            if split["pairs"] is not None:
                split["pairs"] = [p for p in split["pairs"] if self._image_path(p[0]) not in excluded
                                  and self._image_path(p[1]) not in excluded]
                split["ids"] = list(dict.fromkeys(i for p in split["pairs"] for i in p))
            else:
                split["ids"] = [i for i in split["ids"] if self._image_path(i) not in excluded]
        self._splits[name] = split
        return split

    # ---- Learn2Reg 2021+ dataset.json ---------------------------------------------------------

    def _parse_l2r2021(self, config: dict) -> None:
        self._mode = "list"
        for key in ("description", "name"):
            if not isinstance(config.get(key, ""), str):
                raise self._error(f"'{key}' must be a string, got {config[key]!r}")
        self.description = str(config.get("description", config.get("name", "")))
        self.root = self._folder
        self.crop = None
        self.normalisation = "l2r"
        self._paths = {}
        training = config["training"]
        if not isinstance(training, list):
            raise self._error("'training' must be a list of {'image', 'label'} objects")
        train_ids = []
        for n, record in enumerate(training):
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise self._error(f"training[{n}] is not an object with an 'image' path")
            id_ = _strip_nifti(os.path.basename(record["image"]))
            label = record.get("label")
            if label is not None and not isinstance(label, str):
                raise self._error(f"training[{n}]: 'label' must be a path string, got {label!r}")
            self._paths[id_] = (os.path.normpath(os.path.join(self._folder, record["image"])),
                                os.path.normpath(os.path.join(self._folder, label)) if isinstance(label, str) else None)
            train_ids.append(id_)
        records = _pair_records(config["registration_val"], f"{self.json_path} registration_val")
        pairs = []
        for f, m in records:
            pair = []
            for value in (f, m):
                text = _as_id(value, f"{self.json_path} registration_val")
                id_ = _strip_nifti(os.path.basename(text))
                if id_ not in self._paths:
                    image = os.path.normpath(os.path.join(self._folder, text))
                    folder, base = os.path.split(image)
                    label = os.path.join(os.path.dirname(folder),
                                         os.path.basename(folder).replace("images", "labels"), base)
                    self._paths[id_] = (image, label if label != image and os.path.isfile(label) else None)
                pair.append(id_)
            pairs.append(tuple(pair))
        val_ids = list(dict.fromkeys(i for p in pairs for i in p))
        used = set(val_ids)
        self._splits = {
            "1": {"ids": [i for i in dict.fromkeys(train_ids) if i not in used], "pairs": None,
                  "source": f"{self.json_path} 'training'", "exclude": ["2"]},
            "2": {"ids": val_ids, "pairs": pairs, "source": f"{self.json_path} 'registration_val'",
                  "exclude": []}}
        labels = config.get("labels", {})
        if isinstance(labels, dict) and labels and all(isinstance(v, dict) for v in labels.values()):
            labels = next(iter(labels.values()))           # {"0": {"0": "background", ...}} variant
        if not isinstance(labels, dict) or not all(str(v).strip().isdigit() and isinstance(name, str)
                                                   for v, name in labels.items()):
            raise self._error(f"'labels' must be an object label value -> name (e.g. {{\"1\": \"liver\"}}), "
                              f"got {str(labels)[:60]}")
        self.segmentation_class_value = {}
        for value, name in labels.items():
            if int(value) != 0:
                self.segmentation_class_value[str(name)] = int(value)

    # ---- ids -> files -------------------------------------------------------------------------

    def _image_path(self, id_: str) -> str:
        if self._mode == "list":
            if id_ not in self._paths:
                raise self._error(f"id '{id_}' is not listed in the dataset JSON")
            return self._paths[id_][0]
        return self._format(self._image, id_)

    def _label_path(self, id_: str):
        if self._mode == "list":
            return self._paths[id_][1] if id_ in self._paths else None
        return self._format(self._label, id_) if self._label is not None else None

    def image_path(self, id_) -> str:
        """The image file of scan ``id_``."""
        return self._image_path(str(id_))

    def label_path(self, id_):
        """The label map file of scan ``id_`` (``None`` when the dataset has no labels)."""
        return self._label_path(str(id_))

    # ---- splits and pairs ---------------------------------------------------------------------

    @property
    def scheme_names(self) -> list:
        """Split names (e.g. ``["1", "2"]``)."""
        return list(self._splits)

    def scheme(self, split) -> dict:
        """``{"ids": [...], "pairs": [(fixed, moving), ...] or None, "source": where they came from}``;
        unknown names raise :class:`DatasetError`."""
        key = str(split)
        if key not in self._splits:
            raise self._error(f"unknown split '{split}'; available: {self.scheme_names}")
        s = self._splits[key]
        return {"ids": list(s["ids"]), "pairs": list(s["pairs"]) if s["pairs"] is not None else None,
                "source": s["source"]}

    def ids(self, split) -> list:
        """The scan ids of a split (for a pairs split: the ids its pairs use, in first-use order)."""
        return self.scheme(split)["ids"]

    def pairs(self, split) -> list:
        """``(fixed_id, moving_id)`` pairs of a finite pass: the listed pairs, or all ordered pairs
        ``i != j`` of the ids (for i: for j)."""
        s = self.scheme(split)
        if s["pairs"] is not None:
            return s["pairs"]
        ids = s["ids"]
        return [(a, b) for a in ids for b in ids if a != b]

    def num_pairs(self, split) -> int:
        s = self.scheme(split)
        return len(s["pairs"]) if s["pairs"] is not None else len(s["ids"]) * (len(s["ids"]) - 1)

    # ---- validation (headers) -----------------------------------------------------------------

    def _geometry(self, path: str, what: str, context: str):
        if not os.path.isfile(path):
            raise DatasetError(f"{path}: {what} not found ({context})")
        try:
            return read_geometry(path).shape
        except ImageError as exc:
            raise DatasetError(f"{exc} ({context})") from None

    def validate(self, splits=None) -> None:
        """Check, from NIfTI headers, that every image (and label map) of ``splits`` (all if ``None``)
        exists and is readable, label shape = image shape, and without crop that all shapes agree
        (then ``image_size`` is set to that shape). NaN values, blank (constant) images and
        non-integer label values are found by :meth:`load`."""
        if isinstance(splits, (str, int)):
            splits = [splits]
        names = self.scheme_names if splits is None else [str(s) for s in splits]
        seen = set()
        for name in names:
            s = self.scheme(name)
            if not s["ids"]:
                raise DatasetError(f"{s['source']}: split '{name}' has no scans (check 'root' in {self.json_path})")
            for id_ in s["ids"]:
                if id_ in seen:
                    continue
                seen.add(id_)
                context = f"id '{id_}' of split '{name}', from {s['source']}"
                image = self._image_path(id_)
                shape = self._geometry(image, "image", context)
                label = self._label_path(id_)
                if label is not None:
                    label_shape = self._geometry(label, "label map", context)
                    if label_shape != shape:
                        raise DatasetError(f"{label}: label map shape {label_shape} differs from image "
                                           f"shape {shape} ({image})")
                self._check_shape(shape, image)

    def _check_shape(self, shape, path):
        if self.crop is not None:
            return
        if self.image_size is None:
            self.image_size = tuple(shape)
        elif tuple(shape) != tuple(self.image_size):
            raise DatasetError(f"{path}: shape {tuple(shape)} differs from the other scans' "
                               f"{tuple(self.image_size)}; set 'crop' in {self.json_path}")

    # ---- loading ------------------------------------------------------------------------------

    def _read(self, id_: str) -> dict:
        image_path = self._image_path(id_)
        if not os.path.isfile(image_path):
            raise DatasetError(f"{image_path}: image not found (id '{id_}')")
        try:
            image = load_nifti(image_path)
        except ImageError as exc:
            raise DatasetError(f"{exc} (id '{id_}')") from None
        lo, hi = (float(image.data.min()), float(image.data.max())) if image.data.size else (0.0, 1.0)
        if lo == hi:
            what = "all zero" if hi == 0 else f"constant ({hi:g} everywhere)"
            raise DatasetError(f"{image_path}: image is {what} (id '{id_}'); an empty or blank scan cannot be "
                               f"registered")
        seg = None
        label_path = self._label_path(id_)
        if label_path is not None:
            if not os.path.isfile(label_path):
                raise DatasetError(f"{label_path}: label map not found (id '{id_}')")
            try:
                seg = load_nifti(label_path, label=True).data
            except ImageError as exc:
                raise DatasetError(f"{exc} (id '{id_}')") from None
            if seg.shape != image.data.shape:
                raise DatasetError(f"{label_path}: label map shape {seg.shape} differs from image shape "
                                   f"{image.data.shape} ({image_path})")
        self._check_shape(image.data.shape, image_path)
        volume = normalise(image.data, self.normalisation)
        offset = (0, 0, 0)
        if self.crop is not None:
            volume, offset = crop_or_pad(volume, self.crop)
            if seg is not None:
                seg, _ = crop_or_pad(seg, self.crop)
        return {"id": id_, "volume": np.ascontiguousarray(volume, dtype=np.float32),
                "segmentation": seg.astype(np.float32) if seg is not None else None,
                "spacing": tuple(float(z) for z in image.meta["header"].get_zooms()[:3]),
                "offset": tuple(int(o) for o in offset), "original_shape": tuple(image.data.shape),
                "affine": image.affine.copy()}

    def load(self, id_) -> dict:
        """Read, normalise and crop one scan.

        Returns ``{"id": str, "volume": float32 (X, Y, Z) normalised and cropped,
        "segmentation": float32 (X, Y, Z) label values (cropped) or None, "spacing": 3 floats (mm,
        header zooms), "offset": 3 ints (crop start in original voxel indices, negative = padded),
        "original_shape": 3 ints, "affine": 4x4 of the original image}``. Fresh arrays each call;
        the processed scans are kept in an LRU cache of ``cache_size`` scans.
        """
        id_ = str(id_)
        scan = self._cache.get(id_)
        if scan is None:
            scan = self._read(id_)
            if self.cache_size > 0:
                self._cache[id_] = scan
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(id_)
        out = dict(scan)
        for key in ("volume", "segmentation", "affine"):
            if out[key] is not None:
                out[key] = out[key].copy()
        return out

    def close(self) -> None:
        """Drop the scan cache (no files are held open)."""
        self._cache = OrderedDict()


# ----------------------------------------------------------------------------------------------
# torch side
# ----------------------------------------------------------------------------------------------

class L2RPairDataset(Dataset):
    """Map-style dataset of ``(fixed_id, moving_id)`` pairs of a :class:`Learn2RegDataset`.

    ``dataset[i]`` uses ``pairs[i]``; ``dataset[(fixed, moving)]`` loads that pair (infinite samplers).
    Items (as :class:`data_util.dataset.PairDataset`, without landmarks):

    * ``voxel1``, ``voxel2``: float32 ``(1, X, Y, Z)`` in [0, 1] (fixed, moving);
    * ``seg1``, ``seg2``: float32 ``(1, X, Y, Z)`` label values, zeros when absent;
      ``has_seg1``, ``has_seg2``: bool;
    * ``id1``, ``id2``: ids as written in the pairs/ids list;
    * ``spacing1``: float32 ``(3,)`` fixed voxel size (mm); ``offset1``, ``offset2``: int64 ``(3,)``
      crop offsets; ``shape1``: int64 ``(3,)`` original fixed shape (for :func:`uncrop_flow`).
    """

    def __init__(self, dataset: Learn2RegDataset, pairs=None):
        self.dataset = dataset
        self.pairs = list(pairs) if pairs is not None else None

    def __len__(self) -> int:
        return len(self.pairs) if self.pairs is not None else 0

    def __getitem__(self, index):
        fixed, moving = index if isinstance(index, (tuple, list)) else self.pairs[index]
        item = {}
        for k, id_ in ((1, fixed), (2, moving)):
            scan = self.dataset.load(id_)
            seg = scan["segmentation"]
            item[f"voxel{k}"] = torch.from_numpy(scan["volume"])[None]
            item[f"seg{k}"] = (torch.from_numpy(seg)[None] if seg is not None
                               else torch.zeros((1,) + scan["volume"].shape))
            item[f"has_seg{k}"] = seg is not None
            item[f"id{k}"] = scan["id"]
            item[f"offset{k}"] = torch.tensor(scan["offset"], dtype=torch.int64)
            if k == 1:
                item["spacing1"] = torch.tensor(scan["spacing"], dtype=torch.float32)
                item["shape1"] = torch.tensor(scan["original_shape"], dtype=torch.int64)
        return item


class RandomFixedBatchSampler(Sampler):
    """Infinite training batches over an id list (Estienne et al.): the moving scan walks a fresh
    random permutation of the ids each pass, the fixed scan is drawn uniformly among the other ids.
    Deterministic for ``seed`` (numpy Generator)."""

    def __init__(self, ids, batch_size: int, seed: int = 0):
        self.ids, self.batch_size, self.seed = list(ids), int(batch_size), seed
        if len(self.ids) < 2:
            raise ValueError(f"random pairs need at least 2 scans, got {len(self.ids)}")

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        n = len(self.ids)
        order, cursor = rng.permutation(n), 0
        while True:
            batch = []
            for _ in range(self.batch_size):
                if cursor == n:
                    order, cursor = rng.permutation(n), 0
                m = int(order[cursor])
                cursor += 1
                f = int(rng.integers(n - 1))
                f += f >= m
                batch.append((self.ids[f], self.ids[m]))
            yield batch


def make_l2r_loader(dataset: Learn2RegDataset, split, batch_size: int = 1, loop: bool = False,
                    num_workers: int = 0, seed: int = 0, limit: int | None = None, pairs=None,
                    pin_memory: bool = False) -> DataLoader:
    """DataLoader of :class:`L2RPairDataset` items (batched tensors get a leading ``B``).

    ``loop=True``: infinite training batches; an ids split gives (random fixed, moving) pairs (see
    :class:`RandomFixedBatchSampler`; needs >= 2 ids), a pairs split (or ``pairs``) walks random
    permutations of its pairs. ``loop=False``: one pass over ``pairs`` or ``dataset.pairs(split)`` in
    order, the first ``limit`` pairs when given; the last batch may be smaller.
    """
    if pairs is not None:
        pairs = [(str(f), str(m)) for f, m in pairs]
    if loop:
        if pairs is not None:
            sampler = ListPairBatchSampler(pairs, batch_size, seed)
        else:
            s = dataset.scheme(split)
            if s["pairs"] is not None:
                if not s["pairs"]:
                    raise DatasetError(f"{s['source']}: split '{split}' has no pairs to sample")
                sampler = ListPairBatchSampler(s["pairs"], batch_size, seed)
            else:
                if len(s["ids"]) < 2:
                    raise DatasetError(f"{s['source']}: split '{split}' has {len(s['ids'])} scan(s); "
                                       "random training pairs need at least 2")
                sampler = RandomFixedBatchSampler(s["ids"], batch_size, seed)
        return DataLoader(L2RPairDataset(dataset), batch_sampler=sampler, num_workers=num_workers,
                          pin_memory=pin_memory)
    pairs = dataset.pairs(split) if pairs is None else pairs
    if limit is not None:
        pairs = pairs[:limit]
    return DataLoader(L2RPairDataset(dataset, pairs), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, pin_memory=pin_memory)


# ----------------------------------------------------------------------------------------------
# dispatch between the RCN HDF5 layout and this one
# ----------------------------------------------------------------------------------------------

def is_learn2reg_config(config) -> bool:
    """True for our ``"format": "learn2reg"`` configs and Learn2Reg 2021+ ``dataset.json`` files."""
    return isinstance(config, dict) and (config.get("format") == FORMAT or (
        config.get("format") is None and "training" in config and "registration_val" in config))


def open_dataset(json_path, **kwargs):
    """A :class:`Learn2RegDataset` for learn2reg configs, else ``RCNDataset(json_path, **kwargs)``.

    ``kwargs``: ``paired``, ``splits``, ``check_files``, ``cache_size`` for both; ``crop`` and
    ``normalisation`` for learn2reg only (a non-``None`` value for an RCN dataset is an error).
    """
    path = os.path.abspath(os.fspath(json_path))
    config = _read_json(path, "dataset config")
    if is_learn2reg_config(config):
        return Learn2RegDataset(path, **kwargs)
    if is_synth_config(config):
        if kwargs.get("crop") is not None or kwargs.get("paired"):
            raise DatasetError(f"{path}: --crop / --paired do not apply to a generated (synth) dataset")
        return SynthDataset(path, config)
    for key in ("crop", "normalisation"):
        if kwargs.pop(key, None) is not None:
            raise DatasetError(f"{path}: '{key}' applies to learn2reg datasets only, this is an RCN HDF5 config")
    if isinstance(config, dict) and config.get("format") not in (None, "rcn"):
        raise DatasetError(f"{path}: unknown dataset 'format' {config.get('format')!r} "
                           f"(expected '{FORMAT}', 'synth' or an RCN config)")
    return RCNDataset(path, **kwargs)


def make_dataset_loader(dataset, split, batch_size: int = 1, loop: bool = False, num_workers: int = 0,
                        seed: int = 0, limit: int | None = None, pairs=None, teacher_flows=None) -> DataLoader:
    """:func:`make_l2r_loader` for a :class:`Learn2RegDataset`, :func:`data_util.dataset.make_loader`
    otherwise (:func:`data_util.synth_labels.make_synth_loader` for generated datasets). Teacher
    flows are supported for RCN datasets only."""
    if isinstance(dataset, SynthDataset):
        if teacher_flows is not None or pairs is not None:
            raise DatasetError(f"{dataset.json_path}: stored teacher flows / pair lists do not apply to a "
                               f"generated (synth) dataset")
        return make_synth_loader(dataset, split, batch_size, loop=loop, num_workers=num_workers, seed=seed,
                                 limit=limit)
    if isinstance(dataset, Learn2RegDataset):
        if teacher_flows is not None:
            raise DatasetError(f"{dataset.json_path}: teacher flows are only supported for RCN HDF5 datasets")
        return make_l2r_loader(dataset, split, batch_size, loop=loop, num_workers=num_workers, seed=seed,
                               limit=limit, pairs=pairs)
    return make_loader(dataset, split, batch_size, loop=loop, num_workers=num_workers, seed=seed,
                       limit=limit, pairs=pairs, teacher_flows=teacher_flows)


__all__ = ["Learn2RegDataset", "L2RPairDataset", "RandomFixedBatchSampler", "make_l2r_loader", "open_dataset",
           "make_dataset_loader", "is_learn2reg_config", "normalise", "normalise_l2r", "crop_or_pad",
           "uncrop_flow", "read_pairs_csv", "FORMAT", "NORMALISATIONS"]
