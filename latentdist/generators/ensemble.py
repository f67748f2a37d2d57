"""Many generators fitted as one vectorised model.

Members (one per capacity × seed) are built at their own capacity with ``make_generator`` and
zero-padded into a common maximal-width module, with a mask marking each member's own entries.
Gradients are multiplied by the mask, so padded units stay exactly zero and each member keeps
its function class (a width-c network padded to width C computes the same function and receives
the same updates). The stacked parameters run through ``torch.func.functional_call`` under
``torch.func.vmap``: one forward and backward for the whole sweep. Adam is elementwise, so one
Adam over the stack equals an independent Adam per member.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from latentdist.generators.modules import count_params, make_generator


@dataclass(frozen=True)
class Member:
    capacity: int | None  # None for the linear family
    seed: int
    params: int  # parameter count of the unpadded generator


def _prefix(shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


class GeneratorEnsemble(nn.Module):
    """``len(members)`` generators of one family, stacked; ``forward(z)`` maps (M, B, *latent) -> (M, B, *data)."""

    def __init__(
        self,
        family: str,
        latent_shape: tuple[int, ...],
        data_shape: tuple[int, ...],
        capacities: Sequence[int | None],
        seeds: Sequence[int],
        depth: int = 2,
    ):
        super().__init__()
        if len(capacities) != len(seeds):
            raise ValueError("one capacity per seed")
        self.family, self.depth = family, depth
        self.latent_shape, self.data_shape = tuple(latent_shape), tuple(data_shape)
        widest = None if family == "linear" else max(c for c in capacities if c is not None)
        self._template = make_generator(family, self.latent_shape, self.data_shape, widest, depth)
        padded, masks, members = [], [], []
        for capacity, seed in zip(capacities, seeds, strict=True):
            torch.manual_seed(_member_seed(seed, capacity))
            small = make_generator(family, self.latent_shape, self.data_shape, capacity, depth)
            big = make_generator(family, self.latent_shape, self.data_shape, widest, depth)
            mask = {}
            with torch.no_grad():
                for (name, p_big), p_small in zip(
                    big.named_parameters(), small.parameters(), strict=True
                ):
                    p_big.zero_()
                    p_big[_prefix(p_small.shape)] = p_small
                    m = torch.zeros_like(p_big)
                    m[_prefix(p_small.shape)] = 1
                    mask[name] = m
            padded.append(big)
            masks.append(mask)
            members.append(Member(capacity, seed, count_params(small)))
        self.members = members
        stacked, _ = stack_module_state(padded)
        self.names = list(stacked)
        self.weights = nn.ParameterList([nn.Parameter(stacked[n].detach().clone()) for n in self.names])
        for i, n in enumerate(self.names):
            self.register_buffer(f"mask_{i}", torch.stack([m[n] for m in masks]))
        self._template.to("meta")

    def params(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.weights, strict=True))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        def one(params: dict[str, torch.Tensor], zb: torch.Tensor) -> torch.Tensor:
            return functional_call(self._template, params, (zb,))

        return vmap(one)(self.params(), z)

    def mask_gradients(self) -> None:
        """Zero the gradient of padded entries so every member stays in its own class."""
        for i, w in enumerate(self.weights):
            if w.grad is not None:
                w.grad.mul_(getattr(self, f"mask_{i}"))

    def export(self, index: int) -> nn.Module:
        """Member ``index`` as a plain, unpadded generator module (CPU, eval mode)."""
        member = self.members[index]
        small = make_generator(self.family, self.latent_shape, self.data_shape, member.capacity, self.depth)
        with torch.no_grad():
            for w, p_small in zip(self.weights, small.parameters(), strict=True):
                p_small.copy_(w[index][_prefix(p_small.shape)].detach().cpu())
        return small.eval()


def _member_seed(seed: int, capacity: int | None) -> int:
    """Initialisation seed of a member: distinct per (seed, capacity), stable across runs."""
    return (seed * 1_000_003 + (capacity or 0) * 7919) % (2**31)
