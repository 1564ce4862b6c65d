"""A resumed run is the same experiment: flags, lr schedule, data order, augmentation, critic and
loss curve continue exactly after a ``kill -9``; overrides are printed; run folders are locked and
never mixed; checkpoints are pruned; progress is printed without a terminal."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from faults import ROOT, assert_clean_error, leftovers, run_script

from data_util.synthetic import generate
from network.checkpoint import RunLock, list_checkpoints

# batch 1, lr 3e-4, ALDK on (online teacher, uniform penalty mixing: uses the global RNG), FFD
# augmentation on (its own generator), a checkpoint every 2 steps, the RCN lr schedule halving
# after epoch 3 of 6 steps, so the resumed part crosses two lr changes.
FLAGS = ["-b", "LDR", "-n", "1", "-g", "-1", "--preset", "plain", "--channels", "4", "--round", "6", "--epochs", "5",
         "--batch", "1", "--lr", "3e-4", "--save_steps", "2", "--val_steps", "10", "--val_pairs", "1",
         "--workers", "0", "--log_steps", "2", "--aldk", "--gp_mix", "uniform", "--distill_ratio", "0.4",
         "--threads", "1", "--keep", "0"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    generate(str(d / "data"), size=32, n_train=3, n_val=2, seed=1)
    r = run_script("train.py", "-b", "LDR", "-n", "1", "-g", "-1", "--preset", "plain", "--channels", "4",
                   "--steps", "2", "--batch", "1", "--output", "teacher", "-d", "data/synthetic.json",
                   "--val_steps", "0", "--workers", "0", cwd=d)
    assert r.returncode == 0, r.stderr
    return d


def progress_lines(text: str) -> dict:
    """``{step: "loss ... components"}`` from the plain progress lines (timing stripped)."""
    out = {}
    for m in re.finditer(r"^step (\d+)/\d+ (.*?) \|", text, re.M):
        out[int(m.group(1))] = m.group(2)
    return out


@pytest.fixture(scope="module")
def reference(work):
    r = run_script("train.py", *FLAGS, "--output", "ref", "-d", "data/synthetic.json", "--teacher", "weights/teacher",
                   cwd=work)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def killed_and_resumed(work, reference):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    # one loader worker here (the reference has none): the killed trainer's orphaned worker must not
    # keep the run folder locked, and the worker count must not change the result
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *FLAGS, "--workers", "1", "--output", "killed",
           "-d", "data/synthetic.json", "--teacher", "weights/teacher"]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = work / "weights" / "killed" / "ckpt_12.pt"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = sorted(list_checkpoints(str(work / "weights" / "killed")))
    assert steps and steps[-1] < 30, steps
    resumed = run_script("train.py", "-c", "weights/killed", "--round", "6", cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    return steps[-1], resumed.stdout


def test_kill_9_then_resume_continues_the_same_experiment(work, reference, killed_and_resumed):
    killed_at, log = killed_and_resumed
    a = torch.load(work / "weights" / "ref" / "ckpt_30.pt", weights_only=True)
    b = torch.load(work / "weights" / "killed" / "ckpt_30.pt", weights_only=True)
    # flags came back from the checkpoint (only --round was given, with its stored value)
    assert "resume override" not in log
    assert f"training steps {killed_at} -> 30, batch 1, lr 0.0003 (rcn)" in log
    for key in ("batch", "lr", "aldk", "gp_mix", "save_steps", "teacher", "augment", "channels", "keep",
                "aldk_variant", "distill_ratio", "distill_weight", "lamb", "critic_steps", "critic_lr"):
        assert b["train_args"][key] == a["train_args"][key], key
    assert b["train_args"]["distill_ratio"] == 0.4 and b["distill"]["config"] == a["distill"]["config"]
    # the automatic weight's moving averages continue too
    assert b["distill"]["balance"] == a["distill"]["balance"] and a["distill"]["balance"]["count"] == 30
    # the same weights, optimiser moments, critic and critic optimiser as the uninterrupted run
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["distill"]["critic"]:
        assert torch.equal(a["distill"]["critic"][k], b["distill"]["critic"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    ca, cb = a["distill"]["optimizer"]["state"], b["distill"]["optimizer"]["state"]
    assert all(torch.equal(ca[i]["exp_avg"], cb[i]["exp_avg"]) for i in ca)
    # the lr schedule continued: 3e-4 for epochs 0-2, halved in epochs 3 and 4; the optimiser holds the
    # rate of the next step (30, epoch 5), as torch.optim.lr_scheduler leaves it, in both runs
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3e-4 / 8)
    # the loss curve after the resume point is the uninterrupted run's, step for step
    ref_curve, new_curve = progress_lines(reference), progress_lines(log)
    later = [s for s in ref_curve if s > killed_at]
    assert later and all(new_curve[s] == ref_curve[s] for s in later), (ref_curve, new_curve)
    assert leftovers(work / "weights") == []


def test_sigterm_saves_the_current_step_and_resumes_exactly(work, reference):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *FLAGS, "--save_steps", "100", "--output", "termed",
           "-d", "data/synthetic.json", "--teacher", "weights/teacher"]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:                                   # wait until a few steps ran
        if line.startswith("step 6/"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "SIGTERM: finishing this step" in err
    steps = sorted(list_checkpoints(str(work / "weights" / "termed")))
    assert len(steps) == 1 and 6 <= steps[0] < 30 and f"saved weights/termed/ckpt_{steps[0]}.pt" in out
    r = run_script("train.py", "-c", "weights/termed", cwd=work)
    assert r.returncode == 0, r.stderr
    a = torch.load(work / "weights" / "ref" / "ckpt_30.pt", weights_only=True)
    b = torch.load(work / "weights" / "termed" / "ckpt_30.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["distill"]["critic"][k], b["distill"]["critic"][k]) for k in a["distill"]["critic"])


def test_override_is_printed_and_stored(work, reference):
    r = run_script("train.py", "-c", "weights/ref:20", "--output", "ref_lr", "--lr", "1e-4", "--steps", "22", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "resume override: --lr 0.0001 (the run had 0.0003)" in r.stdout
    state = torch.load(work / "weights" / "ref_lr" / "ckpt_22.pt", weights_only=True)
    assert state["train_args"]["lr"] == 1e-4 and state["train_args"]["batch"] == 1
    assert state["train_args"]["aldk"] is True and state["distill"]["critic"] is not None


def test_a_new_dataset_on_resume_is_printed_and_stored(work, reference):
    shutil.copy(work / "data" / "synthetic.json", work / "data" / "other.json")
    r = run_script("train.py", "-c", "weights/ref:20", "--output", "ref_data", "-d", "data/other.json",
                   "--steps", "21", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "resume override: -d data/other.json (the run had data/synthetic.json)" in r.stdout
    state = torch.load(work / "weights" / "ref_data" / "ckpt_21.pt", weights_only=True)
    assert state["train_args"]["dataset"] == "data/other.json"


def test_resuming_a_finished_run_says_so(work, reference):
    r = run_script("train.py", "-c", "weights/ref", cwd=work)
    assert_clean_error(r, "already at step 30 of its 30 steps", "--epochs")


def test_architecture_flags_cannot_change_on_resume(work, reference):
    r = run_script("train.py", "-c", "weights/ref", "-b", "VTN", "--epochs", "6", cwd=work)
    assert_clean_error(r, "-b", "base_network = LDR")


def test_second_training_on_a_locked_folder_is_refused(work):
    lock = RunLock(str(work / "weights" / "busy")).acquire()
    try:
        r = run_script("train.py", *FLAGS[:-2], "--output", "busy", "-d", "data/synthetic.json", "--steps", "2",
                       cwd=work)
        assert_clean_error(r, "weights/busy", "in use by another training", f"pid {os.getpid()}")
    finally:
        lock.release()


def test_new_run_into_a_used_folder_is_refused_unless_overwrite(work, reference):
    before = sorted(os.listdir(work / "weights" / "ref"))
    args = ["-b", "LDR", "--preset", "plain", "--channels", "4", "-g", "-1", "--steps", "2", "--batch", "1",
            "--val_steps", "0", "--workers", "0", "-d", "data/synthetic.json"]
    r = run_script("train.py", *args, "--output", "ref", cwd=work)
    assert_clean_error(r, "weights/ref", "another run", "-c weights/ref", "--overwrite")
    assert sorted(os.listdir(work / "weights" / "ref")) == before
    r = run_script("train.py", *args, "--output", "ref_copy", cwd=work)
    assert r.returncode == 0, r.stderr
    r = run_script("train.py", *args, "--output", "ref_copy", "--overwrite", "--keep", "1", cwd=work)
    assert r.returncode == 0, r.stderr
    assert sorted(list_checkpoints(str(work / "weights" / "ref_copy"))) == [2]


def test_retention_keeps_newest_and_best(work):
    r = run_script("train.py", "-b", "LDR", "--preset", "plain", "--channels", "4", "-g", "-1", "--steps", "8",
                   "--batch", "1", "--save_steps", "1", "--val_steps", "2", "--val_pairs", "1", "--keep", "2",
                   "--workers", "0", "-d", "data/synthetic.json", "--output", "pruned", cwd=work)
    assert r.returncode == 0, r.stderr
    steps = sorted(list_checkpoints(str(work / "weights" / "pruned")))
    state = torch.load(work / "weights" / "pruned" / "ckpt_8.pt", weights_only=True)
    best = state["best"]["step"]
    assert best in steps and steps[-2:] == [7, 8] and set(steps) <= {best, 7, 8}
    assert state["val"]["dice"] > 0 and state["input_normalisation"] == "uint8"


def test_plain_progress_lines_without_a_terminal(reference):
    lines = [line for line in reference.splitlines() if line.startswith("step ") and "/30" in line]
    assert len(lines) == 15
    assert re.match(r"^step 30/30 loss [0-9.]+ .*\| [0-9.]+ s/step \| ETA 0m00s$", lines[-1]), lines[-1]
    assert "done: steps 0 -> 30 (30 this run)" in reference


def test_checkpoints_are_readable_by_colleagues(work, reference):
    old = os.umask(0o022)
    os.umask(old)
    if old != 0o022:
        pytest.skip("umask is not 022")
    mode = os.stat(work / "weights" / "ref" / "ckpt_30.pt").st_mode & 0o777
    assert mode == 0o644


def test_stale_temp_of_a_killed_write_is_removed_on_resume(work, reference):
    from network.outputs import temp_prefix

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    shutil.copytree(work / "weights" / "ref", work / "weights" / "moved")     # a copied run resumes in place
    stale = work / "weights" / "moved" / (temp_prefix().replace(f"_{os.getpid()}_", f"_{dead.pid}_") + "x.pt")
    stale.write_bytes(b"half a checkpoint")
    r = run_script("train.py", "-c", "weights/moved", "--epochs", "6", cwd=work)
    assert r.returncode == 0, r.stderr
    assert not stale.exists()
    assert 36 in list_checkpoints(str(work / "weights" / "moved"))
    assert 36 not in list_checkpoints(str(work / "weights" / "ref"))
