"""The DAE trainer: stage semantics, bottlenecks, exact resumption, DDP, outputs and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentdist.dae import NonFiniteLossError, TrainConfig, build_models, split_indices, train
from latentdist.dae.__main__ import main as cli_main
from latentdist.dae.data import BatchStream
from latentdist.dae.losses import PerceptualLoss, adaptive_weight, hinge_d_loss
from latentdist.data import load_data
from latentdist.generators.modules import count_params
from tests._cli import launch_failure, torchrun

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    data="digits",
    base_width=8,
    downsample=2,
    latent_channels=2,
    batch_size=32,
    progress=False,
    log_every=1,
)
TINY_FLAGS = ["--data", "digits", "--base-width", "8", "--downsample", "2", "--latent-channels", "2", "--batch-size", "32", "--no-progress", "--log-every", "1"]  # fmt: skip


def tiny(out: Path, **kw) -> TrainConfig:
    return TrainConfig(out=str(out), **{**TINY, "checkpoint_every": 0, **kw})


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def jit_state(path: Path) -> dict[str, torch.Tensor]:
    return dict(torch.jit.load(str(path), map_location="cpu").state_dict())


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a busy shared machine does not thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dae_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dae")
    return out, train(tiny(out, mode="dae", bottleneck="kl", stage1_steps=15, stage2_steps=15))


def test_stage2_leaves_encoder_bitwise_unchanged(dae_run):
    out, run = dae_run
    s1, final = jit_state(out / "stage1" / "encoder.pt"), jit_state(out / "encoder.pt")
    assert s1.keys() == final.keys() and len(s1) > 10
    for k in s1:
        assert torch.equal(s1[k], final[k]), k
    # ... while stage 1 did train it: the encoder differs from its seeded initialisation
    src = load_data("digits")
    init = build_models(
        tiny(out), src.sample_shape, "images", torch.zeros(1, 1, 1), torch.ones(1, 1, 1)
    )
    weights = load_file(str(out / "model.safetensors"))
    assert not torch.equal(init.encoder.state_dict()["0.weight"], weights["encoder.0.weight"])
    assert torch.equal(weights["encoder.0.weight"], s1["encoder.0.weight"])
    # the full decoder did train in stage 2: its loss fell
    stage2 = [m["rec"] for m in metrics(out) if m["stage"] == "stage2"]
    assert len(stage2) == 15 and stage2[-1] < stage2[0]


def test_aux_decoder_is_weaker_and_counts_are_right(dae_run):
    out, run = dae_run
    src = load_data("digits")
    m = build_models(
        tiny(out, mode="dae"), src.sample_shape, "images", torch.zeros(1, 1, 1), torch.ones(1, 1, 1)
    )
    assert (
        run["aux_decoder_params"]
        == count_params(m.aux_decoder)
        < run["decoder_params"]
        == count_params(m.decoder)
    )
    assert run["encoder_params"] == count_params(m.encoder)  # kl bottleneck has no weights
    # half width -> roughly a quarter of the conv weights
    assert run["aux_decoder_params"] < 0.4 * run["decoder_params"]


def test_exported_files_reproduce_reported_validation_mse(dae_run):
    out, run = dae_run
    src = load_data("digits")
    _, val_idx = split_indices(len(src), 0.1, 0)
    assert run["split"]["val_indices"] == val_idx.tolist() and run["split"]["n_val"] == 180
    enc = torch.jit.load(str(out / "encoder.pt"), map_location="cpu")
    dec = torch.jit.load(str(out / "decoder.pt"), map_location="cpu")
    x = src.take(val_idx)
    with torch.no_grad():
        z = enc(x)
        assert tuple(z.shape) == (180, *run["latent_shape"]) == (180, 2, 4, 4)
        assert torch.allclose(enc(x[:7]), z[:7], atol=1e-5)  # traced graph is batch-size free
        mse = (dec(z) - x).pow(2).mean().item()
    assert mse == pytest.approx(run["final"]["val_mse"], rel=1e-4)
    assert run["final"]["val_mse"] < float(x.var())  # better than predicting the mean
    for key in (
        "mode",
        "bottleneck",
        "data",
        "data_fingerprint",
        "data_shape",
        "seed",
        "config",
        "versions",
        "device",
    ):
        assert key in run
    assert run["data_fingerprint"] == src.fingerprint() and run["mode"] == "dae"


def test_joint_mode_keeps_changing_the_encoder(tmp_path):
    a = train(tiny(tmp_path / "a", mode="joint", bottleneck="ae", stage1_steps=6, stage2_steps=0))
    train(tiny(tmp_path / "b", mode="joint", bottleneck="ae", stage1_steps=6, stage2_steps=6))
    assert a["aux_decoder_params"] is None and not (tmp_path / "b" / "stage1").exists()
    wa, wb = (
        load_file(str(tmp_path / "a" / "model.safetensors")),
        load_file(str(tmp_path / "b" / "model.safetensors")),
    )
    # the first 6 steps are the same computation (same seed, data order), then the encoder moves on
    ma, mb = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb[:6]]
    assert all(
        not torch.equal(wa[k], wb[k])
        for k in wa
        if k.startswith("encoder.") and k.endswith("weight")
    )


def test_kl_trains(tmp_path):
    run = train(
        tiny(
            tmp_path, mode="joint", bottleneck="kl", stage1_steps=40, stage2_steps=0, kl_weight=1e-3
        )
    )
    m = metrics(tmp_path)
    first, last = np.mean([r["rec"] for r in m[:5]]), np.mean([r["rec"] for r in m[-5:]])
    assert last < 0.6 * first
    assert all(r["kl"] > 0 for r in m)  # KL of a Gaussian to N(0, I) is positive
    assert run["final"]["val_mse"] < 0.6 * float(load_data("digits").take().var())


@pytest.mark.parametrize("ema", [False, True])
def test_vq_trains_and_uses_its_codebook(tmp_path, ema):
    run = train(
        tiny(
            tmp_path,
            mode="dae",
            bottleneck="vq",
            stage1_steps=30,
            stage2_steps=10,
            codebook_size=32,
            vq_ema=ema,
            vq_restart_every=10,
        )
    )
    m = metrics(tmp_path)
    s1 = [r for r in m if r["stage"] == "stage1"]
    assert np.mean([r["rec"] for r in s1[-5:]]) < 0.75 * np.mean([r["rec"] for r in s1[:5]])
    assert run["final"]["codebook_perplexity"] > 8 and run["final"]["codes_used"] > 12
    w = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(w["codebook"], w["bottleneck.codebook"]) and w["codebook"].shape == (32, 2)
    # the exported encoder outputs codebook vectors, and carries the codebook
    enc = torch.jit.load(str(tmp_path / "encoder.pt"))
    assert torch.equal(enc.codebook, w["codebook"])
    z = enc(load_data("digits").take(np.arange(20)))
    vecs = z.movedim(1, -1).reshape(-1, 2)
    assert (vecs[:, None] - w["codebook"][None]).norm(dim=-1).min(1).values.max() < 1e-6


def test_kill_and_resume_is_bitwise_equal(tmp_path):
    # bit-exact on CPU (docs/dae.md); on a GPU nondeterministic kernels may differ in the last bits
    common = dict(mode="dae", bottleneck="kl", stage1_steps=20, stage2_steps=20, checkpoint_every=2)
    common["device"] = "cpu"
    train(tiny(tmp_path / "ref", **common))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "latentdist.dae", *TINY_FLAGS, "--out", str(out), "--mode", "dae", "--bottleneck", "kl",
           "--stage1-steps", "20", "--stage2-steps", "20", "--checkpoint-every", "2", "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, step, deadline = out / "checkpoint.pt", 0, time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file():
            step = torch.load(ckpt, weights_only=True)["step"]
            if step >= 6:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and 6 <= step < 40 and not (out / "run.json").exists()
    resumed = subprocess.run([*cmd, "--resume"], env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    ref, res = (
        load_file(str(tmp_path / "ref" / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    assert ref.keys() == res.keys()
    for k in ref:
        assert torch.equal(ref[k], res[k]), k
    assert [m["loss"] for m in metrics(tmp_path / "ref")] == [m["loss"] for m in metrics(out)]


def test_two_process_ddp_matches_single_process(tmp_path):
    """DDP averages the gradients of two half batches: the full-batch gradient up to rounding."""
    flags = [
        *TINY_FLAGS,
        "--mode",
        "joint",
        "--bottleneck",
        "ae",
        "--stage1-steps",
        "8",
        "--stage2-steps",
        "0",
        "--device",  # gloo on CPU; NCCL needs one GPU per process
        "cpu",
    ]
    r = torchrun(["latentdist.dae", *flags, "--out", str(tmp_path / "ddp")], env=_env())
    assert r.returncode == 0, launch_failure(r.stderr)
    single = train(
        tiny(
            tmp_path / "one",
            mode="joint",
            bottleneck="ae",
            stage1_steps=8,
            stage2_steps=0,
            device="cpu",
        )
    )
    ddp_run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert ddp_run["world_size"] == 2 and single["world_size"] == 1
    a, b = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    assert len(a) == len(b) == 8
    np.testing.assert_allclose([m["loss"] for m in a], [m["loss"] for m in b], rtol=1e-4)
    assert b[-1]["loss"] < 0.7 * b[0]["loss"]


def test_batch_stream_shards_the_global_batch():
    full = BatchStream(50, 16, seed=3)
    shards = [BatchStream(50, 16, seed=3, rank=r, world=4) for r in range(4)]
    for step in range(10):
        assert np.array_equal(
            np.concatenate([s.local_indices(step) for s in shards]), full.global_indices(step)
        )
    # each epoch visits every sample exactly once
    stream = np.concatenate([full.global_indices(t) for t in range(25)])  # 400 = 8 epochs of 50
    assert all(sorted(stream[i : i + 50]) == list(range(50)) for i in range(0, 400, 50))


def test_nan_loss_stops_with_usable_checkpoint(tmp_path):
    kw = dict(mode="joint", bottleneck="ae", stage1_steps=30, stage2_steps=0, lr=1e12)
    cfg = tiny(tmp_path, **{**kw, "checkpoint_every": 1})
    with pytest.raises(NonFiniteLossError, match="NaN/Inf"):
        train(cfg)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert 1 <= ck["step"] < 30 and not (tmp_path / "run.json").exists()
    assert all(
        torch.isfinite(v).all()
        for sd in ck["models"].values()
        for v in sd.values()
        if v.is_floating_point()
    )
    # usable: --resume loads it and replays the same divergence at the same step
    with pytest.raises(NonFiniteLossError) as first:
        train(tiny(tmp_path / "again", **{**kw, "checkpoint_every": 0}))
    cfg.resume = True
    with pytest.raises(NonFiniteLossError) as resumed:
        train(cfg)
    assert str(first.value).split(";")[0] == str(resumed.value).split(";")[0]


def test_bf16_autocast_on_cpu_tracks_fp32(tmp_path):
    a = train(tiny(tmp_path / "a", mode="joint", bottleneck="ae", stage1_steps=3, stage2_steps=0))
    b = train(
        tiny(
            tmp_path / "b",
            mode="joint",
            bottleneck="ae",
            stage1_steps=3,
            stage2_steps=0,
            precision="bf16",
        )
    )
    la, lb = metrics(tmp_path / "a")[0]["loss"], metrics(tmp_path / "b")[0]["loss"]
    assert lb == pytest.approx(la, rel=2e-2) and la != lb  # same init and batch; bf16 rounding only
    assert b["precision"] == "bf16" and a["final"]["val_mse"] is not None


def test_vector_data_gets_an_mlp_pair_in_data_units(tmp_path):
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 12))
    x = (rng.normal(size=(400, 3)) @ basis * 100 + 1000).astype(
        np.float32
    )  # 3-dim subspace, odd units
    np.save(tmp_path / "x.npy", x)
    run = train(TrainConfig(data=str(tmp_path / "x.npy"), out=str(tmp_path / "run"), mode="joint", bottleneck="ae",
                            latent_channels=3, stage1_steps=150, stage2_steps=0, batch_size=64, progress=False))  # fmt: skip
    assert run["data_kind"] == "vectors" and run["latent_shape"] == [3]
    enc, dec = (torch.jit.load(str(tmp_path / "run" / f)) for f in ("encoder.pt", "decoder.pt"))
    xv = torch.from_numpy(x[np.array(run["split"]["val_indices"])])
    with torch.no_grad():
        mse = (dec(enc(xv)) - xv).pow(2).mean().item()
    assert mse == pytest.approx(run["final"]["val_mse"], rel=1e-4)
    assert mse < 0.05 * float(xv.var(0).mean())  # a 3-dim latent captures the 3-dim subspace


def test_adaptive_weight_and_hinge_closed_forms():
    w = torch.randn(5, requires_grad=True)
    a, b = torch.randn(5), torch.randn(5)
    got = adaptive_weight((w * a).sum(), (w * b).sum(), w)
    assert got.item() == pytest.approx((a.norm() / (b.norm() + 1e-4)).item(), rel=1e-6)
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * ((0 + .5 + 2)/3 + (0 + 1 + 2)/3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3 / 3))


def test_perceptual_loss_uses_the_users_network(tmp_path):
    net = torch.jit.script(torch.nn.Conv2d(1, 3, 1))
    net.save(str(tmp_path / "feat.pt"))
    loss = PerceptualLoss(tmp_path / "feat.pt", torch.device("cpu"))
    x, y = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        fa, fb = (
            torch.nn.functional.normalize(net(x), dim=1),
            torch.nn.functional.normalize(net(y), dim=1),
        )
    assert loss(x, y).item() == pytest.approx((fa - fb).pow(2).sum(1).mean().item(), rel=1e-5)
    run = train(tiny(tmp_path / "run", mode="joint", stage1_steps=4, stage2_steps=0, perceptual=str(tmp_path / "feat.pt"),
                     disc_weight=0.5, disc_start=2))  # fmt: skip
    m = metrics(tmp_path / "run")
    assert "perceptual" in m[0] and "d_loss" not in m[1] and "d_loss" in m[2] and "d_weight" in m[3]
    assert run["discriminator_params"] > 0


def _cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        cli_main(args)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--stage1-steps", "-1"], "--stage1-steps"),
        (["--bottleneck", "foo"], "--bottleneck"),
        (["--downsample", "3"], "--downsample"),
        (["--resize", "0,4"], "--resize"),
        (["--channels", "cmyk"], "--channels"),
        (["--resize", "8,8"], "only applies to a folder of images"),
        (["--aux-width-mult", "2"], "--aux-width-mult"),
        (["--lr", "nan"], "--lr"),
        (["--channel-mult", "1,2,2"], "--channel-mult"),
        (["--precision", "fp16", "--device", "cpu"], "fp16"),
        (["--resume"], "nothing to resume"),
    ],
)
def test_bad_flags_get_one_line_and_exit_2(tmp_path, capsys, extra, needle):
    code, err = _cli([*TINY_FLAGS, "--out", str(tmp_path / "o"), *extra], capsys)
    assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_data_gets_one_line_and_exit_2(tmp_path, capsys):
    bad = np.ones((10, 1, 8, 8), dtype=np.float32)
    bad[3, 0, 2, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    for data, needle in [
        (str(tmp_path / "nan.npy"), "NaN"),
        (str(tmp_path / "missing.npy"), "no such file"),
    ]:
        code, err = _cli(["--data", data, "--out", str(tmp_path / "o"), "--no-progress"], capsys)
        assert code == 2 and needle in err and err.count("\n") == 1


def test_finished_run_is_not_overwritten(dae_run, capsys):
    out, run = dae_run
    before = (out / "run.json").read_text()
    code, err = _cli(
        [*TINY_FLAGS, "--out", str(out), "--stage1-steps", "15", "--stage2-steps", "15"], capsys
    )
    assert code == 2 and "--overwrite" in err and (out / "run.json").read_text() == before
    # --resume on a finished run returns it unchanged
    again = train(
        tiny(out, mode="dae", bottleneck="kl", stage1_steps=15, stage2_steps=15, resume=True)
    )
    assert again == json.loads(before) and again["final"] == run["final"]


def test_cli_command_object_runs_and_reports(tmp_path):
    from click.testing import CliRunner

    from latentdist.cli.train_dae import train_dae

    res = CliRunner().invoke(train_dae, [*TINY_FLAGS, "--out", str(tmp_path), "--mode", "joint", "--stage1-steps", "3", "--stage2-steps", "0", "--format", "json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    run = json.loads(res.output)
    assert run == json.loads((tmp_path / "run.json").read_text()) and run["steps"] == 3
    help_text = CliRunner().invoke(train_dae, ["--help"]).output
    assert "--aux-width-mult" in help_text and "default: 0.5" in help_text


@pytest.mark.slow
def test_compiled_model_tracks_eager(tmp_path):
    """``--compile`` (inductor on CPU) computes the same losses as eager mode up to rounding."""
    kw = dict(mode="joint", bottleneck="ae", stage1_steps=4, stage2_steps=0)
    train(tiny(tmp_path / "eager", **kw))
    train(tiny(tmp_path / "compiled", compile=True, **kw))
    a, b = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], rtol=1e-3)


@pytest.mark.parametrize("preload", [True, False])
def test_train_data_normalises_on_the_models_device(monkeypatch, preload):
    """The normaliser's buffers sit on the training device (cuda there): data moves first.

    The meta device stands in for a GPU, so CI without one catches a CPU tensor meeting them.
    """
    import importlib

    from latentdist.dae.models import data_statistics

    train_module = importlib.import_module("latentdist.dae.data")  # TrainData, _PRELOAD_BYTES

    if not preload:
        monkeypatch.setattr(train_module, "_PRELOAD_BYTES", 0)
    src = load_data("digits")
    idx = np.arange(100)
    shift, scale = data_statistics(src.take(idx), src.kind)
    models = build_models(TrainConfig(), src.sample_shape, src.kind, shift, scale)
    data = train_module.TrainData(
        src, idx, models.normalize.to("meta"), torch.device("meta"), False
    )
    assert (data.tensor is not None) == preload
    x = data(np.arange(5))
    assert x.device.type == "meta" and x.shape == (5, *src.sample_shape)


def test_models_to_moves_every_network_the_denormaliser_too():
    """``denormalize`` is not in ``named()`` (checkpoint keys) but evaluation runs it on the
    device; on CUDA a CPU copy of its buffers stopped every run at its final evaluation."""
    src = load_data("digits")
    x = src.take(np.arange(50))
    from latentdist.dae.models import data_statistics

    shift, scale = data_statistics(x, src.kind)
    cfg = TrainConfig(mode="dae", disc_weight=0.5)
    models = build_models(cfg, src.sample_shape, src.kind, shift, scale)
    models.to(torch.device("meta"), channels_last=True)
    mods = [*models.named().values(), models.denormalize]
    assert all(t.device.type == "meta" for m in mods for t in [*m.parameters(), *m.buffers()])


def test_more_cuda_processes_than_gpus_is_a_usage_error(monkeypatch):
    from latentdist import parallel as dist_util
    from latentdist.errors import UsageError

    for k, v in {
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "RANK": "0",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match="one GPU per process"):
        dist_util.setup("cuda")
