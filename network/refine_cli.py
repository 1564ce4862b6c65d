"""Command-line options of instance optimisation (:mod:`network.refine`), shared by register.py and eval.py."""
from __future__ import annotations

import torch

from .cli import nonneg_float, nonneg_int, positive_float, positive_int
from .refine import SIMILARITIES, RefineConfig

DEFAULTS = RefineConfig()
DEFAULT_ITERS = DEFAULTS.iters[-1]     # Adam steps at the finest deformable level; coarser levels: twice as many
DEFAULT_SIMILARITY = DEFAULTS.similarity


def add_refine_args(parser, network_optional: bool = True) -> None:
    g = parser.add_argument_group("instance optimisation (--refine)")
    g.add_argument("--refine", nargs="?", type=nonneg_int, const=DEFAULT_ITERS, default=None, metavar="N",
                   help=f"optimise the registration on this pair: N Adam steps at the finest level, twice as "
                        f"many at each coarser one (N default {DEFAULT_ITERS}; 0: the affine stage only)")
    g.add_argument("--similarity", choices=("auto",) + SIMILARITIES, default="auto",
                   help=f"refinement similarity: lncc (local squared correlation, any contrast sign), mind "
                        f"(MIND-SSC descriptors, across scanners), ncc (global), mse (same-modality CT); "
                        f"auto: {DEFAULT_SIMILARITY} for CT and MRI alike")
    g.add_argument("--affine", choices=("auto", "none", "rigid", "affine"), default="auto",
                   help="affine stage first: rigid, rigid then 12-dof, or none; with -c the network then runs "
                        "on the aligned moving image; auto: "
                        + ("affine without -c, none with -c (the network's flow is the start)"
                           if network_optional else "none (the network's flow is the start)"))
    g.add_argument("--refine_from", choices=("flow", "affine"), default="flow",
                   help="with -c: start from the network's whole flow, or only its affine stem's output")
    g.add_argument("--refine_levels", type=positive_int, nargs="+", default=list(DEFAULTS.levels), metavar="F",
                   help="deformable levels as downsampling factors of the grid, coarse to fine")
    g.add_argument("--affine_levels", type=positive_int, nargs="+", default=list(DEFAULTS.affine_levels), metavar="F",
                   help="affine levels as downsampling factors, coarse to fine")
    g.add_argument("--affine_iters", type=positive_int, default=DEFAULTS.affine_iters[0],
                   help="Adam steps per affine level and phase (rigid, then 12-dof)")
    g.add_argument("--reg_weight", type=nonneg_float, default=DEFAULTS.reg_weight,
                   help="weight of the diffusion penalty (mean squared displacement gradient)")
    g.add_argument("--refine_lr", type=positive_float, default=DEFAULTS.lr,
                   help="Adam step of the displacement, voxels of each level (decays to a tenth)")
    g.add_argument("--lncc_window", type=positive_int, default=DEFAULTS.lncc_window, help="LNCC box width in voxels of each level (odd)")
    g.add_argument("--diffeomorphic", action="store_true",
                   help="optimise a stationary velocity field, integrated by scaling and squaring")
    g.add_argument("--inverse_consistency", type=nonneg_float, default=0.0,
                   help="also optimise the backward field, with this weight on |forward o backward|^2 (0: off)")


REFINE_ONLY = ("similarity", "affine", "refine_from", "refine_levels", "affine_levels", "affine_iters",
               "reg_weight", "refine_lr", "lncc_window", "diffeomorphic", "inverse_consistency")


AFFINE_STAGE = ("similarity", "affine", "affine_levels", "affine_iters")


def refine_arg_error(args, explicit, affine_without_refine: bool = False) -> str | None:
    """One error line for refinement options that cannot work together (None when fine).
    ``affine_without_refine``: the affine-stage options may also be given without ``--refine`` (an
    affine stage, then the network, as ``register.py -c`` runs it)."""
    if args.lncc_window % 2 != 1:
        return f"--lncc_window must be odd, got {args.lncc_window}"
    if args.refine_from == "affine" and args.affine not in ("auto", "none"):
        return "--refine_from affine starts from the network's affine stem; it cannot follow --affine " + args.affine
    if args.refine is None:
        given = [f for f in REFINE_ONLY if f in explicit and not (affine_without_refine and f in AFFINE_STAGE)]
        if given:
            return f"--{given[0]} needs --refine"
    return None


def stage_affine(args, with_network: bool, network_affine: str = "none") -> str:
    """The affine stage ``--affine`` asks for: ``auto`` is ``network_affine`` (what the checkpoint's
    model expects in front of it) with a network, else ``affine``."""
    if args.affine != "auto":
        return args.affine
    return network_affine if with_network else "affine"


def refine_config(args, with_network: bool, network_affine: str = "none") -> RefineConfig:
    """The :class:`RefineConfig` for parsed ``args`` (``with_network``: a checkpoint gives the start;
    ``network_affine``: the affine stage its model expects). Without ``--refine`` the deformable
    stage gets no iterations (an affine stage and the network only)."""
    affine = stage_affine(args, with_network, network_affine)
    levels = tuple(args.refine_levels)
    steps = args.refine if args.refine is not None else 0
    iters = tuple(steps * 2 ** (len(levels) - 1 - k) for k in range(len(levels)))
    similarity = DEFAULT_SIMILARITY if args.similarity == "auto" else args.similarity
    return RefineConfig(similarity=similarity, affine=affine, affine_levels=tuple(args.affine_levels),
                        affine_iters=(args.affine_iters,) * len(args.affine_levels), levels=levels, iters=iters,
                        lr=args.refine_lr, reg_weight=args.reg_weight, diffeomorphic=args.diffeomorphic,
                        inverse_consistency=args.inverse_consistency, lncc_window=args.lncc_window)


def network_start(model, fixed: torch.Tensor, moving: torch.Tensor, flow: torch.Tensor, start: str) -> torch.Tensor:
    """The refinement's initial flow: the network's ``flow``, or its affine stem's (``start="affine"``)."""
    if start == "flow":
        return flow
    if model.affine is None:
        raise ValueError("--refine_from affine: this model has no affine stem")
    with torch.no_grad():
        return model.affine(fixed, moving)["flow"].float()
