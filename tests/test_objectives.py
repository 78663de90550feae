"""The DDPM and flow objectives: schedule, sample_t, the loss's use of the supplied noise, samplers, guidance."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

from immiscible_cli.config import (OBJECTIVE_SECTIONS, SAMPLERS, DDPMObjective, FlowObjective, ModelConfig,
                                   SampleConfig)
from immiscible_cli.models.unet import UNet
from immiscible_cli.objectives.guidance import guided_prediction
from immiscible_cli.objectives import DDPM, OBJECTIVES, SAMPLER_FIELDS, Flow, build_objective

DDPM_OBJECTIVE = DDPM(DDPMObjective())  # T = 1000, linear betas 1e-4 .. 0.02
FLOW_OBJECTIVE = Flow(FlowObjective())


Net = Callable[..., torch.Tensor]  # net(x [B, C, H, W], t [B], labels) -> [B, C, H, W]


def linear_net(slope: float) -> Net:
    """Predicts slope * x: every sampler then maps x = 1 to a scalar known in closed form."""
    return lambda x, t, labels=None: slope * x


def point_mass_epsilon(point: torch.Tensor) -> Net:
    """The exact epsilon for data that is always `point`: eps = (x - sqrt(abar) point) / sqrt(1 - abar)."""
    def eps(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        abar = DDPM_OBJECTIVE.alpha_bar[t.long()].view(-1, 1, 1, 1)  # float64: the schedule, exactly
        return ((x.double() - abar.sqrt() * point) / (1 - abar).sqrt()).float()
    return eps


def point_mass_velocity(point: torch.Tensor) -> Net:
    """The exact velocity for data that is always `point`: v = (point - x) / (1 - t), t = net time / 999."""
    return lambda x, t, labels=None: (point - x) / (1 - t / 999).view(-1, 1, 1, 1)


def tiny_conditional_unet(seed: int = 0) -> UNet:
    """An 8x8 two-level UNet with 3 classes, weights perturbed so the zero-initialised output is not zero."""
    cfg = ModelConfig(channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], head_channels=8,
                      dropout=0.0, num_classes=3)
    torch.manual_seed(seed)  # initialisation and perturbation both come from the global generator
    net = UNet(cfg, image_channels=2, resolution=8)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return net.eval()


def ddim_closed_form(slope: float, steps: int, eta: float, fresh: float) -> float:
    """DDIM (Eq. 12, sigma of Eq. 16) in float64 scalars for eps = slope * x, x_start = 1, randn = `fresh`."""
    abar = DDPM_OBJECTIVE.alpha_bar.tolist()
    taus = DDPM_OBJECTIVE.sampling_timesteps(steps)
    x = 1.0
    for i, tau in enumerate(taus):
        a_t, a_prev = abar[tau], (abar[taus[i + 1]] if i + 1 < len(taus) else 1.0)
        eps = slope * x
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
        x = (math.sqrt(a_prev) * (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
             + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * fresh)
    return x


# --- schedule, times, loss ------------------------------------------------------------------------------------


def test_registry_matches_config() -> None:
    assert set(OBJECTIVES) == set(SAMPLERS) == set(OBJECTIVE_SECTIONS)
    for kind, objective_class in OBJECTIVES.items():
        assert objective_class.samplers == SAMPLERS[kind]
        assert set(objective_class.editable_samplers) <= set(objective_class.samplers)
        assert set(objective_class.batch_dependent_samplers) <= set(objective_class.samplers)
        for sampler in objective_class.samplers:  # an FID row names only fields its objective declares
            assert set(objective_class.sampler_settings(SampleConfig(), sampler)) <= set(objective_class.sampler_fields)
    assert SAMPLER_FIELDS == ("eta", "clip_x0", "ddim_grid", "ode_atol", "ode_rtol")  # fid.jsonl's key order
    assert (DDPM.editable_samplers, Flow.editable_samplers) == (("ddim", "ddpm"), ("euler", "heun"))
    assert isinstance(build_objective(DDPMObjective()), DDPM)
    assert isinstance(build_objective(FlowObjective()), Flow)


def test_linear_schedule_values() -> None:
    betas, abar = DDPM_OBJECTIVE.betas, DDPM_OBJECTIVE.alpha_bar
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert abar[0].item() == pytest.approx(1 - 1e-4)
    assert abar[-1].sqrt().item() == pytest.approx(0.0064, abs=5e-5)  # PAPER.md: sqrt(abar_T) = 0.0064
    assert abar[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)


def test_sampling_timesteps() -> None:
    assert DDPM_OBJECTIVE.sampling_timesteps(5) == [999, 749, 500, 250, 0]
    assert DDPM_OBJECTIVE.sampling_timesteps(1) == [999]
    assert DDPM_OBJECTIVE.sampling_timesteps(1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="steps"):
        DDPM_OBJECTIVE.sampling_timesteps(1001)


def test_stride_sampling_timesteps_are_tqchs_arange() -> None:
    taus = DDPM_OBJECTIVE.sampling_timesteps(50, "stride")
    assert len(taus) == 50 and taus[0] == 980 and taus[-1] == 0
    assert {a - b for a, b in zip(taus, taus[1:])} == {20}
    assert DDPM_OBJECTIVE.sampling_timesteps(10, "stride") == list(range(900, -1, -100))
    for n in (1, 4, 8, 10, 50, 100, 250, 1000):  # N divides T: exactly tqch/ddpm-torch's arange(0, T, T // N)
        assert DDPM_OBJECTIVE.sampling_timesteps(n, "stride") == torch.arange(0, 1000, 1000 // n).flip(0).tolist()
    # N does not divide T: all of tqch's arange, which has 31 entries here (from 990), as tqch samples.
    assert DDPM_OBJECTIVE.sampling_timesteps(30, "stride") == list(range(30 * 33, -1, -33))
    with pytest.raises(ValueError, match="steps"):
        DDPM_OBJECTIVE.sampling_timesteps(1001, "stride")
    with pytest.raises(ValueError, match="grid"):
        DDPM_OBJECTIVE.sampling_timesteps(10, "quadratic")


@pytest.mark.parametrize("grid", ["linspace", "stride"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_ddpm_samplers_show_the_net_the_grid_timesteps(grid: str, sampler: str) -> None:
    seen = []

    def recording(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(t.tolist())
        return torch.zeros_like(x)

    DDPM_OBJECTIVE.sample(recording, torch.ones(2, 1, 2, 2), sampler=sampler, steps=10, grid=grid,
                          randn=torch.zeros_like)
    assert seen == [[float(tau)] * 2 for tau in DDPM_OBJECTIVE.sampling_timesteps(10, grid)]
    assert seen[0][0] == (999.0 if grid == "linspace" else 900.0)


@pytest.mark.parametrize("objective", [DDPM_OBJECTIVE, FLOW_OBJECTIVE], ids=["ddpm", "flow"])
def test_sample_t_range_and_determinism(objective: DDPM | Flow) -> None:
    t = objective.sample_t(4096, torch.Generator().manual_seed(1), "cpu")
    again = objective.sample_t(4096, torch.Generator().manual_seed(1), "cpu")
    other = objective.sample_t(4096, torch.Generator().manual_seed(2), "cpu")
    assert t.shape == (4096,) and torch.equal(t, again) and not torch.equal(t, other)
    if isinstance(objective, DDPM):
        assert t.dtype == torch.long and t.min() == 0 and t.max() == 999  # 4096 draws cover both ends
    else:
        assert t.dtype == torch.float32 and 0 <= t.min() < 0.01 and 0.99 < t.max() < 1
    net_time = objective.net_time(t)
    assert net_time.dtype == torch.float32 and 0 <= net_time.min() and net_time.max() <= 999


def test_ddpm_loss_builds_x_t_from_the_supplied_noise_and_targets_it() -> None:
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 2, 4, 4, generator=generator).unbind(0)  # each [B, C, H, W]
    t = torch.tensor([0, 500, 999])
    seen = {}

    def oracle(x_t: torch.Tensor, net_t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        seen.update(x_t=x_t, net_t=net_t)
        return noise  # the true noise: zero loss

    loss = DDPM_OBJECTIVE.loss(oracle, x0, noise, t)
    assert loss.shape == (3,) and torch.equal(loss, torch.zeros(3))
    abar = DDPM_OBJECTIVE.alpha_bar[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_t"], abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    torch.testing.assert_close(seen["net_t"], torch.tensor([0.0, 500.0, 999.0]))
    wrong = DDPM_OBJECTIVE.loss(lambda *_: noise + 2.0, x0, noise, t)
    torch.testing.assert_close(wrong, torch.full((3,), 4.0))  # per-sample mean over C, H, W


def test_flow_loss_builds_x_t_from_the_supplied_noise_and_targets_data_minus_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    data, noise = torch.randn(2, 3, 2, 4, 4, generator=generator).unbind(0)  # each [B, C, H, W]
    t = torch.tensor([0.0, 0.25, 1.0])
    seen = {}

    def oracle(x_t: torch.Tensor, net_t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        seen.update(x_t=x_t, net_t=net_t)
        return data - noise  # the true velocity: zero loss

    loss = FLOW_OBJECTIVE.loss(oracle, data, noise, t)
    assert loss.shape == (3,) and torch.equal(loss, torch.zeros(3))
    t_image = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_t"], t_image * data + (1 - t_image) * noise)
    torch.testing.assert_close(seen["net_t"], torch.tensor([0.0, 249.75, 999.0]))
    wrong = FLOW_OBJECTIVE.loss(lambda *_: data - noise - 1.0, data, noise, t)
    torch.testing.assert_close(wrong, torch.ones(3))


@pytest.mark.parametrize("scale", [1.0, 999.0])
def test_flow_net_sees_t_times_net_time_scale(scale: float) -> None:
    objective = Flow(FlowObjective(net_time_scale=scale))
    seen: list[torch.Tensor] = []

    def recording(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(t.clone())
        return torch.zeros_like(x)

    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    objective.loss(recording, torch.zeros(4, 1, 2, 2), torch.zeros(4, 1, 2, 2), t)
    assert len(seen) == 1 and seen[0].dtype == torch.float32
    assert seen[0].tolist() == [0.0, 0.25 * scale, 0.5 * scale, scale]  # exact: t itself when scale = 1 (torchcfm)
    seen.clear()
    objective.sample(recording, torch.zeros(3, 1, 2, 2), sampler="euler", steps=4)
    assert [s.tolist() for s in seen] == [[i / 4 * scale] * 3 for i in range(4)]  # t_i = i / N, times the scale
    seen.clear()
    objective.sample(recording, torch.zeros(3, 1, 2, 2), sampler="dopri5", steps=4)
    times = torch.stack(seen)  # [NFE, B]: every evaluation shows one time to the whole batch
    assert (times == times[:, :1]).all() and times[0, 0] == 0.0 and times.min() == 0.0
    assert times.max() >= scale  # its last step reaches (torchdiffeq: may pass, then interpolate back to) t = 1


# --- samplers on analytic nets ----------------------------------------------------------------------------------
# Golden values: x = 1 through 10 steps of each sampler with linear_net(0.5), fresh noise 0.1 where stochastic. They
# equal the closed forms checked beside them; rel 1e-5 covers float32 rounding only. Regenerate on purpose only,
# after a deliberate change of time grid or update rule, by printing the `sample(...)` value.


def constant_fresh_noise(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, 0.1)  # makes the stochastic samplers' closed forms scalar recursions


@pytest.mark.parametrize("eta, golden", [(0.0, 13.879140853881836), (0.5, 11.66852855682373)])
def test_ddim_on_a_linear_net(eta: float, golden: float) -> None:
    out = DDPM_OBJECTIVE.sample(linear_net(0.5), torch.ones(2, 1, 2, 2), sampler="ddim", steps=10, eta=eta,
                                randn=constant_fresh_noise)
    assert torch.allclose(out, torch.full_like(out, golden), rtol=1e-5, atol=0)
    assert out[0, 0, 0, 0].item() == pytest.approx(ddim_closed_form(0.5, 10, eta, 0.1), rel=1e-5)


def test_ddpm_ancestral_on_a_linear_net() -> None:
    out = DDPM_OBJECTIVE.sample(linear_net(0.5), torch.ones(2, 1, 2, 2), sampler="ddpm", steps=10,
                                randn=constant_fresh_noise)
    assert torch.allclose(out, torch.full_like(out, 4.515445709228516), rtol=1e-5, atol=0)
    # Ancestral sampling with beta-tilde is DDIM with eta = 1 (Song et al. 2021, Eq. 16).
    assert out[0, 0, 0, 0].item() == pytest.approx(ddim_closed_form(0.5, 10, 1.0, 0.1), rel=1e-5)


@pytest.mark.parametrize("sampler, golden, closed_form", [
    ("euler", 1.628894567489624, 1.05**10),  # (1 + h a)^N
    ("heun", 1.6464303731918335, (1 + 0.05 + 0.05**2 / 2) ** 9 * 1.05),  # Heun steps, then one Euler step
])
def test_flow_samplers_on_a_linear_net(sampler: str, golden: float, closed_form: float) -> None:
    out = FLOW_OBJECTIVE.sample(linear_net(0.5), torch.ones(2, 1, 2, 2), sampler=sampler, steps=10)
    assert torch.allclose(out, torch.full_like(out, golden), rtol=1e-5, atol=0)
    assert golden == pytest.approx(closed_form, rel=1e-6)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 7])
def test_flow_with_the_exact_point_mass_velocity_lands_on_the_point(sampler: str, steps: int) -> None:
    generator = torch.Generator().manual_seed(0)
    point = torch.randn(1, 3, 4, 4, generator=generator)
    noise = torch.randn(5, 3, 4, 4, generator=generator)
    out = FLOW_OBJECTIVE.sample(point_mass_velocity(point), noise, sampler=sampler, steps=steps)
    torch.testing.assert_close(out, point.expand_as(out), atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [1, 10, 50])
def test_ddim_with_the_exact_point_mass_epsilon_recovers_the_point(steps: int) -> None:
    generator = torch.Generator().manual_seed(0)
    point = torch.randn(1, 3, 4, 4, generator=generator)
    noise = torch.randn(5, 3, 4, 4, generator=generator)
    out = DDPM_OBJECTIVE.sample(point_mass_epsilon(point), noise, sampler="ddim", steps=steps)
    torch.testing.assert_close(out, point.expand_as(out), atol=1e-4, rtol=0)  # float32 eps / sqrt(abar_T)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_ddpm_equals_ddim_with_eta_one_on_a_real_net(clip: float | None) -> None:
    # With clipping too: the posterior mean of the clipped x0 is DDIM's step with eps recomputed from it.
    net = tiny_conditional_unet()
    noise = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    draws = torch.randn(10, 3, 2, 8, 8, generator=torch.Generator().manual_seed(1))

    def replay() -> Callable[[torch.Tensor], torch.Tensor]:
        calls = iter(draws)
        return lambda like: next(calls)

    with torch.no_grad():
        ancestral = DDPM_OBJECTIVE.sample(net, noise, sampler="ddpm", steps=6, randn=replay(), clip_x0=clip)
        ddim = DDPM_OBJECTIVE.sample(net, noise, sampler="ddim", steps=6, eta=1.0, randn=replay(), clip_x0=clip)
    torch.testing.assert_close(ancestral, ddim, atol=1e-4, rtol=1e-4)


def test_randn_is_called_once_per_stochastic_step_with_the_full_batch() -> None:
    noise = torch.randn(4, 1, 2, 2)
    shapes = []

    def recording_randn(like: torch.Tensor) -> torch.Tensor:
        shapes.append(like.shape)
        return torch.zeros_like(like)

    DDPM_OBJECTIVE.sample(linear_net(0.1), noise, sampler="ddpm", steps=8, randn=recording_randn)
    assert shapes == [noise.shape] * 7  # no fresh noise on the last step
    shapes.clear()
    DDPM_OBJECTIVE.sample(linear_net(0.1), noise, sampler="ddim", steps=8, randn=recording_randn)
    assert shapes == []  # eta = 0 is deterministic


# --- clipping of the predicted x0 --------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("clip", [1.0, 2.0])
def test_clip_x0_keeps_the_sample_in_range(sampler: str, clip: float) -> None:
    # eps = -4 x makes the predicted x0 = x (1 + 4 sqrt(1 - abar)) / sqrt(abar): far outside [-1, 1] at once.
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    kwargs = dict(sampler=sampler, steps=10, randn=torch.zeros_like)
    clipped = DDPM_OBJECTIVE.sample(linear_net(-4.0), noise, clip_x0=clip, **kwargs)
    free = DDPM_OBJECTIVE.sample(linear_net(-4.0), noise, **kwargs)
    assert clipped.abs().max() <= clip and clipped.abs().max() == clip  # in range, and the clip was active
    assert free.abs().max() > 10 * clip


def test_one_ddim_step_with_clipping_by_hand() -> None:
    # steps = 2: taus 999 -> 0, then 0 -> "abar = 1". The net says eps = -5 at t = 999 and eps = 0 at t = 0, so the
    # output is x_0 / sqrt(abar_0) = the first step's result, unclipped by the last step (it stays inside [-2, 2]).
    clip, eps_first = 2.0, -5.0
    a_t, a_0 = DDPM_OBJECTIVE.alpha_bar[999].item(), DDPM_OBJECTIVE.alpha_bar[0].item()

    def net(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return torch.where(t.view(-1, 1, 1, 1) > 500, eps_first, 0.0).expand_as(x)

    def by_hand(x: float, recompute: bool) -> float:
        x0 = (x - math.sqrt(1 - a_t) * eps_first) / math.sqrt(a_t)  # DDIM Eq. 12, predicted x0
        x0_clipped = min(max(x0, -clip), clip)
        eps = (x - math.sqrt(a_t) * x0_clipped) / math.sqrt(1 - a_t) if recompute else eps_first
        x_prev = math.sqrt(a_0) * x0_clipped + math.sqrt(1 - a_0) * eps  # eta = 0
        return min(max(x_prev / math.sqrt(a_0), -clip), clip)  # last step: eps = 0, clipped x0

    start = [-4.9, 0.01, -0.003]  # predicted x0: 15.7 and 788 (clipped to 2), -0.47 (inside)
    out = DDPM_OBJECTIVE.sample(net, torch.tensor(start).view(1, 1, 1, 3), sampler="ddim", steps=2, clip_x0=clip)
    expected = [by_hand(x, recompute=True) for x in start]
    assert out.flatten().tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert abs(by_hand(-4.9, recompute=False) - expected[0]) > 1e-4  # the eps recomputation is what is pinned
    assert abs(expected[0]) < clip  # so the final clip does not hide it


# --- dopri5 and the number of function evaluations ------------------------------------------------------------


def test_dopri5_matches_the_exact_solution_and_counts_its_evaluations() -> None:
    # v(x, t) = t - x (t = net time / 999): x(t) = t - 1 + (x(0) + 1) e^-t, so x(1) = (noise + 1) / e.
    from immiscible_cli.generation import CountingNet

    calls = []

    def net(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(1)
        return (t / 999).view(-1, 1, 1, 1) - x

    noise = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    counting = CountingNet(net)
    out = FLOW_OBJECTIVE.sample(counting, noise, sampler="dopri5", steps=1)  # steps is ignored
    torch.testing.assert_close(out, (noise + 1) / math.e, atol=1e-4, rtol=0)
    assert counting.calls == len(calls) > 0
    tight = FLOW_OBJECTIVE.sample(net, noise, sampler="dopri5", steps=1, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(tight, (noise + 1) / math.e, atol=1e-6, rtol=0)  # the tolerances reach the solver
    assert len(calls) > 2 * counting.calls


def test_dopri5_applies_guidance_to_the_velocity() -> None:
    # LabelScaledNet: cond = x (label + 1), uncond = 4 x; w = 2 gives v = k x with k = 4 + 2 (label + 1 - 4).
    labels = torch.tensor([0, 2])
    out = FLOW_OBJECTIVE.sample(LabelScaledNet(), torch.ones(2, 1, 2, 2), sampler="dopri5", steps=1,
                                labels=labels, guidance=2.0)
    expected = torch.tensor([math.exp(-2.0), math.exp(2.0)]).view(-1, 1, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize("objective, sampler, nfe", [
    (DDPM_OBJECTIVE, "ddim", 7), (DDPM_OBJECTIVE, "ddpm", 7), (FLOW_OBJECTIVE, "euler", 7),
    (FLOW_OBJECTIVE, "heun", 13),
])
def test_counting_net_counts_one_call_per_guided_prediction(objective: DDPM | Flow, sampler: str, nfe: int) -> None:
    from immiscible_cli.generation import CountingNet

    counting = CountingNet(LabelScaledNet())
    assert counting.num_classes == 3  # guidance finds the null label through the wrapper
    objective.sample(counting, torch.ones(2, 1, 2, 2), sampler=sampler, steps=7, labels=torch.tensor([0, 1]),
                     guidance=2.0, randn=torch.zeros_like)
    assert counting.calls == counting.net.calls == nfe
    counting.reset()
    assert counting.calls == 0


def test_dopri5_without_torchdiffeq_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "torchdiffeq", None)  # makes `import torchdiffeq` fail
    with pytest.raises(ValueError, match="torchdiffeq"):
        FLOW_OBJECTIVE.sample(linear_net(0.1), torch.ones(1, 1, 2, 2), sampler="dopri5", steps=1)


# --- guidance, errors, batch independence -----------------------------------------------------------------------


class LabelScaledNet(torch.nn.Module):
    """A conditional toy net: x * (label + 1); counts its forward calls."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        labels = torch.full((x.shape[0],), self.num_classes) if labels is None else labels
        return x * (labels.float() + 1).view(-1, 1, 1, 1)


def test_guidance_math() -> None:
    net, x, t = LabelScaledNet(), torch.ones(2, 1, 2, 2), torch.zeros(2)
    labels = torch.tensor([0, 2])
    cond, uncond = x * torch.tensor([1.0, 3.0]).view(-1, 1, 1, 1), x * 4.0
    torch.testing.assert_close(guided_prediction(net, x, t, labels, 1.0), cond)
    torch.testing.assert_close(guided_prediction(net, x, t, labels, 0.0), uncond)
    torch.testing.assert_close(guided_prediction(net, x, t, labels, 2.5), uncond + 2.5 * (cond - uncond))
    assert net.calls == 3  # one batched forward per guided prediction
    one_step = FLOW_OBJECTIVE.sample(net, x, sampler="euler", steps=1, labels=labels, guidance=0.0)
    torch.testing.assert_close(one_step, x + uncond)


def test_wrong_sampler_and_bad_arguments_raise() -> None:
    noise = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="euler"):
        DDPM_OBJECTIVE.sample(linear_net(0.1), noise, sampler="euler", steps=2)
    with pytest.raises(ValueError, match="ddim"):
        FLOW_OBJECTIVE.sample(linear_net(0.1), noise, sampler="ddim", steps=2)
    with pytest.raises(ValueError, match="randn"):
        DDPM_OBJECTIVE.sample(linear_net(0.1), noise, sampler="ddpm", steps=2)
    with pytest.raises(ValueError, match="eta"):
        DDPM_OBJECTIVE.sample(linear_net(0.1), noise, sampler="ddim", steps=2, eta=1.5, randn=torch.zeros_like)
    with pytest.raises(ValueError, match="class-conditional"):
        guided_prediction(linear_net(0.1), noise, torch.zeros(1), torch.tensor([0]), 2.0)


@pytest.mark.parametrize("objective, sampler, eta", [
    (DDPM_OBJECTIVE, "ddpm", 0.0), (DDPM_OBJECTIVE, "ddim", 0.5), (FLOW_OBJECTIVE, "euler", 0.0),
    (FLOW_OBJECTIVE, "heun", 0.0),
])
def test_samplers_are_deterministic_and_batch_independent(objective: DDPM | Flow, sampler: str, eta: float) -> None:
    # float64, so that a real dependence on the batch cannot hide in float32 rounding (which the sampler amplifies
    # by up to 1 / sqrt(abar_T) = 157 on this untrained net's x0 prediction).
    net = tiny_conditional_unet().double()
    seeds, labels = [11, 12, 13], torch.tensor([0, 2, 1])
    noise = torch.stack([torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                         for s in seeds])

    def per_image_randn(image_seeds: list[int]):  # like the caller: image i's draws depend on its seed only
        generators = [torch.Generator().manual_seed(1000 + s) for s in image_seeds]
        return lambda like: torch.stack([torch.randn(like.shape[1:], generator=g, dtype=like.dtype)
                                         for g in generators])

    def run(index: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return objective.sample(net, noise[index], sampler=sampler, steps=4, eta=eta, labels=labels[index],
                                    guidance=2.0, randn=per_image_randn([seeds[i] for i in index]))

    together = run([0, 1, 2])
    assert torch.equal(together, run([0, 1, 2]))
    assert torch.isfinite(together).all() and together.abs().max() > 0
    for i in range(3):
        torch.testing.assert_close(run([i]), together[i:i + 1], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(run([2, 0]), together[[2, 0]], atol=1e-9, rtol=1e-9)
