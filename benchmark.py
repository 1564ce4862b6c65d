"""Inference speed table: one full registration per model, measured side by side in one run.

    python benchmark.py                          # 128^3, CPU with PyTorch's thread count, all models
    python benchmark.py --threads 2 --runs 7 --plain --json evaluate/benchmark_cpu2.json
    python benchmark.py --size 64 --models lite,vtn-1,vtn-10

"Full registration" is what a user waits for (:func:`network.inference.register`): every stem (affine
and deformable cascades), flow composition, the trilinear warp of the moving image and the
nearest-neighbour warp of its segmentation, from images in memory to outputs in memory. Models have
random weights (speed does not depend on them) and get a random image pair and label map.

Per model: parameters; GFLOP per pair (convolutions and matrix products, PyTorch's flop counter;
grid sampling is not counted); seconds per pair (median of ``--runs`` after ``--warmup``, the runs of
all models interleaved so machine noise hits every model alike); pairs per second; peak memory of one
registration above what was resident before it (CPU: the process's peak RSS, Linux only; GPU:
``torch.cuda.max_memory_allocated``); the speed ratio to affine + 1-cascade VTN and to affine +
10-cascade VTN from the same run (``x`` = times faster); the FLOP floor (GFLOP / ``--peak_gflops``) and
how far above it the model runs, and the same against the measured throughput of a dense 3D
convolution (64 -> 64 channels at 32^3), which on a CPU with full-width AVX-512 is well above the
nominal AVX2 peak. ``--plain`` adds each model's time on the unoptimised path (PyTorch's
default layout and backend choice, one grid_sample per warp, ``model(...)`` under ``no_grad``).
The "network only" rows time a single deformable network's forward pass (no stems, no warps).

On a GPU (when one is present, or ``--device cuda``) the table is repeated for fp32 and bf16
autocast, batch 1 and ``--gpu_batch``. The table is printed as Markdown and written with the setup
to ``--json``.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

from network import AFFINE_NETWORKS, DEFORMABLE_NETWORKS, ModelConfig, build_model, count_parameters, layers
from network.outputs import atomic_write_text
from network.cli import ArgumentParser, fail, nonneg_int, positive_float, positive_int
from network.inference import prepare, register, set_threads, tune_allocator
from network.profiling import peak_memory_mib

# key -> (label, ModelConfig keywords)
MODELS = {
    "lite": ("Lite (ours), 1 cascade, no affine", dict(base_network="Lite", preset="lite", n_cascades=1)),
    "lite-2": ("Lite (ours), 2 cascades, no affine", dict(base_network="Lite", preset="lite", n_cascades=2)),
    "lite-affine": ("LDR affine + 1-cas Lite (ours)", dict(base_network="Lite", preset="lite-affine", n_cascades=1)),
    "ldr-brain-1": ("LDR affine + 1-cas LDR (ldr-brain)", dict(base_network="LDR", preset="ldr-brain", n_cascades=1)),
    "ldr-brain-2": ("LDR affine + 2-cas LDR (ldr-brain)", dict(base_network="LDR", preset="ldr-brain", n_cascades=2)),
    "ldr-brain-3": ("LDR affine + 3-cas LDR (ldr-brain)", dict(base_network="LDR", preset="ldr-brain", n_cascades=3)),
    "ldr-liver-1": ("1-cas LDR, 2 nets/cascade (ldr-liver)", dict(base_network="LDR", preset="ldr-liver", n_cascades=1)),
    "ldr-liver-2": ("2-cas LDR, 2 nets/cascade (ldr-liver)", dict(base_network="LDR", preset="ldr-liver", n_cascades=2)),
    "ldr-liver-3": ("3-cas LDR, 2 nets/cascade (ldr-liver)", dict(base_network="LDR", preset="ldr-liver", n_cascades=3)),
    "vm-1": ("VTN affine + 1-cas VoxelMorph (rcn)", dict(base_network="VoxelMorph", preset="rcn", n_cascades=1)),
    "vtn-1": ("VTN affine + 1-cas VTN (rcn)", dict(base_network="VTN", preset="rcn", n_cascades=1)),
    "vtn-3": ("VTN affine + 3-cas VTN (rcn)", dict(base_network="VTN", preset="rcn", n_cascades=3)),
    "vtn-10": ("VTN affine + 10-cas VTN (rcn)", dict(base_network="VTN", preset="rcn", n_cascades=10)),
}
NETWORK_ONLY = ("LDR", "VTN", "VoxelMorph", "Lite")
REFERENCES = {"vs_vtn1": "vtn-1", "vs_vtn10": "vtn-10"}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--size", type=positive_int, default=128, help="cubic image size (VTN models need a multiple of 64)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: PyTorch's default)")
    p.add_argument("--runs", type=positive_int, default=5, help="timed runs per model (the median is reported)")
    p.add_argument("--warmup", type=nonneg_int, default=2, help="untimed runs per model first")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated keys from: " + ", ".join(MODELS))
    p.add_argument("--no_network_rows", action="store_true", help="skip the single-network forward rows")
    p.add_argument("--plain", action="store_true", help="also time the unoptimised path")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: the CPU, and the GPU too when one is present")
    p.add_argument("--gpu_batch", type=positive_int, default=8, help="the larger batch timed on the GPU")
    p.add_argument("--peak_gflops", type=positive_float, default=157.0,
                   help="fp32 peak used for the FLOP floor (default 157: 2 AVX2/FMA cores at 2.45 GHz)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--json", default=os.path.join("evaluate", "benchmark.json"), help="where to write the results")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    if not args.models:
        p.error("--models: no model named")
    problem = size_problem(args)
    if problem:
        p.error(problem)
    if not args.json or os.path.isdir(args.json):
        p.error(f"--json {args.json!r}: a file path is needed")
    parent = os.path.dirname(os.path.abspath(args.json))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        p.error(f"--json {args.json}: cannot write there ({parent} is not a writable folder)")
    return args


def size_needs(args) -> list:
    """``(what, stride, minimum)`` for every model and network row of the run."""
    needs = []
    for key in args.models:
        config = ModelConfig(image_size=(64,) * 3, **MODELS[key][1])
        net = DEFORMABLE_NETWORKS[config.base_network]
        stride = max(net.stride, AFFINE_NETWORKS[config.affine].stride if config.affine else 1)
        minimum = max(stride, getattr(net, "min_size", None) or 0, 48 if config.affine == "LDRAffine" else 0,
                      16)
        needs.append((f"model {key}", stride, minimum))
    if not args.no_network_rows:
        for name in NETWORK_ONLY:
            net = DEFORMABLE_NETWORKS[name]
            needs.append((f"the {name} network-only row", net.stride, max(net.stride, getattr(net, "min_size", None)
                                                                         or 0, 16)))
    return needs


def size_problem(args) -> str | None:
    """One line when ``--size`` does not fit a model of the run (not divisible by its stride, or too small)."""
    for what, stride, minimum in size_needs(args):
        if args.size % stride or args.size < minimum:
            fits = [n for n in range(minimum, minimum + 4 * stride + 1) if n % stride == 0][:2]
            hint = "; --no_network_rows skips those rows" if "row" in what else ""
            return (f"--size {args.size}: {what} needs a multiple of {stride} and at least {minimum} "
                    f"(e.g. {' or '.join(map(str, fits))}){hint}")
    return None


# ----------------------------------------------------------------------------------------------- timing
class Case:
    """One row: a callable that runs a full registration (or one network) on prepared inputs."""

    def __init__(self, key, label, fn, params, gflop, batch, plain_fn=None):
        self.key, self.label, self.fn, self.params, self.gflop = key, label, fn, params, gflop
        self.batch, self.plain_fn = batch, plain_fn
        self.times, self.plain_times = [], []


def count_gflop(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with layers.plain_pytorch(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def make_inputs(size, batch, device, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 1, size, size, size)
    fixed = torch.rand(shape, generator=g).to(device)
    moving = torch.rand(shape, generator=g).to(device)
    seg = torch.randint(0, 5, shape, generator=g, dtype=torch.uint8).to(device)
    return fixed, moving, seg


def build_cases(args, device, batch, amp):
    size = args.size
    fixed, moving, seg = make_inputs(size, batch, device, args.seed)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else None

    def wrap(fn):
        if autocast is None:
            return fn
        def run():
            with autocast():
                return fn()
        return run

    cases = []
    for key in args.models:
        label, kw = MODELS[key]
        torch.manual_seed(args.seed)
        model = build_model(ModelConfig(image_size=(size,) * 3, **kw)).to(device)
        plain_fn = None
        if args.plain:
            plain_model = copy.deepcopy(model).eval()

            def plain_run(m=plain_model):
                with layers.plain_pytorch(), torch.no_grad():
                    flow = m(fixed, moving)["flow"]
                    return layers.warp(seg.float(), flow, mode="nearest")
            plain_fn = wrap(plain_run)
        prepare(model)
        fn = wrap(lambda m=model: register(m, fixed, moving, seg))
        cases.append(Case(key, label, fn, count_parameters(model), count_gflop(fn) / batch, batch,
                          plain_fn))
    if not args.no_network_rows:
        for name in NETWORK_ONLY:
            torch.manual_seed(args.seed)
            net = DEFORMABLE_NETWORKS[name](16).to(device).eval().requires_grad_(False)
            net.to(memory_format=torch.channels_last_3d)
            f_cl = fixed.contiguous(memory_format=torch.channels_last_3d)
            m_cl = moving.contiguous(memory_format=torch.channels_last_3d)

            def net_fn(n=net):
                with torch.inference_mode():
                    return n(f_cl, m_cl)["flow"]
            net_fn = wrap(net_fn)
            cases.append(Case(f"net-{name}", f"network only: one {name} cascade", net_fn,
                              count_parameters(net), count_gflop(net_fn) / batch, batch))
    return cases


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cases(cases, args, device):
    for case in cases:
        for _ in range(args.warmup):
            tune_allocator(True)
            case.fn()
            if case.plain_fn:
                tune_allocator(False)
                case.plain_fn()
    sync(device)
    for _ in range(args.runs):               # interleaved: every model sees the same machine state
        for case in cases:
            for fn, times, tuned in ((case.fn, case.times, True), (case.plain_fn, case.plain_times, False)):
                if fn is None:
                    continue
                tune_allocator(tuned)
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - t0)


def summarise(cases, args, device, throughput=None):
    rows = []
    for case in cases:
        per_pair = statistics.median(case.times) / case.batch
        row = {"key": case.key, "model": case.label, "params": case.params, "gflop_per_pair": case.gflop,
               "seconds_per_pair": per_pair, "pairs_per_second": 1.0 / per_pair,
               "runs": [t / case.batch for t in case.times],
               "peak_memory_mib": peak_memory_mib(case.fn, device)}
        if case.plain_times:
            row["plain_seconds_per_pair"] = statistics.median(case.plain_times) / case.batch
        if device.type == "cpu":
            floor = case.gflop / args.peak_gflops
            row["flop_floor_seconds"] = floor
            row["times_floor"] = per_pair / floor if floor > 0 else None
            row["achieved_gflops"] = case.gflop / per_pair
            if throughput and throughput.get("conv3d_gflops"):
                row["times_conv_floor"] = per_pair * throughput["conv3d_gflops"] / case.gflop if case.gflop else None
        rows.append(row)
    by_key = {r["key"]: r for r in rows}
    for name, ref in REFERENCES.items():
        if ref in by_key:
            for r in rows:
                if not r["key"].startswith("net-"):
                    r[name] = by_key[ref]["seconds_per_pair"] / r["seconds_per_pair"]
    return rows


def markdown(rows, device):
    cols = [("model", lambda r: r["model"]), ("params", lambda r: f"{r['params']:,}"),
            ("GFLOP/pair", lambda r: f"{r['gflop_per_pair']:.1f}"),
            ("s/pair", lambda r: f"{r['seconds_per_pair']:.3f}"),
            ("pairs/s", lambda r: f"{r['pairs_per_second']:.2f}"),
            ("peak MiB", lambda r: "n/a" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}")]
    if any("vs_vtn1" in r for r in rows):
        cols.append(("vs VTN-1", lambda r: f"{r['vs_vtn1']:.1f}x" if "vs_vtn1" in r else ""))
    if any("vs_vtn10" in r for r in rows):
        cols.append(("vs VTN-10", lambda r: f"{r['vs_vtn10']:.1f}x" if "vs_vtn10" in r else ""))
    if device.type == "cpu":
        cols.append(("x FLOP floor", lambda r: "" if r.get("times_floor") is None else f"{r['times_floor']:.2f}"))
    if any(r.get("times_conv_floor") for r in rows):
        cols.append(("x conv-peak floor", lambda r: f"{r['times_conv_floor']:.2f}" if r.get("times_conv_floor") else ""))
    if any("plain_seconds_per_pair" in r for r in rows):
        cols.append(("plain path s/pair", lambda r: f"{r['plain_seconds_per_pair']:.3f}"
                     if "plain_seconds_per_pair" in r else ""))
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f(r) for _, f in cols) + " |" for r in rows]
    return "\n".join(lines)


def machine_throughput(device) -> dict:
    """Measured fp32 GFLOP/s of a large matrix product and of a dense 3D convolution (oneDNN on the CPU)."""
    out = {}
    a = torch.randn(2048, 2048, device=device)
    conv = torch.nn.Conv3d(64, 64, 3, padding=1).to(device).eval()
    conv = conv.to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 64, 32, 32, 32, device=device).contiguous(memory_format=torch.channels_last_3d)
    conv_flop = 2 * 64 * 64 * 27 * 32 ** 3
    with torch.inference_mode():
        for name, fn, flop in (("sgemm", lambda: a @ a, 2 * 2048 ** 3),
                               ("conv3d", lambda: layers.Conv3d._conv_forward(conv, x, conv.weight, conv.bias),
                                conv_flop)):
            fn()
            best = float("inf")
            for _ in range(5):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                best = min(best, time.perf_counter() - t0)
            out[f"{name}_gflops"] = flop / best / 1e9
    return out


def main(argv=None):
    args = parse_args(argv)
    threads = set_threads(args.threads)
    settings = [("cpu", 1, False)]
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available")
    if args.device == "cuda":
        settings = []
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        settings += [("cuda", b, amp) for amp in (False, True) for b in (1, args.gpu_batch)]
    setup = {"size": args.size, "threads": threads, "runs": args.runs, "warmup": args.warmup,
             "torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor()
             or platform.machine(), "cpu_count": os.cpu_count(), "peak_gflops": args.peak_gflops,
             "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    results = []
    started = time.time()
    for dev_name, batch, amp in settings:
        device = torch.device(dev_name)
        title = (f"{dev_name.upper()}" + (f" ({threads} threads)" if dev_name == "cpu" else "")
                 + f", {args.size}^3, batch {batch}, {'bf16 autocast' if amp else 'fp32'}")
        print(f"\n== {title}: building and timing {len(args.models)} models ...", flush=True)
        cases = build_cases(args, device, batch, amp)
        time_cases(cases, args, device)
        throughput = machine_throughput(device) if not amp and batch == 1 else {}
        rows = summarise(cases, args, device, throughput)
        table = markdown(rows, device)
        print(f"\n### {title}\n")
        if throughput:
            print("measured: " + ", ".join(f"{k.replace('_gflops', '')} {v:.0f} GFLOP/s" for k, v in throughput.items())
                  + (f"; FLOP floor at the nominal {args.peak_gflops:.0f} GFLOP/s" if dev_name == "cpu" else "") + "\n")
        print(table, flush=True)
        results.append({"device": dev_name, "batch": batch, "amp": amp, "title": title, "throughput": throughput,
                        "rows": rows, "table": table})
        del cases
    setup["seconds_total"] = time.time() - started
    atomic_write_text(args.json, json.dumps({"setup": setup, "results": results}, indent=2))
    print(f"\nwritten {args.json} ({setup['seconds_total']:.0f} s in all)")
    return 0


def cli() -> int:
    """Console entry point (``ldr-benchmark``): :func:`main` with every fault reported as one line."""
    from network.cli import run

    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
