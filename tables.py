"""Reproduce the LDR + ALDK paper's Table 1 and Table 2 from checkpoints (engine/tables.py).

    python tables.py table1 --method "Affine + 3-cas VTN" weights/vtn3-liver weights/vtn3-brain \\
                            --method "3-cas LDR + ALDK" weights/ldr3-liver weights/ldr3-brain
    python tables.py table2 --row 1 weights/ldr1-plain weights/ldr1-aldk --row 2 ... --row 3 ...
    python tables.py table1 --standins standins      # demo on synthetic stand-ins, one command
    python tables.py table2 --standins standins
    python tables.py standins -o standins --size 64  # only write the stand-in data

``--method LABEL LIVER BRAIN``: a Table 1 row; LIVER is evaluated on SLIVER, LiTS and LSPIG (paired)
of ``--liver`` (default datasets/liver.json), BRAIN on LPBA (atlas pairs) of ``--brain``
(default datasets/brain.json); ``-`` leaves a side out. ``--row N PLAIN DISTILLED``: a Table 2 row
(liver checkpoints, SLIVER). Checkpoints are run folders[:STEP] or ckpt files (a TF-1 run converts
with ``import_tf.py`` first). Writes ``-o`` (default tables/table1, tables/table2) as one set:
``tableN.md`` (paper layout, the published relative claims beside the measured ones), ``.csv``,
``.json`` (every number, per-pair Dice and Jacc, the setup).

``--standins DIR``: use the synthetic stand-ins in DIR (written first if absent, ``--size``) in the
published layouts; without ``--method`` / ``--row`` the paper's architectures with their initial
weights fill the rows (a pipeline demo, marked as such in the tables).
"""
from __future__ import annotations

import os
import sys

from network.cli import ArgumentParser, fail, nonneg_int, positive_int

DEMO_LIMIT = 3


def _common(p, default_out):
    p.add_argument("--liver", default=None, help="liver dataset config (default datasets/liver.json)")
    p.add_argument("--brain", default=None, help="brain dataset config (default datasets/brain.json)")
    p.add_argument("--standins", default=None, metavar="DIR", help="use (and write if absent) synthetic stand-ins")
    p.add_argument("--size", type=positive_int, default=64, help="stand-in image size (cube)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help=f"evaluate the first N pairs of each split (default all; {DEMO_LIMIT} for the demo)")
    p.add_argument("--runs", type=positive_int, default=5, help="timed registrations per model (median)")
    p.add_argument("-g", "--gpu", default="-1", help="GPU id for the evaluation, or -1 for the CPU")
    p.add_argument("--no_gpu_time", action="store_true", help="do not time on the GPU even if there is one")
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("-o", "--out", default=default_out, help="output folder")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t1 = sub.add_parser("table1", help="Table 1: comparison on SLIVER, LiTS, LSPIG, LPBA")
    t1.add_argument("--method", nargs=3, action="append", default=[], metavar=("LABEL", "LIVER", "BRAIN"),
                    help="a row: label, liver checkpoint, brain checkpoint ('-' for none)")
    t1.add_argument("--compare", nargs=2, action="append", default=[], metavar=("OURS", "REFERENCE"),
                    help="measure the published claims' quantities for row OURS against row REFERENCE "
                         "(repeatable; default: the last row against the first)")
    _common(t1, os.path.join("tables", "table1"))
    t2 = sub.add_parser("table2", help="Table 2: plain vs distilled at 1, 2, 3 cascades on SLIVER")
    t2.add_argument("--row", nargs=3, action="append", default=[], metavar=("CASCADES", "PLAIN", "DISTILLED"),
                    help="a row: cascade count, plain LDR checkpoint, LDR + ALDK checkpoint")
    _common(t2, os.path.join("tables", "table2"))
    s = sub.add_parser("standins", help="write the synthetic stand-ins of the published evaluation data")
    s.add_argument("-o", "--out", default="standins", help="output folder")
    s.add_argument("--size", type=positive_int, default=64, help="image size (cube)")
    s.add_argument("--seed", type=nonneg_int, default=0)
    return p.parse_args(argv)


def _configs(args) -> dict:
    from data_util.standins import standin_configs

    if args.standins:
        if args.liver or args.brain:
            fail("--standins: give either --standins or --liver/--brain")
        paths = standin_configs(args.standins, args.size, verbose=True)
        return {"liver": paths["liver.json"], "brain": paths["brain.json"]}
    configs = {"liver": args.liver or os.path.join("datasets", "liver.json"),
               "brain": args.brain or os.path.join("datasets", "brain.json")}
    for key, path in configs.items():
        if not os.path.isfile(path):
            fail(f"--{key} {path}: no such dataset config")
    return configs


def _source(spec: str, flag: str):
    from engine.tables import Source

    if spec == "-":
        return None
    if not os.path.exists(spec.rsplit(":", 1)[0]) and not os.path.exists(spec):
        fail(f"{flag} {spec}: no such checkpoint or run folder")
    return Source(spec)


def table1_methods(args, size: int) -> list:
    from engine.tables import DEMO_COMPARE, Method, demo_table1_methods

    if not args.method:
        if not args.standins:
            fail("table1: give rows with --method LABEL LIVER BRAIN, or --standins DIR for the demo")
        if args.compare:
            fail("--compare: the demo compares its own rows; give --method rows to choose")
        args.compare = list(DEMO_COMPARE)
        return demo_table1_methods(size)
    methods = []
    for label, liver, brain in args.method:
        m = Method(label, _source(liver, "--method"), _source(brain, "--method"))
        if m.liver is None and m.brain is None:
            fail(f"--method {label!r}: give a liver or a brain checkpoint (both are '-')")
        methods.append(m)
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        fail(f"--method: labels must differ, got {labels}")
    for pair in args.compare:
        for value in pair:
            if value not in labels:
                fail(f"--compare {value!r}: not a --method label ({labels})")
    return methods


def table2_pairs(args, size: int) -> list:
    from engine.tables import Method, demo_table2_pairs

    if not args.row:
        if not args.standins:
            fail("table2: give rows with --row CASCADES PLAIN DISTILLED, or --standins DIR for the demo")
        return demo_table2_pairs(size)
    pairs = []
    for n, plain, distilled in args.row:
        if not n.isdigit() or int(n) < 1:
            fail(f"--row {n}: the cascade count must be a positive integer")
        if plain == "-" or distilled == "-":
            fail(f"--row {n}: both the plain and the distilled checkpoint are needed")
        pairs.append((int(n), Method(f"{n}-cas LDR", _source(plain, "--row")),
                      Method(f"{n}-cas LDR + ALDK", _source(distilled, "--row"))))
    counts = [n for n, _, _ in pairs]
    if len(set(counts)) != len(counts):
        fail(f"--row: cascade counts must differ, got {counts}")
    return pairs


def main(argv=None):
    args = parse_args(argv)
    if args.command == "standins":
        from data_util.standins import write_standins

        write_standins(args.out, args.size, args.seed, verbose=True)
        return 0
    import torch

    from engine import tables
    from network.cli import resolve_device
    from network.inference import tune_allocator

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.gpu)
    tune_allocator()
    size = args.size
    rows = table1_methods(args, size) if args.command == "table1" else table2_pairs(args, size)
    configs = _configs(args)
    limit = args.limit
    if args.standins and limit is None and not (getattr(args, "method", None) or getattr(args, "row", None)):
        limit = DEMO_LIMIT
        print(f"demo: the first {limit} pairs of each split (--limit to change)")
    gpu = not args.no_gpu_time
    if args.command == "table1":
        written = tables.table1(rows, configs, args.out, args.compare, limit, device, args.runs, gpu)
    else:
        written = tables.table2(rows, configs, args.out, limit, device, args.runs, gpu)
    print("wrote " + ", ".join(written))
    return 0


def cli() -> int:
    """Console entry point (``ldr-tables``): :func:`main` with every fault reported as one line."""
    from network.cli import run

    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
