"""Distillation ablation (the paper's Table 2, done with paired statistics over several seeds).

``python experiments/distillation_ablation.py [--seeds 0,1,2] [--steps 1200] [--work runs/distillation_ablation]``

A benchmark, not a test: it runs the project's own commands inside ``--work`` (ignored by git) and
reuses every finished stage, so an interrupted ablation continues where it stopped.

1. Synthetic data of one shared anatomy (``data_util.synthetic``): ``--train`` scans (all ordered pairs
   train), ``--val`` held-out scans (all ordered pairs evaluate).
2. Teachers, each a store of flows for every training pair (``extract_teacher.py``):
   ``oracle`` -- the generator's ground-truth flows (``--oracle``); ``trained`` -- a network trained on
   the same data (``--teacher_base`` x ``--teacher_cascades``, with augmentation).
3. Students (``--students``), one 1-cascade network per arm and seed, every arm with the same initial
   weights (``--seed``), the same pair sequence (all arms read the stored-flow pair list; ``plain`` is
   ``--distill l2 --distill_weight 0``), the same steps and lr schedule, no augmentation:
   ``plain``; ``l2`` (end-point error, automatic weight); ``aldk_paper`` (``--aldk --aldk_variant
   paper``, the LDR_ALDK losses); ``aldk_stable`` (``--aldk``, the default recipe).
4. ``eval.py`` of every model on the held-out pairs; the oracle's Dice there is computed from the
   true flows. For each arm and seed: mean Dice, the paired per-pair difference to ``plain`` of the
   same seed with its standard error, pairs better, folding, and "gap closed" =
   (student - plain) / (teacher - plain).

Writes ``<work>/<name>.json`` / ``.md`` and the validation curves ``<work>/<name>_curves.png``
(``--name``, default ``distillation_ablation``); ``--publish DIR`` copies the JSON and the PNG there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import ROOT  # noqa: E402
from network.outputs import atomic_output, atomic_write_text  # noqa: E402

ARMS = {"plain": ["--distill", "l2", "--distill_weight", "0"],
        "l2": ["--distill", "l2"],
        "aldk_paper": ["--aldk", "--aldk_variant", "paper"],
        "aldk_stable": ["--aldk"]}
VAL_LINE = re.compile(r"step (\d+): val dice ([0-9.]+)")
WDIST = re.compile(r"wdist (-?[0-9.e+-]+|nan|inf)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "distillation_ablation"), help="working folder")
    p.add_argument("--size", type=int, default=48, help="synthetic image size")
    p.add_argument("--train", type=int, default=16, help="training scans")
    p.add_argument("--val", type=int, default=6, help="held-out scans")
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--teacher_base", default="Lite")
    p.add_argument("--teacher_cascades", type=int, default=3)
    p.add_argument("--teacher_steps", type=int, default=2000)
    p.add_argument("--students", default="Lite", help="student base networks, comma-separated (Lite, LDR)")
    p.add_argument("--teachers", default="oracle,trained", help="teachers, comma-separated")
    p.add_argument("--arms", default=",".join(ARMS), help="arms, comma-separated")
    p.add_argument("--seeds", default="0,1,2", help="student seeds, comma-separated")
    p.add_argument("--paper_seeds", default=None,
                   help="seeds of the aldk_paper arm (default: --seeds; it costs the most and diverges)")
    p.add_argument("--steps", type=int, default=1000, help="student steps")
    p.add_argument("--lr", type=float, default=3e-4, help="teacher and student base lr")
    p.add_argument("--val_every", type=int, default=100, help="validation curve: every N steps on 8 pairs")
    p.add_argument("--name", default="distillation_ablation", help="stem of the result files in --work")
    p.add_argument("--publish", default=None, help="copy the summary JSON and the curves PNG into this folder")
    return p.parse_args(argv)


def python(cmd, cwd, log=None) -> None:
    """Run ``python <cmd>`` in ``cwd`` (repository on PYTHONPATH); output to ``log`` if given."""
    print("$ " + " ".join(cmd) + (f" > {os.path.relpath(log, cwd)}" if log else ""), flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    if log is None:
        subprocess.run([sys.executable] + cmd, cwd=cwd, env=env, check=True)
    else:
        with atomic_output(log) as tmp, open(tmp, "w", encoding="utf-8") as out:
            subprocess.run([sys.executable] + cmd, cwd=cwd, env=env, check=True, stdout=out,
                           stderr=subprocess.STDOUT)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def train(work, name, steps, extra, seed, args) -> None:
    if os.path.exists(os.path.join(work, "weights", name, f"ckpt_{steps}.pt")):
        return
    python([os.path.join(ROOT, "train.py"), "-g", "-1", "--batch", "1", "--steps", str(steps),
            "--round", str(max(1, steps // 5)), "--lr", str(args.lr), "--output", name, "--overwrite",
            "-d", "data/synthetic.json", "--seed", str(seed), "--val_steps", str(args.val_every),
            "--val_pairs", "8", "--save_steps", str(steps), "--keep", "1", "--log_steps", "50"] + extra,
           work, log=os.path.join(work, "logs_txt", name + ".log"))


def evaluate(work, name, steps) -> dict:
    folder = os.path.join(work, "evaluate", f"{name}-{steps}-2", f"{name}-{steps}-2.json")
    if not os.path.exists(folder):
        python([os.path.join(ROOT, "eval.py"), "-g", "-1", "--batch", "1", "-c", f"weights/{name}:{steps}"], work)
    with open(folder, encoding="utf-8") as f:
        report = json.load(f)
    return {f"{r['id1']}-{r['id2']}": {"dice": r["dice"], "fold": r["jac_nonpos_pct"]} for r in report["pairs"]}


def oracle_scores(work) -> dict:
    """Per held-out pair: Dice and folding of the generator's true flow (the oracle's own score)."""
    import torch

    from data_util import RCNDataset, make_loader
    from data_util.synthetic import OracleTeacher
    from network.metrics import pair_metrics

    dataset = RCNDataset(os.path.join(work, "data", "synthetic.json"), splits=["2"])
    oracle = OracleTeacher(dataset)
    pairs = dataset.pairs("2")
    loader = make_loader(dataset, "2", 1, pairs=pairs, num_workers=0)
    values = list(dataset.segmentation_class_value.values())
    scores = {}
    for (fixed, moving), batch in zip(pairs, loader):
        flow = torch.from_numpy(oracle.flow(fixed, moving))[None]
        row = pair_metrics(batch, flow, values)[0]
        scores[f"{row['id1']}-{row['id2']}"] = {"dice": row["dice"], "fold": row["jac_nonpos_pct"]}
    return scores


def curve(work, name) -> list:
    with open(os.path.join(work, "logs_txt", name + ".log"), encoding="utf-8") as f:
        text = f.read()
    return [(int(s), float(d)) for s, d in VAL_LINE.findall(text)]


def largest_critic_gap(work, name) -> float | None:
    with open(os.path.join(work, "logs_txt", name + ".log"), encoding="utf-8") as f:
        values = [float(v) for v in WDIST.findall(f.read())]
    return max((abs(v) for v in values), default=None) if values else None


def paired(student: dict, plain: dict) -> dict:
    keys = sorted(plain)
    diffs = [student[k]["dice"] - plain[k]["dice"] for k in keys]
    n = len(diffs)
    sem = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else float("nan")
    return {"dice": statistics.fmean(student[k]["dice"] for k in keys), "delta": statistics.fmean(diffs),
            "sem": sem, "better": sum(d > 0 for d in diffs), "n_pairs": n,
            "fold_pct": statistics.fmean(student[k]["fold"] for k in keys)}


def stage_teachers(work, args, teachers) -> dict:
    """Teacher stores and the teachers' held-out scores."""
    stores, scores = {}, {}
    if "oracle" in teachers:
        stores["oracle"] = "Teacher_deformations/synthetic/oracle.h5"
        if not os.path.exists(os.path.join(work, stores["oracle"])):
            python([os.path.join(ROOT, "extract_teacher.py"), "--oracle", "-d", "data/synthetic.json",
                    "--out", stores["oracle"]], work)
        scores["oracle"] = oracle_scores(work)
    if "trained" in teachers:
        name = f"teacher_{args.teacher_cascades}cas_{args.teacher_base}"
        train(work, name, args.teacher_steps, ["-b", args.teacher_base, "-n", str(args.teacher_cascades)], 0, args)
        stores["trained"] = f"Teacher_deformations/synthetic/{name}_{args.teacher_steps}.h5"
        if not os.path.exists(os.path.join(work, stores["trained"])):
            python([os.path.join(ROOT, "extract_teacher.py"), "-c", f"weights/{name}:{args.teacher_steps}",
                    "--out", stores["trained"]], work)
        scores["trained"] = evaluate(work, name, args.teacher_steps)
    return stores, scores


def run_students(work, args, stores, teacher_scores) -> tuple:
    """Train and evaluate every arm; ``(rows, curves, plain scores)``."""
    seeds = [int(s) for s in args.seeds.split(",")]
    paper_seeds = seeds if args.paper_seeds is None else [int(s) for s in args.paper_seeds.split(",")]
    arms = [a for a in args.arms.split(",") if a]
    rows, curves = [], {}
    any_store = next(iter(stores.values()))
    for student in args.students.split(","):
        for seed in seeds:
            base = ["-b", student, "-n", "1", "--no_augment"]
            plain_name = f"{student}_plain_s{seed}"
            train(work, plain_name, args.steps, base + ARMS["plain"] + ["--pretrained_flow_path", any_store], seed, args)
            plain = evaluate(work, plain_name, args.steps)
            curves[plain_name] = ("plain", None, curve(work, plain_name))
            rows.append(dict(paired(plain, plain), arm="plain", teacher=None, student=student, seed=seed,
                             gap_closed=None, critic_gap_max=None))
            for teacher, store in stores.items():
                teacher_dice = statistics.fmean(v["dice"] for v in teacher_scores[teacher].values())
                for arm in arms:
                    if arm == "plain" or (arm == "aldk_paper" and seed not in paper_seeds):
                        continue
                    name = f"{student}_{arm}_{teacher}_s{seed}"
                    train(work, name, args.steps, base + ARMS[arm] + ["--pretrained_flow_path", store], seed, args)
                    scores = evaluate(work, name, args.steps)
                    curves[name] = (arm, teacher, curve(work, name))
                    row = paired(scores, plain)
                    plain_dice = statistics.fmean(v["dice"] for v in plain.values())
                    gap = (row["dice"] - plain_dice) / (teacher_dice - plain_dice) if teacher_dice != plain_dice else None
                    rows.append(dict(row, arm=arm, teacher=teacher, student=student, seed=seed, gap_closed=gap,
                                     teacher_dice=teacher_dice, critic_gap_max=largest_critic_gap(work, name)))
    return rows, curves


def mean_of(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def summarise(rows) -> list:
    """Across seeds, per (student, teacher, arm): mean of the seeds' values and which seeds pass 2 sem."""
    groups = {}
    for r in rows:
        groups.setdefault((r["student"], r["teacher"], r["arm"]), []).append(r)
    out = []
    for (student, teacher, arm), rs in groups.items():
        out.append({"student": student, "teacher": teacher, "arm": arm, "seeds": [r["seed"] for r in rs],
                    **{k: mean_of(rs, k) for k in ("dice", "delta", "gap_closed", "fold_pct")},
                    "better": [r["better"] for r in rs],
                    "seeds_above_2sem": sum(r["delta"] > 2 * r["sem"] for r in rs if arm != "plain")})
    return out


def table(rows, teacher_scores) -> str:
    lines = ["| student | teacher | arm | seed | Dice | paired Δ vs plain ± sem | pairs better | folding % | gap closed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = "" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f} %"
        delta = "" if r["arm"] == "plain" else f"{r['delta']:+.4f} ± {r['sem']:.4f}"
        better = "" if r["arm"] == "plain" else f"{r['better']}/{r['n_pairs']}"
        lines.append(f"| {r['student']} | {r['teacher'] or ''} | {r['arm']} | {r['seed']} | {r['dice']:.4f} | {delta} | "
                     f"{better} | {r['fold_pct']:.3f} | {gap} |")
    for teacher, scores in teacher_scores.items():
        lines.append(f"\nteacher '{teacher}' on the held-out pairs: Dice "
                     f"{statistics.fmean(v['dice'] for v in scores.values()):.4f}, folding "
                     f"{statistics.fmean(v['fold'] for v in scores.values()):.3f} %")
    return "\n".join(lines)


def plot(curves, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {"plain": "k", "l2": "tab:blue", "aldk_paper": "tab:red", "aldk_stable": "tab:green"}
    styles = {"oracle": "-", "trained": "--"}
    for name, (arm, teacher, points) in sorted(curves.items()):
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, colours[arm], linestyle=styles.get(teacher, ":"), alpha=0.7, linewidth=1,
                label=f"{arm}{' / ' + teacher if teacher else ''}")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xlabel("student step")
    ax.set_ylabel("validation Dice (8 held-out pairs)")
    ax.set_ylim(0.5, None)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


def main(argv=None):
    args = parse_args(argv)
    work = os.path.abspath(args.work)
    os.makedirs(os.path.join(work, "logs_txt"), exist_ok=True)
    t0 = time.time()
    if not os.path.exists(os.path.join(work, "data", "synthetic.json")):
        python(["-m", "data_util.synthetic", "--out", "data", "--size", str(args.size), "--train", str(args.train),
                "--val", str(args.val), "--seed", str(args.data_seed)], work)
    teachers = [t for t in args.teachers.split(",") if t]
    stores, teacher_scores = stage_teachers(work, args, teachers)
    rows, curves = run_students(work, args, stores, teacher_scores)
    summary = summarise(rows)
    import torch
    setup = (f"synthetic {args.size}^3 (one shared anatomy), {args.train} training scans "
             f"({args.train * (args.train - 1)} pairs), {args.val} held-out scans ({args.val * (args.val - 1)} pairs); "
             f"trained teacher {args.teacher_cascades} x {args.teacher_base}, {args.teacher_steps} steps (augmented); "
             f"students {args.steps} steps, batch 1, lr {args.lr} (rcn schedule, round {max(1, args.steps // 5)}), "
             f"no augmentation; torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
             f"{(time.time() - t0) / 60:.0f} min this call")
    text = setup + "\n\n" + table(rows, teacher_scores)
    print("\n" + text)
    result = {"command": "python experiments/distillation_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "setup": vars(args), "teachers": {t: {"dice": statistics.fmean(v["dice"] for v in s.values()),
                                                     "fold_pct": statistics.fmean(v["fold"] for v in s.values())}
                                                 for t, s in teacher_scores.items()},
              "rows": rows, "summary": summary}
    atomic_write_text(os.path.join(work, args.name + ".md"), text + "\n")
    atomic_write_text(os.path.join(work, args.name + ".json"), json.dumps(result, indent=1))
    png = os.path.join(work, args.name + "_curves.png")
    plot(curves, png)
    if args.publish:
        os.makedirs(args.publish, exist_ok=True)
        for path in (os.path.join(work, args.name + ".json"), png):
            shutil.copyfile(path, os.path.join(args.publish, os.path.basename(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
