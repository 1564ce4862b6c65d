"""Shared by the benchmark scripts in ``experiments/``: the repository root and a logged subprocess runner."""
from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, cwd) -> float:
    """Run ``python <cmd...>`` in ``cwd`` with the repository on ``PYTHONPATH``; echo it, fail loudly on a
    non-zero exit, and return the wall-clock seconds it took."""
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    subprocess.run([sys.executable] + cmd, cwd=cwd, env=env, check=True)
    seconds = time.time() - t0
    print(f"  ({seconds:.0f} s)", flush=True)
    return seconds
