"""Data utilities: dataset readers (one interface, :mod:`data_util.interface`), pair loaders, training augmentation, synthetic data.

Conventions (docs/conventions.md): images ``(B, 1, X, Y, Z)``, flows ``(B, 3, X, Y, Z)`` in voxels; image 1
is fixed, image 2 is moving; stored volumes are uint8 0..255 and networks see ``volume / 255``.
"""
from data_util.augmentation import (augment_moving, augment_pair_affine, bspline_weights, interpolate_control_grid,
                                    invert_points, random_ffd_flow, sample_power)
from data_util.interface import DatasetError, RegistrationDataset
from data_util.dataset import (ListPairBatchSampler, PairDataset, RandomPairBatchSampler, RCNDataset,
                               landmark_mask, make_loader, scan_id)


def __getattr__(name):
    """Lazy ``generate``, ``open_dataset`` and ``make_dataset_loader`` (keeps ``python -m
    data_util.synthetic`` / ``data_util.icbm`` free of a double import)."""
    if name == "generate":
        from data_util.synthetic import generate
        return generate
    if name in ("open_dataset", "make_dataset_loader"):
        from data_util import formats
        return getattr(formats, name)
    raise AttributeError(f"module 'data_util' has no attribute '{name}'")


__all__ = ["DatasetError", "RegistrationDataset", "open_dataset", "make_dataset_loader", "RCNDataset", "PairDataset", "RandomPairBatchSampler", "ListPairBatchSampler", "make_loader",
           "scan_id", "landmark_mask", "augment_moving", "augment_pair_affine", "random_ffd_flow", "sample_power",
           "bspline_weights", "interpolate_control_grid", "invert_points", "generate"]
