"""Evaluation of a model on a dataset split, shared by ``eval.py`` and ``tables.py``.

A pair is registered with the fast path (:func:`network.inference.register`) and timed from images
on the device to the flow (after one warm-up batch; CUDA synchronised); metrics come from
:func:`network.metrics.score_batch`. Rows are dicts with ``id1``, ``id2``, the metric keys
(``dice``, ``jacc``, ...) and ``seconds``.
"""
from __future__ import annotations

import statistics
import time

import torch

from network import SizeError, build_model
from network.checkpoint import load_weights
from network.cli import fail, to_device
from network.inference import register
from network.metrics import score_batch


def load_model(state: dict, config: dict, dataset):
    """The checkpoint's model with its weights, checked against the dataset's image size."""
    try:
        model = build_model(config)
    except (SizeError, ValueError) as e:
        fail(f"{state['path']}: {str(e).splitlines()[0]}")
    load_weights(model, state)
    if tuple(dataset.image_size) != tuple(model.config.image_size):
        fail(f"{state['path']}: dataset size {tuple(dataset.image_size)} differs from the model's "
             f"{tuple(model.config.image_size)}")
    return model


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_pairs(model, loader, device, class_values=None, *, l2r_labels=None, spacing=None,
                   sdlogj_offset: float = 3.0, refine=None, on_flow=None, progress=None) -> tuple:
    """``(rows, seconds)``: every pair of ``loader`` registered (timed fast path) and scored.

    ``refine(batch, flow) -> flow`` post-processes each batch's flow (timed with it); ``on_flow(batch,
    i, flow_i)`` receives every pair's final flow (e.g. a challenge submission). Learn2Reg scores are
    added as ``l2r_*`` keys when ``l2r_labels`` is given. ``seconds`` holds one entry per pair.
    """
    rows, times, warmed = [], [], False
    batches = progress(loader) if progress else loader
    with torch.inference_mode():
        for batch in batches:
            batch = to_device(batch, device)
            if not warmed:
                register(model, batch["voxel1"], batch["voxel2"])
                warmed = True
            _sync(device)
            t = time.perf_counter()
            flow = register(model, batch["voxel1"], batch["voxel2"])["flow"]
            if refine is not None:
                flow = refine(batch, flow)
            _sync(device)
            dt = (time.perf_counter() - t) / flow.shape[0]
            batch_rows = score_batch(batch, flow, class_values, spacing, l2r_labels, sdlogj_offset)
            for i, r in enumerate(batch_rows):
                r["seconds"] = dt
                rows.append(r)
                times.append(dt)
                if on_flow is not None:
                    on_flow(batch, i, flow[i])
    return rows, times


def time_registration(model, device, runs: int = 5, warmup: int = 1, seed: int = 0) -> float:
    """Median seconds of one fast-path registration (flow and warped image) of a random pair at the
    model's image size on ``device`` (batch 1; CUDA synchronised), after ``warmup`` calls."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 1, *model.config.image_size)
    fixed = torch.rand(shape, generator=gen).to(device)
    moving = torch.rand(shape, generator=gen).to(device)
    seconds = []
    with torch.inference_mode():
        for k in range(warmup + runs):
            _sync(device)
            t = time.perf_counter()
            register(model, fixed, moving)
            _sync(device)
            if k >= warmup:
                seconds.append(time.perf_counter() - t)
    return statistics.median(seconds)


__all__ = ["load_model", "evaluate_pairs", "time_registration"]
