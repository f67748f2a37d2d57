"""Lipschitz bounds and Jacobian norms of a generator g: R^{latent} -> R^{data}.

Outputs are flattened, so every Jacobian J_g(z) is a (prod data_shape) x (prod latent_shape)
matrix and norms are Euclidean on the flattened vectors. g must map each row of a batch on its
own (every family in ``latentdist.generators`` does; no batch statistics in eval mode): the
Jacobian-vector products of a batch of points are then those of each point, in one pass.

* ``lipschitz_lower``: max_z ||J_g(z)||_2 over sample points, by power iteration with
  Jacobian-vector / vector-Jacobian products (never forming J). Any unit v gives
  ||J v|| <= ||J||_2 <= Lip(g), so the result is a valid lower bound whatever the convergence.
* ``lipschitz_upper``: Lip(f o h) <= Lip(f) Lip(h) and Lip(f + h) <= Lip(f) + Lip(h), recursed over
  the module tree (Sequential -> product, SumOfPaths -> sum), with each layer's operator norm.
* ``jacobian_fro``: mean_z ||J_g(z)||_F by Hutchinson's estimator (Hutchinson 1989).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn
from torch.func import jvp, vjp

from latentdist._shapes import Crop
from latentdist.errors import UsageError
from latentdist.generators.ensemble import channels_last
from latentdist.generators.modules import SumOfPaths

# Relative safety margin on Lanczos estimates of conv operator norms (see ``conv_operator_norm``).
CONV_NORM_MARGIN = 1e-5
# Operators up to this many input entries get their norm from the dense matrix (exact SVD).
_DENSE_MAX = 64
# Conv operators above this many input entries get the circular bound (``circular_conv_norm``):
# Lanczos took 20 s per conv generator at 96x96 and over 10 min at 250x250 on a CPU, while the
# circular bound is within 0.3% of it from 24x24 up (measured; it is looser on small grids).
_LANCZOS_MAX = 16_384


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Evaluate ``module`` in eval mode (Dropout off), restoring each submodule's flag after."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def _param_like(g: nn.Module) -> torch.Tensor | None:
    return next(iter(g.parameters()), None)


def as_latents(g: nn.Module, z: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``z`` as a floating tensor on the generator's device and dtype (float32 if g has no params)."""
    z = torch.as_tensor(z)
    p = _param_like(g)
    dtype = p.dtype if p is not None else torch.float32
    device = p.device if p is not None else z.device
    if z.ndim < 2 or z.shape[0] == 0:
        raise UsageError(
            f"latents must have shape (N, *latent_shape) with N >= 1, got {list(z.shape)}"
        )
    z = z.to(device=device, dtype=dtype)
    if not torch.isfinite(z).all():
        raise UsageError("latents contain NaN or infinite values")
    return z


def _chunks(z: torch.Tensor, chunk_size: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(row indices, rows) in chunks of ``chunk_size`` (all at once for None); image latents
    channels-last, which takes oneDNN's fast convolution backward on CPU (2-4x for conv)."""
    for rows in torch.arange(len(z), device=z.device).split(chunk_size or len(z)):
        yield rows, channels_last(z[rows])


def _jvp_rows(g: nn.Module, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Row i: vec(J_g(z_i) v_i). One forward-mode pass over the batch; exact because g maps each
    row independently (no batch statistics in eval mode), so its Jacobian on a batch is
    block-diagonal."""
    return jvp(g, (z,), (v,))[1].flatten(1)


def _unit(v: torch.Tensor) -> torch.Tensor:
    norms = v.flatten(1).norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    return v / norms.view(-1, *([1] * (v.ndim - 1)))


def _randn(shape: tuple[int, ...], like: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(like)


def lipschitz_lower(
    g: nn.Module,
    z: torch.Tensor | np.ndarray,
    *,
    n_iter: int = 30,
    seed: int = 0,
    tol: float = 1e-4,
    chunk_size: int | None = 64,
) -> float:
    """Lower bound of Lip(g): max over the points z of ||J_g(z)||_2, by power iteration.

    For each point, v <- J^T J v / ||J^T J v|| (J v by ``torch.func.jvp``, J^T u by
    ``torch.func.vjp``), for a batch of ``chunk_size`` points at once (g maps rows
    independently, so one pass over the batch gives every point's product), for at most
    ``n_iter`` steps, stopping early once no point of the batch moved by more than ``tol``
    (relative) in a step. The estimate ||J v|| with ||v|| = 1 never
    exceeds ||J||_2, and ||J_g(z)||_2 <= Lip(g) at every differentiable z (Federer 1969, 3.1.6),
    so the maximum is a valid lower bound for any number of steps; more steps only tighten it
    (power method: Golub & Van Loan, Matrix Computations, section 8.2). g runs in eval mode.
    """
    if n_iter < 1:
        raise UsageError(f"n_iter must be >= 1, got {n_iter}")
    z = as_latents(g, z)
    best = []
    with eval_mode(g), torch.no_grad():
        v_all = _unit(_randn(tuple(z.shape), z, seed))
        for rows, x in _chunks(z, chunk_size):
            out, pullback = vjp(g, x)

            def step(v: torch.Tensor, x=x, out=out, pullback=pullback):
                u = _jvp_rows(g, x, v)  # J v, row by row
                return u.norm(dim=1), pullback(u.reshape(out.shape))[0]  # ||J v||, J^T J v

            sigma, w = step(v_all[rows])  # sigma = ||J v|| for the current unit v
            for _ in range(n_iter):
                new, w = step(_unit(w))
                converged = bool(((new - sigma).abs() <= tol * new.abs()).all())
                sigma = torch.maximum(sigma, new)  # every ||J v|| is a lower bound; keep the best
                if converged:
                    break
            best.append(sigma.max())
    return float(torch.stack(best).max())


def jacobian_fro(
    g: nn.Module,
    z: torch.Tensor | np.ndarray,
    *,
    n_probes: int = 8,
    seed: int = 0,
    chunk_size: int | None = 64,
) -> float:
    """Mean over the points z of ||J_g(z)||_F, by Hutchinson's estimator with Rademacher probes.

    ||J||_F^2 = tr(J^T J) = E_v ||J v||^2 for any v with E[v v^T] = I (Hutchinson 1989). Probes are
    Rademacher (entries +-1), whose variance 2(||J^T J||_F^2 - sum_i (J^T J)_ii^2) / n_probes is
    below the Gaussian 2 ||J^T J||_F^2 / n_probes. Per point, the *square* is averaged over the
    probes (unbiased for ||J||_F^2), then its square root taken; the reported figure is the mean of
    those norms over points (the sqrt makes each per-point norm slightly low-biased, by Jensen).
    J v comes from ``torch.func.jvp``, one probe at a time over a batch of points.
    """
    if n_probes < 1:
        raise UsageError(f"n_probes must be >= 1, got {n_probes}")
    z = as_latents(g, z)
    gen = torch.Generator().manual_seed(seed)
    shape = (z.shape[0], n_probes, *z.shape[1:])
    probes = (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(z)
    norms = []
    with eval_mode(g), torch.no_grad():
        for rows, x in _chunks(z, chunk_size):
            squares = sum(
                _jvp_rows(g, x, probes[rows, k]).pow(2).sum(dim=1) for k in range(n_probes)
            )
            norms.append((squares / n_probes).sqrt())
    norms = torch.cat(norms)
    return float(norms.mean())


# ---------------------------------------------------------------- layer operator norms


def linear_operator_norm(layer: nn.Linear) -> float:
    """||W||_2, the largest singular value of the weight (exact SVD, ``matrix_norm(ord=2)``)."""
    return float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2))


def _conv_map(conv: nn.Conv2d, weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> conv(x) without bias: the linear part of the layer, with its own padding mode."""
    return lambda x: conv._conv_forward(x, weight, None)


def conv_operator_norm(conv: nn.Conv2d, input_shape: tuple[int, ...], *, seed: int = 0) -> float:
    """Upper bound of the operator norm of a Conv2d (bias dropped) as a linear map at ``input_shape``.

    The conv on a C x H x W input is a linear map A; ||A||_2^2 is the top eigenvalue of A^T A,
    applied matrix-free as conv then its adjoint (the ``torch.func.vjp`` of the conv, i.e. the
    transposed convolution), in float64. Small operators (<= 64 input entries) use the dense matrix
    and an exact SVD. Otherwise ARPACK's implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``,
    Lehoucq, Sorensen & Yang 1998) -- a Krylov method on the same products as power iteration, but
    far faster on the clustered spectra of convolutions -- converges to relative residual 1e-9,
    and the result is multiplied by (1 + ``CONV_NORM_MARGIN``) = 1 + 1e-5. The residual certifies
    that an eigenvalue lies within the tolerance of the estimate; that it is the *largest* holds
    with overwhelming probability from a random start but is not a formal proof. For a certified
    (looser) alternative see Sedghi, Gupta & Long (2019), "The Singular Values of Convolutional
    Layers", whose circular-convolution norm bounds the zero-padded one: that bound
    (``circular_conv_norm``) is used instead above ``_LANCZOS_MAX`` input entries, where it is
    both cheaper and near-exact.
    """
    if len(input_shape) != 3:
        raise UsageError(
            f"Conv2d expects a C x H x W input per sample, got shape {list(input_shape)}"
        )
    n = int(math.prod(input_shape))
    if n > _LANCZOS_MAX and (bound := circular_conv_norm(conv, input_shape)) is not None:
        return bound
    w = conv.weight.detach().double()
    op = _conv_map(conv, w)
    x0 = torch.zeros((1, *input_shape), dtype=torch.float64, device=w.device)
    _, pullback = vjp(op, x0)  # linear map: its adjoint does not depend on x0
    if n <= _DENSE_MAX:
        eye = torch.eye(n, dtype=torch.float64, device=w.device).view(n, *input_shape)
        dense = op(eye).reshape(n, -1).T  # column j = A e_j
        return float(torch.linalg.matrix_norm(dense, ord=2))

    def gram(v: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).to(w.device)
        (y,) = pullback(op(x.view(1, *input_shape)))
        return y.reshape(-1).cpu().numpy()

    with torch.no_grad():
        lin = LinearOperator((n, n), matvec=gram, dtype=np.float64)
        v0 = np.random.default_rng(seed).standard_normal(n)
        lam = eigsh(lin, k=1, which="LA", tol=1e-9, v0=v0, return_eigenvectors=False)[0]
    return math.sqrt(max(float(lam), 0.0)) * (1.0 + CONV_NORM_MARGIN)


def circular_conv_norm(conv: nn.Conv2d, input_shape: tuple[int, ...]) -> float | None:
    """Certified upper bound of a zero-padded Conv2d's operator norm at ``input_shape``: the exact
    norm of the circular convolution with the same kernel on an (H + p_h) x (W + p_w) grid, or
    None where the layer is not of the form it covers (stride 1, dilation 1, one group, zero
    padding p <= k - 1).

    The zero-padded conv is that circular conv applied to x embedded in the larger grid and
    restricted to the output positions (the wrap-around only reads padding zeros), so its norm is
    at most the circular one. A circular conv is diagonalised by the 2-D DFT: its singular values
    are those of the C_out x C_in matrices W^(f) = sum_a w[:, :, a] e^{-2 pi i <f, a> / N} over the
    grid's frequencies f (Sedghi, Gupta & Long 2019, "The Singular Values of Convolutional
    Layers", Theorem 6), computed here as one batched SVD in float64. It approaches the zero-padded
    norm as the image grows (the boundary is a vanishing share of the positions)."""
    pad = conv.padding
    if (
        isinstance(pad, str)
        or conv.stride != (1, 1)
        or conv.dilation != (1, 1)
        or conv.groups != 1
        or conv.padding_mode != "zeros"
        or any(p > k - 1 for p, k in zip(pad, conv.kernel_size, strict=True))
    ):
        return None
    grid = tuple(n + p for n, p in zip(input_shape[1:], pad, strict=True))
    spectrum = torch.fft.fft2(conv.weight.detach().double(), s=grid)  # (C_out, C_in, *grid)
    per_frequency = spectrum.permute(2, 3, 0, 1)  # (*grid, C_out, C_in)
    return float(torch.linalg.matrix_norm(per_frequency, ord=2).max())


def upsample_operator_norm(
    up: nn.Upsample, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> float:
    """Nearest upsampling by integer factors s_1, ..., s_k copies each entry prod(s_i) times, so
    ||U x||^2 = prod(s_i) ||x||^2 and ||U||_2 = sqrt(prod s_i) exactly (= s for s x s on 2-D maps)."""
    if up.mode not in ("nearest", "nearest-exact"):
        raise UsageError(
            f"Lipschitz bound: only nearest Upsample is supported, got mode={up.mode!r}"
        )
    factor = 1
    for a, b in zip(in_shape[1:], out_shape[1:], strict=True):
        if b % a:
            raise UsageError(
                f"Lipschitz bound: Upsample from {list(in_shape)} to {list(out_shape)} is not by an integer factor"
            )
        factor *= b // a
    return math.sqrt(factor)


# Parameter-free modules with a known Lipschitz constant (LeakyReLU / ELU checked below).
_ONE_LIPSCHITZ = (nn.ReLU, nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Tanh, Crop)
_SUPPORTED = (nn.Linear, nn.Conv2d, nn.Upsample, nn.LeakyReLU, nn.ELU, nn.Sigmoid, *_ONE_LIPSCHITZ)


def _out_shape(module: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    p = _param_like(module)
    x = torch.zeros(
        (1, *in_shape),
        dtype=p.dtype if p is not None else torch.float32,
        device=p.device if p is not None else "cpu",
    )
    with torch.no_grad():
        return tuple(module(x).shape[1:])


def leaf_lipschitz(
    module: nn.Module, in_shape: tuple[int, ...], cache: dict | None = None
) -> tuple[float, tuple[int, ...]]:
    """(Lipschitz constant, or an upper bound of it, of one leaf layer at ``in_shape``; output shape)."""
    if not isinstance(module, _SUPPORTED):
        raise UsageError(
            f"Lipschitz bound: unsupported module {type(module).__name__}; supported are Sequential, "
            "SumOfPaths, Linear, Conv2d, nearest Upsample, ReLU, LeakyReLU, ELU, Tanh, Sigmoid, "
            "Identity, Flatten, Unflatten, Dropout, Crop"
        )
    out_shape = _out_shape(module, in_shape)
    if isinstance(module, nn.Linear):
        return linear_operator_norm(module), out_shape
    if isinstance(module, nn.Conv2d):
        key = (id(module), in_shape)
        if cache is None or key not in cache:
            norm = conv_operator_norm(module, in_shape)
            if cache is None:
                return norm, out_shape
            cache[key] = norm
        return cache[key], out_shape
    if isinstance(module, nn.Upsample):
        return upsample_operator_norm(module, in_shape, out_shape), out_shape
    if isinstance(module, _ONE_LIPSCHITZ):
        return 1.0, out_shape
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(module.negative_slope)), out_shape
    if isinstance(module, nn.ELU):
        return max(1.0, module.alpha), out_shape
    return 0.25, out_shape  # Sigmoid: max derivative 1/4


def _upper(module: nn.Module, shape: tuple[int, ...], cache: dict) -> tuple[float, tuple[int, ...]]:
    if isinstance(module, nn.Sequential):
        bound = 1.0
        for child in module:
            b, shape = _upper(child, shape, cache)
            bound *= b
        return bound, shape
    if isinstance(module, SumOfPaths):
        results = [_upper(path, shape, cache) for path in module.paths]
        return sum(b for b, _ in results), results[0][1]
    return leaf_lipschitz(module, shape, cache)


def lipschitz_upper(
    g: nn.Module, input_shape: tuple[int, ...] | list[int], *, _cache: dict | None = None
) -> float:
    """Upper bound of Lip(g) (Euclidean norms) from the module structure.

    Recursion: Sequential f_k o ... o f_1 -> prod_i Lip(f_i); SumOfPaths sum_k p_k -> sum_k Lip(p_k);
    Linear -> ||W||_2 (exact); Conv2d -> its operator norm at the actual input shape, tracked
    through the recursion (``conv_operator_norm``: Lanczos to 1e-9 plus a 1e-5 relative margin,
    exact for tiny inputs); nearest Upsample by integer s x s -> s (exact); ReLU, LeakyReLU and ELU
    with slope/alpha <= 1, Tanh, Identity, Flatten, Unflatten, Crop, Dropout (eval) -> 1; Sigmoid -> 1/4.
    Biases do not affect Lipschitz constants. Composition and sum rules as in Szegedy et al. (2014)
    and Virmaux & Scaman (2018), "Lipschitz regularity of deep neural networks". ``input_shape``
    is the per-sample latent shape (no batch dimension).
    """
    with eval_mode(g):
        bound, _ = _upper(g, tuple(int(s) for s in input_shape), {} if _cache is None else _cache)
    return float(bound)
