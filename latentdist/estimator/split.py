"""Held-out splits for one seed.

Rows are permuted with the seed, then: ``eval_x`` (n_eval data rows, never fitted on) is the
reference sample; ``eval_z`` (n_eval latent rows, disjoint from ``eval_x``'s rows) is pushed
through the fitted generator and compared with it; ``floor_x`` (the data rows of ``eval_z``) is
compared with ``eval_x`` for the finite-sample floor, i.e. what a perfect generator would score at
this sample size; ``val_x``/``val_z`` (n_val rows each, disjoint) choose between candidate
generators (``measure``'s selection) so that the choice never sees the evaluation rows; fitting
uses the remaining rows. A latent row and a data row of the same index therefore never meet
across evaluation, validation and fitting, so no pairing leaks into the distance.
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
    val_x: torch.Tensor
    val_z: torch.Tensor
    train_x: torch.Tensor
    train_z: torch.Tensor


def default_n_eval(n_rows: int) -> int:
    """1000 held-out points, fewer on small data so that half the rows remain for fitting."""
    return max(2, min(1000, n_rows // 4))


def default_n_val(n_eval: int) -> int:
    """Rows of each validation sample: a quarter of n_eval (at least 2)."""
    return max(2, n_eval // 4)


def make_split(n_z: int, n_x: int, n_eval: int, seed: int, paired: bool, n_val: int = 0) -> Split:
    n = min(n_z, n_x)
    held = 2 * n_eval + 2 * n_val
    if held >= n:
        raise UsageError(
            f"--n-eval {n_eval}: needs more than {held} rows (held-out data, a disjoint floor "
            f"sample, {2 * n_val} validation rows, and rows to fit on); the data have {n}"
        )
    g = torch.Generator().manual_seed(10_007 + seed)
    perm_x = torch.randperm(n_x, generator=g)
    perm_z = perm_x if (paired or n_z == n_x) else torch.randperm(n_z, generator=g)
    return Split(
        eval_x=perm_x[:n_eval],
        eval_z=perm_z[n_eval : 2 * n_eval],
        floor_x=perm_x[n_eval : 2 * n_eval],
        val_x=perm_x[2 * n_eval : 2 * n_eval + n_val],
        val_z=perm_z[2 * n_eval + n_val : held],
        train_x=perm_x[held:],
        train_z=perm_z[held:],
    )
