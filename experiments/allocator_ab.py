"""A/B of ``network.inference.tune_allocator`` at 128^3: glibc defaults vs freed memory kept in the process.

``python experiments/allocator_ab.py [--rounds 6] [--size 128]``

Both settings run in one process, alternating each round. Each round runs every model once untimed,
then times 3 registrations. Prints the median seconds per pair of each model under each setting.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from network import build_model  # noqa: E402
from network.inference import prepare, register, set_threads, tune_allocator  # noqa: E402

MODELS = (("lite-affine", "Lite"), ("lite", "Lite"), ("rcn", "VTN"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    set_threads(args.threads)
    x = torch.rand(1, 1, *(args.size,) * 3)
    seg = (x * 4).floor().to(torch.uint8)
    models = {preset: prepare(build_model(dict(base_network=base, preset=preset, n_cascades=1,
                                               image_size=[args.size] * 3))) for preset, base in MODELS}
    times = {(k, tuned): [] for k in models for tuned in (False, True)}
    for _ in range(args.rounds):
        for tuned in (False, True):
            tune_allocator(tuned)
            for key, model in models.items():
                register(model, x, x, seg)
                for _ in range(3):
                    t0 = time.perf_counter()
                    register(model, x, x, seg)
                    times[(key, tuned)].append(time.perf_counter() - t0)
    for key in models:
        default, tuned = statistics.median(times[(key, False)]), statistics.median(times[(key, True)])
        print(f"{key}: glibc defaults {default:.4f} s, tune_allocator {tuned:.4f} s, {default / tuned:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
