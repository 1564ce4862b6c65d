"""The layering and the one-implementation rules of docs/design.md, checked on the source."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("network", "data_util", "engine")
SCRIPTS = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def modules() -> dict:
    """``module name -> path`` of every script and package module."""
    out = {name: os.path.join(ROOT, name + ".py") for name in SCRIPTS}
    for package in PACKAGES:
        for f in sorted(os.listdir(os.path.join(ROOT, package))):
            if f.endswith(".py"):
                name = package if f == "__init__.py" else f"{package}.{f[:-3]}"
                out[name] = os.path.join(ROOT, package, f)
    return out


def imports_of(name: str, path: str, known: dict) -> set:
    """Our modules ``name`` imports anywhere in its file (also inside functions)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = package + ("." + base if base else "")
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for c in candidates:
            while c and c not in known:
                c = c.rpartition(".")[0]
            if c and c != name:
                found.add(c)
    return found


GRAPH = {name: imports_of(name, path, modules()) for name, path in modules().items()}


def layer(name: str) -> str:
    return name.split(".")[0] if name.split(".")[0] in PACKAGES else "script"


def test_no_script_imports_another_script():
    for name, deps in GRAPH.items():
        if layer(name) == "script":
            assert not {d for d in deps if layer(d) == "script"}, (name, deps)


@pytest.mark.parametrize("package, forbidden", [("network", {"data_util", "engine", "script"}),
                                                ("data_util", {"engine", "script"}),
                                                ("engine", {"script"})])
def test_layers_import_only_downwards(package, forbidden):
    for name, deps in GRAPH.items():
        if layer(name) == package:
            bad = {d for d in deps if layer(d) in forbidden}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_import_graph_has_no_cycles():
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in GRAPH.get(node, ()):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            visit(node, [node])


def _definitions(pattern: str) -> list:
    """``(module, function)`` for every function whose name contains ``pattern``."""
    out = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.FunctionDef) and pattern in node.name.lower():
                out.append((name, node.name))
    return sorted(out)


def test_one_dice_and_one_jacobian_determinant():
    dice = [d for d in _definitions("dice") if d != ("network.losses", "soft_dice_loss")]
    assert {m for m, _ in dice} <= {"network.metrics"}, dice
    jac = _definitions("jacobian_determinant")
    # world_transform's method of the same name delegates to the one in network.metrics
    assert {m for m, _ in jac} <= {"network.metrics", "data_util.world_transform"}, jac
    source = open(os.path.join(ROOT, "data_util", "world_transform.py"), encoding="utf-8").read()
    assert "from network.metrics import jacobian_determinant" in source


def test_one_cascade_loop_and_one_final_rename():
    fast_path = open(os.path.join(ROOT, "network", "inference.py"), encoding="utf-8").read()
    assert "model.cascade(" in fast_path and "compose_stage" not in fast_path
    for name, path in modules().items():
        text = open(path, encoding="utf-8").read()
        if name != "network.outputs":
            assert "os.replace(" not in text and "os.rename(" not in text, name


def test_cli_names_match_the_registries():
    from network.base_networks import DEFORMABLE_NETWORKS
    from network.choices import DEFORMABLE_NETWORK_NAMES, REGULARISER_NAMES, SIMILARITY_NAMES
    from network.losses import REGULARISERS, SIMILARITY

    assert sorted(DEFORMABLE_NETWORKS) == sorted(DEFORMABLE_NETWORK_NAMES)
    assert sorted(SIMILARITY) == sorted(SIMILARITY_NAMES)
    assert sorted(REGULARISERS) == sorted(REGULARISER_NAMES)


def test_train_help_does_not_import_torch():
    code = ("import runpy, sys\nsys.argv = ['train.py', '--help']\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert "--base_network" in r.stdout and "(default: VTN)" in r.stdout
    assert r.stderr.strip().endswith("NO-TORCH"), r.stderr


def test_every_dataset_reader_implements_the_interface():
    from data_util.dataset import RCNDataset
    from data_util.interface import RegistrationDataset
    from data_util.learn2reg import Learn2RegDataset
    from data_util.synth_labels import SynthDataset

    for reader in (RCNDataset, Learn2RegDataset, SynthDataset):
        assert issubclass(reader, RegistrationDataset)
        assert not getattr(reader, "__abstractmethods__", None), (reader, reader.__abstractmethods__)
