"""Convert a cohort of NIfTI / DICOM scans into the RCN dataset layout: one HDF5 file + one JSON config.

``python convert_dataset.py --images SRC [--labels DIR] [--landmarks DIR] -o datasets/mycohort
--size 128 128 128 [--spacing MM] [--orientation LPS] [--modality auto|ct|mri|uint8] [--window W L]
[--percentiles LO HI] [--crop fov|label] [--margin MM] [--val 0.2 | --val_ids a,b] [--seed 0]
[--image_type liver] [--label_interp nearest|linear] [--landmark_units mm|voxel]``

``SRC``: a folder (each ``*.nii`` / ``*.nii.gz`` file and each sub-folder holding a DICOM series is
one scan; id = file name without extension / folder name), or a CSV list with the header
``id,image[,label][,landmarks]`` (paths relative to the CSV's folder). With a folder, ``--labels DIR``
finds ``<id>.nii.gz`` / ``<id>.nii`` / ``<id>/`` (DICOM) and ``--landmarks DIR`` finds ``<id>.csv`` /
``<id>.txt`` (three numbers per row, world RAS+ mm or ``--landmark_units voxel``).

Every scan is preprocessed as ``register.py`` does it: resampled in world coordinates onto an
axis-aligned grid of ``--size`` voxels (``--orientation``), centred on its field of view (or on its
label box + ``--margin`` with ``--crop label``); intensities mapped to [0, 1] (CT window, MRI
percentiles) and stored as ``uint8 = rint(255 * x)``; labels resampled (``--label_interp``);
landmarks mapped to voxel coordinates of the grid (-1 rows: missing or outside the grid). Without
``--spacing`` all scans share one isotropic spacing: the smallest that fits every scan's box.

Writes ``<output>.h5`` (group per scan: ``volume``, ``segmentation``, ``point``; attributes
``source``, ``grid_affine`` (model voxel -> world RAS+ mm), ``source_affine``, ``source_shape``,
``normalisation`` (JSON), ``orientation``) and ``<output>.json`` (``files``, ``subsets``
``<name>-train`` / ``<name>-val``, ``schemes`` "1" / "2", ``image_size``, ``image_type``,
``segmentation_class_value``, ``preprocessing``). Both appear whole or not at all.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from dataclasses import dataclass, field

import h5py
import numpy as np

from data_util.image_io import NIFTI_SUFFIXES, ImageError, load_image, load_label_for, read_geometry, \
    read_landmarks, same_grid
from data_util.preprocess import add_preprocessing_args, corners, label_box, model_grid, normalisation_for, orientation_matrix, resample, \
    resample_labels, world_to_voxel
from network.cli import ArgumentParser, fail, nonneg_int, positive_float, positive_int, unit_float
from network.outputs import OutputError, atomic_output

CSV_COLUMNS = ("id", "image", "label", "landmarks")
LANDMARK_SUFFIXES = (".csv", ".txt")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--images", required=True, help="folder of scans, or a CSV list id,image[,label][,landmarks]")
    p.add_argument("--labels", help="folder of label maps named by scan id (folder input only)")
    p.add_argument("--landmarks", help="folder of landmark files <id>.csv / <id>.txt (folder input only)")
    p.add_argument("--landmark_units", choices=["mm", "voxel"], default="mm",
                   help="mm: world RAS+ coordinates; voxel: indices into that scan (default mm)")
    p.add_argument("-o", "--output", required=True, help="output path without extension: writes <output>.h5/.json")
    p.add_argument("--size", type=positive_int, nargs=3, default=(128, 128, 128), help="model grid size (default 128^3)")
    p.add_argument("--spacing", type=positive_float, default=None,
                   help="grid spacing in mm (default: the smallest one spacing that fits every scan)")
    p.add_argument("--val", type=unit_float, default=None, help="random validation fraction (default 0.2)")
    p.add_argument("--val_ids", default=None, help="comma-separated validation scan ids (instead of --val)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the random validation split")
    p.add_argument("--image_type", default=None, help="image_type in the JSON (default: the output name)")
    add_preprocessing_args(p)
    return p.parse_args(argv)


def check_args(args) -> None:
    """One error line for option values that cannot work."""
    if any(s < 8 for s in args.size):
        fail(f"--size: each size must be >= 8, got {list(args.size)}")
    if args.spacing is not None and not args.spacing > 0:
        fail(f"--spacing: must be positive, got {args.spacing}")
    try:
        orientation_matrix(args.orientation)
    except ValueError as e:
        fail(f"--orientation: {e}")
    if not args.window[0] > 0:
        fail(f"--window: width must be positive, got {args.window[0]}")
    if not 0 <= args.percentiles[0] < args.percentiles[1] <= 100:
        fail(f"--percentiles: need 0 <= LOW < HIGH <= 100, got {list(args.percentiles)}")
    if not args.margin >= 0:
        fail(f"--margin: must be >= 0, got {args.margin}")
    if args.val is not None and args.val_ids is not None:
        fail("--val and --val_ids: give one of them")
    if args.val is not None and not 0 < args.val < 1:
        fail(f"--val: a fraction between 0 and 1 is needed, got {args.val}")


# ---- finding the scans ----------------------------------------------------------------------------

@dataclass
class Scan:
    """One scan to convert: its id, HDF5 key and input paths, plus what the first pass found."""
    id: str
    image: str
    label: str | None = None
    landmarks: str | None = None
    key: str = ""
    box: np.ndarray | None = None          # world points the grid must cover
    points: np.ndarray | None = None       # (N, 3) world mm
    notes: list = field(default_factory=list)


def nifti_stem(name: str) -> str | None:
    """File name without ``.nii`` / ``.nii.gz``; None for other names."""
    lower = name.lower()
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)]
    return None


def holds_dicom(folder: str) -> bool:
    """True when a file directly in ``folder`` reads as DICOM (headers only; False without pydicom)."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        return False
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or name.startswith("."):
            continue
        try:
            pydicom.dcmread(path, stop_before_pixels=True)
            return True
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
            continue
    return False


def scans_in_folder(folder: str) -> dict:
    """``{id: path}`` of the NIfTI files and DICOM series sub-folders in ``folder``."""
    found = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("."):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            if not holds_dicom(path):
                continue
            scan_id = name
        else:
            scan_id = nifti_stem(name)
            if scan_id is None:
                continue
        if scan_id in found:
            raise ImageError(f"{path}: id '{scan_id}' also names {found[scan_id]}; ids must be unique")
        found[scan_id] = path
    return found


def files_by_id(folder: str, what: str) -> dict:
    """Label maps (``what="label"``) or landmark files in ``folder``, as ``{id: path}``."""
    if not os.path.isdir(folder):
        raise ImageError(f"{folder}: {what} folder not found")
    if what == "label":
        return scans_in_folder(folder)
    found = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        path = os.path.join(folder, name)
        if name.startswith(".") or ext.lower() not in LANDMARK_SUFFIXES or not os.path.isfile(path):
            continue
        if stem in found:
            raise ImageError(f"{path}: id '{stem}' also names {found[stem]}; one landmark file per scan")
        found[stem] = path
    return found


def list_folder(args) -> list:
    images = scans_in_folder(args.images)
    extra = {}
    for what, folder in (("label", args.labels), ("landmark", args.landmarks)):
        if folder is None:
            continue
        if os.path.abspath(folder) == os.path.abspath(args.images):
            raise ImageError(f"{folder}: the {what} folder must not be the image folder")
        extra[what] = files_by_id(folder, what)
        for scan_id, path in extra[what].items():
            if scan_id not in images:
                raise ImageError(f"{path}: {what} file for id '{scan_id}', but {args.images} "
                                 "has no image with that id")
    return [Scan(i, p, extra.get("label", {}).get(i), extra.get("landmark", {}).get(i)) for i, p in images.items()]


def list_csv(args) -> list:
    path = args.images
    base = os.path.dirname(os.path.abspath(path))
    resolve = lambda p: os.path.normpath(os.path.join(base, os.path.expanduser(p)))  # noqa: E731
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ImageError(f"{path}: not a readable CSV list ({str(e).splitlines()[0]})") from None
    rows = [(n + 1, [c.strip() for c in row]) for n, row in enumerate(rows) if any(c.strip() for c in row)]
    if not rows:
        raise ImageError(f"{path}: empty scan list")
    header = [c.lower() for c in rows[0][1]]
    unknown = [c for c in header if c not in CSV_COLUMNS]
    if unknown or "id" not in header or "image" not in header or len(set(header)) != len(header):
        raise ImageError(f"{path}: header must be id,image[,label][,landmarks], got {','.join(rows[0][1])}")
    scans = []
    for line, cells in rows[1:]:
        if len(cells) > len(header):
            raise ImageError(f"{path}: line {line} has {len(cells)} fields; the header has {len(header)}")
        row = dict(zip(header, cells + [""] * (len(header) - len(cells))))
        if not row["id"]:
            raise ImageError(f"{path}: line {line} has no id")
        if not row["image"]:
            raise ImageError(f"{path}: line {line}: id '{row['id']}' has no image")
        scans.append(Scan(row["id"], resolve(row["image"]),
                          resolve(row["label"]) if row.get("label") else None,
                          resolve(row["landmarks"]) if row.get("landmarks") else None))
    return scans


def list_scans(args) -> list:
    """The cohort, sorted by id, with unique HDF5 keys."""
    if os.path.isdir(args.images):
        scans = list_folder(args)
        where = f"{args.images}: no NIfTI files (.nii/.nii.gz) or DICOM series folders in this folder"
    elif os.path.isfile(args.images):
        if args.labels or args.landmarks:
            raise ImageError(f"{args.images}: a CSV list names labels and landmarks in its columns; "
                             "--labels/--landmarks go with an image folder")
        scans = list_csv(args)
        where = f"{args.images}: the list names no scans"
    else:
        raise ImageError(f"{args.images}: not found")
    if not scans:
        raise ImageError(where)
    keys = {}
    for scan in scans:
        scan.key = scan.id.replace("/", "_")
        if scan.key.startswith("."):
            raise ImageError(f"{scan.image}: id '{scan.id}' cannot name an HDF5 group")
        if scan.key in keys:
            raise ImageError(f"{scan.image}: id '{scan.id}' is used twice (also {keys[scan.key].image})")
        keys[scan.key] = scan
    return sorted(scans, key=lambda s: s.key)


# ---- first pass: geometry only ----------------------------------------------------------------------

def survey(scans, args) -> None:
    """First pass: check every input's geometry, set each scan's grid box and world landmarks."""
    for scan in scans:
        image = read_geometry(scan.image)
        label = None
        if scan.label:
            label = load_image(scan.label, label=True) if args.crop == "label" else read_geometry(scan.label)
            if not same_grid(image, label):
                raise ImageError(f"{scan.label}: label map is on a different grid than {scan.image} "
                                 f"(label {label.describe()}; image {image.describe()})")
        if args.crop == "label":
            if label is None:
                raise ImageError(f"{scan.image}: --crop label needs a label map for scan '{scan.id}'")
            scan.box = label_box(label, args.margin)
        else:
            scan.box = corners(image)
        if scan.landmarks:
            # landmarks off the grid become -1 rows; only absurd ones (1e30, wrong units) are refused
            scan.points = read_landmarks(scan.landmarks, image, args.landmark_units, far=(10.0, 1000.0))


def common_spacing(scans, args) -> float:
    """The smallest isotropic spacing whose grid covers every scan's box."""
    # model_grid reads only the box when one is given
    return max(float(model_grid(None, args.size, None, args.orientation, box=s.box).spacing[0]) for s in scans)


def split(scans, args) -> tuple:
    """``(train ids, val ids)`` as HDF5 keys, each sorted."""
    keys = [s.key for s in scans]
    if len(keys) < 2:
        raise ImageError(f"{args.images}: {len(keys)} scan found; at least 2 are needed (training + validation)")
    if args.val_ids is not None:
        wanted = [v.strip() for v in args.val_ids.split(",") if v.strip()]
        by_id = {s.id: s.key for s in scans} | {s.key: s.key for s in scans}
        unknown = [v for v in wanted if v not in by_id]
        if unknown or not wanted:
            raise ImageError(f"--val_ids: unknown id(s) {unknown or wanted}; ids are {', '.join(s.id for s in scans)}")
        val = sorted(set(by_id[v] for v in wanted))
        if len(val) == len(keys):
            raise ImageError("--val_ids: every scan is in the validation set; none is left for training")
    else:
        fraction = 0.2 if args.val is None else args.val
        least = 2 if len(keys) >= 4 else 1               # two scans per subset form pairs
        n_val = min(len(keys) - least, max(least, int(round(fraction * len(keys)))))
        val = sorted(np.random.default_rng(args.seed).choice(keys, n_val, replace=False).tolist())
    return [k for k in keys if k not in val], val


# ---- second pass: resampling and writing --------------------------------------------------------------

def convert_scan(scan: Scan, args, spacing: float, n_points: int) -> dict:
    """Arrays and attributes of one HDF5 group."""
    image = load_image(scan.image)
    label = load_label_for(image, scan.label) if scan.label else None
    try:
        grid = model_grid(image, args.size, spacing, args.orientation, box=scan.box)
        norm = normalisation_for(image, args.modality, args.window, args.percentiles)
        if label is not None:
            segmentation = resample_labels(label, grid, method=args.label_interp)
    except ValueError as e:
        raise ImageError(f"{scan.image}: {e}") from None
    out = {"volume": np.rint(255 * norm.apply(resample(image, grid))).astype(np.uint8)}
    attrs = {"source": os.path.abspath(scan.image), "grid_affine": grid.affine.astype(np.float64),
             "source_affine": image.affine.astype(np.float64), "source_shape": np.asarray(image.shape, np.int64),
             "normalisation": json.dumps(norm.to_dict()), "orientation": args.orientation.upper()}
    text = f"{scan.id}: {image.describe()} -> {tuple(grid.shape)} at {grid.spacing[0]:.3f} mm " \
           f"{args.orientation.upper()}, {norm.modality} [{norm.low:.4g}, {norm.high:.4g}]"
    if label is not None:
        top = int(segmentation.max(initial=0))
        dtype = np.uint8 if top < 256 else np.int16 if top < 32768 else np.int32
        out["segmentation"] = segmentation.astype(dtype)
        attrs["label"] = os.path.abspath(scan.label)
        kept = set(np.unique(segmentation).tolist()) - {0}
        lost = sorted(set(np.unique(label.data).tolist()) - {0} - kept)
        text += f", labels {sorted(kept)}" + (f" (lost on the grid: {lost})" if lost else "")
    if scan.points is not None:
        voxels = world_to_voxel(grid.affine, scan.points.T).T
        outside = ((voxels < 0) | (voxels > np.asarray(grid.shape) - 1)).any(1)
        points = np.full((n_points, 3), -1.0, dtype=np.float32)
        points[:len(voxels)] = np.where(outside[:, None], -1.0, voxels)
        out["point"] = points
        attrs["landmarks"] = os.path.abspath(scan.landmarks)
        text += f", {len(voxels)} landmarks"
        if outside.any():
            text += f" ({int(outside.sum())} outside the grid: -1)"
    print(text, flush=True)
    return {"arrays": out, "attrs": attrs}


def write_dataset(scans, args, spacing: float, train: list, val: list) -> tuple:
    """Write ``<output>.h5`` and ``<output>.json`` through temporary files renamed at the end."""
    out = args.output
    for ext in (".json", ".h5"):
        if out.lower().endswith(ext):
            out = out[:-len(ext)]
    folder, name = os.path.dirname(os.path.abspath(out)), os.path.basename(out)
    if not name:
        raise ImageError(f"{args.output}: the output needs a file name, e.g. datasets/mycohort")
    created = not os.path.isdir(folder)
    n_points = max((len(s.points) for s in scans if s.points is not None), default=0)
    values = set()
    paths = (os.path.join(folder, f"{name}.h5"), os.path.join(folder, f"{name}.json"))
    done = False
    try:
        # temporary files renamed into place (normal permissions; a full disk or a kill leaves no
        # partial file); the HDF5 file is renamed first, the JSON that names it last
        with atomic_output(paths[1]) as json_tmp:
            with atomic_output(paths[0]) as h5_tmp:
                with h5py.File(h5_tmp, "w") as f:
                    for scan in scans:
                        result = convert_scan(scan, args, spacing, n_points)
                        group = f.create_group(scan.key)
                        for key, value in result["arrays"].items():
                            group.create_dataset(key, data=value, track_times=False)
                        group.attrs.update(result["attrs"])
                        if "segmentation" in result["arrays"]:
                            values |= set(np.unique(result["arrays"]["segmentation"]).tolist()) - {0}
                config = {"files": {"/": {"type": "HDF5", "path": f"{name}.h5"}},
                          "image_size": [int(s) for s in args.size],
                          "image_type": args.image_type or name}
                if values:
                    config["segmentation_class_value"] = {str(v): int(v) for v in sorted(values)}
                config["subsets"] = {f"{name}-train": train, f"{name}-val": val}
                config["schemes"] = {"1": {f"{name}-train": 1.0}, "2": {f"{name}-val": 1.0}}
                config["preprocessing"] = {
                    "source": os.path.abspath(args.images), "labels": args.labels and os.path.abspath(args.labels),
                    "landmarks": args.landmarks and os.path.abspath(args.landmarks),
                    "landmark_units": args.landmark_units,
                    "orientation": args.orientation.upper(), "spacing_mm": spacing,
                    "spacing_from": "--spacing" if args.spacing is not None else "fit to the largest scan",
                    "modality": args.modality, "window": list(args.window), "percentiles": list(args.percentiles),
                    "crop": args.crop, "margin": args.margin, "label_interp": args.label_interp,
                    "intensity": "volume = rint(255 * normalised); per scan: HDF5 attribute 'normalisation'",
                    "split": {"val_ids": args.val_ids} if args.val_ids is not None else
                             {"val": 0.2 if args.val is None else args.val, "seed": args.seed}}
                with open(json_tmp, "w", encoding="utf-8") as f:
                    json.dump(config, f, indent=2)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
        done = True
    finally:
        if created and not done:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    return paths


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    try:
        scans = list_scans(args)
        train, val = split(scans, args)
        survey(scans, args)
        for name, subset in (("training", train), ("validation", val)):
            if len(subset) < 2:
                print(f"note: the {name} subset has one scan, which forms no registration pairs", flush=True)
        spacing = args.spacing if args.spacing is not None else common_spacing(scans, args)
        print(f"{len(scans)} scans; grid {tuple(args.size)} at {spacing:.4f} mm, orientation "
              f"{args.orientation.upper()}, crop {args.crop}", flush=True)
        paths = write_dataset(scans, args, spacing, train, val)
    except (ImageError, OutputError) as e:
        fail(str(e))
    except ValueError as e:
        fail(f"{args.images}: {e}")
    except OSError as e:
        fail(f"{e.filename or args.output}: {e.strerror or e}")
    print(f"wrote {len(scans)} scans ({len(train)} train, {len(val)} val: {', '.join(val)}), "
          f"spacing {spacing:.4f} mm: {paths[0]}, {paths[1]}")
    return 0


def cli() -> int:
    """Console entry point (``ldr-convert-dataset``): :func:`main` with every fault reported as one line."""
    from network.cli import run

    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
