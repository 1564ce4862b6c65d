"""Import a TensorFlow-1 checkpoint of RCN or LDR_ALDK into a self-describing PyTorch checkpoint.

``python import_tf.py weights/VTN-10-liver[:STEP] [-o weights/VTN-10-liver-pt] [--image_size 128 128 128]``

Reads the TF run folder (``checkpoint``, ``model-<step>.index``, ``model-<step>.data-*``) without
TensorFlow, infers the model (affine stem, base network, cascades, width) from the variable names
and shapes, checks every shape, and writes ``OUT/ckpt_<step>.pt`` (staged, then renamed into place)
that ``eval.py -c OUT``, ``register.py -c OUT`` and ``export.py -c OUT`` take without other flags.
The RCN run's ``args.json``, when present, gives ``rep`` and the dataset and must agree with the
variables. The model keeps TensorFlow's "SAME" padding (model config ``padding: "tf"``), so it
computes what the TF graph computed (docs/import_tf.md states the measured agreement).
"""
from __future__ import annotations

import json
import os
import sys

from network.cli import ArgumentParser, fail, positive_int


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("source", help="TF-1 run folder[:STEP] or checkpoint prefix (.../model-20000)")
    p.add_argument("-o", "--out", default=None, help="output run folder (default: <source folder>-pt)")
    p.add_argument("--image_size", type=positive_int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="training image size (default 128 128 128, the published data); an affine head must fit it")
    p.add_argument("-r", "--rep", type=positive_int, default=None,
                   help="shared-weight repetitions (default: args.json's, else 1)")
    p.add_argument("-d", "--dataset", default=None, help="dataset JSON to record (default: args.json's)")
    return p.parse_args(argv)


def run_args(folder: str) -> tuple:
    """``(args, path)`` of an RCN/LDR_ALDK run's ``args.json`` (``({}, None)`` when there is none)."""
    path = os.path.join(folder, "args.json")
    if not os.path.isfile(path):
        return {}, None
    try:
        with open(path, encoding="utf-8") as f:
            args = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{path}: not a readable args.json ({e})")
    if not isinstance(args, dict):
        fail(f"{path}: not a JSON object")
    return args, path


def check_agreement(config, args: dict, path: str) -> None:
    """The run's flags must describe the model the variables hold."""
    base, n = args.get("base_network"), args.get("n_cascades")
    if base is not None and base != config.base_network:
        fail(f"{path}: base_network {base!r}, but the checkpoint holds {config.base_network} cascades")
    if n is not None and int(n) != config.n_cascades:
        fail(f"{path}: n_cascades {n}, but the checkpoint holds {config.n_cascades}")


def main(argv=None):
    args = parse_args(argv)
    import torch

    from network.checkpoint import save_checkpoint
    from network.outputs import OutputSet
    from network.tf_bundle import resolve_prefix
    from network.tf_import import import_tf_checkpoint
    from network import count_parameters

    prefix, step = resolve_prefix(args.source)
    folder = os.path.dirname(os.path.abspath(prefix))
    flags, flags_path = run_args(folder)
    rep = args.rep or int(flags.get("rep") or 1)
    model, report = import_tf_checkpoint(prefix, args.image_size, rep)
    if flags_path:
        check_agreement(model.config, flags, flags_path)
    out_dir = args.out or folder.rstrip(os.sep) + "-pt"
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        fail(f"{out_dir}: exists and is not empty; choose another -o or remove it")
    dataset = args.dataset or flags.get("dataset")
    train_args = {"dataset": dataset} if dataset else {}
    if dataset and os.path.exists(dataset):
        train_args["dataset_abspath"] = os.path.abspath(dataset)
    n_params = count_parameters(model)
    extra = {"n_params": n_params, "input_normalisation": "uint8",
             "imported_from": {"format": "tensorflow-1", "prefix": os.path.abspath(prefix), **report,
                               "torch": str(torch.__version__)}}
    with OutputSet(out_dir) as out:
        save_checkpoint(out.staging, model, model.config.to_dict(), int(step), train_args=train_args, extra=extra)
    c = model.config
    skipped = ", ".join(f"{n} {why}" for why, n in report["skipped"].items()) or "none"
    print(f"imported {prefix}: {c.preset} {c.base_network} x{c.n_cascades} (rep {c.rep}, {c.channels} channels, "
          f"{tuple(c.image_size)}), {n_params:,} params from {report['imported']} variables; "
          f"skipped: {skipped}")
    print(f"wrote {os.path.join(out_dir, f'ckpt_{step}.pt')}")
    return 0


def cli() -> int:
    """Console entry point (``ldr-import-tf``): :func:`main` with every fault reported as one line."""
    from network.cli import run

    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
