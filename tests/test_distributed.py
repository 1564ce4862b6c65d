"""Data-parallel training under torchrun on the CPU (gloo, 2 processes): a DDP step equals the
single-process step on the whole batch, the sharded sampler covers every pair once per pass, a resumed
DDP run continues exactly, rank 0 alone writes the run, and teacher extraction shards and merges."""
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from faults import ROOT, assert_clean_error, run_script

from data_util import RCNDataset
from data_util.dataset import ListPairBatchSampler, RandomPairBatchSampler
from data_util.synthetic import generate
from engine.distributed import ShardBatches, launch_command
from network import build_model

FLAGS = ["-b", "LDR", "-n", "1", "-g", "-1", "--preset", "plain", "--channels", "4", "--batch", "2",
         "--lr", "3e-4", "--workers", "0", "--threads", "1", "--keep", "0", "-d", "data/synthetic.json"]
# parameters of a DDP step and of the single-process step on the same two pairs: float rounding
# of the gradient all-reduce only (measured 1.5e-8 after 3 steps; Adam's first step moves by ~lr = 3e-4)
PARAM_TOLERANCE = 1e-6


def torchrun(*args, cwd, n=2, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def weights(path):
    return torch.load(path, weights_only=True)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    generate(str(d / "data"), size=32, n_train=4, n_val=2, seed=1)
    return d


def test_one_ddp_step_equals_one_single_process_step_on_the_same_pairs(work):
    single = run_script("train.py", *FLAGS, "--steps", "1", "--no_augment", "--val_steps", "0", "--output", "single",
                        cwd=work)
    assert single.returncode == 0, single.stderr
    ddp = torchrun(os.path.join(ROOT, "train.py"), *FLAGS, "--steps", "1", "--no_augment", "--val_steps", "0",
                   "--output", "ddp", cwd=work)
    assert ddp.returncode == 0, ddp.stderr
    assert "1 on each of 2 processes, gloo" in ddp.stdout
    a, b = weights(work / "weights" / "single" / "ckpt_1.pt"), weights(work / "weights" / "ddp" / "ckpt_1.pt")
    torch.manual_seed(0)                                              # --seed 0: the runs' initial weights
    init = build_model(a["model_config"]).state_dict()
    assert max_difference(a["model"], b["model"]) < PARAM_TOLERANCE
    assert max_difference(a["model"], init) > 1e-4                    # the step did move the weights
    # the same loss is reported: the DDP value sums the two processes' halves of the batch
    line = [x for x in single.stdout.splitlines() if x.startswith("step 1/1")][0].split("|")[0]
    assert line in ddp.stdout
    assert b["world_size"] == 2 and len(b["rng_ranks"]) == 2
    assert b["commands"][-1].startswith("torchrun --nproc_per_node=2 train.py")


def test_torchrun_writes_one_set_of_checkpoints_and_logs(work):
    r = torchrun(os.path.join(ROOT, "train.py"), *FLAGS, "--round", "20", "--epochs", "0.2", "--val_steps", "2",
                 "--val_pairs", "1", "--save_steps", "2", "--log_steps", "2", "--output", "one_set", cwd=work)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(work / "weights" / "one_set")) == [".lock", "ckpt_2.pt", "ckpt_4.pt"]
    assert len(os.listdir(work / "logs" / "one_set")) == 1           # one TensorBoard event file
    assert r.stdout.count("done: steps 0 -> 4") == 1                 # rank 0 alone prints
    assert r.stdout.count("step 4: val dice") == 1


def test_ddp_resume_continues_the_order_critic_and_weights(work):
    teacher = work / "weights" / "single"
    if not teacher.exists():
        pytest.skip("needs the single-process run of the first test")
    flags = [*FLAGS, "--round", "3", "--epochs", "4", "--val_steps", "3", "--val_pairs", "1", "--save_steps", "3",
             "--aldk", "--teacher", "weights/single"]
    full = torchrun(os.path.join(ROOT, "train.py"), *flags, "--output", "full", cwd=work)
    assert full.returncode == 0, full.stderr
    part = torchrun(os.path.join(ROOT, "train.py"), *flags, "--steps", "6", "--output", "part", cwd=work)
    assert part.returncode == 0, part.stderr
    resumed = torchrun(os.path.join(ROOT, "train.py"), "-c", "weights/part", "--steps", "12", cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    assert "training steps 6 -> 12" in resumed.stdout
    a, b = weights(work / "weights" / "full" / "ckpt_12.pt"), weights(work / "weights" / "part" / "ckpt_12.pt")
    assert max_difference(a["model"], b["model"]) == 0.0
    assert max_difference(a["distill"]["critic"], b["distill"]["critic"]) == 0.0
    assert a["distill"]["balance"] == b["distill"]["balance"]
    # one process resuming a two-process run: same pairs and order, augmentation draws said to differ
    single = run_script("train.py", "-c", "weights/part:6", "--steps", "7", "--output", "part_single", cwd=work)
    assert single.returncode == 0, single.stderr
    assert "saved by 2 process(es), this run has 1" in single.stdout


def test_sampler_covers_each_pair_once_per_pass_across_ranks(work):
    pairs = [(f"a{i}", f"b{i}") for i in range(6)]
    for batch, world in ((2, 2), (6, 3), (4, 2)):
        sampler = ListPairBatchSampler(pairs, batch, seed=3)
        shards = [iter(ShardBatches(sampler, r, world)) for r in range(world)]
        steps = len(pairs) // batch if len(pairs) % batch == 0 else len(pairs)
        seen = []
        for _ in range(steps):
            parts = [next(s) for s in shards]
            assert all(len(p) == batch // world for p in parts)
            seen += [x for p in parts for x in p]
        if len(pairs) % batch == 0:
            assert sorted(seen) == sorted(pairs)                      # one pass: each pair once
        assert all(seen.count(p) == seen.count(pairs[0]) for p in pairs)
        # the shards put together are the single-process batches
        whole = iter(sampler)
        again = [iter(ShardBatches(sampler, r, world)) for r in range(world)]
        for _ in range(3):
            assert next(whole) == [x for s in again for x in next(s)]
    ds = RCNDataset(str(work / "data" / "synthetic.json"))
    n = ds.num_pairs("1")
    sampler = RandomPairBatchSampler(ds, "1", 2, seed=0)
    shards = [iter(ShardBatches(sampler, r, 2)) for r in range(2)]
    seen = [x for _ in range(n // 2) for s in shards for x in next(s)]
    assert sorted(seen) == sorted(ds.pairs("1"))


def test_batch_that_does_not_split_and_several_gpus_without_torchrun(work):
    r = torchrun(os.path.join(ROOT, "train.py"), *FLAGS, "--batch", "3", "--steps", "1", "--output", "odd", cwd=work)
    assert r.returncode != 0
    assert "train.py: error: --batch 3: the global batch must split evenly over the 2 processes" in r.stderr
    assert not (work / "weights" / "odd").exists()
    r = run_script("train.py", *FLAGS, "-g", "0,1", "--steps", "1", cwd=work)
    last = assert_clean_error(r, "-g 0,1", "torchrun --standalone --nproc_per_node=2 train.py")
    assert "--steps 1" in last
    assert launch_command(["-g", "0,1"], "train.py", 2) == "torchrun --standalone --nproc_per_node=2 train.py -g 0,1"


def test_extract_teacher_shards_over_processes_into_one_store(work):
    teacher = work / "weights" / "single"
    if not teacher.exists():
        pytest.skip("needs the single-process run of the first test")
    one = run_script("extract_teacher.py", "-c", "weights/single", "--out", "T/one.h5", "--workers", "0", cwd=work)
    assert one.returncode == 0, one.stderr
    two = torchrun(os.path.join(ROOT, "extract_teacher.py"), "-c", "weights/single", "--out", "T/two.h5",
                   "--workers", "0", cwd=work)
    assert two.returncode == 0, two.stderr
    assert "over 2 processes" in two.stdout and two.stdout.count("done:") == 1
    assert sorted(os.listdir(work / "T")) == ["one.h5", "two.h5"]        # shards merged and removed
    with h5py.File(work / "T" / "one.h5") as a, h5py.File(work / "T" / "two.h5") as b:
        assert sorted(a["flows"]) == sorted(b["flows"]) and len(a["flows"]) == 12
        for k in a["flows"]:
            np.testing.assert_array_equal(a["flows"][k][()], b["flows"][k][()])
