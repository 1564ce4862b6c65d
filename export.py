"""Export a trained registration checkpoint to TorchScript and/or ONNX.

``python export.py -c weights/<run>[:STEP] [--format torchscript onnx] [-o PREFIX] [--batch 1] [--no_check]``

The exported model is the whole fast inference path (:func:`network.inference.register`): affine stem
(if any), every cascade and repetition, flow composition and the final warp of the moving image, as a
module ``(fixed, moving) -> (flow, warped)`` for one fixed input shape ``(batch, 1, X, Y, Z)``, with
``(X, Y, Z)`` the model's ``image_size``:

* ``fixed``, ``moving``: ``(B, 1, X, Y, Z)`` float32, intensities in [0, 1];
* ``flow``: ``(B, 3, X, Y, Z)`` float32, voxel displacement, channel c moves array axis c;
* ``warped``: ``(B, 1, X, Y, Z)`` float32, ``warped(p) = moving(p + flow(p))`` (trilinear, border clamp).

Writes ``PREFIX.torchscript.pt`` (``torch.jit.load`` needs only torch), ``PREFIX.onnx`` (opset 20, for
onnxruntime; needs the packages ``onnx`` and ``onnxscript``) and ``PREFIX.json`` (model config, input
shape, flow convention, versions, measured differences). Default PREFIX: ``<checkpoint folder>/export/
<run>_<step>``. Every file is written to a temporary file in the same folder and renamed into place.

The check (on unless ``--no_check``) reloads each exported file, runs it on a random smooth image pair
that was not used for export, and compares flow and warped image with the eager fast path
(``register``); it fails (exit 1) if either maximum absolute difference exceeds ``--tolerance``,
keeping the files and the JSON (which lists the failed formats) for inspection. ONNX files are
checked with onnxruntime when it is installed (skipped with a note otherwise).

Exported files hold the cached sampling grid of the warp as a constant (12 bytes per voxel, 25 MB at
128^3) besides the weights. Inputs of another spatial size are rejected by ONNX runtimes and fail
inside the TorchScript module.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from network import CheckpointError, SizeError, build_model, layers, load_checkpoint
from network.checkpoint import load_weights
from network.errors import ToolkitError
from network.outputs import atomic_output
from network.cli import ArgumentParser, fail, nonneg_float, positive_int
from network.inference import FastRegistration, register
from network.outputs import OutputError

FORMATS = ("torchscript", "onnx")
SUFFIXES = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}
FLOW_CONVENTION = ("flow (B,3,X,Y,Z): voxel displacement, channel c moves array axis c, "
                   "pull-back warped(p)=moving(p+u(p))")
DEFAULT_TOLERANCE = 1e-4   # max abs difference vs eager: voxels for the flow, intensity for the warped image
ONNX_OPSET = 20            # first opset whose GridSample takes 5-D (volumetric) input
ONNX_INSTALL = "pip install onnx onnxscript onnxruntime"
EXPORT_SEED, CHECK_SEED = 0, 1

# Known-harmless messages from the exporters. TracerWarnings: the shape checks and the cached sampling
# grid become constants of the trace, which is intended (the export is for one input shape; the check
# runs a pair that was not traced).
_QUIET_WARNINGS = [
    (DeprecationWarning, r"`torch\.jit\.\w+` is deprecated"),
    (DeprecationWarning, r"You are using the legacy TorchScript-based ONNX export"),
    (DeprecationWarning, r"The feature will be removed"),
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (torch.jit.TracerWarning, r"Converting a tensor to a Python (boolean|integer|index)"),
    (torch.jit.TracerWarning, r"torch\.tensor results are registered as constants"),
]
_QUIET_LOGS = {"torch.onnx._internal.exporter._registration": "torchvision is not installed",
               "onnx_ir._convenience": "Attribute type is ambiguous"}


class ExportError(ToolkitError):
    """An export that cannot be done here (missing package, exporter failure); one-line message."""


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("-c", "--checkpoint", required=True, help="weights/<run>[:STEP] or a ckpt_<step>.pt file")
    p.add_argument("--format", nargs="+", choices=FORMATS, default=["torchscript"],
                   help="formats to write (default: torchscript)")
    p.add_argument("-o", "--output", default=None,
                   help="output prefix (default: <checkpoint folder>/export/<run>_<step>)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size B of the exported input shape (B, 1, X, Y, Z)")
    p.add_argument("--check", dest="check", action="store_true", default=True,
                   help="reload the exported files and compare them with the eager model (the default)")
    p.add_argument("--no_check", dest="check", action="store_false", help="skip that check")
    p.add_argument("--tolerance", type=nonneg_float, default=DEFAULT_TOLERANCE,
                   help=f"largest max-abs difference the check accepts, in voxels for the flow and intensity "
                        f"units for the warped image (default {DEFAULT_TOLERANCE:g})")
    p.add_argument("--onnx_exporter", choices=("dynamo", "legacy"), default="dynamo",
                   help="torch.onnx.export(dynamo=True) (default) or the deprecated TorchScript-based exporter")
    args = p.parse_args(argv)
    args.format = list(dict.fromkeys(args.format))
    return args


# --------------------------------------------------------------------------------------------- model

def load_model(spec: str):
    """Checkpoint spec -> (model in eval mode on the CPU, checkpoint dict). Raises CheckpointError."""
    state = load_checkpoint(spec)
    try:
        model = build_model(dict(state["model_config"]))
    except (SizeError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{state['path']}: {str(e).strip().splitlines()[0]}") from None
    load_weights(model, state)
    return model.eval(), state


def export_module(model) -> FastRegistration:
    """The module that gets exported: ``(fixed, moving) -> (flow, warped)``, all ``(B, C, X, Y, Z)``.

    Reuses :class:`~network.inference.FastRegistration` (frozen weights, eval mode) in the standard
    contiguous layout, so the graph holds no memory-format conversions.
    """
    return FastRegistration(model, channels_last=False).eval()


def input_shape(model, batch: int) -> tuple:
    """``(batch, 1, X, Y, Z)`` from the model config's ``image_size``."""
    return (batch, 1, *model.config.image_size)


def random_pair(shape, seed: int):
    """A smooth random image pair ``(fixed, moving)``, each ``shape = (B, 1, X, Y, Z)`` in [0, 1]:
    uniform noise on a grid 8 times coarser, upsampled trilinearly (gives non-trivial flows)."""
    g = torch.Generator().manual_seed(seed)
    coarse = [max(s // 8, 2) for s in shape[2:]]
    pair = []
    for _ in range(2):
        x = torch.rand(shape[0], 1, *coarse, generator=g)
        pair.append(F.interpolate(x, size=tuple(shape[2:]), mode="trilinear", align_corners=True))
    return tuple(pair)


def eager_flow(model, fixed: torch.Tensor, moving: torch.Tensor):
    """The reference: eager fast path :func:`~network.inference.register` -> ``(flow, warped)``."""
    out = register(model, fixed, moving)
    return out["flow"], out["warped"]


# ---------------------------------------------------------------------------------------- utilities

class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextmanager
def quiet_exporters():
    """Hide the exporters' known-harmless deprecation/tracer warnings and log lines (listed above)."""
    filters = [(logging.getLogger(name), _DropMessages(prefix)) for name, prefix in _QUIET_LOGS.items()]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        with warnings.catch_warnings():
            for category, message in _QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)


@contextmanager
def tracing_mode():
    """No autograd, and only portable ops: plain convolutions, one ``grid_sample`` per warp."""
    with torch.no_grad(), layers.plain_pytorch(), quiet_exporters():
        yield


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


# --------------------------------------------------------------------------------------- TorchScript

def export_torchscript(module, example, path: str) -> None:
    """``torch.jit.trace`` ``module`` on ``example`` = ``(fixed, moving)`` and save it atomically.
    Raises :class:`ExportError` if tracing fails, :class:`OutputError` if writing fails.

    The archive is serialised in memory and written with Python: ``torch.jit.save`` to a path
    aborts the whole process (C++ ``terminate``) when the disk fills up, leaving its temp file."""
    try:
        with tracing_mode():
            # check_trace re-runs and re-traces; the export check (on another pair) is stronger
            traced = torch.jit.trace(module, example, check_trace=False)
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer)
    except (RuntimeError, torch.jit.Error) as e:
        raise ExportError(f"TorchScript export failed: {first_line(e)}") from None
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())


def load_torchscript(path: str):
    """``torch.jit.load`` -> callable ``(fixed, moving) -> (flow, warped)``."""
    with quiet_exporters():
        loaded = torch.jit.load(path, map_location="cpu")

    def run(fixed, moving):
        with torch.no_grad():
            return loaded(fixed, moving)
    return run


# ---------------------------------------------------------------------------------------------- ONNX

def onnx_packages(exporter: str) -> list:
    return ["onnx", "onnxscript"] if exporter == "dynamo" else ["onnx"]


def require_packages(names) -> None:
    """Raise :class:`ExportError` naming the first package of ``names`` that cannot be imported."""
    for name in names:
        try:
            __import__(name)
        except ImportError:
            raise ExportError(f"--format onnx needs the Python package '{name}', which is not installed "
                              f"({ONNX_INSTALL})") from None


def export_onnx(module, example, path: str, exporter: str = "dynamo") -> None:
    """Export ``module`` to ONNX (opset 20, static shapes, inputs ``fixed``/``moving``, outputs
    ``flow``/``warped``), atomically. Raises :class:`ExportError` on any exporter failure."""
    require_packages(onnx_packages(exporter))
    names = dict(input_names=["fixed", "moving"], output_names=["flow", "warped"], opset_version=ONNX_OPSET)
    folder = os.path.dirname(os.path.abspath(path))
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    temp = []
    try:
        with tracing_mode(), atomic_output(path) as tmp:
            temp.append(os.path.basename(tmp))
            if exporter == "dynamo":
                torch.onnx.export(module, example, tmp, dynamo=True, external_data=False, verbose=False, **names)
            else:
                torch.onnx.export(module, example, tmp, dynamo=False, **names)
            if side_files(folder, before, temp):     # external data would name the temp file: refuse
                raise ExportError(f"{path}: the ONNX exporter wrote its weights to separate files (a model over "
                                  f"2 GB?); single-file export is needed")
    except (OutputError, ExportError):
        raise
    except Exception as e:  # the exporters raise many types (torch.export, onnxscript, ONNX checker errors)
        reason = first_line(e)
        if isinstance(e, OSError) or "No space left" in reason or "Errno" in reason:
            raise OutputError(f"{path}: cannot write ({reason})") from None
        raise ExportError(f"ONNX export ({exporter}) failed: {reason}") from None
    finally:
        for name in side_files(folder, before, temp):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def side_files(folder: str, before: set, temp: list) -> list:
    """Files the exporter wrote beside the temporary ONNX file (external data: ``<tmp>.data`` and
    the like), which would be left behind."""
    if not temp or not os.path.isdir(folder):
        return []
    stem = temp[0]
    base = stem[:stem.index(".", len(".tmp_"))] if "." in stem[len(".tmp_"):] else stem
    return [n for n in os.listdir(folder) if n not in before and n != stem and n.startswith(base)]


def load_onnx(path: str):
    """onnxruntime session -> callable ``(fixed, moving) -> (flow, warped)``; None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, NotImplemented)
        raise ExportError(f"{path}: onnxruntime {onnxruntime.__version__} cannot load it: {first_line(e)}") from None

    def run(fixed, moving):
        flow, warped = session.run(["flow", "warped"], {"fixed": fixed.numpy(), "moving": moving.numpy()})
        return torch.from_numpy(flow), torch.from_numpy(warped)
    return run


LOADERS = {"torchscript": load_torchscript, "onnx": load_onnx}


# --------------------------------------------------------------------------------------------- check

def max_differences(run, reference, fixed, moving) -> dict:
    """``{"flow": max |flow - flow_ref|, "warped": max |warped - warped_ref|}`` for one pair.

    ``run`` and ``reference`` map ``(fixed, moving)`` ``(B, 1, X, Y, Z)`` to ``(flow, warped)``.
    """
    flow, warped = run(fixed, moving)
    flow_ref, warped_ref = reference(fixed, moving)
    return {"flow": (flow - flow_ref).abs().max().item(), "warped": (warped - warped_ref).abs().max().item()}


def version_of(name: str):
    try:
        module = __import__(name)
    except ImportError:
        return None
    return getattr(module, "__version__", None)


def default_prefix(state: dict) -> str:
    """``<checkpoint folder>/export/<run>_<step>``."""
    folder = os.path.dirname(os.path.abspath(state["path"]))
    run = re.sub(r"[^\w.-]", "_", os.path.basename(folder)) or "model"
    return os.path.join(folder, "export", f"{run}_{state['step']}")


def check_export(fmt: str, path: str, model, shape, tolerance: float):
    """Reload ``path`` and compare it with the eager model on a pair not used for export.

    Returns ``{"flow": .., "warped": ..}`` max abs differences, or None when the format cannot be run
    here (ONNX without onnxruntime). Prints one line either way.
    """
    run = LOADERS[fmt](path)
    if run is None:
        print(f"{fmt}: check skipped, onnxruntime is not installed ({ONNX_INSTALL})")
        return None
    fixed, moving = random_pair(shape, CHECK_SEED)
    diff = max_differences(run, lambda f, m: eager_flow(model, f, m), fixed, moving)
    ok = max(diff.values()) <= tolerance
    print(f"{fmt}: max abs difference vs eager: flow {diff['flow']:.3g} voxels, warped {diff['warped']:.3g} "
          f"({'within' if ok else 'ABOVE'} tolerance {tolerance:g})")
    return diff


def export_info(args, state: dict, model, shape, written: dict, differences: dict) -> dict:
    """Contents of ``PREFIX.json``."""
    onnx = None
    if "onnx" in written:
        onnx = {"opset": ONNX_OPSET, "exporter": args.onnx_exporter, "onnx_version": version_of("onnx"),
                "onnxscript_version": version_of("onnxscript"), "onnxruntime_version": version_of("onnxruntime")}
    check = None
    if args.check:
        failed = [f for f, d in differences.items() if d is not None and max(d.values()) > args.tolerance]
        check = {"tolerance": args.tolerance, "max_abs_difference": differences, "failed": failed}
    return {"checkpoint": os.path.abspath(state["path"]), "step": state["step"], "model_config": model.config.to_dict(),
            "input_shape": list(shape), "inputs": ["fixed", "moving"], "outputs": ["flow", "warped"],
            "dtype": "float32", "flow_convention": FLOW_CONVENTION, "files": written,
            "torch_version": torch.__version__, "onnx": onnx, "check": check}


def main(argv=None):
    args = parse_args(argv)
    try:
        model, state = load_model(args.checkpoint)
    except CheckpointError as e:
        fail(str(e))
    try:
        if "onnx" in args.format:           # before anything is written
            require_packages(onnx_packages(args.onnx_exporter))
    except ExportError as e:
        fail(str(e))
    prefix = args.output or default_prefix(state)
    shape = input_shape(model, args.batch)
    module = export_module(model)
    example = random_pair(shape, EXPORT_SEED)

    written, differences = {}, {}
    for fmt in args.format:
        path = prefix + SUFFIXES[fmt]
        try:
            if fmt == "onnx":
                export_onnx(module, example, path, args.onnx_exporter)
            else:
                export_torchscript(module, example, path)
            written[fmt] = path
            print(f"wrote {path}")
            if args.check:
                differences[fmt] = check_export(fmt, path, model, shape, args.tolerance)
        except ExportError as e:
            fail(str(e))

    info = export_info(args, state, model, shape, written, differences)
    with atomic_output(prefix + ".json") as tmp:
        with open(tmp, "w") as f:
            json.dump(info, f, indent=1)
    print(f"wrote {prefix}.json")
    if info["check"] and info["check"]["failed"]:
        fail(f"{', '.join(info['check']['failed'])} export differs from the eager model by more than "
             f"{args.tolerance:g} (see {prefix}.json)", code=1)
    return 0


def cli() -> int:
    """Console entry point (``ldr-export``): :func:`main` with every fault reported as one line."""
    from network.cli import run

    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
