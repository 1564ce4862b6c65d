"""Recursive cascaded registration model and its named presets.

A model is an ordered list of stems: an optional affine stem, then ``n`` deformable cascades, each
applied ``rep`` times with shared weights (RCN order ``c0, c0, ..., c1, c1, ...``). Every stem sees the
fixed image and the moving image warped by the current aggregated flow; flows compose as
``agg_k = warp(agg_{k-1}, flow_k) + flow_k`` and the warped image of stage k is always
``warp(original_moving, agg_k)`` (docs/conventions.md).

The architecture is an explicit :class:`ModelConfig`, saved with every checkpoint.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .base_networks import AFFINE_NETWORKS, DEFORMABLE_NETWORKS, TF_PADDING_NETWORKS, SizeError, check_size
from .choices import DEFAULT_CHANNELS, DEFAULT_PRESET, PRESETS
from .layers import PADDINGS, SpatialTransformer, as_float32, compose_flows, float32_math

@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; stored in checkpoints as a plain dict."""

    base_network: str = "LDR"
    n_cascades: int = 1
    preset: str = "ldr-brain"
    image_size: tuple = (128, 128, 128)
    channels: int = 16
    rep: int = 1
    deep_supervision: bool = False                     # SpatialGradient only
    padding: str = "symmetric"                         # "tf": TF-1 "SAME" padding (imported weights)
    affine: str | None = field(default=None)          # filled from the preset
    nets_per_cascade: int = 0                          # filled from the preset
    flow_multiplier: float = 0.0                       # filled from the preset

    def __post_init__(self):
        if self.base_network not in DEFORMABLE_NETWORKS:
            raise ValueError(f"unknown base network {self.base_network!r}; choose from {sorted(DEFORMABLE_NETWORKS)}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        spec = PRESETS[self.preset]
        if self.base_network not in spec["allowed"]:
            raise ValueError(f"preset {self.preset!r} does not take base network {self.base_network!r}")
        if self.deep_supervision and self.base_network != "SpatialGradient":
            raise ValueError(f"deep supervision is only available for SpatialGradient, not {self.base_network}")
        if self.n_cascades < 1 or self.rep < 1 or self.channels < 1:
            raise ValueError("n_cascades, rep and channels must be >= 1")
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if self.padding == "tf" and self.base_network not in TF_PADDING_NETWORKS:
            raise ValueError(f"padding 'tf' is for the TF-1 networks {TF_PADDING_NETWORKS}, not {self.base_network}")
        self.image_size = tuple(int(s) for s in self.image_size)
        if len(self.image_size) != 3:
            raise ValueError(f"image_size must have 3 entries, got {self.image_size}")
        self.affine = spec["affine"]
        self.nets_per_cascade = spec["nets_per_cascade"]
        n = self.n_cascades
        self.flow_multiplier = 1.0 / (n + 1) if self.preset == "ldr-liver" else 1.0 / n

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)} - {"affine", "nets_per_cascade", "flow_multiplier"}
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})


@float32_math
def compose_stage(agg: torch.Tensor | None, flow: torch.Tensor, affine: dict | None = None) -> torch.Tensor:
    """Aggregate flow after a deformable stage: ``flow`` applied after ``agg`` (docs/conventions.md).

    Right after an affine stem (``affine`` given) the composition is exact and needs no resampling:
    ``A (x + u(x)) + b - x = affine(x) + A u(x)``.
    """
    if agg is None:
        return flow
    if affine is not None:
        return affine["flow"] + torch.einsum("bij,bj...->bi...", affine["A"], flow)
    return compose_flows(agg, flow)


@dataclass
class CascadeStage:
    """One step of :meth:`RecursiveCascadeNetwork.cascade`.

    ``flow``: this stem's own flow ``(B, 3, X, Y, Z)`` (voxels); ``agg``: the aggregated flow after it;
    ``warped``: ``warp(moving, agg)``; ``deformable``: False for the affine stem; ``output``: the stem's
    raw output (``{"flow", "W", "b", "A"}`` for the affine stem, ``deep_flows`` with deep
    supervision); ``prior``: the aggregated flow before it; ``after_affine``: the affine stem's output
    when this is the first deformable stage after it (exact composition).
    """

    flow: torch.Tensor
    agg: torch.Tensor
    warped: torch.Tensor
    deformable: bool
    output: dict
    prior: torch.Tensor | None = None
    after_affine: dict | None = None

    def compose(self, flow: torch.Tensor) -> torch.Tensor:
        """``flow`` applied after the stages before this one (as this stage's own flow is)."""
        return compose_stage(self.prior, flow, self.after_affine)


class RecursiveCascadeNetwork(nn.Module):
    """Affine stem (optional) + ``n`` deformable cascades x ``rep`` shared-weight repetitions.

    ``forward(fixed, moving)`` takes ``(B, 1, X, Y, Z)`` images in [0, 1] and returns a dict:

    * ``flows``: each stage's own flow ``(B, 3, X, Y, Z)`` (voxels), in application order;
    * ``agg_flows``: aggregated flow after each stage; ``agg_flows[-1]`` is the final flow;
    * ``deformable``: per stage, True for deformable stems (their flows get the smoothness loss);
    * ``warped``: ``warp(moving, final flow)`` (``(B, 1, X, Y, Z)``);
    * ``affine``: the affine stem's ``{"W", "b", "A"}`` or None;
    * ``deep_warped`` (training mode with deep supervision only): the moving image warped by every
      deep-supervision head's flow (composed after the stages before it), for the similarity loss.
    With ``return_all_warped=True`` also ``warped_all`` (every stage's warped moving image).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.stride = max(DEFORMABLE_NETWORKS[c.base_network].stride,
                          AFFINE_NETWORKS[c.affine].stride if c.affine else 1)
        check_size(c.image_size, self.stride, f"{c.base_network} ({c.preset})",
                   minimum=getattr(DEFORMABLE_NETWORKS[c.base_network], "min_size", None))
        options = {"padding": c.padding} if c.padding != "symmetric" else {}
        self.affine = (AFFINE_NETWORKS[c.affine](c.image_size, c.channels, **options) if c.affine else None)
        net = DEFORMABLE_NETWORKS[c.base_network]
        if c.deep_supervision:
            options["deep_supervision"] = True
        self.cascades = nn.ModuleList(
            net(c.channels, c.flow_multiplier, **options) for _ in range(c.n_cascades * c.nets_per_cascade))
        self.transformer = SpatialTransformer()
        self.activation_checkpointing = False      # how it trains, not what it is: not in the config

    @property
    def rep(self) -> int:
        return self.config.rep

    def stages(self, rep: int | None = None):
        """Deformable networks in application order (each repeated ``rep`` times, RCN order)."""
        rep = self.rep if rep is None else rep
        for net in self.cascades:
            for _ in range(rep):
                yield net

    def check_input(self, fixed: torch.Tensor, moving: torch.Tensor) -> None:
        for name, t in (("fixed", fixed), ("moving", moving)):
            if t.dim() != 5 or t.shape[1] != 1:
                raise ValueError(f"{name} image must have shape (B, 1, X, Y, Z), got {tuple(t.shape)}")
        if fixed.shape != moving.shape:
            raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} shapes differ")
        check_size(fixed.shape[2:], self.stride, f"{self.config.base_network} ({self.config.preset})",
                   minimum=getattr(DEFORMABLE_NETWORKS[self.config.base_network], "min_size", None))

    def _stem(self, net: nn.Module, fixed: torch.Tensor, moving: torch.Tensor) -> dict:
        """One stem's output, its tensors in float32 (they may be bfloat16 under autocast)."""
        output = net(fixed, moving)
        if fixed.is_floating_point() and torch.is_autocast_enabled(fixed.device.type):
            output = {k: ([as_float32(x) for x in v] if isinstance(v, list) else as_float32(v))
                      for k, v in output.items()}
        return output

    def _affine_stage(self, fixed, moving):
        affine = self._stem(self.affine, fixed, moving)
        return affine, self.transformer(moving, affine["flow"])

    def _deformable_stage(self, net, fixed, moving, warped, prior, after_affine):
        output = self._stem(net, fixed, warped)
        agg = compose_stage(prior, output["flow"], after_affine)
        return output, agg, self.transformer(moving, agg)

    def _run(self, stage, *args):
        """``stage(*args)``; with ``activation_checkpointing`` (and autograd on) its intermediate
        tensors -- the network's activations and the full-resolution warp and composition -- are
        recomputed in the backward pass instead of stored."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(stage, *args, use_reentrant=False)
        return stage(*args)

    def cascade(self, fixed: torch.Tensor, moving: torch.Tensor, rep: int | None = None):
        """The cascade loop (the only one: training, validation and the fast path all run it).

        Yields a :class:`CascadeStage` after each stem, in application order: the affine stem (if
        any), then every deformable stage. Each stem sees ``fixed`` and ``moving`` warped by the
        aggregated flow so far; the warped image is always resampled from the original ``moving``.
        """
        agg, affine, warped = None, None, moving
        if self.affine is not None:
            affine, warped = self._run(self._affine_stage, fixed, moving)
            agg = affine["flow"]
            yield CascadeStage(flow=agg, agg=agg, warped=warped, deformable=False, output=affine)
        for k, net in enumerate(self.stages(rep)):
            prior, after_affine = agg, (affine if k == 0 else None)
            output, agg, warped = self._run(self._deformable_stage, net, fixed, moving, warped, prior, after_affine)
            yield CascadeStage(flow=output["flow"], agg=agg, warped=warped, deformable=True, output=output,
                               prior=prior, after_affine=after_affine)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, rep: int | None = None,
                return_all_warped: bool = False) -> dict:
        self.check_input(fixed, moving)
        flows, agg_flows, deformable, warped_all, deep_warped = [], [], [], [], []
        affine, agg, warped = None, None, moving
        for stage in self.cascade(fixed, moving, rep):
            if not stage.deformable:
                affine = stage.output
            for deep in stage.output.get("deep_flows", []):
                deep_warped.append(self.transformer(moving, stage.compose(deep)))
            flows.append(stage.flow)
            agg_flows.append(stage.agg)
            deformable.append(stage.deformable)
            agg, warped = stage.agg, stage.warped
            if return_all_warped:
                warped_all.append(warped)
        out = {"flows": flows, "agg_flows": agg_flows, "deformable": deformable,
               "warped": warped, "affine": affine, "flow": agg}
        if return_all_warped:
            out["warped_all"] = warped_all
        if deep_warped:
            out["deep_warped"] = deep_warped
        return out


def build_model(config: ModelConfig | dict) -> RecursiveCascadeNetwork:
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    return RecursiveCascadeNetwork(config)


__all__ = ["ModelConfig", "RecursiveCascadeNetwork", "CascadeStage", "build_model", "PRESETS", "DEFAULT_PRESET", "DEFAULT_CHANNELS",
           "SizeError"]
