"""ALDK: the critic, the gradient penalty, the student's adversarial / L2 terms, teacher sources."""
import math

import pytest
import torch
import torch.nn as nn

from network import ModelConfig, RegistrationLoss, build_model, count_parameters, save_checkpoint
from network.aldk import (ALDK_VARIANTS, SCHEME_PERIOD, SCHEME_UNTIL, DistillConfig, Distiller, FlowCritic,
                          GradientBalance, OnlineTeacher, gradient_penalty, l2_distillation_loss)

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


@pytest.mark.parametrize("variant", ["stable", "paper"])
def test_critic_step_changes_the_critic_and_not_the_student(variant):
    student = tiny_student()
    fixed, moving = images()
    distiller = Distiller(DistillConfig.recipe("aldk", variant), SIZE)
    before = {k: v.clone() for k, v in distiller.critic.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    flow = student(fixed, moving)["flow"]
    comps = distiller.critic_step(torch.randn(1, 3, *SIZE), flow, (fixed, moving))
    assert set(comps) == {"critic", "gp", "wdist", "critic_real", "critic_fake"}
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
    distiller.critic_step(teacher_flow, out["flow"], (fixed, moving))
    critic_grads = [p.grad.clone() for p in distiller.critic.parameters()]
    rec, rec_comps = RegistrationLoss()(fixed, out)
    loss, comps = distiller.student_loss(rec, rec_comps, out["flow"], teacher_flow, step=0, images=(fixed, moving))
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
    epe = math.sqrt(3 + 1e-6)                    # |(1, 1, 1)| voxels at every voxel
    assert l2_distillation_loss(student, teacher).item() == pytest.approx(2 * epe)   # summed over 2 pairs
    loss, comps = distiller.student_loss(torch.tensor(4.0), {"sim": torch.tensor(4.0)}, student, teacher, step=0)
    assert loss.item() == pytest.approx(0.25 * 4.0 + 0.75 * 2 * epe)
    assert comps["l2"].item() == pytest.approx(2 * epe) and comps["rec_sim"].item() == 4.0
    assert distiller.critic is None and distiller.critic_step(teacher, student) == {}


def test_learning_scheme_uses_gamma_every_third_step_early_on():
    d = Distiller(DistillConfig(mode="l2", gamma=0.3, learning_scheme=True), SIZE)
    assert [d.gamma_at(s) for s in range(6)] == [1.0, 1.0, 0.3, 1.0, 1.0, 0.3]
    assert SCHEME_PERIOD == 3 and d.gamma_at(SCHEME_UNTIL + 1) == 1.0
    assert Distiller(DistillConfig(mode="l2", gamma=0.3), SIZE).gamma_at(0) == 0.3


def test_distill_config_refuses_bad_values():
    for bad in (dict(mode="gan"), dict(gamma=1.5), dict(beta=-0.1), dict(lamb=-1), dict(adv_loss="x"),
                dict(gp_mix="x"), dict(critic_steps=0), dict(variant="x"), dict(weight=-1), dict(ratio=-1),
                dict(ema=1.0), dict(drift=-1)):
        with pytest.raises(ValueError):
            DistillConfig(**bad)


def test_distiller_state_round_trip():
    a = Distiller(DistillConfig(mode="aldk"), SIZE)
    fixed, moving = images()
    a.critic_step(torch.randn(1, 3, *SIZE), torch.randn(1, 3, *SIZE), (fixed, moving))
    a.balance.update(2.0, 4.0)
    b = Distiller(DistillConfig(mode="aldk"), SIZE)
    b.load_state_dict(a.state_dict())
    assert b.balance.state_dict() == a.balance.state_dict() and b.balance.weight() == pytest.approx(0.1 * 2 / 4)
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


# ---- balanced losses ---------------------------------------------------------------------------

def test_automatic_weight_gives_the_stated_gradient_ratio_on_the_flow():
    """rec = <a, φ> has flow gradient a; the end-point error to a teacher 2 voxels away along x has a
    gradient of 1/N (unit vector along x) at each of the N voxels, norm 1/sqrt(N). The weighted
    distillation gradient is then ``ratio`` times the reconstruction gradient."""
    ratio = 0.25
    distiller = Distiller(DistillConfig(mode="l2", ratio=ratio), SIZE)
    a = torch.randn(1, 3, *SIZE)
    teacher = torch.zeros(1, 3, *SIZE)
    teacher[:, 0] = 2.0
    flow = torch.zeros(1, 3, *SIZE, requires_grad=True)
    rec = (a * flow).sum()
    loss, comps = distiller.student_loss(rec, {}, flow, teacher, step=0)
    g_rec = a.norm().item()
    n = math.prod(SIZE)
    g_l2 = math.sqrt(n) / n * 2.0 / math.sqrt(4.0 + 1e-6)     # per voxel (2, 0, 0)/|.|/N, N voxels
    assert comps["grad_rec"].item() == pytest.approx(g_rec, rel=1e-5)
    assert comps["grad_distill"].item() == pytest.approx(g_l2, rel=1e-4)
    assert comps["distill_weight"].item() == pytest.approx(ratio * g_rec / g_l2, rel=1e-4)
    grad_total, = torch.autograd.grad(loss, flow)
    distill_grad = grad_total - a                                # what the distillation term contributes
    assert distill_grad.norm().item() / g_rec == pytest.approx(ratio, rel=1e-4)


def test_gradient_balance_is_a_bias_free_moving_average_and_a_fixed_weight_is_kept():
    balance = GradientBalance(ratio=0.5, ema=0.9)
    assert balance.weight() == 0.0
    assert balance.update(2.0, 1.0) == pytest.approx(1.0)        # first step: that step's norms
    w = balance.update(4.0, 1.0)
    assert w == pytest.approx(0.5 * (0.9 * 0.1 * 2 + 0.1 * 4) / (0.9 * 0.1 + 0.1))
    d = Distiller(DistillConfig(mode="l2", weight=0.7), SIZE)
    flow = torch.zeros(1, 3, *SIZE, requires_grad=True)
    loss, comps = d.student_loss((flow * 0).sum() + 1.0, {}, flow, torch.ones(1, 3, *SIZE), step=0)
    assert comps["distill_weight"].item() == pytest.approx(0.7) and "grad_rec" not in comps
    assert loss.item() == pytest.approx(1.0 + 0.7 * math.sqrt(3 + 1e-6), rel=1e-5)


def test_recipes_fill_in_each_variant_and_keep_what_is_given():
    stable = DistillConfig.recipe("aldk")
    assert stable.balanced and stable.conditional and stable.lamb == 10 and stable.gp_mix == "uniform"
    paper = DistillConfig.recipe("aldk", "paper")
    assert (paper.gamma, paper.lamb, paper.adv_loss, paper.gp_mix, paper.conditional) == (0.3, 0.1, "paper", "beta", False)
    assert DistillConfig.recipe("aldk", "paper", gamma=0.5, lamb=None).gamma == 0.5
    assert DistillConfig.recipe("l2").balanced and DistillConfig.recipe("l2", gamma=0.3).gamma == 0.3
    assert set(ALDK_VARIANTS) == {"stable", "paper"}
    with pytest.raises(ValueError, match="unknown distillation settings"):
        DistillConfig.recipe("aldk", colour="red")


# ---- the conditional critic --------------------------------------------------------------------

def test_conditional_critic_receives_the_pair_and_needs_it():
    critic = FlowCritic(SIZE, channels=4, kernel=3, conditional=True)
    flow = torch.randn(2, 3, *SIZE)
    fixed, moving = images(batch=2)
    fixed.requires_grad_(True)
    score = critic(flow, (fixed, moving))
    assert score.shape == (2,)
    grad, = torch.autograd.grad(score.sum(), fixed)
    assert grad.abs().sum() > 0                                  # the fixed image reaches the score
    other = critic(flow, (fixed.detach(), torch.rand_like(moving)))
    assert not torch.allclose(score, other)
    with pytest.raises(ValueError, match="needs the pair"):
        critic(flow)
    with pytest.raises(ValueError, match="critic expects images"):
        critic(flow, (fixed[:1], moving[:1]))


def test_distiller_hands_the_pair_to_the_critic():
    seen = []
    distiller = Distiller(DistillConfig(mode="aldk", critic_channels=2), SIZE)
    original = distiller.critic.forward

    def spy(flow, images=None):
        seen.append(images)
        return original(flow, images)

    distiller.critic.forward = spy
    fixed, moving = images()
    flow = torch.randn(1, 3, *SIZE, requires_grad=True)
    distiller.critic_step(torch.randn(1, 3, *SIZE), flow, (fixed, moving))
    distiller.student_loss(flow.sum() * 0, {}, flow, torch.randn(1, 3, *SIZE), 0, images=(fixed, moving))
    assert seen and all(s is not None and torch.equal(s[0], fixed) and torch.equal(s[1], moving) for s in seen)


def test_conditional_critic_penalty_is_taken_in_the_rms_of_normalised_flows():
    """A linear critic D = <w, φ · 2/size> has a constant gradient; its penalty norm is |w| sqrt(3N)."""
    critic = FlowCritic(SIZE, channels=2, kernel=3, conditional=True)
    grad = torch.full((1, 3, *SIZE), 0.5) * critic.flow_scale        # dD/dφ for w = 0.5 everywhere
    expected = 0.5 * math.sqrt(3 * math.prod(SIZE)) * math.sqrt(3 * math.prod(SIZE))
    assert critic.penalty_norm(grad).item() == pytest.approx(expected, rel=1e-5)
    assert FlowCritic(SIZE).penalty_norm(grad).item() == pytest.approx(grad.norm().item(), rel=1e-6)


def test_stable_recipe_keeps_scores_bounded_where_the_paper_recipe_runs_away():
    """Twenty critic updates on one fixed pair of flows 3 voxels apart (RMS): the paper's critic,
    Lipschitz in voxels, opens a gap of hundreds; the stable one stays below the normalised RMS gap."""
    torch.manual_seed(0)
    size = (24, 24, 24)
    fixed, moving = torch.rand(1, 1, *size), torch.rand(1, 1, *size)
    teacher, student = torch.zeros(1, 3, *size), torch.full((1, 3, *size), math.sqrt(3.0))
    gaps = {}
    for variant in ("paper", "stable"):
        torch.manual_seed(0)
        d = Distiller(DistillConfig.recipe("aldk", variant, critic_lr=1e-3, critic_steps=20), size)
        gaps[variant] = abs(d.critic_step(teacher, student, (fixed, moving))["wdist"].item())
    rms_normalised = math.sqrt(3.0) * 2 / 24
    assert gaps["stable"] < 2 * rms_normalised
    assert gaps["paper"] > 50 * gaps["stable"]
