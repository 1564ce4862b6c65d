"""Train a recursive cascaded registration network (RCN / LDR), unsupervised.

Seed command (LDR_ALDK / RCN flags): ``python train.py -b LDR -n 1 -g -1 --round 20000 --epochs 5
--batch 4 --output 1cas_LDR -d datasets/liver.json``. ``-g -1`` trains on the CPU.
Distillation: add ``--aldk`` (or ``--distill l2``) with teacher flows from ``Teacher_deformations/``
(written by ``extract_teacher.py``; the published LDR_ALDK pickles also work) or ``--teacher weights/<t>``.
Learn2Reg hippocampus recipe: ``-b SpatialGradient --deep_supervision -d datasets/hippocampus.json --sim lncc
--mask_overlap --regulariser gradient_l1 --reg_weight 0.1 --dice_weight 1 --symmetric --augment affine
--lr_schedule constant`` (README "Learn2Reg hippocampus recipe").
Checkpoints: ``weights/<output>/ckpt_<step>.pt`` (self-describing); TensorBoard: ``logs/<output>``.
Resume: ``python train.py -c weights/<output>`` continues the same experiment: every flag comes back
from the checkpoint; flags given on the command line override it and are printed.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import time

import numpy as np
import torch

from data_util import DatasetError, augment_moving, augment_pair_affine
from data_util.learn2reg import make_dataset_loader
from data_util.teacher_flows import TeacherFlowError
from network import (DEFORMABLE_NETWORKS, CheckpointError, DEFAULT_CHANNELS, DEFAULT_PRESET, PRESETS, ModelConfig,
                     RegistrationLoss, SizeError, build_model, count_parameters, load_checkpoint, save_checkpoint)
from network.aldk import ALDK_VARIANTS
from network.checkpoint import (RunLock, list_checkpoints, load_weights, prune_checkpoints, restore_rng_state,
                                rng_state)
from network.cli import (ArgumentParser, explicit_dests, fail, load_dataset, nonneg_float, nonneg_int,
                         positive_float, positive_int, resolve_device, run_name, stored_dataset, to_device,
                         unit_float, weight_or_auto)
from network.losses import REGULARISERS, SIMILARITY
from network.outputs import clean_stale_temps
from network.training import (LazyWriter, Progress, distillation_step, forward_and_loss, learning_rate, log_step,
                              rcn_learning_rate, restore_run_args, resumed_loader, shown_components, validate)

__all__ = ["main", "build_parser", "parse_args", "forward_and_loss", "learning_rate", "rcn_learning_rate",
           "validate", "LazyWriter", "fail", "load_dataset", "resolve_device", "stored_dataset", "to_device"]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("-b", "--base_network", default="VTN", choices=sorted(DEFORMABLE_NETWORKS),
                   help="deformable base network of each cascade")
    p.add_argument("-n", "--n_cascades", type=positive_int, default=1, help="number of deformable cascades")
    p.add_argument("-r", "--rep", type=positive_int, default=None,
                   help="shared-weight repetitions of each cascade (default 1, or the checkpoint's when resuming)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="stem layout: rcn (VTN affine + n cascades), ldr-brain (LDR affine + n LDR), "
                        "ldr-liver (no affine, 2 LDR nets per cascade, the LDR_ALDK liver layout), plain "
                        "(no affine), lite (n Lite cascades, our CPU-first student), lite-affine (LDR affine + n Lite). Default: " + ", ".join(f"{k} -> {v}" for k, v in DEFAULT_PRESET.items()))
    p.add_argument("--channels", type=positive_int, default=None,
                   help="base channel width c (default 16; SpatialGradient: width multiplier, default 8)")
    p.add_argument("-g", "--gpu", default="-1", help="GPU id, or -1 for the CPU")
    p.add_argument("-c", "--checkpoint", default=None, help="resume from DIR[:STEP] or a ckpt_<step>.pt file")
    p.add_argument("-d", "--dataset", default=None,
                   help="dataset JSON: RCN layout (HDF5), or Learn2Reg layout (NIfTI + pairs file, 'format': 'learn2reg')")
    p.add_argument("--paired", action="store_true", help="adjacent entries are pairs (LSPIG)")
    p.add_argument("--batch", type=positive_int, default=4, help="pairs per step")
    p.add_argument("--round", type=positive_int, default=20000, help="steps per epoch")
    p.add_argument("--epochs", type=positive_float, default=1, help="total epochs of the run (a total, also when resuming: pass a larger value to train further)")
    p.add_argument("--steps", type=positive_int, default=None, help="total steps of the run (overrides round x epochs; a total, also when resuming)")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="base learning rate")
    p.add_argument("--lr_schedule", choices=["rcn", "constant"], default="rcn",
                   help="rcn: base lr for 3 epochs (of --round steps), then halved every epoch; constant: base lr")
    p.add_argument("--finetune", action="store_true", help="RCN fine-tuning schedule (base lr 5e-6)")
    p.add_argument("--sim", choices=sorted(SIMILARITY), default="corr",
                   help="similarity loss on the final warp (lncc: 9^3 window)")
    p.add_argument("--regulariser", choices=sorted(REGULARISERS), default="smooth",
                   help="smooth: RCN squared forward differences; gradient_l1: the Learn2Reg recipe's "
                        "L1(spatial gradient - 0.5)")
    p.add_argument("--reg_weight", type=nonneg_float, default=1.0, help="weight of the per-cascade regulariser")
    p.add_argument("--augment", choices=["ffd", "affine", "none"], default="ffd",
                   help="ffd: RCN free-form deformation of the moving image; affine: one random affine "
                        "transform per pair on both images (Learn2Reg recipe); none")
    p.add_argument("--no_augment", action="store_true", help="same as --augment none")
    p.add_argument("--affine_range", type=nonneg_float, nargs=3, default=[20.0, 10.0, 0.2],
                   metavar=("DEGREES", "VOXELS", "ZOOM"),
                   help="--augment affine: largest rotation (about one random axis), translation per axis and "
                        "isotropic zoom (the recipe's 20 degrees, 10 voxels at 64^3, 0.2)")
    p.add_argument("--output", type=run_name, default=None, help="run name: weights/<output>, logs/<output>")
    p.add_argument("--val_steps", "-v", type=nonneg_int, default=1000, help="validate every N steps (0: never)")
    p.add_argument("--val_pairs", type=positive_int, default=16, help="validation pairs per validation")
    p.add_argument("--save_steps", type=positive_int, default=1000, help="checkpoint every N steps (and at the end)")
    p.add_argument("--workers", type=nonneg_int, default=1, help="data loader worker processes")
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the initial weights, data order and augmentation")
    r = p.add_argument_group("Learn2Reg hippocampus recipe (weak supervision, symmetric training)")
    r.add_argument("--dice_weight", type=nonneg_float, default=0.0,
                   help="weight of the soft Dice loss between warped one-hot moving labels and fixed labels "
                        "(the dataset's label values; 0/255 masks: 255)")
    r.add_argument("--dice_downsample", type=positive_int, default=1, metavar="F",
                   help="soft Dice on a grid F times coarser (labels and flow averaged over F^3 blocks): "
                        "F^3 times cheaper with many labels")
    r.add_argument("--symmetric", action="store_true",
                   help="also register fixed to moving with the same network; losses of both directions averaged")
    r.add_argument("--deep_supervision", action="store_true",
                   help="SpatialGradient: similarity also on every decoder level's flow (averaged)")
    r.add_argument("--mask_overlap", action="store_true",
                   help="similarity only where both input images are > 0 (the recipe's mask)")
    r.add_argument("--crop", type=positive_int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="Learn2Reg datasets: centre crop / zero pad to this size (default: the dataset JSON's)")
    d = p.add_argument_group("distillation from a teacher (network/aldk.py, docs/distillation.md)")
    d.add_argument("--aldk", action="store_true", help="adversarial distillation (same as --distill aldk); "
                   "recipe --aldk_variant")
    d.add_argument("--distill", choices=["aldk", "l2"], default=None,
                   help="teacher term: aldk (adversarial) or l2 (end-point error to the teacher flow)")
    d.add_argument("--aldk_variant", choices=sorted(ALDK_VARIANTS), default="stable",
                   help="stable: critic that sees the pair, WGAN-GP lambda 10 at uniform mixtures, drift "
                        "penalty, 2 critic steps, automatic weight; paper: LDR_ALDK's losses (gamma 0.3, "
                        "beta-mixture penalty, lambda 0.1, squared score difference)")
    d.add_argument("--teacher", default=None, help="online teacher checkpoint weights/<run>[:STEP]: its flow is "
                   "computed under no_grad for the exact (augmented) pair the student sees")
    d.add_argument("--pretrained_flow_path", default="Teacher_deformations",
                   help="stored teacher flows: a store .h5, a published .pkl, or a folder of them; a folder "
                        "without flow files is searched for a subfolder named like the dataset JSON "
                        "(Teacher_deformations/Liver for datasets/liver.json). Stored flows turn augmentation off")
    d.add_argument("--distill_weight", type=weight_or_auto, default=None, metavar="W|auto",
                   help="student loss = rec + W*distillation; auto (default): W set every step so the "
                        "distillation gradient on the flow is --distill_ratio times the reconstruction's")
    d.add_argument("--distill_ratio", type=nonneg_float, default=0.1,
                   help="automatic weight: target |d distill/d flow| / |d rec/d flow|")
    d.add_argument("--distill_pool", type=positive_int, default=None,
                   help="l2: end-point error of flows averaged over N^3 blocks (low-resolution teacher flow)")
    d.add_argument("--distill_mask", choices=["none", "fixed"], default=None,
                   help="l2: end-point error over the fixed image's foreground only (fixed) or everywhere (none)")
    d.add_argument("--gamma", type=unit_float, default=None,
                   help="LDR_ALDK weighting instead: loss = gamma*rec + (1-gamma)*distillation "
                        "(default: the paper variant's 0.3; balanced otherwise)")
    d.add_argument("--beta", type=unit_float, default=None,
                   help="teacher weight of the beta penalty mixture (default 0.1)")
    d.add_argument("--lamb", type=nonneg_float, default=None, help="gradient-penalty weight (stable 10, paper 0.1)")
    d.add_argument("--drift", type=nonneg_float, default=None,
                   help="critic drift penalty weight on mean D(teacher)^2 (stable 1e-3, paper 0)")
    d.add_argument("--aldk_learning_scheme", action="store_true",
                   help="LDR_ALDK scheme: distillation term on every 3rd step of the first 8000 only")
    d.add_argument("--adv_loss", choices=["paper", "wgan"], default=None,
                   help="student adversarial term: paper ||D(s)-D(t)||^2, or wgan -D(s) (stable: wgan)")
    d.add_argument("--gp_mix", choices=["beta", "uniform"], default=None,
                   help="penalty point: beta*teacher + (1-beta)*student, or a U(0,1) mixture per pair "
                        "(stable: uniform, paper: beta)")
    d.add_argument("--critic_steps", type=positive_int, default=None, help="critic updates per student step "
                   "(stable 2, paper 1)")
    d.add_argument("--critic_lr", type=positive_float, default=1e-4, help="critic Adam learning rate")
    d.add_argument("--critic_channels", type=positive_int, default=None, help="critic base width c (stable 8, paper 16)")
    d.add_argument("--critic_kernel", type=positive_int, default=None, help="critic kernel size (stable 3, paper 5)")
    k = p.add_argument_group("run bookkeeping")
    k.add_argument("--keep", type=nonneg_int, default=5,
                   help="keep the N newest checkpoints plus the best validated one (0: keep all)")
    k.add_argument("--log_steps", type=positive_int, default=50,
                   help="without a terminal (nohup, Slurm, > log): print a progress line every N steps")
    k.add_argument("--overwrite", action="store_true",
                   help="start a new run in a --output folder that holds another run's checkpoints "
                        "(they and its logs are deleted)")
    return p


def parse_args(argv=None):
    """``(args, explicit)``: the parsed flags and the set of flags given on the command line."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    return parser.parse_args(argv), explicit_dests(parser, argv)


def flag_names(parser: argparse.ArgumentParser) -> dict:
    """``dest -> "--long-flag"`` for messages."""
    return {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}


def locate_teacher_flows(path: str, dataset_json: str) -> str:
    """``path`` itself, or, for a folder without flow files, its subfolder named like the dataset JSON
    (case-insensitive), as LDR_ALDK's ``Teacher_deformations/{Liver,Brain}`` layout."""
    if not os.path.isdir(path):
        return path
    names = os.listdir(path)
    if any(n.endswith((".h5", ".pkl")) for n in names):
        return path
    stem = os.path.splitext(os.path.basename(dataset_json))[0].lower()
    match = [n for n in sorted(names) if n.lower() == stem and os.path.isdir(os.path.join(path, n))]
    return os.path.join(path, match[0]) if match else path


def distill_config(args, mode: str):
    """The :class:`~network.aldk.DistillConfig` of the flags: the recipe of ``mode`` / ``--aldk_variant``
    with every distillation flag the user set on top (printed)."""
    from network.aldk import DistillConfig

    config = DistillConfig.recipe(
        mode, args.aldk_variant, gamma=args.gamma, weight=args.distill_weight, ratio=args.distill_ratio,
        pool=args.distill_pool, mask=args.distill_mask,
        beta=args.beta, lamb=args.lamb, drift=args.drift, adv_loss=args.adv_loss, gp_mix=args.gp_mix,
        critic_steps=args.critic_steps, critic_lr=args.critic_lr, critic_channels=args.critic_channels,
        critic_kernel=args.critic_kernel, learning_scheme=args.aldk_learning_scheme)
    if config.balanced:
        weight = "automatic (ratio %g)" % config.ratio if config.weight is None else "%g" % config.weight
        loss = f"rec + w*{mode} with w {weight}"
    else:
        loss = f"{config.gamma:g}*rec + {1 - config.gamma:g}*{mode}"
    if mode == "aldk":
        mix = f"beta {config.beta:g}" if config.gp_mix == "beta" else "uniform"
        critic = (f"{'conditional' if config.conditional else 'flow-only'} critic (c={config.critic_channels}, "
                  f"{config.critic_kernel}^3), "
                  f"penalty {config.lamb:g} at {mix} mixtures, drift {config.drift:g}, {config.critic_steps} "
                  f"critic step(s) at lr {config.critic_lr:g}, adversarial term {config.adv_loss}; ")
        if args.beta is not None and config.gp_mix != "beta":
            print(f"note: --beta {args.beta:g} applies to --gp_mix beta; this recipe mixes uniformly")
        print(f"aldk recipe '{config.variant}': {critic}loss {loss}")
    else:
        pooled = f" of {config.pool}^3-averaged flows" if config.pool > 1 else ""
        pooled += " over the fixed image's foreground" if config.mask == "fixed" else ""
        print(f"l2 distillation (end-point error{pooled}): loss {loss}")
    return config


def setup_distillation(args, dataset, image_size, device):
    """``(distiller, online_teacher, teacher_flows, pairs)`` for ``--aldk`` / ``--distill``, or Nones."""
    from data_util.teacher_flows import TeacherFlows
    from network.aldk import Distiller, OnlineTeacher

    if args.aldk and args.distill not in (None, "aldk"):
        fail(f"--aldk conflicts with --distill {args.distill}")
    mode = "aldk" if args.aldk else args.distill
    if mode is None:
        if args.teacher:
            fail("--teacher needs --aldk or --distill l2")
        return None, None, None, None
    try:
        config = distill_config(args, mode)
    except ValueError as e:
        fail(f"distillation: {e}")
    distiller = Distiller(config, image_size, device)
    if args.teacher:
        try:
            teacher = OnlineTeacher(args.teacher, device)
        except (CheckpointError, SizeError, ValueError) as e:
            fail(str(e))
        if teacher.image_size != tuple(image_size):
            fail(f"{teacher.path}: teacher image size {teacher.image_size} differs from the dataset's {tuple(image_size)}")
        print(f"{mode} distillation, online teacher {teacher.path} (step {teacher.step}, "
              f"{teacher.config.n_cascades} x {teacher.config.base_network}, preset {teacher.config.preset})")
        return distiller, teacher, None, None
    path = locate_teacher_flows(args.pretrained_flow_path, args.dataset)
    hint = (f"extract teacher flows with `python extract_teacher.py -c weights/<teacher> -d {args.dataset}`, "
            f"pass --pretrained_flow_path FILE|DIR, or use an online teacher: --teacher weights/<teacher>")
    try:
        flows = TeacherFlows(path, image_size)
    except TeacherFlowError as e:
        fail(f"{e}; {hint}")
    pairs = dataset.keyed_pairs("1", flows.keys())
    if not pairs:
        fail(f"{path}: none of its {len(flows)} teacher flows is a training pair of {args.dataset}; {hint}")
    print(f"{mode} distillation, stored teacher flows {path}: {len(pairs)} of {dataset.num_pairs('1')} training "
          f"pairs have one (the others are skipped); augmentation is off (stored flows belong to unaugmented pairs)")
    return distiller, None, flows, pairs


def resume_state(args, explicit, names):
    """The checkpoint to resume (or ``None``), with ``args`` restored from its run configuration."""
    if not args.checkpoint:
        return None
    state = load_checkpoint(args.checkpoint)
    if args.dataset is None:
        args.dataset = stored_dataset(state)
    config = ModelConfig.from_dict(state["model_config"])
    stored = state.get("train_args") or {}
    if not isinstance(stored, dict):
        fail(f"{state['path']}: 'train_args' is not a table of flags")
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
            fail(f"{args.dataset}: image size {tuple(dataset.image_size)} differs from the model's "
                 f"{tuple(config.image_size)}")
        model = build_model(config)
    except (SizeError, ValueError) as e:
        fail(f"{args.dataset}: {e}")
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
            fail(f"{weights_dir}: holds checkpoints of another run (steps {sorted(found)[:3]}"
                 f"{'...' if len(found) > 3 else ''}); resume it with -c {weights_dir}, choose another --output, "
                 f"or pass --overwrite to delete them")
        for path in found.values():
            os.remove(path)
        shutil.rmtree(logs_dir, ignore_errors=True)
        print(f"--overwrite: deleted {len(found)} checkpoints of the previous run in {weights_dir} and {logs_dir}")
    return lock


def input_normalisation(dataset) -> str:
    """How images were scaled for the network (``register.py`` uses the same mapping)."""
    if getattr(dataset, "image_type", None) in ("learn2reg", "synth"):
        return str(dataset.normalisation)
    return "uint8"


class Run:
    """Everything one training needs while it steps (built by :func:`main`)."""

    def __init__(self, args, state, dataset, config, model, device):
        self.args, self.dataset, self.config, self.model, self.device = args, dataset, config, model, device
        self.start_step = int(state["step"]) if state is not None else 0
        self.total_steps = args.steps if args.steps is not None else int(round(args.round * args.epochs))
        self.base_lr = 5e-6 if args.finetune else args.lr
        self.weights_dir = os.path.join("weights", args.output)
        self.logs_dir = os.path.join("logs", args.output)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=self.base_lr)
        if state is not None and state.get("optimizer"):
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:
                fail(f"{state['path']}: stored optimiser state does not fit the model ({str(e).splitlines()[0]})")
        self.best = (state or {}).get("best")
        self.n_params = count_parameters(model)
        self.train_args = dict(vars(args), dataset_abspath=os.path.abspath(args.dataset))
        self.aug_gen = torch.Generator(device="cpu").manual_seed(args.seed)
        self.class_values = (list(dataset.segmentation_class_value.values())
                             if dataset.segmentation_class_value else None)
        self.is_l2r = getattr(dataset, "image_type", None) == "learn2reg"

    def checkpoint(self, step: int, val: dict | None = None) -> str:
        extra = {"n_params": self.n_params, "input_normalisation": input_normalisation(self.dataset),
                 "register_affine": getattr(self.dataset, "register_affine", "none"),
                 "commands": getattr(self, "commands", []),
                 "rng": rng_state({"augment": self.aug_gen}), "best": self.best}
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
    if run.distiller is not None and state is not None:
        if not state.get("distill"):
            fail(f"{state['path']}: this checkpoint has no distillation critic state, but the run distils "
                 f"(--aldk / --distill); resume with the flags the run was started with")
        try:
            run.distiller.load_state_dict(state["distill"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            fail(f"{state['path']}: stored distillation critic does not fit this run ({str(e).strip().splitlines()[0]})")
    run.augment = "none" if args.no_augment or flows is not None else args.augment
    try:
        loader = make_dataset_loader(dataset, "1", args.batch, loop=True, num_workers=args.workers,
                                     seed=args.seed, pairs=pairs, teacher_flows=flows)
        run.train_loader = resumed_loader(loader, run.start_step)
        run.val_loader = None
        if args.val_steps > 0 and "2" in dataset.scheme_names:
            dataset.validate(["2"])
            run.val_loader = make_dataset_loader(dataset, "2", args.batch, loop=False, num_workers=0,
                                                 limit=args.val_pairs)
    except DatasetError as e:
        fail(str(e))
    run.loss_fn = RegistrationLoss(similarity=args.sim, reg_weight=args.reg_weight, regulariser=args.regulariser,
                                   dice_weight=args.dice_weight, label_values=run.class_values or [255.0],
                                   mask_overlap=args.mask_overlap, dice_downsample=args.dice_downsample)
    run.batches = iter(run.train_loader)        # draws the loader's seed before the RNG is restored, as in a fresh run
    if state is not None and state.get("rng"):
        restore_rng_state(state["rng"], {"augment": run.aug_gen})
    elif state is not None:
        run.aug_gen.manual_seed(args.seed + 7919 * run.start_step)
        print(f"note: {state['path']} has no random state (older format): the continuation is not bit-identical "
              f"to an uninterrupted run")


def train_step(run: Run, batch: dict, step: int):
    """One optimiser step on ``batch``; returns ``(loss, components, lr)``."""
    lr = learning_rate(run.base_lr, step, run.args.round, run.args.lr_schedule)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.augment == "ffd":
        batch = augment_moving(batch, run.aug_gen)
    elif run.augment == "affine":
        batch = augment_pair_affine(batch, run.aug_gen, *run.args.affine_range)
    batch = to_device(batch, run.device)
    out, loss, comps = forward_and_loss(run.model, run.loss_fn, batch, run.args.symmetric)
    if run.distiller is not None:
        loss, comps = distillation_step(run.distiller, run.teacher, batch, out["flow"], loss, comps, step)
    if not torch.isfinite(loss):
        fail(f"loss became {float(loss)} at step {step} (pairs {list(batch['id1'])} / {list(batch['id2'])}); "
             "no checkpoint written for this step")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
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
    A stop request (Ctrl-C, SIGTERM from Slurm) saves the last finished step and returns 130."""
    args = run.args
    writer = LazyWriter(run.logs_dir, purge_step=run.start_step)
    progress = Progress(run.start_step, run.total_steps, args.log_steps)
    step, t0, saved = run.start_step, time.time(), run.start_step
    run.model.train()
    try:
        while step < run.total_steps and not stop.requested:
            try:
                batch = next(run.batches)
            except (DatasetError, TeacherFlowError) as e:
                fail(str(e))
            loss, comps, lr = train_step(run, batch, step)
            step += 1
            progress.update(step, loss.item(), shown_components(comps))
            if step % 10 == 0 or step == run.total_steps:
                log_step(writer, step, lr, comps)
            val, best = None, run.best
            if run.val_loader is not None and (step % args.val_steps == 0 or step == run.total_steps):
                val = run_validation(run, writer, progress, step)
            if step % args.save_steps == 0 or step == run.total_steps or run.best is not best or stop.requested:
                run.checkpoint(step, val)
                saved = step
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
              f"resume with python train.py -c {run.weights_dir}")
        return 130
    print(f"done: steps {run.start_step} -> {step} ({step - run.start_step} this run) in {time.time() - t0:.1f} s; "
          f"checkpoint {os.path.join(run.weights_dir, f'ckpt_{step}.pt')}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, explicit = parse_args(argv)
    names = flag_names(build_parser())
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.gpu)
    state = resume_state(args, explicit, names)
    if not args.dataset:
        fail("no dataset: pass -d path/to/dataset.json")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    dataset = load_dataset(args.dataset, args.paired, ["1"], args.crop)
    config, model = make_model(args, state, dataset)
    model = model.to(device)
    if args.output is None:
        args.output = (os.path.basename(os.path.dirname(os.path.abspath(state["path"]))) if state is not None
                       else f"{time.strftime('%b%d-%H%M')}_{config.n_cascades}cas_{config.base_network}")
    run = Run(args, state, dataset, config, model, device)
    run.commands = list((state or {}).get("commands") or []) + [shlex.join(["python", "train.py"] + argv)]
    if state is not None and run.start_step >= run.total_steps:
        fail(f"{state['path']}: the run is already at step {run.start_step} of its {run.total_steps} steps "
             f"(--epochs and --steps are totals); pass a larger --epochs or --steps to train further")
    logs_existed = os.path.exists(run.logs_dir)
    lock = open_run_folder(args, state, run.weights_dir, run.logs_dir)
    try:
        print(f"model: preset={config.preset} base={config.base_network} n={config.n_cascades} rep={config.rep} "
              f"affine={config.affine} size={config.image_size} params={run.n_params:,}")
        print(f"training steps {run.start_step} -> {run.total_steps}, batch {args.batch}, lr {run.base_lr:g} "
              f"({args.lr_schedule}), device {device}, output {run.weights_dir}")
        prepare_run(run, state)
        stop = StopRequest()
        previous = stop.install()
        try:
            return train_loop(run, stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        lock.release()
        if not logs_existed and not os.path.isdir(run.weights_dir):     # a failed start leaves no logs either
            shutil.rmtree(run.logs_dir, ignore_errors=True)
            for folder in ("logs", "weights"):
                if os.path.isdir(folder) and not os.listdir(folder):
                    os.rmdir(folder)


if __name__ == "__main__":
    from network.cli import run as run_cli
    sys.exit(run_cli(main))
