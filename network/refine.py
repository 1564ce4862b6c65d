"""Instance optimisation: register one pair without training, or refine a network's flow.

Two stages, each coarse to fine, both plain Adam on the pair itself:

* :func:`affine_stage`: rigid (rotation + translation), then 12-dof affine, about the grid centre;
* :func:`deformable_stage`: a dense displacement (or a stationary velocity, integrated by scaling and
  squaring) on a coarse lattice, smoothed every step, with a diffusion penalty; optionally inverse
  consistent (a backward field and a penalty on the two compositions).

:func:`register_pair` runs both (or refines a given initial flow, e.g. a network's). Conventions as in
:mod:`network.layers`: images ``(1, 1, X, Y, Z)`` on one grid with isotropic spacing, flows
``(1, 3, X, Y, Z)`` pull-back displacements in voxels of that grid (``warped(p) = moving(p + u(p))``).

Similarities (:data:`SIMILARITIES`, all "lower is better", weighted by an optional fixed-image mask):
``lncc`` (local squared correlation, contrast-sign invariant), ``mind`` (squared distance of MIND-SSC
descriptors, :func:`mind_ssc`, for different scanners and contrasts), ``ncc`` (global correlation) and
``mse`` (same-modality CT).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .layers import compose_flows, identity_grid, warp
from .losses import LocalSquaredCorrelation, box_mean, mind_ssc

SIMILARITIES = ("lncc", "mind", "ncc", "mse")
AFFINE_MODES = ("none", "rigid", "affine")


@dataclass
class RefineConfig:
    """Every option of :func:`register_pair`; ``asdict`` of it goes into reports.

    Levels are downsampling factors of the input grid, coarse to fine; ``iters`` are Adam steps per
    level. ``reg_weight`` multiplies the mean squared spatial gradient of the displacement
    (dimensionless, so one weight serves every level). ``smooth`` is the number of 3^3 box-filter
    passes applied to the displacement before every use (a cheap B-spline-like parameterisation).
    """
    similarity: str = "lncc"
    affine_similarity: str = ""
    affine: str = "affine"
    affine_levels: tuple = (4, 2)
    affine_iters: tuple = (30, 30)
    affine_lr: float = 0.01
    deformable: bool = True
    levels: tuple = (4, 2)
    iters: tuple = (30, 15)
    lr: float = 0.5
    reg_weight: float = 0.3
    smooth: int = 2
    diffeomorphic: bool = False
    squaring_steps: int = 6
    inverse_consistency: float = 0.0
    lncc_window: int = 5
    mind_radius: int = 1
    mind_dilation: int = 2
    com_init: bool = True

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad option."""
        for name in ("similarity", "affine_similarity"):
            value = getattr(self, name)
            if value not in SIMILARITIES and not (name == "affine_similarity" and value == ""):
                raise ValueError(f"{name} {value!r}: choose from {', '.join(SIMILARITIES)}")
        if self.affine not in AFFINE_MODES:
            raise ValueError(f"affine {self.affine!r}: choose from {', '.join(AFFINE_MODES)}")
        for name in ("affine_levels", "levels"):
            if not all(isinstance(f, int) and f >= 1 for f in getattr(self, name)):
                raise ValueError(f"{name} must be integers >= 1, got {getattr(self, name)}")
        for levels, iters in (("affine_levels", "affine_iters"), ("levels", "iters")):
            if len(getattr(self, levels)) != len(getattr(self, iters)):
                raise ValueError(f"{iters} needs one count per level of {levels} "
                                 f"({len(getattr(self, levels))}), got {getattr(self, iters)}")
            if not all(isinstance(n, int) and n >= 0 for n in getattr(self, iters)):
                raise ValueError(f"{iters} must be integers >= 0, got {getattr(self, iters)}")
        for name in ("affine_lr", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("reg_weight", "inverse_consistency"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lncc_window < 1 or self.lncc_window % 2 != 1:
            raise ValueError(f"lncc_window must be odd and positive, got {self.lncc_window}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class RefineResult:
    """``flow``: ``(1, 3, X, Y, Z)`` total pull-back flow (voxels). ``affine``: ``4x4`` voxel matrix
    ``A`` of the affine stage (moving is read at ``A p``), or ``None``. ``levels``: one dict per level
    (stage, factor, shape, iterations, loss at start and end, seconds)."""
    flow: torch.Tensor
    affine: np.ndarray | None = None
    levels: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)


# ---- similarities -------------------------------------------------------------------------------

def _weighted_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``x`` ``(1, C, ...)`` over channels and voxels, voxels weighted by ``mask`` ``(1, 1, ...)``."""
    if mask is None:
        return x.mean()
    return (x.mean(1, keepdim=True) * mask).sum() / mask.sum().clamp_min(1e-6)


def ncc_loss(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - Pearson correlation`` over the (masked) voxels; scalar."""
    w = torch.ones_like(fixed) if mask is None else mask.expand_as(fixed)
    total = w.sum().clamp_min(1e-6)
    a = fixed - (fixed * w).sum() / total
    b = warped - (warped * w).sum() / total
    cov = (w * a * b).sum()
    return 1.0 - cov / torch.sqrt((w * a * a).sum() * (w * b * b).sum() + 1e-12)


class Similarity:
    """A similarity by name: :meth:`features` (MIND-SSC descriptors for ``mind``, the image itself
    otherwise) and :meth:`bind`, which precomputes what depends on the fixed side only and returns
    ``loss(warped_features) -> scalar``."""

    def __init__(self, name: str, lncc_window: int = 5, mind_radius: int = 1, mind_dilation: int = 2):
        if name not in SIMILARITIES:
            raise ValueError(f"similarity {name!r}: choose from {', '.join(SIMILARITIES)}")
        self.name, self.window = name, lncc_window
        self.mind_radius, self.mind_dilation = mind_radius, mind_dilation

    def features(self, image: torch.Tensor) -> torch.Tensor:
        if self.name == "mind":
            return mind_ssc(image, self.mind_radius, self.mind_dilation)
        return image

    def bind(self, fixed: torch.Tensor, mask: torch.Tensor | None = None):
        if self.name == "lncc":
            return _LocalCorrelation(fixed, self.window, mask)
        if self.name == "ncc":
            return lambda warped: ncc_loss(fixed, warped, mask)
        return lambda warped: _weighted_mean((fixed - warped) ** 2, mask)   # mse, and mind on descriptors

    def __call__(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None):
        return self.bind(fixed, mask)(warped)


class _LocalCorrelation:
    """``1 - local squared correlation`` against one fixed image (its box sums computed once),
    averaged over the (masked) voxels."""

    def __init__(self, fixed: torch.Tensor, window: int, mask: torch.Tensor | None):
        self.correlation, self.mask = LocalSquaredCorrelation(fixed, window), mask

    def __call__(self, warped: torch.Tensor) -> torch.Tensor:
        return _weighted_mean(1.0 - self.correlation(warped), self.mask)


# ---- grids and flows at several resolutions -------------------------------------------------------

def level_shape(shape, factor: int) -> tuple:
    """Grid of a level: ``(n - 1) / factor + 1`` points per axis (at least 4), same corners."""
    return tuple(max(4, int(round((n - 1) / factor)) + 1) if factor > 1 else int(n) for n in shape)


def _prefilter(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Anti-alias before shrinking by ``factor``: two box filters of about ``factor`` voxels."""
    window = 2 * int(round(factor / 2)) + 1
    return box_mean(box_mean(x, window), window)


def resize_image(x: torch.Tensor, shape) -> torch.Tensor:
    """``x`` on a grid of ``shape`` with the same corner points (blurred first when shrinking)."""
    shape = tuple(int(s) for s in shape)
    if shape == tuple(x.shape[2:]):
        return x
    factor = max((a - 1) / max(b - 1, 1) for a, b in zip(x.shape[2:], shape))
    if factor > 1:
        x = _prefilter(x, factor)
    return F.interpolate(x, size=shape, mode="trilinear", align_corners=True)


class Pyramid:
    """One image at several grid sizes (same corners), each level made from the next finer one
    already made (:func:`resize_image`) and kept."""

    def __init__(self, image: torch.Tensor):
        self.levels = {tuple(image.shape[2:]): image}

    def build(self, shapes) -> "Pyramid":
        """Make the levels of ``shapes`` finest first (each from the one before)."""
        for shape in sorted((tuple(s) for s in shapes), key=lambda s: -int(np.prod(s))):
            self.at(shape)
        return self

    def at(self, shape) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        if shape not in self.levels:
            finer = [s for s in self.levels if all(a >= b for a, b in zip(s, shape))]
            source = min(finer, key=lambda s: int(np.prod(s)))
            self.levels[shape] = resize_image(self.levels[source], shape)
        return self.levels[shape]


def resize_flow(flow: torch.Tensor, shape) -> torch.Tensor:
    """A voxel flow on a grid of ``shape`` with the same corners: interpolated, rescaled per axis."""
    shape = tuple(int(s) for s in shape)
    old = tuple(flow.shape[2:])
    if shape == old:
        return flow
    scale = torch.tensor([(b - 1) / max(a - 1, 1) for a, b in zip(old, shape)], dtype=flow.dtype,
                         device=flow.device).view(1, 3, 1, 1, 1)
    return F.interpolate(flow, size=shape, mode="trilinear", align_corners=True) * scale


def smooth_flow(flow: torch.Tensor, passes: int) -> torch.Tensor:
    for _ in range(passes):
        flow = box_mean(flow, 3)
    return flow


def diffusion(flow: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of a voxel flow over the three axes (dimensionless); scalar."""
    return sum(torch.diff(flow, dim=a).pow(2).mean() for a in (2, 3, 4))


def integrate_velocity(velocity: torch.Tensor, steps: int) -> torch.Tensor:
    """``exp(velocity)`` by scaling and squaring: ``u <- v / 2^steps``, then ``steps`` times ``u <- u∘u``."""
    flow = velocity / (2 ** steps)
    for _ in range(steps):
        flow = compose_flows(flow, flow)
    return flow


def _mask_at(mask: torch.Tensor | None, shape) -> torch.Tensor | None:
    return None if mask is None else resize_image(mask.float(), shape)


# ---- affine stage --------------------------------------------------------------------------------

def rotation_matrix(omega: torch.Tensor) -> torch.Tensor:
    """Rotation ``(3, 3)`` of the rotation vector ``omega`` (axis * angle in radians), Rodrigues."""
    theta = torch.sqrt((omega * omega).sum() + 1e-12)
    k = omega / theta
    K = torch.zeros(3, 3, dtype=omega.dtype, device=omega.device)
    K[0, 1], K[0, 2], K[1, 0], K[1, 2], K[2, 0], K[2, 1] = -k[2], k[1], k[2], -k[0], -k[1], k[0]
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device)
    return eye + torch.sin(theta) * K + (1 - torch.cos(theta)) * (K @ K)


class AffineParameters(torch.nn.Module):
    """``y = M (x - c) / h + c / h + t`` in units of ``h`` voxels about the grid centre ``c``, with
    ``M = R(omega) (I + delta)`` (``delta`` fixed at 0 in rigid mode). :meth:`matrix` gives the 4x4
    voxel matrix (``y = A p``) on a grid of ``shape``."""

    def __init__(self, translation_voxels=None, shape=None):
        super().__init__()
        self.omega = torch.nn.Parameter(torch.zeros(3))
        self.delta = torch.nn.Parameter(torch.zeros(3, 3))
        self.t = torch.nn.Parameter(torch.zeros(3))
        if translation_voxels is not None:
            with torch.no_grad():
                self.t.copy_(torch.as_tensor(translation_voxels, dtype=torch.float32).cpu() / self.half(shape))

    @staticmethod
    def half(shape) -> float:
        return max(max(int(s) for s in shape) - 1, 1) / 2.0

    def linear(self) -> torch.Tensor:
        return rotation_matrix(self.omega) @ (torch.eye(3, device=self.delta.device) + self.delta)

    def matrix(self, shape) -> torch.Tensor:
        """``4x4`` ``A`` (voxels of a grid of ``shape``; same corners at every level)."""
        c = (torch.tensor([float(s) for s in shape], device=self.t.device) - 1) / 2
        M = self.linear()
        top = torch.cat([M, (c - M @ c + self.t * self.half(shape))[:, None]], dim=1)
        bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], device=self.t.device)
        return torch.cat([top, bottom], dim=0)

    def flow(self, shape) -> torch.Tensor:
        """The pull-back voxel flow ``A p - p`` ``(1, 3, *shape)``."""
        return _matrix_flow(self.matrix(shape), shape)


def centre_of_mass(image: torch.Tensor) -> torch.Tensor:
    """Intensity centre of mass ``(3,)`` in voxels of ``image`` ``(1, 1, ...)`` (above its minimum)."""
    w = (image - image.min()).clamp_min(0)[0, 0]
    total = w.sum().clamp_min(1e-12)
    p = identity_grid(tuple(image.shape[2:]), device=image.device).reshape(3, -1)
    return (p * w.reshape(1, -1)).sum(1) / total


@functools.lru_cache(maxsize=8)
def _points(shape, device) -> torch.Tensor:
    return identity_grid(tuple(shape), device=device).reshape(3, -1)


def _matrix_flow(A: torch.Tensor, shape) -> torch.Tensor:
    p = _points(tuple(shape), A.device).to(A.dtype)
    return ((A[:3, :3] - torch.eye(3, device=A.device, dtype=A.dtype)) @ p + A[:3, 3:]).reshape(1, 3, *shape)


def affine_matrix_flow(A: np.ndarray, shape, device=None) -> torch.Tensor:
    """Voxel flow ``A p - p`` ``(1, 3, *shape)`` of a 4x4 voxel matrix (moving read at ``A p``)."""
    return _matrix_flow(torch.as_tensor(np.asarray(A), dtype=torch.float32, device=device), shape)


class Adam:
    """Adam (Kingma & Ba) on a few tensors with a cosine learning-rate decay to ``lr / 10``.

    Written out because constructing ``torch.optim.Adam`` imports ``torch._dynamo`` (about 1.6 s
    on 2 CPU cores), more than a whole refinement level takes; same update as
    ``torch.optim.Adam`` with its defaults.
    """

    def __init__(self, params, lr: float, steps: int, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.steps, self.betas, self.eps = list(params), lr, max(steps, 1), betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def current_lr(self) -> float:
        low = self.lr / 10
        return low + (self.lr - low) * (1 + math.cos(math.pi * min(self.t, self.steps) / self.steps)) / 2

    @torch.no_grad()
    def step(self) -> None:
        lr = self.current_lr()
        self.t += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-lr / (1 - b1 ** self.t))
            p.grad = None


def _adam_level(params, loss_fn, iters: int, lr: float):
    """``iters`` Adam steps; returns (first loss, last loss)."""
    if iters == 0:
        with torch.no_grad():
            value = float(loss_fn())
        return value, value
    opt = Adam(params, lr, iters)
    first = last = None
    for _ in range(iters):
        loss = loss_fn()
        loss.backward()
        opt.step()
        last = float(loss.detach())
        first = last if first is None else first
    return first, last


def affine_stage(fixed, moving, config: RefineConfig, mask: torch.Tensor | None = None, log=None) -> tuple:
    """Rigid then (``config.affine == "affine"``) 12-dof registration of ``moving`` to ``fixed``
    (images ``(1, 1, X, Y, Z)`` or their :class:`Pyramid`).

    Returns ``(A, levels)``: the 4x4 voxel matrix (moving is read at ``A p``) and the per-level log.
    """
    fixed, moving = _pyramid(fixed), _pyramid(moving)
    sim = Similarity(config.affine_similarity or config.similarity, config.lncc_window, config.mind_radius,
                     config.mind_dilation)
    shape = tuple(fixed.levels)[0]
    start = None
    if config.com_init:
        start = (centre_of_mass(moving.at(shape)) - centre_of_mass(fixed.at(shape))).tolist()
    params = AffineParameters(start, shape).to(fixed.at(shape).device)
    phases = ["rigid"] + (["affine"] if config.affine == "affine" else [])
    levels, prepared = [], {}
    for phase in phases:
        chosen = [params.omega, params.t] + ([params.delta] if phase == "affine" else [])
        for factor, iters in zip(config.affine_levels, config.affine_iters):
            t0 = time.perf_counter()
            lshape = level_shape(shape, factor)
            if factor not in prepared:
                f_feat = sim.features(fixed.at(lshape))
                prepared[factor] = (sim.bind(f_feat, _mask_at(mask, lshape)), sim.features(moving.at(lshape)))
            loss, m_feat = prepared[factor]
            first, last = _adam_level(chosen, lambda: loss(warp(m_feat, params.flow(lshape))), iters,
                                      config.affine_lr)
            levels.append(_level_entry(f"{phase}", factor, lshape, iters, first, last, t0, log))
    with torch.no_grad():
        A = params.matrix(shape).cpu().double().numpy()
    return A, levels


def _level_entry(stage, factor, shape, iters, first, last, t0, log) -> dict:
    entry = {"stage": stage, "factor": factor, "shape": list(shape), "iterations": iters,
             "loss_start": first, "loss_end": last, "seconds": time.perf_counter() - t0}
    if log is not None:
        log(f"refine {stage:10s} level 1/{factor}: {'x'.join(map(str, shape))}, {iters} iterations, "
            f"loss {first:.4f} -> {last:.4f} ({entry['seconds']:.2f} s)")
    return entry


# ---- deformable stage ----------------------------------------------------------------------------

class DisplacementModel:
    """The deformable parameters of one level: a forward (and, for inverse consistency, a backward)
    field on the level grid, turned into displacements by smoothing (and integration)."""

    def __init__(self, config: RefineConfig, forward: torch.Tensor, backward: torch.Tensor | None):
        self.config = config
        self.forward = forward.detach().clone().requires_grad_(True)
        self.backward = None if backward is None else backward.detach().clone().requires_grad_(True)

    def params(self):
        return [self.forward] + ([self.backward] if self.backward is not None else [])

    def displacement(self, field: torch.Tensor) -> torch.Tensor:
        field = smooth_flow(field, self.config.smooth)
        if self.config.diffeomorphic:
            return integrate_velocity(field, self.config.squaring_steps)
        return field


def _pyramid(image) -> Pyramid:
    return image if isinstance(image, Pyramid) else Pyramid(image)


def deformable_stage(fixed, moving, config: RefineConfig, mask: torch.Tensor | None = None, log=None) -> tuple:
    """Deformable registration of ``moving`` (already brought near ``fixed``) to ``fixed``.

    Returns ``(v, levels)``: the displacement ``(1, 3, X, Y, Z)`` on the input grid (voxels) and the
    per-level log. With ``config.inverse_consistency > 0`` a backward field ``w`` is optimised
    too, with ``|v∘w|^2 + |w∘v|^2`` (both ways identity) weighted by that value.
    """
    sim = Similarity(config.similarity, config.lncc_window, config.mind_radius, config.mind_dilation)
    fixed, moving = _pyramid(fixed), _pyramid(moving)
    shape = tuple(fixed.levels)[0]
    device = fixed.at(shape).device
    for image in (fixed, moving):
        image.build(level_shape(shape, f) for f in config.levels)
    symmetric = config.inverse_consistency > 0
    forward = backward = None
    levels = []
    for factor, iters in zip(config.levels, config.iters):
        t0 = time.perf_counter()
        lshape = level_shape(shape, factor)
        f_feat = sim.features(fixed.at(lshape))
        m_feat = sim.features(moving.at(lshape))
        lmask = _mask_at(mask, lshape)
        forward_sim = sim.bind(f_feat, lmask)
        backward_sim = sim.bind(m_feat) if symmetric else None
        zeros = torch.zeros(1, 3, *lshape, device=device)
        forward = zeros if forward is None else resize_flow(forward, lshape)
        if symmetric:
            backward = zeros if backward is None else resize_flow(backward, lshape)
        model = DisplacementModel(config, forward, backward)

        def loss_fn():
            v = model.displacement(model.forward)
            loss = forward_sim(warp(m_feat, v)) + config.reg_weight * diffusion(v)
            if symmetric:
                w = model.displacement(model.backward)
                loss = loss + backward_sim(warp(f_feat, w)) + config.reg_weight * diffusion(w)
                loss = loss + config.inverse_consistency * (compose_flows(v, w).pow(2).mean()
                                                            + compose_flows(w, v).pow(2).mean())
            return loss

        # lr in voxels of the level: the same physical step at every level
        first, last = _adam_level(model.params(), loss_fn, iters, config.lr)
        forward = model.forward.detach()
        backward = model.backward.detach() if symmetric else None
        levels.append(_level_entry("deformable", factor, lshape, iters, first, last, t0, log))
    with torch.no_grad():
        v = DisplacementModel(config, forward, None).displacement(forward)
        v = resize_flow(v, shape)
    return v, levels


# ---- both stages ---------------------------------------------------------------------------------

def register_pair(fixed: torch.Tensor, moving: torch.Tensor, config: RefineConfig | None = None,
                  init_flow: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                  log=None, network=None) -> RefineResult:
    """Register ``moving`` to ``fixed`` (``(1, 1, X, Y, Z)`` float32, CPU or GPU).

    Without ``init_flow``: affine stage (``config.affine``), then, when ``network`` is given
    (``network(fixed, moving) -> flow (1, 3, X, Y, Z)``), the network on the moving image resampled
    through the affine (``A (p + u(p))``, composed exactly), then the deformable stage. With
    ``init_flow`` ``(1, 3, X, Y, Z)`` (e.g. a network's flow), the affine stage is skipped and the
    deformable stage refines that flow. The result's flow is ``init ∘ v``
    (:func:`~network.layers.compose_flows`): moving is read at ``p + v(p) + init(p + v(p))``.
    ``mask`` ``(1, 1, X, Y, Z)``: fixed-image region the similarity is computed in (default: everywhere).
    """
    config = config or RefineConfig()
    config.check()
    for name, x in (("fixed", fixed), ("moving", moving)):
        if x.dim() != 5 or tuple(x.shape[:2]) != (1, 1):
            raise ValueError(f"{name} image must be (1, 1, X, Y, Z), got {tuple(x.shape)}")
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {tuple(fixed.shape[2:])} and moving {tuple(moving.shape[2:])} grids differ")
    if init_flow is not None and tuple(init_flow.shape) != (1, 3, *fixed.shape[2:]):
        raise ValueError(f"initial flow must be (1, 3, {', '.join(map(str, fixed.shape[2:]))}), "
                         f"got {tuple(init_flow.shape)}")
    with torch.inference_mode(False), torch.enable_grad():     # callers may be in inference mode
        fixed, moving = fixed.detach().float().clone(), moving.detach().float().clone()
        init_flow = None if init_flow is None else init_flow.detach().float().clone()
        mask = None if mask is None else mask.detach().float().clone()
        result = RefineResult(flow=torch.zeros(1, 3, *fixed.shape[2:], device=fixed.device))
        return _run_stages(fixed, moving, config, init_flow, mask, log, result, network)


def _linear_apply(A: np.ndarray, v: torch.Tensor) -> torch.Tensor:
    """``A_lin v`` for a voxel flow ``v`` (the displacement part of ``A (p + v) - p``)."""
    M = torch.as_tensor(A[:3, :3], dtype=v.dtype, device=v.device)
    return torch.einsum("cd,bd...->bc...", M, v)


def _run_stages(fixed, moving, config, init_flow, mask, log, result, network=None) -> RefineResult:
    shape = tuple(fixed.shape[2:])
    t0 = time.perf_counter()
    fixed_levels = Pyramid(fixed)
    if init_flow is None and config.affine != "none":
        result.affine, levels = affine_stage(fixed_levels, moving, config, mask, log)
        result.levels += levels
        init_flow = affine_matrix_flow(result.affine, shape, fixed.device)
    result.seconds["affine"] = time.perf_counter() - t0
    exact_affine = result.affine is not None
    if network is not None and init_flow is None:
        init_flow = torch.zeros(1, 3, *shape, device=fixed.device)
    if network is not None:
        t0 = time.perf_counter()
        with torch.no_grad():
            u = network(fixed, warp(moving, init_flow)).detach().float()
            init_flow = init_flow + (_linear_apply(result.affine, u) if exact_affine else u)
        exact_affine = False
        result.seconds["network"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if init_flow is None:
        init_flow = torch.zeros(1, 3, *shape, device=fixed.device)
    init_flow = init_flow.detach().float()
    if config.deformable and sum(config.iters) > 0:
        with torch.no_grad():
            start = warp(moving, init_flow)
        v, levels = deformable_stage(fixed_levels, start, config, mask, log)
        result.levels += levels
        with torch.no_grad():      # after a pure affine the composition is exact: A (p + v) - p
            result.flow = init_flow + _linear_apply(result.affine, v) if exact_affine else compose_flows(init_flow, v)
    else:
        result.flow = init_flow
    result.seconds["deformable"] = time.perf_counter() - t0
    return result
