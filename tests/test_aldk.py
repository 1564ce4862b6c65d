"""ALDK: the critic, the gradient penalty, the student's adversarial / L2 terms, teacher sources."""
import math

import pytest
import torch
import torch.nn as nn

from network import ModelConfig, RegistrationLoss, build_model, count_parameters, save_checkpoint
from network.aldk import (SCHEME_PERIOD, SCHEME_UNTIL, DistillConfig, Distiller, FlowCritic, OnlineTeacher,
                          gradient_penalty, l2_distillation_loss)

SIZE = (16, 16, 16)


def tiny_student(seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(base_network="LDR", n_cascades=1, preset="plain", image_size=SIZE, channels=4))


def images(seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, *SIZE, generator=g), torch.rand(batch, 1, *SIZE, generator=g)


class LinearCritic(nn.Module):
    """D(x) = <w, x>: its input gradient is w everywhere."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)


class QuadraticCritic(nn.Module):
    """D(x) = 0.5 |x|^2: its input gradient is x itself."""

    def forward(self, x):
        return 0.5 * (x ** 2).flatten(1).sum(1)


def test_critic_matches_ldr_aldk_parameter_count_and_scores_each_sample():
    assert count_parameters(FlowCritic((128, 128, 128))) == 5_462_881
    critic = FlowCritic(SIZE)
    assert critic(torch.randn(3, 3, *SIZE)).shape == (3,)
    with pytest.raises(ValueError, match="critic expects flows"):
        critic(torch.randn(1, 2, *SIZE))


def test_gradient_penalty_of_a_linear_critic_is_hand_computable():
    w = torch.full((1, 3, *SIZE), 0.5)
    expected = (math.sqrt(0.25 * 3 * 16 ** 3) - 1) ** 2
    gp = gradient_penalty(LinearCritic(w), torch.randn(2, 3, *SIZE), torch.randn(2, 3, *SIZE), beta=0.1)
    assert gp.item() == pytest.approx(expected, rel=1e-5)


def test_gradient_penalty_is_taken_at_the_beta_mixture_of_the_flows():
    teacher, student = torch.randn(2, 3, *SIZE), torch.randn(2, 3, *SIZE)
    beta = 0.1
    mixed = beta * teacher + (1 - beta) * student
    expected = ((mixed.flatten(1).norm(dim=1) - 1) ** 2).mean()
    gp = gradient_penalty(QuadraticCritic(), teacher, student, beta=beta)
    assert gp.item() == pytest.approx(expected.item(), rel=1e-5)
    # uniform mixture: each sample's penalty point lies on the segment between its teacher and student flow
    torch.manual_seed(0)
    gp_uniform = gradient_penalty(QuadraticCritic(), teacher, student, mix="uniform")
    assert torch.isfinite(gp_uniform)


def test_gradient_penalty_trains_the_critic_through_its_input_gradient():
    w = torch.full((1, 3, *SIZE), 0.5, requires_grad=False)
    critic = LinearCritic(w)
    gp = gradient_penalty(critic, torch.randn(1, 3, *SIZE), torch.randn(1, 3, *SIZE))
    gp.backward()
    # d/dw (|w| - 1)^2 = 2 (|w| - 1) w / |w|
    norm = w.norm()
    expected = 2 * (norm - 1) * w / norm
    torch.testing.assert_close(critic.w.grad, expected, rtol=1e-5, atol=1e-7)


def test_critic_step_changes_the_critic_and_not_the_student():
    student = tiny_student()
    fixed, moving = images()
    distiller = Distiller(DistillConfig(mode="aldk"), SIZE)
    before = {k: v.clone() for k, v in distiller.critic.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    flow = student(fixed, moving)["flow"]
    comps = distiller.critic_step(torch.randn(1, 3, *SIZE), flow)
    assert set(comps) == {"critic", "gp", "wdist"}
    changed = {k for k, v in distiller.critic.state_dict().items() if not torch.equal(v, before[k])}
    # every parameter but the score's bias, which cancels in mean D(teacher) - mean D(student)
    assert changed == set(before) - {"score.bias"}
    assert all(p.grad is None for p in student.parameters())
    assert all(torch.equal(v, student_before[k]) for k, v in student.state_dict().items())


@pytest.mark.parametrize("adv_loss", ["paper", "wgan"])
def test_adversarial_term_alone_sends_gradient_to_the_student(adv_loss):
    student = tiny_student()
    fixed, moving = images()
    distiller = Distiller(DistillConfig(mode="aldk", gamma=0.0, adv_loss=adv_loss), SIZE)
    teacher_flow = 2.0 * torch.randn(1, 3, *SIZE)
    out = student(fixed, moving)
    distiller.critic_step(teacher_flow, out["flow"])
    critic_grads = [p.grad.clone() for p in distiller.critic.parameters()]
    rec, rec_comps = RegistrationLoss()(fixed, out)
    loss, comps = distiller.student_loss(rec, rec_comps, out["flow"], teacher_flow, step=0)
    assert comps["gamma"].item() == 0.0 and "adv" in comps and "rec" in comps
    assert loss.item() == pytest.approx(comps["adv"].item())      # nothing of the reconstruction loss left
    student.zero_grad()
    loss.backward()
    grads = [p.grad.abs().sum().item() for p in student.parameters() if p.grad is not None]
    assert grads and sum(grads) > 0
    # the student's loss leaves the critic's gradients (from its own step) untouched
    assert all(torch.equal(p.grad, g) for p, g in zip(distiller.critic.parameters(), critic_grads))


def test_student_loss_mixes_reconstruction_and_distillation_with_gamma():
    distiller = Distiller(DistillConfig(mode="l2", gamma=0.25), SIZE)
    teacher = torch.zeros(2, 3, *SIZE)
    student = torch.ones(2, 3, *SIZE, requires_grad=True)
    assert l2_distillation_loss(student, teacher).item() == pytest.approx(2.0)       # 1 voxel^2 per pair, 2 pairs
    loss, comps = distiller.student_loss(torch.tensor(4.0), {"sim": torch.tensor(4.0)}, student, teacher, step=0)
    assert loss.item() == pytest.approx(0.25 * 4.0 + 0.75 * 2.0)
    assert comps["l2"].item() == pytest.approx(2.0) and comps["rec_sim"].item() == 4.0
    assert distiller.critic is None and distiller.critic_step(teacher, student) == {}


def test_learning_scheme_uses_gamma_every_third_step_early_on():
    d = Distiller(DistillConfig(mode="l2", gamma=0.3, learning_scheme=True), SIZE)
    assert [d.gamma_at(s) for s in range(6)] == [1.0, 1.0, 0.3, 1.0, 1.0, 0.3]
    assert SCHEME_PERIOD == 3 and d.gamma_at(SCHEME_UNTIL + 1) == 1.0
    assert Distiller(DistillConfig(mode="l2", gamma=0.3), SIZE).gamma_at(0) == 0.3


def test_distill_config_refuses_bad_values():
    for bad in (dict(mode="gan"), dict(gamma=1.5), dict(beta=-0.1), dict(lamb=-1), dict(adv_loss="x"),
                dict(gp_mix="x"), dict(critic_steps=0)):
        with pytest.raises(ValueError):
            DistillConfig(**bad)


def test_distiller_state_round_trip():
    a = Distiller(DistillConfig(mode="aldk"), SIZE)
    a.critic_step(torch.randn(1, 3, *SIZE), torch.randn(1, 3, *SIZE))
    b = Distiller(DistillConfig(mode="aldk"), SIZE)
    b.load_state_dict(a.state_dict())
    for (k, v), w in zip(a.critic.state_dict().items(), b.critic.state_dict().values()):
        assert torch.equal(v, w), k
    assert b.optimizer.state_dict()["state"]


def test_online_teacher_is_frozen_and_matches_the_model(tmp_path):
    model = tiny_student(seed=3)
    save_checkpoint(str(tmp_path / "t"), model, model.config.to_dict(), step=7)
    teacher = OnlineTeacher(str(tmp_path / "t"))
    fixed, moving = images(seed=1)
    flow = teacher(fixed, moving)
    assert flow.grad_fn is None and not flow.requires_grad
    assert all(not p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    with torch.no_grad():
        torch.testing.assert_close(flow, model(fixed, moving)["flow"])
    fp = teacher.fingerprint()
    assert fp["step"] == 7 and len(fp["weights_sha256"]) == 64
    assert OnlineTeacher(str(tmp_path / "t")).fingerprint() == fp
