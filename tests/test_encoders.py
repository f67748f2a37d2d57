"""Encoder loading: every saved format gives the same latents; diffusers VAEs match diffusers."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from latentdist.data import load_data
from latentdist.data.encoders import Encoder, load_encoder
from latentdist.errors import UsageError

ARCH_SRC = """
from torch import nn


class TinyEnc(nn.Module):
    def __init__(self, width=4, latent=2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, latent, 3, stride=2, padding=1),
        )

    def forward(self, x):
        return self.net(x)


def make_encoder(width=4, latent=2):
    return TinyEnc(width, latent)
"""
N = 300  # digits used; batch 128 leaves a remainder of 44


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_data("digits").take(slice(0, N))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One small conv encoder (seeded weights, width 6) saved in every supported format."""
    root = tmp_path_factory.mktemp("enc")
    (root / "tinyenc_arch.py").write_text(ARCH_SRC)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        arch_mod = importlib.import_module("tinyenc_arch")
        torch.manual_seed(0)
        model = arch_mod.make_encoder(width=6).eval()
        example = torch.randn(5, 1, 8, 8)
        sd = model.state_dict()
        torch.jit.script(model).save(str(root / "scripted.pt"))
        torch.jit.trace(model, example).save(str(root / "traced.ts"))
        batch = torch.export.Dim("batch")
        dyn = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
        torch.export.save(dyn, str(root / "dynamic.pt2"))
        torch.export.save(torch.export.export(model, (example,)), str(root / "static.pt2"))
        torch.save(sd, root / "weights.pt")
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, root / "ckpt.pt")
        save_file(sd, str(root / "weights.safetensors"))
        torch.save(model, root / "full.pt")
        yield root, model
        sys.modules.pop("tinyenc_arch", None)


def test_every_format_gives_the_same_latents(saved, digits):
    root, model = saved
    with torch.no_grad():
        want = model(digits)
    file_arch, kw = f"{root / 'tinyenc_arch.py'}:make_encoder", '{"width": 6}'
    cases = {
        "scripted.pt": ({}, "torchscript"),
        "traced.ts": ({}, "torchscript"),
        "dynamic.pt2": ({}, "export"),
        "static.pt2": ({}, "export"),  # batch fixed at 5: chunked and padded
        "weights.pt": ({"arch": file_arch, "arch_kwargs": kw}, "state_dict"),
        "ckpt.pt": (
            {"arch": "tinyenc_arch:make_encoder", "arch_kwargs": {"width": 6}},
            "state_dict",
        ),
        "weights.safetensors": ({"arch": "tinyenc_arch:TinyEnc", "arch_kwargs": kw}, "state_dict"),
        "full.pt": ({"trust_pickle": True}, "pickle"),
    }
    for name, (kwargs, fmt) in cases.items():
        enc = load_encoder(root / name, **kwargs)
        assert enc.format == fmt, name
        got = enc.encode(digits, batch_size=128, progress=False)
        assert got.dtype == torch.float32 and got.shape == (N, 2, 4, 4), name
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=name)


def test_datasource_is_streamed_like_a_tensor(saved):
    root, model = saved
    src = load_data("digits")
    enc = load_encoder(root / "scripted.pt")
    got = enc.encode(src, batch_size=500, progress=False)
    with torch.no_grad():
        want = model(src.take())
    assert got.shape == (len(src), 2, 4, 4)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def _tiny_config() -> dict:
    return dict(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=4,
        sample_size=8,
    )


def test_diffusers_kl_matches_scaled_posterior(tmp_path, digits):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(1)
    shifted = diffusers.AutoencoderKL(**_tiny_config(), scaling_factor=0.5, shift_factor=0.1).eval()
    shifted.save_pretrained(tmp_path / "kl_shift")
    plain = diffusers.AutoencoderKL(**_tiny_config(), scaling_factor=0.3).eval()  # no shift_factor
    plain.save_pretrained(tmp_path / "kl_plain")
    x = digits[:64]
    with torch.no_grad():
        post = shifted.encode(x).latent_dist
        post_plain = plain.encode(x).latent_dist

    enc = load_encoder(tmp_path / "kl_shift")
    assert enc.format == "diffusers-kl" and enc.codebook is None
    mean = enc.encode(x, batch_size=16, progress=False)
    assert mean.shape == (64, 2, 4, 4)
    torch.testing.assert_close(mean, (post.mean - 0.1) * 0.5, atol=1e-6, rtol=1e-6)
    got_plain = load_encoder(tmp_path / "kl_plain").encode(x, progress=False)
    torch.testing.assert_close(got_plain, post_plain.mean * 0.3, atol=1e-6, rtol=1e-6)

    sampler = load_encoder(tmp_path / "kl_shift", sample=True)
    a = sampler.encode(x, batch_size=16, progress=False, seed=3)
    b = sampler.encode(x, batch_size=16, progress=False, seed=3)
    c = sampler.encode(x, batch_size=16, progress=False, seed=4)
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, mean)
    # a draw is mean + std * eps: the implied eps is standard normal (2048 values)
    eps = (a - mean) / (0.5 * post.std)
    assert abs(eps.mean().item()) < 0.1 and abs(eps.std().item() - 1) < 0.1


def test_diffusers_vq_gives_codebook_vectors(tmp_path, digits):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(2)
    vq = diffusers.VQModel(**_tiny_config(), num_vq_embeddings=16).eval()
    x = digits[:64]
    with torch.no_grad():  # codebook = 16 of the encoder's own vectors, so several codes are used
        h = vq.encode(x).latents.permute(0, 2, 3, 1).reshape(-1, 2)
        vq.quantize.embedding.weight.copy_(h[torch.randperm(len(h))[:16]])
    vq.save_pretrained(tmp_path / "vq")
    with torch.no_grad():
        want = vq.quantize(vq.encode(x).latents)[0]

    enc = load_encoder(tmp_path / "vq")
    assert enc.format == "diffusers-vq"
    assert torch.equal(enc.codebook, vq.quantize.embedding.weight.detach())
    assert enc.codebook.shape == (16, 2)
    got = enc.encode(x, batch_size=20, progress=False)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    vectors = got.permute(0, 2, 3, 1).reshape(-1, 2)
    nearest = torch.cdist(vectors, enc.codebook).argmin(1)
    assert torch.equal(vectors, enc.codebook[nearest])  # exactly codebook rows
    assert len(nearest.unique()) >= 4


def _bad_cases(root, tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    plain_dir = tmp_path / "plain_dir"
    plain_dir.mkdir()
    unet_dir = tmp_path / "unet"
    unet_dir.mkdir()
    (unet_dir / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    file_arch = f"{root / 'tinyenc_arch.py'}:make_encoder"
    w = root / "weights.pt"
    return [
        (lambda: load_encoder(tmp_path / "nope.pt"), "no such file"),
        (lambda: load_encoder(empty), "empty"),
        (lambda: load_encoder(junk), "not a TorchScript"),
        (lambda: load_encoder(w), "--arch"),
        (lambda: load_encoder(root / "weights.safetensors"), "--arch"),
        (lambda: load_encoder(w, arch="tinyenc_arch"), "module:factory"),
        (lambda: load_encoder(w, arch="no_such_pkg_xyz.models:make"), "cannot import"),
        (lambda: load_encoder(w, arch="tinyenc_arch:nothing"), "no callable 'nothing'"),
        (lambda: load_encoder(w, arch=str(tmp_path / "gone.py") + ":f"), "no such file"),
        (lambda: load_encoder(w, arch=file_arch, arch_kwargs="{width: 6"), "invalid JSON"),
        (lambda: load_encoder(w, arch=file_arch, arch_kwargs="[6]"), "JSON object"),
        (lambda: load_encoder(w, arch=file_arch, arch_kwargs='{"depth": 3}'), "failed"),
        (lambda: load_encoder(w, arch=file_arch), "shape file vs model"),
        (
            lambda: load_encoder(root / "scripted.pt", arch_kwargs="{}"),
            "only used together",
        ),  # width 4 vs 6
        (lambda: load_encoder(w, arch="torch.nn:Identity"), "unexpected"),
        (lambda: load_encoder(root / "full.pt"), "--trust-pickle"),
        (lambda: load_encoder(root / "scripted.pt", arch=file_arch), "only used with a state dict"),
        (lambda: load_encoder(root / "scripted.pt", sample=True), "AutoencoderKL"),
        (lambda: load_encoder(plain_dir), "not a diffusers model"),
        (lambda: load_encoder(unet_dir), "UNet2DModel"),
    ]


def test_bad_inputs_give_one_line_usage_errors(saved, tmp_path):
    root, _ = saved
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        for i, (call, fragment) in enumerate(_bad_cases(root, tmp_path)):
            with pytest.raises(UsageError) as info:
                call()
            msg = str(info.value)
            assert "\n" not in msg and fragment in msg, (i, msg)


def test_diffusers_missing_is_a_usage_error(tmp_path, monkeypatch):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import now raises ImportError
    with pytest.raises(UsageError, match=r"pip install latentdist\[diffusers\]") as info:
        load_encoder(folder)
    assert "\n" not in str(info.value)


def test_encode_rejects_wrong_shapes_and_non_finite_latents(saved, digits):
    root, _ = saved
    rgb = digits[:10].expand(-1, 3, -1, -1)
    for name, expects in [("scripted.pt", "(B, 1, H, W)"), ("static.pt2", "(B, 1, 8, 8)")]:
        enc = load_encoder(root / name)
        with pytest.raises(UsageError) as info:
            enc.encode(rgb, progress=False)
        msg = str(info.value)
        assert "\n" not in msg and name in msg and "(B, 3, 8, 8)" in msg and expects in msg, msg

    broken = Encoder(lambda x: x * float("nan"), "nan-encoder", "pickle")
    with pytest.raises(UsageError, match="nan-encoder: produced NaN or Inf"):
        broken.encode(digits, progress=False)
    squash = Encoder(lambda x: x.sum(), "scalar-encoder", "pickle")
    with pytest.raises(UsageError, match=r"returned shape \(\)"):
        squash.encode(digits, progress=False)
