"""Learn2Reg-style datasets (reading): NIfTI images + label maps + pairs files (e.g. L2R 2020 Task 4, hippocampus).

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

import os
from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_util.dataset import ListPairBatchSampler
from data_util.image_io import ImageError, load_nifti, read_geometry
from data_util.interface import DatasetError, RegistrationDataset
from data_util.l2r_layout import FORMAT, Learn2RegLayout, read_pairs_csv
from data_util.volume_ops import NORMALISATIONS, crop_or_pad, normalise, normalise_l2r, uncrop_flow

DEFAULT_CACHE = 64


class Learn2RegDataset(Learn2RegLayout, RegistrationDataset):
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
        super().__init__(json_path, crop=crop, normalisation=normalisation, paired=paired)
        self.cache_size = int(cache_size)
        self._cache = OrderedDict()
        if check_files:
            self.validate(splits)

    def loader(self, split, batch_size: int = 1, loop: bool = False, num_workers: int = 0, seed: int = 0,
               limit: int | None = None, pairs=None, teacher_flows=None) -> DataLoader:
        """:func:`make_l2r_loader` over this dataset; stored teacher flows are for RCN datasets only."""
        if teacher_flows is not None:
            raise DatasetError(f"{self.json_path}: teacher flows are only supported for RCN HDF5 datasets")
        return make_l2r_loader(self, split, batch_size, loop=loop, num_workers=num_workers, seed=seed,
                               limit=limit, pairs=pairs)

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


__all__ = ["Learn2RegDataset", "L2RPairDataset", "RandomFixedBatchSampler", "make_l2r_loader", "normalise",
           "normalise_l2r", "crop_or_pad", "uncrop_flow", "read_pairs_csv", "FORMAT", "NORMALISATIONS"]
