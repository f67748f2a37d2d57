"""Held-out splits for one seed.

Rows are permuted with the seed, then: ``eval_x`` (n_eval data rows, never fitted on) is the
reference sample; ``eval_z`` (n_eval latent rows, disjoint from ``eval_x``'s rows) is pushed
through the fitted generator and compared with it; ``floor_x`` (the data rows of ``eval_z``) is
compared with ``eval_x`` for the finite-sample floor, i.e. what a perfect generator would score at
this sample size; fitting uses the remaining rows. A latent row and a data row of the same index
therefore never meet across evaluation and fitting, so no pairing leaks into the distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentdist.errors import UsageError


@dataclass
class Split:
    eval_x: torch.Tensor
    eval_z: torch.Tensor
    floor_x: torch.Tensor
    train_x: torch.Tensor
    train_z: torch.Tensor


def default_n_eval(n_rows: int) -> int:
    """1000 held-out points, fewer on small data so that half the rows remain for fitting."""
    return max(2, min(1000, n_rows // 4))


def make_split(n_z: int, n_x: int, n_eval: int, seed: int, paired: bool) -> Split:
    n = min(n_z, n_x)
    if 2 * n_eval >= n:
        raise UsageError(
            f"--n-eval {n_eval}: needs more than 2 x n_eval = {2 * n_eval} rows (held-out data, "
            f"a disjoint floor sample, and rows to fit on); the data have {n}"
        )
    g = torch.Generator().manual_seed(10_007 + seed)
    perm_x = torch.randperm(n_x, generator=g)
    perm_z = perm_x if (paired or n_z == n_x) else torch.randperm(n_z, generator=g)
    return Split(
        eval_x=perm_x[:n_eval],
        eval_z=perm_z[n_eval : 2 * n_eval],
        floor_x=perm_x[n_eval : 2 * n_eval],
        train_x=perm_x[2 * n_eval :],
        train_z=perm_z[2 * n_eval :],
    )
