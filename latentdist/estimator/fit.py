"""Fitting the generators of a sweep, all at once.

Three ways to fit g in G_c, each a different question (SPEC §1):

* ``ot``: distributional. Minimise the exact minibatch optimal-transport cost between g(z) and an
  *unpaired* data batch: for a batch of B latents and B data points, solve the assignment
  sigma = argmin_sigma sum_i c(g(z_i), x_sigma(i)) (SciPy's ``linear_sum_assignment``; with
  equal uniform weights this *is* the exact OT plan) and descend sum_i c(g(z_i), x_sigma(i)),
  whose gradient is the envelope-theorem gradient of minibatch OT (Fatras et al., 2020,
  "Learning with minibatch Wasserstein"). c = |.|^2 (W2), or |.| when the metric is W1.
* ``mmd``: distributional, metric-aligned. Minimise the unbiased MMD^2 between g(z) and an
  unpaired data batch under the evaluation kernel (a sum of Gaussians at multiples of a bandwidth
  fixed by the training data), as generative moment-matching networks do (Li et al., ICML 2015;
  Dziugaite et al., UAI 2015). Unlike minibatch OT, whose minibatch plans spread mass like an
  entropic plan and give blurry generators (Fatras et al. 2020), the minibatch MMD^2 is an
  unbiased estimate of the population loss, so its minimiser is the population's.
* ``adversarial``: the literal GAN game behind the distance: a WGAN-GP critic (Gulrajani et al.,
  2017) estimates W1 between g#P_z and P_x, and g minimises it.
* ``paired``: regression of x on its own latent E(x). This fits the reconstruction *upper bound*
  inf_g E|g(E(x)) - x| and needs the rows of latents and data to correspond.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from latentdist._progress import progress_bar as tqdm
from latentdist.checkpoint import Slot, rng_state, set_rng_state
from latentdist.discrepancy import MMD_SCALES
from latentdist.generators.ensemble import GeneratorEnsemble

FITS = ("mmd", "ot", "adversarial", "paired")
# The mmd fit takes a member's loss through its output map's factors when the map's rank r is at
# most this fraction of the data dimension D: O(B^2 r + B D r) against O(B^2 D) per step.
# benchmarks/bench_sweep.py measures one step both ways per capacity (sweep_cpu.md).
FACTORED_RANK = 0.25
# Fitting steps between two whose loss value is computed whole (and shown); the last always is.
SHOW_LOSS_EVERY = 25
DISTRIBUTIONAL = ("mmd", "ot", "adversarial")


@dataclass
class FitSettings:
    fit: str = "ot"
    steps: int = 400
    batch_size: int = 256
    lr: float = 2e-3
    cost: str = "sqeuclidean"  # or "euclidean" (W1)
    critic_width: int = 256
    critic_steps: int = 5  # critic updates per generator update (WGAN-GP)
    gradient_penalty: float = 10.0
    bandwidth: float = 1.0  # mmd fit: sigma of the kernel (measure sets it from training data)
    scales: tuple[float, ...] = MMD_SCALES  # mmd fit: multiples of sigma (the evaluation kernel)


def _columns(cost: np.ndarray) -> np.ndarray:
    return linear_sum_assignment(cost)[1]


@lru_cache(maxsize=1)
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    # keyed by process id: a forked child inherits the pool object but not its threads
    return ThreadPoolExecutor(workers, thread_name_prefix="latentdist-lsa")


def assignment(cost: torch.Tensor) -> torch.Tensor:
    """Exact OT plans between equal-size uniform batches: (M, B, B) costs -> (M, B) column indices.

    The M problems are independent and SciPy's solver releases the GIL, so they are solved on a
    thread pool as wide as torch's intra-op pool: an advantage only a batched fit has.
    """
    c = cost.detach().to("cpu", torch.float64).numpy()
    # Subtracting each column's, then each row's, minimum changes every assignment's cost by the
    # same constant, so not the solution; but it starts SciPy's shortest-augmenting-path solver
    # from Jonker-Volgenant's column reduction, which makes it several times faster on the
    # near-degenerate costs of early, blurry generators (all rows preferring the same columns).
    c = c - c.min(1, keepdims=True)
    c -= c.min(2, keepdims=True)
    workers = min(len(c), torch.get_num_threads())
    cols = (
        list(_pool(workers, os.getpid()).map(_columns, c))
        if workers > 1
        else [_columns(m) for m in c]
    )
    return torch.as_tensor(np.stack(cols), device=cost.device)


class _Envelope(torch.autograd.Function):
    """value(x_1, x_2, ...) with its gradients computed beforehand: apply(value, x_1, g_1, x_2,
    g_2, ...) with d value / d x_k = g_k (per member: value (M,), x_k and g_k (M, ...))."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, *inputs_and_grads: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*inputs_and_grads[1::2])
        return value.clone()

    @staticmethod
    def backward(ctx, grad_value: torch.Tensor):
        out: list[torch.Tensor | None] = [None]
        for grad in ctx.saved_tensors:
            out += [grad * grad_value.view(-1, *([1] * (grad.dim() - 1))), None]
        return tuple(out)


def minibatch_ot_loss(
    fake: torch.Tensor, real: torch.Tensor, slot: torch.Tensor, cost: str = "sqeuclidean"
) -> torch.Tensor:
    """Per-member minibatch OT cost (M,) between ``fake`` (M, B, ...) and ``real`` (S, B, ...).

    Member m is matched against the data batch of its slot ``slot[m]``. The loss is
    (1/B) sum_i c(f_i, x_sigma(i)) at the optimal assignment sigma; by the envelope theorem its
    gradient is that of the matched cost with sigma held fixed (Fatras et al., 2020): for
    c = |.|^2 it is (2/B)(f_i - x_sigma(i)), for c = |.| it is (f_i - x_sigma(i)) / (B |.|).
    It is computed directly, without an autograd graph through the cost matrix.
    """
    m, b = fake.shape[:2]
    f = fake.detach().flatten(2).float()
    r = real.flatten(2).float()
    with torch.no_grad():
        # |f|^2 + |r|^2 - 2 f.r, one GEMM per data batch: no per-member copy of the data
        f_sq = torch.linalg.vector_norm(f, dim=-1).square()
        r_sq = torch.linalg.vector_norm(r, dim=-1).square()
        c = torch.empty(m, b, b, device=f.device)
        for s in range(r.shape[0]):
            idx = (slot == s).nonzero().squeeze(1)
            if len(idx):
                f_s = f.index_select(0, idx).flatten(0, 1)
                gram = torch.mm(f_s, r[s].T).view(len(idx), b, b)
                c[idx] = gram.mul_(-2).add_(f_sq[idx, :, None]).add_(r_sq[s])
        cols = assignment(c if cost == "sqeuclidean" else c.clamp_min_(0).sqrt_())
        # index_select and in-place ops: on CPU several times faster here than fancy indexing
        # and fresh (M, B, D) buffers
        flat = (slot[:, None] * b + cols).flatten()  # rows of r.flatten(0, 1) matched to f
        diff = r.flatten(0, 1).index_select(0, flat).view_as(f)
        diff = torch.sub(f, diff, out=diff)
        dist = torch.linalg.vector_norm(diff, dim=-1)
        if cost == "sqeuclidean":
            value, grad = dist.square().mean(-1), diff.mul_(2.0 / b)
        else:
            value = dist.mean(-1)
            grad = diff.div_(dist.clamp_min(1e-12).mul(b)[..., None])
    return _Envelope.apply(value, fake, grad.reshape(fake.shape).to(fake.dtype))


def _sq_dists(a: torch.Tensor, a_sq: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor):
    """(M, B, B') squared distances from batched rows and their squared norms: one GEMM each.
    The fit's float32, batched form of ``discrepancy.kernels.sq_dists``, taking the norms so
    that each sample's are computed once per step."""
    d2 = torch.baddbmm(a_sq[..., :, None] + c_sq[..., None, :], a, c.mT, alpha=-2)
    return d2.clamp_min_(0)


def _kernel_sum_and_slope(
    d2: torch.Tensor, gammas: Sequence[float], *, within: bool, slope: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sum_ij K_ij (M,) and K'_ij (M, B, B') for K = mean_s exp(-g_s d2), K' = dK/d(d2).

    ``within``: ``d2`` is within one sample, and its diagonal (i = j) is left out of both, as
    the unbiased estimate leaves it out. The sum is taken scale by scale, never forming K.
    """
    total = d2.new_zeros(d2.shape[0])
    k_slope = torch.zeros_like(d2) if slope else None
    e = torch.empty_like(d2)
    for g in gammas:
        # exp(-87) is near float32's smallest normal: below it exp returns denormals, which the
        # CPU computes many times slower; the clamp changes a kernel value by less than 1e-37
        torch.mul(d2, -g, out=e).clamp_min_(-87.0).exp_()
        if within:
            e.diagonal(dim1=-2, dim2=-1).zero_()
        total += e.sum((-1, -2))
        if k_slope is not None:
            k_slope.add_(e, alpha=-2 * g)
    n = len(gammas)
    return total.div_(n), None if k_slope is None else k_slope.div_(n)


def within_kernel_means(real: torch.Tensor, gammas: Sequence[float]) -> torch.Tensor:
    """(S,): per data batch (S, B, D), the mean of k(x_i, x_j) over pairs i != j: the MMD^2
    estimate's data-data term, constant in the generator (one per step, however many members)."""
    b = real.shape[1]
    r_sq = torch.linalg.vector_norm(real, dim=-1).square_()
    total, _ = _kernel_sum_and_slope(
        _sq_dists(real, r_sq, real, r_sq), gammas, within=True, slope=False
    )
    return total / (b * (b - 1))


def _mmd_value_and_slopes(
    d2_ff: torch.Tensor, d2_fr: torch.Tensor, real_term: torch.Tensor, gammas
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-member unbiased MMD^2 (M,) from the fake-fake and fake-real squared distances and
    each member's data-data term, and P, Q (M, B, B) with d MMD^2 / d F = P F + Q R for F (B, D)
    a member's samples and R its data batch:
    P = diag_i(2/(B(B-1)) sum_{j!=i} K'_ff(i,j) - 2/B^2 sum_j K'_fr(i,j)) - 2/(B(B-1)) K'_ff,
    Q = 2/B^2 K'_fr (Gretton et al. 2012, eq. 3, differentiated through |f_i - x|^2)."""
    b = d2_ff.shape[1]
    k_ff, s_ff = _kernel_sum_and_slope(d2_ff, gammas, within=True)
    k_fr, s_fr = _kernel_sum_and_slope(d2_fr, gammas, within=False)
    pairs = b * (b - 1)
    value = k_ff / pairs + real_term - 2 * k_fr / b**2
    a, c = 2 / pairs, 2 / b**2
    rows = s_ff.sum(-1).mul_(a).sub_(s_fr.sum(-1), alpha=c)
    p = s_ff.mul_(-a)
    p.diagonal(dim1=-2, dim2=-1).add_(rows)
    return value, p, s_fr.mul_(c)


def minibatch_mmd_loss(
    fake: torch.Tensor,
    real: torch.Tensor,
    slot: torch.Tensor,
    gammas: Sequence[float],
    real_terms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-member unbiased MMD^2 (M,) between ``fake`` (M, B, ...) and ``real`` (S, B, ...).

    k(u, v) = mean_s exp(-g_s |u - v|^2); member m is compared with the data batch of its slot
    ``slot[m]`` (Gretton et al. 2012, eq. 3; the data-data term is constant in g but kept so
    that the value is the estimate itself). The gradient is computed in closed form rather than
    by autograd through the B x B kernel matrices (half the elementwise passes):
    d/df_i = 2/(B(B-1)) sum_{j!=i} K'_ff(i,j) (f_i - f_j) - 2/B^2 sum_j K'_fr(i,j) (f_i - r_j).
    ``real_terms``: ``within_kernel_means(real)``, when already computed for this step.
    """
    f = fake.detach().flatten(2).float()
    r = real.flatten(2).float()
    with torch.no_grad():
        f_sq = torch.linalg.vector_norm(f, dim=-1).square_()
        r_m = r.index_select(0, slot)
        r_sq = torch.linalg.vector_norm(r_m, dim=-1).square_()
        if real_terms is None:
            real_terms = within_kernel_means(r, gammas)
        value, p, q = _mmd_value_and_slopes(
            _sq_dists(f, f_sq, f, f_sq), _sq_dists(f, f_sq, r_m, r_sq), real_terms[slot], gammas
        )
        grad = torch.bmm(p, f).baddbmm_(q, r_m)
    return _Envelope.apply(value, fake, grad.reshape(fake.shape).to(fake.dtype))


def _small_gram(a: torch.Tensor) -> torch.Tensor:
    """A A^T (M, r, r) for ``a`` (M, r, K) contiguous. Written with the second factor K-contiguous:
    with a small r x r output and the other layouts, CPU BLAS computes a member's product
    differently depending on how many members share the call, which would break the bitwise
    equality of a sweep and its shards under torchrun (tests/test_selection.py checks)."""
    return torch.bmm(a, a.mT)


def factored_mmd_loss(
    h: torch.Tensor,
    u: torch.Tensor,
    real: torch.Tensor,
    slot: torch.Tensor,
    gammas: Sequence[float],
    real_terms: torch.Tensor | None = None,
) -> torch.Tensor:
    """``minibatch_mmd_loss`` of the samples F = H U^T, taken through the factors: ``h`` (M, B, r)
    and ``u`` (M, D, r), r < D (an mlp generator's output map, ``mlp_output_factors``).

    The loss only needs F's inner products, F F^T = H (U^T U) H^T and F R^T = H (R U)^T, and
    its gradient d/dF = P F + Q R reaches the factors as d/dH = P H (U^T U) + Q (R U) and
    d/dU = U (H^T P H) + R^T (Q^T H) (P is symmetric). Per member that is O(B^2 r + B D r) work
    instead of the O(B^2 D) of forming F: several times less for small generators on images.
    """
    r = real.flatten(2).float()
    with torch.no_grad():
        ut = u.mT.contiguous()
        gram = _small_gram(ut)  # U^T U
        hg = torch.bmm(h, gram)
        f_sq = (hg * h).sum(-1)
        r_m = r.index_select(0, slot)
        r_sq = torch.linalg.vector_norm(r_m, dim=-1).square_()
        # (U^T R^T), not R U: a product with the long D axis inner and a small output runs
        # several times faster in this orientation on CPU BLAS (likewise H^T Q R below)
        ur = torch.bmm(ut, r_m.mT)
        if real_terms is None:
            real_terms = within_kernel_means(r, gammas)
        value, p, q = _mmd_value_and_slopes(
            _sq_dists(hg, f_sq, h, f_sq), _sq_dists(h, f_sq, ur.mT, r_sq), real_terms[slot], gammas
        )
        grad_h = torch.bmm(p, hg).baddbmm_(q, ur.mT)
        hph = torch.bmm(torch.bmm(p, h).mT, h.mT.contiguous().mT)  # H^T P H, see _small_gram
        grad_ut = torch.bmm(hph, ut)  # (H^T P H) U^T
        grad_ut.baddbmm_(torch.bmm(h.mT, q), r_m)  # + H^T Q R
    return _Envelope.apply(value, h, grad_h.to(h.dtype), u, grad_ut.mT.to(u.dtype))


def factored_paired_loss(h: torch.Tensor, u: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Per member (M,), (1/B) sum_i |f_i - x_i|^2 for the samples F = H U^T (``h`` (M, B, r),
    ``u`` (M, D, r), as in ``factored_mmd_loss``) and their paired rows X (``data`` (M, B, ...)).

    (1/B)(tr(H^T H U^T U) - 2 tr(H^T X U) + |X|^2), with gradients d/dH = (2/B)(H U^T U - X U)
    and d/dU = (2/B)(U H^T H - X^T H): O(B D r + (B + D) r^2) work, none of it on B x D arrays.
    """
    b = h.shape[1]
    x = data.flatten(2).float()
    with torch.no_grad():
        ut = u.mT.contiguous()
        hg = torch.bmm(h, _small_gram(ut))
        xu = torch.bmm(ut, x.mT).mT  # (U^T X^T)^T: the fast orientation, as in factored_mmd_loss
        # sums over one axis at a time: each member's value is then reduced in the same order
        # whatever the number of members (a rank's share under torchrun gives the same bits)
        value = (hg * h).sum(-1).sum(-1).sub_((h * xu).sum(-1).sum(-1), alpha=2)
        value = value.add_(x.square().sum(-1).sum(-1)).div_(b)
        grad_h = hg.sub_(xu).mul_(2 / b)
        hth = _small_gram(h.mT.contiguous())
        grad_ut = torch.bmm(hth, ut).sub_(torch.bmm(h.mT, x)).mul_(2 / b)
    return _Envelope.apply(value, h, grad_h.to(h.dtype), u, grad_ut.mT.to(u.dtype))


class CriticEnsemble(nn.Module):
    """One MLP critic per member (leaky-ReLU, two hidden layers), vectorised like the generators."""

    def __init__(self, in_dim: int, width: int, n: int, seed: int = 0, keep=None):
        super().__init__()
        torch.manual_seed(seed + 12345)
        critics = [
            nn.Sequential(
                nn.Flatten(),
                nn.Linear(in_dim, width),
                nn.LeakyReLU(0.2),
                nn.Linear(width, width),
                nn.LeakyReLU(0.2),
                nn.Linear(width, 1),
            )
            for _ in range(n)
        ]
        if keep is not None:  # a subset of a sweep's critics, initialised as in the whole sweep
            critics = [critics[i] for i in keep]
        stacked, _ = stack_module_state(critics)
        self.names = list(stacked)
        self.weights = nn.ParameterList(
            [nn.Parameter(stacked[k].detach().clone()) for k in self.names]
        )
        self._template = (critics[0].to("meta"),)  # a tuple: not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = dict(zip(self.names, self.weights, strict=True))
        return vmap(lambda p, xb: functional_call(self._template[0], p, (xb,)))(params, x).squeeze(
            -1
        )


def _critic_loss(
    critic: CriticEnsemble, fake: torch.Tensor, real: torch.Tensor, gp: float, subset=None
) -> torch.Tensor:
    """WGAN-GP critic loss per member: E f(fake) - E f(real) + gp * E (|grad f(x_hat)| - 1)^2.

    ``subset`` (members in the whole sweep, positions of these members): the interpolation
    weights are drawn for the whole sweep and these members' rows kept, so that a member's
    draws do not depend on which members share its ensemble (a rank's share under torchrun).
    """
    n, keep = subset if subset is not None else (real.shape[0], None)
    t = torch.rand(n, real.shape[1], *([1] * (real.dim() - 2)), device=real.device)
    t = t if keep is None else t[keep]
    x_hat = (t * real + (1 - t) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    penalty = (grad.flatten(2).norm(dim=-1) - 1).square().mean(-1)
    return critic(fake).mean(-1) - critic(real).mean(-1) + gp * penalty


def _draw(pools: Sequence[torch.Tensor], batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """(slots, B) row indices: a random batch from each slot's pool."""
    pos = [torch.randint(len(p), (batch_size,), generator=gen) for p in pools]
    return torch.stack([p[i.to(p.device)] for p, i in zip(pools, pos, strict=True)])


def _critic_step(critic, critic_opt, ensemble, z, x, gp: float, subset) -> None:
    """One WGAN-GP critic update against the ensemble's current samples."""
    with torch.no_grad():
        fake = ensemble(z)
    critic_opt.zero_grad(set_to_none=True)
    _critic_loss(critic, fake, x, gp, subset).sum().backward()
    critic_opt.step()


def fit_ensemble(
    ensemble: GeneratorEnsemble,
    latents: torch.Tensor,
    data: torch.Tensor,
    train_z: Sequence[torch.Tensor],
    train_x: Sequence[torch.Tensor],
    slot: Sequence[int],
    settings: FitSettings,
    *,
    seed: int = 0,
    progress: bool = True,
    subset: tuple[int, Sequence[int]] | None = None,
    checkpoint: Slot | None = None,
) -> dict[str, list[float]]:
    """Fit every member of ``ensemble`` in one loop; returns per-member final losses.

    ``latents``/``data`` hold all rows (on the fitting device); ``train_z[s]``/``train_x[s]`` are
    the row indices that seed slot ``s`` may train on; member ``m`` uses slot ``slot[m]``. Each
    step draws, per slot, a batch of latents and an (independent, for ot/adversarial) batch of
    data; members of one slot share it, so capacities are compared on common random numbers.
    ``subset`` = (members of the whole sweep, positions of this ensemble's members in it): the
    adversarial fit's critics and random draws are then those of the whole sweep's members.
    ``checkpoint``: where the loop's whole state (weights, optimisers, step, random streams) is
    saved when due and at the end, and resumed from when it holds one: the result is bitwise
    that of an uninterrupted loop.
    """
    device = latents.device
    n_members = len(ensemble.members)
    slot_t = torch.as_tensor(list(slot), device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    adversarial = settings.fit == "adversarial"
    betas = (0.5, 0.9) if adversarial else (0.9, 0.999)  # WGAN-GP's betas for the game
    opt = torch.optim.Adam(ensemble.parameters(), lr=settings.lr, betas=betas)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, settings.steps))
    gammas = [1.0 / (2.0 * (a * settings.bandwidth) ** 2) for a in settings.scales]
    critic = critic_opt = None
    if adversarial:
        critic = CriticEnsemble(
            int(np.prod(data.shape[1:])),
            settings.critic_width,
            n_members if subset is None else subset[0],
            seed,
            keep=None if subset is None else list(subset[1]),
        ).to(device)
        critic_opt = torch.optim.Adam(critic.parameters(), lr=1e-4, betas=(0.5, 0.9))

    def draw(pools: Sequence[torch.Tensor]) -> torch.Tensor:
        return _draw(pools, settings.batch_size, gen)

    critic_pair = (critic, critic_opt) if adversarial else None
    step0, losses = _restore(checkpoint, ensemble, opt, sched, gen, critic_pair, n_members)
    bar = tqdm(
        range(step0, settings.steps),
        initial=step0,
        total=settings.steps,
        desc=f"fit {settings.fit}",
        disable=not progress,
        leave=False,
    )
    for step in bar:
        # the loss's value is what is shown and returned; the mmd fit leaves out its data-data
        # term (constant in g: the gradient is the same) on the steps between
        exact = step % SHOW_LOSS_EVERY == 0 or step + 1 == settings.steps
        per_member = _member_losses(
            settings, ensemble, latents, data, train_z, train_x, slot_t, draw, critic_pair,
            gammas, subset, exact,
        )  # fmt: skip
        opt.zero_grad(set_to_none=True)
        per_member.sum().backward()
        ensemble.mask_gradients()
        opt.step()
        sched.step()
        if exact:
            losses = per_member.detach().cpu()
            if progress:
                bar.set_postfix(loss=f"{losses.mean():.4g}")
        if checkpoint is not None and (checkpoint.due() or step + 1 == settings.steps):
            checkpoint.save(_loop_state(step + 1, losses, ensemble, opt, sched, gen, critic_pair))
    return {"final_loss": losses.tolist()}


def _member_losses(
    settings: FitSettings, ensemble, latents, data, train_z, train_x, slot_t, draw,
    critic_pair: tuple | None, gammas: list[float], subset, exact: bool = True,
) -> torch.Tensor:  # fmt: skip
    """One step's per-member loss (M,) on fresh batches (and, adversarially, the critic's
    updates before it). ``exact=False``: a value that may differ from the loss by a constant
    in the generators (same gradient)."""
    if settings.fit == "paired":  # the same rows of latents and data
        rows = draw(train_z)
        z, x = latents[rows][slot_t], data[rows][slot_t]
    else:
        z = latents[draw(train_z)][slot_t]
        x = data[draw(train_x)]  # (slots, B, ...): members index it by slot
        if critic_pair is not None:
            x = x[slot_t]
    if critic_pair is not None:
        critic, critic_opt = critic_pair
        for _ in range(settings.critic_steps):
            _critic_step(critic, critic_opt, ensemble, z, x, settings.gradient_penalty, subset)
            x = data[draw(train_x)][slot_t]
            z = latents[draw(train_z)][slot_t]
        return -critic(ensemble(z)).mean(-1)
    if settings.fit == "ot":
        return minibatch_ot_loss(ensemble(z), x, slot_t, settings.cost)
    if settings.fit == "mmd":
        return ensemble_mmd_losses(ensemble, z, x, slot_t, gammas, exact)
    return ensemble_paired_losses(ensemble, z, x)


def _bucket_losses(ensemble: GeneratorEnsemble, z, of_samples, of_factors):
    """Per-member losses (M,), bucket by bucket: ``of_factors(part, H, U)`` for buckets whose
    output map has rank <= FACTORED_RANK x the data dimension, else ``of_samples(part,
    samples)`` (``part``: the bucket's slice of members)."""
    d_out = math.prod(ensemble.data_shape)
    losses = []
    for part, bucket in ensemble.parts():
        rank = bucket.output_rank
        if rank is not None and rank <= FACTORED_RANK * d_out:
            losses.append(of_factors(part, *bucket.output_factors(z[part])))
        else:
            losses.append(of_samples(part, bucket(z[part])))
    return torch.cat(losses)


def ensemble_mmd_losses(
    ensemble: GeneratorEnsemble, z, x, slot_t, gammas, data_term: bool = True
) -> torch.Tensor:
    """``minibatch_mmd_loss`` per member, through the output factors (``factored_mmd_loss``)
    where their rank is small. ``data_term=False``: without the data-data term (a B x B x D
    product per data batch)."""
    with torch.no_grad():
        real_terms = (
            within_kernel_means(x.flatten(2).float(), gammas) if data_term else x.new_zeros(len(x))
        )
    return _bucket_losses(
        ensemble, z,
        lambda part, fake: minibatch_mmd_loss(fake, x, slot_t[part], gammas, real_terms),
        lambda part, h, u: factored_mmd_loss(h, u, x, slot_t[part], gammas, real_terms),
    )  # fmt: skip


def ensemble_paired_losses(ensemble: GeneratorEnsemble, z, x) -> torch.Tensor:
    """Per member (M,), the mean over the batch of |g(z_i) - x_i|^2 for ``z``, ``x`` (M, B, ...)
    paired row by row; through the output factors (``factored_paired_loss``) where their rank
    is small."""
    return _bucket_losses(
        ensemble, z,
        lambda part, fake: (fake - x[part]).flatten(2).square().sum(-1).mean(-1),
        lambda part, h, u: factored_paired_loss(h, u, x[part]),
    )  # fmt: skip


def _loop_state(step: int, losses, ensemble, opt, sched, gen, critic_pair) -> dict:
    """Everything the fitting loop carries from one step to the next."""
    state = {
        "step": step,
        "losses": losses,
        "ensemble": ensemble.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        "rng": rng_state(),
    }
    if critic_pair is not None:
        state["critic"] = critic_pair[0].state_dict()
        state["critic_optimizer"] = critic_pair[1].state_dict()
    return state


def _restore(
    checkpoint: Slot | None, ensemble, opt, sched, gen, critic_pair, n_members: int
) -> tuple[int, torch.Tensor]:
    """The step to start from and the last losses: a checkpoint's, loaded into the loop's
    objects, or (0, zeros) without one."""
    state = None if checkpoint is None else checkpoint.load()
    if state is None:
        return 0, torch.zeros(n_members)
    ensemble.load_state_dict(state["ensemble"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    set_rng_state(state["rng"])
    if critic_pair is not None:
        critic_pair[0].load_state_dict(state["critic"])
        critic_pair[1].load_state_dict(state["critic_optimizer"])
    return int(state["step"]), state["losses"]
