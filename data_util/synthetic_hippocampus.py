"""Synthetic hippocampus-like MR patches in the Learn2Reg 2020 Task 4 layout (tests and benchmarks).

Usage::

    python -m data_util.synthetic_hippocampus --out data/hippocampus --n_train 20 --n_val 6 \\
        --shape 40 48 40 --crop 32 32 32 --seed 0

writes ``img/hippocampus_XXX.nii.gz`` (float32 T1-like patch, 1 mm, RAS affine),
``label/hippocampus_XXX.nii.gz`` (uint8: 0 background, 1 head, 2 tail), ``pairs_val.csv``
(header ``fixed, moving``, both directions, as in the challenge's list) and ``hippocampus.json``
(``"format": "learn2reg"``, ``root "."``; read it with :func:`data_util.learn2reg.open_dataset`).
Ids are 3-digit and not contiguous; the validation scans have the last ids.

Anatomy (array axes: 0 = lateral -> medial, 1 = posterior -> anterior, 2 = inferior -> superior, in
voxels = mm): a rounded "brain" region (zero background outside it, cutting the patch's
lateral-inferior edge, with a dark CSF rim) of grey matter with a fixed pattern of white matter
(brighter superiorly) and a few CSF sulci; a banana-shaped tube (the hippocampus, grey-matter
intensity) following a curved centre line, thick at the anterior head and thinning towards the
posterior tail, wrapped in a thin white-matter layer; a dark CSF crescent (temporal horn) along the
lateral-superior side of its anterior two thirds. Label 1 (head) is the tube part whose nearest
centre-line point lies in the first :data:`HEAD_FRACTION` of the arc length, label 2 (tail) the rest:
the boundary is invisible in the intensities, so only the anatomy around it can place it.

Per subject: template shape parameters (position +-2.5 voxels, length, curvature, thickness), a
random rotation (<= 6 degrees) and a smooth random deformation (Gaussian-smoothed noise, 1.2 voxels
RMS per axis, 4-6 voxels at most, no folding); every voxel's template coordinates are computed once and the
image and the label map are both evaluated there, so labels follow the anatomy exactly. Then
partial-volume blur, a multiplicative bias field, contrast (gamma) jitter, Rician noise and an
arbitrary intensity scale.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

DEFAULT_SHAPE = (40, 48, 40)
DEFAULT_CROP = (32, 32, 32)
LABELS = {"head": 1, "tail": 2}
HEAD_FRACTION = 0.45
INTENSITY = {"csf": 0.12, "gm": 0.52, "wm": 0.86}
JSON_NAME = "hippocampus.json"
PAIRS_NAME = "pairs_val.csv"
IMAGE_TEMPLATE = "img/hippocampus_{id:03d}.nii.gz"
LABEL_TEMPLATE = "label/hippocampus_{id:03d}.nii.gz"
_OUR_FILE = re.compile(r"^(hippocampus_\d{3}\.nii\.gz|\.tmp_.*)$")
_CURVE_SAMPLES = 241


# ----------------------------------------------------------------------------------------------
# template geometry
# ----------------------------------------------------------------------------------------------

def _scale(shape) -> float:
    return float(np.prod(shape) / np.prod(DEFAULT_SHAPE)) ** (1.0 / 3.0)


def sample_template(rng: np.random.Generator, shape) -> dict:
    """Dataset-wide template: brain region and the tissue pattern (fixed for a seed)."""
    s = np.asarray(shape, dtype=np.float64)
    k = _scale(shape)
    # random plane waves for the white-matter / sulcus pattern (wavelength 11-17 voxels at scale 1)
    directions = rng.normal(size=(2, 5, 3))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    wavelengths = rng.uniform(11, 17, size=(2, 5, 1)) * k
    return {"shape": tuple(int(v) for v in shape), "scale": k,
            "brain_centre": s * np.array([0.60, 0.50, 0.64]),
            "brain_radii": s * np.array([0.64, 0.85, 0.64]),
            "waves": 2 * np.pi * directions / wavelengths,
            "phases": rng.uniform(0, 2 * np.pi, size=(2, 5)),
            "hippo_height": s[2] * 0.40}


def sample_subject(rng: np.random.Generator, template: dict) -> dict:
    """Per-subject hippocampus shape, pose, deformation and intensity parameters."""
    s = np.asarray(template["shape"], dtype=np.float64)
    k = template["scale"]
    centre = s * np.array([0.46, 0.48, 0.40]) + np.clip(rng.normal(0, [1.4, 0.8, 1.4]), -2.5, 2.5) * k
    axis = rng.normal(size=3)
    return {
        "centre": centre,
        "length": 17.5 * k * float(np.clip(1 + rng.normal(0, 0.06), 0.88, 1.12)),
        "bend_z": float(rng.uniform(0.30, 0.45)),        # the tail rises superiorly
        "bend_x": float(rng.uniform(0.08, 0.25)),        # ... and curves medially
        "tilt": float(rng.normal(0, 0.08)),              # slope of the long axis in the y-z plane
        "r_head": 4.4 * k * float(np.clip(1 + rng.normal(0, 0.08), 0.8, 1.2)),
        "r_tail": 2.8 * k * float(np.clip(1 + rng.normal(0, 0.08), 0.8, 1.2)),
        "rotation_axis": axis / np.linalg.norm(axis),
        "rotation_deg": float(rng.uniform(-6, 6)),
        "translation": rng.normal(0, 0.7, 3) * k,
        "displacement": smooth_field(rng, template["shape"], 10.0 * k, 1.0 * k),
        "bias_grid": rng.normal(0, 0.08, (3, 3, 3)),
        "gamma": float(rng.uniform(0.85, 1.15)),
        "contrast": {name: value * float(1 + rng.normal(0, 0.04)) for name, value in INTENSITY.items()},
        "noise": float(rng.uniform(0.015, 0.035)),
        "scale": float(rng.uniform(300, 900)),
    }


def centre_line(subject: dict):
    """Densely sampled centre line ``(n, 3)`` from head (anterior) to tail, its arc-length fraction
    ``(n,)`` and the tube radius there ``(n,)``."""
    t = np.linspace(0.0, 1.0, _CURVE_SAMPLES)
    length = subject["length"]
    c = subject["centre"]
    points = np.stack([
        c[0] + subject["bend_x"] * length * ((t - 0.4) ** 2 - 0.12),
        c[1] + length * (0.5 - t),
        c[2] + subject["bend_z"] * length * ((t - 0.35) ** 2 - 0.12) + subject["tilt"] * length * (t - 0.5),
    ], axis=1)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    arc /= arc[-1]
    ramp = np.clip((arc - 0.2) / 0.8, 0.0, 1.0)
    radius = subject["r_head"] + (subject["r_tail"] - subject["r_head"]) * ramp
    return points, arc, radius


def _rotation(axis, degrees) -> np.ndarray:
    a = np.deg2rad(degrees)
    x, y, z = axis
    cross = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(a) * cross + (1 - np.cos(a)) * cross @ cross


def _upsample(grid: np.ndarray, shape) -> np.ndarray:
    """Cubic upsampling of a coarse grid ``(..., a, b, c)`` to ``shape`` (corners aligned)."""
    coords = np.meshgrid(*[np.linspace(0, g - 1, n) for g, n in zip(grid.shape[-3:], shape)], indexing="ij")
    flat = grid.reshape((-1,) + grid.shape[-3:])
    out = [ndimage.map_coordinates(g, coords, order=3, mode="nearest") for g in flat]
    return np.stack(out).reshape(grid.shape[:-3] + tuple(shape))


def smooth_field(rng: np.random.Generator, shape, sigma: float, rms: float) -> np.ndarray:
    """Random smooth displacement ``(3, *shape)``: Gaussian-smoothed white noise (``sigma`` voxels),
    each component scaled to root-mean-square ``rms`` voxels. With ``sigma = 10``, ``rms = 1.2`` the
    Jacobian determinant stays within about 0.5-1.7 (no folding) and the largest displacement is
    4-6 voxels."""
    field = np.stack([ndimage.gaussian_filter(rng.normal(size=tuple(shape)), sigma, mode="reflect")
                      for _ in range(3)])
    return field * (rms / np.sqrt((field ** 2).mean(axis=(1, 2, 3), keepdims=True)))


def template_coordinates(subject: dict, shape) -> np.ndarray:
    """Template coordinates ``(3, X, Y, Z)`` of every voxel of the subject's grid (pull-back map):
    rotation about the patch centre, translation, then the smooth random displacement."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    rot = _rotation(subject["rotation_axis"], subject["rotation_deg"])
    q = np.einsum("ij,j...->i...", rot, grid - centre[:, None, None, None]) + centre[:, None, None, None]
    q += subject["translation"][:, None, None, None]
    return q + subject["displacement"]


def render(template: dict, subject: dict, rng: np.random.Generator):
    """``(image float32, label uint8)`` of one subject on the template's grid shape."""
    shape = template["shape"]
    k = template["scale"]
    q = template_coordinates(subject, shape)
    flat = q.reshape(3, -1).T

    # brain region: an ellipsoid cutting the lateral-inferior part of the patch
    e = (flat - template["brain_centre"]) / template["brain_radii"]
    brain_depth = (1.0 - np.sqrt((e ** 2).sum(1))) * template["brain_radii"].mean()   # ~voxels inside
    brain = brain_depth > 0

    # tissue pattern
    waves = np.cos(np.einsum("wkd,nd->wkn", template["waves"], flat) + template["phases"][..., None]).mean(1)
    height = (flat[:, 2] - template["hippo_height"]) / (6.0 * k)
    wm = waves[0] * 1.2 + height > 0.35
    csf = ((np.abs(waves[1]) < 0.05) & ~wm & (height < 1.0)) | (brain_depth < 1.3 * k)

    # hippocampus: distance to the centre line
    points, arc, radius = centre_line(subject)
    distance, nearest = cKDTree(points).query(flat)
    r = radius[nearest]
    a = arc[nearest]
    tube = distance < r
    shell = (distance >= r) & (distance < r + 1.4 * k)
    lateral_sup = np.array([-1.0, 0.0, 0.8]) / np.sqrt(1.64)
    direction = (flat - points[nearest]) / np.maximum(distance, 1e-6)[:, None]
    horn = ((distance >= r + 0.5 * k) & (distance < r + 2.3 * k) & (a > 0.05) & (a < 0.68)
            & (direction @ lateral_sup > 0.45))

    c = subject["contrast"]
    intensity = np.full(flat.shape[0], c["gm"])
    intensity[wm] = c["wm"]
    intensity[csf] = c["csf"]
    intensity[shell] = c["wm"]
    intensity[horn] = c["csf"]
    intensity[tube] = c["gm"]
    intensity[~brain] = 0.0
    image = ndimage.gaussian_filter(intensity.reshape(shape), 0.6)
    bias = np.exp(_upsample(subject["bias_grid"], shape))
    image = np.clip(image * bias, 0, None) ** subject["gamma"]
    noise = subject["noise"]
    image = np.sqrt((image + rng.normal(0, noise, shape)) ** 2 + rng.normal(0, noise, shape) ** 2)
    image = np.where(brain.reshape(shape), image * subject["scale"], 0.0).astype(np.float32)

    label = np.zeros(flat.shape[0], np.uint8)
    label[tube] = np.where(a[tube] < HEAD_FRACTION, LABELS["head"], LABELS["tail"])
    return image, label.reshape(shape)


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------

def make_ids(rng: np.random.Generator, n: int) -> list:
    """``n`` increasing 3-digit ids from 1 with random gaps of 0-2 missing ids."""
    ids = 1 + np.concatenate([[0], np.cumsum(1 + rng.integers(0, 3, n - 1))]).astype(int)
    if ids[-1] > 999:
        raise ValueError(f"{n} scans do not fit 3-digit ids; use fewer")
    return [int(i) for i in ids]


def validation_pairs(val_ids) -> list:
    """The challenge's pattern: (v0, v_last), (v1, v_last-1), ... then the same pairs reversed, from
    the innermost one (an odd middle scan stays unpaired)."""
    v = sorted(val_ids)
    first = [(v[i], v[len(v) - 1 - i]) for i in range(len(v) // 2)]
    return first + [(m, f) for f, m in reversed(first)]


def _check_out_dir(out_dir: str) -> None:
    """Refuse a non-empty folder unless it only holds what this generator writes."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: exists and is not a folder")
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name in (JSON_NAME, PAIRS_NAME) and os.path.isfile(path):
            continue
        if name in ("img", "label") and os.path.isdir(path) and all(_OUR_FILE.match(f) for f in os.listdir(path)):
            continue
        if name.startswith(".tmp_"):
            continue
        raise ValueError(f"{out_dir}: not empty and not a previous output of this generator "
                         f"(unexpected '{name}'); choose another --out or empty it")


def _save(path: str, data: np.ndarray, affine: np.ndarray, shown: str) -> None:
    import nibabel as nib

    from network.outputs import OutputError, os_error_reason
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm")
    try:
        nib.save(img, path)
    except OSError as exc:
        raise OutputError(f"{shown}: cannot write ({os_error_reason(exc, path)})") from None


def generate(out_dir, n_train: int = 20, n_val: int = 6, shape=DEFAULT_SHAPE, crop=DEFAULT_CROP,
             seed: int = 0, verbose: bool = False) -> str:
    """Write the dataset into ``out_dir`` and return the path of its ``hippocampus.json``.

    Deterministic for ``seed`` (the voxel data; gzip headers carry a time stamp). ``crop`` goes into
    the JSON (``None``: no crop). An existing ``out_dir`` must be empty or a previous output of this
    generator (whose generated files are then replaced); otherwise :class:`ValueError`.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or min(shape) < 12:
        raise ValueError(f"shape must be 3 sizes >= 12, got {shape}")
    if crop is not None:
        crop = tuple(int(v) for v in crop)
        if len(crop) != 3 or min(crop) < 1:
            raise ValueError(f"crop must be 3 positive sizes, got {crop}")
    if n_train < 2 or n_val < 2:
        raise ValueError(f"need n_train >= 2 and n_val >= 2, got {n_train} and {n_val}")
    _check_out_dir(out_dir)
    from network.outputs import OutputError, OutputSet, os_error_reason

    # The whole folder is staged beside out_dir and swapped into place when complete: a failure
    # (full disk, unwritable folder) leaves the previous output, or nothing, never a partial set.
    with OutputSet(out_dir) as out:
        stage = out.staging

        def write_text(name: str, text: str) -> None:
            try:
                with open(os.path.join(stage, name), "w", encoding="utf-8") as f:
                    f.write(text)
            except OSError as exc:
                raise OutputError(f"{os.path.join(out_dir, name)}: cannot write "
                                  f"({os_error_reason(exc, stage)})") from None

        for template in (IMAGE_TEMPLATE, LABEL_TEMPLATE):
            os.makedirs(os.path.join(stage, os.path.dirname(template)), exist_ok=True)
        ids = make_ids(np.random.default_rng([seed, 1]), n_train + n_val)
        train_ids, val_ids = ids[:n_train], ids[n_train:]
        template = sample_template(np.random.default_rng([seed, 2]), shape)
        affine = np.eye(4)
        affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0
        for id_ in ids:
            rng = np.random.default_rng([seed, 1000 + id_])
            image, label = render(template, sample_subject(rng, template), rng)
            for name, data in ((IMAGE_TEMPLATE.format(id=id_), image), (LABEL_TEMPLATE.format(id=id_), label)):
                _save(os.path.join(stage, name), data, affine, os.path.join(out_dir, name))
            if verbose:
                print(f"  hippocampus_{id_:03d}: head {int((label == 1).sum())}, tail {int((label == 2).sum())} voxels")

        pairs = validation_pairs(val_ids)
        write_text(PAIRS_NAME, "fixed, moving\n" + "".join(f"{f}, {m}\n" for f, m in pairs))
        config = {
            "format": "learn2reg",
            "description": (f"synthetic hippocampus-like MR patches (data_util.synthetic_hippocampus, seed {seed}): "
                            f"{n_train} training + {n_val} validation scans of {shape}, 1 mm"),
            "root": ".",
            "image": IMAGE_TEMPLATE,
            "label": LABEL_TEMPLATE,
            "labels": dict(LABELS),
            "normalisation": "l2r",
            "splits": {"1": {"ids": "*", "exclude": ["2"]}, "2": {"pairs": PAIRS_NAME}},
            "generator": {"module": "data_util.synthetic_hippocampus", "seed": seed, "n_train": n_train,
                          "n_val": n_val, "shape": list(shape), "train_ids": train_ids, "val_ids": val_ids},
        }
        if crop is not None:
            config["crop"] = list(crop)
        write_text(JSON_NAME, json.dumps(config, indent=2) + "\n")
    return os.path.join(out_dir, JSON_NAME)


# ----------------------------------------------------------------------------------------------
# plausibility summary
# ----------------------------------------------------------------------------------------------

def summarise(json_path) -> dict:
    """Label volumes (voxels) and unregistered Dice of the validation pairs, on the original grids
    and on the cropped grids the networks see, plus the share of label voxels the crop keeps."""
    import nibabel as nib
    from data_util.learn2reg import Learn2RegDataset
    from network.metrics import mask_dice
    ds = Learn2RegDataset(json_path)
    ids = sorted({i for s in ds.scheme_names for i in ds.ids(s)}, key=int)
    labels = {i: np.asarray(nib.load(ds.label_path(i)).dataobj) for i in ids}
    volumes = {name: [int((labels[i] == v).sum()) for i in ids] for name, v in ds.segmentation_class_value.items()}
    kept = [float((ds.load(i)["segmentation"] > 0).sum() / max((labels[i] > 0).sum(), 1)) for i in ids]
    out = {"n_scans": len(ids), "volumes": {k: (float(np.mean(v)), float(np.std(v)), min(v), max(v))
                                            for k, v in volumes.items()},
           "crop_keeps": min(kept), "dice": {}, "dice_cropped": {}}
    pairs = ds.pairs("2")
    for name, v in ds.segmentation_class_value.items():
        out["dice"][name] = float(np.mean([mask_dice(labels[f] == v, labels[m] == v) for f, m in pairs]))
        out["dice_cropped"][name] = float(np.mean([mask_dice(ds.load(f)["segmentation"] == v,
                                                        ds.load(m)["segmentation"] == v) for f, m in pairs]))
    return out


def main(argv=None) -> int:
    from network.cli import ArgumentParser, fail, nonneg_int, positive_int

    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/hippocampus", help="output folder (default data/hippocampus)")
    p.add_argument("--n_train", type=positive_int, default=20, help="training scans (>= 2)")
    p.add_argument("--n_val", type=positive_int, default=6, help="validation scans (>= 2)")
    p.add_argument("--shape", type=positive_int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z"))
    p.add_argument("--crop", type=positive_int, nargs=3, default=list(DEFAULT_CROP), metavar=("X", "Y", "Z"),
                   help="crop (or pad, when larger than --shape) size written into the JSON")
    p.add_argument("--no_crop", action="store_true", help="write no crop into the JSON")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--verbose", action="store_true", help="print every scan's label volumes")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        json_path = generate(args.out, args.n_train, args.n_val, args.shape,
                             None if args.no_crop else args.crop, args.seed, verbose=args.verbose)
    except ValueError as exc:       # bad sizes or an --out holding something else; write errors go to run()
        fail(str(exc))
    seconds = time.perf_counter() - start
    with open(json_path, encoding="utf-8") as f:
        gen = json.load(f)["generator"]
    out = os.path.dirname(json_path)
    print(f"wrote {args.n_train + args.n_val} scans of {tuple(args.shape)} in {seconds:.1f} s to {out}:")
    print(f"  {os.path.join(out, 'img')}/hippocampus_XXX.nii.gz (float32) and "
          f"{os.path.join(out, 'label')}/hippocampus_XXX.nii.gz (uint8: 1 head, 2 tail)")
    print(f"  training ids {gen['train_ids']}")
    print(f"  validation ids {gen['val_ids']}; pairs {os.path.join(out, PAIRS_NAME)}")
    print(f"  dataset config {json_path}")
    stats = summarise(json_path)
    for name, (mean, std, lo, hi) in stats["volumes"].items():
        print(f"  {name} volume: {mean:.0f} +- {std:.0f} voxels (min {lo}, max {hi})")
    print(f"  crop keeps >= {100 * stats['crop_keeps']:.1f}% of every scan's label voxels")
    print("  unregistered validation Dice: "
          + ", ".join(f"{k} {v:.3f}" for k, v in stats["dice"].items())
          + f" (mean {np.mean(list(stats['dice'].values())):.3f}; cropped grids: "
          + ", ".join(f"{k} {v:.3f}" for k, v in stats["dice_cropped"].items()) + ")")
    return 0


if __name__ == "__main__":
    from network.cli import run
    sys.exit(run(main))
