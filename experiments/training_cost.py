"""Cost of one training step (forward, loss, backward, Adam) per precision and memory setting,
measured side by side in one run: seconds per step (median of ``--runs``, the arms interleaved so
machine noise hits them alike), pairs per second, the activation memory the step keeps for its
backward pass, and on a GPU the peak memory of one step.

    python experiments/training_cost.py                                   # CPU: affine + 3 VTN at 64^3, batch 1
    python experiments/training_cost.py --size 128 --cascades 10 --batch 4 --device cuda    # the paper's teacher

Arms: ``fp32``, ``bf16`` (``train.py --amp bf16``), and each with activation checkpointing
(``--activation_checkpointing``). One model and one optimiser serve every arm (speed and memory do
not depend on the weights). "Saved for backward" sums the distinct tensor storages autograd keeps
from the forward to the backward pass, the model's parameters excluded (exact, the same on any
device: the memory activation checkpointing trades for recomputation). "Peak" is ``torch.cuda.max_memory_allocated`` above the
allocation before the step (weights, gradients and Adam state excluded), on a GPU only: on the CPU
the allocator keeps freed memory, so the process's RSS does not show one step's peak. An arm that
runs out of GPU memory is reported as such. Writes the table as Markdown and JSON.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from network import ModelConfig, RegistrationLoss, build_model, count_parameters  # noqa: E402
from network.cli import ArgumentParser, fail, nonneg_int, positive_int  # noqa: E402
from network.outputs import atomic_write_text  # noqa: E402
from network.training import forward_and_loss  # noqa: E402

ARMS = [("fp32", "off", False), ("bf16", "bf16", False), ("fp32 + checkpointing", "off", True),
        ("bf16 + checkpointing", "bf16", True)]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--size", type=positive_int, default=64, help="cubic image size (a multiple of 64 for VTN)")
    p.add_argument("--cascades", type=positive_int, default=3, help="VTN cascades after the VTN affine stem")
    p.add_argument("--channels", type=positive_int, default=16, help="VTN base width (16: the published model)")
    p.add_argument("--batch", type=positive_int, default=1, help="pairs per step")
    p.add_argument("--runs", type=positive_int, default=3, help="timed steps per arm (median reported)")
    p.add_argument("--warmup", type=nonneg_int, default=1, help="untimed steps per arm first")
    p.add_argument("--arms", default=",".join(name for name, _, _ in ARMS),
                   help="comma-separated arms to run, from: " + ", ".join(name for name, _, _ in ARMS))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: PyTorch's)")
    p.add_argument("--json", default=os.path.join("evaluate", "training_cost.json"), help="where to write the results")
    return p.parse_args(argv)


def make_step(model, optimizer, batch, amp: str, checkpointing: bool):
    loss_fn = RegistrationLoss()

    def step():
        model.activation_checkpointing = checkpointing
        _, loss, _ = forward_and_loss(model, loss_fn, batch, amp=amp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if batch["voxel1"].is_cuda:
            torch.cuda.synchronize()
    return step


def saved_for_backward_mib(step, model) -> float:
    """MiB of distinct storages autograd saves for the backward pass during one ``step()``, the
    model's own parameters excluded (they are in memory anyway)."""
    storages = {}
    weights = {(p.device, p.untyped_storage().data_ptr()) for p in model.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.device, storage.data_ptr())
        if key not in weights:
            storages[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values()) / 2 ** 20


def peak_mib(step, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def measure(steps: dict, model, args, device) -> dict:
    """``{arm: {"s_per_step", "pairs_per_s", "saved_mib", "peak_mib"}}`` (``"error"``: the arm ran out of memory)."""
    out = {name: {"times": []} for name in steps}
    for name, step in steps.items():
        try:
            for _ in range(args.warmup):
                step()
            out[name]["saved_mib"] = saved_for_backward_mib(step, model)
            out[name]["peak_mib"] = peak_mib(step, device)
        except torch.OutOfMemoryError:
            out[name] = {"error": "out of memory"}
            torch.cuda.empty_cache()
    for _ in range(args.runs):
        for name, step in steps.items():
            if "error" in out[name]:
                continue
            t0 = time.perf_counter()
            step()
            out[name]["times"].append(time.perf_counter() - t0)
    for row in out.values():
        if "error" not in row:
            row["s_per_step"] = statistics.median(row.pop("times"))
            row["pairs_per_s"] = args.batch / row["s_per_step"]
    return out


def markdown(rows: dict, title: str) -> str:
    lines = [f"### {title}", "", "| arm | s / step | pairs / s | saved for backward, MiB | peak MiB |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | |")
        else:
            peak = "n/a (CPU)" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
            lines.append(f"| {name} | {r['s_per_step']:.3f} | {r['pairs_per_s']:.2f} | {r['saved_mib']:.0f} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    chosen = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(chosen) - {name for name, _, _ in ARMS})
    if unknown or not chosen:
        fail(f"--arms {args.arms}: unknown arm(s) {unknown}; choose from {', '.join(n for n, _, _ in ARMS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    torch.manual_seed(0)
    config = ModelConfig(base_network="VTN", n_cascades=args.cascades, preset="rcn", channels=args.channels,
                         image_size=(args.size,) * 3)
    model = build_model(config).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 1) + (args.size,) * 3
    batch = {"voxel1": torch.rand(shape, generator=g).to(device), "voxel2": torch.rand(shape, generator=g).to(device)}
    steps = {name: make_step(model, optimizer, batch, amp, ckpt) for name, amp, ckpt in ARMS if name in chosen}
    rows = measure(steps, model, args, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    title = (f"Training step: VTN affine + {args.cascades} VTN (c={args.channels}, {count_parameters(model):,} params), "
             f"{args.size}^3, batch {args.batch}, {where}")
    text = markdown(rows, title)
    print(text)
    setup = {"size": args.size, "cascades": args.cascades, "channels": args.channels, "batch": args.batch,
             "runs": args.runs, "warmup": args.warmup, "device": where, "torch": torch.__version__,
             "machine": platform.processor() or platform.machine(), "params": count_parameters(model)}
    atomic_write_text(args.json, json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    from network.cli import run

    sys.exit(run(main))
