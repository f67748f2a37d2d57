"""``as_rows``: the one check that an input is a non-empty block of finite numbers.

Every entry point that takes samples (the metrics, ``Judge``, the Frechet distance, PRDC, the
priors) reads them through it, so an empty or non-finite input fails the same way everywhere,
with a one-line ``UsageError``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from latentdist.errors import UsageError

__all__ = ["Array", "as_row_pair", "as_rows"]

Array = Any  # np.ndarray | torch.Tensor | nested sequences


def as_rows(
    a: Array,
    what: str,
    *,
    dtype: torch.dtype = torch.float64,
    flat: bool = True,
    device: str | torch.device | None = "cpu",
) -> torch.Tensor:
    """``a`` (n, ...) as a ``dtype`` tensor of n rows; rejects empty or non-finite input.

    ``flat``: reshape to (n, D); otherwise keep the sample shape (a 1-D input becomes (n, 1)).
    ``device``: where the tensor goes; None keeps a tensor's own device. The cast comes before
    the finiteness check, so values that overflow ``dtype`` count as Inf. Raises one-line
    ``UsageError``s "{what}: no samples" and "{what}: contains NaN or Inf values".
    """
    if isinstance(a, torch.Tensor):
        t = a.detach()
    else:
        arr = np.asarray(a)
        if not arr.flags.writeable or any(s < 0 for s in arr.strides):
            arr = arr.copy()  # torch warns on read-only buffers and rejects negative strides
        t = torch.as_tensor(arr)
    t = t.to(dtype=dtype) if device is None else t.to(device=device, dtype=dtype)
    if t.ndim == 0 or t.shape[0] == 0:
        raise UsageError(f"{what}: no samples")
    if flat:
        t = t.reshape(t.shape[0], -1)
    elif t.ndim == 1:
        t = t[:, None]
    if not torch.isfinite(t).all():
        raise UsageError(f"{what}: contains NaN or Inf values")
    return t


def as_row_pair(x: Array, y: Array, what: str = "discrepancy") -> tuple[torch.Tensor, torch.Tensor]:
    """Both samples as float64 CPU (n, D) and (m, D) tensors with equal D (``as_rows``)."""
    xt, yt = as_rows(x, f"{what}: sample x"), as_rows(y, f"{what}: sample y")
    if xt.shape[1] != yt.shape[1]:
        raise UsageError(
            f"{what}: samples have different dimensions ({xt.shape[1]} vs {yt.shape[1]})"
        )
    return xt, yt
