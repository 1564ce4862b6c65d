"""Evaluate a trained checkpoint on a dataset split (RCN ``eval.py`` flags).

``python eval.py -g -1 --batch 1 --checkpoint weights/<run>[:STEP] [-v sliver] [-r REP] [--paired]``

Writes one folder per evaluation, as a set (staged, then swapped into place whole):
``evaluate/<name>/<name>.txt`` (one line per pair, then a Summary block of mean (std)), and
``<name>.json`` / ``<name>.csv`` with every pair's metrics, the model config, parameter count and
mean seconds per pair (fast-path registration, flow + warped image, after one warm-up batch).
The default name is ``<run>-<step>-<split>``, plus ``-r<rep>``, ``-<dataset>`` and ``-n<limit>`` when
``-r``, another ``-d`` or ``--limit`` is given, so sweeps do not overwrite each other.

Learn2Reg datasets (or ``--l2r``) are also scored the challenge way (``l2r_*`` columns): Dice per label
and mean (nearest-neighbour label warp), Dice30, HD95 in voxels and mm, SDlogJ, % folding.
``--submission DIR`` writes the challenge's ``DIR/task_04/disp_<fixed>_<moving>.npz`` files.

``--refine [N]`` refines every network flow by instance optimisation on its pair (``network/refine.py``;
seconds per pair then include it); the name gets ``-refine<N>``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys

import torch

from data_util import open_dataset
from data_util.volume_ops import uncrop_flow
from data_util.submission import write_displacement
from engine.evaluation import evaluate_pairs, load_model
from network import CheckpointError, count_parameters, load_checkpoint
from network.cli import ArgumentParser, nonneg_float, nonneg_int, positive_float, positive_int, run_name
from network.outputs import OutputSet, atomic_write_text
from network.inference import prepare, register, tune_allocator
from network.metrics import METRIC_KEYS, summarise, summarise_l2r
from network.cli import explicit_dests, fail, resolve_device, stored_dataset
from network.refine import register_pair
from network.refine_cli import add_refine_args, network_start, refine_arg_error, refine_config


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("-c", "--checkpoint", required=True, help="weights/<run>[:STEP] or a ckpt_<step>.pt file")
    p.add_argument("-d", "--dataset", default=None, help="dataset JSON (default: the one used for training)")
    p.add_argument("-v", "--val_subset", default=None, help="scheme to evaluate (default '2', the validation split)")
    p.add_argument("-g", "--gpu", default="-1", help="GPU id, or -1 for the CPU")
    p.add_argument("--batch", type=positive_int, default=1, help="pairs per forward pass")
    p.add_argument("-r", "--rep", type=positive_int, default=None, help="shared-weight repetitions at test time")
    p.add_argument("--paired", action="store_true", help="adjacent entries are pairs (LSPIG)")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N pairs")
    p.add_argument("--name", type=run_name, default=None,
                   help="output name (default <run>-<step>-<split>[-r<rep>][-<dataset>][-n<limit>])")
    p.add_argument("--out_dir", default="evaluate", help="folder that receives the <name>/ result folder")
    p.add_argument("--spacing", type=positive_float, nargs=3, default=None, help="voxel spacing in mm for landmark distances")
    p.add_argument("--workers", type=nonneg_int, default=1, help="data loader worker processes")
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (0: torch default)")
    c = p.add_argument_group("Learn2Reg challenge scoring and submission")
    c.add_argument("--l2r", action="store_true",
                   help="score the challenge way also on RCN datasets (on by default for Learn2Reg datasets)")
    c.add_argument("--sdlogj_offset", type=nonneg_float, default=3.0,
                   help="SDlogJ = std(log(J + offset)): 3 in the organisers' current script, 15 in Estienne et al.'s")
    c.add_argument("--crop", type=positive_int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="Learn2Reg datasets: crop size (default: the training run's, else the dataset JSON's)")
    c.add_argument("--submission", default=None, metavar="DIR",
                   help="write DIR/task_<NN>/disp_<fixed>_<moving>.npz (float16, (3, X, Y, Z) on the original "
                        "fixed grid) for every pair")
    c.add_argument("--task", type=nonneg_int, default=4, help="challenge task number of the submission folder")
    add_refine_args(p, network_optional=False)
    args = p.parse_args(argv)
    problem = refine_arg_error(args, explicit_dests(p, argv))
    if problem:
        p.error(problem)
    return args


def fmt(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.6f}"


TXT_KEYS = ["dice", "jacc", "landmark_dist", "jac_std", "jac_nonpos_pct", "sdlogj", "dice_before"]
SUMMARY_NAMES = {"dice": "Dice score", "jacc": "Jaccard score", "landmark_dist": "Landmark distance",
                 "jac_std": "Jacobian det std (jac_std)", "jac_nonpos_pct": "Jacobian det <= 0 (%)",
                 "sdlogj": "Std of log Jacobian det (sdlogj)", "dice_before": "Dice before registration",
                 "jacc_before": "Jaccard before registration",
                 "landmark_dist_before": "Landmark distance before registration"}


def l2r_text(l2r: dict, labels, offset: float) -> str:
    """The Learn2Reg block of the report: the challenge's columns, mean (std) over pairs."""
    def line(name, key, stat="mean"):
        v = l2r.get(key)
        if v is None:
            return ""
        extra = f" ({fmt(v['std'])})" if stat == "mean" else ""
        return f"{name}: {fmt(v[stat])}{extra}  [n={v['n']}]\n"

    out = "\nLearn2Reg scores (nearest-neighbour label warp; mean (std) over pairs)\n"
    out += line("Dice", "l2r_dice") + line("Dice30 (30th percentile over pairs)", "l2r_dice", "p30")
    for v in labels:
        out += line(f"Dice label {int(v)}", f"l2r_dice_{int(v)}")
    out += line("Dice before registration", "l2r_dice_before")
    out += line("HD95 (voxels)", "l2r_hd95") + line("HD95 (mm)", "l2r_hd95_mm")
    out += line(f"SDlogJ (log(J + {offset:g}))", "l2r_sdlogj_l2r") + line("Folding J <= 0 (%)", "l2r_fold_pct")
    return out


class SubmissionFolder:
    """Collects ``disp_<fixed>_<moving>.npz`` files as one :class:`~network.outputs.OutputSet`
    (``<root>/task_<NN>``), so an interrupted run leaves no half-written submission.

    Flows of cropped Learn2Reg pairs are mapped back to the original fixed grid (:func:`uncrop_flow`).
    """

    def __init__(self, root: str, task: int):
        self.set = OutputSet(os.path.join(root, f"task_{task:02d}"))
        self.final, self.staging = self.set.final, self.set.staging
        self.written = []

    def add(self, batch: dict, i: int, flow: torch.Tensor) -> None:
        if "offset1" in batch:
            flow = uncrop_flow(flow.cpu(), batch["offset1"][i].cpu(), batch["offset2"][i].cpu(),
                               batch["shape1"][i].cpu().tolist())
        self.written.append(write_displacement(self.staging, batch["id1"][i], batch["id2"][i], flow))

    def commit(self) -> str:
        self.set.commit()
        self.written = [os.path.join(self.final, os.path.basename(p)) for p in self.written]
        return self.final

    def discard(self) -> None:
        self.set.discard()


def render_txt(rows, summary, info, l2r=None) -> str:
    out = io.StringIO()
    out.write("# id1 id2 " + " ".join(TXT_KEYS) + "\n")
    for r in rows:
        out.write(f"{r['id1']} {r['id2']} " + " ".join(fmt(r[k]) for k in TXT_KEYS) + "\n")
    out.write("\nSummary\n")
    for k in METRIC_KEYS:
        mean, std, n = summary[k]
        out.write(f"{SUMMARY_NAMES[k]}: {fmt(mean)} ({fmt(std)})  [n={n}]\n")
    if l2r is not None:
        out.write(l2r_text(l2r, info["l2r_labels"], info["sdlogj_offset"]))
    out.write(f"Parameters: {info['n_params']}\n")
    out.write(f"Seconds per pair: {info['seconds_per_pair']:.4f} ({info['device']}, batch {info['batch']})\n")
    return out.getvalue()


def render_csv(rows) -> str:
    out = io.StringIO()
    extra = [k for k in (rows[0] if rows else {}) if k.startswith("l2r_")]
    w = csv.DictWriter(out, fieldnames=["id1", "id2"] + METRIC_KEYS + extra + ["seconds"])
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in w.fieldnames})
    return out.getvalue()


def refine_batch(args, model, batch, flow):
    """Each pair's network flow refined by instance optimisation (``--refine``)."""
    config = refine_config(args, with_network=True)
    out = []
    for i in range(flow.shape[0]):
        fixed, moving = batch["voxel1"][i:i + 1], batch["voxel2"][i:i + 1]
        if config.affine != "none":          # affine stage, the network on the aligned pair, then deformable
            out.append(register_pair(fixed, moving, config, network=lambda f, m: register(model, f, m)["flow"]).flow)
            continue
        try:
            start = network_start(model, fixed, moving, flow[i:i + 1], args.refine_from)
        except ValueError as e:
            fail(f"{args.checkpoint}: {e}")
        out.append(register_pair(fixed, moving, config, init_flow=start).flow)
    return torch.cat(out)


def default_name(args, state, split: str, dataset_path: str) -> str:
    """``<run>-<step>-<split>``, with ``-r<rep>``, ``-<dataset>`` and ``-n<limit>`` when they are given."""
    run = os.path.basename(os.path.dirname(os.path.abspath(state["path"])))
    name = f"{run}-{state['step']}-{split}"
    if args.rep is not None:
        name += f"-r{args.rep}"
    trained_on = (state.get("train_args") or {}).get("dataset_abspath")
    if args.dataset and os.path.abspath(dataset_path) != trained_on:
        name += "-" + os.path.splitext(os.path.basename(dataset_path))[0]
    if args.limit is not None:
        name += f"-n{args.limit}"
    if args.refine is not None:
        name += f"-refine{args.refine}"
    return name


def write_results(out: OutputSet, name: str, rows, summary, info, l2r_summary) -> None:
    report = {"info": info, "summary": {k: {"mean": m, "std": s, "n": n} for k, (m, s, n) in summary.items()}}
    if l2r_summary is not None:
        report["learn2reg"] = l2r_summary
    report["pairs"] = rows
    atomic_write_text(out.path(name + ".json"), json.dumps(report, indent=1))
    atomic_write_text(out.path(name + ".csv"), render_csv(rows))
    atomic_write_text(out.path(name + ".txt"), render_txt(rows, summary, info, l2r_summary))


def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.gpu)
    try:
        state = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        fail(str(e))
    config = dict(state["model_config"])
    if args.rep is not None:
        config["rep"] = args.rep
    dataset_path = args.dataset or stored_dataset(state)
    split = args.val_subset or "2"
    train_args = state.get("train_args") or {}
    crop = args.crop or train_args.get("crop")
    dataset = open_dataset(dataset_path, paired=args.paired or bool(train_args.get("paired")), splits=[split],
                           crop=tuple(crop) if crop else None)
    loader = dataset.loader(split, args.batch, loop=False, num_workers=args.workers, limit=args.limit)
    model = prepare(load_model(state, config, dataset).to(device))
    tune_allocator()
    n_params = count_parameters(model)
    class_values = list(dataset.segmentation_class_value.values()) if dataset.segmentation_class_value else None
    l2r_labels = (class_values or [255]) if (args.l2r or getattr(dataset, "image_type", None) == "learn2reg") else None
    name = args.name or default_name(args, state, split, dataset_path)
    out = OutputSet(os.path.join(args.out_dir, name))         # fails now, not after the evaluation, if unwritable
    submission = SubmissionFolder(args.submission, args.task) if args.submission else None
    print(f"evaluating {state['path']} (step {state['step']}, {n_params:,} params, rep {model.config.rep}) "
          f"on '{split}': {dataset.num_pairs(split) if args.limit is None else args.limit} pairs")

    from tqdm import tqdm
    def add_to_submission(batch, i, flow):
        try:
            submission.add(batch, i, flow)
        except ValueError as e:
            fail(f"{args.submission}: {e}")

    try:
        rows, times = evaluate_pairs(
            model, loader, device, class_values, l2r_labels=l2r_labels, spacing=args.spacing,
            sdlogj_offset=args.sdlogj_offset,
            refine=(lambda batch, flow: refine_batch(args, model, batch, flow)) if args.refine is not None else None,
            on_flow=add_to_submission if submission is not None else None,
            progress=lambda loader: tqdm(loader, disable=None, dynamic_ncols=True))
        if not rows:
            fail(f"{dataset_path}: split '{split}' has no pairs")
        summary = summarise(rows)
        l2r_summary = summarise_l2r(rows, [k for k in rows[0] if k.startswith("l2r_")]) if l2r_labels else None
        info = {"checkpoint": state["path"], "step": state["step"], "dataset": dataset_path, "split": split,
                "model_config": model.config.to_dict(), "n_params": n_params, "n_pairs": len(rows),
                "seconds_per_pair": sum(times) / len(times), "device": str(device), "batch": args.batch,
                "threads": torch.get_num_threads()}
        if args.refine is not None:
            info["refine"] = refine_config(args, with_network=True).to_dict()
        if l2r_summary is not None:
            info.update(l2r_labels=l2r_labels, sdlogj_offset=args.sdlogj_offset)
        if submission is not None:
            info["submission"] = os.path.join(args.submission, os.path.basename(submission.final))
        write_results(out, name, rows, summary, info, l2r_summary)
        if submission is not None:
            submission.commit()
        out.commit()
    except BaseException:
        out.discard()
        if submission is not None:
            submission.discard()
        raise
    print(f"Dice {fmt(summary['dice'][0])} ({fmt(summary['dice'][1])}), before registration "
          f"{fmt(summary['dice_before'][0])}; Jacc {fmt(summary['jacc'][0])}; landmark dist "
          f"{fmt(summary['landmark_dist'][0])} (before {fmt(summary['landmark_dist_before'][0])}); "
          f"jac_nonpos {fmt(summary['jac_nonpos_pct'][0])}%; {info['seconds_per_pair']:.4f} s/pair")
    if l2r_summary is not None:
        print(l2r_text(l2r_summary, l2r_labels, args.sdlogj_offset).rstrip())
    if submission is not None:
        print(f"wrote {len(submission.written)} displacement files to {info['submission']}")
    base = os.path.join(args.out_dir, name, name)
    print(f"wrote {base}.txt, {base}.json, {base}.csv")
    return 0


def cli() -> int:
    """Console entry point (``ldr-eval``): :func:`main` with every fault reported as one line."""
    from network.cli import run

    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
