"""The README's main job end to end at toy size: data -> train -> eval -> NIfTI export -> register."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_runs_every_step(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "quickstart.py"), "--size", "48", "--train", "3",
                        "--val", "2", "--steps", "2", "--output", "qs"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "== quickstart result" in r.stdout
    report = json.loads((tmp_path / "evaluate" / "qs_register" / "report.json").read_text())
    assert 0 <= report["dice_after"] <= 1 and report["landmark_pairs"] >= 1
    for name in ("warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz", "figure.png", "landmarks.csv"):
        assert (tmp_path / "evaluate" / "qs_register" / name).is_file()
