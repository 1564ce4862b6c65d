"""ALDK: Adversarial Learning with Distilling Knowledge (LDR, Tran et al.), implemented so that it acts.

Flows are ``(B, 3, X, Y, Z)`` voxel displacements (fixed-to-moving pull-back). ``φ_t`` is the teacher's
final aggregated flow for the *same* (possibly augmented) pair the student sees, ``φ_s`` the student's.

* :class:`FlowCritic` ``D``: 3D convolutions on a flow -> one score per sample (no sigmoid: WGAN critic).
* Critic step (own optimiser): ``L_D = mean D(φ_s) - mean D(φ_t) + λ · GP``. The gradient penalty
  ``GP = mean (||∇_φ̂ D(φ̂)||₂ - 1)²`` is taken w.r.t. the flow input at the mixture
  ``φ̂ = β φ_t + (1 - β) φ_s`` (the paper's joint deformation; ``gp_mix="uniform"`` draws the weight
  per sample from U(0, 1) as in WGAN-GP).
* Student: ``L = γ · l_rec + (1 - γ) · l_adv``. ``l_adv`` is the paper's ``||D(φ_s) - D(φ_t)||²``
  per pair (``adv_loss="paper"``) or the WGAN generator loss ``-D(φ_s)`` (``adv_loss="wgan"``);
  summed over the batch like the reconstruction loss.
* Baseline ``mode="l2"``: ``l_adv`` replaced by the mean squared voxel error ``|φ_s - φ_t|²``.

What the released TF code did instead (no gradient through the adversarial term, an untrained critic,
a penalty on logits) is not reproduced.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from network.checkpoint import load_checkpoint, load_weights
from network.recursive_cascaded_networks import ModelConfig, build_model

# --aldk_learning_scheme (LDR_ALDK train.py): the adversarial term is used on every third step during
# the first 8000 steps; all other steps train on the reconstruction loss alone (γ = 1).
SCHEME_PERIOD = 3
SCHEME_UNTIL = 8000


class FlowCritic(nn.Module):
    """Critic ``D``: flow ``(B, 3, X, Y, Z)`` -> score ``(B,)``.

    Five 5^3 stride-2 convolutions (widths ``c, 2c, .., 16c``, "same" padding, LeakyReLU 0.2) and a
    linear layer on the flattened features, as the LDR_ALDK discriminator: 5,462,881 parameters at
    128^3 with ``c = 16``. Each stride halves a size rounding up, so any size >= 1 works.
    """

    def __init__(self, image_size, channels: int = 16, n_layers: int = 5, kernel: int = 5):
        super().__init__()
        self.image_size = tuple(int(s) for s in image_size)
        layers, c_in, shape = [], 3, list(self.image_size)
        for k in range(n_layers):
            c_out = channels * 2 ** k
            layers += [nn.Conv3d(c_in, c_out, kernel, stride=2, padding=kernel // 2), nn.LeakyReLU(0.2)]
            c_in, shape = c_out, [(s + 1) // 2 for s in shape]
        self.features = nn.Sequential(*layers)
        self.score = nn.Linear(c_in * shape[0] * shape[1] * shape[2], 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        if flow.dim() != 5 or flow.shape[1] != 3 or tuple(flow.shape[2:]) != self.image_size:
            raise ValueError(f"critic expects flows (B, 3, {', '.join(map(str, self.image_size))}), "
                             f"got {tuple(flow.shape)}")
        return self.score(self.features(flow).flatten(1)).squeeze(1)


def gradient_penalty(critic: nn.Module, teacher_flow: torch.Tensor, student_flow: torch.Tensor,
                     beta: float = 0.1, mix: str = "beta") -> torch.Tensor:
    """WGAN-GP penalty ``mean_b (||∂D/∂φ̂_b||₂ - 1)²`` w.r.t. the flow input ``φ̂`` (not the logits).

    ``φ̂ = w φ_t + (1 - w) φ_s`` with ``w = beta`` (``mix="beta"``, the paper) or ``w ~ U(0, 1)`` per
    sample (``mix="uniform"``). Built with ``create_graph`` so the critic is trained through it.
    """
    if mix == "beta":
        w = torch.full((teacher_flow.shape[0], 1, 1, 1, 1), float(beta), device=teacher_flow.device,
                       dtype=teacher_flow.dtype)
    elif mix == "uniform":
        w = torch.rand((teacher_flow.shape[0], 1, 1, 1, 1), device=teacher_flow.device, dtype=teacher_flow.dtype)
    else:
        raise ValueError(f"unknown gradient-penalty mixture '{mix}' (beta or uniform)")
    mixed = (w * teacher_flow.detach() + (1 - w) * student_flow.detach()).requires_grad_(True)
    grad, = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def l2_distillation_loss(student_flow: torch.Tensor, teacher_flow: torch.Tensor) -> torch.Tensor:
    """Mean squared voxel error between student and teacher flows per pair, summed over the batch."""
    return ((student_flow - teacher_flow.detach()) ** 2).flatten(1).mean(1).sum()


@dataclass
class DistillConfig:
    """Distillation settings (saved with the checkpoint).

    ``mode``: ``"aldk"`` (critic + adversarial term) or ``"l2"`` (flow regression baseline).
    ``gamma``: weight of the reconstruction loss, ``1 - gamma`` of the distillation term.
    ``beta``: teacher weight of the penalty mixture; ``lamb``: penalty weight.
    ``learning_scheme``: LDR_ALDK's ``--aldk_learning_scheme`` (see :data:`SCHEME_PERIOD`).
    """
    mode: str = "aldk"
    beta: float = 0.1
    gamma: float = 0.3
    lamb: float = 0.1
    adv_loss: str = "paper"
    gp_mix: str = "beta"
    critic_steps: int = 1
    critic_lr: float = 1e-4
    critic_channels: int = 16
    learning_scheme: bool = False

    def __post_init__(self):
        if self.mode not in ("aldk", "l2"):
            raise ValueError(f"distillation mode must be 'aldk' or 'l2', got '{self.mode}'")
        if self.adv_loss not in ("paper", "wgan"):
            raise ValueError(f"adv_loss must be 'paper' or 'wgan', got '{self.adv_loss}'")
        if self.gp_mix not in ("beta", "uniform"):
            raise ValueError(f"gp_mix must be 'beta' or 'uniform', got '{self.gp_mix}'")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"gamma and beta must lie in [0, 1] (gamma={self.gamma}, beta={self.beta})")
        if self.lamb < 0 or self.critic_steps < 1:
            raise ValueError(f"lamb must be >= 0 and critic_steps >= 1 (lamb={self.lamb}, "
                             f"critic_steps={self.critic_steps})")

    def to_dict(self) -> dict:
        return asdict(self)


class Distiller:
    """Teacher-to-student term of the student loss, plus the critic and its optimiser (ALDK).

    Per training step: :meth:`critic_step` (``critic_steps`` updates of ``D`` on detached flows), then
    :meth:`student_loss`, whose result the caller back-propagates into the student only.
    """

    def __init__(self, config: DistillConfig, image_size, device="cpu"):
        self.config = config
        self.critic = None
        self.optimizer = None
        if config.mode == "aldk":
            self.critic = FlowCritic(image_size, config.critic_channels).to(device)
            self.optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr, betas=(0.5, 0.9))

    def gamma_at(self, step: int) -> float:
        """γ for this step (1 on the steps the learning scheme trains on reconstruction only)."""
        c = self.config
        if c.learning_scheme and ((step + 1) % SCHEME_PERIOD != 0 or step >= SCHEME_UNTIL):
            return 1.0
        return c.gamma

    def critic_step(self, teacher_flow: torch.Tensor, student_flow: torch.Tensor) -> dict:
        """Update ``D`` to score teacher flows above student flows; returns the last update's terms."""
        if self.critic is None:
            return {}
        c = self.config
        teacher_flow, student_flow = teacher_flow.detach(), student_flow.detach()
        self.critic.requires_grad_(True)
        self.critic.train()
        for _ in range(c.critic_steps):
            real, fake = self.critic(teacher_flow), self.critic(student_flow)
            wdist = real.mean() - fake.mean()
            gp = gradient_penalty(self.critic, teacher_flow, student_flow, c.beta, c.gp_mix)
            loss = -wdist + c.lamb * gp
            if not torch.isfinite(loss):
                raise FloatingPointError(f"critic loss became {float(loss)}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return {"critic": loss.detach(), "gp": gp.detach(), "wdist": wdist.detach()}

    def adversarial_loss(self, student_flow: torch.Tensor, teacher_flow: torch.Tensor) -> torch.Tensor:
        """``l_adv``, differentiable w.r.t. the student flow (the critic's parameters are frozen here)."""
        self.critic.requires_grad_(False)
        fake = self.critic(student_flow)
        if self.config.adv_loss == "wgan":
            return -fake.sum()
        with torch.no_grad():
            real = self.critic(teacher_flow.detach())
        return ((fake - real) ** 2).sum()

    def student_loss(self, rec_loss: torch.Tensor, rec_comps: dict, student_flow: torch.Tensor,
                     teacher_flow: torch.Tensor, step: int) -> tuple:
        """``γ · l_rec + (1 - γ) · l_distill`` and the named components (``rec``, ``adv``/``l2``, ``gamma``)."""
        if student_flow.shape != teacher_flow.shape:
            raise ValueError(f"student flow {tuple(student_flow.shape)} and teacher flow "
                             f"{tuple(teacher_flow.shape)} differ")
        gamma = self.gamma_at(step)
        comps = {f"rec_{k}": v.detach() for k, v in rec_comps.items() if k != "total"}
        comps["rec"] = rec_loss.detach()
        if self.config.mode == "l2":
            term = l2_distillation_loss(student_flow, teacher_flow)
            comps["l2"] = term.detach()
        else:
            term = self.adversarial_loss(student_flow, teacher_flow)
            comps["adv"] = term.detach()
        total = gamma * rec_loss + (1 - gamma) * term if gamma < 1 else rec_loss
        comps["gamma"] = torch.tensor(gamma)
        comps["total"] = total.detach()
        return total, comps

    def state_dict(self) -> dict:
        return {"config": self.config.to_dict(),
                "critic": self.critic.state_dict() if self.critic is not None else None,
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None}

    def load_state_dict(self, state: dict) -> None:
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


__all__ = ["FlowCritic", "gradient_penalty", "l2_distillation_loss", "DistillConfig", "Distiller",
           "OnlineTeacher", "SCHEME_PERIOD", "SCHEME_UNTIL"]
