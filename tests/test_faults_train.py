"""Fault suite of train.py and eval.py: bad flag values, foreign checkpoints, full or read-only
disks, output sets and their names. Every case: one error line naming the flag or file and the
problem, a non-zero exit, no traceback, nothing half-written."""
import json
import os
import shutil

import pytest
import torch

from faults import assert_clean_error, full_disk, leftovers, read_only_dir, run_script  # noqa: F401

from data_util.synthetic import generate

TRAIN = ["-b", "LDR", "-n", "1", "-g", "-1", "--preset", "plain", "--channels", "4", "--batch", "1",
         "--val_steps", "0", "--workers", "0"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults_train")
    generate(str(d / "data"), size=32, n_train=3, n_val=2, seed=1)
    r = run_script("train.py", *TRAIN, "--steps", "2", "--output", "run", "-d", "data/synthetic.json", cwd=d)
    assert r.returncode == 0, r.stderr
    return d


@pytest.mark.parametrize("flag,value,needle", [
    ("--batch", "0", "must be >= 1"), ("--lr", "nan", "not a finite number"), ("--lr", "-1", "must be > 0"),
    ("--save_steps", "0", "must be >= 1"), ("--epochs", "nan", "not a finite number"), ("--round", "-5", ">= 1"),
    ("--steps", "0", ">= 1"), ("--output", "../../x", "plain folder name"), ("--output", "a/b", "plain folder name"),
    ("--gamma", "1.5", "between 0 and 1"), ("--reg_weight", "inf", "finite"), ("--keep", "-1", ">= 0"),
    ("--val_pairs", "0", ">= 1"), ("--seed", "x", "not an integer"), ("-n", "0", ">= 1"),
    ("--crop", "0", ">= 1"), ("--critic_lr", "0", "> 0"), ("--log_steps", "0", ">= 1"),
    ("--distill_weight", "x", "nor 'auto'"), ("--distill_ratio", "-1", ">= 0"), ("--distill_pool", "0", ">= 1"),
    ("--aldk_variant", "gan", "invalid choice"),
])
def test_train_flag_values_are_checked(work, flag, value, needle):
    args = TRAIN[:2] + TRAIN[4:] if flag == "-n" else list(TRAIN)
    extra = [flag, value] + (["1", "1"] if flag == "--crop" else [])
    r = run_script("train.py", *args, "-d", "data/synthetic.json", *extra, cwd=work)
    assert_clean_error(r, flag, needle)
    assert not (work / "weights" / "x").exists() and not (work.parent / "x").exists()


@pytest.mark.parametrize("flag,value", [("--batch", "0"), ("--limit", "0"), ("-r", "0"), ("--spacing", "nan"),
                                        ("--name", "../x"), ("--workers", "-1")])
def test_eval_flag_values_are_checked(work, flag, value):
    extra = [flag, value] + (["1", "1"] if flag == "--spacing" else [])
    r = run_script("eval.py", "-c", "weights/run", *extra, cwd=work)
    assert_clean_error(r, flag)
    assert not (work / "evaluate").exists()


@pytest.mark.parametrize("gpu", ["x", "0,a"])
def test_bad_gpu_flag(work, gpu):
    assert_clean_error(run_script("train.py", *TRAIN[:4], "-g", gpu, "-d", "data/synthetic.json", cwd=work), "-g")


def foreign_checkpoint(work, tmp_path):
    """The run's checkpoint with a model config of another width: its weights no longer fit."""
    state = torch.load(work / "weights" / "run" / "ckpt_2.pt", weights_only=True)
    state["model_config"]["channels"] = 8
    (tmp_path / "foreign").mkdir()
    torch.save(state, tmp_path / "foreign" / "ckpt_2.pt")
    return tmp_path / "foreign"


def test_foreign_checkpoint_on_eval_and_resume(work, tmp_path):
    folder = foreign_checkpoint(work, tmp_path)
    for script, args in (("eval.py", ["-c", str(folder)]), ("train.py", ["-c", str(folder), "--steps", "4"])):
        r = run_script(script, *args, cwd=work)
        assert_clean_error(r, "ckpt_2.pt", "do not fit", "another shape")
    assert sorted(os.listdir(folder)) == ["ckpt_2.pt"]
    assert not (work / "evaluate").exists()


def test_checkpoint_with_a_broken_run_table(work, tmp_path):
    state = torch.load(work / "weights" / "run" / "ckpt_2.pt", weights_only=True)
    state["train_args"] = [1, 2]
    (tmp_path / "odd").mkdir()
    torch.save(state, tmp_path / "odd" / "ckpt_2.pt")
    r = run_script("train.py", "-c", str(tmp_path / "odd"), "-d", "data/synthetic.json", "--steps", "4", cwd=work)
    assert_clean_error(r, "ckpt_2.pt")


def test_train_on_a_full_disk(work, full_disk):
    small = full_disk("64k")
    r = run_script("train.py", *TRAIN, "--steps", "2", "--save_steps", "1", "--output", "full",
                   "-d", str(work / "data" / "synthetic.json"), cwd=small)
    line = assert_clean_error(r, "ckpt_1.pt", "no space left on device")
    assert "weights/full" in line
    assert leftovers(small) == []
    assert not os.path.exists(os.path.join(small, "weights"))       # the failed run leaves no folder behind


def test_train_into_a_read_only_folder(work, read_only_dir):
    r = run_script("train.py", *TRAIN, "--steps", "2", "--output", "ro", "-d", str(work / "data" / "synthetic.json"),
                   cwd=read_only_dir)
    assert_clean_error(r, "weights")
    assert os.listdir(read_only_dir) == []


def test_eval_on_a_full_disk_keeps_nothing_half_written(work, full_disk):
    small = full_disk("8k")
    r = run_script("eval.py", "-c", "weights/run", "--out_dir", small, "--workers", "0", cwd=work)
    assert_clean_error(r, "run-2-2", "no space left on device")
    assert os.listdir(small) == []


def test_eval_into_a_read_only_folder_fails_before_evaluating(work, read_only_dir):
    r = run_script("eval.py", "-c", "weights/run", "--out_dir", os.path.join(read_only_dir, "ev"), cwd=work)
    assert_clean_error(r, "ev")
    assert "evaluating" not in r.stdout
    assert os.listdir(read_only_dir) == []


def test_eval_writes_one_set_and_names_sweeps_apart(work, tmp_path):
    out = tmp_path / "ev"
    for extra in ([], ["-r", "2"], ["--limit", "1"]):
        r = run_script("eval.py", "-c", "weights/run", "--out_dir", out, "--workers", "0", *extra, cwd=work)
        assert r.returncode == 0, r.stderr
    copy = work / "data" / "copy.json"
    shutil.copy(work / "data" / "synthetic.json", copy)
    r = run_script("eval.py", "-c", "weights/run", "--out_dir", out, "--workers", "0", "-d", copy, cwd=work)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["run-2-2", "run-2-2-copy", "run-2-2-n1", "run-2-2-r2"]
    for name in os.listdir(out):
        assert sorted(os.listdir(out / name)) == [f"{name}.csv", f"{name}.json", f"{name}.txt"]
        mode = os.stat(out / name / f"{name}.json").st_mode & 0o777
        assert mode == 0o666 & ~0o022 or os.umask(0o022) != 0o022
    assert json.loads((out / "run-2-2-r2" / "run-2-2-r2.json").read_text())["info"]["model_config"]["rep"] == 2


def test_output_set_replaces_the_old_set_whole(tmp_path):
    from network.outputs import OutputSet, atomic_write_text

    final = tmp_path / "set"
    with OutputSet(str(final)) as s:
        atomic_write_text(s.path("a.txt"), "old a")
        atomic_write_text(s.path("b.txt"), "old b")
    with pytest.raises(RuntimeError):
        with OutputSet(str(final)) as s:
            atomic_write_text(s.path("a.txt"), "new a")
            raise RuntimeError("killed half-way")
    assert (final / "a.txt").read_text() == "old a" and (final / "b.txt").read_text() == "old b"
    with OutputSet(str(final)) as s:
        atomic_write_text(s.path("c.txt"), "new c")
    assert sorted(os.listdir(final)) == ["c.txt"]
    assert sorted(os.listdir(tmp_path)) == ["set"]


def test_atomic_output_names_the_path_on_a_full_disk(full_disk):
    from network.outputs import OutputError, atomic_write_text

    small = full_disk("8k")
    target = os.path.join(small, "big.txt")
    with pytest.raises(OutputError, match=r"big\.txt: cannot write \(no space left on device\)"):
        atomic_write_text(target, "x" * 100_000)
    assert os.listdir(small) == []
