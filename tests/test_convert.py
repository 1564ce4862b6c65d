"""convert_dataset.py: NIfTI / DICOM cohorts -> RCN layout (HDF5 + JSON), geometry, splits, errors,
and a short training run on the result."""
import json
import os
import shutil
import subprocess
import sys

import h5py
import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scan_data as sd  # noqa: E402

import convert_dataset  # noqa: E402
from data_util import RCNDataset  # noqa: E402
from data_util.image_io import load_image  # noqa: E402
from data_util.preprocess import Normalisation, world_to_voxel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
# id -> (orientation, spacing mm, shape, centre mm)
NIFTI = {"a": ("LAS", (1.2, 0.9, 1.6), (40, 52, 30), (1.0, -2.0, 0.5)),
         "b": ("RPI", (1.0, 1.4, 1.1), (44, 34, 42), (-1.0, 1.0, 0.0)),
         "d": ("PIR", (1.1, 1.3, 1.0), (36, 40, 44), (0.0, 0.0, 1.0))}
DICOM = ("LPS", (0.9, 0.9, 2.0), (44, 40, 20), (0.0, 2.0, -1.0))
LABEL1_CENTRE = np.array([-9.0, 5.0, 4.0])          # scan_data.BLOBS[1]


def run(args, cwd, script="convert_dataset.py"):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script)] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def intensity(world, ct=False):
    """The scans' intensities at world points: MRI-like 100 * phantom, or CT HU."""
    p = sd.phantom(world)
    return -100.0 + 100.0 * p if ct else 100.0 * p


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """src/{a,b,d}.nii.gz + src/c (DICOM CT), labels/{a,b,c}.nii.gz, landmarks/a.csv (mm, header),
    landmarks/b.txt (3 rows); d has neither."""
    d = tmp_path_factory.mktemp("convert")
    for sub in ("src", "labels", "landmarks"):
        (d / sub).mkdir()
    affines = {}
    for name, (orient, spacing, shape, centre) in NIFTI.items():
        affine = sd.affine_of(orient, spacing, shape, centre)
        world = sd.world_points(affine, shape)
        sd.save(str(d / "src" / f"{name}.nii.gz"), intensity(world).astype(np.float32), affine)
        if name != "d":
            sd.save(str(d / "labels" / f"{name}.nii.gz"), sd.phantom_labels(world), affine)
        affines[name] = affine
    orient, spacing, shape, centre = DICOM
    affine = sd.affine_of(orient, spacing, shape, centre)
    sd.write_dicom_series(str(d / "src" / "c"), intensity(sd.world_points(affine, shape), ct=True), affine)
    dicom = load_image(str(d / "src" / "c"))
    sd.save(str(d / "labels" / "c.nii.gz"), sd.phantom_labels(sd.world_points(dicom.affine, dicom.shape)),
            dicom.affine)
    affines["c"] = dicom.affine
    points_a = np.array([LABEL1_CENTRE, [3.0, 10.0, -10.0], [0.0, 0.0, 0.0], [200.0, 0.0, 0.0]])
    np.savetxt(d / "landmarks" / "a.csv", points_a, delimiter=",", header="x,y,z", comments="")
    np.savetxt(d / "landmarks" / "b.txt", points_a[:3] + 1.0)
    (d / "notes.txt").write_text("not a scan\n")
    (d / "src" / "README").write_text("not a scan either\n")

    r = run(["--images", "src", "--labels", "labels", "--landmarks", "landmarks", "-o", "out/cohort",
             "--size", str(SIZE), str(SIZE), str(SIZE)], d)
    assert r.returncode == 0, r.stderr
    return {"dir": d, "affines": affines, "points_a": points_a, "stdout": r.stdout,
            "json": str(d / "out" / "cohort.json"), "h5": str(d / "out" / "cohort.h5")}


def groups(h5_path):
    with h5py.File(h5_path, "r") as f:
        return {key: ({name: f[key][name][()] for name in f[key]}, dict(f[key].attrs)) for key in f}


def test_rcn_dataset_reads_the_conversion(cohort):
    ds = RCNDataset(cohort["json"])
    ds.validate(["1", "2"])
    assert ds.image_size == (SIZE,) * 3 and ds.image_type == "cohort"
    assert ds.segmentation_class_value == {"1": 1, "2": 2}
    train, val = ds.subsets["cohort-train"], ds.subsets["cohort-val"]
    assert not set(train) & set(val) and sorted(train + val) == ["a", "b", "c", "d"]
    assert len(train) == 2 and len(val) == 2                     # 4 scans: two per subset form pairs
    assert ds.schemes == {"1": {"cohort-train": 1.0}, "2": {"cohort-val": 1.0}}
    assert ds.n_points == 4
    for entry in train + val:
        scan = ds.load(entry)
        assert scan["volume"].shape == (SIZE,) * 3
        assert scan["volume"].min() >= 0 and scan["volume"].max() <= 255 and scan["volume"].max() > 150
        if entry == "d":
            assert scan["segmentation"] is None and scan["point"] is None
        else:
            assert set(np.unique(scan["segmentation"]).tolist()) == {0, 1, 2}
    a, b = ds.load("a")["point"], ds.load("b")["point"]
    assert a.shape == b.shape == (4, 3)
    assert (a[3] == -1).all() and (a[:3] >= 0).all()           # (200, 0, 0) mm lies outside the grid
    assert (b[3] == -1).all() and (b[:3] >= 0).all()           # 3 landmarks padded to 4
    with h5py.File(cohort["h5"], "r") as f:
        assert f["a"]["volume"].dtype == np.uint8 and f["a"]["segmentation"].dtype == np.uint8
        assert f["a"]["point"].dtype == np.float32
    config = json.load(open(cohort["json"]))
    assert config["files"] == {"/": {"type": "HDF5", "path": "cohort.h5"}}
    assert config["preprocessing"]["orientation"] == "LPS" and config["preprocessing"]["crop"] == "fov"
    assert len([line for line in cohort["stdout"].splitlines() if line.split(":")[0] in ("a", "b", "c", "d")]) == 4
    assert sorted(os.listdir(os.path.dirname(cohort["json"]))) == ["cohort.h5", "cohort.json"]


def test_geometry_labels_landmarks_and_intensities(cohort):
    data = groups(cohort["h5"])
    for key, (arrays, attrs) in data.items():
        grid = attrs["grid_affine"]
        source = load_image(str(attrs["source"]))
        assert np.allclose(attrs["source_affine"], source.affine) and tuple(attrs["source_shape"]) == source.shape
        assert attrs["orientation"] == "LPS"
        assert np.allclose(np.sign(grid[:3, :3]), np.diag([-1, -1, 1]))      # LPS axes
        # intensities: the stored volume against the analytic scan, inside the source field of view
        world = sd.world_points(grid, (SIZE,) * 3)
        norm = Normalisation(**json.loads(attrs["normalisation"]))
        assert norm.modality == ("ct" if key == "c" else "mri")
        expected = 255 * norm.apply(intensity(world, ct=key == "c"))
        ijk = world_to_voxel(source.affine, world)
        inside = ((ijk >= 0) & (ijk <= np.asarray(source.shape).reshape(3, 1, 1, 1) - 1)).all(0)
        stored = arrays["volume"].astype(float)
        assert inside.mean() > 0.3, key
        assert np.corrcoef(stored[inside], expected[inside])[0, 1] > 0.995, key      # a flip gives < 0.7
        assert np.abs(stored[inside] - expected[inside]).mean() < 2, key
        if "segmentation" not in arrays:
            continue
        # label 1: converted centroid mapped through grid_affine vs the source's world centroid
        label = nib.load(str(attrs["label"]))
        src_ijk = np.argwhere(np.asarray(label.dataobj) == 1)
        src_centre = (src_ijk @ label.affine[:3, :3].T + label.affine[:3, 3]).mean(0)
        seg_ijk = np.argwhere(arrays["segmentation"] == 1).mean(0)
        seg_centre = grid[:3, :3] @ seg_ijk + grid[:3, 3]
        spacing = np.linalg.norm(grid[:3, 0])
        assert np.linalg.norm(seg_centre - src_centre) < spacing, key
        if key == "a":
            point = arrays["point"][0]                              # landmark at label 1's centre
            assert np.allclose(point, world_to_voxel(grid, LABEL1_CENTRE[:, None])[:, 0], atol=1e-4)
            assert np.linalg.norm(point - seg_ijk) < 1.0
            assert np.allclose(grid[:3, :3] @ arrays["point"][1] + grid[:3, 3], cohort["points_a"][1], atol=1e-4)


def test_one_spacing_fits_the_largest_scan(cohort):
    data = groups(cohort["h5"])
    spacings = [np.linalg.norm(attrs["grid_affine"][:3, :3], axis=0) for _, attrs in data.values()]
    assert np.allclose(spacings, spacings[0][0])
    fits = []
    for affine_key, affine in cohort["affines"].items():
        shape = NIFTI[affine_key][2] if affine_key in NIFTI else DICOM[2]
        c = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
        world = c @ affine[:3, :3].T + affine[:3, 3]
        fits.append(np.ptp(world, axis=0).max() / (SIZE - 1))
    config = json.load(open(cohort["json"]))
    assert config["preprocessing"]["spacing_mm"] == pytest.approx(spacings[0][0])
    assert spacings[0][0] == pytest.approx(max(fits))
    # each grid is centred on its scan's field of view
    for key, (_, attrs) in data.items():
        shape = attrs["source_shape"]
        centre = attrs["source_affine"][:3, :3] @ ((shape - 1) / 2) + attrs["source_affine"][:3, 3]
        grid = attrs["grid_affine"]
        assert np.allclose(grid[:3, :3] @ np.full(3, (SIZE - 1) / 2) + grid[:3, 3], centre, atol=1e-6)


def test_csv_list_matches_the_folder(cohort):
    d = cohort["dir"]
    rows = ["id,image,label,landmarks", "a,src/a.nii.gz,labels/a.nii.gz,landmarks/a.csv",
            "b,src/b.nii.gz,labels/b.nii.gz,landmarks/b.txt", "c,src/c,labels/c.nii.gz,", "d,src/d.nii.gz,,"]
    (d / "list.csv").write_text("\n".join(rows) + "\n")
    r = run(["--images", "list.csv", "-o", "csv_out/cohort", "--size", str(SIZE), str(SIZE), str(SIZE)], d)
    assert r.returncode == 0, r.stderr
    folder, listed = groups(cohort["h5"]), groups(str(d / "csv_out" / "cohort.h5"))
    assert sorted(folder) == sorted(listed)
    for key in folder:
        assert sorted(folder[key][0]) == sorted(listed[key][0])
        for name, value in folder[key][0].items():
            assert np.array_equal(value, listed[key][0][name]), (key, name)
        assert sorted(folder[key][1]) == sorted(listed[key][1])
        for name, value in folder[key][1].items():
            assert np.array_equal(value, listed[key][1][name]), (key, name)
    a, b = json.load(open(cohort["json"])), json.load(open(d / "csv_out" / "cohort.json"))
    for config in (a, b):
        for k in ("source", "labels", "landmarks"):
            config["preprocessing"].pop(k)
    assert a == b


def test_options_val_ids_spacing_and_label_crop(cohort, tmp_path):
    d = cohort["dir"]
    copy_scans(cohort, tmp_path / "img", ["a", "b"])
    shutil.copytree(d / "src" / "c", tmp_path / "img" / "c")          # d has no label: left out
    out = tmp_path / "opt" / "crop"
    code = convert_dataset.main(["--images", str(tmp_path / "img"), "--labels", str(d / "labels"), "-o", str(out),
                                 "--size", "16", "16", "16", "--val_ids", "b,c", "--spacing", "2.5",
                                 "--crop", "label", "--margin", "5", "--orientation", "RAS",
                                 "--label_interp", "linear", "--image_type", "phantom"])
    assert code == 0
    config = json.load(open(f"{out}.json"))
    assert config["subsets"] == {"crop-train": ["a"], "crop-val": ["b", "c"]}
    assert config["image_type"] == "phantom" and config["image_size"] == [16, 16, 16]
    assert config["preprocessing"]["spacing_mm"] == 2.5 and config["preprocessing"]["crop"] == "label"
    with h5py.File(f"{out}.h5", "r") as f:
        assert sorted(f) == ["a", "b", "c"]
        for key in f:
            grid = f[key].attrs["grid_affine"]
            assert np.allclose(grid[:3, :3], np.diag([2.5, 2.5, 2.5]))          # RAS axes, 2.5 mm
            # centred on the box of labels 1 and 2 (blobs 1 and 3 of the phantom), +5 mm margin
            centre = grid[:3, :3] @ np.full(3, 7.5) + grid[:3, 3]
            assert np.linalg.norm(centre - np.array([-5.5, 6.0, -2.0])) < 2.0, key
            assert set(np.unique(f[key]["segmentation"][()]).tolist()) == {0, 1, 2}


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run convert_dataset.main in-process; return (exit code, stderr lines)."""
    monkeypatch.setattr(sys, "argv", ["convert_dataset.py"])

    def call(args):
        with pytest.raises(SystemExit) as e:
            convert_dataset.main(["--size", "16", "16", "16"] + args)
        return e.value.code, capsys.readouterr().err.strip().splitlines()
    return call


def copy_scans(cohort, folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(cohort["dir"] / "src" / f"{name}.nii.gz", folder / f"{name}.nii.gz")


def bad_case(case, cohort, tmp):
    """Inputs for one bad-input case: (args, the file the error must name, text in the message)."""
    d = cohort["dir"]
    copy_scans(cohort, tmp / "img", ["a", "b"])
    if case == "label_grid":
        (tmp / "lab").mkdir()
        shutil.copy(d / "labels" / "a.nii.gz", tmp / "lab" / "a.nii.gz")
        shutil.copy(d / "labels" / "a.nii.gz", tmp / "lab" / "b.nii.gz")          # a's grid, not b's
        return ["--images", str(tmp / "img"), "--labels", str(tmp / "lab")], tmp / "lab" / "b.nii.gz", "different grid"
    if case == "csv_missing_image":
        (tmp / "list.csv").write_text("id,image\na,img/a.nii.gz\nx,img/x.nii.gz\n")
        return ["--images", str(tmp / "list.csv")], tmp / "img" / "x.nii.gz", "not found"
    if case == "csv_no_image":
        (tmp / "list.csv").write_text("id,image\na,img/a.nii.gz\nx,\n")
        return ["--images", str(tmp / "list.csv")], tmp / "list.csv", "'x' has no image"
    if case == "two_d":
        sd.save(str(tmp / "img" / "flat.nii.gz"), np.ones((20, 20, 1), np.float32), np.eye(4))
        return ["--images", str(tmp / "img")], tmp / "img" / "flat.nii.gz", "2-D"
    if case == "one_scan":
        os.remove(tmp / "img" / "b.nii.gz")
        return ["--images", str(tmp / "img")], tmp / "img", "at least 2"
    if case == "nan":                                   # found in the second pass, while writing
        nan = np.full((10, 10, 10), 5.0, np.float32)
        nan[3, 3, 3] = np.nan
        sd.save(str(tmp / "img" / "z.nii.gz"), nan, np.eye(4))
        return ["--images", str(tmp / "img")], tmp / "img" / "z.nii.gz", "NaN"
    if case == "duplicate_id":
        shutil.copy(tmp / "img" / "a.nii.gz", tmp / "img" / "a.nii")
        return ["--images", str(tmp / "img")], tmp / "img" / "a.nii", "unique"
    if case == "orphan_label":
        (tmp / "lab").mkdir()
        shutil.copy(d / "labels" / "a.nii.gz", tmp / "lab" / "a_seg.nii.gz")
        return ["--images", str(tmp / "img"), "--labels", str(tmp / "lab")], tmp / "lab" / "a_seg.nii.gz", "no image"
    if case == "landmark_row":
        (tmp / "lm").mkdir()
        (tmp / "lm" / "a.csv").write_text("x,y,z\n1,2,3\n4,5\n")
        return ["--images", str(tmp / "img"), "--landmarks", str(tmp / "lm")], tmp / "lm" / "a.csv", "line 3"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["label_grid", "csv_missing_image", "csv_no_image", "two_d", "one_scan", "nan",
                                  "duplicate_id", "orphan_label", "landmark_row"])
def test_bad_inputs_fail_with_one_line_and_write_nothing(cohort, tmp_path, cli, case):
    args, named, text = bad_case(case, cohort, tmp_path)
    out = tmp_path / "out"
    out.mkdir()                                         # an existing folder: it must stay empty
    code, lines = cli(args + ["-o", str(out / "cohort")])
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("convert_dataset.py: error:"), lines
    assert str(named) in lines[0] and text in lines[0], lines
    assert os.listdir(out) == []
    code, lines = cli(args + ["-o", str(tmp_path / "new" / "cohort")])
    assert code == 2 and not (tmp_path / "new").exists()        # a folder it made is removed again


@pytest.mark.parametrize("args, text", [(["--size", "4", "16", "16"], "--size"),
                                        (["--orientation", "LPX"], "--orientation"),
                                        (["--val", "1.5"], "--val"),
                                        (["--val_ids", "a,zz"], "zz")])
def test_bad_options_fail_with_one_line(cohort, tmp_path, cli, args, text):
    copy_scans(cohort, tmp_path / "img", ["a", "b"])
    code, lines = cli(["--images", str(tmp_path / "img"), "-o", str(tmp_path / "out" / "x")] + args)
    assert code == 2 and len(lines) == 1 and text in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_train_runs_on_the_conversion(cohort):
    r = run(["-b", "Lite", "--preset", "lite", "-n", "1", "-g", "-1", "--steps", "2", "--batch", "1",
             "-d", cohort["json"], "--val_steps", "2", "--val_pairs", "1", "--workers", "0", "--output", "conv",
             "--threads", "1"], cohort["dir"], script="train.py")
    assert r.returncode == 0, r.stderr
    assert (cohort["dir"] / "weights" / "conv" / "ckpt_2.pt").is_file()
