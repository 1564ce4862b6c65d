"""Write scans of an RCN-layout dataset (HDF5 + JSON) as NIfTI files, to view them or feed ``register.py``.

``python -m data_util.export_nifti -d datasets/x.json -e ENTRY [ENTRY ...] -o OUT [--spacing 1.5]``

For each entry: ``OUT/<id>.nii.gz`` (the stored uint8 volume), ``OUT/<id>_label.nii.gz`` (its
segmentation) and ``OUT/<id>_landmarks.csv`` (world mm; missing landmarks as ``nan,nan,nan`` rows), when present. The
voxel-to-world affine is the group's ``grid_affine`` attribute (written by ``convert_dataset.py``),
else an LPS grid of ``--spacing`` mm centred on the origin (the RCN datasets store no geometry).
"""
from __future__ import annotations

import os
import sys
from contextlib import ExitStack

import numpy as np

from .dataset import DatasetError, RCNDataset, landmark_mask
from .image_io import Volume, apply_affine, save_nifti
from network.cli import ArgumentParser, positive_float
from network.outputs import OutputError, atomic_output


def entry_affine(dataset: RCNDataset, entry: str, shape, spacing: float) -> np.ndarray:
    path, key = dataset.locate(entry)
    group = dataset._file(path)[key]
    if "grid_affine" in group.attrs:
        return np.asarray(group.attrs["grid_affine"], dtype=np.float64)
    affine = np.diag([-spacing, -spacing, spacing, 1.0])          # LPS axes in RAS+ world
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def export(dataset: RCNDataset, entry: str, out_dir: str, spacing: float = 1.0, stage=None) -> dict:
    """Write one entry; returns ``{"image", "label", "landmarks"}`` paths (None where absent).

    ``stage(path)``: where to write the file that will become ``path`` (default: ``path`` itself,
    each file written atomically)."""
    stage = stage or (lambda path: path)
    scan = dataset.load(entry)
    volume = scan["volume"]
    ref = Volume(volume, entry_affine(dataset, entry, volume.shape, spacing), entry)
    base = os.path.join(out_dir, scan["id"])
    paths = {"image": base + ".nii.gz", "label": None, "landmarks": None}
    save_nifti(stage(paths["image"]), volume.astype(np.float32), ref, description=f"{entry} volume")
    if scan["segmentation"] is not None:
        seg = scan["segmentation"]
        paths["label"] = base + "_label.nii.gz"
        save_nifti(stage(paths["label"]), seg.astype(np.uint8 if seg.max(initial=0) < 256 else np.int32), ref,
                   description=f"{entry} labels")
    if scan["point"] is not None and landmark_mask(scan["point"]).any():
        from network.outputs import atomic_write_text
        world = apply_affine(ref.affine, scan["point"].astype(np.float64))
        world[~landmark_mask(scan["point"])] = np.nan                   # missing rows stay in place
        paths["landmarks"] = base + "_landmarks.csv"
        atomic_write_text(stage(paths["landmarks"]), "x,y,z\n" + "".join(f"{x:.4f},{y:.4f},{z:.4f}\n" for x, y, z in world))
    return paths


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("-d", "--dataset", required=True, help="dataset JSON")
    p.add_argument("-e", "--entry", nargs="+", required=True, help="entries, e.g. synth/val_000")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--spacing", type=positive_float, default=1.0, help="mm per voxel when the dataset stores no geometry")
    args = p.parse_args(argv)
    written = []
    try:
        dataset = RCNDataset(args.dataset, check_files=True)
        # every file of the run goes to a temporary name first and all are renamed at the end: a
        # full disk, a missing permission or a bad entry leaves no partial file and no partial set
        with ExitStack() as stack:
            stage = lambda path: stack.enter_context(atomic_output(path))  # noqa: E731
            for entry in args.entry:
                written.append(export(dataset, entry, args.out, args.spacing, stage))
    except (DatasetError, KeyError) as e:
        print(f"export_nifti: error: {str(e).strip(chr(39))}", file=sys.stderr)
        return 2
    except OutputError as e:
        print(f"export_nifti: error: {e}", file=sys.stderr)
        return 2
    for paths in written:
        print(" ".join(v for v in paths.values() if v))
    return 0


if __name__ == "__main__":
    from network.cli import run
    sys.exit(run(main))
