"""Held-out splits for one seed: ``make_split`` for ``measure``, ``distance_split`` for
``sample_distance``.

Each draws its own permutation stream (torch, seed offset 10_007, for measure; NumPy, seed
offset 20_011, for sample_distance), so every recorded result stays reproducible.

``make_split``: rows are permuted with the seed, then: ``eval_x`` (n_eval data rows, never fitted on) is the
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

import numpy as np
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


@dataclass
class DistanceSplit:
    """Row indices of one seed: into the reference (``ref_*``) and into the samples (``smp_*``).

    ``ref_fit`` trains the critic (its reference side) or the feature network; ``ref_fit_floor``
    plays the samples' part when the critic of the floor is trained, so the floor's critic sees
    as many rows as the distance's (``smp_fit``). All index sets within one array are disjoint.
    """

    ref_eval: np.ndarray
    ref_floor: np.ndarray
    ref_fit: np.ndarray
    ref_fit_floor: np.ndarray
    smp_eval: np.ndarray
    smp_fit: np.ndarray


def distance_split(
    n_ref: int, n_samples: int, n_eval: int, seed: int, *, fit: str | None = None
) -> DistanceSplit:
    """The split of one seed (see ``latentdist.evaluation.distance``); ``fit`` is None, "features" or "critic".

    * ``None``: ref_eval, ref_floor of n_eval rows each; needs n_ref >= 2 n_eval.
    * ``"features"``: ref_fit = all remaining reference rows (the feature network's training set).
    * ``"critic"``: the remaining reference rows are halved into ref_fit (reference side of both
      critics) and ref_fit_floor (the floor critic's other side); the samples give smp_fit, the
      rows after smp_eval, truncated with ref_fit_floor to a common size n_fit.
    """
    rng = np.random.default_rng(20_011 + seed)
    perm_r, perm_s = rng.permutation(n_ref), rng.permutation(n_samples)
    rest = perm_r[2 * n_eval :]
    empty = np.zeros(0, dtype=np.int64)
    ref_fit, ref_fit_floor, smp_fit = empty, empty, empty
    if fit == "features":
        ref_fit = rest
    elif fit == "critic":
        n_fit = min(len(rest) // 2, n_samples - n_eval)
        ref_fit, ref_fit_floor = rest[:n_fit], rest[n_fit : 2 * n_fit]
        smp_fit = perm_s[n_eval : n_eval + n_fit]
    return DistanceSplit(
        ref_eval=perm_r[:n_eval],
        ref_floor=perm_r[n_eval : 2 * n_eval],
        ref_fit=ref_fit,
        ref_fit_floor=ref_fit_floor,
        smp_eval=perm_s[:n_eval],
        smp_fit=smp_fit,
    )
