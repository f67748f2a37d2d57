"""``measure --encoder`` for a TorchScript file and a diffusers folder, against ``--latents``."""

import json

import numpy as np
import pytest
import torch
from _cli import run_cli

from latentdist import load_data


class TinyEncoder(torch.nn.Module):
    """8x8 digits -> 2x4x4 latents."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 2, 3, stride=2, padding=1),
        )

    def forward(self, x):
        return self.net(x)


def run(args, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    return out


SETTINGS = [
    "--generator",
    "conv",
    "--capacities",
    "4,8",
    "--depth",
    "1",
    "--steps",
    "40",
    "--n-eval",
    "300",
    "--seeds",
    "2",
    "--metric",
    "w2",
    "--no-proxies",
    "--quiet",
    "--device",
    "cpu",
]


def test_torchscript_encoder_and_its_latents_agree(tmp_path, capsys):
    torch.manual_seed(0)
    enc = torch.jit.script(TinyEncoder().eval())
    enc.save(str(tmp_path / "enc.pt"))
    with torch.no_grad():
        z = enc(load_data("digits").take()).numpy()
    np.save(tmp_path / "z.npy", z)
    run(
        [
            "measure",
            "--encoder",
            str(tmp_path / "enc.pt"),
            "--data",
            "digits",
            "--out",
            str(tmp_path / "a"),
            *SETTINGS,
        ],
        capsys,
    )
    run(
        [
            "measure",
            "--latents",
            str(tmp_path / "z.npy"),
            "--data",
            "digits",
            "--out",
            str(tmp_path / "b"),
            *SETTINGS,
        ],
        capsys,
    )
    a = json.loads((tmp_path / "a" / "measure.json").read_text())
    b = json.loads((tmp_path / "b" / "measure.json").read_text())
    assert a["latent"]["shape"] == [2, 4, 4]
    for ea, eb in zip(a["curve"], b["curve"], strict=True):
        assert ea["distance"]["mean"] == pytest.approx(eb["distance"]["mean"], rel=0.02)
    assert a["floor"]["mean"] == pytest.approx(b["floor"]["mean"], rel=1e-6)


def test_diffusers_autoencoderkl_folder_measures(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=4,
        sample_size=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    vae.save_pretrained(tmp_path / "vae")
    out = run(
        [
            "measure",
            "--encoder",
            str(tmp_path / "vae"),
            "--data",
            "digits",
            "--out",
            str(tmp_path / "m"),
            *SETTINGS,
        ],
        capsys,
    )
    r = json.loads((tmp_path / "m" / "measure.json").read_text())
    assert r["latent"]["shape"] == [2, 4, 4]
    assert all(np.isfinite(e["distance"]["mean"]) for e in r["curve"])
    assert "critical capacity" in out
