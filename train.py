"""Train a recursive cascaded registration network (RCN / LDR), unsupervised.

Seed command (LDR_ALDK / RCN flags): ``python train.py -b LDR -n 1 -g -1 --round 20000 --epochs 5
--batch 4 --output 1cas_LDR -d datasets/liver.json``. ``-g -1`` trains on the CPU.
Distillation: add ``--aldk`` (or ``--distill l2``) with teacher flows from ``Teacher_deformations/``
(written by ``extract_teacher.py``; the published LDR_ALDK pickles also work) or ``--teacher weights/<t>``.
Learn2Reg hippocampus recipe: ``-b SpatialGradient --deep_supervision -d datasets/hippocampus.json --sim lncc
--mask_overlap --regulariser gradient_l1 --reg_weight 0.1 --dice_weight 1 --symmetric --augment affine
--lr_schedule constant`` (README "Learn2Reg hippocampus recipe").
Checkpoints: ``weights/<output>/ckpt_<step>.pt`` (self-describing); TensorBoard: ``logs/<output>``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

from data_util import DatasetError, augment_moving, augment_pair_affine
from data_util.learn2reg import make_dataset_loader, open_dataset
from data_util.teacher_flows import TeacherFlowError
from network import (DEFORMABLE_NETWORKS, CheckpointError, DEFAULT_CHANNELS, DEFAULT_PRESET, PRESETS, ModelConfig,
                     RegistrationLoss, SizeError, build_model, count_parameters, load_checkpoint, save_checkpoint)
from network.losses import REGULARISERS, SIMILARITY
from network.metrics import l2r_pair_scores, pair_metrics, summarise


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-b", "--base_network", default="VTN", choices=sorted(DEFORMABLE_NETWORKS),
                   help="deformable base network of each cascade")
    p.add_argument("-n", "--n_cascades", type=int, default=1, help="number of deformable cascades")
    p.add_argument("-r", "--rep", type=int, default=None,
                   help="shared-weight repetitions of each cascade (default 1, or the checkpoint's when resuming)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="stem layout: rcn (VTN affine + n cascades), ldr-brain (LDR affine + n LDR), "
                        "ldr-liver (no affine, 2 LDR nets per cascade, the LDR_ALDK liver layout), plain "
                        "(no affine), lite (n Lite cascades, our CPU-first student), lite-affine (LDR affine + n Lite). Default: " + ", ".join(f"{k} -> {v}" for k, v in DEFAULT_PRESET.items()))
    p.add_argument("--channels", type=int, default=None,
                   help="base channel width c (default 16; SpatialGradient: width multiplier, default 8)")
    p.add_argument("-g", "--gpu", default="-1", help="GPU id, or -1 for the CPU")
    p.add_argument("-c", "--checkpoint", default=None, help="resume from DIR[:STEP] or a ckpt_<step>.pt file")
    p.add_argument("-d", "--dataset", default=None,
                   help="dataset JSON: RCN layout (HDF5), or Learn2Reg layout (NIfTI + pairs file, 'format': 'learn2reg')")
    p.add_argument("--paired", action="store_true", help="adjacent entries are pairs (LSPIG)")
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--round", type=int, default=20000, help="steps per epoch")
    p.add_argument("--epochs", type=float, default=1, help="number of epochs")
    p.add_argument("--steps", type=int, default=None, help="total steps (overrides round x epochs)")
    p.add_argument("--lr", type=float, default=1e-4, help="base learning rate")
    p.add_argument("--lr_schedule", choices=["rcn", "constant"], default="rcn",
                   help="rcn: base lr for 3 epochs (of --round steps), then halved every epoch; constant: base lr")
    p.add_argument("--finetune", action="store_true", help="RCN fine-tuning schedule (base lr 5e-6)")
    p.add_argument("--sim", choices=sorted(SIMILARITY), default="corr",
                   help="similarity loss on the final warp (lncc: 9^3 window)")
    p.add_argument("--regulariser", choices=sorted(REGULARISERS), default="smooth",
                   help="smooth: RCN squared forward differences; gradient_l1: the Learn2Reg recipe's "
                        "L1(spatial gradient - 0.5)")
    p.add_argument("--reg_weight", type=float, default=1.0, help="weight of the per-cascade regulariser")
    p.add_argument("--augment", choices=["ffd", "affine", "none"], default="ffd",
                   help="ffd: RCN free-form deformation of the moving image; affine: one random affine "
                        "transform per pair on both images (Learn2Reg recipe); none")
    p.add_argument("--no_augment", action="store_true", help="same as --augment none")
    p.add_argument("--affine_range", type=float, nargs=3, default=[20.0, 10.0, 0.2],
                   metavar=("DEGREES", "VOXELS", "ZOOM"),
                   help="--augment affine: largest rotation (about one random axis), translation per axis and "
                        "isotropic zoom (the recipe's 20 degrees, 10 voxels at 64^3, 0.2)")
    p.add_argument("--output", default=None, help="run name: weights/<output>, logs/<output>")
    p.add_argument("--val_steps", "-v", type=int, default=1000, help="validate every N steps (0: never)")
    p.add_argument("--val_pairs", type=int, default=16, help="validation pairs per validation")
    p.add_argument("--save_steps", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    p.add_argument("--workers", type=int, default=1, help="data loader worker processes")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("Learn2Reg hippocampus recipe (weak supervision, symmetric training)")
    r.add_argument("--dice_weight", type=float, default=0.0,
                   help="weight of the soft Dice loss between warped one-hot moving labels and fixed labels "
                        "(the dataset's label values; 0/255 masks: 255)")
    r.add_argument("--symmetric", action="store_true",
                   help="also register fixed to moving with the same network; losses of both directions averaged")
    r.add_argument("--deep_supervision", action="store_true",
                   help="SpatialGradient: similarity also on every decoder level's flow (averaged)")
    r.add_argument("--mask_overlap", action="store_true",
                   help="similarity only where both input images are > 0 (the recipe's mask)")
    r.add_argument("--crop", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="Learn2Reg datasets: centre crop / zero pad to this size (default: the dataset JSON's)")
    d = p.add_argument_group("distillation from a teacher (ALDK, network/aldk.py)")
    d.add_argument("--aldk", action="store_true", help="adversarial distillation: critic on flows (WGAN-GP) "
                   "+ adversarial term in the student loss (same as --distill aldk)")
    d.add_argument("--distill", choices=["aldk", "l2"], default=None,
                   help="teacher term: aldk (adversarial) or l2 (flow regression baseline)")
    d.add_argument("--teacher", default=None, help="online teacher checkpoint weights/<run>[:STEP]: its flow is "
                   "computed under no_grad for the exact (augmented) pair the student sees")
    d.add_argument("--pretrained_flow_path", default="Teacher_deformations",
                   help="stored teacher flows: a store .h5, a published .pkl, or a folder of them; a folder "
                        "without flow files is searched for a subfolder named like the dataset JSON "
                        "(Teacher_deformations/Liver for datasets/liver.json). Stored flows turn augmentation off")
    d.add_argument("--beta", type=float, default=0.1, help="teacher weight of the gradient-penalty mixture")
    d.add_argument("--gamma", type=float, default=0.3, help="student loss = gamma*rec + (1-gamma)*distillation")
    d.add_argument("--lamb", type=float, default=0.1, help="gradient-penalty weight")
    d.add_argument("--aldk_learning_scheme", action="store_true",
                   help="LDR_ALDK scheme: distillation term on every 3rd step of the first 8000, else gamma=1")
    d.add_argument("--adv_loss", choices=["paper", "wgan"], default="paper",
                   help="student adversarial term: paper ||D(s)-D(t)||^2, or wgan -D(s)")
    d.add_argument("--gp_mix", choices=["beta", "uniform"], default="beta",
                   help="penalty point: beta*teacher + (1-beta)*student, or a U(0,1) mixture per pair")
    d.add_argument("--critic_steps", type=int, default=1, help="critic updates per student step")
    d.add_argument("--critic_lr", type=float, default=1e-4, help="critic Adam learning rate")
    return p.parse_args(argv)


def fail(message: str, code: int = 2):
    """Print one error line and exit. Errors re-raised from DataLoader workers carry the worker's
    traceback; only their final line (the original message) is kept."""
    lines = [l for l in str(message).strip().splitlines() if l.strip()]
    line = lines[-1] if lines else "unknown error"
    if len(lines) > 1 and "Error: " in line:
        line = line.split("Error: ", 1)[1]
    print(f"{os.path.basename(sys.argv[0]) or 'train.py'}: error: {line}", file=sys.stderr)
    sys.exit(code)


def load_dataset(path: str, paired: bool = False, splits=None, crop=None):
    """The dataset behind a JSON (RCN HDF5 layout or Learn2Reg NIfTI layout), or exit with one line."""
    try:
        return open_dataset(path, paired=paired, splits=splits, crop=tuple(crop) if crop else None)
    except DatasetError as e:
        fail(str(e))


def resolve_device(gpu: str) -> torch.device:
    ids = [g for g in str(gpu).split(",") if g.strip() != ""]
    if not ids or ids[0].strip() == "-1":
        return torch.device("cpu")
    if len(ids) > 1:
        fail("several GPUs are not supported yet; pass one id (e.g. -g 0)")
    if not torch.cuda.is_available():
        fail(f"-g {gpu}: CUDA is not available on this machine; use -g -1 for the CPU")
    return torch.device(f"cuda:{int(ids[0])}")


def stored_dataset(state: dict) -> str:
    """The training dataset named in a checkpoint: as typed if it exists from here, else its absolute path."""
    given = state["train_args"].get("dataset")
    absolute = state["train_args"].get("dataset_abspath")
    if not given:
        fail(f"{state['path']}: checkpoint names no dataset; pass -d path/to/dataset.json")
    if not os.path.exists(given) and absolute and os.path.exists(absolute):
        return absolute
    return given


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


def setup_distillation(args, dataset, image_size, device):
    """``(distiller, online_teacher, teacher_flows, pairs)`` for ``--aldk`` / ``--distill``, or Nones."""
    from data_util.teacher_flows import TeacherFlowError, TeacherFlows
    from network.aldk import DistillConfig, Distiller, OnlineTeacher

    if args.aldk and args.distill not in (None, "aldk"):
        fail(f"--aldk conflicts with --distill {args.distill}")
    mode = "aldk" if args.aldk else args.distill
    if mode is None:
        if args.teacher:
            fail("--teacher needs --aldk or --distill l2")
        return None, None, None, None
    try:
        config = DistillConfig(mode=mode, beta=args.beta, gamma=args.gamma, lamb=args.lamb, adv_loss=args.adv_loss,
                               gp_mix=args.gp_mix, critic_steps=args.critic_steps, critic_lr=args.critic_lr,
                               learning_scheme=args.aldk_learning_scheme)
    except ValueError as e:
        fail(str(e))
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


def forward_and_loss(model, loss_fn, batch: dict, symmetric: bool = False):
    """One training forward pass: ``(out, loss, components)``.

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
        out = model(batch[f"voxel{f}"], batch[f"voxel{m}"])
        loss, comps = loss_fn(batch[f"voxel{f}"], out, moving=batch[f"voxel{m}"], fixed_seg=batch.get(f"seg{f}"),
                              moving_seg=batch.get(f"seg{m}"), seg_valid=valid)
        results.append((out, loss, comps))
    if len(results) == 1:
        return results[0]
    n = len(results)
    comps = {k: sum(r[2][k] for r in results) / n for k in results[0][2]}
    return results[0][0], sum(r[1] for r in results) / n, comps


def learning_rate(base: float, step: int, round_steps: int, schedule: str = "rcn") -> float:
    """``constant``: ``base``; ``rcn``: :func:`rcn_learning_rate` of epoch ``step // round_steps``."""
    if schedule == "constant":
        return base
    return rcn_learning_rate(base, step // max(1, round_steps))


def rcn_learning_rate(base: float, epoch: int) -> float:
    """RCN schedule: ``base`` for epochs 0-2, then halved every epoch."""
    return base * (0.5 ** max(0, epoch - 2))


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class LazyWriter:
    """TensorBoard writer that creates ``logs/<output>`` only when the first scalar arrives."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self._writer = None

    def _get(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(self.log_dir)
        return self._writer

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._get().add_scalar(tag, value, step)

    def add_image(self, tag: str, img_chw_uint8, step: int) -> None:
        """Log a uint8 ``(C, H, W)`` image (e.g. :func:`network.visualization.tensorboard_panel`)."""
        self._get().add_image(tag, img_chw_uint8, step, dataformats="CHW")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


@torch.no_grad()
def validate(model, loader, device, class_values, rep=None, l2r_labels=None):
    """``(metrics, panel)``: mean metrics over the validation pairs (same metrics module as ``eval.py``)
    and the :func:`~network.visualization.tensorboard_panel` uint8 ``(1, H, W)`` of the first pair
    (``None`` if the loader is empty). The panel reuses the first batch's forward pass (eval mode,
    each pair is registered independently), so it costs one grid warp. With ``l2r_labels`` the
    Learn2Reg scores (:func:`~network.metrics.l2r_pair_scores`) are added as ``l2r_<key>``."""
    from network.visualization import tensorboard_panel

    model.eval()
    rows, panel = [], None
    try:
        for batch in loader:
            batch = to_device(batch, device)
            out = model(batch["voxel1"], batch["voxel2"], rep=rep)
            batch_rows = pair_metrics(batch, out["flow"], class_values)
            if l2r_labels:
                spacing = batch.get("spacing1")
                scores = l2r_pair_scores(batch["seg1"], batch["seg2"], out["flow"], l2r_labels,
                                         spacing=None if spacing is None else spacing.cpu())
                for row, score in zip(batch_rows, scores):
                    row.update({f"l2r_{k}": v for k, v in score.items()})
            rows += batch_rows
            if panel is None:
                panel = tensorboard_panel(batch["voxel1"][0], batch["voxel2"][0], out["warped"][0], out["flow"][0])
    finally:
        model.train()
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, float)})
    return {k: v[0] for k, v in summarise(rows, keys).items()}, panel


def distillation_step(distiller, teacher, batch, student_flow, rec_loss, rec_comps, step):
    """Critic update(s), then the student loss ``γ·rec + (1-γ)·distillation`` with all components."""
    teacher_flow = teacher(batch["voxel1"], batch["voxel2"]) if teacher is not None else batch["teacher_flow"]
    try:
        critic_comps = distiller.critic_step(teacher_flow, student_flow)
    except FloatingPointError as e:
        fail(f"{e} at step {step} (pairs {list(batch['id1'])} / {list(batch['id2'])})")
    loss, comps = distiller.student_loss(rec_loss, rec_comps, student_flow, teacher_flow, step)
    comps.update(critic_comps)
    return loss, comps


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.gpu)

    state = None
    if args.checkpoint:
        try:
            state = load_checkpoint(args.checkpoint)
        except CheckpointError as e:
            fail(str(e))
        if args.dataset is None:
            args.dataset = stored_dataset(state)
    if not args.dataset:
        fail("no dataset: pass -d path/to/dataset.json")
    if args.crop is None and state is not None:
        args.crop = state["train_args"].get("crop")
    dataset = load_dataset(args.dataset, args.paired, ["1"], args.crop)

    try:
        if state is not None:
            config = ModelConfig.from_dict(state["model_config"])
            config.rep = args.rep or config.rep
            if args.deep_supervision and not config.deep_supervision:
                fail(f"{state['path']}: --deep_supervision: this checkpoint was trained without deep-supervision heads")
        else:
            config = ModelConfig(base_network=args.base_network, n_cascades=args.n_cascades,
                                 preset=args.preset or DEFAULT_PRESET[args.base_network], image_size=dataset.image_size,
                                 channels=args.channels or DEFAULT_CHANNELS.get(args.base_network, 16),
                                 rep=args.rep or 1, deep_supervision=args.deep_supervision)
        if tuple(config.image_size) != tuple(dataset.image_size):
            fail(f"{args.dataset}: image size {tuple(dataset.image_size)} differs from the model's "
                 f"{tuple(config.image_size)}")
        model = build_model(config).to(device)
    except (SizeError, ValueError) as e:
        fail(f"{args.dataset}: {e}")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    start_step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        if state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        if args.output is None:
            args.output = os.path.basename(os.path.dirname(os.path.abspath(state["path"])))
    if args.output is None:
        args.output = f"{time.strftime('%b%d-%H%M')}_{config.n_cascades}cas_{config.base_network}"

    total_steps = args.steps if args.steps is not None else int(round(args.round * args.epochs))
    base_lr = 5e-6 if args.finetune else args.lr
    weights_dir = os.path.join("weights", args.output)
    logs_dir = os.path.join("logs", args.output)
    n_params = count_parameters(model)
    print(f"model: preset={config.preset} base={config.base_network} n={config.n_cascades} rep={config.rep} "
          f"affine={config.affine} size={config.image_size} params={n_params:,}")
    print(f"training steps {start_step} -> {total_steps}, batch {args.batch}, device {device}, output {weights_dir}")

    distiller, teacher, teacher_flows, teacher_pairs = setup_distillation(args, dataset, config.image_size, device)
    if distiller is not None and state is not None and state.get("distill"):
        distiller.load_state_dict(state["distill"])
    augment = "none" if args.no_augment or teacher_flows is not None else args.augment
    try:
        train_loader = make_dataset_loader(dataset, "1", args.batch, loop=True, num_workers=args.workers,
                                           seed=args.seed + start_step, pairs=teacher_pairs, teacher_flows=teacher_flows)
        val_loader = None
        if args.val_steps > 0 and "2" in dataset.scheme_names:
            dataset.validate(["2"])
            val_loader = make_dataset_loader(dataset, "2", args.batch, loop=False, num_workers=0,
                                             limit=args.val_pairs)
    except DatasetError as e:
        fail(str(e))

    from tqdm import tqdm
    writer = LazyWriter(logs_dir)
    class_values = list(dataset.segmentation_class_value.values()) if dataset.segmentation_class_value else None
    is_l2r = getattr(dataset, "image_type", None) == "learn2reg"
    loss_fn = RegistrationLoss(similarity=args.sim, reg_weight=args.reg_weight, regulariser=args.regulariser,
                               dice_weight=args.dice_weight, label_values=class_values or [255.0],
                               mask_overlap=args.mask_overlap)
    aug_gen = torch.Generator(device="cpu").manual_seed(args.seed + 7919 * start_step)
    train_args = dict(vars(args), dataset_abspath=os.path.abspath(args.dataset))

    def checkpoint(step):
        epoch = step // max(1, args.round)
        extra = {"n_params": n_params}
        if distiller is not None:
            extra["distill"] = distiller.state_dict()
        return save_checkpoint(weights_dir, model, config.to_dict(), step, epoch, optimizer, train_args, extra=extra)

    model.train()
    step = start_step
    batches = iter(train_loader)
    bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, disable=None)
    t0 = time.time()
    try:
        while step < total_steps:
            lr = learning_rate(base_lr, step, args.round, args.lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                batch = next(batches)
            except (DatasetError, TeacherFlowError) as e:
                fail(str(e))
            if augment == "ffd":
                batch = augment_moving(batch, aug_gen)
            elif augment == "affine":
                batch = augment_pair_affine(batch, aug_gen, *args.affine_range)
            batch = to_device(batch, device)
            out, loss, comps = forward_and_loss(model, loss_fn, batch, args.symmetric)
            if distiller is not None:
                loss, comps = distillation_step(distiller, teacher, batch, out["flow"], loss, comps, step)
            if not torch.isfinite(loss):
                fail(f"loss became {float(loss)} at step {step} (pairs {list(batch['id1'])} / {list(batch['id2'])}); "
                     "no checkpoint written for this step")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            if step % 10 == 0 or step == total_steps:
                for k, v in comps.items():
                    writer.add_scalar(f"loss/{k}", v.item(), step)
                writer.add_scalar("lr", lr, step)
                shown = {k: f"{comps[k].item():.4f}" for k in ("sim", "dice", "rec_sim", "adv", "l2", "wdist")
                         if k in comps}
                bar.set_postfix(loss=f"{loss.item():.4f}", **shown)
            if val_loader is not None and (step % args.val_steps == 0 or step == total_steps):
                metrics, panel = validate(model, val_loader, device, class_values,
                                          l2r_labels=class_values if is_l2r else None)
                for k, v in metrics.items():
                    if math.isfinite(v):
                        writer.add_scalar(f"val/{k}", v, step)
                if panel is not None:
                    writer.add_image("val/panel", panel, step)
                extra = (f" | L2R dice {metrics['l2r_dice']:.4f} hd95 {metrics['l2r_hd95']:.3f}" if is_l2r else "")
                tqdm.write(f"step {step}: val dice {metrics['dice']:.4f} (before {metrics['dice_before']:.4f}) "
                           f"jacc {metrics['jacc']:.4f} jac_nonpos {metrics['jac_nonpos_pct']:.3f}%{extra}")
            if step % args.save_steps == 0 or step == total_steps:
                checkpoint(step)
    except KeyboardInterrupt:
        bar.close()
        path = checkpoint(step)
        print(f"interrupted: saved {path}")
        return 130
    bar.close()
    writer.close()
    print(f"done: {step} steps in {time.time() - t0:.1f} s; checkpoint {os.path.join(weights_dir, f'ckpt_{step}.pt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
