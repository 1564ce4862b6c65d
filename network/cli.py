"""Shared command-line layer of the scripts: checked argument types, one-line errors, device choice,
datasets named by checkpoints, and :func:`run` that turns every known fault into one error line.

A script's entry point is ``sys.exit(run(main))``. Inside ``main``, :func:`fail` prints
``<script>: error: <message>`` and exits with status 2; faults raised deeper in the library
(every :class:`~network.errors.ToolkitError`, a full disk or a missing permission) are caught by
:func:`run` and reported the same way, with no traceback. This module imports nothing from
``data_util`` or the scripts.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import re
import sys

from .errors import ToolkitError
from .outputs import os_error_reason

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@-]*$")


# ---- errors ------------------------------------------------------------------------------------

def fail(message: str, code: int = 2):
    """Print one error line and exit. Errors re-raised from DataLoader workers carry the worker's
    traceback; only their final line (the original message) is kept."""
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    line = lines[-1] if lines else "unknown error"
    if len(lines) > 1 and "Error: " in line:
        line = line.split("Error: ", 1)[1]
    print(f"{os.path.basename(sys.argv[0]) or 'ldr'}: error: {line}", file=sys.stderr)
    sys.exit(code)


def run(main, argv=None) -> int:
    """Call ``main(argv)``; report library faults and operating-system write errors as one line
    (exit 2), an interrupt as ``interrupted`` (exit 130)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{os.path.basename(sys.argv[0])}: interrupted", file=sys.stderr)
        return 130
    except ToolkitError as e:
        fail(str(e))
    except OSError as e:
        where = e.filename or "output"
        fail(f"{where}: {os_error_reason(e, e.filename)}")
    return 2


# ---- checked argument types --------------------------------------------------------------------

def _number(kind, text: str, what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _checked(kind, what: str, ok, rule: str):
    """An argparse type: ``kind(text)``, finite, and ``ok(value)`` or the error ``must be <rule>``."""
    def parse(text: str):
        value = _number(kind, text, what)
        if ok is not None and not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be {rule}")
        return value
    return parse


positive_int = _checked(int, "an integer", lambda v: v >= 1, ">= 1")
nonneg_int = _checked(int, "an integer", lambda v: v >= 0, ">= 0")
finite_float = _checked(float, "a number", None, "")
positive_float = _checked(float, "a number", lambda v: v > 0, "> 0")
nonneg_float = _checked(float, "a number", lambda v: v >= 0, ">= 0")
unit_float = _checked(float, "a number", lambda v: 0.0 <= v <= 1.0, "between 0 and 1")


def weight_or_auto(text: str):
    """A loss weight ``>= 0``, or ``auto`` (returned as ``None``)."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        return nonneg_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number >= 0 nor 'auto'") from None


def run_name(text: str) -> str:
    """A run name for ``weights/<name>`` and ``logs/<name>``: one plain folder name."""
    if not _RUN_NAME.match(text or "") or text in (".", ".."):
        raise argparse.ArgumentTypeError(
            f"{text!r} must be a plain folder name (letters, digits, . _ - + = @; no '/', no leading '.')")
    return text


def explicit_dests(parser: argparse.ArgumentParser, argv) -> set:
    """The ``dest`` of every option actually given in ``argv`` (defaults not counted)."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(quiet.parse_args(argv)))


# ---- devices and datasets ----------------------------------------------------------------------

def resolve_device(gpu: str):
    import torch

    ids = [g for g in str(gpu).split(",") if g.strip() != ""]
    if not ids or ids[0].strip() == "-1":
        return torch.device("cpu")
    if not all(g.strip().isdigit() for g in ids):
        fail(f"-g {gpu}: expected a GPU id such as 0, or -1 for the CPU")
    if len(ids) > 1:
        fail("several GPUs are not supported yet; pass one id (e.g. -g 0)")
    if not torch.cuda.is_available():
        fail(f"-g {gpu}: CUDA is not available on this machine; use -g -1 for the CPU")
    if int(ids[0]) >= torch.cuda.device_count():
        fail(f"-g {gpu}: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(f"cuda:{int(ids[0])}")


def stored_dataset(state: dict) -> str:
    """The training dataset named in a checkpoint: as typed if it exists from here, else its absolute path."""
    args = state.get("train_args") or {}
    given, absolute = args.get("dataset"), args.get("dataset_abspath")
    if not given or not isinstance(given, str):
        fail(f"{state['path']}: checkpoint names no dataset; pass -d path/to/dataset.json")
    if not os.path.exists(given) and isinstance(absolute, str) and os.path.exists(absolute):
        return absolute
    return given


def to_device(batch: dict, device) -> dict:
    import torch

    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


__all__ = ["ArgumentParser", "HelpFormatter", "fail", "run", "positive_int", "nonneg_int", "finite_float", "positive_float", "nonneg_float",
           "unit_float", "weight_or_auto", "run_name", "explicit_dests", "resolve_device", "stored_dataset",
           "to_device"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the description's line breaks and shows every option's default."""


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: ``--help`` shows every default (:class:`HelpFormatter`), and a bad
    option or value is one error line (``<script>: error: argument --batch: ...``), exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        fail(message)
