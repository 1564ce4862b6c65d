"""Helpers of the fault suites: run a script as a user would and check that a fault ends in one
clean error line, a non-zero exit, no traceback and nothing half-written."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script: str, *args, cwd=None, timeout: int = 300, env=None):
    """Run ``python <ROOT>/<script> args`` and return the CompletedProcess (text output)."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_clean_error(proc, *needles):
    """Exit non-zero, no traceback, and stderr's last line is ``<script>: error: ...`` containing
    every needle (case-insensitive)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"exit 0; output:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines, f"no error line; stdout:\n{proc.stdout[-2000:]}"
    last = lines[-1]
    assert ": error: " in last, f"last stderr line is not an error line: {last!r}"
    for needle in needles:
        assert needle.lower() in last.lower(), f"{needle!r} not in {last!r}"
    return last


def leftovers(folder) -> list:
    """Temporary or staging names (``.tmp_*``, ``*.partial*``, ``*.tmp``) anywhere under ``folder``."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            if name.startswith(".tmp_") or ".partial" in name or name.endswith(".tmp"):
                found.append(os.path.join(root, name))
    return found


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a tiny tmpfs (root only) that fills up after ``size`` bytes: call the fixture's
    value with a size to get the mount point. Skipped where mounting is not allowed."""
    mounts = []

    def make(size: str = "256k") -> str:
        point = str(tmp_path / f"small_{uuid.uuid4().hex[:6]}")
        os.makedirs(point)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", point],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip()[:80]})")
        mounts.append(point)
        return point

    yield make
    for point in mounts:
        subprocess.run(["umount", "-l", point], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder that cannot be written (a read-only bind mount when root, chmod 0555 otherwise)."""
    point = tmp_path / "readonly"
    point.mkdir()
    if os.geteuid() == 0:
        src = tmp_path / "ro_src"
        src.mkdir()
        ok = subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(point)], capture_output=True).returncode == 0
        if ok:
            ok = subprocess.run(["mount", "-o", "remount,bind,ro", str(point)], capture_output=True).returncode == 0
        if not ok:
            pytest.skip("cannot make a read-only mount here")
        yield str(point)
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
    else:
        point.chmod(0o555)
        yield str(point)
        point.chmod(0o755)
