"""The layout of a Learn2Reg-style dataset: which scans a config names, where their files are, and
the splits and pairs (no image is read here; :mod:`data_util.learn2reg` reads them).

Config layouts and id rules: see :mod:`data_util.learn2reg`.
"""
from __future__ import annotations

import csv
import glob
import json
import numbers
import os
import string

from data_util.interface import DatasetError
from data_util.volume_ops import NORMALISATIONS

FORMAT = "learn2reg"
_NIFTI = (".nii.gz", ".nii")


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


def read_json(path: str, what: str):
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


def is_learn2reg_config(config) -> bool:
    """True for our ``"format": "learn2reg"`` configs and Learn2Reg 2021+ ``dataset.json`` files."""
    return isinstance(config, dict) and (config.get("format") == FORMAT or (
        config.get("format") is None and "training" in config and "registration_val" in config))


class Learn2RegLayout:
    """Config parsing of a Learn2Reg-style dataset: ids, file paths, splits and pairs.

    Attributes: ``json_path``, ``root``, ``crop``, ``normalisation``, ``segmentation_class_value``
    (name -> value), ``label_values``, ``description``.
    """

    def __init__(self, json_path, crop=None, normalisation=None, paired: bool = False):
        self.json_path = os.path.abspath(os.fspath(json_path))
        if paired:
            raise DatasetError(f"{self.json_path}: paired=True (adjacent-pair mode) is for RCN HDF5 "
                               "datasets; a learn2reg dataset takes its pairs from its splits")
        self._folder = os.path.dirname(self.json_path)
        config = read_json(self.json_path, "dataset config")
        if not isinstance(config, dict):
            raise self._error("invalid config, expected a JSON object")
        if not is_learn2reg_config(config):
            raise self._error(f"not a learn2reg config ('format' is {config.get('format')!r}; expected "
                              f"'{FORMAT}', or Learn2Reg 'training' + 'registration_val' keys)")
        if config.get("format") == FORMAT:
            self._parse_ours(config)
        else:
            self._parse_l2r2021(config)
        if crop is not None:
            self.crop = self._parse_crop(crop)
        if normalisation is not None:
            self.normalisation = self._parse_normalisation(normalisation)
        self.image_size = self.crop
        self.label_values = list(self.segmentation_class_value.values())

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
                records = _pair_records(read_json(source, "pairs file"), source)
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


__all__ = ["Learn2RegLayout", "is_learn2reg_config", "read_pairs_csv", "read_json", "FORMAT"]
