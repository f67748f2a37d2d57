"""Load a user's encoder E from whatever format it was saved in, and compute P_z = E#P_x.

Formats (SPEC §4): a TorchScript archive, a ``torch.export`` archive (``.pt2``), a state dict
(``.pt`` read with ``weights_only=True``, or ``.safetensors``) plus an architecture spec
``module:factory`` / ``path/to/file.py:factory``, a diffusers ``AutoencoderKL`` or ``VQModel``
folder as ``save_pretrained`` writes it, or (only with ``trust_pickle=True``) a pickled
``nn.Module``. Every bad input is a one-line :class:`~latentdist.errors.UsageError`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from latentdist._progress import progress_bar as tqdm
from latentdist.data.source import DataSource
from latentdist.device import resolve_device
from latentdist.errors import UsageError

__all__ = ["FORMATS", "Encoder", "build_arch", "load_encoder"]

FORMATS = ("torchscript", "export", "state_dict", "diffusers-kl", "diffusers-vq", "pickle")
_DIFFUSERS = {"AutoencoderKL": "diffusers-kl", "VQModel": "diffusers-vq"}
_NESTED_STATE_KEYS = ("state_dict", "model", "model_state_dict", "encoder")


def _brief(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line, for embedding in a UsageError."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    if lines and "TorchScript" in lines[0]:  # the real error is the last line
        lines = lines[-1:]
    text = " ".join(" ".join(lines).split()).removeprefix(f"{type(e).__name__}: ")
    text = text or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


@dataclass
class Encoder:
    """An encoder ``E`` mapping a float32 batch (B, *data_shape) to latents (B, *latent_shape).

    ``codebook`` is the (K, C) codebook of a vector-quantised encoder (latent vectors are its rows,
    so codebook usage can be measured), ``expects`` a human-readable input shape when known,
    ``normalisation`` what is applied to the raw latent (diffusers VAEs; None: nothing).
    """

    module: nn.Module | Callable[[torch.Tensor], torch.Tensor]
    name: str
    format: str
    codebook: torch.Tensor | None = None
    expects: str | None = None
    normalisation: str | None = None

    def encode(
        self,
        source: DataSource | torch.Tensor | np.ndarray,
        *,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        progress: bool = True,
        seed: int = 0,
    ) -> torch.Tensor:
        """Compute the latent sample ``{E(x_i)}`` (the empirical P_z = E#P_x) as float32 on CPU.

        Batched, in eval mode and without autograd, on ``device``; a ``DataSource`` is streamed
        through ``.batches``. ``seed`` drives stochastic encoders (a KL posterior with
        ``sample=True``), so a run is reproducible for a given seed and batch size. A shape or
        dtype the encoder cannot take, or latents with NaN/Inf, raise a one-line UsageError.
        """

        if batch_size < 1:
            raise UsageError(f"--batch-size {batch_size}: expected a positive integer")
        dev = resolve_device(device)
        if isinstance(source, DataSource):
            total, shape, batches = len(source), source.sample_shape, source.batches(batch_size)
        else:
            data = torch.as_tensor(np.asarray(source) if not torch.is_tensor(source) else source)
            data = data.float()
            if data.ndim < 1 or len(data) == 0:
                raise UsageError(f"encoder {self.name}: no samples to encode")
            total, shape, batches = len(data), tuple(data.shape[1:]), data.split(batch_size)
        module = self._prepare(dev, seed)
        in_dtype = _param_dtype(module)
        outputs, done = [], 0
        bar = tqdm(total=total, desc=f"encoding ({self.name})", unit="sample", disable=not progress)
        try:
            with torch.inference_mode():
                for batch in batches:
                    z = self._run(module, batch.to(dev, in_dtype), shape, first=done == 0)
                    if not torch.isfinite(z).all():
                        raise UsageError(
                            f"encoder {self.name}: produced NaN or Inf latents "
                            f"(samples {done}..{done + len(batch) - 1})"
                        )
                    outputs.append(z.detach().to("cpu", torch.float32))
                    done += len(batch)
                    bar.update(len(batch))
        finally:
            bar.close()
        return torch.cat(outputs)

    def _prepare(self, dev: torch.device, seed: int) -> Callable:
        """Move the module to ``dev``, put it in eval mode and (re)seed any sampling it does."""
        module = self.module
        if isinstance(module, nn.Module):
            module = module.to(dev)
            # exported graphs are frozen in the mode they were exported in (no .eval())
            if self.format != "export":
                module.eval()
        reseed = getattr(module, "reseed", None)
        if callable(reseed):
            reseed(seed, dev)
        return module

    def _run(self, module: Callable, x: torch.Tensor, shape: tuple, first: bool) -> torch.Tensor:
        """One batch through the encoder; failures on the first batch are shape/dtype errors."""
        try:
            z = module(x)
        except UsageError:
            raise
        except Exception as e:
            if not first:
                raise
            expects = self.expects or _guess_input(module)
            hint = f"; it seems to expect {expects}" if expects else ""
            raise UsageError(
                f"encoder {self.name} ({self.format}): cannot take data of shape "
                f"(B, {', '.join(map(str, shape))}) {str(x.dtype).removeprefix('torch.')}{hint} "
                f"[{type(e).__name__}: {_brief(e, 160)}]"
            ) from None
        if not torch.is_tensor(z):
            raise UsageError(
                f"encoder {self.name}: returned {type(z).__name__}; expected a tensor of latents"
            )
        if z.ndim == 0 or len(z) != len(x):
            raise UsageError(
                f"encoder {self.name}: returned shape {tuple(z.shape)} for a batch of {len(x)}; "
                "expected (B, *latent_shape)"
            )
        return z


def _param_dtype(module: Callable) -> torch.dtype:
    """The floating dtype of the encoder's weights (inputs are cast to it), float32 if none."""
    if isinstance(module, nn.Module):
        for p in module.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def _guess_input(module: Callable) -> str | None:
    """What the first weight suggests the input is: conv (out, in, k...) or linear (out, in)."""
    if not isinstance(module, nn.Module):
        return None
    for name, p in module.named_parameters():
        if name.endswith("weight") and p.ndim >= 2:
            if p.ndim == 2:
                return f"(B, {p.shape[1]}) inputs (first layer is linear)"
            spatial = ", ".join("H W D".split()[: p.ndim - 2])
            return f"(B, {p.shape[1]}, {spatial}) inputs (first layer is a conv)"
    return None


# ---------------------------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------------------------


class _FixedBatch(nn.Module):
    """Run an exported program specialised to batch size ``b`` on any batch: chunk and pad.

    Padding repeats the last row; the padded outputs are dropped, so results are exact as long
    as the model treats samples independently (true in eval mode).
    """

    def __init__(self, inner: nn.Module, b: int) -> None:
        super().__init__()
        self.inner, self.b = inner, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for chunk in x.split(self.b):
            n = len(chunk)
            if n < self.b:
                chunk = torch.cat([chunk, chunk[-1:].expand(self.b - n, *chunk.shape[1:])])
            outs.append(self.inner(chunk)[:n])
        return torch.cat(outs)


class _DiffusersKL(nn.Module):
    """A diffusers ``AutoencoderKL`` as an encoder, giving the latent a diffusion model sees.

    ``latent`` is the posterior mean, or with ``sample=True`` a draw mean + std * eps from the
    diagonal Gaussian posterior (Kingma & Welling 2014) using a seeded generator. It is then
    normalised as diffusers pipelines do before the diffusion model (e.g. the SDXL and SD3
    img2img pipelines' ``prepare_latents``):

    * config with ``latents_mean`` and ``latents_std``:
      ``z = (latent - latents_mean) * scaling_factor / latents_std`` (per channel);
    * otherwise ``z = (latent - shift_factor) * scaling_factor`` (shift 0 when absent; this is
      Rombach et al. 2022's scaling, §4.3.2);
    * ``normalise=False``: ``z = latent`` (the raw latent).
    """

    def __init__(
        self, vae: nn.Module, sample: bool, normalise: bool = True, where: str = "--encoder"
    ) -> None:
        super().__init__()
        self.vae, self.sample = vae, sample
        cfg = vae.config
        scale, shift = getattr(cfg, "scaling_factor", None), getattr(cfg, "shift_factor", None)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        self.scale = 1.0 if scale is None else float(scale)
        self.shift = 0.0 if shift is None else float(shift)
        channels = int(getattr(cfg, "latent_channels", 0) or 0)
        self.mean = self.std = None
        if not normalise:
            self.scale, self.shift = 1.0, 0.0
            self.description = "none (the raw latent: --no-latent-norm)"
        elif mean is not None and std is not None:
            self.mean = _channel_vector(mean, channels, f"{where}: latents_mean")
            self.std = _channel_vector(std, channels, f"{where}: latents_std")
            if not bool((self.std > 0).all()):
                raise UsageError(f"{where}: latents_std has entries <= 0")
            self.description = (
                f"(z - latents_mean) * scaling_factor / latents_std with scaling_factor "
                f"{self.scale:g} and the config's per-channel latents_mean, latents_std"
            )
        else:
            self.description = (
                f"(z - shift_factor) * scaling_factor with shift_factor {self.shift:g}, "
                f"scaling_factor {self.scale:g}"
            )
        self.generator: torch.Generator | None = None

    def reseed(self, seed: int, device: torch.device) -> None:
        self.generator = torch.Generator(device=device).manual_seed(int(seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(x).latent_dist
        latent = dist.sample(generator=self.generator) if self.sample else dist.mean
        if self.mean is not None:
            view = (1, -1) + (1,) * (latent.ndim - 2)
            mean = self.mean.to(latent.device, latent.dtype).view(view)
            std = self.std.to(latent.device, latent.dtype).view(view)
            return (latent - mean) * self.scale / std
        return (latent - self.shift) * self.scale


def _channel_vector(values, channels: int, what: str) -> torch.Tensor:
    """A config's per-channel statistic as a float tensor; UsageError unless one per channel."""
    try:
        t = torch.as_tensor(values, dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise UsageError(f"{what} is not a list of numbers") from None
    if not bool(torch.isfinite(t).all()):
        raise UsageError(f"{what} contains NaN or Inf")
    if channels and len(t) != channels:
        raise UsageError(f"{what} has {len(t)} entries for {channels} latent channels")
    return t


class _DiffusersVQ(nn.Module):
    """A diffusers ``VQModel`` as an encoder: the quantised latents, i.e. codebook vectors.

    ``h = VQModel.encode(x).latents``; each spatial vector of ``h`` is replaced by its nearest
    codebook entry (van den Oord et al. 2017), exactly what ``VQModel.quantize`` picks (its
    straight-through output equals this up to float rounding).
    """

    def __init__(self, vq: nn.Module) -> None:
        super().__init__()
        self.vq = vq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.vq.encode(x).latents
        _, _, (_, _, idx) = self.vq.quantize(h)
        b, c, hh, ww = h.shape
        codes = self.vq.quantize.embedding(idx.reshape(-1))
        return codes.reshape(b, hh, ww, c).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_encoder(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: str | dict | None = None,
    trust_pickle: bool = False,
    sample: bool = False,
    device: str | torch.device = "cpu",
    latent_norm: bool = True,
) -> Encoder:
    """Load an encoder from a file or folder, detecting its format (see the module docstring).

    ``arch`` (``module:factory`` or ``file.py:factory``) and ``arch_kwargs`` (a JSON object or a
    dict) build the model a state dict is loaded into; ``sample`` draws from a KL posterior
    instead of taking its mean; ``trust_pickle`` allows unpickling a full ``nn.Module``;
    ``latent_norm=False`` keeps a diffusers KL latent raw (see ``_DiffusersKL``).
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--encoder {path}: no such file or folder")
    if arch_kwargs is not None and arch is None:
        raise UsageError("--arch-kwargs: only used together with --arch module:factory")
    dev = resolve_device(device)
    if p.is_dir():
        _no_arch(arch, p, "a diffusers folder")
        enc = _load_diffusers(p, sample, latent_norm)
    else:
        if p.stat().st_size == 0:
            raise UsageError(f"--encoder {p}: file is empty")
        enc = _load_file(p, arch, arch_kwargs, trust_pickle)
    if sample and enc.format != "diffusers-kl":
        raise UsageError(
            f"--encoder {p}: sampling the posterior needs an AutoencoderKL, not {enc.format}"
        )
    if isinstance(enc.module, nn.Module):
        enc.module = enc.module.to(dev)
    return enc


def _no_arch(arch: str | None, p: Path, what: str) -> None:
    if arch is not None:
        raise UsageError(f"--arch {arch}: only used with a state dict, but {p} is {what}")


def _load_file(p: Path, arch: str | None, arch_kwargs, trust_pickle: bool) -> Encoder:
    """Sniff a file's format: zip entries tell TorchScript and export archives from torch.save."""
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except Exception as e:
            raise UsageError(
                f"--encoder {p}: not a readable .safetensors file ({_brief(e)})"
            ) from None
        return _from_state_dict(p, state, arch, arch_kwargs)
    names = []
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile as e:
            raise UsageError(f"--encoder {p}: corrupt archive ({_brief(e)})") from None
    if p.suffix.lower() == ".pt2" or any(n.endswith("/archive_format") for n in names):
        _no_arch(arch, p, "a torch.export archive")
        return _load_export(p)
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        _no_arch(arch, p, "a TorchScript archive")
        try:
            module = torch.jit.load(str(p), map_location="cpu")
        except Exception as e:
            raise UsageError(f"--encoder {p}: corrupt TorchScript archive ({_brief(e)})") from None
        # a VQ encoder may carry its codebook (K, C) as a tensor attribute (latentdist train-dae does)
        codebook = getattr(module, "codebook", None)
        if not (isinstance(codebook, torch.Tensor) and codebook.dim() == 2):
            codebook = None
        return Encoder(module, p.name, "torchscript", codebook=codebook)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        pickled = "Unsupported global" in str(e)  # weights_only met a class: a pickled object
        if not trust_pickle:
            if pickled:
                raise UsageError(
                    f"--encoder {p}: holds pickled Python objects (a full model?); pass --trust-pickle "
                    "to unpickle it (runs code from the file), or save a state dict and pass --arch"
                ) from None
            raise UsageError(
                f"--encoder {p}: not a TorchScript, torch.export, torch.save or .safetensors file "
                f"(torch.load: {type(e).__name__})"
            ) from None
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise UsageError(
                f"--encoder {p}: cannot unpickle ({type(e2).__name__}: {_brief(e2)})"
            ) from None
        if isinstance(obj, nn.Module) or (callable(obj) and not isinstance(obj, dict)):
            _no_arch(arch, p, "a pickled model")
            return Encoder(obj, p.name, "pickle")
    if isinstance(obj, dict):
        return _from_state_dict(p, obj, arch, arch_kwargs)
    raise UsageError(
        f"--encoder {p}: holds a {type(obj).__name__}; expected a model or a state dict"
    )


def _load_export(p: Path) -> Encoder:
    try:
        ep = torch.export.load(str(p))
    except Exception as e:
        raise UsageError(f"--encoder {p}: corrupt torch.export archive ({_brief(e)})") from None
    module = ep.module()
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    user = [vals.get(name) for name in ep.graph_signature.user_inputs]
    if len(user) != 1 or user[0] is None:
        raise UsageError(
            f"--encoder {p}: exported program takes {len(user)} inputs; expected one batch tensor"
        )
    shape, dtype = user[0].shape, str(user[0].dtype).removeprefix("torch.")
    if len(shape) and isinstance(shape[0], int):  # exported without a dynamic batch dimension
        module = _FixedBatch(module, shape[0])
    expects = f"(B, {', '.join(str(s) for s in shape[1:])}) {dtype}"
    return Encoder(module, p.name, "export", expects=expects)


def _unnest(state: dict) -> dict:
    """A training checkpoint's weights: ``{'state_dict': {...}}`` etc., and no DDP ``module.``."""
    for key in _NESTED_STATE_KEYS:
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _from_state_dict(p: Path, state: dict, arch: str | None, arch_kwargs) -> Encoder:
    state = _unnest(state)
    if not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UsageError(f"--encoder {p}: expected a state dict of tensors")
    if arch is None:
        raise UsageError(
            f"--encoder {p}: holds only weights (a state dict); pass --arch module:factory "
            "(and --arch-kwargs JSON) to build the model they belong to"
        )
    model = build_arch(arch, arch_kwargs)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{label} {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape file vs model:", shapes),
            )
            if items
        ]
        raise UsageError(
            f"--encoder {p}: state dict does not match --arch {arch}: {'; '.join(parts)}"
        )
    model.load_state_dict(state)
    return Encoder(model, p.name, "state_dict")


def build_arch(arch: str, arch_kwargs: str | dict | None = None) -> nn.Module:
    """Build ``factory(**kwargs)`` from ``module:factory`` or ``path/to/file.py:factory``."""
    target, sep, attr = arch.rpartition(":")
    if not sep or not target or not attr:
        raise UsageError(f"--arch {arch}: expected module:factory or path/to/file.py:factory")
    if isinstance(arch_kwargs, str):
        try:
            kwargs = json.loads(arch_kwargs) if arch_kwargs.strip() else {}
        except json.JSONDecodeError as e:
            raise UsageError(f"--arch-kwargs {arch_kwargs}: invalid JSON ({e})") from None
    else:
        kwargs = dict(arch_kwargs or {})
    if not isinstance(kwargs, dict):
        raise UsageError(
            f"--arch-kwargs {arch_kwargs}: expected a JSON object of keyword arguments"
        )
    if target.endswith(".py") or os.sep in target or "/" in target:
        file = Path(target)
        if not file.is_file():
            raise UsageError(f"--arch {arch}: no such file {file}")
        spec = importlib.util.spec_from_file_location(f"_latentdist_arch_{file.stem}", file)
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
        except Exception as e:
            raise UsageError(
                f"--arch {arch}: {file} fails to import ({type(e).__name__}: {_brief(e)})"
            ) from None
    else:
        try:
            mod = importlib.import_module(target)
        except Exception as e:
            raise UsageError(
                f"--arch {arch}: cannot import {target} ({type(e).__name__}: {_brief(e)})"
            ) from None
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise UsageError(f"--arch {arch}: {target} has no callable {attr!r}")
    try:
        model = factory(**kwargs)
    except Exception as e:
        raise UsageError(
            f"--arch {arch}: {attr}(**{json.dumps(kwargs)}) failed ({type(e).__name__}: {_brief(e)})"
        ) from None
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"--arch {arch}: {attr} returned {type(model).__name__}; expected an nn.Module"
        )
    return model


def _load_diffusers(p: Path, sample: bool, latent_norm: bool = True) -> Encoder:
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise UsageError(f"--encoder {p}: a folder, but not a diffusers model (no config.json)")
    try:
        cls_name = json.loads(cfg_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UsageError(f"--encoder {cfg_file}: not a valid JSON config ({_brief(e)})") from None
    if cls_name not in _DIFFUSERS:
        raise UsageError(
            f"--encoder {p}: config.json names class {cls_name!r}; expected a diffusers "
            f"{' or '.join(_DIFFUSERS)} folder as save_pretrained writes it"
        )
    try:
        import diffusers
    except ImportError:
        raise UsageError(
            f"--encoder {p}: a diffusers {cls_name} folder, but diffusers is not installed "
            "(pip install latentdist[diffusers])"
        ) from None
    if not any(p.glob("diffusion_pytorch_model*")):
        raise UsageError(
            f"--encoder {p}: {cls_name} folder without weights (diffusion_pytorch_model.safetensors)"
        )
    from diffusers.utils import logging as dlog

    verbosity = dlog.get_verbosity()
    dlog.set_verbosity(logging.CRITICAL)  # failures become our one-line error, not log chatter
    try:
        # diffusers reads .bin weights with torch.load(weights_only=True): nothing is unpickled
        model = getattr(diffusers, cls_name).from_pretrained(
            str(p),
            local_files_only=True,
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
        )
    except Exception as e:
        raise UsageError(
            f"--encoder {p}: cannot load {cls_name} ({type(e).__name__}: {_brief(e)})"
        ) from None
    finally:
        dlog.set_verbosity(verbosity)
    model = model.float().eval()
    expects = f"(B, {model.config.in_channels}, H, W)"
    if cls_name == "VQModel":
        codebook = model.quantize.embedding.weight.detach().to("cpu", torch.float32).clone()
        return Encoder(
            _DiffusersVQ(model), p.name, "diffusers-vq", codebook=codebook, expects=expects
        )
    kl = _DiffusersKL(model, sample, latent_norm, where=f"--encoder {cfg_file}")
    return Encoder(kl, p.name, "diffusers-kl", expects=expects, normalisation=kl.description)
