"""Shipped models: ``weights/<name>/`` holds one weights-only checkpoint and a ``manifest.json``.

``python -m network.pretrained publish weights/<run> --name NAME --eval E.json [--benchmark B.json]``
turns a finished training run into a shipped model: its latest checkpoint without the optimiser
(and critic) state, and a manifest with the recipe (the training commands, dataset config and its
generator seed, steps), the file's sha256, the input normalisation and affine stage the model
expects, and the validation numbers (``eval.py``'s summary and, if given, the ICBM152 or CT phantom benchmark's).
``weights/README.md`` gets a table of every shipped model. ``python -m network.pretrained verify
NAME`` checks the file against the manifest's sha256.

Shipped checkpoints load like any run folder: ``register.py -c weights/<name>``, ``eval.py -c
weights/<name>``, ``train.py -c weights/<name>`` (fine-tuning with a fresh optimiser).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import torch

from .checkpoint import TRAINING_STATE, CheckpointError, load_checkpoint
from .outputs import OutputError, OutputSet, atomic_write_text

MANIFEST = "manifest.json"
DROPPED = TRAINING_STATE                          # training-only state, not shipped
README_START, README_END = "<!-- shipped models: start -->", "<!-- shipped models: end -->"


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the {what} ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: the {what} is not a JSON object")
    return value


def eval_summary(path: str) -> dict:
    """The mean metrics of an ``eval.py`` result JSON, with its pair count and split."""
    result = read_json(path, "eval.py result")
    try:
        summary = {k: round(float(v["mean"]), 4) for k, v in result["summary"].items() if "mean" in v}
        info = result["info"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not an eval.py result JSON (missing {e})") from None
    return {"n_pairs": info.get("n_pairs"), "split": info.get("val_subset", info.get("split")),
            "seconds_per_pair": info.get("seconds_per_pair"), **summary}


def benchmark_summary(path: str) -> dict:
    """The per-method summary and paired comparisons of a benchmark result JSON
    (``experiments/icbm_benchmark.py``, ICBM152 or the abdomen CT phantom)."""
    result = read_json(path, "benchmark result")
    try:
        rows = {name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}
                for name, s in result["summary"].items()}
        args = result["args"]
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not an icbm_benchmark.py result (missing {e})") from None
    return {"anatomy": args.get("anatomy", "icbm152"), "pairs": args.get("pairs"), "contrast": args.get("contrast", "same"),
            "magnitude_mm": args.get("magnitude"), "threads": args.get("threads"), "methods": rows,
            "comparisons": result.get("comparisons", [])}


def training_commands(state: dict, given=()) -> list:
    """The recipe's commands in order: ``given``, else every command the checkpoint recorded (its
    first start, then any resume or fine-tuning stage)."""
    if given:
        return list(given)
    commands = state.get("commands") or []
    if not commands:
        raise CheckpointError(f"{state['path']}: the checkpoint records no training command; pass --command")
    return list(commands)


def publish(run: str, name: str, eval_json: str, benchmark_json=(), commands=(),
            description: str = "", root: str = "weights") -> str:
    """Write ``root/name/`` (checkpoint + manifest) as one set; returns the folder."""
    state = load_checkpoint(run)
    shipped = {k: v for k, v in state.items() if k not in DROPPED + ("path",)}
    args = state.get("train_args") or {}
    dataset = args.get("dataset_abspath") or args.get("dataset")
    dataset_config = read_json(dataset, "dataset config") if dataset and os.path.exists(dataset) else None
    step = int(state["step"])
    file_name = f"ckpt_{step}.pt"
    manifest = {
        "name": name, "description": description, "checkpoint": file_name, "step": step,
        "n_params": state.get("n_params"), "model": state["model_config"],
        "input": {"normalisation": state.get("input_normalisation"),
                  "affine_stage": state.get("register_affine", "none"),
                  "grid": list(state["model_config"]["image_size"])},
        "recipe": {"commands": training_commands(state, commands), "dataset": args.get("dataset"),
                   "dataset_config": dataset_config,
                   "generator_seed": (dataset_config or {}).get("seed"), "run_seed": args.get("seed"),
                   "steps": step},
        "validation": {"eval": {"command": f"python eval.py -c {root}/{name}", **eval_summary(eval_json)},
                       **benchmarks_by_anatomy([benchmark_summary(p) for p in benchmark_json])},
        "software": {"torch": torch.__version__.split("+")[0]},
        "created": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    folder = os.path.join(root, name)
    with OutputSet(folder) as out:
        torch.save(shipped, out.path(file_name))
        manifest["bytes"] = os.path.getsize(out.path(file_name))
        manifest["sha256"] = sha256(out.path(file_name))
        with open(out.path(MANIFEST), "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
    write_readme(root)
    return folder


def manifests(root: str = "weights") -> list:
    out = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name, MANIFEST)
        if os.path.isfile(path):
            out.append(read_json(path, "manifest"))
    return out


def verify(folder: str) -> dict:
    """The manifest of ``folder`` after checking its checkpoint's size and sha256 (one-line errors)."""
    manifest = read_json(os.path.join(folder, MANIFEST), "manifest")
    path = os.path.join(folder, str(manifest.get("checkpoint")))
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: the checkpoint named in {folder}/{MANIFEST} is missing")
    if os.path.getsize(path) != manifest.get("bytes") or sha256(path) != manifest.get("sha256"):
        raise CheckpointError(f"{path}: does not match the sha256 in {folder}/{MANIFEST} (a damaged or "
                              f"replaced file, or a Git LFS pointer)")
    return manifest


BENCHMARK_KEYS = {"icbm152": ("icbm152", "ICBM152"), "abdomen": ("abdomen_phantom", "CT phantom")}  # manifest key, label


def benchmarks_by_anatomy(summaries: list) -> dict:
    """``{"icbm152": [...], "abdomen_phantom": [...]}``: the manifest's benchmark lists (ICBM152
    always present)."""
    out = {"icbm152": []}
    for b in summaries:
        out.setdefault(BENCHMARK_KEYS.get(b["anatomy"], (b["anatomy"],))[0], []).append(b)
    return out


def readme_table(items: list) -> str:
    lines = ["| model | for | grid | affine stage | params | synthetic val Dice (before -> after) | "
             "benchmark Dice (ANTs affine / ANTs SyN / this model) | network s | file |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in items:
        ev = m["validation"]["eval"]
        icbm, net = "", None
        for key, label in BENCHMARK_KEYS.values():
            same = [b for b in m["validation"].get(key, []) if b.get("contrast", "same") == "same"]
            if same:
                rows = same[0]["methods"]
                icbm = f"{label}: " + " / ".join(f"{rows[k]['dice']:.3f}" if k in rows else "-"
                                                 for k in ("ants-affine", "ants-syn", "network"))
                net = rows.get("network", {}).get("network_seconds")
                break
        lines.append(f"| `{m['name']}` | {m['description']} | {'x'.join(map(str, m['input']['grid']))} | "
                     f"{m['input']['affine_stage']} | {m['n_params']:,} | {ev.get('dice_before', float('nan')):.3f} "
                     f"-> {ev.get('dice', float('nan')):.3f} | {icbm} | {'' if net is None else f'{net:.3f}'} | "
                     f"{m['checkpoint']} ({m['bytes'] / 1e6:.2f} MB) |")
    return "\n".join(lines)


def write_readme(root: str = "weights") -> None:
    path = os.path.join(root, "README.md")
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    block = f"{README_START}\n{readme_table(manifests(root))}\n{README_END}"
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        text = head + block + rest.split(README_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m network.pretrained", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command_name", required=True)
    pub = sub.add_parser("publish", help="ship a finished run as weights/<name>/")
    pub.add_argument("run", help="training run folder weights/<run>[:STEP] or a ckpt_<step>.pt file")
    pub.add_argument("--name", required=True, help="shipped model name (folder under --root)")
    pub.add_argument("--eval", required=True, help="eval.py result JSON of this checkpoint (evaluate/<n>/<n>.json)")
    pub.add_argument("--benchmark", nargs="*", default=[], help="experiments/icbm_benchmark.py results.json file(s) (ICBM152 or --anatomy abdomen)")
    pub.add_argument("--command", action="append", default=[], help="a training command of the recipe, in order; "
                     "repeat for each stage (default: the commands the checkpoint records)")
    pub.add_argument("--description", default="", help="one line: what the model registers")
    pub.add_argument("--root", default="weights", help="folder of shipped models")
    ver = sub.add_parser("verify", help="check a shipped model's file against its manifest")
    ver.add_argument("folder", nargs="+", help="weights/<name> folder(s)")
    args = p.parse_args(argv)
    try:
        if args.command_name == "publish":
            if "/" in args.name or args.name in ("", ".", ".."):
                p.error(f"--name must be a plain folder name, got {args.name!r}")
            folder = publish(args.run, args.name, args.eval, args.benchmark, args.command, args.description,
                             args.root)
            print(f"wrote {folder}/ ({MANIFEST} and the checkpoint) and {args.root}/README.md")
        else:
            for folder in args.folder:
                m = verify(folder)
                print(f"{folder}: {m['checkpoint']} matches its manifest (sha256 {m['sha256'][:12]}...)")
    except (CheckpointError, OutputError) as e:
        print(f"python -m network.pretrained: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
