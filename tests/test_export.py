"""export.py: TorchScript / ONNX exports give the eager model's flow and warped image; CLI behaviour."""
import json
import os
import subprocess
import sys

import pytest
import torch

import export
from network import build_model, save_checkpoint
from network.inference import register

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = export.DEFAULT_TOLERANCE
CONFIGS = {
    "lite": dict(base_network="Lite", preset="lite", n_cascades=1, image_size=[32, 32, 32]),
    "ldr": dict(base_network="LDR", preset="ldr-brain", n_cascades=1, image_size=[48, 48, 48]),  # affine stem
}


def run(args, cwd, python=(sys.executable,)):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="2")
    return subprocess.run(list(python) + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(r, code, *needles):
    assert r.returncode == code, (r.returncode, r.stderr)
    err = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(err) == 1, r.stderr
    for n in needles:
        assert n in err[0], err[0]


def trained_like(name: str, seed: int = 0):
    """A model whose weights are perturbed away from the near-identity init, so flows are ~1 voxel."""
    torch.manual_seed(seed)
    model = build_model(CONFIGS[name])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.04)
    return model.eval()


def pairs(shape):
    """The traced example, the check pair, and plain uniform noise (neither smooth nor seen in tracing)."""
    g = torch.Generator().manual_seed(123)
    noise = (torch.rand(shape, generator=g), torch.rand(shape, generator=g))
    return [export.random_pair(shape, export.EXPORT_SEED), export.random_pair(shape, export.CHECK_SEED), noise]


def eager(model):
    def reference(fixed, moving):
        out = register(model, fixed, moving)
        return out["flow"], out["warped"]
    return reference


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory):
    """(name, model, TorchScript path, input shape) for each config, exported once per module."""
    model = trained_like(request.param)
    shape = export.input_shape(model, 1)
    path = str(tmp_path_factory.mktemp("ts") / f"{request.param}.torchscript.pt")
    export.export_torchscript(export.export_module(model), export.random_pair(shape, export.EXPORT_SEED), path)
    return request.param, model, path, shape


def test_torchscript_matches_eager(exported):
    name, model, path, shape = exported
    loaded = export.load_torchscript(path)
    for fixed, moving in pairs(shape):
        flow, warped = loaded(fixed, moving)
        flow_ref, warped_ref = eager(model)(fixed, moving)
        assert flow.shape == (1, 3, *shape[2:]) and warped.shape == shape
        assert flow_ref.abs().max() > 0.5                       # a non-trivial flow is being compared
        diff = {"flow": (flow - flow_ref).abs().max().item(), "warped": (warped - warped_ref).abs().max().item()}
        assert diff["flow"] <= TOL and diff["warped"] <= TOL, (name, diff)


def test_torchscript_graph_is_portable(exported):
    """Plain convolutions and one grid_sample per warp (no oneDNN-only ops, no slabs)."""
    name, _, path, _ = exported
    with export.quiet_exporters():
        graph = str(torch.jit.load(path).inlined_graph)
    assert "mkldnn" not in graph
    assert graph.count("aten::grid_sampler") == (2 if name == "ldr" else 1)    # (after the affine stem) + final


def test_torchscript_runs_with_torch_only(exported, tmp_path):
    """A fresh interpreter (-I: no PYTHONPATH, no cwd on sys.path) loads and runs it without our package."""
    _, model, path, shape = exported
    fixed, moving = pairs(shape)[2]
    flow, warped = eager(model)(fixed, moving)
    torch.save({"fixed": fixed, "moving": moving, "flow": flow, "warped": warped}, tmp_path / "io.pt")
    script = (
        "import sys, torch\n"
        f"m = torch.jit.load({path!r})\n"
        "io = torch.load('io.pt')\n"
        "flow, warped = m(io['fixed'], io['moving'])\n"
        "assert not any(k == 'network' or k.startswith('network.') for k in sys.modules), 'imported network'\n"
        "print((flow - io['flow']).abs().max().item(), (warped - io['warped']).abs().max().item())\n")
    r = run(["-I", "-W", "ignore", "-c", script], tmp_path)
    assert r.returncode == 0, r.stderr
    d_flow, d_warped = map(float, r.stdout.split())
    assert d_flow <= TOL and d_warped <= TOL


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_onnx_matches_eager(name, tmp_path):
    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package)
    model = trained_like(name)
    shape = export.input_shape(model, 1)
    path = str(tmp_path / f"{name}.onnx")
    export.export_onnx(export.export_module(model), export.random_pair(shape, export.EXPORT_SEED), path)
    session = export.load_onnx(path)
    for fixed, moving in pairs(shape)[1:]:
        diff = export.max_differences(session, eager(model), fixed, moving)
        assert diff["flow"] <= TOL and diff["warped"] <= TOL, (name, diff)
    assert register(model, fixed, moving)["flow"].abs().max() > 0.5     # eager caches still sound afterwards


def test_check_detects_a_wrong_export(exported):
    """The comparison is not vacuous: another model's weights exceed the tolerance by far."""
    name, _, path, shape = exported
    fixed, moving = pairs(shape)[1]
    diff = export.max_differences(export.load_torchscript(path), eager(trained_like(name, seed=1)), fixed, moving)
    assert diff["flow"] > 100 * TOL


def test_cli_writes_files_atomically_and_json(tmp_path):
    model = trained_like("lite")
    save_checkpoint(str(tmp_path / "weights" / "run"), model, model.config.to_dict(), step=1)
    have_onnx = all(export.version_of(p) for p in ("onnx", "onnxscript"))
    formats = ["torchscript", "onnx"] if have_onnx else ["torchscript"]
    r = run([os.path.join(ROOT, "export.py"), "-c", "weights/run", "--format", *formats], tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "weights" / "run" / "export"
    expected = {"run_1.json"} | {"run_1" + export.SUFFIXES[f] for f in formats}
    assert set(os.listdir(out)) == expected                                  # no .tmp_ files left behind
    info = json.loads((out / "run_1.json").read_text())
    assert info["input_shape"] == [1, 1, 32, 32, 32]
    assert info["model_config"] == model.config.to_dict()
    assert info["flow_convention"] == export.FLOW_CONVENTION
    assert info["torch_version"] == torch.__version__
    assert info["check"]["failed"] == []
    for fmt in formats:
        assert os.path.samefile(info["files"][fmt], out / ("run_1" + export.SUFFIXES[fmt]))
        diff = info["check"]["max_abs_difference"][fmt]
        if diff is not None:                                                 # None: no onnxruntime
            assert diff["flow"] <= TOL and diff["warped"] <= TOL
    loaded = export.load_torchscript(str(out / "run_1.torchscript.pt"))
    fixed, moving = pairs((1, 1, 32, 32, 32))[2]
    assert (loaded(fixed, moving)[0] - register(model, fixed, moving)["flow"]).abs().max() <= TOL


def test_cli_missing_checkpoint(tmp_path):
    r = run([os.path.join(ROOT, "export.py"), "-c", "weights/none"], tmp_path)
    assert_one_line_error(r, 2, "export.py: error:", "weights/none", "not found")
    assert not (tmp_path / "weights").exists()


def test_cli_truncated_checkpoint(tmp_path):
    model = trained_like("lite")
    path = save_checkpoint(str(tmp_path / "w"), model, model.config.to_dict(), step=1)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    r = run([os.path.join(ROOT, "export.py"), "-c", "w"], tmp_path)
    assert_one_line_error(r, 2, "ckpt_1.pt")
    assert not (tmp_path / "w" / "export").exists()


def test_cli_onnx_without_its_package(tmp_path):
    """--format onnx without onnxscript: one line naming the package and the install command, nothing written."""
    model = trained_like("lite")
    save_checkpoint(str(tmp_path / "w"), model, model.config.to_dict(), step=1)
    launcher = ("import runpy, sys; sys.modules['onnxscript'] = None; sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
    r = run(["-c", launcher, os.path.join(ROOT, "export.py"), "-c", "w", "--format", "torchscript", "onnx"],
            tmp_path)
    assert_one_line_error(r, 2, "'onnxscript'", "pip install")
    assert not (tmp_path / "w" / "export").exists()
