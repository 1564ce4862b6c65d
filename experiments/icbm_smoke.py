"""Real-image smoke run of ``register.py``: the ICBM152 2009a template shipped inside nilearn's wheel,
deformed by a known smooth field, registered back with a trained checkpoint.

``python experiments/icbm_smoke.py -c weights/quickstart [--magnitude 6] [--figure docs/register_icbm152.png]``

``--train_cohort N`` first trains a brain model with the main job's recipe (1-cascade LDR, 1000
steps, lr 3e-4, 64^3) on N other deformations of the template (seeds 100.., converted to the RCN
layout by ``convert_dataset.py``), then registers the same test pair with it: an in-domain check of
the whole own-data path (converter -> train.py -> register.py). Same anatomy in training and test,
so it says nothing about generalisation to new subjects.

Needs nilearn's files only (``pip install --no-deps nilearn``; nothing is imported from it). Steps:

1. fixed = the T1 template (197x233x189, 1 mm, RAS) with grey/white-matter labels from its GM/WM
   probability maps (label 1 = GM, 2 = WM: the larger of the two where it is >= 0.5);
2. a smooth pull-back field ``d`` (cubic interpolation of seeded random control points every 40 mm,
   scaled to ``--magnitude`` mm at most) defines moving(y) = template(y + d(y)), written on another
   grid (LPI, 1.2 x 1.0 x 1.4 mm) so orientation and spacing handling are part of the test;
   landmarks: 8 fixed points inside the brain and their moving partners (solving ``m + d(m) = f``);
3. ``register.py`` registers moving to fixed (MRI percentile normalisation, model grid of the
   checkpoint); its report gives Dice per label before/after, landmark error and seconds per stage.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_util import icbm  # noqa: E402
from data_util.icbm import LABELS, KnownField, KnownTransform, template_box  # noqa: E402
from data_util.image_io import ImageError  # noqa: E402
from network.outputs import atomic_output  # noqa: E402
from data_util.preprocess import Grid, orientation_matrix  # noqa: E402


def load_template(args):
    try:
        return icbm.load_template(args.template_dir)
    except ImageError as e:
        sys.exit(f"icbm_smoke.py: error: {e}")


def save(path, data, affine):
    import nibabel as nib
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)




def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--checkpoint", default="weights/quickstart", help="trained model (README main job)")
    p.add_argument("--template_dir", default=None, help="folder with the ICBM152 files (default: nilearn's)")
    p.add_argument("--magnitude", type=float, default=6.0, help="largest displacement of the known field, mm")
    p.add_argument("--spacing", type=float, default=40.0, help="control point spacing of the field, mm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="evaluate/icbm_smoke", help="work folder (inputs/ and registration/)")
    p.add_argument("--figure", default=None, help="also copy the figure here (e.g. docs/register_icbm152.png)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train_cohort", type=int, default=0,
                   help="train a brain model on this many other deformed templates first (0: no)")
    p.add_argument("--train_steps", type=int, default=1000, help="training steps for --train_cohort")
    return p.parse_args(argv)


def deformed(t1, labels, field, grid: Grid):
    """Template image and labels read through ``field`` on ``grid``: ``out(y) = template(y + d(y))``."""
    return icbm.deformed(t1, labels, KnownTransform(field), grid)


def make_inputs(args, folder: str) -> dict:
    t1, labels = load_template(args)
    os.makedirs(folder, exist_ok=True)
    paths = {k: os.path.join(folder, f"{k}.nii.gz") for k in ("fixed", "fixed_label", "moving", "moving_label")}
    save(paths["fixed"], t1.data, t1.affine)
    save(paths["fixed_label"], labels, t1.affine)

    box = template_box(t1)
    field = KnownField(box, args.spacing, args.magnitude, args.seed)
    spacing = np.array([1.2, 1.0, 1.4])
    shape = tuple(int(v) for v in np.floor((box[1] - box[0]) / spacing) + 1)
    affine = np.eye(4)
    affine[:3, :3] = orientation_matrix("LPI") * spacing
    affine[:3, 3] = (box[0] + box[1]) / 2 - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    moving, moving_labels = deformed(t1, labels, field, Grid(shape, affine))
    save(paths["moving"], moving, affine)
    save(paths["moving_label"], moving_labels, affine)

    # landmarks: brain points in the fixed image; their partners m solve m + d(m) = f
    wm_vox = np.argwhere(labels == 2)
    picks = wm_vox[np.random.default_rng(args.seed).choice(len(wm_vox), 8, replace=False)]
    fixed_pts = picks @ t1.affine[:3, :3].T + t1.affine[:3, 3]
    moving_pts = fixed_pts.copy()
    for _ in range(50):
        moving_pts = fixed_pts - field(moving_pts.T).T
    paths["fixed_landmarks"] = os.path.join(folder, "fixed_landmarks.csv")
    paths["moving_landmarks"] = os.path.join(folder, "moving_landmarks.csv")
    np.savetxt(paths["fixed_landmarks"], fixed_pts, delimiter=",", header="x,y,z", comments="", fmt="%.4f")
    np.savetxt(paths["moving_landmarks"], moving_pts, delimiter=",", header="x,y,z", comments="", fmt="%.4f")
    print(f"fixed: ICBM152 T1 {t1.shape} RAS 1 mm; moving: {shape} LPI {spacing.tolist()} mm, "
          f"known field up to {args.magnitude} mm")
    return paths


def run(cmd) -> None:
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"icbm_smoke.py: error: step failed: {' '.join(cmd)}")


def train_brain_model(args) -> str:
    """Deformed templates -> NIfTI folder -> convert_dataset.py -> train.py; returns the weights folder."""
    t1, labels = load_template(args)
    box = template_box(t1)
    folder = os.path.join(args.out, "cohort")
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for n in range(args.train_cohort):
        field = KnownField(box, args.spacing, args.magnitude, 100 + n)
        image, label = deformed(t1, labels, field, Grid(t1.shape, t1.affine))
        save(os.path.join(folder, "images", f"icbm_{n:03d}.nii.gz"), image, t1.affine)
        save(os.path.join(folder, "labels", f"icbm_{n:03d}.nii.gz"), label, t1.affine)
    dataset = os.path.join(folder, "icbm")
    run([sys.executable, os.path.join(ROOT, "convert_dataset.py"), "--images", os.path.join(folder, "images"),
         "--labels", os.path.join(folder, "labels"), "-o", dataset, "--size", "64", "64", "64",
         "--modality", "mri", "--image_type", "brain", "--val", "0.2", "--seed", "0"])
    run([sys.executable, os.path.join(ROOT, "train.py"), "-b", "LDR", "-n", "1", "-g", "-1",
         "--round", str(args.train_steps), "--epochs", "1", "--batch", "1", "--output", "icbm_brain",
         "-d", dataset + ".json", "--val_steps", str(args.train_steps), "--save_steps", str(args.train_steps),
         "--lr", "0.0003", "--seed", "0", "--threads", str(args.threads)])
    return os.path.join("weights", "icbm_brain")


def main(argv=None):
    args = parse_args(argv)
    if args.train_cohort:
        args.checkpoint = train_brain_model(args)
    paths = make_inputs(args, os.path.join(args.out, "inputs"))
    out = os.path.join(args.out, "registration")
    cmd = [sys.executable, os.path.join(ROOT, "register.py"), "-c", args.checkpoint, "-o", out,
           "--modality", "mri", "--threads", str(args.threads)]
    for key in ("fixed", "moving", "fixed_label", "moving_label", "fixed_landmarks", "moving_landmarks"):
        cmd += [f"--{key}", paths[key]]
    print("$ " + " ".join(cmd))
    r = subprocess.run(cmd)
    if r.returncode != 0:
        return r.returncode
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    print("\n| label | Dice before | Dice after |\n|---|---|---|")
    for value, name in LABELS.items():
        d = report["dice_per_label"][str(value)]
        print(f"| {name} | {d['before']:.4f} | {d['after']:.4f} |")
    print(f"| mean | {report['dice_before']:.4f} | {report['dice_after']:.4f} |")
    print(f"\nlandmark error (8 points, mm): {report['landmark_error_before_mm']:.3f} -> "
          f"{report['landmark_error_after_mm']:.3f}; folding {report['folding_pct']:.4f}%")
    print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in report["seconds"].items()))
    if args.figure:
        with atomic_output(args.figure) as tmp:
            shutil.copyfile(os.path.join(out, "figure.png"), tmp)
        print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
