"""Bringing scans onto a network's grid in world coordinates, and intensities into [0, 1].

A :class:`Grid` is a voxel lattice placed in the world (``affine``: voxel -> RAS+ mm). The model grid
is axis-aligned in the world with a chosen orientation (default ``LPS``: axis 0 towards the patient's
left, 1 posterior, 2 superior, the layout of DICOM axial series and of ``data_util.synthetic``),
isotropic spacing, and a fixed shape. :func:`resample` samples any :class:`Volume` on any grid with
scipy, in chunks so original-resolution grids of any size fit in memory.

:class:`Normalisation` maps intensities to [0, 1] (CT: window/level, RCN liver W 290 / L 120;
MRI: robust percentiles, 0.5 and 99.5 by default;
``uint8``: already 0..255 like the RCN HDF5 volumes) and records its numbers so the mapping can be undone.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .image_io import ImageError, Volume, apply_affine

AXIS_DIRECTIONS = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0),
                   "S": (0, 0, 1), "I": (0, 0, -1)}
CT_WINDOW = (290.0, 120.0)            # width, level (HU): RCN's liver window
MRI_PERCENTILES = (0.5, 99.5)
_CHUNK_VOXELS = 1 << 21               # points sampled per scipy call


@dataclass
class Grid:
    """A voxel lattice in the world: ``shape`` (X, Y, Z) and ``affine`` voxel -> RAS+ mm."""
    shape: tuple
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(0))

    def to_dict(self) -> dict:
        return {"shape": [int(s) for s in self.shape], "affine": np.asarray(self.affine).tolist()}

    @classmethod
    def of(cls, volume: Volume) -> "Grid":
        return cls(volume.shape, volume.affine)


def orientation_matrix(axcodes: str) -> np.ndarray:
    """3x3 matrix whose column ``c`` is the world (RAS+) direction axis ``c`` points to."""
    codes = str(axcodes).upper()
    if len(codes) != 3 or any(c not in AXIS_DIRECTIONS for c in codes) or \
            {int(np.flatnonzero(AXIS_DIRECTIONS[c])[0]) for c in codes} != {0, 1, 2}:
        raise ValueError(f"orientation must be three distinct axis letters out of R/L, A/P, S/I, got {axcodes!r}")
    return np.array([AXIS_DIRECTIONS[c] for c in codes], dtype=np.float64).T


def corners(volume: Volume | Grid) -> np.ndarray:
    """World positions ``(8, 3)`` of the corner voxel centres."""
    shape = np.asarray(volume.shape) - 1
    ijk = np.array([[a, b, c] for a in (0, shape[0]) for b in (0, shape[1]) for c in (0, shape[2])], float)
    return ijk @ volume.affine[:3, :3].T + volume.affine[:3, 3]


def model_grid(reference: Volume, shape, spacing: float | None = None, orientation: str = "LPS",
               center=None, box=None) -> Grid:
    """An axis-aligned grid of ``shape`` voxels around ``reference``.

    ``center``: world point at the grid centre (default: the centre of ``box`` or of the reference's
    field of view). ``box``: ``(2, 3)`` world min/max corners to cover (default: the reference's field
    of view). ``spacing`` (isotropic mm; default: the smallest that fits the box into ``shape``).
    """
    shape = tuple(int(s) for s in shape)
    direction = orientation_matrix(orientation)
    points = corners(reference) if box is None else np.asarray(box, dtype=np.float64)
    if center is None:
        center = (points.min(0) + points.max(0)) / 2
    if spacing is None:
        along = points @ direction                    # coordinates along the grid axes
        extent = along.max(0) - along.min(0)
        spacing = float(np.max(extent / (np.asarray(shape) - 1)))
    if not spacing > 0:
        raise ValueError(f"grid spacing must be positive, got {spacing}")
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = np.asarray(center, dtype=np.float64) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return Grid(shape, affine)


def fov_grid(reference: Volume, spacing: float, orientation: str = "LPS", box=None, multiple: int = 1) -> Grid:
    """An axis-aligned grid of isotropic ``spacing`` mm covering ``box`` (world ``(2, 3)`` corners;
    default the reference's field of view), its shape rounded up to a multiple of ``multiple``."""
    if not spacing > 0:
        raise ValueError(f"grid spacing must be positive, got {spacing}")
    direction = orientation_matrix(orientation)
    points = corners(reference) if box is None else np.asarray(box, dtype=np.float64)
    along = points @ direction
    n = np.floor((along.max(0) - along.min(0)) / spacing + 1e-6).astype(int) + 1
    shape = tuple(int(multiple * np.ceil(max(v, 4) / multiple)) for v in n)
    return model_grid(reference, shape, spacing, orientation, box=box)


def label_box(label: Volume, margin: float) -> np.ndarray:
    """World ``(2, 3)`` min/max of the label map's foreground voxels, widened by ``margin`` mm."""
    ijk = np.argwhere(label.data > 0)
    if ijk.size == 0:
        raise ImageError(f"{label.path}: label map is empty; nothing to crop around")
    world = apply_affine(label.affine, np.concatenate([ijk.min(0, keepdims=True), ijk.max(0, keepdims=True)]))
    return np.stack([world.min(0) - margin, world.max(0) + margin])


def grid_points(grid: Grid, start: int, stop: int) -> np.ndarray:
    """World coordinates ``(3, X, Y, stop-start)`` of the grid's slices ``start:stop`` along axis 2."""
    i, j, k = np.meshgrid(np.arange(grid.shape[0]), np.arange(grid.shape[1]), np.arange(start, stop),
                          indexing="ij")
    ijk = np.stack([i, j, k]).reshape(3, -1).astype(np.float64)
    return (grid.affine[:3, :3] @ ijk + grid.affine[:3, 3:4]).reshape(3, *i.shape)


def world_to_voxel(affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    """World points ``(3, ...)`` -> voxel coordinates ``(3, ...)`` of the grid with ``affine``."""
    inv = np.linalg.inv(affine)
    flat = world.reshape(3, -1)
    return (inv[:3, :3] @ flat + inv[:3, 3:4]).reshape(world.shape)


def _slabs(grid: Grid):
    per_slice = grid.shape[0] * grid.shape[1]
    step = max(1, _CHUNK_VOXELS // per_slice)
    for start in range(0, grid.shape[2], step):
        yield start, min(grid.shape[2], start + step)


def sample(data: np.ndarray, voxel_coords: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """``data`` at fractional voxel coordinates ``(3, ...)``; outside the volume: ``cval``."""
    return ndimage.map_coordinates(data, voxel_coords.reshape(3, -1), order=order, mode="constant",
                                   cval=cval, prefilter=False).reshape(voxel_coords.shape[1:])


def lattice_copy(data: np.ndarray, affine: np.ndarray, grid: Grid):
    """``data`` (on a lattice with ``affine``) read at every voxel of ``grid`` without interpolation,
    when each grid voxel is one of its voxels (axes permuted / flipped, integer offsets, all inside);
    else ``None``. Exact: interpolation at lattice points returns the stored values."""
    M = np.linalg.inv(affine) @ grid.affine
    R, o = M[:3, :3], M[:3, 3]
    signs = np.round(R)
    if np.abs(R - signs).max() > 1e-6 or np.abs(o - np.round(o)).max() > 1e-6 or \
            not (np.abs(signs).sum(0) == 1).all() or not (np.abs(signs).sum(1) == 1).all():
        return None
    perm = [int(np.flatnonzero(signs[:, a])[0]) for a in range(3)]     # grid axis a -> data axis perm[a]
    out = np.transpose(data, perm)
    index = []
    for a, n in enumerate(grid.shape):
        start, sign = int(round(o[perm[a]])), int(signs[perm[a], a])
        stop = start + sign * (n - 1)
        if min(start, stop) < 0 or max(start, stop) >= data.shape[perm[a]]:
            return None
        index.append(slice(start, stop + 1) if sign > 0 else slice(start, stop - 1 if stop > 0 else None, -1))
    return out[tuple(index)]


def resample(volume: Volume, grid: Grid, order: int = 1, cval: float | None = None,
             world_map=None, displacement: np.ndarray | None = None, dtype=np.float32) -> np.ndarray:
    """``volume`` sampled at each voxel of ``grid`` (``order`` 1 trilinear, 0 nearest).

    The volume is read at world point ``x + displacement[x]`` (``(X, Y, Z, 3)`` mm on ``grid``, a
    registration's pull-back field) or ``world_map(x)`` (a function of world points ``(3, ...)``, e.g.
    an initial translation); default: ``x``. Outside the volume: ``cval`` (default: its minimum for
    images, 0 for order 0).
    """
    if world_map is None and displacement is None:
        same = lattice_copy(volume.data, volume.affine, grid)
        if same is not None:
            return np.ascontiguousarray(same, dtype=dtype)
    if cval is None:
        cval = 0.0 if order == 0 else float(volume.data.min())
    data = volume.data if order == 0 else volume.data.astype(np.float32, copy=False)
    out = np.empty(grid.shape, dtype=dtype)
    for start, stop in _slabs(grid):
        world = grid_points(grid, start, stop)
        if world_map is not None:
            world = world_map(world)
        if displacement is not None:
            world = world + np.moveaxis(displacement[:, :, start:stop], -1, 0)
        out[..., start:stop] = sample(data, world_to_voxel(volume.affine, world), order, cval)
    return out


def resample_labels(volume: Volume, grid: Grid, world_map=None, method: str = "nearest",
                    displacement: np.ndarray | None = None) -> np.ndarray:
    """A label map on ``grid``: ``nearest`` neighbour, or ``linear``: each label's mask sampled
    trilinearly and the voxel given the label with the largest weight (smoother boundaries)."""
    if method == "nearest":
        return resample(volume, grid, order=0, cval=0, world_map=world_map, displacement=displacement,
                        dtype=np.int32)
    if method != "linear":
        raise ValueError(f"label interpolation must be 'nearest' or 'linear', got {method!r}")
    values = np.unique(volume.data)
    best = np.zeros(grid.shape, dtype=np.float32)
    out = np.zeros(grid.shape, dtype=np.int32)
    for value in values:
        mask = Volume((volume.data == value).astype(np.float32), volume.affine, volume.path)
        weight = resample(mask, grid, order=1, cval=float(value == 0), world_map=world_map,
                          displacement=displacement)
        better = weight > best
        out[better], best[better] = value, weight[better]
    return out


# ---- intensities --------------------------------------------------------------------------------

@dataclass
class Normalisation:
    """``x -> clip((x - low) / (high - low), 0, 1)``; :meth:`undo` maps back (inside [low, high])."""
    modality: str
    low: float
    high: float

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.modality == "none":                       # as stored (Learn2Reg "none")
            return np.asarray(x, dtype=np.float32)
        return np.clip((x - self.low) / (self.high - self.low), 0.0, 1.0).astype(np.float32)

    def undo(self, y: np.ndarray) -> np.ndarray:
        return (self.low + y * (self.high - self.low)).astype(np.float32)

    def to_dict(self) -> dict:
        return asdict(self)


def detect_modality(volume: Volume) -> str:
    """``ct`` for DICOM CT or values reaching below -500 (Hounsfield air), else ``mri``."""
    modality = volume.meta.get("modality", "")
    if modality == "CT":
        return "ct"
    if modality == "MR":
        return "mri"
    return "ct" if float(volume.data.min()) < -500 else "mri"


def normalisation_for(volume: Volume, modality: str = "auto", window=CT_WINDOW,
                      percentiles=MRI_PERCENTILES) -> Normalisation:
    """The intensity mapping for ``volume``: CT window ``(width, level)`` in HU, or MRI percentiles
    of all voxels (background included, so the low end is the background level)."""
    if modality == "auto":
        modality = detect_modality(volume)
    if modality == "ct":
        width, level = (float(v) for v in window)
        if width <= 0:
            raise ValueError(f"CT window width must be positive, got {width}")
        return Normalisation("ct", level - width / 2, level + width / 2)
    if modality == "mri":
        data = volume.data
        if float(data.max()) <= float(data.min()):
            raise ImageError(f"{volume.path}: image is constant ({float(data.min())}); nothing to register")
        low, high = (float(v) for v in np.percentile(data, percentiles))
        if high <= low:
            low, high = float(data.min()), float(data.max())
        return Normalisation("mri", low, high)
    if modality == "uint8":
        return Normalisation("uint8", 0.0, 255.0)
    if modality == "l2r":
        # Learn2Reg's recipe (data_util.learn2reg.normalise_l2r): z-score with the statistics of the
        # voxels > 0, clip to +-5 std, min-max to [0, 1]: a linear map of [low, high] onto [0, 1]
        data = np.asarray(volume.data, dtype=np.float64)
        foreground = data[data > 0]
        if foreground.size == 0 or float(data.max()) <= float(data.min()):
            raise ImageError(f"{volume.path}: no voxels > 0 or a constant image; the model's l2r "
                             f"normalisation cannot be applied")
        mean, std = float(foreground.mean()), float(foreground.std()) or 1.0
        low, high = max(float(data.min()), mean - 5 * std), min(float(data.max()), mean + 5 * std)
        if high <= low:
            raise ImageError(f"{volume.path}: intensities span no range; nothing to register")
        return Normalisation("l2r", low, high)
    if modality == "none":
        return Normalisation("none", 0.0, 1.0)
    raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")


MODALITIES = ("auto", "ct", "mri", "uint8")
MODEL_MODALITIES = MODALITIES + ("l2r", "none")     # also the Learn2Reg normalisations a model may be trained on


def preprocessing_arg_error(args) -> str | None:
    """One error line for preprocessing option values that cannot work (None when they are fine)."""
    try:
        orientation_matrix(args.orientation)
    except ValueError as e:
        return f"--orientation: {e}"
    if not args.window[0] > 0:
        return f"--window: width must be positive, got {args.window[0]:g}"
    if not 0 <= args.percentiles[0] < args.percentiles[1] <= 100:
        return f"--percentiles: need 0 <= LOW < HIGH <= 100, got {[float(v) for v in args.percentiles]}"
    return None


def add_preprocessing_args(parser, modalities=MODALITIES) -> None:
    """The intensity and model-grid options shared by ``register.py`` and ``convert_dataset.py``
    (numbers checked at parse time: finite, margin >= 0)."""
    from network.cli import finite_float, nonneg_float
    parser.add_argument("--modality", choices=list(modalities), default="auto",
                        help="intensity normalisation (auto: CT for DICOM CT or values below -500)")
    parser.add_argument("--window", type=finite_float, nargs=2, default=CT_WINDOW, metavar=("WIDTH", "LEVEL"),
                        help="CT window in HU (default RCN's liver window 290 120)")
    parser.add_argument("--percentiles", type=finite_float, nargs=2, default=MRI_PERCENTILES, metavar=("LOW", "HIGH"),
                        help="MRI intensity percentiles mapped to 0 and 1")
    parser.add_argument("--orientation", default="LPS", help="model grid axis directions (default LPS)")
    parser.add_argument("--crop", choices=["fov", "label"], default="fov",
                        help="centre the model grid on the (fixed) scan's field of view or its label box")
    parser.add_argument("--margin", type=nonneg_float, default=10.0, help="mm around the label box for --crop label")
    parser.add_argument("--label_interp", choices=["nearest", "linear"], default="nearest",
                        help="label resampling: nearest neighbour or per-label linear weights")
