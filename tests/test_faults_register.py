"""Trustworthy runs of register.py, export.py, benchmark.py, convert_dataset.py and
data_util/export_nifti.py: every bad input or fault ends in one clean error line naming the file or
flag, a non-zero exit, no traceback and nothing half-written (subprocess runs of the real scripts
on tiny volumes)."""
import json
import os
import stat
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scan_data as sd  # noqa: E402
from faults import ROOT, assert_clean_error, full_disk, leftovers, read_only_dir, run_script  # noqa: E402,F401

from data_util.image_io import load_image  # noqa: E402
from network import ModelConfig, build_model, save_checkpoint  # noqa: E402

LITE = dict(base_network="Lite", n_cascades=1, preset="lite", image_size=(32, 32, 32))


def checkpoint(folder, config=None, weights_of=None, extra=None, train_args=None, nan=False):
    """A tiny checkpoint: ``config`` (default Lite 32^3), weights of ``weights_of`` (another config:
    another architecture) or of the config's own model (NaN weights with ``nan``)."""
    config = ModelConfig(**(config or LITE))
    torch.manual_seed(0)
    model = build_model(ModelConfig(**weights_of) if weights_of else config)
    if nan:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
    save_checkpoint(str(folder), model, config.to_dict(), 0, 0, None, train_args or {"dataset": "none"}, extra)
    return str(folder)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults_register")
    pair = sd.make_pair(str(d / "pair"))
    p = pair["paths"]
    points = np.array([[-9.0, 5.0, 4.0], [3.0, 10.0, -10.0], [5.0, -5.0, 2.0]])
    np.savetxt(d / "fixed_pts.csv", points, delimiter=",", header="x,y,z", comments="")
    np.savetxt(d / "moving_pts.csv", points + sd.true_displacement(points.T).T, delimiter=",")
    # the same scans with intensities in 0..250, like volumes exported from an RCN HDF5 dataset
    for side in ("fixed", "moving"):
        vol = load_image(p[side])
        sd.save(str(d / f"{side}_u8.nii.gz"), np.rint(vol.data * 250 / vol.data.max()).astype(np.float32), vol.affine)
    rcn_json = d / "rcn.json"
    rcn_json.write_text(json.dumps({"files": {"/": {"type": "HDF5", "path": "rcn.h5"}}, "image_size": [32] * 3}))
    return {"dir": d, "pair": pair, "p": p, "points": points,
            "ckpt": checkpoint(d / "w" / "lite"),
            "ckpt_u8": checkpoint(d / "w" / "u8", extra={"input_normalisation": "uint8"}),
            "ckpt_old_rcn": checkpoint(d / "w" / "old_rcn", train_args={"dataset": str(rcn_json)}),
            "ckpt_nan": checkpoint(d / "w" / "nan", nan=True),
            "ckpt_other": checkpoint(d / "w" / "other", weights_of=dict(LITE, n_cascades=2))}


def register_args(work, out, *extra, fixed=None, moving=None, ckpt=None):
    return ["-c", ckpt or work["ckpt"], "--fixed", fixed or work["p"]["fixed"], "--moving", moving or work["p"]["moving"],
            "-o", str(out), "--no_figure", *extra]


def run_module(module, *args, cwd=None):
    """``python -m module args`` as a user runs it (the package's relative imports need ``-m``)."""
    import subprocess
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def one_line(proc, *needles):
    """A clean error that is the only line on stderr (no usage block)."""
    last = assert_clean_error(proc, *needles)
    assert proc.stderr.strip().splitlines() == [last], proc.stderr
    return last


def snapshot(folder):
    """``{name: bytes}`` of a folder's files."""
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))}


# ---- register.py: flags ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--window", "nan", "120"], "--window"),
    (["--window", "0", "120"], "--window"),
    (["--window", "290", "inf"], "--window"),
    (["--percentiles", "99", "1"], "--percentiles"),
    (["--percentiles", "nan", "99"], "--percentiles"),
    (["--margin", "-1"], "--margin"),
    (["--spacing", "0"], "--spacing"),
    (["--spacing", "nan"], "--spacing"),
    (["--size", "0", "32", "32"], "--size"),
    (["--size", "30", "30", "30"], "--size 30 30 30"),
    (["-r", "0"], "--rep"),
    (["--threads", "-1"], "--threads"),
    (["--orientation", "XYZ"], "--orientation"),
])
def test_register_numeric_flags_checked(work, tmp_path, flags, needle):
    out = tmp_path / "out"
    proc = run_script("register.py", *register_args(work, out, *flags), cwd=tmp_path)
    one_line(proc, needle)
    assert not out.exists() and leftovers(tmp_path) == []


def test_nan_network_output_is_refused_before_writing(work, tmp_path):
    out = tmp_path / "out"
    proc = run_script("register.py", *register_args(work, out, ckpt=work["ckpt_nan"]), cwd=tmp_path)
    assert_clean_error(proc, "ckpt_0.pt", "NaN")
    assert not out.exists() and leftovers(tmp_path) == []


def test_checkpoint_of_another_architecture(work, tmp_path):
    out = tmp_path / "out"
    proc = run_script("register.py", *register_args(work, out, ckpt=work["ckpt_other"]), cwd=tmp_path)
    assert_clean_error(proc, "ckpt_0.pt", "do not fit")
    assert not out.exists()


# ---- register.py: inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [0.3, 0.9])
@pytest.mark.parametrize("which", ["first", "middle"])
def test_dicom_series_with_a_corrupt_slice(work, tmp_path, cut, which):
    fixed = load_image(work["p"]["fixed"])
    series = tmp_path / "ct"
    sd.write_dicom_series(str(series), np.rint(fixed.data * 2 - 300), fixed.affine)
    names = sorted(os.listdir(series))                    # names are shuffled against positions
    name = names[0] if which == "first" else names[len(names) // 2]
    data = (series / name).read_bytes()
    (series / name).write_bytes(data[:int(len(data) * cut)])
    out = tmp_path / "out"
    proc = run_script("register.py", *register_args(work, out, fixed=str(series)), cwd=tmp_path)
    assert_clean_error(proc, name)
    assert not out.exists()


def test_dicom_folder_with_a_non_dicom_note_still_loads(work, tmp_path):
    fixed = load_image(work["p"]["fixed"])
    series = tmp_path / "ct"
    sd.write_dicom_series(str(series), np.rint(fixed.data * 2 - 300), fixed.affine)
    (series / "README.txt").write_text("scanned on tuesday\n")
    assert load_image(str(series)).shape == fixed.shape


@pytest.mark.parametrize("side, value", [("fixed", 0.0), ("moving", 7.0)])
def test_constant_image_is_refused(work, tmp_path, side, value):
    vol = load_image(work["p"][side])
    path = tmp_path / f"flat_{side}.nii.gz"
    sd.save(str(path), np.full(vol.shape, value, np.float32), vol.affine)
    out = tmp_path / "out"
    proc = run_script("register.py", *register_args(work, out, **{side: str(path)}), cwd=tmp_path)
    assert_clean_error(proc, f"flat_{side}.nii.gz", "constant")
    assert not out.exists()


@pytest.mark.parametrize("row", ["1e30,0,0", "0,-1e30,5", "2000,0,0", "inf,1,1"])
def test_landmark_far_outside_or_not_finite(work, tmp_path, row):
    bad = tmp_path / "fixed_bad.csv"
    bad.write_text(f"x,y,z\n1,2,3\n{row}\n")
    out = tmp_path / "out"
    proc = run_script("register.py", *register_args(work, out, "--fixed_landmarks", str(bad)), cwd=tmp_path)
    assert_clean_error(proc, "fixed_bad.csv", "line 3")
    assert not out.exists()


def test_landmark_voxel_units_far_outside(work, tmp_path):
    bad = tmp_path / "moving_vox.csv"
    bad.write_text("1,2,3\n4,5,1e30\n")
    proc = run_script("register.py", *register_args(work, tmp_path / "out", "--moving_landmarks", str(bad),
                                                     "--landmark_units", "voxel"), cwd=tmp_path)
    assert_clean_error(proc, "moving_vox.csv", "line 2")


def test_missing_landmark_rows_still_mean_missing(work, tmp_path):
    pts = tmp_path / "fixed_missing.csv"
    pts.write_text("x,y,z\n-9,5,4\nnan,nan,nan\n5,-5,2\n")
    out = tmp_path / "out"
    proc = run_script("register.py", *register_args(work, out, "--fixed_landmarks", str(pts),
                                                     "--moving_landmarks", str(work["dir"] / "moving_pts.csv")),
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["landmark_pairs"] == 2


# ---- register.py: intensity normalisation from the checkpoint -------------------------------------

def test_modality_from_checkpoint(work, tmp_path):
    fixed, moving = str(work["dir"] / "fixed_u8.nii.gz"), str(work["dir"] / "moving_u8.nii.gz")
    # today's detection on uint8-range data: MRI percentiles
    old = run_script("register.py", *register_args(work, tmp_path / "a", fixed=fixed, moving=moving), cwd=tmp_path)
    assert old.returncode == 0, old.stderr
    assert "fixed intensities: mri" in old.stdout and "does not record its input normalisation" in old.stdout
    # a checkpoint trained on /255 volumes: uint8, also with an explicit --modality auto
    for extra in ((), ("--modality", "auto")):
        new = run_script("register.py", *register_args(work, tmp_path / "b", *extra, fixed=fixed, moving=moving,
                                                        ckpt=work["ckpt_u8"]), cwd=tmp_path)
        assert new.returncode == 0, new.stderr
        assert "fixed intensities: uint8, [0, 255]" in new.stdout
        assert "moving intensities: uint8, [0, 255]" in new.stdout
        assert "warning" not in new.stderr
        report = json.loads((tmp_path / "b" / "report.json").read_text())
        assert report["normalisation"]["fixed"]["modality"] == "uint8"
    # an explicit other modality wins, with a one-line warning
    explicit = run_script("register.py", *register_args(work, tmp_path / "c", "--modality", "mri", fixed=fixed,
                                                         moving=moving, ckpt=work["ckpt_u8"]), cwd=tmp_path)
    assert explicit.returncode == 0, explicit.stderr
    assert "fixed intensities: mri" in explicit.stdout
    warnings = [line for line in explicit.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "differs" in warnings[0] and "uint8" in warnings[0]


def test_modality_inferred_from_an_old_checkpoints_rcn_dataset(work, tmp_path):
    fixed, moving = str(work["dir"] / "fixed_u8.nii.gz"), str(work["dir"] / "moving_u8.nii.gz")
    proc = run_script("register.py", *register_args(work, tmp_path / "out", fixed=fixed, moving=moving,
                                                     ckpt=work["ckpt_old_rcn"]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "fixed intensities: uint8, [0, 255]" in proc.stdout and "rcn.json" in proc.stdout


# ---- register.py: the output folder as one set -------------------------------------------------------

def test_output_folder_replaced_as_one_set(work, tmp_path):
    out = tmp_path / "out"
    p = work["p"]
    first = run_script("register.py", *register_args(work, out, "--fixed_label", p["fixed_label"],
                                                     "--moving_label", p["moving_label"]), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    old = snapshot(out)
    assert "warped_label.nii.gz" in old and leftovers(tmp_path) == []

    # a failing run (NaN network output, after loading and preprocessing): the old set stays
    proc = run_script("register.py", *register_args(work, out, ckpt=work["ckpt_nan"]), cwd=tmp_path)
    assert_clean_error(proc, "NaN")
    assert snapshot(out) == old and leftovers(tmp_path) == []

    # a run killed (SIGKILL) while it writes its files: the old set stays whole
    killer = tmp_path / "killed_register.py"
    killer.write_text(
        "import os, signal, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import register\n"
        "real, count = register.save_nifti, [0]\n"
        "def save_then_die(*a, **k):\n"
        "    real(*a, **k)\n"
        "    count[0] += 1\n"
        "    if count[0] == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "register.save_nifti = save_then_die\n"
        "sys.exit(register.main(sys.argv[1:]))\n")
    proc = run_script(str(killer), *register_args(work, out, fixed=p["moving"], moving=p["fixed"]), cwd=tmp_path)
    assert proc.returncode == -9
    assert snapshot(out) == old

    # a successful rerun with other inputs: the folder holds exactly the new set, stale temps gone
    proc = run_script("register.py", *register_args(work, out, fixed=p["moving"], moving=p["fixed"]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["fixed"] == p["moving"] and report["moving"] == p["fixed"]
    assert sorted(os.listdir(out)) == sorted(report["files"])
    assert "warped_label.nii.gz" not in report["files"]
    assert leftovers(tmp_path) == []


def test_output_folder_of_other_files_is_refused(work, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    proc = run_script("register.py", *register_args(work, out), cwd=tmp_path)
    assert_clean_error(proc, "results", "report.json")
    assert os.listdir(out) == ["notes.txt"] and leftovers(tmp_path) == []
    # a previous output with a user's file added: not replaced either
    (out / "report.json").write_text(json.dumps({"files": ["warped.nii.gz", "report.json"]}))
    proc = run_script("register.py", *register_args(work, out), cwd=tmp_path)
    assert_clean_error(proc, "notes.txt")
    assert sorted(os.listdir(out)) == ["notes.txt", "report.json"]


def test_register_full_disk(work, full_disk):
    disk = full_disk("64k")
    out = os.path.join(disk, "out")
    proc = run_script("register.py", *register_args(work, out), cwd=disk)
    assert_clean_error(proc, "no space left")
    assert not os.path.exists(out) and leftovers(disk) == []


def test_register_read_only(work, read_only_dir):
    out = os.path.join(read_only_dir, "out")
    proc = run_script("register.py", *register_args(work, out), cwd=ROOT)
    assert_clean_error(proc, "out")
    assert os.listdir(read_only_dir) == []


def test_output_permissions(work, tmp_path):
    old = os.umask(0o022)
    try:
        proc = run_script("register.py", *register_args(work, tmp_path / "out")[:-1], cwd=tmp_path)  # with figure
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o755
    for name in os.listdir(tmp_path / "out"):
        assert stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) == 0o644, name
    assert "figure.png" in os.listdir(tmp_path / "out")


# ---- export.py -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_full_disk(work, full_disk, fmt):
    pytest.importorskip("onnx") if fmt == "onnx" else None
    disk = full_disk("256k")
    extra = ["--onnx_exporter", "legacy"] if fmt == "onnx" else []
    proc = run_script("export.py", "-c", work["ckpt"], "--format", fmt, "-o", os.path.join(disk, "m"), "--no_check",
                      *extra, cwd=disk)
    assert_clean_error(proc, "no space left", os.path.join(disk, "m"))
    assert os.listdir(disk) == []


def test_export_read_only(work, read_only_dir):
    proc = run_script("export.py", "-c", work["ckpt"], "-o", os.path.join(read_only_dir, "m"), "--no_check", cwd=ROOT)
    assert_clean_error(proc, "readonly")
    assert os.listdir(read_only_dir) == []


@pytest.mark.parametrize("flags, needle", [(["--batch", "0"], "--batch"), (["--tolerance", "nan"], "--tolerance"),
                                           (["--tolerance", "-1"], "--tolerance")])
def test_export_flags(work, tmp_path, flags, needle):
    proc = run_script("export.py", "-c", work["ckpt"], "-o", str(tmp_path / "m"), *flags, cwd=tmp_path)
    one_line(proc, needle)
    assert os.listdir(tmp_path) == []


def test_export_other_architecture(work, tmp_path):
    proc = run_script("export.py", "-c", work["ckpt_other"], "-o", str(tmp_path / "m"), cwd=tmp_path)
    assert_clean_error(proc, "do not fit")


def test_export_permissions(work, tmp_path):
    old = os.umask(0o022)
    try:
        proc = run_script("export.py", "-c", work["ckpt"], "-o", str(tmp_path / "m"), "--no_check", cwd=tmp_path)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    for name in ("m.torchscript.pt", "m.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


# ---- benchmark.py -----------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--size", "30", "--models", "lite"], "--size 30"),
    (["--size", "32", "--models", "lite"], "64"),                      # the VTN network-only row
    (["--size", "32", "--models", "lite-affine", "--no_network_rows"], "48"),
    (["--size", "48", "--models", "vtn-1", "--no_network_rows"], "multiple of 64"),
    (["--runs", "0"], "--runs"),
    (["--warmup", "-1"], "--warmup"),
    (["--threads", "-1"], "--threads"),
    (["--gpu_batch", "0"], "--gpu_batch"),
    (["--peak_gflops", "0"], "--peak_gflops"),
    (["--size", "abc"], "--size"),
])
def test_benchmark_flags(tmp_path, flags, needle):
    proc = run_script("benchmark.py", *flags, "--json", str(tmp_path / "b.json"), cwd=tmp_path)
    one_line(proc, needle)
    assert os.listdir(tmp_path) == []


# ---- convert_dataset.py and export_nifti ---------------------------------------------------------------

@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort")
    for n, shape in enumerate([(40, 40, 36), (36, 44, 40)]):
        affine = sd.affine_of("LPS", (1.5, 1.5, 1.5), shape)
        sd.save(str(d / f"s{n}.nii.gz"), (100 * sd.phantom(sd.world_points(affine, shape))).astype(np.float32), affine)
    return d


@pytest.mark.parametrize("flags, needle", [
    (["--size", "0", "32", "32"], "--size"), (["--spacing", "nan"], "--spacing"), (["--spacing", "-1"], "--spacing"),
    (["--val", "2"], "--val"), (["--val", "nan"], "--val"), (["--seed", "-3"], "--seed"),
    (["--window", "inf", "1"], "--window"), (["--margin", "-2"], "--margin"),
])
def test_convert_flags(cohort, tmp_path, flags, needle):
    proc = run_script("convert_dataset.py", "--images", str(cohort), "-o", str(tmp_path / "out" / "c"), *flags,
                      cwd=tmp_path)
    one_line(proc, needle)
    assert os.listdir(tmp_path) == []


def test_convert_full_disk(cohort, full_disk):
    disk = full_disk("64k")
    proc = run_script("convert_dataset.py", "--images", str(cohort), "-o", os.path.join(disk, "c"),
                      "--size", "48", "48", "48", cwd=disk)
    assert_clean_error(proc, "no space left")
    assert os.listdir(disk) == []


def test_convert_read_only_and_permissions(cohort, read_only_dir, tmp_path):
    proc = run_script("convert_dataset.py", "--images", str(cohort), "-o", os.path.join(read_only_dir, "c"),
                      "--size", "32", "32", "32", cwd=tmp_path)
    assert_clean_error(proc, read_only_dir)
    assert os.listdir(read_only_dir) == []
    old = os.umask(0o022)
    try:
        proc = run_script("convert_dataset.py", "--images", str(cohort), "-o", str(tmp_path / "c"),
                          "--size", "32", "32", "32", cwd=tmp_path)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    for name in ("c.h5", "c.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name
    assert leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def rcn(tmp_path_factory):
    from data_util.synthetic import generate
    d = tmp_path_factory.mktemp("rcn")
    generate(str(d / "data"), size=32, n_train=1, n_val=2, seed=0)
    return str(d / "data" / "synthetic.json")


def test_export_nifti_flags_and_full_disk(rcn, full_disk, tmp_path):
    proc = run_module("data_util.export_nifti", "-d", rcn, "-e", "synth/val_000", "-o", str(tmp_path / "n"),
                      "--spacing", "0", cwd=tmp_path)
    assert_clean_error(proc, "--spacing")
    disk = full_disk("64k")
    proc = run_module("data_util.export_nifti", "-d", rcn, "-e", "synth/val_000", "synth/val_001",
                      "-o", os.path.join(disk, "n"), cwd=disk)
    assert_clean_error(proc, "no space left")
    assert leftovers(disk) == [] and os.listdir(os.path.join(disk, "n")) == []
    ok = run_module("data_util.export_nifti", "-d", rcn, "-e", "synth/val_000", "-o", str(tmp_path / "n"),
                    cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "synth_val_000.nii.gz" in os.listdir(tmp_path / "n") and leftovers(tmp_path) == []


def test_export_nifti_bad_entry_leaves_nothing(rcn, tmp_path):
    proc = run_module("data_util.export_nifti", "-d", rcn, "-e", "synth/val_000", "synth/val_999",
                      "-o", str(tmp_path / "n"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not (tmp_path / "n").exists() or os.listdir(tmp_path / "n") == []
