"""register.py and the scan I/O under it: world geometry on oriented, anisotropic NIfTI pairs with a
known deformation, DICOM series round trips, and one-line errors for bad inputs."""
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scan_data as sd  # noqa: E402

import register  # noqa: E402
from data_util.image_io import ImageError, load_image, read_landmarks  # noqa: E402
from data_util.preprocess import Grid, model_grid, resample  # noqa: E402
from data_util.world_transform import WorldDisplacement  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, os.path.join(ROOT, "register.py")] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from network import ModelConfig, build_model, save_checkpoint
    d = tmp_path_factory.mktemp("register")
    pair = sd.make_pair(str(d / "pair"))
    config = ModelConfig(base_network="Lite", n_cascades=1, preset="lite", image_size=(32, 32, 32))
    save_checkpoint(str(d / "weights" / "lite32"), build_model(config), config.to_dict(), 0, 0, None,
                    {"dataset": "none"})
    fixed = load_image(pair["paths"]["fixed"])
    points = np.array([[-9.0, 5.0, 4.0], [3.0, 10.0, -10.0], [5.0, -5.0, 2.0], [0.0, 0.0, 0.0]])
    np.savetxt(d / "fixed_pts.csv", points, delimiter=",", header="x,y,z", comments="")
    np.savetxt(d / "moving_pts.csv", points + sd.true_displacement(points.T).T, delimiter=",")
    return {"dir": d, "pair": pair, "fixed": fixed, "points": points}


def oracle(displacement):
    """A stand-in network whose flow on the model grid is ``displacement`` (world mm, a function of
    world points ``(3, ...)``), to test the geometry without a trained model."""
    def run_network(model, prep, device, rep=None):
        grid = prep["grid"]
        world = sd.world_points(grid.affine, grid.shape)
        flow = np.linalg.solve(grid.affine[:3, :3], displacement(world).reshape(3, -1)).reshape(3, *grid.shape)
        return flow.astype(np.float32), prep["moving"]
    return run_network


def register_with_oracle(work, monkeypatch, out, displacement, extra=()):
    monkeypatch.setattr(register, "run_network", oracle(displacement))
    p = work["pair"]["paths"]
    args = ["-c", str(work["dir"] / "weights" / "lite32"), "--fixed", p["fixed"], "--moving", p["moving"],
            "--fixed_label", p["fixed_label"], "--moving_label", p["moving_label"], "-o", str(out),
            "--fixed_landmarks", str(work["dir"] / "fixed_pts.csv"),
            "--moving_landmarks", str(work["dir"] / "moving_pts.csv"), "--no_figure", *extra]
    assert register.main(args) == 0
    return json.loads((out / "report.json").read_text())


def test_outputs_on_fixed_grid_with_its_header(work, monkeypatch, tmp_path):
    register_with_oracle(work, monkeypatch, tmp_path, sd.true_displacement)
    fixed = nib.load(work["pair"]["paths"]["fixed"])
    for name in ("warped", "warped_label", "jacobian"):
        img = nib.load(tmp_path / f"{name}.nii.gz")
        assert img.shape == fixed.shape
        np.testing.assert_allclose(img.affine, fixed.affine, atol=1e-5)
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 2
        assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    disp = nib.load(tmp_path / "displacement.nii.gz")
    assert disp.shape == (*fixed.shape, 1, 3)
    assert disp.header.get_intent()[0] == "vector"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_known_deformation_is_reproduced(work, monkeypatch, tmp_path):
    """With the true field as the network output, the warped moving image is the fixed image, the
    written field is the true one, labels overlap and landmarks land on their partners."""
    report = register_with_oracle(work, monkeypatch, tmp_path, sd.true_displacement)
    fixed = work["fixed"]
    world = sd.world_points(fixed.affine, fixed.shape)
    disp = nib.load(tmp_path / "displacement.nii.gz").get_fdata()[:, :, :, 0, :]
    truth = np.moveaxis(sd.true_displacement(world), 0, -1)
    inside = np.ones(fixed.shape, bool)
    inside[:3], inside[-3:], inside[:, :3], inside[:, -3:], inside[:, :, :3], inside[:, :, -3:] = (False,) * 6
    assert np.abs(disp - truth)[inside].max() < 0.05                       # mm, model grid interpolation
    warped = nib.load(tmp_path / "warped.nii.gz").get_fdata()
    err = np.abs(warped - fixed.data)[inside]
    assert err.mean() < 0.01 * fixed.data.max() and np.percentile(err, 99) < 0.08 * fixed.data.max()
    assert report["dice_after"] > 0.9 > report["dice_before"]
    assert report["landmark_error_after_mm"] < 0.05 < 2.0 < report["landmark_error_before_mm"]
    back = np.loadtxt(tmp_path / "moving_landmarks_in_fixed.csv", delimiter=",", skiprows=1)[:, 4:7]
    np.testing.assert_allclose(back, work["points"], atol=0.05)


def test_written_field_matches_an_independent_resampler(work, monkeypatch, tmp_path):
    """scipy applied to the written displacement (through both headers) reproduces warped.nii.gz."""
    register_with_oracle(work, monkeypatch, tmp_path, sd.true_displacement)
    fixed_img = nib.load(work["pair"]["paths"]["fixed"])
    moving_img = nib.load(work["pair"]["paths"]["moving"])
    disp = nib.load(tmp_path / "displacement.nii.gz").get_fdata()[:, :, :, 0, :]
    ijk = np.moveaxis(np.indices(fixed_img.shape), 0, -1).astype(float)
    world = nib.affines.apply_affine(fixed_img.affine, ijk) + disp
    moving_ijk = nib.affines.apply_affine(np.linalg.inv(moving_img.affine), world)
    moving = moving_img.get_fdata()
    expected = ndimage.map_coordinates(moving, np.moveaxis(moving_ijk, -1, 0), order=1, mode="constant",
                                       cval=moving.min())
    warped = nib.load(tmp_path / "warped.nii.gz").get_fdata()
    np.testing.assert_allclose(warped, expected, atol=1e-3 * moving.max())


def test_jacobian_of_a_known_affine(work, monkeypatch, tmp_path):
    A = np.array([[1.1, 0.05, 0.0], [0.0, 0.9, 0.1], [0.02, 0.0, 1.05]])
    b = np.array([1.0, -2.0, 0.5])
    affine_disp = lambda w: np.einsum("ij,j...->i...", A - np.eye(3), w) + b.reshape(3, *[1] * (w.ndim - 1))
    report = register_with_oracle(work, monkeypatch, tmp_path, affine_disp)
    jac = nib.load(tmp_path / "jacobian.nii.gz").get_fdata()
    np.testing.assert_allclose(jac, np.linalg.det(A), rtol=1e-4)
    assert report["folding_pct"] == 0.0
    # the written field itself: finite differences in world coordinates give the same determinant
    fixed = work["fixed"]
    disp = nib.load(tmp_path / "displacement.nii.gz").get_fdata()[:, :, :, 0, :]
    grads = np.stack([np.stack(np.gradient(disp[..., c]), -1) for c in range(3)], -2)   # d d_c / d ijk
    J = np.eye(3) + grads @ np.linalg.inv(fixed.affine[:3, :3])
    np.testing.assert_allclose(np.linalg.det(J)[2:-2, 2:-2, 2:-2], np.linalg.det(A), rtol=1e-3)


def test_world_displacement_inverts_points():
    grid = Grid((16, 16, 16), sd.affine_of("LPS", (2.0, 2.0, 2.0), (16, 16, 16)))
    world = sd.world_points(grid.affine, grid.shape)
    flow = np.linalg.solve(grid.affine[:3, :3], sd.true_displacement(world).reshape(3, -1)).reshape(3, 16, 16, 16)
    disp = WorldDisplacement(flow, grid, translation=(1.0, 0.0, -1.0))
    x = np.array([[1.0, 2.0, 3.0], [-4.0, 0.0, 5.0]])
    y = disp.map_points(x)
    np.testing.assert_allclose(y - x, sd.true_displacement(x.T).T + [1, 0, -1], atol=0.05)
    np.testing.assert_allclose(disp.invert_points(y), x, atol=1e-4)


def test_model_grid_covers_the_field_of_view():
    affine = sd.affine_of("LAS", (1.2, 0.9, 1.6), (40, 52, 30), center=(1, -2, 0.5))
    from data_util.image_io import Volume
    grid = model_grid(Volume(np.zeros((40, 52, 30), np.float32), affine, "x"), (32, 32, 32))
    assert nib.aff2axcodes(grid.affine) == ("L", "P", "S")
    np.testing.assert_allclose(grid.spacing, 46.8 / 31)                  # 39 * 1.2 mm is the widest extent
    np.testing.assert_allclose(grid.affine[:3, :3] @ [15.5, 15.5, 15.5] + grid.affine[:3, 3], [1, -2, 0.5])


def test_resample_reorients_exactly():
    """An LAS volume resampled on the LPS grid with the same spacing is a flip of axis 1."""
    from data_util.image_io import Volume
    data = np.random.default_rng(0).random((8, 10, 12)).astype(np.float32)
    vol = Volume(data, sd.affine_of("LAS", (2, 2, 2), data.shape), "x")
    grid = Grid(data.shape, sd.affine_of("LPS", (2, 2, 2), data.shape))
    np.testing.assert_allclose(resample(vol, grid), data[:, ::-1, :], atol=1e-6)


def test_dicom_series_round_trip(tmp_path):
    th = 0.3
    R = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = R @ np.diag([0.8, 0.7, 2.5])
    affine[:3, 3] = [10, -20, 30]
    data = np.random.default_rng(0).integers(-1000, 1500, (20, 24, 6)).astype(np.float64)
    sd.write_dicom_series(str(tmp_path / "series"), data, affine)
    vol = load_image(str(tmp_path / "series"))
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    assert vol.meta["modality"] == "CT"
    one_file = load_image(str(tmp_path / "series" / sorted(os.listdir(tmp_path / "series"))[0]))
    np.testing.assert_array_equal(one_file.data, data)


def test_register_dicom_ct_fixed_on_its_own_grid(work, tmp_path):
    """A CT DICOM series as the fixed image: outputs on its grid; the CT window is used."""
    fixed = work["fixed"]
    sd.write_dicom_series(str(tmp_path / "ct"), np.rint(fixed.data * 2 - 300), fixed.affine)
    r = run(["-c", str(work["dir"] / "weights" / "lite32"), "--fixed", "ct",
             "--moving", work["pair"]["paths"]["moving"], "-o", "out"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "fixed intensities: ct, [-25, 265]" in r.stdout
    # slices are ordered along the DICOM normal (row x column direction), here -z: the series' k
    # axis runs opposite to the NIfTI's, on the same world lattice
    series = load_image(str(tmp_path / "ct"))
    np.testing.assert_array_equal(series.data, np.rint(fixed.data * 2 - 300)[:, :, ::-1])
    flipped = fixed.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, fixed.shape[2] - 1], [0, 0, 0, 1]])
    np.testing.assert_allclose(series.affine, flipped, atol=1e-4)
    warped = nib.load(tmp_path / "out" / "warped.nii.gz")
    assert warped.shape == fixed.shape
    np.testing.assert_allclose(warped.affine, series.affine, atol=1e-4)
    from matplotlib.image import imread
    assert imread(tmp_path / "out" / "figure.png").shape[0] > 100


def test_landmark_files(tmp_path):
    from data_util.image_io import Volume
    (tmp_path / "a.txt").write_text("i j k\n1 2 3\n4,5,6\n")
    vol = Volume(np.zeros((8, 8, 8), np.float32), sd.affine_of("LAS", (2, 1, 3), (8, 8, 8)), "v")
    pts = read_landmarks(str(tmp_path / "a.txt"), vol, units="voxel")
    np.testing.assert_allclose(pts, nib.affines.apply_affine(vol.affine, [[1, 2, 3], [4, 5, 6]]))
    (tmp_path / "b.txt").write_text("1 2\n")
    with pytest.raises(ImageError, match="b.txt: line 1"):
        read_landmarks(str(tmp_path / "b.txt"))


def _write(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), str(path))


@pytest.mark.parametrize("case, message", [
    ("missing", "moving.nii.gz: file not found"),
    ("garbage", "bad.nii.gz: not a readable NIfTI file"),
    ("flat", "flat.nii.gz: a 2-D image"),
    ("nan", "nan.nii.gz: contains 5 NaN/Inf voxels"),
    ("label_grid", "label.nii.gz: label map is on a different grid"),
    ("label_values", "soft.nii.gz: not a label map"),
    ("landmarks", "moving_pts.csv: 3 landmarks, but"),
    ("two_series", "holds 2 DICOM series"),
    ("checkpoint", "ckpt_0.pt"),
    ("notimage", "notes.txt: neither NIfTI"),
])
def test_bad_inputs_fail_with_one_line(work, tmp_path, case, message):
    p = work["pair"]["paths"]
    ckpt = str(work["dir"] / "weights" / "lite32")
    args = {"--fixed": p["fixed"], "--moving": p["moving"]}
    if case == "missing":
        args["--moving"] = str(tmp_path / "moving.nii.gz")
    elif case == "garbage":
        (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
        args["--moving"] = str(tmp_path / "bad.nii.gz")
    elif case == "flat":
        _write(tmp_path / "flat.nii.gz", np.zeros((16, 16), np.float32))
        args["--fixed"] = str(tmp_path / "flat.nii.gz")
    elif case == "nan":
        data = np.ones((16, 16, 16), np.float32)
        data[0, 0, :5] = np.nan
        _write(tmp_path / "nan.nii.gz", data)
        args["--moving"] = str(tmp_path / "nan.nii.gz")
    elif case == "label_grid":
        _write(tmp_path / "label.nii.gz", np.zeros((40, 52, 31), np.int16), work["pair"]["fixed_affine"])
        args["--fixed_label"] = str(tmp_path / "label.nii.gz")
    elif case == "label_values":
        _write(tmp_path / "soft.nii.gz", np.full((40, 52, 30), 0.5, np.float32), work["pair"]["fixed_affine"])
        args["--fixed_label"] = str(tmp_path / "soft.nii.gz")
    elif case == "landmarks":
        np.savetxt(tmp_path / "moving_pts.csv", work["points"][:3], delimiter=",")
        args["--fixed_landmarks"] = str(work["dir"] / "fixed_pts.csv")
        args["--moving_landmarks"] = str(tmp_path / "moving_pts.csv")
    elif case == "two_series":
        data = np.zeros((8, 8, 3))
        sd.write_dicom_series(str(tmp_path / "a"), data, np.eye(4))
        sd.write_dicom_series(str(tmp_path / "b"), data, np.eye(4))
        os.makedirs(tmp_path / "both")
        for folder in ("a", "b"):
            for name in os.listdir(tmp_path / folder):
                os.replace(tmp_path / folder / name, tmp_path / "both" / f"{folder}_{name}")
        args["--fixed"] = str(tmp_path / "both")
    elif case == "checkpoint":
        os.makedirs(tmp_path / "w")
        data = (work["dir"] / "weights" / "lite32" / "ckpt_0.pt").read_bytes()
        (tmp_path / "w" / "ckpt_0.pt").write_bytes(data[: len(data) // 2])
        ckpt = str(tmp_path / "w")
    elif case == "notimage":
        (tmp_path / "notes.txt").write_text("hello")
        args["--moving"] = str(tmp_path / "notes.txt")
    argv = ["-c", ckpt, "-o", "out"] + [x for kv in args.items() for x in kv]
    r = run(argv, tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("register.py: error:") and message in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_missing_landmarks_stay_in_place(tmp_path):
    (tmp_path / "m.csv").write_text("x,y,z\n1,2,3\nnan,nan,nan\n4,5,6\n")
    pts = read_landmarks(str(tmp_path / "m.csv"))
    assert pts.shape == (3, 3) and np.isnan(pts[1]).all() and np.isfinite(pts[[0, 2]]).all()
    (tmp_path / "bad.csv").write_text("1,nan,3\n")
    with pytest.raises(ImageError, match="bad.csv: line 1"):
        read_landmarks(str(tmp_path / "bad.csv"))


def test_export_nifti_writes_registrable_scans(tmp_path):
    """RCN HDF5 entries -> NIfTI (LPS grid of --spacing mm), labels and landmarks in world mm."""
    from data_util.dataset import RCNDataset
    from data_util.export_nifti import main as export_main
    from data_util.synthetic import generate
    generate(str(tmp_path / "data"), size=32, n_train=1, n_val=2, seed=0)
    json_path = str(tmp_path / "data" / "synthetic.json")
    assert export_main(["-d", json_path, "-e", "synth/val_000", "-o", str(tmp_path / "nii"), "--spacing", "1.5"]) == 0
    img = nib.load(tmp_path / "nii" / "synth_val_000.nii.gz")
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S") and np.allclose(img.header.get_zooms(), 1.5)
    scan = RCNDataset(json_path).load("synth/val_000")
    np.testing.assert_array_equal(img.get_fdata(), scan["volume"])
    np.testing.assert_array_equal(nib.load(tmp_path / "nii" / "synth_val_000_label.nii.gz").get_fdata(),
                                  scan["segmentation"])
    pts = read_landmarks(str(tmp_path / "nii" / "synth_val_000_landmarks.csv"))
    present = ~(scan["point"] == -1).all(1)
    np.testing.assert_allclose(pts[present], nib.affines.apply_affine(img.affine, scan["point"][present]), atol=1e-3)
    assert np.isnan(pts[~present]).all()
    assert export_main(["-d", json_path, "-e", "synth/val_999", "-o", str(tmp_path / "nii")]) == 2


def test_align_com_recovers_a_world_shift(work, monkeypatch, tmp_path):
    """A moving scan whose header puts it 25 mm away: --align com finds the shift, and with a zero
    network flow the warped image is the moving one moved back."""
    moving = load_image(work["pair"]["paths"]["moving"])
    shifted = moving.affine.copy()
    shifted[:3, 3] += [25.0, -10.0, 5.0]
    sd.save(str(tmp_path / "shifted.nii.gz"), moving.data, shifted)
    monkeypatch.setattr(register, "run_network", oracle(lambda w: np.zeros_like(w)))
    p = work["pair"]["paths"]
    out = tmp_path / "out"
    assert register.main(["-c", str(work["dir"] / "weights" / "lite32"), "--fixed", p["moving"],
                          "--moving", str(tmp_path / "shifted.nii.gz"), "-o", str(out), "--align", "com",
                          "--no_figure"]) == 0
    report = json.loads((out / "report.json").read_text())
    np.testing.assert_allclose(report["initial_translation_mm"], [25.0, -10.0, 5.0], atol=0.5)
    warped = nib.load(out / "warped.nii.gz").get_fdata()
    inner = (slice(5, -5),) * 3
    assert np.abs(warped - moving.data)[inner].mean() < 0.02 * moving.data.max()


def test_crop_label_centres_the_grid_on_the_label(work, monkeypatch, tmp_path):
    monkeypatch.setattr(register, "run_network", oracle(lambda w: np.zeros_like(w)))
    p = work["pair"]["paths"]
    assert register.main(["-c", str(work["dir"] / "weights" / "lite32"), "--fixed", p["fixed"], "--moving",
                          p["moving"], "--fixed_label", p["fixed_label"], "-o", str(tmp_path), "--crop", "label",
                          "--margin", "5", "--no_figure"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    grid = Grid(tuple(report["model_grid"]["shape"]), np.array(report["model_grid"]["affine"]))
    label = load_image(p["fixed_label"], label=True)
    world = nib.affines.apply_affine(label.affine, np.argwhere(label.data > 0))
    centre = nib.affines.apply_affine(grid.affine, (np.array(grid.shape) - 1) / 2)
    np.testing.assert_allclose(centre, (world.min(0) + world.max(0)) / 2, atol=1e-6)
    extent = world.max(0) - world.min(0) + 10
    assert np.isclose(grid.spacing[0] * 31, extent.max())
