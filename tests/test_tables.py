"""tables.py (engine/tables.py) and the stand-ins of the published evaluation data
(data_util/standins.py): both tables from checkpoints on all four splits, paired differences by
hand, agreement with eval.py, the one-command demos, and one-line faults."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

from data_util import open_dataset
from data_util.standins import CONFIG_DIR, evaluation_entries, standin_configs, write_standins
from engine.tables import paired_difference
from faults import assert_clean_error, leftovers, run_script
from network import ModelConfig, build_model
from network.checkpoint import save_checkpoint

SIZE = 32


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    paths = write_standins(str(root / "data"), size=SIZE)
    return {"liver": paths["liver.json"], "brain": paths["brain.json"], "root": root}


def _checkpoint(folder, base, n, seed, dataset):
    """A tiny plain-preset model whose flow layers are randomised (so models register differently)."""
    torch.manual_seed(seed)
    config = ModelConfig(base_network=base, preset="plain", n_cascades=n, channels=4, image_size=(SIZE,) * 3)
    model = build_model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "flow" in name:
                p.normal_(0, 0.05)
    return save_checkpoint(str(folder), model, config.to_dict(), step=10, train_args={"dataset": dataset})


def test_standins_hold_the_published_entries(standins):
    for name, key in (("liver.json", "liver"), ("brain.json", "brain")):
        published = json.load(open(os.path.join(CONFIG_DIR, name)))
        copy = json.load(open(standins[key]))
        assert copy["subsets"] == published["subsets"] and copy["schemes"] == published["schemes"]
        assert copy.get("segmentation_class_value") == published.get("segmentation_class_value")
        assert copy["image_size"] == [SIZE] * 3 and copy["standin"]["of"] == name
        for entry in evaluation_entries(published):
            prefix = entry.split("/")[0]
            assert os.path.basename(copy["files"][prefix]["path"]) == os.path.basename(published["files"][prefix]["path"])
    counts = {}
    for key, scheme, paired in (("liver", "sliver", False), ("liver", "lits", False), ("liver", "lspig", True),
                                ("brain", "2", False)):
        dataset = open_dataset(standins[key], paired=paired, splits=[scheme])
        counts[scheme] = dataset.num_pairs(scheme)
    assert counts == {"sliver": 19 * 18, "lits": 131 * 130, "lspig": 34, "2": 39}
    brain = open_dataset(standins["brain"], splits=["2"])
    assert brain.atlas == "lpba/S01"
    labels = set(np.unique(brain.load("lpba/S05")["segmentation"]).astype(int)) - {0}
    assert labels <= {int(v) for v in brain.segmentation_class_value.values()} and len(labels) >= 40
    liver = open_dataset(standins["liver"], splits=["sliver"])
    scan = liver.load("yanx/10")
    assert set(np.unique(scan["segmentation"])) == {0.0, 255.0} and scan["point"].shape == (6, 3)
    assert leftovers(standins["root"]) == []


def test_standins_are_reused_and_deterministic(standins, tmp_path):
    before = os.path.getmtime(standins["liver"])
    assert standin_configs(os.path.dirname(standins["liver"]), SIZE)["liver.json"] == standins["liver"]
    assert os.path.getmtime(standins["liver"]) == before
    other = write_standins(str(tmp_path / "again"), size=SIZE, configs=("liver.json",))
    a = open_dataset(standins["liver"], splits=["lspig"]).load("pigs/2017_02_aftergas")["volume"]
    b = open_dataset(other["liver.json"], splits=["lspig"]).load("pigs/2017_02_aftergas")["volume"]
    np.testing.assert_array_equal(a, b)


def test_table1_from_checkpoints_matches_eval(standins, tmp_path):
    a_liver = _checkpoint(tmp_path / "a_liver", "VoxelMorph", 1, 0, standins["liver"])
    a_brain = _checkpoint(tmp_path / "a_brain", "VoxelMorph", 1, 1, standins["brain"])
    b_liver = _checkpoint(tmp_path / "b_liver", "LDR", 1, 2, standins["liver"])
    out = tmp_path / "t1"
    proc = run_script("tables.py", "table1", "--method", "Big", a_liver, a_brain, "--method", "Small", b_liver, "-",
                      "--liver", standins["liver"], "--brain", standins["brain"], "--limit", 3, "--runs", 2,
                      "-o", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "table1.md").read_text()
    assert "| Method | SLIVER Dice | SLIVER Jacc | LiTS Dice | LiTS Jacc | LSPIG Dice | LSPIG Jacc | LPBA Dice | " \
           "LPBA Jacc | CPU s | GPU s | Params |" in md
    assert "Published claims" in md and "~21x" in md and "Small vs Big" in md
    report = json.loads((out / "table1.json").read_text())
    big, small = report["methods"]
    assert sorted(big["results"]) == ["lits", "lpba", "lspig", "sliver"] and "lpba" not in small["results"]
    assert big["results"]["lpba"]["atlas"] == "lpba/S01" and big["results"]["lspig"]["paired"]
    assert all(r["n_pairs"] == 3 for r in big["results"].values())
    assert big["speed"]["cpu_s"] > 0 and big["speed"]["params"] > small["speed"]["params"]
    # the same split evaluated by eval.py gives the same Dice
    ev = run_script("eval.py", "-c", tmp_path / "a_liver", "-v", "lits", "--limit", 3, "--out_dir", tmp_path / "ev",
                    cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-2000:]
    name = next(os.scandir(tmp_path / "ev")).name
    eval_dice = json.loads((tmp_path / "ev" / name / f"{name}.json").read_text())["summary"]["dice"]["mean"]
    assert big["results"]["lits"]["dice"]["mean"] == pytest.approx(eval_dice, abs=1e-9)
    # paired difference by hand
    comp = report["comparisons"][0]
    pa, pb = big["results"]["sliver"]["pairs"], small["results"]["sliver"]["pairs"]
    diffs = np.array([b[2] - a[2] for a, b in zip(pa, pb)])
    assert comp["datasets"]["sliver"]["dice"]["points"] == pytest.approx(100 * diffs.mean())
    assert comp["datasets"]["sliver"]["dice"]["se_points"] == pytest.approx(100 * diffs.std(ddof=1) / np.sqrt(3))
    assert comp["params_ratio"] == pytest.approx(big["speed"]["params"] / small["speed"]["params"])
    rows = list(csv.DictReader(open(out / "table1.csv")))
    assert [r["method"] for r in rows] == ["Big", "Small"]
    assert float(rows[0]["sliver_dice_mean"]) == pytest.approx(big["results"]["sliver"]["dice"]["mean"])
    assert rows[1]["lpba_dice_mean"] == "" and rows[0]["gpu_s"] == ("" if not torch.cuda.is_available() else rows[0]["gpu_s"])
    assert leftovers(tmp_path) == []


def test_table2_from_checkpoints(standins, tmp_path):
    args = []
    for n in (1, 2):
        plain = _checkpoint(tmp_path / f"plain{n}", "LDR", n, 10 * n, standins["liver"])
        distilled = _checkpoint(tmp_path / f"aldk{n}", "LDR", n, 10 * n + 1, standins["liver"])
        args += ["--row", n, os.path.dirname(plain), os.path.dirname(distilled)]
    out = tmp_path / "t2"
    proc = run_script("tables.py", "table2", *args, "--liver", standins["liver"], "--limit", 4, "--runs", 1, "-o", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "table2.md").read_text()
    assert "| Setup | LDR Dice | LDR Jacc | LDR + ALDK Dice | LDR + ALDK Jacc |" in md
    assert "| 1-cas |" in md and "+3.4%" in md and "+4.0%" in md
    report = json.loads((out / "table2.json").read_text())
    for row in report["rows"]:
        p, d = row["plain"]["results"]["sliver"], row["distilled"]["results"]["sliver"]
        assert [x[:2] for x in p["pairs"]] == [x[:2] for x in d["pairs"]] and len(p["pairs"]) == 4
        want = 100 * np.mean([b[3] - a[3] for a, b in zip(p["pairs"], d["pairs"])])
        assert row["difference"]["jacc"]["points"] == pytest.approx(want)
    rows = list(csv.DictReader(open(out / "table2.csv")))
    assert [r["cascades"] for r in rows] == ["1", "2"] and rows[1]["published_delta_dice_pct"] == "4.0"


def test_paired_difference_by_hand():
    a = {"dice": {"mean": 0.5}, "pairs": [["x", "y", 0.5, 0.3], ["x", "z", 0.6, 0.4], ["y", "z", 0.4, 0.2]]}
    b = {"pairs": [["x", "z", 0.7, 0.5], ["x", "y", 0.5, 0.4], ["q", "r", 0.9, 0.9]]}
    d = paired_difference(a, b, "dice")                  # pairs matched by ids: diffs 0.1 and 0.0
    assert d["n"] == 2 and d["points"] == pytest.approx(5.0) and d["se_points"] == pytest.approx(5.0)
    assert d["relative_pct"] == pytest.approx(10.0)
    assert paired_difference(a, {"pairs": [["q", "r", 1, 1]]}, "jacc") is None


def test_demos_one_command_each(tmp_path):
    """From nothing: stand-ins written, the paper's architectures at their initial weights, both tables."""
    t2 = run_script("tables.py", "table2", "--standins", tmp_path / "standins", "--size", SIZE, "--limit", 1,
                    "--runs", 1, "-o", tmp_path / "t2", cwd=tmp_path)
    assert t2.returncode == 0, t2.stderr[-3000:]
    assert "Demo rows" in (tmp_path / "t2" / "table2.md").read_text()
    assert "| 3-cas |" in (tmp_path / "t2" / "table2.md").read_text()
    t1 = run_script("tables.py", "table1", "--standins", tmp_path / "standins64", "--limit", 1, "--runs", 1,
                    "-o", tmp_path / "t1", cwd=tmp_path, timeout=900)
    assert t1.returncode == 0, t1.stderr[-3000:]
    md = (tmp_path / "t1" / "table1.md").read_text()
    assert "3-cas LDR + ALDK vs Affine + 3-cas VTN (RCN)" in md and "Demo rows" in md
    report = json.loads((tmp_path / "t1" / "table1.json").read_text())
    assert [m["label"] for m in report["methods"]][-1] == "3-cas LDR + ALDK"
    assert all(len(m["results"]) == 4 for m in report["methods"])


def test_faults_are_one_line(standins, tmp_path):
    liver = _checkpoint(tmp_path / "ok", "LDR", 1, 0, standins["liver"])
    base = ["--liver", standins["liver"], "--brain", standins["brain"], "--limit", 1, "--runs", 1, "-o", tmp_path / "o"]
    assert_clean_error(run_script("tables.py", "table1", *base), "--method")
    assert_clean_error(run_script("tables.py", "table1", "--method", "A", tmp_path / "nope", "-", *base),
                       "nope", "no such checkpoint")
    assert_clean_error(run_script("tables.py", "table1", "--method", "A", "-", "-", *base), "'A'")
    assert_clean_error(run_script("tables.py", "table1", "--method", "A", liver, "-", "--compare", "A", "B", *base),
                       "--compare", "'B'")
    assert_clean_error(run_script("tables.py", "table1", "--method", "A", liver, "-", "--method", "A", liver, "-",
                                  *base), "labels must differ")
    assert_clean_error(run_script("tables.py", "table2", "--row", "x", liver, liver, *base), "--row x")
    assert_clean_error(run_script("tables.py", "table1", "--method", "A", liver, "-", "--liver",
                                  tmp_path / "none.json", "--limit", 1), "none.json")
    # a checkpoint of another image size
    torch.manual_seed(0)
    config = ModelConfig(base_network="LDR", preset="plain", n_cascades=1, channels=4, image_size=(48,) * 3)
    save_checkpoint(str(tmp_path / "big"), build_model(config), config.to_dict(), step=1)
    assert_clean_error(run_script("tables.py", "table1", "--method", "A", tmp_path / "big", "-", *base),
                       "ckpt_1.pt", "differs from the model's")
    assert_clean_error(run_script("tables.py", "table1", "--standins", tmp_path / "s", "--size", 32, "-o",
                                  tmp_path / "o"), "--size 32")
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []
