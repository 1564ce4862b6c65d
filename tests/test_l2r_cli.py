"""End-to-end Learn2Reg recipe: train.py with every recipe flag on synthetic hippocampus data, eval.py's
challenge scoring and submission files (read back and applied), and the recipe's bad-input errors."""
import json
import os

import numpy as np
import pytest
import torch

from data_util.formats import open_dataset
from data_util.submission import apply_displacement, read_displacement
from data_util.synthetic_hippocampus import generate
from network import build_model, load_checkpoint
from network.inference import prepare, register
from network.metrics import warp_labels_nearest
from test_cli import ROOT, assert_one_line_error, run

RECIPE = ["-b", "SpatialGradient", "--channels", "1", "--sim", "lncc", "--mask_overlap", "--regulariser",
          "gradient_l1", "--reg_weight", "0.1", "--dice_weight", "1", "--symmetric", "--deep_supervision",
          "--augment", "affine", "--lr_schedule", "constant"]


@pytest.fixture(scope="module")
def l2r(tmp_path_factory):
    d = tmp_path_factory.mktemp("l2r")
    generate(str(d / "data"), n_train=4, n_val=2, shape=(36, 44, 34), crop=(32, 32, 32), seed=3)
    r = run([os.path.join(ROOT, "train.py"), "-g", "-1", "-d", "data/hippocampus.json", "--steps", "2",
             "--batch", "2", "--output", "recipe", "--val_steps", "2", "--workers", "0"] + RECIPE, d)
    assert r.returncode == 0, r.stderr
    assert "L2R dice" in r.stdout
    return d


def test_recipe_checkpoint_describes_itself(l2r):
    state = load_checkpoint(str(l2r / "weights" / "recipe"))
    cfg = state["model_config"]
    assert cfg["base_network"] == "SpatialGradient" and cfg["deep_supervision"] and cfg["channels"] == 1
    assert cfg["preset"] == "plain" and cfg["image_size"] == [32, 32, 32]
    args = state["train_args"]
    assert args["symmetric"] and args["dice_weight"] == 1 and args["regulariser"] == "gradient_l1"


def test_eval_scores_the_challenge_way_and_writes_a_submission(l2r):
    r = run([os.path.join(ROOT, "eval.py"), "-c", "weights/recipe", "--workers", "0", "--submission", "subm",
             "--name", "recipe"], l2r)
    assert r.returncode == 0, r.stderr
    assert "Dice30" in r.stdout and "HD95 (mm)" in r.stdout
    report = json.loads((l2r / "evaluate" / "recipe" / "recipe.json").read_text())
    l2r_scores = report["learn2reg"]
    for key in ("l2r_dice", "l2r_dice_1", "l2r_dice_2", "l2r_hd95", "l2r_hd95_mm", "l2r_sdlogj_l2r", "l2r_fold_pct"):
        assert l2r_scores[key]["n"] == 2 and np.isfinite(l2r_scores[key]["mean"]), key
    # the summary is the per-pair rows' statistics: mean, and Dice30 = the 30th percentile (Learn2Reg)
    per_pair = [row["l2r_dice"] for row in report["pairs"]]
    assert len(per_pair) == 2 and all(np.isfinite(per_pair))
    assert l2r_scores["l2r_dice"]["mean"] == pytest.approx(np.mean(per_pair), abs=1e-9)
    assert l2r_scores["l2r_dice"]["p30"] == pytest.approx(np.quantile(per_pair, 0.3), abs=1e-9)
    txt = (l2r / "evaluate" / "recipe" / "recipe.txt").read_text()
    assert "Learn2Reg scores" in txt and "Dice30" in txt

    # submission: one float16 file per pair on the ORIGINAL fixed grid (36, 44, 34), challenge axis order
    dataset = open_dataset(str(l2r / "data" / "hippocampus.json"), crop=(32, 32, 32))
    pairs = dataset.pairs("2")
    files = sorted(os.listdir(l2r / "subm" / "task_04"))
    assert files == sorted(f"disp_{int(f):04d}_{int(m):04d}.npz" for f, m in pairs)
    assert not [n for n in os.listdir(l2r / "subm") if n.startswith(".")]          # staging folder gone

    # read back and apply to the original moving labels: reproduces our warp of the cropped pair
    model = prepare(build_model(load_checkpoint(str(l2r / "weights" / "recipe"))["model_config"]))
    model.load_state_dict(load_checkpoint(str(l2r / "weights" / "recipe"))["model"])
    fixed_id, moving_id = pairs[0]
    fixed, moving = dataset.load(fixed_id), dataset.load(moving_id)
    with torch.inference_mode():
        flow = register(model, torch.from_numpy(fixed["volume"])[None, None],
                        torch.from_numpy(moving["volume"])[None, None])["flow"]
    name = f"disp_{int(fixed_id):04d}_{int(moving_id):04d}.npz"
    raw = np.load(l2r / "subm" / "task_04" / name)
    assert raw["arr_0"].dtype == np.float16 and raw["arr_0"].shape == (3, 36, 44, 34)
    disp = read_displacement(str(l2r / "subm" / "task_04" / name))
    o_f, o_m = np.array(fixed["offset"]), np.array(moving["offset"])
    window = tuple(slice(o, o + 32) for o in o_f)
    expected = flow[0].numpy() + (o_m - o_f).reshape(3, 1, 1, 1)
    assert np.abs(disp[(slice(None),) + window] - expected).max() < 2e-2               # float16 rounding
    import nibabel as nib
    moving_label = np.asarray(nib.load(dataset.label_path(moving_id)).dataobj)
    applied = apply_displacement(moving_label, disp, order=0)[window]
    ours = warp_labels_nearest(torch.from_numpy(moving["segmentation"])[None, None], flow)[0, 0].numpy()
    # equal wherever our sample point stays inside the moving crop (outside it the crop has no data)
    coords = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij")) + flow[0].numpy()
    inside = ((coords >= 0) & (coords <= 31)).all(0)
    assert (applied[inside] == ours[inside]).mean() > 0.99


def test_recipe_bad_inputs_give_one_line(l2r):
    base = [os.path.join(ROOT, "train.py"), "-g", "-1", "-d", "data/hippocampus.json", "--steps", "1",
            "--workers", "0", "--val_steps", "0"]
    r = run(base + ["-b", "LDR", "--deep_supervision", "--output", "bad1"], l2r)
    assert_one_line_error(r, "deep supervision", "SpatialGradient")
    r = run(base + ["-b", "SpatialGradient", "--crop", "40", "40", "40", "--output", "bad2"], l2r)
    assert_one_line_error(r, "hippocampus.json", "divisible by 16")
    r = run(base + ["-b", "SpatialGradient", "--crop", "16", "16", "16", "--output", "bad3"], l2r)
    assert_one_line_error(r, "hippocampus.json", ">= 32")
    assert not (l2r / "weights" / "bad2").exists() and not (l2r / "weights" / "bad3").exists()
    pairs = l2r / "data" / "pairs_val.csv"
    saved = pairs.read_text()
    try:
        pairs.write_text("fixed, moving\n999, 998\n")
        r = run([os.path.join(ROOT, "eval.py"), "-c", "weights/recipe", "--workers", "0"], l2r)
        assert_one_line_error(r, "999")
    finally:
        pairs.write_text(saved)


def test_recipe_ablation_benchmark_runs_at_toy_size(tmp_path):
    r = run([os.path.join(ROOT, "experiments", "l2r_recipe_ablation.py"), "--work", str(tmp_path), "--train", "4",
             "--val", "2", "--shape", "34", "34", "34", "--steps", "2", "--batch", "2", "--channels", "1",
             "--runs", "baseline,dice_sym"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / "l2r_recipe_ablation.md").read_text()
    assert "| unregistered |" in table and "+ Dice + symmetric" in table and "Dice30" in table
    report = json.loads((tmp_path / "l2r_recipe_ablation.json").read_text())
    assert set(report["results"]) == {"baseline", "dice_sym"}
