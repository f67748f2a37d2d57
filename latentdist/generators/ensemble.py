"""Many generators fitted as one vectorised model.

Members (one per capacity × seed) are built at their own capacity with ``make_generator``.
Members of similar capacity form a bucket: each is zero-padded to the bucket's widest member,
with a mask marking its own entries. Gradients are multiplied by the mask, so padded units stay
exactly zero and each member keeps its function class (a width-c network padded to width C
computes the same function and receives the same updates). A bucket's stacked parameters run
through ``torch.func.functional_call`` under ``torch.func.vmap``: one batched forward and backward
per bucket, where padding would waste little. Adam is elementwise, so one Adam over all stacks
equals an independent Adam per member.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from latentdist.generators.modules import count_params, make_generator, mlp_output_factors

# Members of capacities within this factor share a padded bucket. On CPU, fitting is bound by
# arithmetic, so padding is pure waste: one bucket per capacity (ratio 1) is fastest
# (benchmarks/bench_sweep.py). On a GPU, kernel launches dominate small generators: one bucket.
BUCKET_RATIO = {"cpu": 1.0, "cuda": float("inf")}


def default_bucket_ratio(device: torch.device | str) -> float:
    return BUCKET_RATIO.get(torch.device(device).type, 1.0)


@dataclass(frozen=True)
class Member:
    capacity: int | None  # None for the linear family
    seed: int
    params: int  # parameter count of the unpadded generator


def _prefix(shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """A 4-D tensor in channels-last layout (oneDNN's fast conv backward on CPU); others as is."""
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def member_seed(seed: int, capacity: int | None) -> int:
    """Initialisation seed of a member: distinct per (seed, capacity), stable across runs."""
    return (seed * 1_000_003 + (capacity or 0) * 7919) % (2**31)


def buckets(capacities: Sequence[int | None], ratio: float = 1.0) -> list[list[int]]:
    """Group member indices (in order) into runs whose capacities stay within ``ratio`` of the first."""
    groups: list[list[int]] = []
    for i, c in enumerate(capacities):
        first = capacities[groups[-1][0]] if groups else None
        same = groups and (
            c == first or (c is not None and first is not None and c <= ratio * first)
        )
        if same:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class _Bucket(nn.Module):
    def __init__(self, family, latent_shape, data_shape, capacities, seeds, depth):
        super().__init__()
        self.family = family
        widest = None if family == "linear" else max(capacities)
        # rank of the output map of the last features (``mlp_output_factors``); mlp only
        self.output_rank = 2 * widest + 1 if family == "mlp" else None
        # a tuple keeps the meta-device template out of the module tree (it holds no data)
        self.template = (
            make_generator(family, latent_shape, data_shape, widest, depth).to("meta"),
        )
        padded, masks, self.params_count = [], [], []
        for capacity, seed in zip(capacities, seeds, strict=True):
            torch.manual_seed(member_seed(seed, capacity))
            small = make_generator(family, latent_shape, data_shape, capacity, depth)
            big = make_generator(family, latent_shape, data_shape, widest, depth)
            mask = {}
            with torch.no_grad():
                for (name, p_big), p_small in zip(
                    big.named_parameters(), small.parameters(), strict=True
                ):
                    p_big.zero_()
                    p_big[_prefix(p_small.shape)] = p_small
                    mask[name] = torch.zeros_like(p_big)
                    mask[name][_prefix(p_small.shape)] = 1
            padded.append(big)
            masks.append(mask)
            self.params_count.append(count_params(small))
        stacked, _ = stack_module_state(padded)
        self.names = list(stacked)
        self.weights = nn.ParameterList(
            [nn.Parameter(stacked[n].detach().clone()) for n in self.names]
        )
        self.padded = any(not bool(torch.stack([m[n] for m in masks]).all()) for n in self.names)
        for i, n in enumerate(self.names):
            self.register_buffer(f"mask_{i}", torch.stack([m[n] for m in masks]), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        params = dict(zip(self.names, self.weights, strict=True))
        call = self.template[0]
        if self.family == "conv" and z.device.type == "cpu":
            # vmap turns per-member convolutions into grouped ones, which PyTorch's CPU kernels
            # run 2-3x slower than one plain call per member on the same stacked parameters;
            # channels-last tensors take oneDNN's fast backward (2-4x, benchmarks/bench_conv.py)
            return torch.stack(
                [
                    functional_call(
                        call,
                        {n: channels_last(w[i]) for n, w in params.items()},
                        (channels_last(z[i]),),
                    )
                    for i in range(len(z))
                ]
            )
        return vmap(lambda p, zb: functional_call(call, p, (zb,)))(params, z)

    def output_factors(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, U), (M, B, r) and (M, d_out, r), with the members' outputs H U^T (flattened);
        mlp buckets only (``mlp_output_factors``)."""
        params = dict(zip(self.names, self.weights, strict=True))
        call = self.template[0]
        return vmap(lambda p, zb: mlp_output_factors(call, p, zb))(params, z)

    def mask_gradients(self) -> None:
        if not self.padded:
            return
        for i, w in enumerate(self.weights):
            if w.grad is not None:
                w.grad.mul_(getattr(self, f"mask_{i}"))


class GeneratorEnsemble(nn.Module):
    """``len(members)`` generators of one family; ``forward(z)`` maps (M, B, *latent) -> (M, B, *data).

    ``capacities[m]``/``seeds[m]`` describe member m. Members whose capacities lie within
    ``bucket_ratio`` of each other share a padded bucket (1: one bucket per capacity, inf: one
    for all; ``default_bucket_ratio(device)`` picks the faster). ``None`` gives every member a
    bucket of its own (no vectorisation: the sequential reference of the benchmark).
    """

    def __init__(
        self,
        family: str,
        latent_shape: tuple[int, ...],
        data_shape: tuple[int, ...],
        capacities: Sequence[int | None],
        seeds: Sequence[int],
        depth: int = 2,
        bucket_ratio: float | None = 1.0,
    ):
        super().__init__()
        self.family, self.depth = family, depth
        self.latent_shape, self.data_shape = tuple(latent_shape), tuple(data_shape)
        self.groups = (
            buckets(capacities, bucket_ratio)
            if bucket_ratio
            else [[i] for i in range(len(capacities))]
        )
        if [i for g in self.groups for i in g] != list(range(len(capacities))):
            raise ValueError("members must be ordered by capacity")
        self.buckets = nn.ModuleList(
            _Bucket(
                family,
                self.latent_shape,
                self.data_shape,
                [capacities[i] for i in g],
                [seeds[i] for i in g],
                depth,
            )
            for g in self.groups
        )
        self.members = [
            Member(capacities[i], seeds[i], b.params_count[k])
            for g, b in zip(self.groups, self.buckets, strict=True)
            for k, i in enumerate(g)
        ]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [b(z[g[0] : g[-1] + 1]) for g, b in zip(self.groups, self.buckets, strict=True)]
        )

    def parts(self) -> list[tuple[slice, _Bucket]]:
        """Each bucket with the slice of members (of ``forward``'s first axis) it holds."""
        return [(slice(g[0], g[-1] + 1), b) for g, b in zip(self.groups, self.buckets, strict=True)]

    def mask_gradients(self) -> None:
        """Zero the gradient of padded entries so every member stays in its own class."""
        for b in self.buckets:
            b.mask_gradients()

    @torch.no_grad()
    def load_member(self, index: int, generator: nn.Module) -> None:
        """Set member ``index`` to ``generator`` (an unpadded generator of its capacity)."""
        g = next(k for k, grp in enumerate(self.groups) if index in grp)
        pos = self.groups[g].index(index)
        for w, p in zip(self.buckets[g].weights, generator.parameters(), strict=True):
            w[pos].zero_()
            w[pos][_prefix(p.shape)] = p.to(w.device)

    def export(self, index: int) -> nn.Module:
        """Member ``index`` as a plain, unpadded generator module (CPU, eval mode)."""
        member = self.members[index]
        g = next(k for k, grp in enumerate(self.groups) if index in grp)
        pos = self.groups[g].index(index)
        small = make_generator(
            self.family, self.latent_shape, self.data_shape, member.capacity, self.depth
        )
        with torch.no_grad():
            for w, p_small in zip(self.buckets[g].weights, small.parameters(), strict=True):
                p_small.copy_(w[pos][_prefix(p_small.shape)].detach().cpu())
        return small.eval()
