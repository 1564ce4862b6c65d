"""The training engine behind ``train.py``: resume, model, run folder, loaders, the step, the loop,
validation and checkpoints.

:func:`train` runs one training from parsed flags. A resumed run is the same experiment: flags, weights,
optimiser, learning-rate schedule, critic, random state and data order come back from the checkpoint
(``docs/runs.md``). Faults are raised as :class:`~network.errors.ToolkitError` (one line each).
The pieces without data (loss of a batch, validation, logging) are in :mod:`network.training`.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import time

import numpy as np
import torch

from data_util import augment_moving, augment_pair_affine, open_dataset
from engine.distillation import setup_distillation
from engine.distributed import Distributed, from_environment
from network import (DEFAULT_CHANNELS, DEFAULT_PRESET, ModelConfig, RegistrationLoss, SizeError, build_model,
                     count_parameters, load_checkpoint, save_checkpoint)
from network.checkpoint import (TRAINING_STATE, RunLock, list_checkpoints, load_weights, prune_checkpoints,
                                restore_rng_state, rng_state)
from network.cli import stored_dataset, to_device
from network.errors import RunError
from network.outputs import clean_stale_temps
from network.training import (MEAN_COMPONENTS, LazyWriter, Progress, distillation_step, forward_and_loss, learning_rate, log_step,
                              restore_run_args, resumed_loader, scalar, shown_components, validate)


def lr_scheduler(optimizer, base_lr: float, start_step: int, round_steps: int, schedule: str):
    """A ``LambdaLR`` giving step ``s`` the rate :func:`~network.training.learning_rate` ``(base_lr, s)``,
    positioned at ``start_step`` (a resumed run continues the schedule; ``--lr`` on resume sets a new base)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = base_lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate(1.0, s, round_steps, schedule), last_epoch=start_step - 1)


def resume_state(args, explicit, names):
    """The checkpoint to resume (or ``None``), with ``args`` restored from its run configuration."""
    if not args.checkpoint:
        if getattr(args, "fresh_optimizer", False):
            raise RunError("--fresh_optimizer: needs -c CHECKPOINT (the weights to continue from)")
        return None
    state = load_checkpoint(args.checkpoint)
    if getattr(args, "fresh_optimizer", False):
        state = {k: v for k, v in state.items() if k not in TRAINING_STATE}
        state["fresh"] = True
        print(f"--fresh_optimizer: {state['path']} gives its weights, step and flags; the optimiser, critic and "
              f"random state start anew")
    stored = state.get("train_args") or {}
    if not isinstance(stored, dict):
        raise RunError(f"{state['path']}: 'train_args' is not a table of flags")
    if args.dataset is None:
        args.dataset = stored_dataset(state)
    elif stored.get("dataset") and os.path.abspath(args.dataset) != os.path.abspath(str(stored["dataset"])):
        print(f"resume override: -d {args.dataset} (the run had {stored['dataset']})")
    config = ModelConfig.from_dict(state["model_config"])
    overrides = restore_run_args(args, explicit, stored, config, names)
    if stored and "aldk_variant" not in stored and "aldk_variant" not in explicit:
        args.aldk_variant = "paper"         # runs from before the stable recipe distilled with the paper's losses
    if not stored:
        print(f"note: {state['path']} stores no run flags; using the command line's")
    for flag, old, new in overrides:
        print(f"resume override: {flag} {new} (the run had {old})")
    return state


def make_model(args, state, dataset):
    """``(config, model)`` from the checkpoint (resume) or from the flags."""
    try:
        if state is not None:
            config = ModelConfig.from_dict(state["model_config"])
            config.rep = args.rep or config.rep
        else:
            config = ModelConfig(base_network=args.base_network, n_cascades=args.n_cascades,
                                 preset=args.preset or DEFAULT_PRESET[args.base_network], image_size=dataset.image_size,
                                 channels=args.channels or DEFAULT_CHANNELS.get(args.base_network, 16),
                                 rep=args.rep or 1, deep_supervision=args.deep_supervision)
        if tuple(config.image_size) != tuple(dataset.image_size):
            raise RunError(f"{args.dataset}: image size {tuple(dataset.image_size)} differs from the model's "
                 f"{tuple(config.image_size)}")
        model = build_model(config)
    except (SizeError, ValueError) as e:
        raise RunError(f"{args.dataset}: {e}")
    if state is not None:
        load_weights(model, state)
    return config, model


def open_run_folder(args, state, weights_dir, logs_dir) -> RunLock:
    """Lock ``weights/<output>`` for this process and refuse to mix two runs in one folder."""
    lock = RunLock(weights_dir).acquire()
    clean_stale_temps(weights_dir)
    found = list_checkpoints(weights_dir)
    same_run = state is not None and os.path.abspath(os.path.dirname(state["path"])) == os.path.abspath(weights_dir)
    if found and not same_run:
        if not args.overwrite:
            lock.release()
            raise RunError(f"{weights_dir}: holds checkpoints of another run (steps {sorted(found)[:3]}"
                 f"{'...' if len(found) > 3 else ''}); resume it with -c {weights_dir}, choose another --output, "
                 f"or pass --overwrite to delete them")
        for path in found.values():
            os.remove(path)
        shutil.rmtree(logs_dir, ignore_errors=True)
        print(f"--overwrite: deleted {len(found)} checkpoints of the previous run in {weights_dir} and {logs_dir}")
    return lock


def input_normalisation(dataset) -> str:
    """How images were scaled for the network (``register.py`` uses the same mapping)."""
    return str(dataset.normalisation)


def total_steps(args) -> int:
    """The run's length in steps: ``--steps``, else ``--round`` x ``--epochs``."""
    return args.steps if args.steps is not None else int(round(args.round * args.epochs))


class Run:
    """Everything one training needs while it steps (built by :func:`main`)."""

    def __init__(self, args, state, dataset, config, model, device, dist: Distributed | None = None):
        self.args, self.dataset, self.config, self.model, self.device = args, dataset, config, model, device
        self.dist = dist or Distributed()
        model.activation_checkpointing = bool(getattr(args, "activation_checkpointing", False))
        self.net = model                        # what the step runs: the model, or its DDP wrapper
        if self.dist.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.start_step = int(state["step"]) if state is not None else 0
        self.total_steps = total_steps(args)
        self.base_lr = 5e-6 if args.finetune else args.lr
        self.weights_dir = os.path.join("weights", args.output)
        self.logs_dir = os.path.join("logs", args.output)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=self.base_lr)
        if state is not None and state.get("optimizer"):
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:
                raise RunError(f"{state['path']}: stored optimiser state does not fit the model ({str(e).splitlines()[0]})")
        self.scheduler = lr_scheduler(self.optimizer, self.base_lr, self.start_step, args.round, args.lr_schedule)
        self.best = (state or {}).get("best")
        self.n_params = count_parameters(model)
        self.train_args = dict(vars(args), dataset_abspath=os.path.abspath(args.dataset))
        self.aug_gen = torch.Generator(device="cpu").manual_seed(args.seed + 104729 * self.dist.rank)
        self.class_values = (list(dataset.segmentation_class_value.values())
                             if dataset.segmentation_class_value else None)
        self.is_l2r = getattr(dataset, "image_type", None) == "learn2reg"

    def checkpoint(self, step: int, val: dict | None = None) -> str | None:
        """Save step ``step`` (rank 0; every process takes part: their random states are gathered)."""
        states = self.dist.gather(rng_state({"augment": self.aug_gen}))
        if not self.dist.is_main:
            return None
        extra = {"n_params": self.n_params, "input_normalisation": input_normalisation(self.dataset),
                 "register_affine": getattr(self.dataset, "register_affine", "none"),
                 "commands": getattr(self, "commands", []), "rng": states[0], "best": self.best,
                 "world_size": self.dist.world_size}
        if self.dist.enabled:
            extra["rng_ranks"] = states
        if val is not None:
            extra["val"] = {k: float(v) for k, v in val.items()}
        if self.distiller is not None:
            extra["distill"] = self.distiller.state_dict()
        path = save_checkpoint(self.weights_dir, self.model, self.config.to_dict(), step,
                               step // max(1, self.args.round), self.optimizer, self.train_args, extra=extra)
        prune_checkpoints(self.weights_dir, self.args.keep, protect=[(self.best or {}).get("step")])
        return path


def prepare_run(run: Run, state) -> None:
    """Distillation, loaders, loss and the restored random state of ``run``."""
    args, dataset = run.args, run.dataset
    run.distiller, run.teacher, flows, pairs = setup_distillation(args, dataset, run.config.image_size, run.device)
    if run.distiller is not None and run.dist.enabled:
        run.distiller.comm = run.dist
        if run.distiller.critic is not None:
            run.dist.broadcast_module(run.distiller.critic)
    if run.distiller is not None and state is not None and not state.get("fresh"):
        if not state.get("distill"):
            raise RunError(f"{state['path']}: this checkpoint has no distillation critic state, but the run distils "
                 f"(--aldk / --distill); resume with the flags the run was started with")
        try:
            run.distiller.load_state_dict(state["distill"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise RunError(f"{state['path']}: stored distillation critic does not fit this run ({str(e).strip().splitlines()[0]})")
    run.augment = "none" if args.no_augment or flows is not None else args.augment
    loader = dataset.loader("1", args.batch, loop=True, num_workers=args.workers,
                                 seed=args.seed, pairs=pairs, teacher_flows=flows)
    run.train_loader = resumed_loader(loader, run.start_step, run.dist.rank, run.dist.world_size)
    run.val_loader = None
    if args.val_steps > 0 and "2" in dataset.scheme_names and run.dist.is_main:
        dataset.validate(["2"])
        run.val_loader = dataset.loader("2", args.batch, loop=False, num_workers=0,
                                             limit=args.val_pairs)
    run.loss_fn = RegistrationLoss(similarity=args.sim, reg_weight=args.reg_weight, regulariser=args.regulariser,
                                   dice_weight=args.dice_weight, label_values=run.class_values or [255.0],
                                   mask_overlap=args.mask_overlap, dice_downsample=args.dice_downsample)
    run.batches = iter(run.train_loader)        # draws the loader's seed before the RNG is restored, as in a fresh run
    if state is not None:
        restore_random_state(run, state)


def restore_random_state(run: Run, state: dict) -> None:
    """Each process's torch / numpy / augmentation random state from the checkpoint. A run resumed on
    another number of processes keeps its pair order but not its augmentation draws (said once)."""
    ranks = state.get("rng_ranks") or ([state["rng"]] if state.get("rng") else [])
    if len(ranks) == run.dist.world_size:
        restore_rng_state(ranks[run.dist.rank], {"augment": run.aug_gen})
        return
    run.aug_gen.manual_seed(run.args.seed + 7919 * run.start_step + 104729 * run.dist.rank)
    if state.get("fresh"):
        return
    if not ranks:
        print(f"note: {state['path']} has no random state (older format): the continuation is not bit-identical "
              f"to an uninterrupted run")
    else:
        print(f"note: {state['path']} was saved by {len(ranks)} process(es), this run has {run.dist.world_size}: "
              f"same pairs in the same order, but augmentation draws differ from an uninterrupted run")


def train_step(run: Run, batch: dict, step: int):
    """One optimiser step on ``batch`` and one scheduler step; returns ``(loss, components, lr)``."""
    lr = run.optimizer.param_groups[0]["lr"]
    if run.augment == "ffd":
        batch = augment_moving(batch, run.aug_gen)
    elif run.augment == "affine":
        batch = augment_pair_affine(batch, run.aug_gen, *run.args.affine_range)
    batch = to_device(batch, run.device)
    out, loss, comps = forward_and_loss(run.net, run.loss_fn, batch, run.args.symmetric,
                                        getattr(run.args, "amp", "off"))
    if run.distiller is not None:
        loss, comps = distillation_step(run.distiller, run.teacher, batch, out["flow"], loss, comps, step)
    if run.dist.any(not torch.isfinite(loss))[0]:
        where = f" on process {run.dist.rank} or another" if run.dist.enabled else ""
        raise RunError(f"loss became non-finite{where} at step {step} (this process: {float(loss)} on pairs "
                       f"{list(batch['id1'])} / {list(batch['id2'])}); no checkpoint written for this step")
    run.optimizer.zero_grad(set_to_none=True)
    # the losses are sums over the batch's pairs and DDP averages gradients: scaling by the number of
    # processes makes the step the one a single process takes on the whole batch
    (loss * run.dist.world_size if run.dist.enabled else loss).backward()
    run.optimizer.step()
    run.scheduler.step()
    return loss, comps, lr


def run_validation(run: Run, writer, progress, step: int) -> dict:
    metrics, panel = validate(run.model, run.val_loader, run.device, run.class_values,
                              l2r_labels=run.class_values if run.is_l2r else None)
    for k, v in metrics.items():
        if np.isfinite(v):
            writer.add_scalar(f"val/{k}", v, step)
    if panel is not None:
        writer.add_image("val/panel", panel, step)
    score = metrics.get("l2r_dice" if run.is_l2r else "dice", float("nan"))
    if np.isfinite(score) and (run.best is None or score > run.best["dice"]):
        run.best = {"step": step, "dice": float(score)}
    extra = f" | L2R dice {metrics['l2r_dice']:.4f} hd95 {metrics['l2r_hd95']:.3f}" if run.is_l2r else ""
    progress.write(f"step {step}: val dice {metrics['dice']:.4f} (before {metrics['dice_before']:.4f}) "
                   f"jacc {metrics['jacc']:.4f} jac_nonpos {metrics['jac_nonpos_pct']:.3f}%{extra}")
    return metrics


class StopRequest:
    """SIGINT / SIGTERM handler: the first signal asks the loop to stop after the current step
    and save it (never mid-update); a second Ctrl-C quits at once without saving."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              f"(Ctrl-C again quits without saving)", file=sys.stderr, flush=True)

    def install(self):
        return {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}


def train_loop(run: Run, stop: StopRequest) -> int:
    """Step from ``run.start_step`` to ``run.total_steps``, validating, logging and checkpointing.
    A stop request (Ctrl-C, SIGTERM from Slurm) saves the last finished step and returns 130.
    Under torchrun rank 0 validates, logs and saves; a stop request on any process stops them all
    after the same step."""
    args, dist = run.args, run.dist
    writer = LazyWriter(run.logs_dir if dist.is_main else None, purge_step=run.start_step)
    progress = Progress(run.start_step, run.total_steps, args.log_steps)
    step, t0, saved = run.start_step, time.time(), run.start_step
    run.model.train()
    try:
        while step < run.total_steps:
            batch = next(run.batches)
            loss, comps, lr = train_step(run, batch, step)
            step += 1
            val, best = None, run.best
            if run.val_loader is not None and (step % args.val_steps == 0 or step == run.total_steps):
                val = run_validation(run, writer, progress, step)
            loss, comps, flags = step_summary(run, loss, comps, stop.requested, run.best is not best)
            stopping, improved = flags
            progress.update(step, loss, shown_components(comps))
            if step % 10 == 0 or step == run.total_steps:
                log_step(writer, step, lr, comps)
            if step % args.save_steps == 0 or step == run.total_steps or improved or stopping:
                run.checkpoint(step, val)
                saved = step
            if stopping:
                stop.requested = True
                break
    except KeyboardInterrupt:
        print(f"interrupted at step {step}: quit without saving (last checkpoint: step {saved})", file=sys.stderr)
        return 130
    finally:
        progress.close()
        writer.close()
    if stop.requested and saved != step:
        print(f"stopped at step {step}: nothing new to save (last checkpoint: step {saved})")
        return 130
    if stop.requested:
        print(f"stopped at step {step}: saved {os.path.join(run.weights_dir, f'ckpt_{step}.pt')}; "
              f"resume with {shlex.join(launcher(run.dist))} -c {run.weights_dir}")
        return 130
    print(f"done: steps {run.start_step} -> {step} ({step - run.start_step} this run) in {time.time() - t0:.1f} s; "
          f"checkpoint {os.path.join(run.weights_dir, f'ckpt_{step}.pt')}")
    return 0


def step_summary(run: Run, loss, comps: dict, *flags: bool) -> tuple:
    """``(loss, components, flags)`` of a finished step over all processes (one all-reduce under
    torchrun): the loss and the batch-sum components summed (the values one process with the whole
    batch reports), the others (:data:`~network.training.MEAN_COMPONENTS`) averaged, and each flag
    raised on any process."""
    keys = sorted(comps)
    values = [scalar(loss)] + [scalar(comps[k]) for k in keys] + [1.0 if f else 0.0 for f in flags]
    values = run.dist.mean(values)
    n, world = 1 + len(keys), run.dist.world_size
    total = {k: v if k in MEAN_COMPONENTS else v * world for k, v in zip(keys, values[1:n])}
    return values[0] * world, total, [v > 0 for v in values[n:]]


def check_batch_split(args, dist: Distributed) -> None:
    if dist.enabled and args.batch % dist.world_size:
        raise RunError(f"--batch {args.batch}: the global batch must split evenly over the {dist.world_size} "
                       f"processes torchrun started (e.g. --batch {dist.world_size * max(1, args.batch // dist.world_size)})")


def train(args, explicit: set, names: dict, argv: list) -> int:
    """One training run from ``train.py``'s parsed flags (``explicit``: the flags given on the command
    line; ``names``: dest -> flag for messages; ``argv``: recorded in the checkpoints). Returns the exit
    status: 0 done, 130 stopped by a signal (the last finished step saved). Under ``torchrun`` every
    process runs this; rank 0 prints, locks the run folder and writes checkpoints and logs."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dist, device = from_environment(args.gpu, argv, "train.py")
    if not dist.is_main:
        sys.stdout = open(os.devnull, "w")           # one voice: rank 0 (errors still reach stderr)
    status = _train(args, explicit, names, argv, dist, device)
    dist.close()
    return status


def _train(args, explicit, names, argv, dist: Distributed, device) -> int:
    state = resume_state(args, explicit, names)
    if not args.dataset:
        raise RunError("no dataset: pass -d path/to/dataset.json")
    check_batch_split(args, dist)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dataset = open_dataset(args.dataset, paired=args.paired, splits=["1"], crop=tuple(args.crop) if args.crop else None)
    config, model = make_model(args, state, dataset)
    model = model.to(device)
    if args.output is None:
        args.output = (os.path.basename(os.path.dirname(os.path.abspath(state["path"]))) if state is not None
                       else dist.broadcast(f"{time.strftime('%b%d-%H%M')}_{config.n_cascades}cas_{config.base_network}"))
    if state is not None and int(state["step"]) >= total_steps(args):
        raise RunError(f"{state['path']}: the run is already at step {int(state['step'])} of its "
                       f"{total_steps(args)} steps (--epochs and --steps are totals); "
                       f"pass a larger --epochs or --steps to train further")
    weights_dir, logs_dir = os.path.join("weights", args.output), os.path.join("logs", args.output)
    logs_existed = os.path.exists(logs_dir)
    lock = open_run_folder(args, state, weights_dir, logs_dir) if dist.is_main else None
    dist.barrier()                                   # the folder is locked and clean before anyone goes on
    try:
        run = Run(args, state, dataset, config, model, device, dist)
        run.commands = list((state or {}).get("commands") or []) + [shlex.join(launcher(dist) + list(argv))]
        print(f"model: preset={config.preset} base={config.base_network} n={config.n_cascades} rep={config.rep} "
              f"affine={config.affine} size={config.image_size} params={run.n_params:,}")
        per = f" ({args.batch // dist.world_size} on each of {dist.world_size} processes, {dist.backend})" if dist.enabled else ""
        print(f"training steps {run.start_step} -> {run.total_steps}, batch {args.batch}{per}, lr {run.base_lr:g} "
              f"({args.lr_schedule}), device {device}, amp {args.amp}, output {run.weights_dir}")
        prepare_run(run, state)
        stop = StopRequest()
        previous = stop.install()
        try:
            return train_loop(run, stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        if lock is not None:
            lock.release()
            if not logs_existed and not os.path.isdir(weights_dir):     # a failed start leaves no logs either
                shutil.rmtree(logs_dir, ignore_errors=True)
                for folder in ("logs", "weights"):
                    if os.path.isdir(folder) and not os.listdir(folder):
                        os.rmdir(folder)


def launcher(dist: Distributed) -> list:
    """How this run was started, for the checkpoint's command history."""
    if dist.enabled:
        return ["torchrun", f"--nproc_per_node={int(os.environ.get('LOCAL_WORLD_SIZE', dist.world_size))}", "train.py"]
    return ["python", "train.py"]


__all__ = ["train", "Run", "restore_random_state", "step_summary", "check_batch_split", "prepare_run", "train_step", "train_loop", "run_validation", "resume_state",
           "make_model", "open_run_folder", "lr_scheduler", "StopRequest", "input_normalisation"]
