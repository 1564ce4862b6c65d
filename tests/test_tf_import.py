"""TF-1 checkpoint import (network/tf_import.py, import_tf.py) checked against TensorFlow itself.

Each case builds the published networks' variables with their published names and shapes in a TF-1
graph (tests/tf_reference.py), saves a TF-1 checkpoint (with Adam slots and critic variables, as a
training run leaves them), imports it without TensorFlow, and compares every stem's forward pass
with TensorFlow's on the same input: max |ours - TF| <= 1e-5 x max |TF| (float32 throughout).
Needs the ``tf-test`` extra (``pip install -e ".[tf-test]"``); skipped without it.
The VTN cases are 64^3: VTN downsamples 6 times, its affine stem's head needs size // 64 >= 1.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

tf_reference = pytest.importorskip("tf_reference", reason="needs the tf-test extra (tensorflow-cpu)")

from faults import assert_clean_error, leftovers, run_script  # noqa: E402
from network import ModelConfig, build_model, count_parameters, load_checkpoint  # noqa: E402
from network.tf_bundle import TFCheckpoint, TFCheckpointError  # noqa: E402
from network.tf_import import import_tf_checkpoint  # noqa: E402

TOLERANCE = 1e-5          # relative to the largest |TF output|, one stem
CASCADE_TOLERANCE = 5e-5  # the whole model's flow: stems chained through warps and compositions
# published parameter counts at 128^3 (RCN and LDR_ALDK code, one stem each)
PUBLISHED = {"VTNAffine": 14_166_288, "LDRAffine": 332_880, "VTN": 28_252_203, "VoxelMorph": 300_547,
             "LDR": 280_659}

# name -> (stems [(tf stem, kind, channels, flow multiplier)], size, expected (preset, base, n_cascades))
# flow multipliers as the TF codes set them: RCN 1 / n_cascades; LDR_ALDK liver 1 / (n + 1) per net
CASES = {
    "rcn-vtn": ([("affine_stem", "VTNAffine", 16, 1.0), ("deform_stem_0", "VTN", 16, 1.0)], 64, ("rcn", "VTN", 1)),
    "rcn-voxelmorph": ([("affine_stem", "VTNAffine", 16, 1.0), ("deform_stem_0", "VoxelMorph", 16, 0.5),
                        ("deform_stem_1", "VoxelMorph", 16, 0.5)], 64, ("rcn", "VoxelMorph", 2)),
    "ldr-brain": ([("ldr_util", "LDRAffine", 16, 1.0), ("deform_stem_0", "LDR", 16, 1.0)], 48,
                  ("ldr-brain", "LDR", 1)),
    "ldr-liver": ([("ldr_util", "LDR", 4, 0.5), ("deform_stem_0", "LDR", 4, 0.5)], 32, ("ldr-liver", "LDR", 1)),
}


# whole models: name -> (stems, size, rep); flow multipliers as above
CASCADES = {
    "rcn-vtn-2cas": ([("affine_stem", "VTNAffine", 16, 1.0), ("deform_stem_0", "VTN", 16, 0.5),
                      ("deform_stem_1", "VTN", 16, 0.5)], 64, 1),
    "rcn-voxelmorph-rep2": ([("affine_stem", "VTNAffine", 16, 1.0), ("deform_stem_0", "VoxelMorph", 16, 1.0)], 64, 2),
    "ldr-brain-2cas": ([("ldr_util", "LDRAffine", 16, 1.0), ("deform_stem_0", "LDR", 16, 0.5),
                        ("deform_stem_1", "LDR", 16, 0.5)], 48, 1),
    "ldr-liver": ([("ldr_util", "LDR", 4, 0.5), ("deform_stem_0", "LDR", 4, 0.5)], 32, 1),
}


def _pair(size, seed=0):
    rng = np.random.default_rng(seed)
    fixed = rng.integers(0, 256, (1, size, size, size, 1)).astype(np.float32) / 255
    moving = rng.integers(0, 256, (1, size, size, size, 1)).astype(np.float32) / 255
    return fixed, moving


def _torch(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))


def _stems(model):
    """``{tf stem: module}`` of an imported model (ldr-liver: ldr_util is the first LDR net)."""
    from network.tf_import import stem_modules

    return {stem: model.get_submodule(prefix) for stem, prefix, _ in stem_modules(model)}


def _ours(module, fixed, moving):
    with torch.no_grad():
        out = module(_torch(fixed), _torch(moving))
    flow = out["flow"].numpy().transpose(0, 2, 3, 4, 1)
    extra = {k: out[k].numpy() for k in ("W", "b") if k in out}
    return {"flow": flow, **extra}


def _rel(ours, ref):
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``{case: (prefix, TF outputs, input pair)}``, each checkpoint saved once."""
    out = {}
    for name, (stems, size, _) in CASES.items():
        folder = tmp_path_factory.mktemp(name)
        prefix, forward = tf_reference.save_reference(str(folder), stems, (size,) * 3)
        pair = _pair(size)
        out[name] = (prefix, forward(*pair), pair)
        forward.close()
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_reproduces_tensorflow_forward(saved, case):
    stems, size, (preset, base, n) = CASES[case]
    prefix, reference, (fixed, moving) = saved[case]
    model, report = import_tf_checkpoint(prefix, image_size=(size,) * 3)
    c = model.config
    assert (c.preset, c.base_network, c.n_cascades, c.padding) == (preset, base, n, "tf")
    assert report["skipped"]["critic (training only)"] == 2
    assert report["skipped"]["optimiser state and counters"] > report["imported"]       # Adam m, v per variable
    model.eval()
    modules = _stems(model)
    assert sorted(modules) == sorted(s for s, *_ in stems)
    for stem, kind, _, _ in stems:
        ours = _ours(modules[stem], fixed, moving)
        for key, ref in reference[stem].items():
            rel = _rel(ours[key], ref)
            print(f"{case} {stem} ({kind}) {key}: max |ours - TF| = {np.abs(ours[key] - ref).max():.2e}, "
                  f"relative {rel:.2e} (max |TF| {np.abs(ref).max():.3g})")
            assert rel <= TOLERANCE, f"{case} {stem} ({kind}) {key}: relative max diff {rel:.2e}"
        assert np.abs(reference[stem]["flow"]).max() > 1e-2, "reference flow too small to compare"


@pytest.mark.parametrize("case", sorted(CASCADES))
def test_import_reproduces_tensorflow_cascade(tmp_path, case):
    """The whole model: stems chained through the warp, flows composed (an affine first stem
    exactly), shared-weight repetitions, against the same cascade built in TF."""
    stems, size, rep = CASCADES[case]
    prefix, forward = tf_reference.save_reference(str(tmp_path), stems, (size,) * 3, cascade=True, rep=rep,
                                                  extras=False, flow_gain=0.1)
    fixed, moving = _pair(size, seed=1)
    reference = forward(fixed, moving)["cascade"]
    forward.close()
    model, _ = import_tf_checkpoint(prefix, image_size=(size,) * 3, rep=rep)
    with torch.no_grad():
        out = model.eval()(_torch(fixed), _torch(moving))
    diff = {}
    for key in ("flow", "warped"):
        ours = out[key].numpy().transpose(0, 2, 3, 4, 1)
        diff[key] = float(np.abs(ours - reference[key]).max())
        print(f"{case} cascade {key}: max |ours - TF| = {diff[key]:.2e}, relative {_rel(ours, reference[key]):.2e} "
              f"(max |TF| {np.abs(reference[key]).max():.3g})")
    assert diff["flow"] <= CASCADE_TOLERANCE * np.abs(reference["flow"]).max(), diff
    # the moving image is noise in [0, 1] (neighbours differ by <= 1), so two trilinear warps differ by
    # at most 3 x (the flow difference + float32 rounding of the sample points, 2 ulp of the size): a
    # larger image difference would be a different warp
    assert diff["warped"] <= 3 * (diff["flow"] + 2 * size * np.finfo(np.float32).eps), diff
    assert np.abs(reference["flow"]).max() > 1e-1
    # negative control: adding the stages' flows instead of composing them is far outside the tolerance
    naive = sum(out["flows"]).numpy().transpose(0, 2, 3, 4, 1)
    assert _rel(naive, reference["flow"]) > 10 * CASCADE_TOLERANCE, _rel(naive, reference["flow"])


@pytest.mark.parametrize("case", ["rcn-vtn", "ldr-brain"])
def test_symmetric_padding_would_not_match(saved, case):
    """Negative control: the same weights with PyTorch's symmetric padding compute something else,
    so the comparison above can fail."""
    stems, size, _ = CASES[case]
    prefix, reference, (fixed, moving) = saved[case]
    model, _ = import_tf_checkpoint(prefix, image_size=(size,) * 3)
    config = model.config.to_dict()
    config["padding"] = "symmetric"
    other = build_model(config)
    other.load_state_dict(model.state_dict())
    other.eval()
    stem = stems[-1][0]
    rel = _rel(_ours(_stems(other)[stem], fixed, moving)["flow"], reference[stem]["flow"])
    assert rel > 1e-2


def test_weights_are_permuted_not_copied(saved):
    """A conv kernel (kx, ky, kz, in, out) and a transposed one (kx, ky, kz, out, in) land as
    (out, in, kx, ky, kz) and (in, out, kx, ky, kz): checked against TF's own reader."""
    prefix = saved["rcn-vtn"][0]
    values = tf_reference.load_variables(prefix)
    model, _ = import_tf_checkpoint(prefix, image_size=(64,) * 3)
    state = model.state_dict()
    conv = values["gaffdfrm/deform_stem_0/conv3_1/W"]
    up = values["gaffdfrm/deform_stem_0/deconv4/W"]
    np.testing.assert_array_equal(state["cascades.0.encoder.conv3_1.0.weight"].numpy(), conv.transpose(4, 3, 0, 1, 2))
    np.testing.assert_array_equal(state["cascades.0.deconv.1.0.weight"].numpy(), up.transpose(4, 3, 0, 1, 2))
    np.testing.assert_array_equal(state["cascades.0.encoder.conv3_1.0.bias"].numpy(),
                                  values["gaffdfrm/deform_stem_0/conv3_1/b"])
    reader = TFCheckpoint(prefix)
    assert reader.shapes == {k: tuple(v.shape) for k, v in values.items()}
    np.testing.assert_array_equal(reader.read("gaffdfrm/affine_stem/conv7_W/W"),
                                  values["gaffdfrm/affine_stem/conv7_W/W"])


def test_published_parameter_counts(saved, tmp_path):
    """Every imported stem holds exactly the TF variables' parameters, and at 128^3 the published counts."""
    for case, (stems, size, _) in CASES.items():
        model, _ = import_tf_checkpoint(saved[case][0], image_size=(size,) * 3)
        values = tf_reference.load_variables(saved[case][0])
        for stem, module in _stems(model).items():
            tf_count = sum(v.size for k, v in values.items() if f"/{stem}/" in k and not k.endswith("Adam")
                           and not k.endswith("Adam_1"))
            assert count_parameters(module) == tf_count, (case, stem)
    assert count_parameters(_stems(import_tf_checkpoint(saved["rcn-vtn"][0], (64,) * 3)[0])["deform_stem_0"]) \
        == PUBLISHED["VTN"]
    for stems, kinds in (([("affine_stem", "VTNAffine", 16, 1.0), ("deform_stem_0", "VoxelMorph", 16, 1.0)],
                          ("VTNAffine", "VoxelMorph")),
                         ([("ldr_util", "LDRAffine", 16, 1.0), ("deform_stem_0", "LDR", 16, 1.0)], ("LDRAffine", "LDR"))):
        folder = tmp_path / kinds[0]
        folder.mkdir()
        prefix, forward = tf_reference.save_reference(str(folder), stems, (128,) * 3, extras=False)
        forward.close()
        model, _ = import_tf_checkpoint(prefix)            # default image size 128^3
        modules = _stems(model)
        assert count_parameters(modules[stems[0][0]]) == PUBLISHED[kinds[0]]
        assert count_parameters(modules["deform_stem_0"]) == PUBLISHED[kinds[1]]
    for base in ("VTN", "VoxelMorph"):
        full = build_model(ModelConfig(base_network=base, preset="rcn", n_cascades=1, padding="tf"))
        assert count_parameters(full) == PUBLISHED["VTNAffine"] + PUBLISHED[base]


# ---- faults: one line naming the file and the problem ------------------------------------------

@pytest.fixture
def tf_folder(saved, tmp_path):
    """A copy of the ldr-liver run folder (``checkpoint`` file, ``model-100.*``) to break."""
    prefix = saved["ldr-liver"][0]
    folder = tmp_path / "ldr_run"
    folder.mkdir()
    for name in os.listdir(os.path.dirname(prefix)):
        shutil.copy(os.path.join(os.path.dirname(prefix), name), folder / name)
    return folder


def _edited(tf_folder, edit):
    values = tf_reference.load_variables(str(tf_folder / "model-100"))
    edit(values)
    for name in os.listdir(tf_folder):
        os.remove(tf_folder / name)
    tf_reference.save_variables(str(tf_folder), values)
    return tf_folder


def test_cli_imports_and_checkpoint_describes_itself(saved, tf_folder, tmp_path):
    json.dump({"rep": 2, "dataset": "datasets/liver.json", "base_network": "LDR", "n_cascades": 1},
              open(tf_folder / "args.json", "w"))
    proc = run_script("import_tf.py", tf_folder, "--image_size", 32, 32, 32)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped:" in proc.stdout and "critic (training only)" in proc.stdout
    out = str(tf_folder) + "-pt"
    state = load_checkpoint(out)
    assert state["step"] == 100 and state["model_config"]["rep"] == 2
    assert state["model_config"]["padding"] == "tf" and state["train_args"]["dataset"] == "datasets/liver.json"
    assert state["imported_from"]["format"] == "tensorflow-1"
    model = build_model(state["model_config"])
    model.load_state_dict(state["model"])
    reference, (fixed, moving) = saved["ldr-liver"][1], saved["ldr-liver"][2]
    ours = _ours(_stems(model)["deform_stem_0"].eval(), fixed, moving)["flow"]
    assert _rel(ours, reference["deform_stem_0"]["flow"]) <= TOLERANCE
    # the imported checkpoint evaluates like any other (stand-ins of the published liver data)
    from data_util.standins import write_standins

    liver = write_standins(str(tmp_path / "standins"), size=32, configs=("liver.json",))["liver.json"]
    ev = run_script("eval.py", "-c", out, "-d", liver, "-v", "sliver", "--limit", 2, "--out_dir", tmp_path / "ev")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "Dice" in ev.stdout
    again = run_script("import_tf.py", tf_folder, "--image_size", 32, 32, 32)
    assert_clean_error(again, "exists and is not empty")
    assert leftovers(tmp_path) == []


def test_eval_on_tf_folder_says_how_to_convert(tf_folder):
    assert_clean_error(run_script("eval.py", "-c", tf_folder), "TensorFlow-1 checkpoint folder", "import_tf.py")


def test_args_json_that_disagrees_is_refused(tf_folder):
    json.dump({"base_network": "VTN", "n_cascades": 1}, open(tf_folder / "args.json", "w"))
    assert_clean_error(run_script("import_tf.py", tf_folder, "--image_size", 32, 32, 32), "args.json",
                       "base_network 'VTN'")


@pytest.mark.parametrize("edit, needle", [
    (lambda v: v.update({"gaffdfrm/deform_stem_0/conv9/W": np.zeros((3, 3, 3, 2, 4), np.float32)}),
     "unknown variable gaffdfrm/deform_stem_0/conv9/W"),
    (lambda v: v.update({"gaffdfrm/segmenter/x": np.zeros(3, np.float32)}), "unknown variable gaffdfrm/segmenter/x"),
    (lambda v: v.pop("gaffdfrm/deform_stem_0/decode2/b"), "missing variables"),
    (lambda v: v.update({k.replace("deform_stem_0", "deform_stem_1"): x for k, x in list(v.items())
                         if "deform_stem_0" in k}), "2 deformable stems"),
    (lambda v: v.update({"gaffdfrm/deform_stem_0/flow/W": np.zeros((3, 3, 3, 4, 2), np.float32)}),
     "gaffdfrm/deform_stem_0/flow/W has shape (3, 3, 3, 4, 2)"),
])
def test_edited_checkpoint_is_refused_in_one_line(tf_folder, tmp_path, edit, needle):
    _edited(tf_folder, edit)
    out = tmp_path / "out"
    assert_clean_error(run_script("import_tf.py", tf_folder, "--image_size", 32, 32, 32, "-o", out), needle)
    assert not out.exists()


def test_truncated_and_foreign_files(tf_folder, tmp_path):
    data = next(p for p in tf_folder.iterdir() if ".data-" in p.name)
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    assert_clean_error(run_script("import_tf.py", tf_folder, "--image_size", 32, 32, 32), "truncated", data.name)
    data.write_bytes(raw)
    index = tf_folder / "model-100.index"
    index.write_bytes(index.read_bytes()[:30])
    assert_clean_error(run_script("import_tf.py", tf_folder, "--image_size", 32, 32, 32), "model-100.index")
    index.write_bytes(os.urandom(4096))
    assert_clean_error(run_script("import_tf.py", tf_folder, "--image_size", 32, 32, 32), "model-100.index")
    with pytest.raises(TFCheckpointError, match="model-100.index"):
        TFCheckpoint(str(tf_folder / "model-100"))
    assert_clean_error(run_script("import_tf.py", tmp_path / "nowhere"), "nowhere")
    assert not (tf_folder.parent / "ldr_run-pt").exists()


def test_wrong_image_size_for_the_affine_head(saved):
    with pytest.raises(TFCheckpointError, match="--image_size"):
        import_tf_checkpoint(saved["ldr-brain"][0], image_size=(128,) * 3)
