"""Device selection shared by the estimator, the trainer and the CLI; torch's thread count."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from latentdist.errors import UsageError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map ``auto``/``cpu``/``cuda[:i]`` to a torch device; ``cuda`` without a GPU is a UsageError."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA was asked for but no GPU is available")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise UsageError(f"--device {device}: expected auto, cpu or cuda")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` intra-op threads inside the block, then restore the setting (small
    products on a loaded machine run several times faster on one thread than on two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
