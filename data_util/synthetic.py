"""Synthetic abdomen-like registration dataset in the RCN layout (one HDF5 file + one JSON config).

Usage::

    python -m data_util.synthetic --out data/synthetic --size 64 --train 16 --val 6 --seed 0

Each scan is a subject template (body, lobed liver, two kidneys, spine, stomach) warped by a known
smooth deformation (small affine + cubic B-spline FFD). By default all scans share one template
anatomy, so the true flow between any two scans is known (:func:`true_pair_flow`); with
``--anatomy per-scan`` each scan also gets random organ sizes and positions.
Axes: 0 = left-right, 1 = anterior-posterior, 2 = cranio-caudal; all coordinates in voxels.

HDF5 group ``synth/<split>_<nnn>`` holds:

* ``volume`` uint8 ``(X, Y, Z)`` 0..255;
* ``segmentation`` uint8 ``(X, Y, Z)`` label values (1 liver, 2 kidneys, 3 spine, 4 stomach);
* ``point`` float32 ``(6, 3)`` landmarks in voxels (liver centre, liver left lobe, liver tip,
  right kidney, left kidney, stomach), rows of -1 = missing;
* ``deformation`` float16 ``(3, X, Y, Z)``: pull-back displacement ``u`` in voxels from the scan
  grid into the subject's template, ``scan(p) = template(p + u(p))``.
"""
from __future__ import annotations

import json
import os
import time

import h5py
import numpy as np
import torch

from data_util.augmentation import interpolate_control_grid, invert_points
from data_util.icbm import IcbmPairs
from network.outputs import atomic_output

LABELS = {"liver": 1, "kidney": 2, "spine": 3, "stomach": 4}
INTENSITY = {"body": 95.0, "liver": 150.0, "kidney": 190.0, "spine": 235.0, "stomach": 35.0}
LANDMARKS = ("liver centre", "liver left lobe", "liver tip", "right kidney", "left kidney", "stomach")

# canonical layout, fractions of the image size: (centre, radii)
_LIVER_LOBES = (((0.33, 0.42, 0.64), (0.17, 0.15, 0.14)),
                ((0.50, 0.34, 0.70), (0.13, 0.08, 0.09)),
                ((0.29, 0.46, 0.50), (0.09, 0.10, 0.10)))
_KIDNEYS = (((0.31, 0.67, 0.42), (0.075, 0.08, 0.12)), ((0.69, 0.67, 0.45), (0.075, 0.08, 0.12)))
_STOMACH = ((0.67, 0.38, 0.63), (0.11, 0.09, 0.10))
_BODY = ((0.50, 0.50, 0.50), (0.45, 0.36, 0.80))
_SPINE = ((0.50, 0.76), 0.08)


def _jitter(rng, shape, size, shift=0.02, scale=0.10):
    """Randomly moved / scaled ellipsoid ``(centre, radii)`` in voxels."""
    centre, radii = (np.asarray(v, dtype=np.float64) for v in shape)
    centre = (centre + rng.normal(0, shift, 3)) * (size - 1)
    radii = radii * np.clip(1 + rng.normal(0, scale, 3), 0.7, 1.3) * size
    return centre, radii


def sample_subject(rng: np.random.Generator, size: int) -> dict:
    """Random subject template parameters (ellipsoid centres/radii in voxels)."""
    subject = {"body": _jitter(rng, _BODY, size, 0.01, 0.04),
               "liver": [_jitter(rng, lobe, size) for lobe in _LIVER_LOBES],
               "kidney": [_jitter(rng, k, size, 0.02, 0.1) for k in _KIDNEYS],
               "stomach": _jitter(rng, _STOMACH, size)}
    (sx, sy), sr = _SPINE
    subject["spine"] = (np.array([sx, sy + rng.normal(0, 0.01)]) * (size - 1),
                        sr * size * (1 + rng.normal(0, 0.05)), size * rng.uniform(0.10, 0.14))
    return subject


def _ellipsoid_distance(q: torch.Tensor, ellipsoid) -> torch.Tensor:
    """Approximate signed distance (voxels, negative inside) to an ellipsoid at points ``q`` (3, ...)."""
    centre, radii = (torch.as_tensor(v, dtype=q.dtype).view(3, *([1] * (q.dim() - 1))) for v in ellipsoid)
    return (((q - centre) / radii).square().sum(0).sqrt() - 1) * radii.mean()


def _spine_distance(q: torch.Tensor, spine) -> torch.Tensor:
    (cx, cy), radius, period = spine
    radius = radius * (1 + 0.12 * torch.cos(2 * np.pi * q[2] / period))
    return ((q[0] - cx).square() + (q[1] - cy).square()).sqrt() - radius


def render_template(subject: dict, q: torch.Tensor, edge: float = 0.6, intensity: dict = INTENSITY):
    """Evaluate a subject template at voxel coordinates ``q`` ``(3, X, Y, Z)``.

    Returns ``(intensity float32, labels uint8)``, both ``(X, Y, Z)``: 0 outside the body, then
    ``intensity[structure]`` (default :data:`INTENSITY`, 0..255); later structures overwrite earlier
    ones (body, liver, stomach, kidneys, spine).
    """
    structures = [("body", _ellipsoid_distance(q, subject["body"])),
                  ("liver", torch.stack([_ellipsoid_distance(q, e) for e in subject["liver"]]).amin(0)),
                  ("stomach", _ellipsoid_distance(q, subject["stomach"])),
                  ("kidney", torch.stack([_ellipsoid_distance(q, e) for e in subject["kidney"]]).amin(0)),
                  ("spine", _spine_distance(q, subject["spine"]))]
    image = torch.zeros(q.shape[1:])
    labels = torch.zeros(q.shape[1:], dtype=torch.uint8)
    for name, dist in structures:
        soft = torch.sigmoid(-dist / edge)
        image = image * (1 - soft) + intensity[name] * soft
        if name in LABELS:
            labels[dist < 0] = LABELS[name]
    return image, labels


def template_landmarks(subject: dict) -> np.ndarray:
    """The 6 landmarks ``(6, 3)`` in template voxel coordinates (order of ``LANDMARKS``)."""
    (c0, _), (c1, _), (c2, r2) = subject["liver"]
    tip = c2 - np.array([0.0, 0.0, 0.6 * r2[2]])
    return np.stack([c0, c1, tip, subject["kidney"][0][0], subject["kidney"][1][0],
                     subject["stomach"][0]]).astype(np.float32)


def random_deformation(rng: np.random.Generator, size: int, ffd_std: float = 0.025,
                       control_points: int = 5, max_angle: float = 6.0, scale_std: float = 0.04,
                       shift_std: float = 0.015) -> torch.Tensor:
    """Smooth pull-back displacement ``(3, S, S, S)`` in voxels: small affine about the centre
    (rotation up to ``max_angle`` degrees, scaling, translation) plus a cubic B-spline FFD."""
    angles = np.deg2rad(rng.uniform(-max_angle, max_angle, 3))
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        i, j = [a for a in range(3) if a != axis]
        rot = np.eye(3)
        rot[i, i] = rot[j, j] = np.cos(angle)
        rot[i, j], rot[j, i] = -np.sin(angle), np.sin(angle)
        matrix = rot @ matrix
    matrix = matrix @ np.diag(1 + rng.normal(0, scale_std, 3))
    shift = rng.normal(0, shift_std, 3) * size
    centre = (size - 1) / 2
    axes = torch.arange(size, dtype=torch.float32) - centre
    grid = torch.stack(torch.meshgrid(axes, axes, axes, indexing="ij"))
    linear = torch.as_tensor(matrix - np.eye(3), dtype=torch.float32)
    flow = torch.einsum("ij,jxyz->ixyz", linear, grid) + torch.as_tensor(shift, dtype=torch.float32).view(3, 1, 1, 1)
    control = torch.as_tensor(rng.normal(0, ffd_std * size, (1, 3) + (control_points,) * 3), dtype=torch.float32)
    return flow + interpolate_control_grid(control, (size,) * 3)[0]


def make_scan(rng: np.random.Generator, size: int, missing_prob: float = 0.3, subject: dict | None = None,
              ffd_std: float = 0.025) -> dict:
    """One synthetic scan: ``volume`` uint8, ``segmentation`` uint8, ``point`` float32 (6, 3),
    ``deformation`` float16 (3, S, S, S) (see module docstring). ``subject``: the template anatomy
    (see :func:`sample_subject`); a new random one when None."""
    if subject is None:
        subject = sample_subject(rng, size)
    flow = random_deformation(rng, size, ffd_std=ffd_std)
    axes = torch.arange(size, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axes, axes, axes, indexing="ij"))
    image, labels = render_template(subject, grid + flow)
    bias_control = torch.as_tensor(rng.normal(0, 0.06, (1, 1, 3, 3, 3)), dtype=torch.float32)
    image = image * (1 + interpolate_control_grid(bias_control, (size,) * 3)[0, 0])
    noise = torch.as_tensor(rng.normal(0, 3.0, image.shape), dtype=torch.float32)
    volume = (image + noise).round().clamp(0, 255).to(torch.uint8)
    points = invert_points(torch.from_numpy(template_landmarks(subject))[None], flow[None], 20)[0].numpy()
    outside = ((points < 0) | (points > size - 1)).any(1)
    if rng.random() < missing_prob:
        outside[rng.choice(len(points), size=rng.integers(1, 3), replace=False)] = True
    points[outside] = -1
    return {"volume": volume.numpy(), "segmentation": labels.numpy(), "point": points.astype(np.float32),
            "deformation": flow.numpy().astype(np.float16)}


def true_pair_flow(fixed_deformation, moving_deformation, iterations: int = 20) -> torch.Tensor:
    """Ground-truth flow ``v`` ``(3, X, Y, Z)`` (voxels) between two scans of one shared template.

    With ``scan_k(p) = template(p + u_k(p))`` (the stored ``deformation`` fields ``u_k``), ``v`` solves
    ``p + v(p) + u_moving(p + v(p)) = p + u_fixed(p)``, so ``moving(p + v(p)) = fixed(p)``: the flow a
    perfect registration of (fixed, moving) would predict. Only meaningful for datasets generated with
    ``anatomy="shared"``.
    """
    u_f = torch.as_tensor(np.asarray(fixed_deformation), dtype=torch.float32)
    u_m = torch.as_tensor(np.asarray(moving_deformation), dtype=torch.float32)
    shape = u_f.shape[1:]
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    targets = (grid + u_f).reshape(3, -1).T[None]                      # template points phi_f(p)
    sources = invert_points(targets, u_m[None], iterations)[0]          # phi_m^-1(phi_f(p))
    return sources.T.reshape(3, *shape) - grid


class OracleTeacher:
    """The generator's ground-truth pair flows as a teacher (``extract_teacher.py --oracle``).

    For a dataset written by :func:`generate` with ``anatomy="shared"``: the flow of the pair
    ``(fixed, moving)`` is :func:`true_pair_flow` of their stored ``deformation`` fields, the flow a
    perfect registration predicts. It separates "does distillation work" from "is the teacher good".
    """

    def __init__(self, dataset):
        with open(dataset.json_path, encoding="utf-8") as f:
            meta = json.load(f).get("synthetic")
        if not isinstance(meta, dict) or meta.get("anatomy") != "shared":
            raise ValueError(f"{dataset.json_path}: the oracle teacher needs a synthetic dataset generated with "
                             f"--anatomy shared (its JSON has no \"synthetic\": {{\"anatomy\": \"shared\"}} entry)")
        self.dataset = dataset
        self.image_size = tuple(int(s) for s in dataset.image_size)
        self.meta = dict(meta)

    def deformation(self, entry: str) -> np.ndarray:
        path, key = self.dataset.locate(entry)
        group = self.dataset._file(path).get(key)
        if group is None or "deformation" not in group:
            raise ValueError(f"{path}: entry '{entry}' has no stored 'deformation' (not written by the generator)")
        return group["deformation"][()].astype(np.float32)

    def flow(self, fixed_entry: str, moving_entry: str) -> np.ndarray:
        """Ground-truth flow ``(3, X, Y, Z)`` float32 in voxels."""
        return true_pair_flow(self.deformation(fixed_entry), self.deformation(moving_entry)).numpy()

    def fingerprint(self) -> dict:
        return {"oracle": "synthetic ground truth", "synthetic": self.meta, "image_size": list(self.image_size)}


# ---- CT benchmark pairs with a known transform -----------------------------------------------------

# HU of each phantom structure (portal-venous CT); the body's outside is air (-1000 HU)
PHANTOM_HU = {"body": 30.0, "liver": 110.0, "kidney": 170.0, "spine": 450.0, "stomach": 5.0}


def phantom_ct(size: int = 96, spacing: float = 3.0, seed: int = 0):
    """``(Volume in HU, labels uint8)``: the abdomen phantom of :func:`sample_subject` (``seed``) on a
    ``size``^3 grid of ``spacing`` mm centred on the origin (labels: :data:`LABELS`)."""
    from .image_io import Volume
    subject = sample_subject(np.random.default_rng(seed), size)
    axes = torch.arange(size, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axes, axes, axes, indexing="ij"))
    image, labels = render_template(subject, grid, intensity={k: v + 1000.0 for k, v in PHANTOM_HU.items()})
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (size - 1) / 2
    return Volume(image.numpy() - 1000.0, affine, f"abdomen phantom {seed}"), labels.numpy()


class AbdomenPairs(IcbmPairs):
    """CT test pairs like :class:`data_util.icbm.IcbmPairs`, from the abdomen phantom in HU
    (``size``^3 at ``spacing`` mm, 96^3 at 3 mm by default) instead of the ICBM152 template: moving
    ``seed`` is the phantom through a known random affine and smooth field, then a scanner change
    (HU offset up to 15, noise of 5-20 HU). Labels: 1 liver, 2 kidneys, 3 spine, 4 stomach. Its
    shapes come from another generator than the training label maps (:mod:`data_util.synth_labels`),
    but it is a phantom, not a real scan."""

    modality = "ct"
    label_names = {v: k for k, v in LABELS.items()}

    def __init__(self, folder: str, magnitude: float = 8.0, contrast: str = "same", template_dir=None,
                 spacing: float = 3.0, size: int = 96):
        if contrast != "same":
            raise ValueError(f"the abdomen CT pairs have one contrast; got contrast {contrast!r}")
        self.size = size
        super().__init__(folder, magnitude, contrast, template_dir, spacing)

    def template(self, template_dir, spacing: float) -> tuple:
        from .preprocess import Grid
        volume, labels = phantom_ct(self.size, spacing)
        return volume, labels, Grid(volume.shape, volume.affine)

    def scanner_change(self, moving: np.ndarray, rng) -> np.ndarray:
        noise = rng.uniform(5.0, 20.0) * rng.normal(size=moving.shape)
        return (moving + rng.uniform(-15.0, 15.0) + noise).astype(np.float32)


def generate(out_dir, size: int = 64, n_train: int = 16, n_val: int = 6, seed: int = 0,
             name: str = "synthetic", verbose: bool = False, anatomy: str = "shared",
             ffd_std: float | None = None) -> str:
    """Write ``<out_dir>/<name>.h5`` and ``<out_dir>/<name>.json`` (RCN layout) atomically.

    Deterministic for ``(size, n_train, n_val, seed)``: scan ``k`` of a split uses its own seed
    derived from ``seed``. Returns the JSON path. Schemes: ``"1"`` train, ``"2"`` and ``"val"``
    validation.

    ``anatomy="shared"``: every scan is the same template anatomy under its own known deformation,
    so the true flow between any two scans is known (:func:`true_pair_flow`); ``"per-scan"``: every
    scan also gets its own random organ sizes and positions (more realistic, no pairwise truth).
    ``ffd_std``: B-spline control-point std as a fraction of the size (default 0.05 shared, 0.025
    per-scan, which give similar unregistered Dice).
    """
    if anatomy not in ("shared", "per-scan"):
        raise ValueError(f"anatomy must be 'shared' or 'per-scan', got {anatomy!r}")
    if ffd_std is None:
        ffd_std = 0.05 if anatomy == "shared" else 0.025
    shared = sample_subject(np.random.default_rng([seed, 1000]), size) if anatomy == "shared" else None
    out_dir = os.path.abspath(os.fspath(out_dir))
    splits = {"train": n_train, "val": n_val}
    subsets = {f"synth-{split}": [f"synth/{split}_{k:03d}" for k in range(n)] for split, n in splits.items()}
    # The HDF5 file is built in memory and written as plain bytes: HDF5 never writes to the disk
    # itself, so a full disk or an unwritable folder is an ordinary write error (OutputError naming
    # the file), never a crash of the HDF5 library, and nothing is left half-written.
    with h5py.File(f"{name}.h5", "w", driver="core", backing_store=False) as f:
        for index, (split, n) in enumerate(splits.items()):
            for k in range(n):
                rng = np.random.default_rng([seed, index, k])
                group = f.create_group(subsets[f"synth-{split}"][k])
                for key, value in make_scan(rng, size, subject=shared, ffd_std=ffd_std).items():
                    extra = {"compression": "gzip", "compression_opts": 1} if key == "deformation" else {}
                    group.create_dataset(key, data=value, track_times=False, **extra)
        f.flush()
        image = f.id.get_file_image()
    config = {"files": {"/": {"type": "HDF5", "path": f"{name}.h5"}},
              "image_size": [size] * 3, "image_type": "synthetic",
              "segmentation_class_value": {str(v): v for v in LABELS.values()},
              "subsets": subsets,
              "synthetic": {"anatomy": anatomy, "ffd_std": ffd_std, "seed": seed},
              "schemes": {"1": {"synth-train": 1.0}, "2": {"synth-val": 1.0}, "val": {"synth-val": 1.0}}}
    h5_path, json_path = os.path.join(out_dir, f"{name}.h5"), os.path.join(out_dir, f"{name}.json")
    # both files are complete temporaries before either is renamed into place (the .h5 first)
    with atomic_output(json_path) as json_tmp, atomic_output(h5_path) as h5_tmp:
        with open(h5_tmp, "wb") as out:
            out.write(image)
            out.flush()
            os.fsync(out.fileno())
        with open(json_tmp, "w", encoding="utf-8") as out:
            json.dump(config, out, indent=2)
    if verbose:
        print(f"wrote {os.path.join(out_dir, name + '.h5')} ({n_train} train + {n_val} val scans, {size}^3)")
        print(f"wrote {json_path}")
    return json_path


def main(argv=None) -> int:
    from network.cli import ArgumentParser, nonneg_float, nonneg_int, positive_int, run_name

    parser = ArgumentParser(description="Generate a synthetic RCN-layout registration dataset.")
    parser.add_argument("--out", default="data/synthetic", help="output directory")
    parser.add_argument("--size", type=positive_int, default=64, help="volume size (cube, >= 8)")
    parser.add_argument("--train", type=nonneg_int, default=16, help="number of training scans")
    parser.add_argument("--val", type=nonneg_int, default=6, help="number of validation scans")
    parser.add_argument("--seed", type=nonneg_int, default=0)
    parser.add_argument("--name", type=run_name, default="synthetic", help="base name of the .h5/.json files")
    parser.add_argument("--anatomy", choices=["shared", "per-scan"], default="shared",
                        help="shared: one template anatomy, known pairwise flows; per-scan: random anatomy per scan")
    parser.add_argument("--ffd_std", type=nonneg_float, default=None, help="FFD control-point std (fraction of size)")
    args = parser.parse_args(argv)
    if args.size < 8:
        parser.error(f"argument --size: {args.size} must be >= 8")
    start = time.perf_counter()
    generate(args.out, args.size, args.train, args.val, args.seed, args.name, verbose=True,
             anatomy=args.anatomy, ffd_std=args.ffd_std)
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    import sys

    from network.cli import run
    sys.exit(run(main))
