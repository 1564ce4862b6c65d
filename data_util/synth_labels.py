"""Training pairs synthesised on the fly from random label maps (the SynthMorph idea).

A pair is drawn from a seed and its index alone, so a run's pair sequence is a function of the
dataset's seed and the step (exact resume needs nothing else). For each pair:

1. **A label map** (labels ``1..n_labels``, 0 is background), one of
   * ``shapes``: ``n_labels`` smooth random noise channels, argmax, inside a random head-sized blob;
   * ``brain``: the ICBM152 template's CSF / grey / white matter (from nilearn's wheel, read once),
     each tissue cut into ``parts`` random pieces, read through a random subject transform
     (anisotropic scale, rotation, shift and a large smooth diffeomorphic field), so every map is
     a new "subject" and the pieces give the Dice term something to match inside each tissue.
2. **Two views of it**: the fixed labels through one smooth field, the moving labels through another
   plus a small residual affine (the model runs after an affine stage). With ``still_pairs`` p, a
   fraction p of the pairs uses the fixed view for both (one anatomy, two scans of it: the right
   answer is no motion, which a model never learns from pairs that always move).
3. **Images from the labels**: ``"modality": "mri"``: one random intensity per label (T1-like
   tissue order or any order), jittered per image, Gaussian blur, a smooth bias field, noise, a
   gamma curve, then the percentile mapping ``register.py`` applies to MRI (0.5 / 99.5 %, clipped
   to [0, 1]); with ``independent_contrast`` p, a fraction p of the pairs draws the moving image's
   intensities afresh (so the two images of a pair differ in contrast, as T1 against T2 or an
   inverted T1); ``"ct"``: Hounsfield units per label (air outside, fat, soft tissue, enhanced organ
   or bone), blur, noise, then the CT window (290 / 120 HU).

The dataset JSON (``{"format": "synth", ...}``, e.g. ``datasets/synth_brain.json``) names the grid,
the map kinds and their fractions, and the seed; ``train.py -d`` and ``eval.py`` read it like any
other dataset. Split ``"1"`` is an endless pair sequence; split ``"2"`` is ``val_pairs`` pairs from
a disjoint seed range. Arrays are ``(X, Y, Z)`` in the model's LPS voxel order; flows in voxels.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from network.layers import warp

from .interface import DatasetError, RegistrationDataset

FORMAT = "synth"
MAP_KINDS = ("shapes", "brain")
TRAIN_PAIRS = 10 ** 9          # split "1" is endless; a nominal count for messages
VAL_STREAM = -1                # pair keys are (stream, index): the run seed for training, -1 for validation


@dataclass
class SynthConfig:
    """What a ``"format": "synth"`` dataset JSON holds (every key optional but ``image_size``)."""
    image_size: tuple
    maps: dict = field(default_factory=lambda: {"shapes": 0.5, "brain": 0.5})
    n_labels: int = 15              # labels 1..n_labels; brain maps use 3 tissues x parts of them
    parts: int = 5                  # random pieces per brain tissue
    seed: int = 0
    val_pairs: int = 16
    pair_field: float = 5.0         # largest displacement (voxels) of each view's smooth field
    subject_field: float = 6.0      # largest displacement (voxels) of a brain map's subject field
    residual_rotation: float = 4.0  # degrees, moving view's residual affine
    residual_scale: float = 0.04
    residual_shift: float = 4.0     # voxels
    subject_scale: float = 0.15     # brain maps: per-axis scale in [1 - s, 1 + s]
    subject_rotation: float = 10.0
    modality: str = "mri"           # mri: random contrasts, percentile mapping; ct: HU per tissue class, CT window
    independent_contrast: float = 0.0  # mri: fraction of pairs whose moving image gets its own label intensities
    still_pairs: float = 0.0        # fraction of pairs whose two views share one field (nothing to register)

    @classmethod
    def from_dict(cls, config: dict, where: str) -> "SynthConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(config) - known - {"format", "name", "description"})
        if unknown:
            raise DatasetError(f"{where}: unknown synth dataset keys {unknown}")
        try:
            out = cls(**{k: v for k, v in config.items() if k in known})
            out.image_size = tuple(int(v) for v in out.image_size)
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{where}: bad synth dataset config ({e})") from None
        if len(out.image_size) != 3 or min(out.image_size) < 16:
            raise DatasetError(f"{where}: image_size must be three sizes >= 16, got {list(out.image_size)}")
        if not isinstance(out.maps, dict) or not out.maps or set(out.maps) - set(MAP_KINDS) \
                or any(not isinstance(v, (int, float)) or v < 0 for v in out.maps.values()) \
                or sum(out.maps.values()) <= 0:
            raise DatasetError(f"{where}: 'maps' must give non-negative fractions of {list(MAP_KINDS)}, "
                               f"got {out.maps!r}")
        if "brain" in out.maps and out.maps["brain"] > 0 and 3 * out.parts > out.n_labels:
            raise DatasetError(f"{where}: brain maps need n_labels >= 3 x parts ({3 * out.parts})")
        if out.modality not in ("mri", "ct"):
            raise DatasetError(f"{where}: 'modality' must be 'mri' or 'ct', got {out.modality!r}")
        for key in ("independent_contrast", "still_pairs"):
            value = getattr(out, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise DatasetError(f"{where}: {key!r} must be a fraction in [0, 1], got {value!r}")
        if out.independent_contrast > 0 and out.modality != "mri":
            raise DatasetError(f"{where}: 'independent_contrast' applies to 'mri' only (CT intensities are "
                               f"physical units, the same in both images)")
        if out.val_pairs < 1 or out.n_labels < 2:
            raise DatasetError(f"{where}: val_pairs must be >= 1 and n_labels >= 2")
        return out


# ---- random fields ------------------------------------------------------------------------------

def smooth_noise(gen: torch.Generator, channels: int, size, coarse) -> torch.Tensor:
    """``(channels, *size)``: Gaussian noise on a ``coarse`` lattice, trilinearly upsampled."""
    noise = torch.randn((1, channels) + tuple(int(c) for c in coarse), generator=gen)
    return F.interpolate(noise, size=tuple(size), mode="trilinear", align_corners=True)[0]


def smooth_field(gen: torch.Generator, size, max_disp: float, spacing: float, steps: int = 5) -> torch.Tensor:
    """A diffeomorphic pull-back displacement ``(1, 3, *size)`` (voxels): a smooth velocity field
    (control points every ``spacing`` voxels, largest velocity ``max_disp``) integrated by scaling and
    squaring on a grid 4x coarser (the field is smooth at that scale), then upsampled."""
    factor = 4 if spacing >= 8 else 2 if spacing >= 4 else 1
    small = [max(2, math.ceil(s / factor)) for s in size]
    coarse = [max(2, math.ceil(s / spacing) + 1) for s in size]
    v = smooth_noise(gen, 3, small, coarse)[None]
    v = v * (max_disp / factor / v.norm(dim=1).max().clamp_min(1e-6))
    u = v / 2 ** steps
    for _ in range(steps):
        u = u + warp(u, u)
    if factor == 1:
        return u
    return F.interpolate(u, size=tuple(size), mode="trilinear", align_corners=True) * factor


def noise_labels(gen: torch.Generator, n: int, size, cells: int) -> torch.Tensor:
    """int64 ``size``: argmax of ``n`` smooth noise channels (``cells`` control points per axis), taken
    on a half-resolution grid and upsampled by nearest neighbour."""
    half = [max(2, (s + 1) // 2) for s in size]
    labels = smooth_noise(gen, n, half, (cells,) * 3).argmax(0)
    return F.interpolate(labels[None, None].float(), size=tuple(size), mode="nearest")[0, 0].long()


def rotation_matrix(angles_deg) -> torch.Tensor:
    out = torch.eye(3, dtype=torch.float64)
    for axis, a in enumerate(angles_deg):
        c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
        i, j = [k for k in range(3) if k != axis]
        r = torch.eye(3, dtype=torch.float64)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def _centred_grid(size) -> torch.Tensor:
    """``(1, 3, *size)`` float32 voxel coordinates relative to the volume centre."""
    axes = [torch.arange(s, dtype=torch.float32) - (s - 1) / 2 for s in size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def uniform(gen: torch.Generator, low: float, high: float, n: int = 1) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def random_affine(gen, rotation: float, scale: float, shift: float) -> tuple:
    """``(M, t)``: rotations up to ``rotation`` degrees per axis times per-axis scales in
    ``[1 - scale, 1 + scale]``; shifts up to ``shift`` voxels."""
    angles = uniform(gen, -rotation, rotation, 3).tolist()
    m = rotation_matrix(angles) @ torch.diag(uniform(gen, 1 - scale, 1 + scale, 3))
    return m.float(), uniform(gen, -shift, shift, 3).float()


def then_affine(first: torch.Tensor | None, affine: tuple, size) -> torch.Tensor:
    """Pull-back displacement ``(1, 3, *size)`` of reading through ``first`` (or nothing) and then
    ``y -> M (y - c) + c + t`` about the volume centre ``c``: ``(M - I)(x - c) + t + M first(x)``."""
    m, t = affine
    x = _centred_grid(size)
    out = torch.einsum("ij,bj...->bi...", m - torch.eye(3), x) + t.view(1, 3, 1, 1, 1)
    if first is not None:
        out = out + torch.einsum("ij,bj...->bi...", m, first)
    return out


# ---- label maps ---------------------------------------------------------------------------------

def head_blob(gen: torch.Generator, size) -> torch.Tensor:
    """Boolean ``size`` mask: an ellipsoid filling 55-85 % of each axis, its surface bent by smooth noise."""
    axes = [torch.linspace(-1, 1, s) for s in size]
    x = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    radii = uniform(gen, 0.55, 0.85, 3).float().view(3, 1, 1, 1)
    r = ((x / radii) ** 2).sum(0).sqrt()
    return r + 0.15 * smooth_noise(gen, 1, size, (5, 5, 5))[0] < 1.0


def shapes_map(gen: torch.Generator, size, n_labels: int) -> torch.Tensor:
    """int64 ``size``: labels 1..n_labels (argmax of smooth noise at a random scale) inside a blob."""
    cells = int(torch.randint(4, 11, (1,), generator=gen))
    labels = noise_labels(gen, n_labels, size, cells) + 1
    return torch.where(head_blob(gen, size), labels, torch.zeros_like(labels))


class BrainTissues:
    """The ICBM152 tissues on the model grid: int64 ``size`` with 0 background, 1 CSF, 2 GM, 3 WM.

    The template is placed as ``register.py`` would place a scan: its field of view fitted into the
    grid, LPS voxel order. Read once per process.
    """
    _cache: dict = {}

    @classmethod
    def on_grid(cls, size) -> torch.Tensor:
        size = tuple(int(s) for s in size)
        if size not in cls._cache:
            cls._cache[size] = cls._build(size)
        return cls._cache[size]

    @staticmethod
    def _build(size) -> torch.Tensor:
        from .icbm import load_template
        from .image_io import ImageError, Volume
        from .preprocess import model_grid, resample_labels

        try:
            t1, labels = load_template()
        except (ImageError, OSError) as e:
            raise DatasetError(f"brain label maps need the ICBM152 template: {e}") from None
        tissues = np.zeros(labels.shape, np.uint8)
        tissues[(t1.data > 10) & (labels == 0)] = 1
        tissues[labels == 1] = 2
        tissues[labels == 2] = 3
        volume = Volume(tissues, t1.affine, t1.path, dict(t1.meta))
        grid = model_grid(t1, size, None, "LPS")
        return torch.from_numpy(resample_labels(volume, grid).astype(np.int64))


def brain_map(gen: torch.Generator, size, parts: int, config: SynthConfig) -> torch.Tensor:
    """int64 ``size``: a new subject's tissues (labels ``(t - 1) * parts + piece + 1``)."""
    tissues = BrainTissues.on_grid(size).float()[None, None]
    cells = int(torch.randint(3, 7, (1,), generator=gen))
    piece = noise_labels(gen, parts, size, cells)
    subject = then_affine(smooth_field(gen, size, float(uniform(gen, 0, config.subject_field)), 12.0),
                          random_affine(gen, config.subject_rotation, config.subject_scale, 4.0), size)
    t = warp(tissues, subject, mode="nearest")[0, 0].long()
    return torch.where(t > 0, (t - 1) * parts + piece + 1, torch.zeros_like(t))


# ---- images -------------------------------------------------------------------------------------

def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(1, 1, X, Y, Z)`` (replicate padding)."""
    if sigma <= 0.05:
        return x
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * r + 1
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.view(shape))
    return x


def label_intensities(gen: torch.Generator, kind: str, n_labels: int, parts: int) -> torch.Tensor:
    """``(n_labels + 1,)`` mean intensity per label (index 0: background, usually 0)."""
    means = torch.rand(n_labels + 1, generator=gen)
    if kind == "brain" and float(torch.rand(1, generator=gen)) < 0.5:
        tissue = torch.tensor([uniform(gen, 0.05, 0.35).item(), uniform(gen, 0.4, 0.65).item(),
                               uniform(gen, 0.7, 1.0).item()])        # T1-like: CSF < GM < WM
        if float(torch.rand(1, generator=gen)) < 0.3:
            tissue = 1.05 - tissue                                      # T2-like order
        means[1:1 + 3 * parts] = tissue.repeat_interleave(parts) + 0.03 * torch.randn(3 * parts, generator=gen)
    elif kind == "brain":
        tissue = torch.rand(3, generator=gen)
        means[1:1 + 3 * parts] = tissue.repeat_interleave(parts) + 0.05 * torch.randn(3 * parts, generator=gen)
    means[0] = 0.0 if float(torch.rand(1, generator=gen)) < 0.8 else float(torch.rand(1, generator=gen)) * 0.3
    return means.clamp(0, 1)


CT_CLASSES = ((-120.0, -80.0, 0.25), (20.0, 80.0, 0.45), (100.0, 250.0, 0.2), (300.0, 1000.0, 0.1))  # HU, share


def ct_label_hu(gen: torch.Generator, n_labels: int) -> torch.Tensor:
    """``(n_labels + 1,)`` HU per label: air outside the body, then fat, soft tissue, enhanced organs
    or bone, drawn with the shares of :data:`CT_CLASSES`."""
    shares = torch.tensor([c[2] for c in CT_CLASSES])
    kinds = torch.multinomial(shares, n_labels, replacement=True, generator=gen)
    hu = torch.tensor([float(uniform(gen, CT_CLASSES[k][0], CT_CLASSES[k][1])) for k in kinds.tolist()])
    return torch.cat([torch.tensor([-1000.0]), hu])


def synth_ct_image(gen: torch.Generator, labels: torch.Tensor, hu: torch.Tensor, window=(290.0, 120.0)) -> torch.Tensor:
    """float32 ``(1, X, Y, Z)`` in [0, 1]: per-label HU (jittered by 10 HU per image), blur, noise of
    5-25 HU, then the CT window ``(width, level)`` ``register.py`` applies."""
    x = (hu + 10.0 * torch.randn(hu.shape, generator=gen))[labels][None, None]
    x = gaussian_blur(x, float(uniform(gen, 0.3, 1.0)))
    x = x + float(uniform(gen, 5.0, 25.0)) * torch.randn(x.shape, generator=gen)
    width, level = window
    return ((x - (level - width / 2)) / width).clamp(0, 1)[0].float()


def synth_image(gen: torch.Generator, labels: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """float32 ``(1, X, Y, Z)`` in [0, 1] from an int64 label map and per-label means."""
    size = labels.shape
    x = (means + 0.02 * torch.randn(means.shape, generator=gen)).clamp(0, 1)[labels][None, None]
    x = gaussian_blur(x, float(uniform(gen, 0.3, 1.3)))
    x = x * torch.exp(float(uniform(gen, 0.0, 0.35)) * smooth_noise(gen, 1, size, (4, 4, 4)))[None]
    noise = float(uniform(gen, 0.0, 0.05)) * torch.randn(x.shape, generator=gen)
    x = x + (noise if float(means[0]) > 0 else noise * (labels > 0))        # stripped: background stays 0
    x = x.clamp_min(0) ** math.exp(0.25 * float(torch.randn(1, generator=gen)))
    flat = x.flatten()
    sample = flat[torch.randint(0, flat.numel(), (200_000,), generator=gen)]
    low, high = torch.quantile(sample, torch.tensor([0.005, 0.995])).tolist()
    if high <= low:
        low, high = float(flat.min()), float(flat.max()) + 1e-6
    return ((x - low) / (high - low)).clamp(0, 1)[0].float()


# ---- pairs --------------------------------------------------------------------------------------

def pair_generator(seed: int, key) -> torch.Generator:
    """The random stream of pair ``key`` ``(stream, index)`` of a dataset seeded ``seed``."""
    stream, index = (int(v) for v in key)
    mixed = np.random.SeedSequence([int(seed), stream + 1, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & (2 ** 63 - 1))


def make_pair(config: SynthConfig, key) -> dict:
    """The pair ``key`` ``(stream, index)``: ``voxel1/2`` float32 ``(1, X, Y, Z)`` in [0, 1],
    ``seg1/2`` float32 label maps, ``kind``."""
    gen = pair_generator(config.seed, key)
    size = config.image_size
    kinds = [k for k in MAP_KINDS if config.maps.get(k, 0) > 0]
    weights = torch.tensor([float(config.maps[k]) for k in kinds])
    kind = kinds[int(torch.multinomial(weights / weights.sum(), 1, generator=gen))]
    base = (shapes_map(gen, size, config.n_labels) if kind == "shapes"
            else brain_map(gen, size, config.parts, config))
    base = base.float()[None, None]
    # drawn only when asked for (here and below), so datasets without the key keep their pair sequence
    still = config.still_pairs > 0 and float(torch.rand(1, generator=gen)) < config.still_pairs
    views = []
    for moving in (False, True):
        if moving and still:
            views.append(views[0])
            continue
        spacing = float(uniform(gen, 8.0, 16.0))
        u = smooth_field(gen, size, float(uniform(gen, 0, config.pair_field)), spacing)
        if moving:
            u = then_affine(u, random_affine(gen, config.residual_rotation, config.residual_scale,
                                             config.residual_shift), size)
        views.append(warp(base, u, mode="nearest")[0].long())
    if config.modality == "ct":
        hu = ct_label_hu(gen, config.n_labels)
        image = lambda labels, k: synth_ct_image(gen, labels, hu)  # noqa: E731
    else:
        means = [label_intensities(gen, kind, config.n_labels, config.parts)] * 2
        if config.independent_contrast > 0 and float(torch.rand(1, generator=gen)) < config.independent_contrast:
            means[1] = label_intensities(gen, kind, config.n_labels, config.parts)
        image = lambda labels, k: synth_image(gen, labels, means[k - 1])  # noqa: E731
    out = {"kind": kind}
    for k, labels in ((1, views[0]), (2, views[1])):
        out[f"voxel{k}"] = image(labels[0], k)
        out[f"seg{k}"] = labels.float()
    return out


class SynthDataset(RegistrationDataset):
    """A ``"format": "synth"`` dataset JSON: the interface ``train.py`` / ``eval.py`` use.

    Attributes: ``json_path``, ``json`` (the config dict), ``config`` (:class:`SynthConfig`),
    ``image_size``, ``image_type`` (``"synth"``), ``normalisation`` (the config's ``modality``:
    ``"mri"`` images are percentile-mapped like MRI, ``"ct"`` ones CT-windowed), ``register_affine``
    (``"affine"``: the model expects inputs aligned by an affine stage, which ``register.py`` then
    runs by default), ``segmentation_class_value`` (``label_k -> k``), ``scheme_names``.
    """
    image_type = "synth"
    register_affine = "affine"      # pairs differ by a residual affine only: register.py aligns them first
    scheme_names = ["1", "2"]

    def __init__(self, json_path, config: dict | None = None):
        self.json_path = os.path.abspath(os.fspath(json_path))
        if config is None:
            try:
                with open(self.json_path) as f:
                    config = json.load(f)
            except (OSError, ValueError) as e:
                raise DatasetError(f"{self.json_path}: cannot read the dataset config ({e})") from None
        self.json = config
        self.config = SynthConfig.from_dict(config, self.json_path)
        self.image_size = self.config.image_size
        self.normalisation = self.config.modality          # how register.py must map a scan's intensities
        self.segmentation_class_value = {f"label_{k}": k for k in range(1, self.config.n_labels + 1)}
        if self.config.maps.get("brain", 0) > 0:
            self._check_template()

    def _check_template(self) -> None:
        """Brain maps read the ICBM152 files: refuse here, in one line, rather than in a loader worker."""
        from .icbm import FILES, template_dir
        from .image_io import ImageError
        try:
            folder = template_dir()
        except ImageError as e:
            raise DatasetError(f"{self.json_path}: brain label maps need the ICBM152 template: {e}") from None
        missing = [name for name in FILES.values() if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise DatasetError(f"{self.json_path}: brain label maps need the ICBM152 template; {folder} lacks "
                               f"{', '.join(missing)}")

    def validate(self, splits=None) -> None:
        if "brain" in self.config.maps and self.config.maps["brain"] > 0:
            BrainTissues.on_grid(self.image_size)

    def _check_split(self, split) -> str:
        split = str(split)
        if split not in self.scheme_names:
            raise DatasetError(f"{self.json_path}: no split {split!r} (synth datasets have '1' (endless "
                               f"training pairs) and '2' ({self.config.val_pairs} validation pairs))")
        return split

    def pairs(self, split) -> list:
        """Pair keys ``(stream, index)`` of the validation split, in order."""
        if self._check_split(split) == "1":
            raise DatasetError(f"{self.json_path}: split '1' is an endless generated sequence; it has no pair list")
        return [(VAL_STREAM, i) for i in range(self.config.val_pairs)]

    def num_pairs(self, split) -> int:
        return TRAIN_PAIRS if self._check_split(split) == "1" else self.config.val_pairs

    def keyed_pairs(self, split, keys) -> list:
        raise DatasetError(f"{self.json_path}: synth pairs are generated on the fly, so stored teacher flows "
                           f"do not apply; distil with an online teacher (--teacher weights/<run>)")

    def loader(self, split, batch_size: int = 1, loop: bool = False, num_workers: int = 0, seed: int = 0,
               limit: int | None = None, pairs=None, teacher_flows=None) -> DataLoader:
        """:func:`make_synth_loader` over this dataset; stored pair lists and teacher flows do not apply."""
        if teacher_flows is not None or pairs is not None:
            raise DatasetError(f"{self.json_path}: stored teacher flows / pair lists do not apply to a "
                               f"generated (synth) dataset; distil from an online teacher (--teacher)")
        return make_synth_loader(self, split, batch_size, loop=loop, num_workers=num_workers, seed=seed, limit=limit)

    def to_dict(self) -> dict:
        return asdict(self.config)


class SynthPairDataset(Dataset):
    """Items of :func:`make_pair` in the loaders' pair-dict layout (``id1/2``, ``has_seg1/2``)."""

    def __init__(self, dataset: SynthDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return self.dataset.config.val_pairs

    def __getitem__(self, key):
        stream, index = (int(v) for v in key)
        item = make_pair(self.dataset.config, key)
        name = f"{'val' if stream == VAL_STREAM else f'train{stream}'}_{index:06d}_{item.pop('kind')}"
        item.update(id1=name + "_fixed", id2=name + "_moving", has_seg1=True, has_seg2=True)
        return item


class SequentialPairSampler(Sampler):
    """Endless batches of consecutive pair keys of stream ``seed``: batch ``k`` holds indices
    ``k*B .. k*B + B - 1`` (so a resumed run skips batches and continues the same sequence)."""

    def __init__(self, batch_size: int, seed: int = 0):
        self.batch_size, self.seed = batch_size, int(seed)

    def __iter__(self):
        k = 0
        while True:
            yield [(self.seed, k * self.batch_size + i) for i in range(self.batch_size)]
            k += 1


def _single_thread(_worker: int) -> None:
    torch.set_num_threads(1)


def make_synth_loader(dataset: SynthDataset, split, batch_size: int = 1, loop: bool = False,
                      num_workers: int = 0, seed: int = 0, limit: int | None = None) -> DataLoader:
    """Training (``loop``: endless, the pair sequence set by ``seed``) or validation loader."""
    items = SynthPairDataset(dataset)
    init = _single_thread if num_workers > 0 else None
    if loop:
        if dataset._check_split(split) != "1":
            raise DatasetError(f"{dataset.json_path}: training samples split '1'")
        return DataLoader(items, batch_sampler=SequentialPairSampler(batch_size, seed), num_workers=num_workers,
                          worker_init_fn=init)
    pairs = dataset.pairs(split)[:limit] if limit is not None else dataset.pairs(split)
    return DataLoader(_Keyed(items, pairs),
                      batch_size=batch_size, shuffle=False, num_workers=num_workers, worker_init_fn=init)


class _Keyed(Dataset):
    def __init__(self, items, keys):
        self.items, self.keys = items, list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):
        return self.items[self.keys[i]]


def is_synth_config(config) -> bool:
    return isinstance(config, dict) and config.get("format") == FORMAT


__all__ = ["SynthConfig", "SynthDataset", "SynthPairDataset", "SequentialPairSampler", "make_synth_loader",
           "make_pair", "smooth_field", "shapes_map", "brain_map", "synth_image", "BrainTissues", "is_synth_config",
           "FORMAT"]
