"""The distillation set-up of a training run: the recipe from the flags, the teacher (online, or
stored flows matched to the dataset's training pairs) and the :class:`~network.aldk.Distiller`.

The losses, the critic and the step are in :mod:`network.aldk`; this module only wires them to a run.
"""
from __future__ import annotations

import os

from data_util.teacher_flows import TeacherFlowError, TeacherFlows
from network.aldk import DistillConfig, Distiller, OnlineTeacher
from network.checkpoint import CheckpointError
from network.base_networks import SizeError
from network.errors import RunError


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
    if args.aldk and args.distill not in (None, "aldk"):
        raise RunError(f"--aldk conflicts with --distill {args.distill}")
    mode = "aldk" if args.aldk else args.distill
    if mode is None:
        if args.teacher:
            raise RunError("--teacher needs --aldk or --distill l2")
        return None, None, None, None
    try:
        config = distill_config(args, mode)
    except ValueError as e:
        raise RunError(f"distillation: {e}")
    distiller = Distiller(config, image_size, device)
    if args.teacher:
        try:
            teacher = OnlineTeacher(args.teacher, device)
        except (CheckpointError, SizeError, ValueError) as e:
            raise RunError(str(e))
        if teacher.image_size != tuple(image_size):
            raise RunError(f"{teacher.path}: teacher image size {teacher.image_size} differs from the dataset's {tuple(image_size)}")
        print(f"{mode} distillation, online teacher {teacher.path} (step {teacher.step}, "
              f"{teacher.config.n_cascades} x {teacher.config.base_network}, preset {teacher.config.preset})")
        return distiller, teacher, None, None
    path = locate_teacher_flows(args.pretrained_flow_path, args.dataset)
    hint = (f"extract teacher flows with `python extract_teacher.py -c weights/<teacher> -d {args.dataset}`, "
            f"pass --pretrained_flow_path FILE|DIR, or use an online teacher: --teacher weights/<teacher>")
    try:
        flows = TeacherFlows(path, image_size)
    except TeacherFlowError as e:
        raise RunError(f"{e}; {hint}")
    pairs = dataset.keyed_pairs("1", flows.keys())
    if not pairs:
        raise RunError(f"{path}: none of its {len(flows)} teacher flows is a training pair of {args.dataset}; {hint}")
    print(f"{mode} distillation, stored teacher flows {path}: {len(pairs)} of {dataset.num_pairs('1')} training "
          f"pairs have one (the others are skipped); augmentation is off (stored flows belong to unaugmented pairs)")
    return distiller, None, flows, pairs


__all__ = ["setup_distillation", "distill_config", "locate_teacher_flows"]
