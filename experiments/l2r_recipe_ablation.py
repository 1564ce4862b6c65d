"""Learn2Reg hippocampus recipe ablation on synthetic hippocampus-like data: Dice term x symmetric training.

``python experiments/l2r_recipe_ablation.py [--steps 600] [--channels 2] [--runs baseline,dice,sym,dice_sym]``

A benchmark, not a test: it runs the project's own commands inside ``--work`` (default
``runs/l2r_recipe``, ignored by git):

1. ``python -m data_util.synthetic_hippocampus``: NIfTI images + head/tail label maps, a validation
   pairs CSV and a Learn2Reg-style dataset JSON (``--train`` training subjects, ``--val`` held-out ones,
   volumes ``--shape`` centre-cropped to ``--crop``);
2. ``train.py -b SpatialGradient`` four ways, with the same initial weights (``--seed``), pair sequence,
   augmentation draws, steps and learning rate: the recipe's LNCC (9^3, overlap mask) + 0.1 x
   L1(spatial gradient - 0.5) + deep supervision + joint affine augmentation (``baseline``), plus the
   soft Dice term (``dice``), plus symmetric training (``sym``), plus both (``dice_sym``);
3. ``eval.py`` of each on the held-out pairs (challenge scoring: Dice, Dice30, HD95, SDlogJ, folding).

Finished runs are reused (a run whose final checkpoint exists is not retrained). The table is printed
and written to ``<work>/l2r_recipe_ablation.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import ROOT, run  # noqa: E402
from network.outputs import atomic_write_text  # noqa: E402

RUNS = {
    "baseline": [],
    "dice": ["--dice_weight", "1"],
    "sym": ["--symmetric"],
    "dice_sym": ["--dice_weight", "1", "--symmetric"],
}
LABELS = {"baseline": "LNCC + L1 grad (baseline)", "dice": "+ Dice", "sym": "+ symmetric",
          "dice_sym": "+ Dice + symmetric"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "l2r_recipe"), help="working folder")
    p.add_argument("--train", type=int, default=20, help="training subjects")
    p.add_argument("--val", type=int, default=6, help="held-out subjects (their listed pairs are scored)")
    p.add_argument("--shape", type=int, nargs=3, default=[40, 48, 40], help="generated volume shape")
    p.add_argument("--crop", type=int, nargs=3, default=[32, 32, 32], help="crop size (multiple of 16, >= 32)")
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--runs", default=",".join(RUNS), help="variants to train, comma-separated")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--channels", type=int, default=2, help="SpatialGradient width multiplier (recipe: 8)")
    p.add_argument("--no_deep_supervision", action="store_true")
    p.add_argument("--affine_range", type=float, nargs=3, default=[10.0, 3.0, 0.1],
                   help="joint affine augmentation: degrees, voxels, zoom (the recipe's 20, 10, 0.2 are for "
                        "64^3 crops of whole scans; these suit 32^3 crops)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


def recipe_flags(args) -> list:
    flags = ["-b", "SpatialGradient", "--channels", str(args.channels), "--sim", "lncc", "--mask_overlap",
             "--regulariser", "gradient_l1", "--reg_weight", "0.1", "--augment", "affine",
             "--affine_range", *map(str, args.affine_range),
             "--lr", str(args.lr), "--lr_schedule", "constant"]
    return flags + ([] if args.no_deep_supervision else ["--deep_supervision"])


def main(argv=None):
    args = parse_args(argv)
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    data_json = os.path.join(work, "data", "hippocampus.json")
    if not os.path.exists(data_json):
        run(["-m", "data_util.synthetic_hippocampus", "--out", os.path.join(work, "data"),
             "--n_train", str(args.train), "--n_val", str(args.val), "--shape", *map(str, args.shape),
             "--crop", *map(str, args.crop), "--seed", str(args.data_seed)], work)
    threads = ["--threads", str(args.threads)] if args.threads else []
    results, seconds = {}, {}
    for name in [r for r in args.runs.split(",") if r]:
        if name not in RUNS:
            raise SystemExit(f"unknown run {name!r}; choose from {sorted(RUNS)}")
        ckpt = os.path.join(work, "weights", name, f"ckpt_{args.steps}.pt")
        if os.path.exists(ckpt):
            print(f"reusing {ckpt}")
        else:
            seconds[name] = run([os.path.join(ROOT, "train.py"), "-g", "-1", "-d", data_json, "--output", name,
                                 "--steps", str(args.steps), "--batch", str(args.batch), "--seed", str(args.seed),
                                 "--val_steps", "0", "--save_steps", str(args.steps), "--workers", "0"]
                                + recipe_flags(args) + RUNS[name] + threads, work)
        run([os.path.join(ROOT, "eval.py"), "-g", "-1", "-c", f"weights/{name}:{args.steps}", "--name", name,
             "--workers", "0", "--submission", os.path.join("submissions", name)] + threads, work)
        with open(os.path.join(work, "evaluate", name, f"{name}.json"), encoding="utf-8") as f:
            results[name] = json.load(f)

    def cell(report, key, stat="mean"):
        v = report["learn2reg"][key]
        return f"{v[stat]:.3f}" if stat == "p30" else f"{v['mean']:.3f} ± {v['std']:.3f}"

    first = next(iter(results.values()))
    n_pairs = first["info"]["n_pairs"]
    lines = [f"| setting ({n_pairs} held-out pairs) | Dice | Dice30 | Dice head | Dice tail | HD95 (vox) | SDlogJ | "
             "folding % |", "|---|---|---|---|---|---|---|---|"]
    before = first["learn2reg"]["l2r_dice_before"]
    lines.append(f"| unregistered | {before['mean']:.3f} ± {before['std']:.3f} | {before['p30']:.3f} | | | | | |")
    for name, report in results.items():
        lines.append(f"| {LABELS[name]} | {cell(report, 'l2r_dice')} | {cell(report, 'l2r_dice', 'p30')} | "
                     f"{cell(report, 'l2r_dice_1')} | {cell(report, 'l2r_dice_2')} | {cell(report, 'l2r_hd95')} | "
                     f"{cell(report, 'l2r_sdlogj_l2r')} | {report['learn2reg']['l2r_fold_pct']['mean']:.4f} |")
    table = "\n".join(lines)
    command = "python experiments/l2r_recipe_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"{table}\n\nSpatialGradient x{args.channels}, {args.steps} steps of batch {args.batch}, lr {args.lr}, "
            f"crop {args.crop}, seed {args.seed}; SDlogJ with offset 3. Command: `{command.strip()}`\n")
    print("\n" + text)
    atomic_write_text(os.path.join(work, "l2r_recipe_ablation.md"), text)
    atomic_write_text(os.path.join(work, "l2r_recipe_ablation.json"),
                      json.dumps({"args": vars(args), "train_seconds": seconds,
                                  "results": {k: {"learn2reg": v["learn2reg"], "info": v["info"]}
                                              for k, v in results.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
