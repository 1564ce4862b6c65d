"""Evaluate a trained checkpoint on a dataset split (RCN ``eval.py`` flags).

``python eval.py -g -1 --batch 1 --checkpoint weights/<run>[:STEP] [-v sliver] [-r REP] [--paired]``

Writes ``evaluate/<name>.txt`` (one line per pair, then a Summary block of mean (std)), and
``evaluate/<name>.json`` / ``.csv`` with every pair's metrics, the model config, parameter count and
mean seconds per pair (fast-path registration, flow + warped image, after one warm-up batch).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time

import torch

from data_util import DatasetError, RCNDataset, make_loader
from network import CheckpointError, SizeError, build_model, count_parameters, load_checkpoint
from network.checkpoint import atomic_write_text
from network.inference import prepare, register, tune_allocator
from network.metrics import METRIC_KEYS, pair_metrics, summarise
from train import fail, resolve_device, stored_dataset, to_device


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--checkpoint", required=True, help="weights/<run>[:STEP] or a ckpt_<step>.pt file")
    p.add_argument("-d", "--dataset", default=None, help="dataset JSON (default: the one used for training)")
    p.add_argument("-v", "--val_subset", default=None, help="scheme to evaluate (default '2', the validation split)")
    p.add_argument("-g", "--gpu", default="-1", help="GPU id, or -1 for the CPU")
    p.add_argument("--batch", type=int, default=1, help="pairs per forward pass")
    p.add_argument("-r", "--rep", type=int, default=None, help="shared-weight repetitions at test time")
    p.add_argument("--paired", action="store_true", help="adjacent entries are pairs (LSPIG)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N pairs")
    p.add_argument("--name", default=None, help="output name (default <run>-<step>-<subset>)")
    p.add_argument("--out_dir", default="evaluate", help="folder for the .txt/.json/.csv results")
    p.add_argument("--spacing", type=float, nargs=3, default=None, help="voxel spacing in mm for landmark distances")
    p.add_argument("--workers", type=int, default=1, help="data loader worker processes")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    return p.parse_args(argv)


def fmt(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.6f}"


TXT_KEYS = ["dice", "jacc", "landmark_dist", "jac_std", "jac_nonpos_pct", "sdlogj", "dice_before"]
SUMMARY_NAMES = {"dice": "Dice score", "jacc": "Jaccard score", "landmark_dist": "Landmark distance",
                 "jac_std": "Jacobian det std (jac_std)", "jac_nonpos_pct": "Jacobian det <= 0 (%)",
                 "sdlogj": "Std of log Jacobian det (sdlogj)", "dice_before": "Dice before registration",
                 "jacc_before": "Jaccard before registration",
                 "landmark_dist_before": "Landmark distance before registration"}


def render_txt(rows, summary, info) -> str:
    out = io.StringIO()
    out.write("# id1 id2 " + " ".join(TXT_KEYS) + "\n")
    for r in rows:
        out.write(f"{r['id1']} {r['id2']} " + " ".join(fmt(r[k]) for k in TXT_KEYS) + "\n")
    out.write("\nSummary\n")
    for k in METRIC_KEYS:
        mean, std, n = summary[k]
        out.write(f"{SUMMARY_NAMES[k]}: {fmt(mean)} ({fmt(std)})  [n={n}]\n")
    out.write(f"Parameters: {info['n_params']}\n")
    out.write(f"Seconds per pair: {info['seconds_per_pair']:.4f} ({info['device']}, batch {info['batch']})\n")
    return out.getvalue()


def render_csv(rows) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=["id1", "id2"] + METRIC_KEYS + ["seconds"])
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in w.fieldnames})
    return out.getvalue()


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
    try:
        split = args.val_subset or "2"
        dataset = RCNDataset(dataset_path, paired=args.paired or bool(state["train_args"].get("paired")),
                             splits=[split])
        loader = make_loader(dataset, split, args.batch, loop=False, num_workers=args.workers, limit=args.limit)
    except DatasetError as e:
        fail(str(e))
    try:
        model = build_model(config)
        model.load_state_dict(state["model"])
        if tuple(dataset.image_size) != tuple(model.config.image_size):
            raise SizeError(f"dataset size {tuple(dataset.image_size)} differs from the model's "
                            f"{tuple(model.config.image_size)}")
    except (SizeError, ValueError, RuntimeError) as e:
        fail(f"{state['path']}: {str(e).splitlines()[0]}")
    model = prepare(model.to(device))
    tune_allocator()
    n_params = count_parameters(model)
    class_values = list(dataset.segmentation_class_value.values()) if dataset.segmentation_class_value else None
    run = os.path.basename(os.path.dirname(os.path.abspath(state["path"])))
    name = args.name or f"{run}-{state['step']}-{split}"
    print(f"evaluating {state['path']} (step {state['step']}, {n_params:,} params, rep {model.config.rep}) "
          f"on '{split}': {dataset.num_pairs(split) if args.limit is None else args.limit} pairs")

    from tqdm import tqdm
    rows, times = [], []
    warmed = False
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, disable=None, dynamic_ncols=True):
                batch = to_device(batch, device)
                if not warmed:
                    register(model, batch["voxel1"], batch["voxel2"])
                    warmed = True
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                flow = register(model, batch["voxel1"], batch["voxel2"])["flow"]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = (time.perf_counter() - t) / flow.shape[0]
                times.append(dt)
                for r in pair_metrics(batch, flow, class_values, args.spacing):
                    r["seconds"] = dt
                    rows.append(r)
    except DatasetError as e:
        fail(str(e))
    if not rows:
        fail(f"{dataset_path}: split '{split}' has no pairs")
    summary = summarise(rows)
    info = {"checkpoint": state["path"], "step": state["step"], "dataset": dataset_path, "split": split,
            "model_config": model.config.to_dict(), "n_params": n_params, "n_pairs": len(rows),
            "seconds_per_pair": sum(times) / len(times), "device": str(device), "batch": args.batch,
            "threads": torch.get_num_threads()}
    base = os.path.join(args.out_dir, name)
    atomic_write_text(base + ".json", json.dumps({"info": info, "summary": {k: {"mean": m, "std": s, "n": n}
                                            for k, (m, s, n) in summary.items()}, "pairs": rows}, indent=1))
    atomic_write_text(base + ".csv", render_csv(rows))
    atomic_write_text(base + ".txt", render_txt(rows, summary, info))
    print(f"Dice {fmt(summary['dice'][0])} ({fmt(summary['dice'][1])}), before registration "
          f"{fmt(summary['dice_before'][0])}; Jacc {fmt(summary['jacc'][0])}; landmark dist "
          f"{fmt(summary['landmark_dist'][0])} (before {fmt(summary['landmark_dist_before'][0])}); "
          f"jac_nonpos {fmt(summary['jac_nonpos_pct'][0])}%; {info['seconds_per_pair']:.4f} s/pair")
    print(f"wrote {base}.txt, {base}.json, {base}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
