"""Main job on the embedded default: a shipped model on a real-anatomy pair, then train -> evaluate -> register.

``python quickstart.py`` runs, and prints, the same commands a user would type:

1. ``python -m data_util.icbm`` writes a real brain pair (the ICBM152 template from nilearn's wheel
   and a copy read through a known random affine + smooth field, with a scanner change) as NIfTI,
   and ``python register.py -c weights/brain_mri_lite`` registers it with the shipped brain model
   (affine stage, then the network), before any training;
2. ``python -m data_util.synthetic`` writes an RCN-layout dataset (HDF5 + JSON) to ``data/synthetic``;
3. ``python train.py -b Lite -n 1 -g -1 ...`` trains a 1-cascade Lite student on its training split;
4. ``python eval.py -g -1 --batch 1 --checkpoint weights/<output>`` scores held-out pairs and writes
   ``evaluate/<name>/<name>.txt/.json/.csv``;
5. ``python -m data_util.export_nifti`` writes two held-out scans as NIfTI (1.5 mm LPS grid) and
   ``python register.py`` registers them as a user would register their own scans, writing the warped
   image, displacement field, Jacobian, landmarks and figure to ``evaluate/<name>_register/``.
It ends with the Dice of both parts. ``--network LDR`` trains the seed repos' 1-cascade LDR instead
(about 1 s per step on 2 cores instead of about 0.1 s).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys


ROOT = os.path.dirname(os.path.abspath(__file__))


def run(cmd):
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=ROOT + (os.pathsep + path if path else ""))   # runs from any folder
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        print(f"quickstart.py: error: command failed with exit code {done.returncode}", file=sys.stderr)
        sys.exit(done.returncode)


def shipped_model_demo(py, args) -> dict | None:
    """Register the ICBM152 pair with the shipped model; its ``report.json``, or None when skipped."""
    import importlib.util
    if not os.path.isdir(os.path.join(ROOT, args.shipped)) and not os.path.isdir(args.shipped):
        print(f"note: {args.shipped} is missing; skipping the shipped-model demo")
        return None
    if importlib.util.find_spec("nilearn") is None:
        print("note: nilearn is not installed (pip install --no-deps nilearn), so the ICBM152 template is not "
              "here; skipping the shipped-model demo")
        return None
    shipped = args.shipped if os.path.isdir(args.shipped) else os.path.join(ROOT, args.shipped)
    pair_dir = os.path.join("data", "icbm_pair")
    out = os.path.join("evaluate", args.output + "_brain")
    run([py, "-m", "data_util.icbm", "-o", pair_dir, "--seeds", "0"])
    run([py, os.path.join(ROOT, "register.py"), "-c", shipped, "--fixed", os.path.join(pair_dir, "fixed.nii.gz"),
         "--moving", os.path.join(pair_dir, "moving_0.nii.gz"), "--fixed_label", os.path.join(pair_dir, "fixed_label.nii.gz"),
         "--moving_label", os.path.join(pair_dir, "moving_label_0.nii.gz"), "-o", out])
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def main(argv=None):
    sys.path.insert(0, ROOT)
    from network.cli import positive_float, positive_int, run_name

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=positive_int, default=64, help="synthetic volume size (divisible by 16, >= 48)")
    p.add_argument("--train", type=positive_int, default=20, help="synthetic training scans")
    p.add_argument("--val", type=positive_int, default=6, help="synthetic held-out scans (all ordered pairs are scored)")
    p.add_argument("--steps", type=positive_int, default=1000, help="training steps (batch 1)")
    p.add_argument("--network", choices=["Lite", "LDR"], default="Lite",
                   help="Lite: our CPU-first student (lite preset); LDR: the seed repos' 1-cascade LDR (ldr-brain)")
    p.add_argument("--shipped", default=os.path.join("weights", "brain_mri_lite"),
                   help="shipped model for the real-anatomy pair (skipped if the folder is missing)")
    p.add_argument("--lr", type=positive_float, default=3e-4,
                   help="learning rate (3e-4 suits this short CPU run; the papers' long runs use 1e-4)")
    p.add_argument("--output", type=run_name, default="quickstart", help="run name under weights/, logs/, evaluate/")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    py = sys.executable
    brain = shipped_model_demo(py, args)
    data_dir = os.path.join("data", "synthetic")
    run([py, "-m", "data_util.synthetic", "--out", data_dir, "--size", str(args.size), "--train", str(args.train),
         "--val", str(args.val), "--seed", str(args.seed)])
    dataset = os.path.join(data_dir, "synthetic.json")
    run([py, os.path.join(ROOT, "train.py"), "-b", args.network, "-n", "1", "-g", "-1", "--round", str(args.steps), "--epochs", "1",
         "--batch", "1", "--output", args.output, "-d", dataset, "--val_steps", str(max(1, args.steps // 4)),
         "--save_steps", str(args.steps), "--lr", str(args.lr), "--seed", str(args.seed), "--overwrite"])
    run([py, os.path.join(ROOT, "eval.py"), "-g", "-1", "--batch", "1", "--checkpoint", os.path.join("weights", args.output),
         "--name", args.output])
    nifti_dir = os.path.join(data_dir, "nifti")
    run([py, "-m", "data_util.export_nifti", "-d", dataset, "-e", "synth/val_000", "synth/val_001",
         "-o", nifti_dir, "--spacing", "1.5"])
    scan = lambda name: os.path.join(nifti_dir, f"synth_{name}")  # noqa: E731
    run([py, os.path.join(ROOT, "register.py"), "-c", os.path.join("weights", args.output), "--fixed", scan("val_000.nii.gz"),
         "--moving", scan("val_001.nii.gz"), "--fixed_label", scan("val_000_label.nii.gz"),
         "--moving_label", scan("val_001_label.nii.gz"), "--fixed_landmarks", scan("val_000_landmarks.csv"),
         "--moving_landmarks", scan("val_001_landmarks.csv"), "--modality", "uint8",
         "-o", os.path.join("evaluate", args.output + "_register")])
    with open(os.path.join("evaluate", args.output, args.output + ".json")) as f:
        result = json.load(f)
    s, info = result["summary"], result["info"]
    if brain is not None:
        print("\n== shipped model on a real brain pair (ICBM152 template vs a deformed copy, GM/WM) ==")
        stages = brain.get("refine", {}).get("seconds", {})
        print(f"Dice unregistered {brain['dice_before']:.4f} -> registered {brain['dice_after']:.4f}; seconds: "
              f"affine stage {stages.get('affine', float('nan')):.2f}, network {stages.get('network', float('nan')):.3f}, "
              f"whole register.py {brain['seconds']['total']:.2f}")
    print(f"\n== quickstart result (held-out synthetic pairs, 1-cascade {args.network} trained {args.steps} steps) ==")
    print(f"pairs: {info['n_pairs']}  params: {info['n_params']:,}  CPU s/pair: {info['seconds_per_pair']:.3f}")
    print(f"Dice  unregistered {s['dice_before']['mean']:.4f} -> registered {s['dice']['mean']:.4f}")
    print(f"Jacc  unregistered {s['jacc_before']['mean']:.4f} -> registered {s['jacc']['mean']:.4f}")
    print(f"landmark distance (voxels) {s['landmark_dist_before']['mean']:.3f} -> {s['landmark_dist']['mean']:.3f}")
    print(f"folding: jac_nonpos_pct {s['jac_nonpos_pct']['mean']:.4f}%  sdlogj {s['sdlogj']['mean']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
