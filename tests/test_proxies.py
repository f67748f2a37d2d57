"""Generator-complexity proxies against exact Jacobians, dense operator matrices and hand formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import jacrev, vmap

from latentdist.errors import UsageError
from latentdist.generators.modules import SumOfPaths, count_params, make_generator
from latentdist.proxies import (
    generator_proxies,
    jacobian_fro,
    lipschitz_lower,
    lipschitz_upper,
    spectral_complexity,
)
from latentdist.proxies.complexity import conv_21_norm


def _linear_generator(d_out: int, v_identity: bool = False) -> tuple[nn.Module, np.ndarray]:
    """make_generator('linear', (2,), (d_out,)) with weight A = U diag(3, 1) V^T."""
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((d_out, 2)))
    v = np.eye(2) if v_identity else np.linalg.qr(rng.standard_normal((2, 2)))[0]
    a = u @ np.diag([3.0, 1.0]) @ v.T
    g = make_generator("linear", (2,), (d_out,))
    with torch.no_grad():
        g[1].weight.copy_(torch.from_numpy(a))
    return g, a


def _dense(fn, in_shape: tuple[int, ...]) -> torch.Tensor:
    """Matrix of a linear map by applying it to the standard basis (column j = fn(e_j))."""
    n = math.prod(in_shape)
    eye = torch.eye(n, dtype=torch.float64).view(n, *in_shape)
    with torch.no_grad():
        return fn(eye).reshape(n, -1).T


def _exact_jacobians(g: nn.Module, z: torch.Tensor) -> torch.Tensor:
    f = lambda x: g(x.unsqueeze(0)).reshape(-1)  # noqa: E731
    with torch.no_grad():
        jac = vmap(jacrev(f))(z)
    return jac.reshape(z.shape[0], jac.shape[1], -1)


@pytest.mark.parametrize("d_out", [10, 3])
def test_linear_generator_lipschitz_exact(d_out):
    g, a = _linear_generator(d_out)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    assert lipschitz_lower(g, z) == pytest.approx(3.0, rel=1e-4)
    assert lipschitz_upper(g, (2,)) == pytest.approx(3.0, rel=1e-6)
    # one linear layer: R = ||A||_s * ((||A^T||_21 / ||A||_s)^(2/3))^(3/2) = ||A^T||_21
    assert spectral_complexity(g, (2,)) == pytest.approx(np.linalg.norm(a, axis=1).sum(), rel=1e-6)


def test_hutchinson_exact_for_diagonal_gram():
    # A^T A = diag(9, 1): every Rademacher probe gives v^T A^T A v = 10 = ||A||_F^2 exactly
    g, _ = _linear_generator(10, v_identity=True)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    assert jacobian_fro(g, z, n_probes=3) == pytest.approx(math.sqrt(10.0), rel=1e-6)


def _check_bounds_and_fro(g: nn.Module, latent_shape: tuple[int, ...], seed: int) -> None:
    g = g.double()
    z = torch.randn(
        24, *latent_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    jac = _exact_jacobians(g, z)
    exact_spec = torch.linalg.svdvals(jac)[:, 0]
    lower, upper = lipschitz_lower(g, z, seed=seed), lipschitz_upper(g, latent_shape)
    worst = float(exact_spec.max())
    assert lower <= worst * (1 + 1e-9) + 1e-12
    assert worst <= upper * (1 + 1e-9) + 1e-12

    # Hutchinson with p Rademacher probes: Var(||J||_F^2 estimate) = 2 (||M||_F^2 - sum M_ii^2) / p,
    # M = J^T J. Delta method for the sqrt, averaged over points; plus twice the Jensen bias.
    p = 8
    m = jac.transpose(1, 2) @ jac
    fro2 = m.diagonal(dim1=1, dim2=2).sum(1)
    var = 2 * (m.pow(2).sum((1, 2)) - m.diagonal(dim1=1, dim2=2).pow(2).sum(1)) / p
    fro = fro2.clamp_min(1e-30).sqrt()
    sd_mean = float((var / (4 * fro2.clamp_min(1e-30))).sum().sqrt() / len(z))
    bias = float((var / (8 * fro.pow(3))).mean())
    est = jacobian_fro(g, z, n_probes=p, seed=seed)
    assert abs(est - float(fro.mean())) <= 5 * sd_mean + 2 * bias + 1e-9


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(1, 4),
    d_out=st.integers(1, 6),
    width=st.integers(1, 12),
    depth=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_mlp_bounds_bracket_exact_jacobian(d_in, d_out, width, depth, seed):
    torch.manual_seed(seed)
    _check_bounds_and_fro(make_generator("mlp", (d_in,), (d_out,), width, depth), (d_in,), seed)


@settings(max_examples=10, deadline=None)
@given(
    width=st.integers(1, 4), depth=st.integers(1, 2), up=st.booleans(), seed=st.integers(0, 10_000)
)
def test_conv_bounds_bracket_exact_jacobian(width, depth, up, seed):
    torch.manual_seed(seed)
    data_shape = (1, 6, 6) if up else (1, 3, 3)
    g = make_generator("conv", (2, 3, 3), data_shape, width, depth)
    _check_bounds_and_fro(g, (2, 3, 3), seed)


def test_power_iteration_converges_to_worst_point():
    # fixed random MLPs: the 30-step power iteration reaches the exact max spectral norm
    for seed in range(10):
        torch.manual_seed(seed)
        g = make_generator("mlp", (3,), (5,), 4 + seed, 1 + seed % 3).double()
        z = torch.randn(24, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        worst = float(torch.linalg.svdvals(_exact_jacobians(g, z))[:, 0].max())
        assert lipschitz_lower(g, z, seed=seed) >= worst * (1 - 1e-4)


@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv2d(2, 3, 3, padding=1), (2, 6, 6)),  # Lanczos path
        (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 7, 5)),
        (nn.Conv2d(3, 2, 2, padding=0, dilation=2), (3, 6, 6)),
        (nn.Conv2d(1, 2, 3, padding=1), (1, 3, 3)),  # dense path
    ],
)
def test_conv_upper_equals_dense_operator_norm(conv, shape):
    torch.manual_seed(0)
    conv = conv.double()
    nn.init.normal_(conv.weight)
    dense = _dense(lambda x: conv._conv_forward(x, conv.weight, None), shape)
    exact = float(torch.linalg.matrix_norm(dense, ord=2))
    bound = lipschitz_upper(nn.Sequential(conv), shape)
    assert exact * (1 - 1e-12) <= bound <= exact * (1 + 2e-5)
    # ||A^T||_{2,1} of the dense matrix: the sum of its row norms
    assert conv_21_norm(conv, shape) == pytest.approx(float(dense.norm(dim=1).sum()), rel=1e-10)


@pytest.mark.parametrize("scale", [2, 3])
def test_nearest_upsample_bound_is_exact(scale):
    up = nn.Upsample(scale_factor=scale, mode="nearest")
    exact = float(torch.linalg.matrix_norm(_dense(up, (2, 3, 4)), ord=2))
    assert exact == pytest.approx(scale, rel=1e-12)
    assert lipschitz_upper(nn.Sequential(up), (2, 3, 4)) == pytest.approx(exact, rel=1e-12)


def test_sum_and_product_rules():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)
    na, nb = (float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2)) for m in (a, b))
    assert lipschitz_upper(nn.Sequential(a, nn.ReLU(), b), (3,)) == pytest.approx(na * nb, rel=1e-6)
    assert lipschitz_upper(SumOfPaths(a, b), (3,)) == pytest.approx(na + nb, rel=1e-6)


def test_spectral_complexity_two_layer_by_hand():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    w1, w2 = (m.weight.detach().double().numpy() for m in (net[0], net[2]))
    s1, s2 = np.linalg.norm(w1, 2), np.linalg.norm(w2, 2)
    n1, n2 = np.linalg.norm(w1, axis=1).sum(), np.linalg.norm(w2, axis=1).sum()  # ||W^T||_{2,1}
    expected = s1 * s2 * ((n1 / s1) ** (2 / 3) + (n2 / s2) ** (2 / 3)) ** 1.5
    assert spectral_complexity(net, (5,)) == pytest.approx(expected, rel=1e-9)
    # a skip path adds its own term: R(skip + body) = ||S^T||_21 + R(body)
    skip = nn.Linear(5, 3)
    ns = skip.weight.detach().double().norm(dim=1).sum().item()
    assert spectral_complexity(SumOfPaths(skip, net), (5,)) == pytest.approx(
        expected + ns, rel=1e-9
    )


def test_unknown_module_is_a_clear_error():
    g = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(UsageError, match="unsupported module BatchNorm1d"):
        lipschitz_upper(g, (3,))
    with pytest.raises(UsageError, match="Upsample"):
        lipschitz_upper(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear")), (1, 4, 4))


def test_generator_proxies_bundle():
    torch.manual_seed(0)
    g = make_generator("mlp", (3,), (5,), 8)
    z = torch.randn(300, 3, generator=torch.Generator().manual_seed(0))
    full = generator_proxies(g, z, (3,), n_max=50)
    assert full["n_points"] == 50 and full["params"] == count_params(g)
    assert full["lipschitz_upper"] == pytest.approx(lipschitz_upper(g, (3,)))
    assert full["spectral_complexity"] == pytest.approx(spectral_complexity(g, (3,)))
    assert 0 < full["lipschitz_lower"] <= full["lipschitz_upper"]
    fast = generator_proxies(g, z, (3,), fast=True)
    assert (
        fast["lipschitz_lower"] is None and fast["jacobian_fro"] is None and fast["n_points"] == 0
    )
    assert fast["lipschitz_upper"] == full["lipschitz_upper"]
    with pytest.raises(UsageError, match="per-sample shape"):
        generator_proxies(g, z, (4,))


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv2d(2, 3, 3, padding=1), (2, 6, 6)),
        (nn.Conv2d(3, 2, 3, padding=1), (3, 5, 7)),
        (nn.Conv2d(2, 2, 1), (2, 4, 4)),
    ],
)
def test_circular_bound_is_the_circular_norm_and_bounds_the_zero_padded_one(conv, shape):
    """Sedghi et al. 2019: the DFT's per-frequency SVDs give the exact norm of the circular conv
    on the (H+p) x (W+p) grid (dense check), which is at least the zero-padded conv's norm."""
    from latentdist.proxies.lipschitz import circular_conv_norm

    conv = conv.double()
    bound = circular_conv_norm(conv, shape)
    grid = (shape[0], *(n + p for n, p in zip(shape[1:], conv.padding, strict=True)))
    circular = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                         padding=conv.padding, padding_mode="circular", bias=False)  # fmt: skip
    circular = circular.double()
    circular.weight.data = conv.weight.data.clone()
    dense_circular = _dense(lambda x: circular(x), grid)
    assert bound == pytest.approx(float(torch.linalg.matrix_norm(dense_circular, ord=2)), rel=1e-9)
    dense = _dense(lambda x: conv._conv_forward(x, conv.weight, None), shape)
    assert bound >= float(torch.linalg.matrix_norm(dense, ord=2)) * (1 - 1e-12)
    strided = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    assert circular_conv_norm(strided, (2, 6, 6)) is None  # not a circulant: Lanczos instead
