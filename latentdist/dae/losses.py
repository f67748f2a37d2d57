"""Losses of the DAE trainer: reconstruction, PatchGAN hinge with VQGAN's adaptive weight, and
an optional perceptual distance whose network the user supplies (nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from latentdist.errors import UsageError


def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Mean over all elements of ``|x_hat - x|`` (``l1``) or ``(x_hat - x)^2`` (``l2``)."""
    if kind == "l1":
        return F.l1_loss(x_hat.float(), x.float())
    return F.mse_loss(x_hat.float(), x.float())


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Critic hinge loss ``0.5 (E relu(1 - D(x)) + E relu(1 + D(x_hat)))`` (VQGAN, Esser et al. 2021)."""
    return 0.5 * (
        F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean()
    )


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge game: ``-E D(x_hat)``."""
    return -logits_fake.float().mean()


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN's balance ``||grad_L rec|| / (||grad_L g|| + 1e-4)`` at the decoder's last layer ``L``.

    Clamped to [0, ``max_weight``] and detached (Esser et al. 2021, eq. 7).
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class PerceptualLoss(torch.nn.Module):
    """Mean squared distance between features of a user-supplied TorchScript network.

    ``net(x)`` may return one tensor or a list/tuple of tensors (feature maps of several layers,
    as in LPIPS, Zhang et al. 2018, without its learned channel weights); each map is unit-normalised
    along channels and the squared distances are averaged per map and summed over maps. The
    network is frozen and sees images in the data's own scale.
    """

    def __init__(self, path: str | Path, device: torch.device):
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise UsageError(
                f"--perceptual {path}: no such file (expected a TorchScript feature network)"
            )
        try:
            self.net = torch.jit.load(str(path), map_location=device)
        except Exception as e:
            raise UsageError(
                f"--perceptual {path}: not a TorchScript module ({type(e).__name__})"
            ) from None
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        fa, fb = self.net(x_hat), self.net(x)
        if isinstance(fa, torch.Tensor):
            fa, fb = [fa], [fb]
        total = x_hat.new_zeros((), dtype=torch.float32)
        for a, b in zip(fa, fb, strict=True):
            a = F.normalize(a.float(), dim=1, eps=1e-10)
            b = F.normalize(b.float(), dim=1, eps=1e-10)
            total = total + (a - b).pow(2).sum(1).mean()
        return total
