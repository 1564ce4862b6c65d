"""Shipped models: the synth recipe trains at toy size from the manifest's own command, a run is
published as weights/<name>/ with a manifest whose sha256 is checked, register.py runs the
affine stage the model asks for, a model trained on CT pairs gets CT-windowed images, and every
shipped model's manifest numbers are reproduced by eval.py."""
import json
import os
import shlex

import nibabel as nib
import numpy as np
import pytest
import torch

from faults import ROOT, assert_clean_error, leftovers, run_script

from network.checkpoint import TRAINING_STATE, load_checkpoint
from network.pretrained import MANIFEST, benchmarks_by_anatomy, readme_table, verify

SHIPPED = os.path.join(ROOT, "weights", "brain_mri_lite")
SHIPPED_ALL = sorted(n for n in os.listdir(os.path.join(ROOT, "weights"))
                     if os.path.isfile(os.path.join(ROOT, "weights", n, MANIFEST)))
TOY = {"format": "synth", "image_size": [32, 32, 32], "maps": {"shapes": 1.0}, "n_labels": 6, "parts": 2,
       "seed": 1, "val_pairs": 2}


STAGE1 = ("python train.py -b Lite -n 1 --preset lite -g -1 -d datasets/synth_brain.json --steps 7200 "
          "--round 1800 --batch 1 --lr 3e-4 --sim lncc --dice_weight 1 --dice_downsample 2 --augment none "
          "--val_steps 600 --val_pairs 8 --save_steps 300 --output synth_brain_lite --workers 1 --seed 0")
RECIPE = (json.load(open(os.path.join(SHIPPED, MANIFEST)))["recipe"]["commands"]
          if os.path.isfile(os.path.join(SHIPPED, MANIFEST)) else [STAGE1])
TOY_STEPS = 3 * len(RECIPE)           # 3 steps per stage


CARRIED = ("modality", "independent_contrast", "still_pairs")     # dataset keys a stage carries to its toy version


def toy_dataset(command: str) -> dict:
    """The toy dataset for one stage of the recipe: :data:`TOY` with the stage dataset's modality and
    pair mix."""
    words = shlex.split(command)
    for flag in ("-d", "--dataset"):
        if flag in words:
            with open(os.path.join(ROOT, words[words.index(flag) + 1])) as f:
                stage = json.load(f)
            return dict(TOY, **{k: stage[k] for k in CARRIED if k in stage})
    return dict(TOY)


def toy_command(command: str, stage: int, last: bool) -> list:
    """One command of the manifest's recipe at toy size: the toy dataset (``toy<stage>.json``), 3 more
    steps, no validation; a stage that continues from a checkpoint (``-c``) continues from the
    previous toy stage."""
    words = shlex.split(command)
    assert words[:2] == ["python", "train.py"], command
    args, skip = [], False
    for w in words[2:]:
        if skip:
            skip = False
            continue
        if w in ("-d", "--dataset", "--steps", "--round", "--val_steps", "--save_steps", "--output", "--workers",
                 "-c", "--checkpoint"):
            skip = True
            if w in ("-c", "--checkpoint"):
                args += [w, f"weights/toy{stage - 1}/ckpt_{3 * stage}.pt"]
            continue
        args.append(w)
    return args + ["-d", f"toy{stage}.json", "--steps", str(3 * (stage + 1)), "--round", "2", "--val_steps", "0",
                   "--save_steps", "3", "--workers", "0", "--output", "toy" if last else f"toy{stage}"]


def train_toy_recipe(recipe: list, folder) -> None:
    """Every stage of ``recipe`` at toy size in ``folder``; the last one writes ``weights/toy``."""
    for stage, command in enumerate(recipe):
        (folder / f"toy{stage}.json").write_text(json.dumps(toy_dataset(command)))
        r = run_script("train.py", *toy_command(command, stage, stage == len(recipe) - 1), cwd=folder)
        assert r.returncode == 0, (command, r.stderr[-2000:])


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("pretrained")
    train_toy_recipe(RECIPE, d)
    r = run_script("eval.py", "-c", "weights/toy", "--name", "toy", cwd=d)
    assert r.returncode == 0, r.stderr[-2000:]
    return d


def test_recipe_trains_at_toy_size_and_records_itself(toy_run):
    state = load_checkpoint(str(toy_run / "weights" / "toy"))
    assert state["step"] == TOY_STEPS
    assert state["input_normalisation"] == "mri" and state["register_affine"] == "affine"
    assert state["commands"] and state["commands"][0].startswith("python train.py ")
    assert state["train_args"]["dice_weight"] == 1 and state["train_args"]["dice_downsample"] == 2


def test_publish_writes_a_verified_set_and_the_table(toy_run):
    (toy_run / "weights" / "README.md").write_text("Shipped models.\n")
    r = _module("network.pretrained", "publish", "weights/toy", "--name", "toy_model",
                "--eval", "evaluate/toy/toy.json", "--description", "toy shapes", cwd=toy_run)
    assert r.returncode == 0, r.stderr
    folder = toy_run / "weights" / "toy_model"
    manifest = verify(str(folder))
    assert sorted(os.listdir(folder)) == [f"ckpt_{TOY_STEPS}.pt", MANIFEST]
    assert manifest["recipe"]["generator_seed"] == 1 and manifest["recipe"]["steps"] == TOY_STEPS
    assert all(c.startswith("python train.py ") for c in manifest["recipe"]["commands"])
    assert manifest["input"] == {"normalisation": "mri", "affine_stage": "affine", "grid": [32, 32, 32]}
    evaluated = json.load(open(toy_run / "evaluate" / "toy" / "toy.json"))
    assert manifest["validation"]["eval"]["dice"] == round(evaluated["summary"]["dice"]["mean"], 4)
    shipped = torch.load(folder / f"ckpt_{TOY_STEPS}.pt", weights_only=True)
    assert "optimizer" not in shipped and "rng" not in shipped
    table = (toy_run / "weights" / "README.md").read_text()
    assert table.startswith("Shipped models.") and "`toy_model`" in table and "toy shapes" in table
    assert not leftovers(toy_run / "weights")
    # a damaged file is refused in one line
    data = bytearray((folder / f"ckpt_{TOY_STEPS}.pt").read_bytes())
    data[-10] ^= 0xFF
    (folder / f"ckpt_{TOY_STEPS}.pt").write_bytes(bytes(data))
    r = _module("network.pretrained", "verify", "weights/toy_model", cwd=toy_run)
    assert_clean_error(r, f"ckpt_{TOY_STEPS}.pt", "sha256")


def _module(module, *args, cwd):
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _pair(folder):
    rng = np.random.default_rng(0)
    x = np.zeros((40, 40, 40), np.float32)
    x[8:32, 10:30, 9:31] = 100 + 20 * rng.random((24, 20, 22))
    x[14:26, 16:24, 15:25] = 200
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(x, affine), str(folder / "f.nii.gz"))
    nib.save(nib.Nifti1Image(np.roll(x, 2, axis=0), affine), str(folder / "m.nii.gz"))


def test_register_runs_the_affine_stage_the_model_expects(toy_run):
    _pair(toy_run)
    base = ["-c", "weights/toy", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--no_figure", "--affine_iters", "5"]
    r = run_script("register.py", *base, "-o", "out_auto", cwd=toy_run)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "affine stage first" in r.stdout
    report = json.load(open(toy_run / "out_auto" / "report.json"))
    assert report["refine"]["config"]["affine"] == "affine" and sum(report["refine"]["config"]["iters"]) == 0
    assert "network" in report["refine"]["seconds"] and "affine+network" in report["seconds"]
    assert report["normalisation"]["fixed"]["modality"] == "mri"
    r = run_script("register.py", *base[:-2], "--affine", "none", "-o", "out_none", cwd=toy_run)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "affine stage first" not in r.stdout
    assert "refine" not in json.load(open(toy_run / "out_none" / "report.json"))
    # refinement on a finer grid after the affine stage and the network
    r = run_script("register.py", *base, "--refine", "2", "--refine_spacing", "3", "-o", "out_fine", cwd=toy_run)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.load(open(toy_run / "out_fine" / "report.json"))
    assert report["refine"]["model_grid_stage"]["config"]["affine"] == "affine"
    assert report["model_grid"]["shape"] != [32, 32, 32]


def test_ct_training_gives_a_model_fed_ct_windowed_images(tmp_path):
    """Stage 1 on datasets/synth_ct.json at toy size: the checkpoint records CT input, and register.py
    windows both HU images for it without being told."""
    ct_stage = STAGE1.replace("synth_brain.json", "synth_ct.json").replace("synth_brain_lite", "synth_ct_lite")
    train_toy_recipe([ct_stage], tmp_path)
    state = load_checkpoint(str(tmp_path / "weights" / "toy"))
    assert state["input_normalisation"] == "ct" and state["register_affine"] == "affine"
    rng = np.random.default_rng(1)
    hu = np.full((40, 40, 40), -1000.0, np.float32)
    hu[6:34, 8:32, 5:35] = 40 + 10 * rng.standard_normal((28, 24, 30))      # soft tissue
    hu[12:24, 12:22, 10:26] = 180                                            # enhanced organ
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), str(tmp_path / "f.nii.gz"))
    nib.save(nib.Nifti1Image(np.roll(hu, 2, axis=1), affine), str(tmp_path / "m.nii.gz"))
    r = run_script("register.py", "-c", "weights/toy", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--no_figure",
                   "--affine_iters", "5", "-o", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "checkpoint input_normalisation 'ct'" in r.stdout and "affine stage first" in r.stdout
    report = json.load(open(tmp_path / "out" / "report.json"))
    assert {report["normalisation"][s]["modality"] for s in ("fixed", "moving")} == {"ct"}


@pytest.mark.parametrize("name", SHIPPED_ALL)
def test_shipped_model_matches_its_manifest(name, tmp_path):
    folder = os.path.join(ROOT, "weights", name)
    manifest = verify(folder)
    assert manifest["bytes"] < 3_000_000
    expected = manifest["validation"]["eval"]
    r = run_script("eval.py", "-c", folder, "-d", os.path.join(ROOT, manifest["recipe"]["dataset"]),
                   "--name", "shipped", "--out_dir", str(tmp_path), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.load(open(tmp_path / "shipped" / "shipped.json"))["summary"]
    for key in ("dice", "dice_before", "jacc"):
        assert abs(got[key]["mean"] - expected[key]) < 2e-3, (key, got[key]["mean"], expected[key])


def test_synth_run_resumes_exactly(tmp_path):
    (tmp_path / "toy.json").write_text(json.dumps(TOY))
    flags = ["-b", "Lite", "-n", "1", "--preset", "lite", "-g", "-1", "-d", "toy.json", "--batch", "1",
             "--round", "2", "--lr", "3e-4", "--sim", "lncc", "--dice_weight", "1", "--dice_downsample", "2",
             "--augment", "none", "--val_steps", "0", "--workers", "1", "--threads", "1", "--seed", "2"]
    r = run_script("train.py", *flags, "--steps", "4", "--save_steps", "4", "--output", "whole", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script("train.py", *flags, "--steps", "2", "--save_steps", "2", "--output", "parts", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script("train.py", "-c", "weights/parts", "--steps", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    whole = load_checkpoint(str(tmp_path / "weights" / "whole"))
    parts = load_checkpoint(str(tmp_path / "weights" / "parts"))
    assert parts["step"] == 4 and len(parts["commands"]) == 2
    for k, v in whole["model"].items():
        assert torch.equal(v, parts["model"][k]), k


def test_fresh_optimizer_stage_equals_a_start_from_shipped_weights(tmp_path):
    """A fine-tuning stage from a full run checkpoint with --fresh_optimizer trains exactly as one from
    its weights-only (shipped) copy; a plain resume, which keeps Adam's state, does not."""
    (tmp_path / "toy.json").write_text(json.dumps(TOY))
    flags = ["-b", "Lite", "-n", "1", "--preset", "lite", "-g", "-1", "-d", "toy.json", "--batch", "1",
             "--round", "2", "--lr", "3e-4", "--sim", "lncc", "--dice_weight", "1", "--augment", "none",
             "--val_steps", "0", "--workers", "0", "--threads", "1", "--seed", "3", "--save_steps", "2"]
    r = run_script("train.py", *flags, "--steps", "2", "--output", "stage1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    full = torch.load(tmp_path / "weights" / "stage1" / "ckpt_2.pt", weights_only=True)
    assert "optimizer" in full
    torch.save({k: v for k, v in full.items() if k not in TRAINING_STATE}, tmp_path / "shipped.pt")
    more = ["-d", "toy.json", "--steps", "4", "--lr", "1e-4"]
    runs = {"fresh": ["-c", "weights/stage1/ckpt_2.pt", "--fresh_optimizer"], "shipped": ["-c", "shipped.pt"],
            "resumed": ["-c", "weights/stage1/ckpt_2.pt"]}
    for name, start in runs.items():
        r = run_script("train.py", *start, *more, "--output", name, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
    got = {name: load_checkpoint(str(tmp_path / "weights" / name)) for name in runs}
    assert "--fresh_optimizer" in got["fresh"]["commands"][-1] and "optimizer" in got["fresh"]
    assert all(torch.equal(v, got["shipped"]["model"][k]) for k, v in got["fresh"]["model"].items())
    assert not all(torch.equal(v, got["resumed"]["model"][k]) for k, v in got["fresh"]["model"].items())
    # a later resume of the new run restores its own optimiser: the flag is not carried over
    r = run_script("train.py", "-c", "weights/fresh", "--steps", "5", cwd=tmp_path)
    assert r.returncode == 0 and "--fresh_optimizer" not in r.stdout, r.stderr[-2000:]
    r = run_script("train.py", *flags, "--steps", "2", "--output", "x", "--fresh_optimizer", cwd=tmp_path)
    assert_clean_error(r, "--fresh_optimizer", "-c")


def test_readme_table_names_the_benchmark_each_model_was_judged_on():
    def bench(anatomy, contrast, dice):
        rows = {"ants-affine": {"dice": dice - 0.1}, "ants-syn": {"dice": dice + 0.1},
                "network": {"dice": dice, "network_seconds": 0.05}}
        return {"anatomy": anatomy, "contrast": contrast, "methods": rows}
    grouped = benchmarks_by_anatomy([bench("icbm152", "inverted", 0.5), bench("abdomen", "same", 0.8)])
    assert [b["anatomy"] for b in grouped["icbm152"]] == ["icbm152"] and len(grouped["abdomen_phantom"]) == 1
    model = {"name": "ct", "description": "CT", "input": {"grid": [8, 8, 8], "affine_stage": "affine"},
             "n_params": 10, "checkpoint": "ckpt_1.pt", "bytes": 1000,
             "validation": {"eval": {"dice_before": 0.4, "dice": 0.6}, **grouped}}
    row = readme_table([model]).splitlines()[-1]
    assert "CT phantom: 0.700 / 0.900 / 0.800" in row and "| 0.050 |" in row     # the inverted ICBM run is not it
