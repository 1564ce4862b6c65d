"""Train a recursive cascaded registration network (RCN / LDR), unsupervised.

Seed command (LDR_ALDK / RCN flags): ``python train.py -b LDR -n 1 -g -1 --round 20000 --epochs 5
--batch 4 --output 1cas_LDR -d datasets/liver.json``. ``-g -1`` trains on the CPU.
Distillation: add ``--aldk`` (or ``--distill l2``) with teacher flows from ``Teacher_deformations/``
(written by ``extract_teacher.py``; the published LDR_ALDK pickles also work) or ``--teacher weights/<t>``.
Learn2Reg hippocampus recipe: ``-b SpatialGradient --deep_supervision -d datasets/hippocampus.json --sim lncc
--mask_overlap --regulariser gradient_l1 --reg_weight 0.1 --dice_weight 1 --symmetric --augment affine
--lr_schedule constant`` (docs/learn2reg.md).
Checkpoints: ``weights/<output>/ckpt_<step>.pt`` (self-describing); TensorBoard: ``logs/<output>``.
Resume: ``python train.py -c weights/<output>`` continues the same experiment: every flag comes back
from the checkpoint; flags given on the command line override it and are printed.
"""
from __future__ import annotations

import argparse
import sys

from network.choices import (ALDK_VARIANTS, DEFAULT_PRESET, DEFORMABLE_NETWORK_NAMES, PRESETS, REGULARISER_NAMES,
                             SIMILARITY_NAMES)
from network.cli import (ArgumentParser, explicit_dests, nonneg_float, nonneg_int, positive_float, positive_int,
                         run_name, unit_float, weight_or_auto)

__all__ = ["main", "build_parser", "parse_args"]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("-b", "--base_network", default="VTN", choices=sorted(DEFORMABLE_NETWORK_NAMES),
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
    p.add_argument("-g", "--gpu", default="-1", help="GPU id, or -1 for the CPU; under torchrun one id per "
                   "process (-g 0,1) or -1 (CPU workers)")
    p.add_argument("-c", "--checkpoint", default=None, help="resume from DIR[:STEP] or a ckpt_<step>.pt file")
    p.add_argument("--fresh_optimizer", action="store_true",
                   help="with -c: continue from the checkpoint's weights, step and flags, but with a new Adam "
                        "state, critic and random state, as from a shipped weights-only checkpoint (a "
                        "fine-tuning stage; a later resume of the new run restores its own optimiser)")
    p.add_argument("-d", "--dataset", default=None,
                   help="dataset JSON: RCN layout (HDF5), or Learn2Reg layout (NIfTI + pairs file, 'format': 'learn2reg')")
    p.add_argument("--paired", action="store_true", help="adjacent entries are pairs (LSPIG)")
    p.add_argument("--batch", type=positive_int, default=4, help="pairs per step (under torchrun: the global "
                   "batch, split evenly over the processes)")
    p.add_argument("--round", type=positive_int, default=20000, help="steps per epoch")
    p.add_argument("--epochs", type=positive_float, default=1, help="total epochs of the run (a total, also when resuming: pass a larger value to train further)")
    p.add_argument("--steps", type=positive_int, default=None, help="total steps of the run (overrides round x epochs; a total, also when resuming)")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="base learning rate")
    p.add_argument("--lr_schedule", choices=["rcn", "constant"], default="rcn",
                   help="rcn: base lr for 3 epochs (of --round steps), then halved every epoch; constant: base lr")
    p.add_argument("--finetune", action="store_true", help="RCN fine-tuning schedule (base lr 5e-6)")
    p.add_argument("--sim", choices=sorted(SIMILARITY_NAMES), default="corr",
                   help="similarity loss on the final warp (lncc: 9^3 window; mind: MIND-SSC descriptors, for pairs "
                   "in two contrasts)")
    p.add_argument("--regulariser", choices=sorted(REGULARISER_NAMES), default="smooth",
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
    s = p.add_argument_group("scale: several processes, mixed precision, memory (docs/distributed.md)")
    s.add_argument("--amp", choices=["off", "bf16"], default="off",
                   help="bf16: networks under bfloat16 autocast; warping, composition, Jacobians and losses stay float32")
    s.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute each stage (network, flow composition, warp) in the backward pass instead of "
                        "storing its tensors (less memory, about one more forward pass of time; same results)")
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, explicit = parse_args(argv)
    from engine.trainer import train         # torch loads here, after argparse (fast --help)

    return train(args, explicit, flag_names(build_parser()), argv)


def cli() -> int:
    """Console entry point (``ldr-train``): :func:`main` with every fault reported as one line."""
    from network.cli import run

    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
