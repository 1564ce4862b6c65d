"""Which reader a dataset JSON gets: :func:`open_dataset` and :func:`make_dataset_loader`.

``"format": "learn2reg"`` configs and Learn2Reg 2021+ ``dataset.json`` files open as
:class:`~data_util.learn2reg.Learn2RegDataset`, ``"format": "synth"`` as
:class:`~data_util.synth_labels.SynthDataset`, anything else as the RCN JSON + HDF5
:class:`~data_util.dataset.RCNDataset`. All three implement
:class:`~data_util.interface.RegistrationDataset`.
"""
from __future__ import annotations

import os

from data_util.dataset import RCNDataset
from data_util.interface import DatasetError
from data_util.l2r_layout import FORMAT, is_learn2reg_config, read_json
from data_util.learn2reg import Learn2RegDataset
from data_util.synth_labels import SynthDataset, is_synth_config


def open_dataset(json_path, **kwargs):
    """A :class:`Learn2RegDataset` for learn2reg configs, else ``RCNDataset(json_path, **kwargs)``.

    ``kwargs``: ``paired``, ``splits``, ``check_files``, ``cache_size`` for both; ``crop`` and
    ``normalisation`` for learn2reg only (a non-``None`` value for an RCN dataset is an error).
    """
    path = os.path.abspath(os.fspath(json_path))
    config = read_json(path, "dataset config")
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
                        seed: int = 0, limit: int | None = None, pairs=None, teacher_flows=None):
    """``dataset.loader(...)``: the loader of any :class:`~data_util.interface.RegistrationDataset`."""
    return dataset.loader(split, batch_size, loop=loop, num_workers=num_workers, seed=seed, limit=limit,
                          pairs=pairs, teacher_flows=teacher_flows)


__all__ = ["open_dataset", "make_dataset_loader", "is_learn2reg_config"]
