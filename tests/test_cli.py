"""End-to-end checks of train.py / eval.py on tiny synthetic data, and their bad-input errors."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from data_util.synthetic import generate


def run(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable] + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    generate(str(d / "data"), size=48, n_train=3, n_val=2, seed=1)
    return d


@pytest.fixture(scope="module")
def trained(workdir):
    r = run([os.path.join(ROOT, "train.py"), "-b", "LDR", "-n", "1", "-g", "-1", "--round", "3", "--epochs", "1",
             "--batch", "1", "--output", "smoke", "-d", "data/synthetic.json", "--val_steps", "3",
             "--val_pairs", "1", "--workers", "0"], workdir)
    assert r.returncode == 0, r.stderr
    return workdir


def test_train_writes_self_describing_checkpoint(trained):
    import torch
    path = trained / "weights" / "smoke" / "ckpt_3.pt"
    state = torch.load(path, weights_only=True)
    assert state["step"] == 3
    assert state["model_config"]["preset"] == "ldr-brain"
    assert state["model_config"]["image_size"] == [48, 48, 48]
    assert state["optimizer"] is not None
    assert (trained / "logs" / "smoke").is_dir()


def test_eval_needs_no_extra_flags_and_writes_outputs(trained):
    r = run([os.path.join(ROOT, "eval.py"), "-g", "-1", "--batch", "1", "--checkpoint", "weights/smoke",
             "--workers", "0"], trained)
    assert r.returncode == 0, r.stderr
    txt = (trained / "evaluate" / "smoke-3-2" / "smoke-3-2.txt").read_text()
    lines = txt.splitlines()
    assert sum(1 for l in lines if l.startswith("synth_val_")) == 2          # 2 val scans -> 2 ordered pairs
    assert "Summary" in txt and "Dice score:" in txt
    result = json.loads((trained / "evaluate" / "smoke-3-2" / "smoke-3-2.json").read_text())
    assert result["info"]["n_pairs"] == 2
    assert result["info"]["n_params"] > 0 and result["info"]["seconds_per_pair"] > 0
    for key in ("dice", "jacc", "landmark_dist", "jac_std", "jac_nonpos_pct", "sdlogj"):
        assert key in result["pairs"][0]
    assert (trained / "evaluate" / "smoke-3-2" / "smoke-3-2.csv").read_text().startswith("id1,id2,dice")


def test_resume_continues_from_step(trained):
    r = run([os.path.join(ROOT, "train.py"), "-g", "-1", "-c", "weights/smoke", "--round", "4", "--epochs", "1",
             "--batch", "1", "--val_steps", "0", "--workers", "0"], trained)
    assert r.returncode == 0, r.stderr
    assert (trained / "weights" / "smoke" / "ckpt_4.pt").exists()


def assert_one_line_error(r, *needles):
    assert r.returncode != 0
    err = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(err) == 1, r.stderr
    for n in needles:
        assert n in err[0], err[0]


def test_missing_dataset_file(tmp_path):
    r = run([os.path.join(ROOT, "train.py"), "-b", "LDR", "-g", "-1", "-d", "nope.json"], tmp_path)
    assert_one_line_error(r, "nope.json", "not found")
    assert not (tmp_path / "weights").exists()


def test_missing_hdf5_key(workdir, tmp_path):
    cfg = json.loads((workdir / "data" / "synthetic.json").read_text())
    cfg["files"]["/"]["path"] = str(workdir / "data" / "synthetic.h5")
    cfg["subsets"]["synth-train"].append("synth/does_not_exist")
    (tmp_path / "bad.json").write_text(json.dumps(cfg))
    r = run([os.path.join(ROOT, "train.py"), "-b", "LDR", "-g", "-1", "-d", "bad.json"], tmp_path)
    assert_one_line_error(r, "does_not_exist")


def test_wrong_volume_shape(tmp_path):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("a/volume", data=np.zeros((48, 48, 48), np.uint8))
        f.create_dataset("b/volume", data=np.zeros((48, 48, 40), np.uint8))
    cfg = {"files": {"/": {"type": "HDF5", "path": "d.h5"}}, "image_size": [48, 48, 48],
           "subsets": {"t": ["a", "b"]}, "schemes": {"1": {"t": 1.0}}}
    (tmp_path / "d.json").write_text(json.dumps(cfg))
    r = run([os.path.join(ROOT, "train.py"), "-b", "LDR", "-g", "-1", "-d", "d.json"], tmp_path)
    assert_one_line_error(r, "d.h5")


def test_size_not_divisible_by_stride(tmp_path):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        for k in ("a", "b"):
            f.create_dataset(f"{k}/volume", data=np.random.default_rng(0).integers(0, 255, (40, 40, 40), dtype=np.uint8))
    cfg = {"files": {"/": {"type": "HDF5", "path": "d.h5"}}, "image_size": [40, 40, 40],
           "subsets": {"t": ["a", "b"]}, "schemes": {"1": {"t": 1.0}}}
    (tmp_path / "d.json").write_text(json.dumps(cfg))
    r = run([os.path.join(ROOT, "train.py"), "-b", "VoxelMorph", "--preset", "plain", "-g", "-1",
             "-d", "d.json"], tmp_path)
    assert_one_line_error(r, "d.json", "divisible by 16")


def test_missing_checkpoint(tmp_path):
    r = run([os.path.join(ROOT, "eval.py"), "-g", "-1", "--checkpoint", "weights/none"], tmp_path)
    assert_one_line_error(r, "weights/none", "not found")
    assert not (tmp_path / "evaluate").exists()


def test_truncated_checkpoint(trained, tmp_path):
    src = (trained / "weights" / "smoke" / "ckpt_3.pt").read_bytes()
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "ckpt_1.pt").write_bytes(src[: len(src) // 2])
    r = run([os.path.join(ROOT, "eval.py"), "-g", "-1", "--checkpoint", "w", "-d",
             str(trained / "data" / "synthetic.json")], tmp_path)
    assert_one_line_error(r, "ckpt_1.pt")
    assert not (tmp_path / "evaluate").exists()


def test_nan_volume_in_worker_gives_one_line(tmp_path):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        for k in ("a", "b"):
            v = np.random.default_rng(0).integers(0, 255, (48, 48, 48)).astype(np.float32)
            if k == "b":
                v[3, 4, 5] = np.nan
            f.create_dataset(f"{k}/volume", data=v)
    cfg = {"files": {"/": {"type": "HDF5", "path": "d.h5"}}, "image_size": [48, 48, 48],
           "subsets": {"t": ["a", "b"]}, "schemes": {"1": {"t": 1.0}}}
    (tmp_path / "d.json").write_text(json.dumps(cfg))
    r = run([os.path.join(ROOT, "train.py"), "-b", "LDR", "-g", "-1", "-d", "d.json", "--round", "2",
             "--batch", "1", "--workers", "1", "--output", "nan"], tmp_path)
    assert_one_line_error(r, "d.h5", "NaN")
    assert not (tmp_path / "weights").exists() and not (tmp_path / "logs").exists()


def test_eval_from_another_folder_finds_training_dataset(trained, tmp_path):
    r = run([os.path.join(ROOT, "eval.py"), "-g", "-1", "--checkpoint", str(trained / "weights" / "smoke:3"),
             "--limit", "1", "--workers", "0", "--name", "elsewhere"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "evaluate" / "elsewhere" / "elsewhere.json").read_text())["info"]["n_pairs"] == 1


def test_eval_refine_scores_network_plus_refinement(trained):
    """``eval.py --refine``: every pair's network flow refined on the pair; named ``-refine<N>``,
    the configuration in the info block, Dice not below the network's own on the same pairs."""
    base = run([os.path.join(ROOT, "eval.py"), "-g", "-1", "--checkpoint", "weights/smoke:3", "--workers", "0",
                "--name", "plain"], trained)
    assert base.returncode == 0, base.stderr
    r = run([os.path.join(ROOT, "eval.py"), "-g", "-1", "--checkpoint", "weights/smoke:3", "--workers", "0",
             "--refine", "10"], trained)
    assert r.returncode == 0, r.stderr
    refined = json.loads((trained / "evaluate" / "smoke-3-2-refine10" / "smoke-3-2-refine10.json").read_text())
    plain = json.loads((trained / "evaluate" / "plain" / "plain.json").read_text())
    assert refined["info"]["refine"]["iters"] == [20, 10] and refined["info"]["refine"]["affine"] == "none"
    assert refined["summary"]["dice"]["mean"] > plain["summary"]["dice"]["mean"]
    bad = run([os.path.join(ROOT, "eval.py"), "-g", "-1", "--checkpoint", "weights/smoke", "--reg_weight", "1"],
              trained)
    assert bad.returncode == 2 and "--reg_weight needs --refine" in bad.stderr.strip().splitlines()[-1]
