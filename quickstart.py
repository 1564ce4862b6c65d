"""Main job on the embedded default: synthetic data -> 1-cascade LDR on CPU -> evaluation.

``python quickstart.py`` runs, and prints, the same commands a user would type:

1. ``python -m data_util.synthetic`` writes an RCN-layout dataset (HDF5 + JSON) to ``data/synthetic``;
2. ``python train.py -b LDR -n 1 -g -1 ...`` trains on its training split;
3. ``python eval.py -g -1 --batch 1 --checkpoint weights/<output>`` scores held-out pairs and writes
   ``evaluate/<name>/<name>.txt/.json/.csv``;
4. ``python -m data_util.export_nifti`` writes two held-out scans as NIfTI (1.5 mm LPS grid) and
   ``python register.py`` registers them as a user would register their own scans, writing the warped
   image, displacement field, Jacobian, landmarks and figure to ``evaluate/<name>_register/``.
It ends with the unregistered vs registered Dice on the held-out pairs.
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


def main(argv=None):
    sys.path.insert(0, ROOT)
    from network.cli import positive_float, positive_int, run_name

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=positive_int, default=64, help="synthetic volume size (divisible by 16, >= 48)")
    p.add_argument("--train", type=positive_int, default=20, help="synthetic training scans")
    p.add_argument("--val", type=positive_int, default=6, help="synthetic held-out scans (all ordered pairs are scored)")
    p.add_argument("--steps", type=positive_int, default=1000, help="training steps (batch 1)")
    p.add_argument("--lr", type=positive_float, default=3e-4,
                   help="learning rate (3e-4 suits this short CPU run; the papers' long runs use 1e-4)")
    p.add_argument("--output", type=run_name, default="quickstart", help="run name under weights/, logs/, evaluate/")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    py = sys.executable
    data_dir = os.path.join("data", "synthetic")
    run([py, "-m", "data_util.synthetic", "--out", data_dir, "--size", str(args.size), "--train", str(args.train),
         "--val", str(args.val), "--seed", str(args.seed)])
    dataset = os.path.join(data_dir, "synthetic.json")
    run([py, os.path.join(ROOT, "train.py"), "-b", "LDR", "-n", "1", "-g", "-1", "--round", str(args.steps), "--epochs", "1",
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
    print("\n== quickstart result (held-out synthetic pairs) ==")
    print(f"pairs: {info['n_pairs']}  params: {info['n_params']:,}  CPU s/pair: {info['seconds_per_pair']:.3f}")
    print(f"Dice  unregistered {s['dice_before']['mean']:.4f} -> registered {s['dice']['mean']:.4f}")
    print(f"Jacc  unregistered {s['jacc_before']['mean']:.4f} -> registered {s['jacc']['mean']:.4f}")
    print(f"landmark distance (voxels) {s['landmark_dist_before']['mean']:.3f} -> {s['landmark_dist']['mean']:.3f}")
    print(f"folding: jac_nonpos_pct {s['jac_nonpos_pct']['mean']:.4f}%  sdlogj {s['sdlogj']['mean']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
