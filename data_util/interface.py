"""The dataset interface every reader implements, and that ``train.py``, ``eval.py`` and
``extract_teacher.py`` rely on.

Three readers implement it: :class:`~data_util.dataset.RCNDataset` (the RCN JSON + HDF5 layout),
:class:`~data_util.learn2reg.Learn2RegDataset` (NIfTI files with a Learn2Reg config) and
:class:`~data_util.synth_labels.SynthDataset` (pairs generated on the fly).
:func:`data_util.formats.open_dataset` picks the reader a JSON asks for.

Items of every loader are dicts with ``voxel1`` (fixed) and ``voxel2`` (moving) float32
``(B, 1, X, Y, Z)`` images in [0, 1], ``seg1`` / ``seg2`` label maps of the same shape, and ``id1`` /
``id2`` scan ids; readers add their own keys (landmarks, spacing, crop offsets, teacher flows).
"""
from __future__ import annotations

import abc

from network.errors import ToolkitError


class DatasetError(ToolkitError):
    """A dataset config or data file is missing, unreadable or inconsistent (one-line message)."""


class RegistrationDataset(abc.ABC):
    """A dataset of registration pairs, organised in named splits (``"1"`` train, ``"2"`` validation...).

    Attributes every reader sets: ``json_path`` (absolute path of its config), ``image_size`` (the
    network grid ``(X, Y, Z)``), ``segmentation_class_value`` (label name -> value, or ``None``),
    ``normalisation`` (how intensities were mapped to [0, 1]; ``register.py`` maps new scans the same
    way), ``register_affine`` (``"affine"`` when a model trained on it expects an affine stage first).
    """

    json_path: str
    image_size: tuple
    segmentation_class_value: dict | None = None
    normalisation: str = "uint8"
    register_affine: str = "none"

    @property
    @abc.abstractmethod
    def scheme_names(self) -> list:
        """The split names, e.g. ``["1", "2"]``."""

    @abc.abstractmethod
    def pairs(self, split) -> list:
        """The pairs of one finite pass over ``split``, in order."""

    @abc.abstractmethod
    def num_pairs(self, split) -> int:
        """``len(self.pairs(split))`` without building the list."""

    @abc.abstractmethod
    def validate(self, splits=None) -> None:
        """Check the files behind ``splits`` (``None``: all); raise :class:`DatasetError` naming one."""

    @abc.abstractmethod
    def loader(self, split, batch_size: int = 1, loop: bool = False, num_workers: int = 0, seed: int = 0,
               limit: int | None = None, pairs=None, teacher_flows=None):
        """A ``DataLoader`` over ``split``: endless seeded training batches (``loop=True``) or one pass
        in order (the first ``limit`` pairs). ``pairs`` restricts it to given pairs, ``teacher_flows``
        adds each pair's stored teacher flow (readers that cannot raise :class:`DatasetError`)."""

    def keyed_pairs(self, split, keys) -> list:
        """The pairs of ``split`` named by teacher-flow keys ``"<fixed id>-<moving id>"``."""
        raise DatasetError(f"{self.json_path}: stored teacher flows are supported for RCN HDF5 datasets only; "
                           f"distil this dataset from an online teacher (--teacher weights/<teacher>)")

    def close(self) -> None:
        """Release open files (a no-op where there are none)."""


__all__ = ["RegistrationDataset", "DatasetError"]
