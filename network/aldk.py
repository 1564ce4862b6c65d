"""Distillation from a teacher: ALDK (LDR, Tran et al.) and flow regression, with balanced losses.

Flows are ``(B, 3, X, Y, Z)`` voxel displacements (fixed-to-moving pull-back). ``φ_t`` is the teacher's
final aggregated flow for the *same* pair the student sees, ``φ_s`` the student's.

Student loss. Balanced (the default): ``L = l_rec + w · l_distill``, where ``w`` is given
(``weight``) or set automatically so that the distillation gradient with respect to the student's flow
is ``ratio`` times the reconstruction gradient: ``w = ratio · EMA|∂l_rec/∂φ_s| / EMA|∂l_distill/∂φ_s|``
(exponential moving averages of the per-step L2 norms, see :class:`GradientBalance`). The
reconstruction gradient is measured through the final flow (similarity and Dice terms; the
regulariser acts on each cascade's own flow). With ``gamma`` given, the LDR_ALDK weighting
``L = γ · l_rec + (1 - γ) · l_distill`` is used instead.

Distillation terms:

* ``mode="l2"``: the mean per-voxel end-point error ``|φ_s - φ_t|₂`` (voxels), summed over the batch.
* ``mode="aldk"``: a critic ``D`` (:class:`FlowCritic`) trained on its own optimiser to score teacher
  flows above student flows, ``L_D = mean D(φ_s) - mean D(φ_t) + λ · GP + drift · mean D(φ_t)²``
  with ``GP = mean (|∂D/∂φ̂|₂ - 1)²`` at ``φ̂ = w φ_t + (1 - w) φ_s`` (``w = β``: the paper's joint
  deformation; ``w ~ U(0, 1)`` per pair: WGAN-GP). The student's adversarial term is the paper's
  ``(D(φ_s) - D(φ_t))²`` (``adv_loss="paper"``) or the WGAN generator loss ``-D(φ_s)``.

Two ALDK recipes (:data:`ALDK_VARIANTS`): ``"stable"`` (the default) -- a critic that also sees the
pair's fixed and moving images (so it can judge the flow for *this* pair), flows scaled to
normalised units and Lipschitz in their RMS (scores stay near 0.1), λ = 10 at uniform mixtures, a
drift penalty, two critic steps per student step, a lighter critic (c = 8, 3^3 kernels), the WGAN
generator loss and the automatic weight; ``"paper"`` -- the LDR_ALDK losses (flow-only critic,
β-mixture penalty with λ = 0.1, squared score difference, γ = 0.3), kept for reproduction.
What the released TF code did besides (no gradient through the adversarial term, an untrained
critic, a penalty on logits) is not reproduced.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from network.choices import ALDK_VARIANTS
from network.checkpoint import load_checkpoint, load_weights
from network.recursive_cascaded_networks import ModelConfig, build_model

# --aldk_learning_scheme (LDR_ALDK train.py): the distillation term is used on every third step during
# the first 8000 steps; all other steps train on the reconstruction loss alone.
SCHEME_PERIOD = 3
SCHEME_UNTIL = 8000

class FlowCritic(nn.Module):
    """Critic ``D``: flow ``(B, 3, X, Y, Z)`` [+ fixed and moving images ``(B, 1, X, Y, Z)``] -> score ``(B,)``.

    Five ``kernel``^3 stride-2 convolutions (widths ``c, 2c, .., 16c``, "same" padding, LeakyReLU 0.2)
    and a linear layer on the flattened features, as the LDR_ALDK discriminator: 5,462,881 parameters
    at 128^3 with ``c = 16``, ``kernel = 5``. Each stride halves a size rounding up, so any size works.

    ``conditional``: the input is the fixed image, the moving image and the flow in normalised units
    (voxels times ``2 / size`` per axis), 5 channels, and the critic is meant to be Lipschitz in the
    root-mean-square of that normalised flow (:meth:`penalty_norm`), so scores stay of the order of the
    flows' RMS difference (about 0.1) at any image size. Otherwise (the paper's critic) the input is
    the flow in voxels, 3 channels, Lipschitz in its plain L2 norm, where a 1-Lipschitz critic may
    legitimately score pairs thousands apart.
    """

    def __init__(self, image_size, channels: int = 16, n_layers: int = 5, kernel: int = 5,
                 conditional: bool = False):
        super().__init__()
        self.image_size = tuple(int(s) for s in image_size)
        self.conditional = bool(conditional)
        layers, c_in, shape = [], 5 if conditional else 3, list(self.image_size)
        for k in range(n_layers):
            c_out = channels * 2 ** k
            layers += [nn.Conv3d(c_in, c_out, kernel, stride=2, padding=kernel // 2), nn.LeakyReLU(0.2)]
            c_in, shape = c_out, [(s + 1) // 2 for s in shape]
        self.features = nn.Sequential(*layers)
        self.score = nn.Linear(c_in * shape[0] * shape[1] * shape[2], 1)
        scale = [2.0 / s if conditional else 1.0 for s in self.image_size]
        self.register_buffer("flow_scale", torch.tensor(scale).view(1, 3, 1, 1, 1), persistent=False)
        self.rms_elements = 3 * math.prod(self.image_size) if conditional else 1
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, flow: torch.Tensor, images: tuple | None = None) -> torch.Tensor:
        size = ", ".join(map(str, self.image_size))
        if flow.dim() != 5 or flow.shape[1] != 3 or tuple(flow.shape[2:]) != self.image_size:
            raise ValueError(f"critic expects flows (B, 3, {size}), got {tuple(flow.shape)}")
        x = flow * self.flow_scale
        if self.conditional:
            if images is None:
                raise ValueError("the conditional critic needs the pair's (fixed, moving) images")
            for image in images:
                if tuple(image.shape) != (flow.shape[0], 1) + self.image_size:
                    raise ValueError(f"critic expects images ({flow.shape[0]}, 1, {size}), got {tuple(image.shape)}")
            x = torch.cat([images[0], images[1], x], dim=1)
        return self.score(self.features(x).flatten(1)).squeeze(1)

    def penalty_norm(self, flow_grad: torch.Tensor) -> torch.Tensor:
        """Per-sample norm of ``∂D/∂flow`` (voxels) in the metric the critic is Lipschitz in: plain L2
        (paper), or the dual of the RMS of the normalised flow (conditional)."""
        return (flow_grad / self.flow_scale).flatten(1).norm(dim=1) * math.sqrt(self.rms_elements)


def gradient_penalty(critic: nn.Module, teacher_flow: torch.Tensor, student_flow: torch.Tensor,
                     beta: float = 0.1, mix: str = "beta", images: tuple | None = None) -> torch.Tensor:
    """WGAN-GP penalty ``mean_b (|∂D/∂φ̂_b| - 1)²`` w.r.t. the flow input ``φ̂`` (not the logits); the
    norm is the critic's :meth:`~FlowCritic.penalty_norm` if it has one, else plain L2 in voxels.

    ``φ̂ = w φ_t + (1 - w) φ_s`` with ``w = beta`` (``mix="beta"``, the paper) or ``w ~ U(0, 1)`` per
    sample (``mix="uniform"``); a conditional critic sees the pair's ``images`` unchanged. Built with
    ``create_graph`` so the critic is trained through it.
    """
    if mix == "beta":
        w = torch.full((teacher_flow.shape[0], 1, 1, 1, 1), float(beta), device=teacher_flow.device,
                       dtype=teacher_flow.dtype)
    elif mix == "uniform":
        w = torch.rand((teacher_flow.shape[0], 1, 1, 1, 1), device=teacher_flow.device, dtype=teacher_flow.dtype)
    else:
        raise ValueError(f"unknown gradient-penalty mixture '{mix}' (beta or uniform)")
    mixed = (w * teacher_flow.detach() + (1 - w) * student_flow.detach()).requires_grad_(True)
    score = critic(mixed, images) if images is not None else critic(mixed)
    grad, = torch.autograd.grad(score.sum(), mixed, create_graph=True)
    norm = critic.penalty_norm(grad) if hasattr(critic, "penalty_norm") else grad.flatten(1).norm(dim=1)
    return ((norm - 1) ** 2).mean()


def l2_distillation_loss(student_flow: torch.Tensor, teacher_flow: torch.Tensor, pool: int = 1,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-voxel end-point error ``|φ_s - φ_t|₂`` (voxels) per pair, summed over the batch.

    ``pool > 1``: of the flows averaged over ``pool``^3 blocks (a low-resolution target: the teacher's
    large-scale motion, the fine detail left to the similarity term). ``mask`` ``(B, 1, X, Y, Z)`` in
    [0, 1]: the mean is taken over the masked voxels only (e.g. the fixed image's foreground, where
    the images can show the motion at all). A small epsilon inside the square root keeps the
    gradient finite where the flows agree exactly."""
    diff = student_flow - teacher_flow.detach()
    if pool > 1:
        diff = F.avg_pool3d(diff, pool, stride=pool, ceil_mode=True)
        mask = None if mask is None else F.avg_pool3d(mask, pool, stride=pool, ceil_mode=True)
    epe = torch.sqrt((diff ** 2).sum(1, keepdim=True) + 1e-6)
    if mask is None:
        return epe.flatten(1).mean(1).sum()
    mask = mask.to(epe.dtype)
    return ((epe * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1.0)).sum()


def foreground_mask(image: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """``(B, 1, X, Y, Z)`` float mask of voxels above ``threshold`` (images in [0, 1]), dilated by one voxel."""
    return F.max_pool3d((image > threshold).to(image.dtype), 3, stride=1, padding=1)


class GradientBalance:
    """Automatic distillation weight ``w = ratio · EMA|g_rec| / EMA|g_distill|``.

    ``g_*`` are the gradients of each loss with respect to the student's flow, measured every step;
    the averages are bias-corrected (the first step uses that step's norms). Its state is part of
    the checkpoint, so a resumed run continues with the same weights.
    """

    def __init__(self, ratio: float, ema: float = 0.9):
        self.ratio, self.ema = float(ratio), float(ema)
        self.rec = self.distill = 0.0
        self.count = 0

    def update(self, rec_norm: float, distill_norm: float) -> float:
        """Fold in one step's gradient norms and return the weight for this step."""
        self.rec = self.ema * self.rec + (1 - self.ema) * float(rec_norm)
        self.distill = self.ema * self.distill + (1 - self.ema) * float(distill_norm)
        self.count += 1
        return self.weight()

    def weight(self) -> float:
        if self.count == 0 or self.distill <= 0:
            return 0.0
        return self.ratio * self.rec / self.distill      # the bias corrections cancel in the ratio

    def state_dict(self) -> dict:
        return {"rec": self.rec, "distill": self.distill, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.rec, self.distill, self.count = float(state["rec"]), float(state["distill"]), int(state["count"])


def flow_gradient_norm(loss: torch.Tensor, flow: torch.Tensor) -> float:
    """``|∂loss/∂flow|₂`` without touching any parameter's ``.grad`` (0 if the loss does not use the flow)."""
    if not loss.requires_grad:
        return 0.0
    grad, = torch.autograd.grad(loss, flow, retain_graph=True, allow_unused=True)
    return 0.0 if grad is None else float(grad.norm())


@dataclass
class DistillConfig:
    """Distillation settings (saved with the checkpoint); see the module docstring.

    ``mode``: ``"aldk"`` (critic + adversarial term) or ``"l2"`` (end-point-error regression).
    ``variant``: ALDK recipe, ``"stable"`` or ``"paper"`` (:data:`ALDK_VARIANTS`); build a recipe with
    :meth:`recipe`. ``gamma``: LDR_ALDK weighting ``γ · rec + (1 - γ) · distill`` (``None``: balanced).
    ``weight``: fixed balanced weight ``w`` (``None``: automatic, ``ratio`` and ``ema``).
    ``pool``: ``l2`` on flows averaged over ``pool``^3 blocks (1: full resolution); ``mask``: ``"fixed"``
    takes the ``l2`` mean over the fixed image's foreground only (:func:`foreground_mask`).
    ``beta``: teacher weight of the ``"beta"`` penalty mixture; ``lamb``: penalty weight; ``drift``:
    weight of ``mean D(φ_t)²`` in the critic loss; ``conditional``: the critic sees the pair's images;
    ``critic_channels`` / ``critic_kernel``: its width ``c`` and kernel size.
    ``learning_scheme``: LDR_ALDK's ``--aldk_learning_scheme`` (see :data:`SCHEME_PERIOD`).
    """
    mode: str = "aldk"
    variant: str = "stable"
    gamma: float | None = None
    weight: float | None = None
    ratio: float = 0.1
    ema: float = 0.9
    pool: int = 1
    mask: str = "none"
    beta: float = 0.1
    lamb: float = 10.0
    drift: float = 1e-3
    adv_loss: str = "wgan"
    gp_mix: str = "uniform"
    conditional: bool = True
    critic_steps: int = 2
    critic_lr: float = 1e-4
    critic_channels: int = 8
    critic_kernel: int = 3
    learning_scheme: bool = False

    def __post_init__(self):
        if self.mode not in ("aldk", "l2"):
            raise ValueError(f"distillation mode must be 'aldk' or 'l2', got '{self.mode}'")
        if self.mask not in ("none", "fixed"):
            raise ValueError(f"distillation mask must be 'none' or 'fixed', got '{self.mask}'")
        if self.variant not in ALDK_VARIANTS:
            raise ValueError(f"ALDK variant must be one of {sorted(ALDK_VARIANTS)}, got '{self.variant}'")
        if self.adv_loss not in ("paper", "wgan"):
            raise ValueError(f"adv_loss must be 'paper' or 'wgan', got '{self.adv_loss}'")
        if self.gp_mix not in ("beta", "uniform"):
            raise ValueError(f"gp_mix must be 'beta' or 'uniform', got '{self.gp_mix}'")
        if self.gamma is not None and not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {self.gamma}")
        if not 0.0 <= self.beta <= 1.0 or not 0.0 <= self.ema < 1.0:
            raise ValueError(f"beta must lie in [0, 1] and ema in [0, 1) (beta={self.beta}, ema={self.ema})")
        if self.lamb < 0 or self.drift < 0 or self.ratio < 0 or (self.weight is not None and self.weight < 0):
            raise ValueError(f"lamb, drift, ratio and weight must be >= 0 (lamb={self.lamb}, drift={self.drift}, "
                             f"ratio={self.ratio}, weight={self.weight})")
        if self.critic_steps < 1 or self.critic_channels < 1 or self.critic_kernel < 1 or self.pool < 1:
            raise ValueError(f"critic_steps and critic_channels must be >= 1 (critic_steps={self.critic_steps}, "
                             f"critic_channels={self.critic_channels})")

    @classmethod
    def recipe(cls, mode: str, variant: str = "stable", **given) -> "DistillConfig":
        """The ``mode`` / ``variant`` recipe with every setting in ``given`` that is not ``None`` on top.

        ``l2`` is balanced (``gamma=None``) unless ``gamma`` is given; ``aldk`` takes the variant's
        settings (:data:`ALDK_VARIANTS`). ``gamma`` and ``weight`` may be given as ``None`` explicitly
        only by leaving them out."""
        if variant not in ALDK_VARIANTS:
            raise ValueError(f"ALDK variant must be one of {sorted(ALDK_VARIANTS)}, got '{variant}'")
        names = {f.name for f in fields(cls)}
        unknown = set(given) - names
        if unknown:
            raise ValueError(f"unknown distillation settings: {sorted(unknown)}")
        settings = dict(ALDK_VARIANTS[variant]) if mode == "aldk" else {}
        settings.update({k: v for k, v in given.items() if v is not None})
        return cls(mode=mode, variant=variant, **settings)

    @property
    def balanced(self) -> bool:
        return self.gamma is None

    def to_dict(self) -> dict:
        return asdict(self)


class Distiller:
    """Teacher-to-student term of the student loss, plus the critic and its optimiser (ALDK).

    Per training step: :meth:`critic_step` (``critic_steps`` updates of ``D`` on detached flows), then
    :meth:`student_loss`, whose result the caller back-propagates into the student only. ``images``
    is the pair ``(fixed, moving)`` ``(B, 1, X, Y, Z)``, needed by the conditional critic.
    """

    def __init__(self, config: DistillConfig, image_size, device="cpu"):
        self.config = config
        self.critic = None
        self.optimizer = None
        self.balance = GradientBalance(config.ratio, config.ema)
        self.comm = None        # under torchrun: averages critic gradients and gradient norms over processes
        if config.mode == "aldk":
            self.critic = FlowCritic(image_size, config.critic_channels, kernel=config.critic_kernel,
                                     conditional=config.conditional).to(device)
            self.optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr, betas=(0.5, 0.9))

    def active(self, step: int) -> bool:
        """Whether the distillation term is used at ``step`` (the learning scheme skips most early steps)."""
        c = self.config
        return not (c.learning_scheme and ((step + 1) % SCHEME_PERIOD != 0 or step >= SCHEME_UNTIL))

    def gamma_at(self, step: int) -> float:
        """γ for this step (LDR_ALDK weighting; 1 on the steps the learning scheme skips)."""
        return float(self.config.gamma) if self.config.gamma is not None and self.active(step) else 1.0

    def _critic(self, flow, images):
        return self.critic(flow, images) if self.config.conditional else self.critic(flow)

    def critic_step(self, teacher_flow: torch.Tensor, student_flow: torch.Tensor, images: tuple | None = None) -> dict:
        """Update ``D`` to score teacher flows above student flows; returns the last update's terms."""
        if self.critic is None:
            return {}
        c = self.config
        teacher_flow, student_flow = teacher_flow.detach(), student_flow.detach()
        images = None if images is None else tuple(i.detach() for i in images)
        self.critic.requires_grad_(True)
        self.critic.train()
        for _ in range(c.critic_steps):
            real, fake = self._critic(teacher_flow, images), self._critic(student_flow, images)
            wdist = real.mean() - fake.mean()
            gp = gradient_penalty(self.critic, teacher_flow, student_flow, c.beta, c.gp_mix,
                                  images if c.conditional else None)
            loss = -wdist + c.lamb * gp + c.drift * (real ** 2).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"critic loss became {float(loss)}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.comm is not None:
                self.comm.average_gradients(self.critic)
            self.optimizer.step()
        return {"critic": loss.detach(), "gp": gp.detach(), "wdist": wdist.detach(),
                "critic_real": real.detach().mean(), "critic_fake": fake.detach().mean()}

    def distillation_term(self, student_flow: torch.Tensor, teacher_flow: torch.Tensor,
                          images: tuple | None = None) -> torch.Tensor:
        """``l_distill`` (EPE or adversarial), differentiable w.r.t. the student flow only."""
        if self.config.mode == "l2":
            mask = None
            if self.config.mask == "fixed":
                if images is None:
                    raise ValueError("the fixed-image mask needs the pair's (fixed, moving) images")
                mask = foreground_mask(images[0].detach())
            return l2_distillation_loss(student_flow, teacher_flow, self.config.pool, mask)
        self.critic.requires_grad_(False)
        fake = self._critic(student_flow, images)
        if self.config.adv_loss == "wgan":
            return -fake.sum()
        with torch.no_grad():
            real = self._critic(teacher_flow.detach(), images)
        return ((fake - real) ** 2).sum()

    def student_loss(self, rec_loss: torch.Tensor, rec_comps: dict, student_flow: torch.Tensor,
                     teacher_flow: torch.Tensor, step: int, images: tuple | None = None) -> tuple:
        """The student's loss and its named components: ``rec``, ``l2`` or ``adv``, and ``gamma``
        (LDR_ALDK weighting) or ``distill_weight`` with the measured flow-gradient norms
        ``grad_rec`` / ``grad_distill`` (balanced)."""
        if student_flow.shape != teacher_flow.shape:
            raise ValueError(f"student flow {tuple(student_flow.shape)} and teacher flow "
                             f"{tuple(teacher_flow.shape)} differ")
        c = self.config
        comps = {f"rec_{k}": v.detach() for k, v in rec_comps.items() if k != "total"}
        comps["rec"] = rec_loss.detach()
        term = self.distillation_term(student_flow, teacher_flow, images)
        comps["l2" if c.mode == "l2" else "adv"] = term.detach()
        if not c.balanced:
            gamma = self.gamma_at(step)
            total = gamma * rec_loss + (1 - gamma) * term if gamma < 1 else rec_loss
            comps["gamma"] = torch.tensor(gamma)
        else:
            if c.weight is not None:
                weight = float(c.weight)
            else:
                g_rec, g_distill = flow_gradient_norm(rec_loss, student_flow), flow_gradient_norm(term, student_flow)
                if self.comm is not None:         # the norms over the whole batch, as one process would measure
                    squares = self.comm.mean([g_rec ** 2, g_distill ** 2])
                    g_rec, g_distill = (math.sqrt(v * self.comm.world_size) for v in squares)
                weight = self.balance.update(g_rec, g_distill)
                comps["grad_rec"], comps["grad_distill"] = torch.tensor(g_rec), torch.tensor(g_distill)
            weight = weight if self.active(step) else 0.0
            if not math.isfinite(weight):
                raise FloatingPointError(f"distillation weight became {weight}")
            total = rec_loss + weight * term if weight > 0 else rec_loss
            comps["distill_weight"] = torch.tensor(weight)
        comps["total"] = total.detach()
        return total, comps

    def state_dict(self) -> dict:
        return {"config": self.config.to_dict(), "balance": self.balance.state_dict(),
                "critic": self.critic.state_dict() if self.critic is not None else None,
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("balance") is not None:
            self.balance.load_state_dict(state["balance"])
        if self.critic is not None and state.get("critic") is not None:
            self.critic.load_state_dict(state["critic"])
            if state.get("optimizer") is not None:
                self.optimizer.load_state_dict(state["optimizer"])


class OnlineTeacher:
    """A trained registration checkpoint used as a frozen teacher: ``teacher(fixed, moving)`` returns its
    final aggregated flow ``(B, 3, X, Y, Z)`` under ``no_grad`` (eval mode, no parameter gradients)."""

    def __init__(self, spec: str, device="cpu", rep: int | None = None):
        state = load_checkpoint(spec)
        self.path = state["path"]
        self.step = int(state["step"])
        self.train_args = dict(state.get("train_args") or {})
        self.config = ModelConfig.from_dict(state["model_config"])
        self.rep = rep if rep is not None else self.config.rep
        self.model = build_model(self.config)
        load_weights(self.model, state)
        self.model = self.model.to(device)
        self.model.eval().requires_grad_(False)

    @property
    def image_size(self) -> tuple:
        return tuple(self.config.image_size)

    def fingerprint(self) -> dict:
        """What identifies the teacher's flows: its configuration, step and weights."""
        import hashlib
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return {"model_config": self.config.to_dict(), "step": self.step, "rep": self.rep,
                "weights_sha256": digest.hexdigest()}

    @torch.no_grad()
    def __call__(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.model(fixed, moving, rep=self.rep)["flow"]


__all__ = ["FlowCritic", "gradient_penalty", "l2_distillation_loss", "foreground_mask", "GradientBalance", "flow_gradient_norm",
           "DistillConfig", "Distiller", "OnlineTeacher", "ALDK_VARIANTS", "SCHEME_PERIOD", "SCHEME_UNTIL"]
