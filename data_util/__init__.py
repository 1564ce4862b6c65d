"""Data utilities: RCN JSON + HDF5 datasets, pair loaders, training augmentation, synthetic data.

Conventions (README section "Conventions"): images ``(B, 1, X, Y, Z)``, flows ``(B, 3, X, Y, Z)`` in voxels; image 1
is fixed, image 2 is moving; stored volumes are uint8 0..255 and networks see ``volume / 255``.
"""
from data_util.augmentation import (augment_moving, augment_pair_affine, bspline_weights, interpolate_control_grid,
                                    invert_points, random_ffd_flow, sample_power)
from data_util.dataset import (DatasetError, ListPairBatchSampler, PairDataset, RandomPairBatchSampler, RCNDataset,
                               landmark_mask, make_loader, scan_id)


def __getattr__(name):
    """Lazy ``generate`` (keeps ``python -m data_util.synthetic`` free of a double import)."""
    if name == "generate":
        from data_util.synthetic import generate
        return generate
    raise AttributeError(f"module 'data_util' has no attribute '{name}'")


__all__ = ["DatasetError", "RCNDataset", "PairDataset", "RandomPairBatchSampler", "ListPairBatchSampler", "make_loader",
           "scan_id", "landmark_mask", "augment_moving", "augment_pair_affine", "random_ffd_flow", "sample_power",
           "bspline_weights", "interpolate_control_grid", "invert_points", "generate"]
