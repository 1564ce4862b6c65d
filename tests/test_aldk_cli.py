"""ALDK end to end on tiny synthetic data: extract_teacher.py -> Teacher_deformations -> train.py --aldk."""
import glob
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from data_util import PairDataset, RCNDataset, scan_id
from data_util.synthetic import generate
from data_util.teacher_flows import TeacherFlows
from network.aldk import OnlineTeacher
from tests.test_cli import ROOT, run

TRAIN_PAIRS = 6          # 3 training scans -> 6 ordered pairs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("aldk")
    generate(str(d / "data"), size=48, n_train=3, n_val=2, seed=2)
    r = run([os.path.join(ROOT, "train.py"), "-b", "LDR", "-n", "1", "--steps", "2", "--batch", "1", "--output",
             "teacher", "-d", "data/synthetic.json", "--val_steps", "0", "--workers", "0"], d)
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def extracted(workdir):
    """Extraction in two runs (the second resumes): the default store of the dataset."""
    cmd = [os.path.join(ROOT, "extract_teacher.py"), "-c", "weights/teacher", "--workers", "0"]
    r = run(cmd + ["--limit", "2"], workdir)
    assert r.returncode == 0, r.stderr
    r = run(cmd, workdir)
    assert r.returncode == 0, r.stderr
    assert "2 already stored, 4 to extract" in r.stdout
    return workdir / "Teacher_deformations" / "synthetic" / "teacher_2.h5"


def test_extraction_store_is_complete_with_a_manifest(extracted):
    assert extracted.exists() and not os.path.exists(str(extracted) + ".partial")
    flows = TeacherFlows(str(extracted), (48, 48, 48))
    assert len(flows) == TRAIN_PAIRS and "synth_train_000-synth_train_001" in flows
    (_, n, manifest), = flows.sources()
    assert n == TRAIN_PAIRS and manifest["split"] == "1"
    assert manifest["teacher"]["step"] == 2 and manifest["teacher"]["model_config"]["base_network"] == "LDR"
    assert manifest["dataset_config"]["schemes"]["1"] == {"synth-train": 1.0}


def test_oracle_teacher_store_reproduces_the_true_flow_dice(workdir):
    """``extract_teacher.py --oracle``: stored flows are the generator's true pair flows (float16), and
    warping with them gives the true flow's Dice, far above the unregistered one."""
    from data_util.synthetic import true_pair_flow
    from network.metrics import segmentation_scores

    # its own folder: Teacher_deformations/synthetic holds the network teacher's store in this module
    r = run([os.path.join(ROOT, "extract_teacher.py"), "--oracle", "-d", "data/synthetic.json",
             "--out", "oracle/oracle.h5"], workdir)
    assert r.returncode == 0, r.stderr
    store = workdir / "oracle" / "oracle.h5"
    flows = TeacherFlows(str(store), (48, 48, 48))
    assert len(flows) == TRAIN_PAIRS and flows.sources()[0][2]["teacher"]["oracle"] == "synthetic ground truth"
    dataset = RCNDataset(str(workdir / "data" / "synthetic.json"))
    fixed, moving = dataset.pairs("1")[1]
    h5 = dataset._file(dataset.locate(fixed)[0])
    u_f, u_m = (h5[dataset.locate(e)[1]]["deformation"][()] for e in (fixed, moving))
    truth = true_pair_flow(u_f, u_m)
    stored = torch.from_numpy(np.asarray(flows.get(f"{scan_id(fixed)}-{scan_id(moving)}"), dtype=np.float32))
    torch.testing.assert_close(stored, truth, atol=0.02, rtol=1e-3)
    seg = [torch.from_numpy(dataset.load(e)["segmentation"])[None, None] for e in (fixed, moving)]
    values = list(dataset.segmentation_class_value.values())
    dice_true, _ = segmentation_scores(seg[0], seg[1], truth[None], values)
    dice_stored, _ = segmentation_scores(seg[0], seg[1], stored[None], values)
    dice_before, _ = segmentation_scores(seg[0], seg[1], None, values)
    assert abs(dice_stored.item() - dice_true.item()) < 2e-3
    assert dice_true.item() > dice_before.item() + 0.1


def test_oracle_teacher_refuses_a_dataset_without_known_flows(workdir, tmp_path):
    generate(str(tmp_path / "data"), size=16, n_train=2, n_val=1, seed=0, anatomy="per-scan")
    r = run([os.path.join(ROOT, "extract_teacher.py"), "--oracle", "-d", str(tmp_path / "data" / "synthetic.json")],
            workdir)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--anatomy shared" in r.stderr
    r = run([os.path.join(ROOT, "extract_teacher.py"), "--oracle"], workdir)
    assert r.returncode != 0 and "--oracle needs -d" in r.stderr


def test_seed_command_runs_with_the_extracted_flows(extracted):
    r = run([os.path.join(ROOT, "train.py"), "-b", "LDR", "-n", "1", "-g", "-1", "--round", "20", "--epochs", "1",
             "--batch", "1", "--output", "s", "-d", "data/synthetic.json", "--aldk"], extracted.parents[2])
    assert r.returncode == 0, r.stderr
    assert f"{TRAIN_PAIRS} of {TRAIN_PAIRS} training pairs" in r.stdout
    state = torch.load(extracted.parents[2] / "weights" / "s" / "ckpt_20.pt", weights_only=True)
    assert state["distill"]["config"]["mode"] == "aldk" and state["distill"]["critic"] is not None
    assert state["train_args"]["aldk"] is True


def test_training_reads_back_the_extracted_flow_of_each_pair(extracted, monkeypatch):
    import train
    from engine import trainer
    seen = []
    original = trainer.distillation_step

    def spy(distiller, teacher, batch, *args):
        seen.append((batch["id1"][0], batch["id2"][0], batch["teacher_flow"][0].clone()))
        return original(distiller, teacher, batch, *args)

    workdir = extracted.parents[2]
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(trainer, "distillation_step", spy)
    assert train.main(["-b", "LDR", "-n", "1", "--steps", "3", "--batch", "1", "--output", "spy", "-d",
                       "data/synthetic.json", "--distill", "l2", "--val_steps", "0", "--workers", "0"]) == 0
    assert len(seen) == 3
    teacher = OnlineTeacher("weights/teacher")
    dataset = RCNDataset("data/synthetic.json")
    by_id = {scan_id(e): e for e in dataset.subsets["synth-train"]}
    for id1, id2, stored in seen:
        item = PairDataset(dataset)[(by_id[id1], by_id[id2])]
        expected = teacher(item["voxel1"][None], item["voxel2"][None])[0]
        torch.testing.assert_close(stored, expected, atol=1e-3 * float(expected.abs().max()) + 1e-3, rtol=0)


def test_online_teacher_with_augmentation_logs_all_terms(workdir):
    r = run([os.path.join(ROOT, "train.py"), "-b", "LDR", "-n", "1", "--steps", "2", "--batch", "1", "--output",
             "online", "-d", "data/synthetic.json", "--aldk", "--teacher", "weights/teacher", "--val_steps", "0",
             "--workers", "0"], workdir)
    assert r.returncode == 0, r.stderr
    assert "online teacher" in r.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(workdir / "logs" / "online"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/critic", "loss/gp", "loss/adv", "loss/rec", "loss/wdist", "loss/total"} <= tags


def published_pickle(path, workdir, bad_key=None, bad_shape=(24, 24, 24, 3)):
    """Teacher flows in the LDR_ALDK pickle layout for every training pair (one of them malformed)."""
    ids = [f"synth_train_{i:03d}" for i in range(3)]
    rng = np.random.default_rng(0)
    flows = {}
    for a in ids:
        for b in ids:
            if a != b:
                key = f"{a}-{b}"
                shape = bad_shape if key == bad_key else (48, 48, 48, 3)
                flows[key] = rng.normal(size=shape).astype(np.float16)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(flows, f)
    return flows


def test_published_pickle_folder_is_found_like_ldr_aldk(workdir, tmp_path):
    d = tmp_path / "pkl"
    shutil.copytree(workdir / "data", d / "data")
    published_pickle(str(d / "Teacher_deformations" / "Synthetic" / "synthetic_teacher_deformation_c_1.pkl"), d)
    r = run([os.path.join(ROOT, "train.py"), "-b", "LDR", "-n", "1", "--steps", "2", "--batch", "1", "--output",
             "p", "-d", "data/synthetic.json", "--distill", "l2", "--val_steps", "0", "--workers", "0"], d)
    assert r.returncode == 0, r.stderr
    assert os.path.join("Teacher_deformations", "Synthetic") in r.stdout


def test_wrong_shape_teacher_flow_is_refused_naming_the_pair(workdir, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(workdir / "data", d / "data")
    bad = "synth_train_001-synth_train_002"
    published_pickle(str(d / "flows.pkl"), d, bad_key=bad)
    r = run([os.path.join(ROOT, "train.py"), "-b", "LDR", "-n", "1", "--steps", str(TRAIN_PAIRS), "--batch", "1",
             "--output", "bad", "-d", "data/synthetic.json", "--aldk", "--pretrained_flow_path", "flows.pkl",
             "--val_steps", "0", "--workers", "1"], d)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and bad in lines[0] and "flows.pkl" in lines[0] and "shape" in lines[0], r.stderr
    assert not glob.glob(str(d / "weights" / "bad" / "*.pt"))


def test_unsafe_pickle_is_refused_before_training(workdir, tmp_path):
    d = tmp_path / "unsafe"
    shutil.copytree(workdir / "data", d / "data")
    marker = d / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(d / "flows.pkl", "wb") as f:
        pickle.dump({"synth_train_000-synth_train_001": Exploit()}, f)
    r = run([os.path.join(ROOT, "train.py"), "-b", "LDR", "-n", "1", "--steps", "1", "--output", "u", "-d",
             "data/synthetic.json", "--aldk", "--pretrained_flow_path", "flows.pkl", "--workers", "0"], d)
    assert r.returncode != 0 and not marker.exists()
    assert "refusing to unpickle" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_aldk_without_teacher_flows_says_how_to_get_them(workdir, tmp_path):
    d = tmp_path / "none"
    shutil.copytree(workdir / "data", d / "data")
    r = run([os.path.join(ROOT, "train.py"), "-b", "LDR", "-n", "1", "--steps", "1", "--output", "n", "-d",
             "data/synthetic.json", "--aldk"], d)
    assert r.returncode != 0
    line, = r.stderr.strip().splitlines()
    assert "extract_teacher.py" in line and "--teacher" in line


def test_extraction_refuses_a_store_of_another_teacher(extracted):
    workdir = extracted.parents[2]
    r = run([os.path.join(ROOT, "train.py"), "-b", "LDR", "-n", "1", "--steps", "1", "--batch", "1", "--output",
             "teacher2", "-d", "data/synthetic.json", "--val_steps", "0", "--workers", "0", "--seed", "5"], workdir)
    assert r.returncode == 0, r.stderr
    r = run([os.path.join(ROOT, "extract_teacher.py"), "-c", "weights/teacher2", "--out", str(extracted),
             "--workers", "0"], workdir)
    assert r.returncode != 0 and "different teacher" in r.stderr
    assert len(TeacherFlows(str(extracted), (48, 48, 48))) == TRAIN_PAIRS
    info = json.loads(json.dumps(TeacherFlows(str(extracted), (48, 48, 48)).sources()[0][2]))
    assert info["teacher"]["step"] == 2
