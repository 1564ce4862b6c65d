"""Synthetic stand-ins for the paper's evaluation data, in the published layouts.

The real SLIVER, LiTS, LSPIG and LPBA files cannot be shipped. :func:`write_standins` writes, for
the published dataset configs (``datasets/liver.json``, ``datasets/brain.json``), HDF5 files with
exactly the published entry names of the evaluation subsets (``yanx/10`` ... in
``sliver_val.h5``, ``lits/0`` ... in ``lits_val.h5``, ``pigs/...`` in ``lspig_val.h5``,
``lpba/S01`` (the atlas) ... in ``lpba_val.h5``) and copies of the configs that keep every
scheme, subset and label value but point ``files`` at the stand-ins and set ``image_size`` to the
stand-in size. ``tables.py``, ``eval.py -d`` and ``train.py -d`` read them like the real data.

Scans are :func:`data_util.synthetic.make_scan` abdomens of one shared anatomy under random smooth
deformations (so pairs are registrable): liver subsets keep the liver as the 0/255 mask the
published liver files store (SLIVER entries also keep the 6 landmarks); brain subsets cut the organs
into the config's 56 label values (Voronoi cells fixed in template space, so labels correspond
across scans). Numbers measured on stand-ins check the pipeline, not the methods.
"""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import torch

from data_util.synthetic import make_scan, render_template, sample_subject
from network.outputs import OutputSet, atomic_write_text

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "datasets")
PUBLISHED_CONFIGS = ("liver.json", "brain.json")
TRAINING_SCHEME = "1"


def evaluation_entries(config: dict) -> list:
    """Entries of every subset an evaluation scheme (any scheme but ``"1"``) uses, plus the atlas."""
    subsets = []
    for name, scheme in config["schemes"].items():
        if name != TRAINING_SCHEME:
            subsets.extend(s for s in scheme if s not in subsets)
    entries = [e for s in subsets for e in config["subsets"][s]]
    if config.get("atlas") and config["atlas"] not in entries:
        entries.insert(0, config["atlas"])
    return list(dict.fromkeys(entries))


def _voronoi_seeds(subject: dict, size: int, n: int, rng) -> torch.Tensor:
    """``n`` points (template voxel coordinates) inside the template's organs."""
    axes = torch.arange(size, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axes, axes, axes, indexing="ij"))
    _, labels = render_template(subject, grid)
    inside = torch.nonzero(torch.as_tensor(labels) > 0).float()
    pick = rng.choice(len(inside), size=n, replace=len(inside) < n)
    return inside[torch.as_tensor(pick)]


def _brain_labels(scan: dict, seeds: torch.Tensor, values) -> np.ndarray:
    """The scan's organ voxels labelled by their nearest seed in template space."""
    size = scan["segmentation"].shape
    axes = [torch.arange(s, dtype=torch.float32) for s in size]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    template = (grid + torch.from_numpy(scan["deformation"].astype(np.float32))).reshape(3, -1).T
    organ = torch.from_numpy(scan["segmentation"].reshape(-1) > 0)
    out = np.zeros(template.shape[0], np.uint8)
    nearest = torch.cdist(template[organ], seeds).argmin(1).numpy()
    out[organ.numpy()] = np.asarray(values, np.uint8)[nearest]
    return out.reshape(size)


def _scan_groups(config: dict, size: int, seed: int) -> dict:
    """``{file prefix: {key: {dataset: array}}}`` for every evaluation entry of ``config``."""
    subject = sample_subject(np.random.default_rng([seed, 7]), size)
    values = sorted(int(v) for v in (config.get("segmentation_class_value") or {}).values())
    seeds = _voronoi_seeds(subject, size, len(values), np.random.default_rng([seed, 8])) if values else None
    groups = {}
    for k, entry in enumerate(evaluation_entries(config)):
        prefix, _, key = entry.partition("/")
        scan = make_scan(np.random.default_rng([seed, 9, k]), size, subject=subject)
        if values:
            segmentation = _brain_labels(scan, seeds, values)
        else:
            segmentation = np.where(scan["segmentation"] == 1, 255, 0).astype(np.uint8)
        data = {"volume": scan["volume"], "segmentation": segmentation}
        if prefix == "yanx":                    # SLIVER: landmark distances
            data["point"] = scan["point"]
        groups.setdefault(prefix, {})[key] = data
    return groups


def _h5_bytes(groups: dict) -> bytes:
    """An HDF5 file built in memory (HDF5 itself never writes to the disk: a full disk is an
    ordinary write error)."""
    with h5py.File("standin.h5", "w", driver="core", backing_store=False) as f:
        for key, data in groups.items():
            group = f.create_group(key)
            for name, value in data.items():
                group.create_dataset(name, data=value, track_times=False)
        f.flush()
        return f.id.get_file_image()


def write_standins(out_dir: str, size: int = 64, seed: int = 0, configs=PUBLISHED_CONFIGS,
                   config_dir: str = CONFIG_DIR, verbose: bool = False) -> dict:
    """Write the stand-ins of ``configs`` into ``out_dir`` as one set; returns ``{config name: path}``."""
    written = {}
    with OutputSet(out_dir) as out:
        for name in configs:
            with open(os.path.join(config_dir, name), encoding="utf-8") as f:
                config = json.load(f)
            files = {}
            for prefix, groups in _scan_groups(config, size, seed).items():
                file_name = os.path.basename(config["files"][prefix]["path"])
                with open(out.path(file_name), "wb") as h5:
                    h5.write(_h5_bytes(groups))
                files[prefix] = {"type": "HDF5", "path": file_name}
                if verbose:
                    print(f"  {file_name}: {len(groups)} scans ({prefix}/...)")
            config["files"] = files
            config["image_size"] = [size] * 3
            config["standin"] = {"of": name, "size": size, "seed": seed,
                                 "note": "synthetic stand-in data in the published layout (data_util/standins.py)"}
            atomic_write_text(out.path(name), json.dumps(config, indent=1))
            written[name] = os.path.join(os.path.abspath(out_dir), name)
    if verbose:
        print(f"wrote {out_dir}: {', '.join(written)} ({size}^3, seed {seed})")
    return written


def standin_configs(out_dir: str, size: int = 64, seed: int = 0, verbose: bool = False) -> dict:
    """``{config name: path}`` of the stand-ins in ``out_dir``, written first unless they are there
    at this size and seed."""
    paths = {name: os.path.join(os.path.abspath(out_dir), name) for name in PUBLISHED_CONFIGS}
    stamps = []
    for path in paths.values():
        try:
            with open(path, encoding="utf-8") as f:
                stamps.append(json.load(f).get("standin", {}))
        except (OSError, ValueError, AttributeError):
            break
    if len(stamps) == len(paths) and all(s.get("size") == size and s.get("seed") == seed for s in stamps):
        return paths
    return write_standins(out_dir, size, seed, verbose=verbose)


__all__ = ["write_standins", "standin_configs", "evaluation_entries", "PUBLISHED_CONFIGS"]
