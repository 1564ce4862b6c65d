"""ALDK ablation on synthetic data: teacher -> extracted flows -> student plain / + L2 / + ALDK.

``python experiments/aldk_ablation.py [--size 64] [--teacher_steps 2000] [--student_steps 1000]``
``python experiments/aldk_ablation.py --student_base Lite [--student_preset lite-affine] --runs plain,l2,aldk``

A benchmark, not a test: it runs the project's own commands (``data_util.synthetic``, ``train.py``,
``extract_teacher.py``, ``eval.py``) inside ``--work`` (default ``runs/aldk_ablation``, ignored by git):

1. synthetic data (``--train`` training scans -> all ordered pairs, ``--val`` held-out scans);
2. the teacher: affine + ``--teacher_cascades`` VTN cascades (RCN preset), trained with augmentation;
3. its flows for every training pair, extracted into ``Teacher_deformations/synthetic/``;
4. the 1-cascade student (default LDR affine + 1 LDR; ``--student_base``/``--student_preset``), up to four ways with the same initial weights, pair
   sequence, steps and seed, all without augmentation (stored teacher flows belong to the unaugmented
   pairs): ``plain`` (reconstruction loss only; run as ``--distill l2 --gamma 1`` so it reads the
   identical pair sequence), ``l2`` (``--distill l2``), ``aldk`` (``--aldk`` with the LDR_ALDK
   defaults beta 0.1, lamb 0.1 and the paper's squared score difference) and ``aldk_wgan``
   (``--aldk --lamb 10 --adv_loss wgan``, the usual WGAN-GP recipe), all distilled runs with
   ``--gamma`` (default 0.3);
5. ``eval.py`` of the teacher and the students on the held-out pairs, plus forward time on the CPU at ``--size`` (from
   eval.py) and at 128^3 (median of ``--time_runs`` after a warm-up, random input).

Finished stages are reused (a run whose final checkpoint exists is not retrained). The table is printed
and written to ``<work>/aldk_ablation.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import ROOT, run  # noqa: E402
from network.outputs import atomic_write_text  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "aldk_ablation"), help="working folder")
    p.add_argument("--size", type=int, default=64, help="synthetic image size (VTN needs a multiple of 64)")
    p.add_argument("--train", type=int, default=16, help="training scans")
    p.add_argument("--val", type=int, default=6, help="held-out scans")
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--teacher_base", default="VTN", choices=["VTN", "VoxelMorph", "LDR"])
    p.add_argument("--teacher_cascades", type=int, default=2)
    p.add_argument("--teacher_steps", type=int, default=2000)
    p.add_argument("--teacher_lr", type=float, default=2e-4)
    p.add_argument("--student_base", default="LDR", help="student base network (-b), e.g. LDR or Lite")
    p.add_argument("--student_preset", default=None, help="student preset (default: the base network's)")
    p.add_argument("--runs", default="plain,l2,aldk,aldk_wgan", help="student variants to train, comma-separated")
    p.add_argument("--student_steps", type=int, default=1000)
    p.add_argument("--student_lr", type=float, default=3e-4)
    p.add_argument("--gamma", type=float, default=0.3, help="gamma of the l2 and aldk students")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time_size", type=int, default=128, help="also time a forward pass at this size (0: skip)")
    p.add_argument("--time_runs", type=int, default=5)
    p.add_argument("--workers", type=int, default=1)
    return p.parse_args(argv)


def train(work, name, steps, extra, args):
    if os.path.exists(os.path.join(work, "weights", name, f"ckpt_{steps}.pt")):
        print(f"reusing weights/{name}/ckpt_{steps}.pt")
        return
    run([os.path.join(ROOT, "train.py"), "-g", "-1", "--batch", "1", "--steps", str(steps), "--output", name,
         "-d", "data/synthetic.json", "--seed", str(args.seed), "--val_steps", str(steps), "--val_pairs", "8",
         "--save_steps", str(steps), "--workers", str(args.workers)] + extra, work)


def evaluate(work, name, steps, args) -> dict:
    run([os.path.join(ROOT, "eval.py"), "-g", "-1", "--batch", "1", "-c", f"weights/{name}:{steps}",
         "--workers", str(args.workers)], work)
    with open(os.path.join(work, "evaluate", f"{name}-{steps}-2", f"{name}-{steps}-2.json"), encoding="utf-8") as f:
        return json.load(f)


def time_forward(model_config: dict, size: int, runs: int) -> tuple:
    """(median seconds, params) of one no-grad forward pass at ``size^3`` on the CPU, random weights."""
    import torch
    from network import build_model, count_parameters
    config = dict(model_config, image_size=[size] * 3)
    model = build_model(config).eval()
    x = torch.rand(1, 1, size, size, size)
    times = []
    with torch.no_grad():
        model(x, x)
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x, x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), count_parameters(model)


def main(argv=None):
    args = parse_args(argv)
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    t_start = time.time()
    if not os.path.exists(os.path.join(work, "data", "synthetic.json")):
        run(["-m", "data_util.synthetic", "--out", "data", "--size", str(args.size), "--train", str(args.train),
             "--val", str(args.val), "--seed", str(args.data_seed)], work)
    teacher = f"teacher_{args.teacher_cascades}cas_{args.teacher_base}"
    preset = "rcn" if args.teacher_base != "LDR" else "ldr-brain"
    train(work, teacher, args.teacher_steps, ["-b", args.teacher_base, "-n", str(args.teacher_cascades),
                                              "--preset", preset, "--lr", str(args.teacher_lr)], args)
    store = os.path.join("Teacher_deformations", "synthetic", f"{teacher}_{args.teacher_steps}.h5")
    if not os.path.exists(os.path.join(work, store)):
        run([os.path.join(ROOT, "extract_teacher.py"), "-c", f"weights/{teacher}:{args.teacher_steps}",
             "--out", store, "--workers", str(args.workers)], work)
    student = ["-b", args.student_base, "-n", "1", "--lr", str(args.student_lr), "--no_augment",
               "--pretrained_flow_path", store]
    if args.student_preset:
        student += ["--preset", args.student_preset]
    variants = {"plain": (student + ["--distill", "l2", "--gamma", "1"], "plain"),
                "l2": (student + ["--distill", "l2", "--gamma", str(args.gamma)], "+ L2 distillation"),
                "aldk": (student + ["--aldk", "--gamma", str(args.gamma)], "+ ALDK (seed defaults: lamb 0.1, paper loss)"),
                "aldk_wgan": (student + ["--aldk", "--gamma", str(args.gamma), "--lamb", "10", "--adv_loss", "wgan"],
                              "+ ALDK (lamb 10, wgan loss)")}
    chosen = [v.strip() for v in args.runs.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(variants))
    if unknown:
        raise SystemExit(f"aldk_ablation.py: error: unknown --runs {unknown}; choose from {sorted(variants)}")
    # the LDR students keep their original run names so earlier runs are reused
    tag = "" if (args.student_base, args.student_preset) == ("LDR", None) else \
        f"{args.student_base}{'_' + args.student_preset if args.student_preset else ''}_"
    described = f"1-cas {args.student_base}" + (f" ({args.student_preset})" if args.student_preset else "")
    for name in chosen:
        train(work, f"student_{tag}{name}", args.student_steps, variants[name][0], args)

    rows = [("teacher: affine + %d-cas %s" % (args.teacher_cascades, args.teacher_base), teacher, args.teacher_steps)]
    rows += [(f"student: {described}{', ' if name == 'plain' else ' '}{variants[name][1]}", f"student_{tag}{name}",
              args.student_steps) for name in chosen]
    results = []
    for label, name, steps in rows:
        r = evaluate(work, name, steps, args)
        s, info = r["summary"], r["info"]
        row = {"model": label, "run": name, "steps": steps, "dice": s["dice"]["mean"], "dice_std": s["dice"]["std"],
               "jacc": s["jacc"]["mean"], "landmark_dist": s["landmark_dist"]["mean"],
               "jac_nonpos_pct": s["jac_nonpos_pct"]["mean"], "dice_before": s["dice_before"]["mean"],
               "params": info["n_params"], "n_pairs": info["n_pairs"],
               "cpu_s": info["seconds_per_pair"]}
        if args.time_size:
            row["cpu_s_big"], row["params_big"] = time_forward(info["model_config"], args.time_size, args.time_runs)
        results.append(row)

    big = args.time_size
    head = (f"| model | Dice | Jacc | landmark dist (vox) | jac_nonpos_pct | params | CPU s/pair {args.size}^3 |"
            + (f" CPU s/pair {big}^3 (params) |" if big else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        line = (f"| {r['model']} | {r['dice']:.4f} ± {r['dice_std']:.3f} | {r['jacc']:.4f} | {r['landmark_dist']:.3f} | "
                f"{r['jac_nonpos_pct']:.3f} | {r['params']:,} | {r['cpu_s']:.3f} |")
        if big:
            line += f" {r['cpu_s_big']:.2f} ({r['params_big']:,}) |"
        lines.append(line)
    lines.append(f"| before registration | {results[0]['dice_before']:.4f} | | | | | |" + (" |" if big else ""))
    table = "\n".join(lines)
    import torch
    setup = (f"synthetic {args.size}^3, {args.train} training scans ({args.train * (args.train - 1)} pairs), "
             f"{args.val} held-out scans ({results[0]['n_pairs']} pairs); teacher {args.teacher_steps} steps lr "
             f"{args.teacher_lr} (augmented); students {args.student_steps} steps lr {args.student_lr}, batch 1, "
             f"seed {args.seed}, no augmentation, gamma {args.gamma}; torch {torch.__version__}, "
             f"{torch.get_num_threads()} CPU threads; total {(time.time() - t_start) / 60:.0f} min")
    print("\n" + setup + "\n\n" + table)
    stem = "aldk_ablation" + (f"_{tag.rstrip('_')}" if tag else "")
    atomic_write_text(os.path.join(work, stem + ".md"), setup + "\n\n" + table + "\n")
    atomic_write_text(os.path.join(work, stem + ".json"), json.dumps({"setup": vars(args), "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
