"""The training engine behind ``train.py``: one training step, validation, progress, and the pieces
that make a resumed run the same experiment (restored run flags, RNG state, data order, run lock,
checkpoint retention).

A resumed run continues exactly: the model, optimiser, distillation critic and its optimiser, the
global torch / numpy RNG and the augmentation generator come back from the checkpoint, and the pair
sampler is replayed from the run's seed and skips the batches already seen, so an uninterrupted run
and a run killed and resumed produce the same weights (on the same device and thread count).
"""
from __future__ import annotations

import itertools
import math
import sys
import time
import types

import torch

from .cli import to_device
from .errors import RunError
from .metrics import score_batch, summarise

# Flags that say where and how fast a run executes, not what it is: never restored. The run folder
# (--output) is where the checkpoint lies, so a moved or copied run resumes in place.
NOT_RESTORED = {"checkpoint", "gpu", "workers", "threads", "dataset", "output", "overwrite",
                "activation_checkpointing", "fresh_optimizer"}
# Flags fixed by the model in the checkpoint: they may not change on resume.
ARCHITECTURE = {"base_network": "base_network", "n_cascades": "n_cascades", "preset": "preset",
                "channels": "channels", "deep_supervision": "deep_supervision"}


# ---- resume: the run configuration -------------------------------------------------------------

def restore_run_args(args, explicit: set, stored: dict, config, flag_names: dict) -> list:
    """Put every training flag of the stored run back into ``args`` unless it was given on the
    command line; returns the overrides as ``(flag, stored value, new value)``. Architecture flags
    that contradict the checkpoint's model stop the run with one line."""
    overrides = []
    for dest, value in stored.items():
        if dest in NOT_RESTORED or not hasattr(args, dest):
            continue
        if dest in explicit and dest in ARCHITECTURE:
            continue                                  # checked against the model below
        if dest in explicit:
            if _differs(getattr(args, dest), value):
                overrides.append((flag_names.get(dest, dest), value, getattr(args, dest)))
        else:
            setattr(args, dest, value)
    for dest, field in ARCHITECTURE.items():
        if dest in explicit and getattr(args, dest) not in (None, False):
            have = getattr(config, field)
            if _differs(getattr(args, dest), have):
                raise RunError(f"{flag_names.get(dest, dest)} {getattr(args, dest)}: the checkpoint's model has "
                     f"{field} = {have}; architecture flags cannot change when resuming")
    return overrides


def _differs(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a or []) != list(b or [])
    if isinstance(a, float) or isinstance(b, float):
        try:
            return not math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
        except (TypeError, ValueError):
            return True
    return a != b


# ---- resume: the data order --------------------------------------------------------------------

class SkipBatches(torch.utils.data.Sampler):
    """A batch sampler that replays ``sampler`` from its seed and drops the first ``skip`` batches,
    so a resumed run sees the same pairs in the same order as an uninterrupted one."""

    def __init__(self, sampler, skip: int):
        self.sampler, self.skip = sampler, int(skip)

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)


class ShardBatches(torch.utils.data.Sampler):
    """This process's share of every batch of ``sampler`` (a batch sampler of global batches):
    items ``[rank * b, (rank + 1) * b)`` with ``b = len(batch) / world_size``."""

    def __init__(self, sampler, rank: int, world_size: int):
        self.sampler, self.rank, self.world_size = sampler, int(rank), int(world_size)

    def __iter__(self):
        for batch in self.sampler:
            if len(batch) % self.world_size:
                raise RunError(f"batch of {len(batch)} pairs does not split over {self.world_size} processes")
            share = len(batch) // self.world_size
            yield batch[self.rank * share:(self.rank + 1) * share]


def resumed_loader(loader, skip: int, rank: int = 0, world_size: int = 1):
    """``loader`` (an infinite training DataLoader with a batch sampler of global batches) continuing
    after ``skip`` batches, giving process ``rank`` of ``world_size`` its share of each."""
    if skip <= 0 and world_size == 1:
        return loader
    sampler = SkipBatches(loader.batch_sampler, skip) if skip > 0 else loader.batch_sampler
    if world_size > 1:
        sampler = ShardBatches(sampler, rank, world_size)
    return torch.utils.data.DataLoader(loader.dataset, batch_sampler=sampler,
                                       num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                       pin_memory=loader.pin_memory)


# ---- learning rate -----------------------------------------------------------------------------

def learning_rate(base: float, step: int, round_steps: int, schedule: str = "rcn") -> float:
    """``constant``: ``base``; ``rcn``: :func:`rcn_learning_rate` of epoch ``step // round_steps``."""
    if schedule == "constant":
        return base
    return rcn_learning_rate(base, step // max(1, round_steps))


def rcn_learning_rate(base: float, epoch: int) -> float:
    """RCN schedule: ``base`` for epochs 0-2, then halved every epoch."""
    return base * (0.5 ** max(0, epoch - 2))


# ---- one step ----------------------------------------------------------------------------------

def mixed_precision(device, amp: str = "off"):
    """The autocast region of the networks' forward pass: ``amp="bf16"`` runs them in bfloat16 (warps,
    compositions and the affine field stay float32, see :func:`network.layers.float32_math`);
    ``"off"``: float32 throughout."""
    if amp not in ("off", "bf16"):
        raise ValueError(f"amp must be 'off' or 'bf16', got {amp!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp == "bf16")


def forward_and_loss(model, loss_fn, batch: dict, symmetric: bool = False, amp: str = "off"):
    """One training forward pass: ``(out, loss, components)``; the loss is computed in float32 outside
    the :func:`mixed_precision` region of the network.

    ``out`` registers the moving image (``voxel2``) to the fixed image (``voxel1``). With ``symmetric``
    the same network also registers fixed to moving (``model(voxel2, voxel1)``, labels swapped too) and
    the loss and every component are the mean over both directions (Learn2Reg recipe).
    """
    directions = [(1, 2), (2, 1)] if symmetric else [(1, 2)]
    valid = None
    if "has_seg1" in batch and "has_seg2" in batch:
        valid = torch.as_tensor(batch["has_seg1"]).bool() & torch.as_tensor(batch["has_seg2"]).bool()
    results = []
    for f, m in directions:
        with mixed_precision(batch[f"voxel{f}"].device, amp):
            out = model(batch[f"voxel{f}"], batch[f"voxel{m}"])
        loss, comps = loss_fn(batch[f"voxel{f}"], out, moving=batch[f"voxel{m}"], fixed_seg=batch.get(f"seg{f}"),
                              moving_seg=batch.get(f"seg{m}"), seg_valid=valid)
        results.append((out, loss, comps))
    if len(results) == 1:
        return results[0]
    n = len(results)
    comps = {k: sum(r[2][k] for r in results) / n for k in results[0][2]}
    return results[0][0], sum(r[1] for r in results) / n, comps


def distillation_step(distiller, teacher, batch, student_flow, rec_loss, rec_comps, step):
    """Critic update(s), then the student loss (balanced ``rec + w·distill`` or ``γ·rec + (1-γ)·distill``)
    with all components. The critic sees the pair ``(fixed, moving)`` as the student does."""
    teacher_flow = teacher(batch["voxel1"], batch["voxel2"]) if teacher is not None else batch["teacher_flow"]
    images = (batch["voxel1"], batch["voxel2"])
    try:
        critic_comps = distiller.critic_step(teacher_flow, student_flow, images)
        loss, comps = distiller.student_loss(rec_loss, rec_comps, student_flow, teacher_flow, step, images)
    except FloatingPointError as e:
        raise RunError(f"{e} at step {step} (pairs {list(batch['id1'])} / {list(batch['id2'])})")
    comps.update(critic_comps)
    return loss, comps


# ---- validation --------------------------------------------------------------------------------

@torch.no_grad()
def validate(model, loader, device, class_values, rep=None, l2r_labels=None):
    """``(metrics, panel)``: mean metrics over the validation pairs (same metrics module as ``eval.py``)
    and the :func:`~network.visualization.tensorboard_panel` uint8 ``(1, H, W)`` of the first pair
    (``None`` if the loader is empty). With ``l2r_labels`` the Learn2Reg scores
    (:func:`~network.metrics.l2r_pair_scores`) are added as ``l2r_<key>``."""
    from .visualization import tensorboard_panel

    model.eval()
    rows, panel = [], None
    try:
        for batch in loader:
            batch = to_device(batch, device)
            out = model(batch["voxel1"], batch["voxel2"], rep=rep)
            rows += score_batch(batch, out["flow"], class_values, l2r_labels=l2r_labels)
            if panel is None:
                panel = tensorboard_panel(batch["voxel1"][0], batch["voxel2"][0], out["warped"][0], out["flow"][0])
    finally:
        model.train()
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, float)})
    return {k: v[0] for k, v in summarise(rows, keys).items()}, panel


# ---- logging -----------------------------------------------------------------------------------

class LazyWriter:
    """TensorBoard writer that creates ``logs/<output>`` only when the first scalar arrives. On a
    resumed run (``purge_step``) events a killed run wrote after its last checkpoint are dropped,
    so the curves continue without a doubled stretch."""

    def __init__(self, log_dir: str | None, purge_step: int | None = None):
        self.log_dir, self.purge_step = log_dir, purge_step
        self._writer = None

    def _get(self):
        if self.log_dir is None:            # a process other than rank 0 writes no logs
            return None
        if self._writer is None:
            # TensorBoard imports TensorFlow when it is installed (seconds per run) unless told to use
            # its own stub, which writes the same event files.
            sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print('note: no TensorBoard logs: tensorboard is not installed (pip install -e ".[tensorboard]")')
                self._writer = False
                return None
            self._writer = SummaryWriter(self.log_dir, purge_step=self.purge_step or None)
        return self._writer or None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._get() is not None:
            self._writer.add_scalar(tag, value, step)

    def add_image(self, tag: str, img_chw_uint8, step: int) -> None:
        """Log a uint8 ``(C, H, W)`` image (e.g. :func:`network.visualization.tensorboard_panel`)."""
        if self._get() is not None:
            self._writer.add_image(tag, img_chw_uint8, step, dataformats="CHW")

    def close(self) -> None:
        if self._writer:
            self._writer.close()


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """A tqdm bar on a terminal; otherwise (``nohup``, Slurm, ``> log``) one plain line every
    ``every`` steps and at the end: ``step 120/1000 loss 0.1234 sim 0.5 | 0.52 s/step | ETA 7m38s``."""

    def __init__(self, start: int, total: int, every: int, stream=None):
        self.stream = stream or sys.stdout
        self.start, self.total, self.every = start, total, max(1, every)
        self.t0 = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, file=self.stream)
        self.values = {}

    def update(self, step: int, loss: float, shown: dict) -> None:
        self.values = dict(loss=loss, **shown)
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0 or step == self.total:
                self.bar.set_postfix({k: f"{v:.4f}" for k, v in self.values.items()})
        elif step % self.every == 0 or step == self.total:
            done = step - self.start
            per = (time.perf_counter() - self.t0) / max(1, done)
            values = " ".join(f"{k} {v:.4f}" for k, v in self.values.items())
            print(f"step {step}/{self.total} {values} | {per:.3f} s/step | ETA {format_duration(per * (self.total - step))}",
                  file=self.stream, flush=True)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def log_step(writer, step: int, lr: float, comps: dict) -> None:
    for k, v in comps.items():
        writer.add_scalar(f"loss/{k}", scalar(v), step)
    writer.add_scalar("lr", lr, step)


# Loss components that are not sums over the batch's pairs (weights, gradient norms, critic statistics):
# averaged, not summed, over the processes of a distributed run.
MEAN_COMPONENTS = frozenset({"gamma", "distill_weight", "grad_rec", "grad_distill", "critic", "gp", "wdist",
                             "critic_real", "critic_fake"})
SHOWN = ("sim", "dice", "rec_sim", "adv", "l2", "distill_weight", "wdist")


def shown_components(comps: dict) -> dict:
    return {k: scalar(comps[k]) for k in SHOWN if k in comps}


def scalar(value) -> float:
    return float(value.detach()) if torch.is_tensor(value) else float(value)


__all__ = ["restore_run_args", "SkipBatches", "ShardBatches", "resumed_loader", "scalar", "learning_rate", "rcn_learning_rate",
           "forward_and_loss", "distillation_step", "validate", "LazyWriter", "Progress", "format_duration",
           "log_step", "shown_components", "mixed_precision", "MEAN_COMPONENTS", "NOT_RESTORED", "ARCHITECTURE"]
