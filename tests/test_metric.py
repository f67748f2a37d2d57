"""The metric objects (``latentdist.evaluation.metric``) give the command line's values.

* ``SampleDistanceMetric`` fed rows in batches = ``latentdist distance`` on the same rows and
  seeds, report for report (floats compared exactly);
* ``LatentSignalsMetric`` = what ``latentdist measure`` reports under ``latent`` and
  ``diagnostics`` for the same latents and data;
* batched updates = one update, ``reset`` forgets, rows are copied;
* two gloo processes, each holding part of the rows (uneven, one with no data rows), give the
  value one process fed all rows computes, on both ranks;
* bad input raises ``UsageError`` with one line.
"""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import latentdist as ld
from latentdist.errors import UsageError
from latentdist.evaluation.metric import (
    DATA_ROWS,
    LatentSignals,
    LatentSignalsMetric,
    SampleDistanceMetric,
    scalars,
)
from tests._cli import run_cli

SETTINGS = dict(n_eval=150, seeds=3, seed=4)
CLI_SETTINGS = ["--n-eval", "150", "--seeds", "3", "--seed", "4"]
# what legitimately differs between two computations of one report: when, how long, and the
# names of the sides (a file's path on the command line, "<samples array>" for a tensor)
VOLATILE = ("created", "timings", "samples", "reference")


@pytest.fixture(scope="module")
def rows():
    """Digits (1797 x 1 x 8 x 8, in [-1, 1]) as the real rows; 600 noisy, blurred digits as fake
    rows; latents: 2x2 average pooling plus a little noise (1 x 4 x 4)."""
    real = ld.load_data("digits").take()
    g = torch.Generator().manual_seed(0)
    blurred = torch.nn.functional.avg_pool2d(real[:600], 3, stride=1, padding=1)
    fake = blurred + 0.1 * torch.randn(blurred.shape, generator=g)
    noise = 0.01 * torch.randn(len(real), 1, 4, 4, generator=g)
    z = torch.nn.functional.avg_pool2d(real, 2) + noise
    return real, fake, z


@pytest.fixture(scope="module")
def files(rows, tmp_path_factory):
    real, fake, z = rows
    root = tmp_path_factory.mktemp("metric")
    for name, t in (("fake", fake), ("x", real[:600])):
        np.save(root / f"{name}.npy", t.numpy())
    torch.jit.script(_encoder()).save(str(root / "encoder.pt"))
    return root


def _encoder() -> torch.nn.Module:
    """A small conv encoder, 1 x 8 x 8 -> 2 x 4 x 4 (the same weights at every call)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 2, stride=2), torch.nn.Tanh())


def _strip(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in VOLATILE}


def _fed(real, fake, batch: int = 128, **settings) -> SampleDistanceMetric:
    m = SampleDistanceMetric(**{**SETTINGS, **settings})
    for start in range(0, max(len(real), len(fake)), batch):
        r, f = real[start : start + batch], fake[start : start + batch]
        m.update(real=r if len(r) else None, fake=f if len(f) else None)
    return m


# -------------------------------------------------------------------- distance = the CLI


def _cli_distance(files, capsys, *flags: str) -> dict:
    """``latentdist distance fake.npy --data digits`` with the shared settings: its report."""
    code, out, err = run_cli(
        ["distance", str(files / "fake.npy"), "--data", "digits", *CLI_SETTINGS, *flags,
         "--format", "json", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("metric", [None, "w2"], ids=["mmd-default", "w2"])
def test_distance_equals_the_command_line(rows, files, capsys, metric):
    real, fake, _ = rows
    cli = _cli_distance(files, capsys, *([] if metric is None else ["--metric", metric]))
    result = _fed(real, fake, metric=metric).compute()
    got = json.loads(result.to_json())  # NaN as null, as the command line writes them
    assert _strip(got) == _strip(cli)  # distance, floor, excess, kernel: exactly equal
    assert got["samples"]["rows"] == cli["samples"]["rows"] == 600
    assert got["reference"]["rows"] == cli["reference"]["rows"] == 1797
    flat = scalars(result, prefix="val/")
    assert flat["val/distance"] == cli["distance"]["mean"]
    assert [flat["val/floor_lo"], flat["val/floor_hi"]] == cli["floor"]["ci"]
    assert flat["val/excess"] == cli["excess"]["mean"]
    print(
        f"{cli['metric']}: CLI distance {cli['distance']['mean']!r} floor {cli['floor']['mean']!r}"
        f" | metric object {got['distance']['mean']!r} {got['floor']['mean']!r}"
    )


def test_learned_features_with_labels_equal_the_command_line(rows, files, capsys):
    """fd in a learned feature space: the command line trains a classifier on the built-in
    data's labels; given the same labels with the real rows, so does the metric object."""
    real, fake, _ = rows
    labels = ld.load_data("digits").labels
    cli = _cli_distance(
        files, capsys, "--metric", "fd", "--features", "learned", "--feature-steps", "20"
    )
    settings = dict(metric="fd", features="learned", feature_steps=20)
    m = SampleDistanceMetric(**SETTINGS, **settings)
    for start in range(0, 1797, 500):
        batch = slice(start, start + 500)
        m.update(real=real[batch], fake=fake[batch] if start < 600 else None,
                 real_labels=torch.as_tensor(labels[batch]))  # fmt: skip
    got = json.loads(m.compute().to_json())
    assert _strip(got) == _strip(cli)
    unlabelled = _fed(real, fake, **settings).compute().report  # a denoising autoencoder's
    assert unlabelled["distance"] != cli["distance"]  # features: another space, another value
    print(f"fd (learned, labels): CLI {cli['distance']['mean']!r} = {got['distance']['mean']!r}")


def test_batched_updates_equal_one_update_and_rows_are_copied(rows):
    real, fake, _ = rows
    whole = SampleDistanceMetric(**SETTINGS)
    whole.update(real=real, fake=fake)
    batches = _fed(real.clone(), fake.clone(), batch=97)
    assert batches.rows == whole.rows == {"real": 1797, "fake": 600}
    mine = fake[:50].clone()
    batches_copy = _fed(real, torch.cat([mine, fake[50:]]), batch=50)
    mine.fill_(7.0)  # a training loop reusing its buffer must not change what was given
    expected = _strip(whole.compute().report)
    assert _strip(batches.compute().report) == expected
    assert _strip(batches_copy.compute().report) == expected
    assert _strip(ld.sample_distance(fake, real, **SETTINGS).report) == expected


def test_reset_forgets_the_rows(rows):
    real, fake, _ = rows
    m = _fed(real, fake)
    first = m.compute()
    m.reset()
    assert m.rows == {"real": 0, "fake": 0}
    with pytest.raises(UsageError, match="no real rows"):
        m.compute()
    m.update(real=real[:800], fake=real[900:1300])
    fresh = SampleDistanceMetric(**SETTINGS)
    fresh.update(real=real[:800], fake=real[900:1300])
    assert _strip(m.compute().report) == _strip(fresh.compute().report)
    assert m.compute().report["distance"] != first.report["distance"]


# -------------------------------------------------------------------- latent signals = measure


def test_latent_signals_equal_measure(rows, files, capsys):
    """measure --encoder: its latents, the first data rows and the encoder (equivariance)."""
    real, _, _ = rows
    out = files / "measure"
    code, _, err = run_cli(
        ["measure", "--encoder", str(files / "encoder.pt"), "--data", str(files / "x.npy"),
         "--generator", "linear", "--seeds", "2", "--steps", "5", "--no-proxies",
         "--encode-batch-size", "128", "--threads", "1", "--no-progress", "--out", str(out)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "measure.json").read_text())
    encoder = _encoder()
    m = LatentSignalsMetric(encoder=encoder)
    with torch.no_grad():
        for x in real[:600].split(128):
            m.update(encoder(x), x)
    assert m.rows == {"latents": 600, "data": 600}
    got = json.loads(m.compute().to_json())
    report["diagnostics"].pop("time_s")
    got["diagnostics"].pop("time_s")
    assert got["latent"] == report["latent"]
    assert got["diagnostics"] == report["diagnostics"]
    signals = got["signals"]
    assert signals["spectrum_kl"] == report["diagnostics"]["spectrum"]["kl_image_latent"]
    stats = report["diagnostics"]["statistics"]
    assert signals["gaussian_kl_per_dim"] == stats["gaussian_kl"]["kl_per_dim"]
    assert signals["effective_rank"] == report["latent"]["effective_rank"]
    assert signals["intrinsic_dim_twonn"] == report["latent"]["intrinsic_dim"]["twonn"]
    assert signals["equivariance_rot90"] == report["diagnostics"]["equivariance"]["rot90"]
    print(f"measure vs LatentSignalsMetric, equal: {signals}")


def test_latent_signals_keep_the_first_data_rows_and_reset(rows):
    real, _, z = rows
    m = LatentSignalsMetric()
    m.update(z[:100])
    m.update(z[100:], torch.cat([real, real])[: DATA_ROWS + 5])
    assert m.rows == {"latents": 1797, "data": DATA_ROWS + 5}
    assert len(m._data.rows(False)) == DATA_ROWS
    whole = LatentSignalsMetric()
    whole.update(z, torch.cat([real, real]))
    a, b = m.compute(), whole.compute()
    assert isinstance(a, LatentSignals)
    assert a.signals == b.signals and a.latent == b.latent
    assert scalars(a, "z/") == {f"z/{k}": v for k, v in a.signals.items()}
    m.reset()
    assert m.rows == {"latents": 0, "data": 0}
    with pytest.raises(UsageError, match="0 latent rows"):
        m.compute()


# -------------------------------------------------------------------- two gloo processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# rank 0 holds the first rows of every kind, rank 1 the rest (uneven; rank 1 holds no data rows)
CUT = {"real": 1000, "fake": 250, "z": 350, "x": 600}  # the signals use the first 600 rows


def _ddp_worker(rank: int, port: int, folder: str, real, fake, z) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out: dict = {}
        try:
            SampleDistanceMetric().compute()
        except UsageError as e:
            out["empty"] = str(e)
        part = {
            k: (t[: CUT[k]] if rank == 0 else t[CUT[k] :])
            for k, t in (("real", real), ("fake", fake), ("z", z[:600]), ("x", real[:600]))
        }
        m = SampleDistanceMetric(**SETTINGS)  # labels gathered too (mmd does not use them)
        labels = torch.arange(len(real)) % 10
        labels = labels[: CUT["real"]] if rank == 0 else labels[CUT["real"] :]
        for start in range(0, len(part["real"]), 64):
            batch = slice(start, start + 64)
            m.update(real=part["real"][batch], real_labels=labels[batch])
        for fake_batch in part["fake"].split(64):
            m.update(fake=fake_batch)
        out["distance"] = json.loads(m.compute().to_json())
        s = LatentSignalsMetric()
        n_batches = -(-len(part["z"]) // 128)  # data rows in as many batches as latents
        size = -(-len(part["x"]) // n_batches)
        for i in range(n_batches):
            x = part["x"][i * size : (i + 1) * size]
            s.update(part["z"][i * 128 : (i + 1) * 128], x if len(x) else None)
        out["signals"] = json.loads(s.compute().to_json())
        own = SampleDistanceMetric(**SETTINGS, sync_on_compute=False)
        own.update(real=part["real"], fake=part["fake"])
        out["own"] = json.loads(own.compute().to_json())
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            f.write(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(rows, tmp_path):
    real, fake, z = rows
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path), real, fake, z), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    one = json.loads(_fed(real, fake).compute().to_json())
    whole = LatentSignalsMetric()
    whole.update(z[:600], real[:600])
    signals = json.loads(whole.compute().to_json())
    own1 = SampleDistanceMetric(**SETTINGS)
    own1.update(real=real[CUT["real"] :], fake=fake[CUT["fake"] :])
    for r, got in enumerate(ranks):
        assert "no real rows on any rank" in got["empty"], got["empty"]
        assert _strip(got["distance"]) == _strip(one), f"rank {r}"
        assert got["distance"]["samples"]["rows"] == 600
        got["signals"]["diagnostics"].pop("time_s")
        assert got["signals"]["latent"] == signals["latent"], f"rank {r}"
        signals["diagnostics"].pop("time_s", None)
        assert got["signals"]["diagnostics"] == signals["diagnostics"], f"rank {r}"
        assert got["signals"]["signals"] == signals["signals"], f"rank {r}"
    # sync_on_compute=False: each rank's own rows only
    assert _strip(ranks[1]["own"]) == _strip(json.loads(own1.compute().to_json()))
    assert ranks[0]["own"]["samples"]["rows"] == CUT["fake"]


# -------------------------------------------------------------------- bad input


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: SampleDistanceMetric().compute(), "no real rows; call update"),
        (lambda: LatentSignalsMetric().compute(), "0 latent rows; needs at least 3"),
        (lambda: SampleDistanceMetric().update(), "give real=... and/or fake=..."),
        (lambda: SampleDistanceMetric(metric="fid"), "fid"),
        (lambda: SampleDistanceMetric(seeds=0), "seeds=0"),
        (lambda: SampleDistanceMetric(n_eval=1), "n_eval=1"),
        (lambda: SampleDistanceMetric(max_rows=0), "max_rows=0"),
        (lambda: SampleDistanceMetric().update(real=torch.empty(0, 3)), "no samples"),
        (
            lambda: SampleDistanceMetric().update(real=torch.tensor([[0.0, float("nan")]])),
            "NaN or Inf",
        ),
    ],
    ids=["compute-before-update", "signals-before-update", "update-nothing", "unknown-metric",
         "seeds", "n_eval", "max_rows", "empty", "nan"],
)  # fmt: skip
def test_bad_input_is_one_line(call, match):
    with pytest.raises(UsageError, match=match) as excinfo:
        call()
    _one_line(excinfo)


def test_bad_shapes_and_caps_are_one_line(rows):
    real, fake, z = rows
    m = SampleDistanceMetric(max_rows=1000)
    m.update(real=real[:10])
    with pytest.raises(
        UsageError, match=r"fake=...\): rows of shape \[64\], but the real rows"
    ) as e:
        m.update(fake=fake[:10].reshape(10, 64))
    _one_line(e)
    with pytest.raises(UsageError, match=r"rows of shape \[1, 4, 4\], but earlier real") as e:
        m.update(real=z[:10])
    _one_line(e)
    assert m.rows == {"real": 10, "fake": 0}  # the refused batches were not kept
    with pytest.raises(UsageError, match="1010 real rows would exceed max_rows=1000") as e:
        m.update(real=real[:1000])
    _one_line(e)
    m.update(fake=fake[:3])
    with pytest.raises(UsageError, match="n-eval 1: expected an integer >= 2") as e:
        m.compute()  # too few rows for the default n_eval: sample_distance's own message
    _one_line(e)
    with pytest.raises(UsageError, match="expected 3 integer labels") as e:
        SampleDistanceMetric().update(real=real[:3], real_labels=[0.5, 1, 2])
    _one_line(e)
    with pytest.raises(UsageError, match="with every real batch or with none") as e:
        m.update(real=real[:3], real_labels=[0, 1, 2])  # the first batch came without
    _one_line(e)
    with pytest.raises(UsageError, match="real_labels=... needs real=...") as e:
        m.update(fake=fake[:3], real_labels=[0, 1, 2])
    _one_line(e)
    s = LatentSignalsMetric()
    s.update(z[:5])
    with pytest.raises(UsageError, match=r"rows of shape \[16\], but earlier latents") as e:
        s.update(z[:5].reshape(5, 16))
    _one_line(e)
