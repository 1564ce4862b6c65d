"""Real-anatomy test pairs from the ICBM152 2009a template that nilearn's wheel ships.

Nothing is imported from nilearn: only its data files are read (``pip install --no-deps nilearn``).

* :func:`load_template`: the T1 template (197x233x189, 1 mm, RAS) and grey/white-matter labels from
  its GM/WM probability maps (1 = GM, 2 = WM: the larger of the two where it is >= 0.5);
* :class:`KnownField`: a smooth random pull-back displacement (cubic B-spline of seeded control
  vectors), :class:`KnownTransform`: that field followed by a random affine;
* :func:`deformed`: the template read through a transform on any grid, with optional intensity
  changes (:func:`change_intensities`: bias field, gamma contrast, noise).
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
from scipy import ndimage

from network.outputs import atomic_output

from .image_io import ImageError, Volume, load_image
from .preprocess import Grid, grid_points, world_to_voxel

FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
         "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
         "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}
LABELS = {1: "grey matter", 2: "white matter"}


def template_dir(given: str | None = None) -> str:
    """The folder with the ICBM152 files: ``given``, else nilearn's data folder."""
    if given:
        return given
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImageError("nilearn is not installed (pip install --no-deps nilearn), so the ICBM152 template "
                         "is not here; pass the folder that holds its files")
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")


def load_template(folder: str | None = None) -> tuple:
    """``(t1 Volume, labels uint8 array on the T1 grid)``."""
    src = template_dir(folder)
    t1, gm, wm = (load_image(os.path.join(src, FILES[k])) for k in ("t1", "gm", "wm"))
    labels = np.zeros(t1.shape, np.uint8)
    labels[(gm.data >= 0.5) & (gm.data >= wm.data)] = 1
    labels[(wm.data >= 0.5) & (wm.data > gm.data)] = 2
    return t1, labels


def template_box(volume) -> np.ndarray:
    """World ``(2, 3)`` min/max corners of a volume's field of view."""
    world = np.array([volume.affine[:3, :3] @ c + volume.affine[:3, 3]
                      for c in ([0, 0, 0], np.asarray(volume.shape) - 1)])
    return np.stack([world.min(0), world.max(0)])


class KnownField:
    """A smooth pull-back displacement ``d`` (mm) on world points: cubic B-spline interpolation of
    seeded random control vectors on a lattice of ``spacing`` mm, scaled to ``magnitude`` mm max."""

    def __init__(self, box, spacing: float, magnitude: float, seed: int):
        self.origin = box[0] - spacing
        n = np.ceil((box[1] - box[0]) / spacing).astype(int) + 3
        self.spacing = spacing
        rng = np.random.default_rng(seed)
        self.coeffs = [ndimage.spline_filter(rng.normal(size=n), order=3) for _ in range(3)]
        lattice = np.stack(np.meshgrid(*[np.linspace(0, k - 1, 4 * k) for k in n], indexing="ij"))
        peak = np.sqrt(sum(ndimage.map_coordinates(c, lattice.reshape(3, -1), order=3, prefilter=False) ** 2
                           for c in self.coeffs)).max()
        self.scale = magnitude / peak

    def __call__(self, world: np.ndarray) -> np.ndarray:
        q = ((world.reshape(3, -1) - self.origin[:, None]) / self.spacing)
        d = np.stack([ndimage.map_coordinates(c, q, order=3, mode="nearest", prefilter=False) for c in self.coeffs])
        return (self.scale * d).reshape(world.shape)


def random_affine(rng, center, rotation_deg: float, scale: float, shear: float, shift_mm: float) -> np.ndarray:
    """A 4x4 world affine about ``center``: rotations up to ``rotation_deg`` per axis, scales in
    ``[1 - scale, 1 + scale]``, shears up to ``shear``, shifts up to ``shift_mm``."""
    angles = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3))
    R = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        R = r @ R
    S = np.diag(rng.uniform(1 - scale, 1 + scale, 3))
    H = np.eye(3)
    H[np.triu_indices(3, 1)] = rng.uniform(-shear, shear, 3)
    M = R @ S @ H
    A = np.eye(4)
    A[:3, :3] = M
    A[:3, 3] = center - M @ center + rng.uniform(-shift_mm, shift_mm, 3)
    return A


class KnownTransform:
    """``phi(y) = A (y + d(y))``: where the moving image at world point ``y`` reads the template
    (field ``d`` first, then the affine ``A``). :meth:`inverse` solves ``phi(y) = x``."""

    def __init__(self, field: KnownField, affine: np.ndarray | None = None):
        self.field = field
        self.affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)

    def __call__(self, world: np.ndarray) -> np.ndarray:
        z = world + self.field(world)
        flat = self.affine[:3, :3] @ z.reshape(3, -1) + self.affine[:3, 3:4]
        return flat.reshape(world.shape)

    def inverse(self, world: np.ndarray, iterations: int = 40) -> np.ndarray:
        inv = np.linalg.inv(self.affine)
        z = (inv[:3, :3] @ world.reshape(3, -1) + inv[:3, 3:4]).reshape(world.shape)
        y = z.copy()
        for _ in range(iterations):
            y = z - self.field(y)
        return y


def deformed(image: Volume, labels: np.ndarray, transform, grid: Grid) -> tuple:
    """``(image, labels)`` read through ``transform`` on ``grid``: ``out(y) = template(transform(y))``
    (linear for the image, nearest for the labels, outside: the image minimum / 0)."""
    out = np.empty(grid.shape, np.float32)
    out_labels = np.empty(grid.shape, np.uint8)
    for k in range(grid.shape[2]):
        world = grid_points(grid, k, k + 1)
        src = world_to_voxel(image.affine, transform(world)).reshape(3, -1)
        out[..., k:k + 1] = ndimage.map_coordinates(image.data, src, order=1, mode="constant",
                                                   cval=float(image.data.min())).reshape(world.shape[1:])
        out_labels[..., k:k + 1] = ndimage.map_coordinates(labels, src, order=0,
                                                          mode="constant").reshape(world.shape[1:])
    return out, out_labels


def change_intensities(image: np.ndarray, rng, bias: float = 0.3, gamma: float = 0.3, noise: float = 0.02,
                       invert: bool = False) -> np.ndarray:
    """A scanner change: ``image`` scaled to [0, 1], raised to ``exp(U(-gamma, gamma))``, times a
    smooth bias field ``exp(bias * smooth noise)``, plus Gaussian noise of ``noise`` (x 1);
    ``invert``: ``1 - image`` first (a T2-like contrast)."""
    low, high = float(image.min()), float(image.max())
    x = (image - low) / max(high - low, 1e-6)
    if invert:
        x = np.where(x > 0.02, 1.0 - x, 0.0)
    x = x ** float(np.exp(rng.uniform(-gamma, gamma)))
    coarse = rng.normal(size=tuple(max(2, s // 40) for s in image.shape))
    field = ndimage.zoom(coarse, [s / c for s, c in zip(image.shape, coarse.shape)], order=3)
    field = field[tuple(slice(0, s) for s in image.shape)]
    field = field / max(np.abs(field).max(), 1e-6)
    x = x * np.exp(bias * field)
    x = x + noise * rng.normal(size=image.shape)
    return np.clip(x, 0, None).astype(np.float32)


# ---- real-anatomy test pairs ----------------------------------------------------------------------

def pair_grid(t1, spacing: float = 2.0) -> Grid:
    """An axis-aligned RAS grid of ``spacing`` mm over the template's field of view (99x117x95 at 2 mm)."""
    box = template_box(t1)
    shape = tuple(int(v) for v in np.floor((box[1] - box[0]) / spacing) + 1)
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3) * spacing
    affine[:3, 3] = box[0]
    return Grid(shape, affine)


def _save(path: str, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_output(path) as tmp:
        nib.save(img, tmp)


class IcbmPairs:
    """Fixed: the template on :func:`pair_grid`; moving ``seed``: the template read through a known
    transform ``A o (id + d)`` (smooth field, control points every 40 mm, up to ``magnitude`` mm; random
    affine: rotations up to 10 degrees per axis, scales 0.9-1.1, shears up to 0.05, shifts up to 10 mm),
    then a scanner change (bias field, gamma, noise; ``contrast="inverted"``: a T2-like inversion).
    :meth:`write` saves NIfTIs into ``folder``: ``fixed.nii.gz``, ``fixed_label.nii.gz``,
    ``moving_<seed>.nii.gz``, ``moving_label_<seed>.nii.gz`` (labels 1 GM, 2 WM)."""

    def __init__(self, folder: str, magnitude: float = 8.0, contrast: str = "same", template_dir=None,
                 spacing: float = 2.0):
        if contrast not in ("same", "inverted"):
            raise ValueError(f"contrast must be 'same' or 'inverted', got {contrast!r}")
        self.folder, self.magnitude, self.contrast = folder, magnitude, contrast
        self.t1, self.labels, self.grid = self.template(template_dir, spacing)
        self.box = template_box(self.t1)
        os.makedirs(folder, exist_ok=True)
        identity = KnownTransform(KnownField(self.box, 40.0, 0.0, 0))
        fixed, self.fixed_labels = deformed(self.t1, self.labels, identity, self.grid)
        self.paths = {"fixed": os.path.join(folder, "fixed.nii.gz"),
                      "fixed_label": os.path.join(folder, "fixed_label.nii.gz")}
        _save(self.paths["fixed"], fixed, self.grid.affine)
        _save(self.paths["fixed_label"], self.fixed_labels, self.grid.affine)

    modality = "mri"                # how register.py is told to scale these images
    label_names = LABELS

    def template(self, template_dir, spacing: float) -> tuple:
        """``(template Volume, its labels, the pair grid)``."""
        t1, labels = load_template(template_dir)
        return t1, labels, pair_grid(t1, spacing)

    def scanner_change(self, moving: np.ndarray, rng) -> np.ndarray:
        return change_intensities(moving, rng, invert=self.contrast == "inverted")

    def write(self, seed: int) -> dict:
        """The pair ``seed``: paths, ``seed``, ``transform`` (:class:`KnownTransform`), ``moving_labels``."""
        rng = np.random.default_rng(1000 + seed)
        transform = KnownTransform(KnownField(self.box, 40.0, self.magnitude, seed),
                                   random_affine(rng, (self.box[0] + self.box[1]) / 2, 10.0, 0.1, 0.05, 10.0))
        moving, moving_labels = deformed(self.t1, self.labels, transform, self.grid)
        moving = self.scanner_change(moving, rng)
        pair = dict(self.paths, seed=seed, transform=transform, moving_labels=moving_labels,
                    moving=os.path.join(self.folder, f"moving_{seed}.nii.gz"),
                    moving_label=os.path.join(self.folder, f"moving_label_{seed}.nii.gz"))
        _save(pair["moving"], moving, self.grid.affine)
        _save(pair["moving_label"], moving_labels, self.grid.affine)
        return pair


def main(argv=None) -> int:
    """``python -m data_util.icbm -o FOLDER [--seeds 0 1] [--contrast same|inverted]``: test pairs."""
    import argparse
    import sys
    p = argparse.ArgumentParser(prog="python -m data_util.icbm", description=IcbmPairs.__doc__)
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="moving images to write")
    p.add_argument("--magnitude", type=float, default=8.0, help="largest displacement of the smooth field, mm")
    p.add_argument("--contrast", choices=["same", "inverted"], default="same")
    p.add_argument("--template_dir", default=None, help="folder with the ICBM152 files (default: nilearn's)")
    args = p.parse_args(argv)
    try:
        pairs = IcbmPairs(args.out, args.magnitude, args.contrast, args.template_dir)
        for seed in args.seeds:
            pairs.write(seed)
    except (ImageError, OSError) as e:
        print(f"python -m data_util.icbm: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {pairs.paths['fixed']} and {len(args.seeds)} moving image(s) with labels (1 GM, 2 WM) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
