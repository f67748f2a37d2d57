"""The generation probe (rectified flow) and KID, on cases with known answers."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from latentdist.errors import UsageError
from latentdist.evaluation.generation import kid_subsets as kid
from latentdist.evaluation.probe import PROBE_RECIPE, ConvVelocity, FlowPrior, ProbeRecipe

SMALL = ProbeRecipe(steps=400, batch_size=256, lr=3e-3, width=128, sample_steps=32)


def test_flow_recovers_a_correlated_gaussian():
    """Mean and scale come back through the per-channel standardisation; the correlation 0.8
    must be learnt by the flow itself (a standardised N(0, I) start has none)."""
    rng = np.random.default_rng(0)
    cov = np.array([[4.0, 0.8 * 2 * 0.5], [0.8 * 2 * 0.5, 0.25]])
    z = torch.as_tensor(rng.multivariate_normal([1.0, -2.0], cov, 4000), dtype=torch.float32)
    s = FlowPrior(SMALL).fit(z, seed=0).sample(4000, seed=1).double().numpy()
    assert s.shape == (4000, 2)
    assert s.mean(0) == pytest.approx([1.0, -2.0], abs=0.1)
    assert s.std(0) == pytest.approx([2.0, 0.5], rel=0.1)
    assert np.corrcoef(s.T)[0, 1] == pytest.approx(0.8, abs=0.06)


def test_flow_keeps_the_two_modes_of_a_1d_mixture():
    g = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, (4000, 1), generator=g) * 2 - 1
    z = 2.0 * sign + 0.3 * torch.randn(4000, 1, generator=g)
    s = FlowPrior(SMALL).fit(z, seed=0).sample(4000, seed=1).squeeze(1)
    assert float((s > 0).double().mean()) == pytest.approx(0.5, abs=0.06)
    near = ((s.abs() - 2.0).abs() < 0.75).double().mean()
    assert float(near) > 0.85  # most samples sit on a mode, not in the gap between them


def test_flow_keeps_latent_shape_and_is_seeded():
    z = torch.randn(64, 2, 3, 3)
    for tiny in (
        ProbeRecipe(steps=5, width=16, sample_steps=4),
        ProbeRecipe(
            steps=5, conv_width=8, conv_blocks=1, ema=0.5, sample_steps=2, integrator="heun"
        ),
    ):
        threads = torch.get_num_threads()
        a = FlowPrior(tiny).fit(z, seed=3).sample(10, seed=4)
        assert torch.get_num_threads() == threads  # the probe's one-thread setting is undone
        b = FlowPrior(tiny).fit(z, seed=3).sample(10, seed=4)
        assert a.shape == (10, 2, 3, 3) and torch.equal(a, b)
        assert not torch.equal(a, FlowPrior(tiny).fit(z, seed=5).sample(10, seed=4))
        assert not torch.equal(a, FlowPrior(tiny).fit(z, seed=3).sample(10, seed=6))
    with pytest.raises(UsageError):
        FlowPrior(tiny).fit(torch.tensor([[float("nan")], [1.0]]))


def test_conv_flow_recovers_per_channel_gaussians():
    """A (2, 4, 4) latent, independent per position, channel means 3 and -1 and sds 0.5 and 2:
    the conv velocity net (EMA, Heun) returns them."""
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor([3.0, -1.0]).view(1, 2, 1, 1)
    sd = torch.tensor([0.5, 2.0]).view(1, 2, 1, 1)
    z = mean + sd * torch.randn(2000, 2, 4, 4, generator=g)
    conv = ProbeRecipe(
        steps=150, batch_size=64, lr=3e-3, conv_width=16, conv_blocks=1, ema=0.9,
        sample_steps=8, integrator="heun",
    )  # fmt: skip
    prior = FlowPrior(conv).fit(z, seed=0)
    assert isinstance(prior.net, ConvVelocity)
    s = prior.sample(1000, seed=1)
    assert s.shape == (1000, 2, 4, 4)
    assert s.mean(dim=(0, 2, 3)).tolist() == pytest.approx([3.0, -1.0], abs=0.15)
    assert s.std(dim=(0, 2, 3)).tolist() == pytest.approx([0.5, 2.0], rel=0.1)


def test_conv_recipe_uses_an_mlp_for_flat_latents():
    r = ProbeRecipe(steps=2, conv_width=8, conv_blocks=1, sample_steps=2)
    assert not isinstance(FlowPrior(r).fit(torch.randn(16, 5)).net, ConvVelocity)
    assert isinstance(FlowPrior(r).fit(torch.randn(16, 1, 3, 3)).net, ConvVelocity)


def test_ema_weights_are_the_hand_computed_average(monkeypatch):
    """The sampling net's weights equal w_1 then e <- d e + (1 - d) w_k over the trained net's
    weights after every step (recorded as they are handed to the average)."""
    seen: list[list[torch.Tensor]] = []
    update = AveragedModel.update_parameters

    def spy(self, model):
        seen.append([p.detach().clone() for p in model.parameters()])
        update(self, model)

    monkeypatch.setattr(AveragedModel, "update_parameters", spy)
    d = 0.8
    r = ProbeRecipe(steps=6, width=8, lr=0.05, ema=d, sample_steps=2)
    prior = FlowPrior(r).fit(torch.randn(32, 3), seed=0)
    assert len(seen) == 6
    ema = seen[0]
    for w in seen[1:]:
        ema = [d * e + (1 - d) * x for e, x in zip(ema, w, strict=True)]
    got = list(prior.ema_net.parameters())
    for e, x, last in zip(ema, got, prior.net.parameters(), strict=True):
        assert torch.allclose(e, x, atol=1e-6)
        assert not torch.allclose(x, last)  # the average is not the last weights
    plain = FlowPrior(replace(r, ema=0.0)).fit(torch.randn(32, 3), seed=0)
    assert plain.ema_net is plain.net


class _Grow(nn.Module):
    def forward(self, x, t):  # dx/dt = x: x(1) = e x(0)
        return x


@pytest.mark.parametrize("integrator", ["euler", "heun"])
def test_integrators_take_their_textbook_steps(integrator):
    """On dx/dt = x, k Euler steps multiply by (1 + h)^k and k Heun steps by
    (1 + h + h^2 / 2)^k, h = 1/k."""
    k = 4
    prior = FlowPrior(ProbeRecipe(sample_steps=k, integrator=integrator))
    prior.ema_net, prior.latent_shape = _Grow(), (3,)
    prior.shift, prior.scale = torch.zeros(3), torch.ones(3)
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(7))
    h = 1 / k
    factor = (1 + h) ** k if integrator == "euler" else (1 + h + h * h / 2) ** k
    assert torch.allclose(prior.sample(5, seed=7), factor * x0, rtol=1e-5)


def test_the_recipe_is_valid_and_says_what_it_runs():
    text = PROBE_RECIPE.describe()
    assert f"{PROBE_RECIPE.steps} Adam steps" in text
    assert f"{PROBE_RECIPE.sample_steps} {PROBE_RECIPE.integrator.capitalize()} steps" in text
    assert ("EMA" in text) == bool(PROBE_RECIPE.ema)
    assert ("conv velocity net" in text) == bool(PROBE_RECIPE.conv_width)
    for bad in (dict(ema=1.0), dict(integrator="rk4"), dict(steps=0)):
        with pytest.raises(UsageError):
            FlowPrior(replace(PROBE_RECIPE, **bad))


def _kid_direct(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y/d + 1)^3, written term by term."""
    d, m, n = a.shape[1], len(a), len(b)

    def k(x, y):
        return (x @ y / d + 1) ** 3

    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_a_direct_computation():
    """With one subset as large as the sets, the subset is the whole set (in another order)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((30, 4)), rng.standard_normal((30, 4)) + 0.5
    assert kid(a, b, n_subsets=1, subset_size=30) == pytest.approx(_kid_direct(a, b), rel=1e-10)
    # averaged over subsets: unbiased, so near 0 for one distribution and clearly positive apart
    same = kid(rng.standard_normal((600, 8)), rng.standard_normal((600, 8)), subset_size=200)
    apart = kid(rng.standard_normal((600, 8)), rng.standard_normal((600, 8)) + 0.5, subset_size=200)
    assert abs(same) < 0.02 < apart
    with pytest.raises(UsageError):
        kid(a, b[:, :3])
