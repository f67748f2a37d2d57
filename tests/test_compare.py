"""``latentdist compare``: two tiny train-dae runs (dae, joint) and an external pair on ``digits``."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from latentdist.cli.compare import compare as compare_cmd
from latentdist.data import load_data
from latentdist.discrepancy import frechet_distance
from latentdist.errors import UsageError
from latentdist.estimator import MeasureConfig
from latentdist.evaluation import compare as compare_module
from latentdist.evaluation.compare import (
    GENERATION_KEYS,
    Coded,
    CompareConfig,
    Inputs,
    RunSpec,
    latent_signals,
    signal_rows,
)
from latentdist.evaluation.compare import held_out_rows as _held_out

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = dict(
    base_width=4,
    downsample=2,
    latent_channels=2,
    batch_size=32,
    progress=False,
    checkpoint_every=0,
)
MEASURE_FLAGS = [
    "--capacities",
    "4,16",
    "--steps",
    "30",
    "--n-eval",
    "100",
    "--seeds",
    "2",
    "--no-proxies",
    "--device",
    "cpu",
    "--gen-seeds",
    "2",
    "--feature-steps",
    "30",
    "--prior-components",
    "3",
    "--probe-steps",
    "40",
    "--quiet",
    "--threads",
    "1",
]  # fmt: skip (one thread: the module's runs and a test's own compute alike)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from latentdist.dae import TrainConfig, train

    root = tmp_path_factory.mktemp("runs")
    for mode, s1, s2 in (("dae", 10, 10), ("joint", 20, 0)):
        train(
            TrainConfig(
                data="digits",
                out=str(root / mode),
                mode=mode,
                stage1_steps=s1,
                stage2_steps=s2,
                **TINY,
            )
        )
    return root


@pytest.fixture(scope="module")
def compared(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    pair = f"ext:{runs / 'joint' / 'encoder.pt'}:{runs / 'joint' / 'decoder.pt'}"
    res = CliRunner().invoke(
        compare_cmd,
        [str(runs / "dae"), str(runs / "joint"), "--pair", pair, "--data", "digits"]
        + ["--out", str(out)]
        + MEASURE_FLAGS,
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    return out, json.loads((out / "compare.json").read_text()), res.output


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def test_compare_json_has_finite_values_and_modes(compared):
    _, report, _ = compared
    assert [r["mode"] for r in report["runs"]] == ["dae", "joint", "external"]
    assert [r["name"] for r in report["runs"]] == ["dae", "joint", "ext"]
    for r in report["runs"]:
        rec = r["reconstruction"]
        assert _finite(rec["mse"]) and rec["mse"] > 0 and _finite(rec["psnr"])
        lo, hi = rec["mse_ci"]
        assert lo <= rec["mse"] <= hi
        m = r["measure"]
        assert _finite(m["floor"]["mean"])
        assert [e["capacity"] for e in m["curve"]] == [4, 16]
        assert all(_finite(e["distance"]["mean"]) for e in m["curve"])
        assert "intrinsic_dim" in m["latent"]
        for key in GENERATION_KEYS:
            g = r["generation"][key]
            assert _finite(g["mean"]) and len(g["per_seed"]) == 2, key
            assert g["ci"][0] <= g["mean"] <= g["ci"][1], key
        for key in ("precision", "recall", "coverage"):
            assert all(0 <= v <= 1 for v in r["generation"][key]["per_seed"]), key
        assert r["generation"]["fd"]["mean"] >= 0 and r["generation"]["w2"]["mean"] > 0
        probe = r["probe"]
        assert probe["model"] == "rectified flow" and probe["time_s"] > 0
        for key in GENERATION_KEYS:
            assert _finite(probe[key]["mean"]) and len(probe[key]["per_seed"]) == 2, key
        diag = r["diagnostics"]
        assert _finite(diag["spectrum"]["kl_image_latent"]) and diag["spectrum"]["n_bins"] == 16
        assert all(_finite(diag["equivariance"][t]) for t in ("scale_2x", "rot90"))
        assert diag["statistics"]["scaling_factor"] > 0 and diag["modes"]["n_modes"] >= 1
        mse = diag["decoder_robustness"]["mse"]
        assert mse["0"] == pytest.approx(r["reconstruction"]["mse"], rel=1e-5)
        assert set(mse) == {"0", "0.1", "0.2", "0.5"} and all(_finite(v) for v in mse.values())
    assert report["probe_settings"]["recipe"]["steps"] == 40


def test_signals_in_compare_json_and_report(compared):
    """Every continuous run gets interpolation FD (perturbation FD skipped), the velocity
    irreducible variance and, digits carrying labels, the linear probe; the external pair is the
    joint run's encoder and decoder on the same rows, so its signals equal the joint run's."""
    out, report, output = compared
    for r in report["runs"]:
        s = r["signals"]
        interp = s["interpolation"]
        n_val = r["held_out"]["rows"]
        assert (interp["n_query"], interp["n_ref"], interp["k"], interp["alpha"]) == (
            n_val,
            n_val,
            10,
            0.5,
        )
        assert all(_finite(interp[key]) for key in ("linear", "slerp", "reconstruction"))
        assert interp["floor"] > 0 and interp["reconstruction"] > interp["floor"]
        assert "skipped" in s["perturbation"]
        viv = s["velocity_variance"]
        assert 0 <= viv["ci"][0] <= viv["viv"] <= viv["ci"][1] <= 1 and viv["rows"] == 1000
        probe = s["linear_probe"]
        assert 0 <= probe["accuracy"] <= 1 and probe["n_classes"] == 10
        assert probe["chance"] == pytest.approx(0.1, abs=0.02)  # digits: balanced classes
        assert r["timings"]["signals_s"] == pytest.approx(s["time_s"])
    _, joint, ext = report["runs"]
    for key in ("interpolation", "linear_probe"):
        a, b = ext["signals"][key], joint["signals"][key]
        assert {k: v for k, v in a.items() if k not in ("ci", "per_split")} == pytest.approx(
            {k: v for k, v in b.items() if k not in ("ci", "per_split")}, rel=1e-6
        ), key
    assert ext["signals"]["velocity_variance"]["viv"] == pytest.approx(
        joint["signals"]["velocity_variance"]["viv"], rel=1e-6
    )
    md = (out / "report.md").read_text()
    assert "## Signals" in md and "| run | interp FD (linear) | interp FD (slerp) |" in md
    assert "signals (docs/proxies.md):" in output


def test_vq_codes_get_perturbation_fd():
    """A VQ run (a codebook on the encoder): perturbation FD instead of interpolation FD, on the
    held-out rows against as many training rows; with identity features its floor and its
    unperturbed reconstruction FD equal the Frechet distances computed here."""
    src = load_data("digits")
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(16, 2, generator=g)
    z = codebook[torch.randint(16, (len(src), 4, 4), generator=g)].movedim(-1, 1)
    decoder = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(32, 64), torch.nn.Unflatten(1, (1, 8, 8))
    ).eval()
    val = np.arange(0, len(src), 10)
    with torch.no_grad():
        coded = Coded(SimpleNamespace(codebook=codebook), decoder, z, val, src.take(val),
                      decoder(z[val]))  # fmt: skip
    inputs = Inputs(src, "digits", -1.0, 1.0, {"vq": (val, "test")}, [], torch.device("cpu"))
    cfg = CompareConfig(device="cpu", measure_config=MeasureConfig(seed=3)).validate()
    out = latent_signals(coded, inputs, torch.nn.Flatten(), cfg)
    assert "skipped" in out["interpolation"]
    pert = out["perturbation"]
    n, ref, pool = signal_rows(coded, cfg)
    assert n == len(val) and not set(ref) & set(val) and not set(ref) & set(pool)
    assert set(ref) | set(pool) | set(val) == set(range(len(src)))
    flat = lambda x: x.reshape(len(x), -1).double()  # noqa: E731
    x_ref = flat(src.take(ref))
    assert pert["floor"] == pytest.approx(frechet_distance(flat(src.take(val)), x_ref))
    with torch.no_grad():
        recon = frechet_distance(flat(decoder(z[val])), x_ref)
    assert pert["reconstruction"] == pytest.approx(recon, rel=1e-6)
    assert pert["swapped_share"] == pytest.approx(0.1, abs=0.02)  # of 180 x 16 tokens
    assert _finite(pert["fd"]) and pert["fd"] != pert["reconstruction"]
    assert 0 <= out["velocity_variance"]["viv"] <= 1 and out["linear_probe"]["accuracy"] < 0.5


def test_same_settings_and_seeds_across_runs(compared):
    """The floor depends on the data and seeds alone, so every run must report the same one; the
    external pair is the joint run's encoder/decoder, and the fallback split equals the trainer's
    default split, so every number must coincide with the joint run's."""
    _, report, _ = compared
    dae, joint, ext = report["runs"]
    assert dae["measure"]["floor"] == joint["measure"]["floor"] == ext["measure"]["floor"]
    assert dae["measure"]["config"] == joint["measure"]["config"]
    assert ext["held_out"]["source"].startswith("fallback split")
    assert joint["held_out"]["source"].startswith("the run's validation split")
    assert ext["reconstruction"]["mse"] == pytest.approx(joint["reconstruction"]["mse"], rel=1e-9)
    for a, b in zip(ext["measure"]["curve"], joint["measure"]["curve"], strict=True):
        assert a["distance"]["mean"] == pytest.approx(b["distance"]["mean"], rel=1e-4)
    for key in GENERATION_KEYS:
        assert ext["generation"][key]["mean"] == pytest.approx(
            joint["generation"][key]["mean"], rel=1e-4, abs=1e-6
        )


def test_runs_are_compared_as_a_paired_experiment(compared):
    """Every pair of runs gets D_c(a) - D_c(b) seed by seed, on the same rows; the external
    pair is the joint run's own encoder, so their difference is exactly 0 and nothing can be
    told; the verdict opens the printed table."""
    _, report, output = compared
    dae, joint, ext = report["runs"]
    pairs = {(d["a"], d["b"]): d for d in report["difference"]}
    assert set(pairs) == {("dae", "joint"), ("dae", "ext"), ("joint", "ext")}
    for e, ea, eb in zip(
        pairs[("dae", "joint")]["curve"], dae["measure"]["curve"], joint["measure"]["curve"],
        strict=True,
    ):  # fmt: skip
        want = np.subtract(ea["distance"]["per_seed"], eb["distance"]["per_seed"])
        assert e["per_seed"] == pytest.approx(want.tolist(), abs=1e-15)
    same = pairs[("joint", "ext")]
    assert all(abs(e["mean"]) < 1e-9 for e in same["curve"])
    assert not same["verdict"]["can_tell"]
    for r in report["runs"]:
        assert "interval" in r["measure"]["critical_capacity"]
    assert output.startswith("dae vs joint:")


def test_reconstruction_matches_independent_computation(compared, runs):
    """encoder.pt then decoder.pt on the run's validation rows; PSNR = 10 log10(2^2 / MSE)
    since digits lie in [-1, 1]; also the trainer's own validation MSE in run.json."""
    _, report, _ = compared
    x_all = load_data("digits").take()
    assert report["data"]["range"] == 2.0
    for r in report["runs"][:2]:
        run = json.loads((runs / r["name"] / "run.json").read_text())
        val = np.asarray(run["split"]["val_indices"])
        enc = torch.jit.load(str(runs / r["name"] / "encoder.pt"))
        dec = torch.jit.load(str(runs / r["name"] / "decoder.pt"))
        with torch.no_grad():
            x = x_all[val]
            mse = float(((dec(enc(x)) - x) ** 2).double().mean())
        assert r["reconstruction"]["mse"] == pytest.approx(mse, rel=1e-5)
        assert r["reconstruction"]["psnr"] == pytest.approx(10 * math.log10(4 / mse), rel=1e-5)
        assert r["reconstruction"]["mse"] == pytest.approx(run["final"]["val_mse"], rel=1e-4)
        assert r["held_out"]["rows"] == len(val) == run["split"]["n_val"]


def test_report_and_figures(compared):
    out, report, output = compared
    md = (out / "report.md").read_text()
    assert "| run | mode | enc/dec params | recon MSE | PSNR (dB) | mmd c=4 | mmd c=16 |" in md
    pngs = ["curves.png", "proxies.png", "spectrum.png"] + [
        f"{kind}_{name}.png"
        for name in ("dae", "joint", "ext")
        for kind in ("recon", "samples", "probe")
    ]
    for f in pngs:
        assert f"![{f}]({f})" in md
        data = (out / f).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, f
    for name in ("dae", "joint", "ext"):
        assert f"| {name} |" in md
    assert "## Generation probe" in md and "## Diagnostics" in md
    assert "| run | model | probe FD | probe KID |" in md
    # the terminal table names every run and the report's location
    assert "dae" in output and "ext" in output and "report.md" in output
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_bad_inputs_are_one_line_usage_errors(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="missing encoder.pt, decoder.pt, run.json"):
        RunSpec.from_dir(tmp_path / "empty")
    with pytest.raises(UsageError, match="NAME:ENCODER_PATH:DECODER_PATH"):
        RunSpec.parse_pair("only-a-name")
    vectors = tmp_path / "v.npy"
    np.save(vectors, np.zeros((50, 10), dtype=np.float32))
    res = CliRunner().invoke(
        compare_cmd, [str(runs / "dae"), "--data", str(vectors), "--out", str(tmp_path / "o")]
    )
    assert isinstance(res.exception, UsageError)
    assert "[1, 8, 8]" in str(res.exception) and "\n" not in str(res.exception)
    res = CliRunner().invoke(compare_cmd, ["--data", "digits", "--out", str(tmp_path / "o")])
    assert isinstance(res.exception, UsageError) and "at least one" in str(res.exception)
    res = CliRunner().invoke(
        compare_cmd,
        [
            str(runs / "dae"),
            "--data",
            "digits",
            "--out",
            str(tmp_path / "o"),
            "--probe-steps",
            "-1",
        ],
    )
    assert isinstance(res.exception, UsageError) and "--probe-steps -1" in str(res.exception)


def test_cli_exit_status_2(runs, tmp_path, capsys):
    from latentdist import cli

    if "compare" not in cli.cli.commands:
        pytest.skip("compare is not registered in latentdist.cli yet")
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", str(tmp_path), "--data", "digits", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a finished train-dae run" in err


def test_fingerprint_mismatch_warns_and_falls_back(runs):
    spec = RunSpec.from_dir(runs / "dae")
    src = load_data("digits")
    val, where, warnings = _held_out(spec, len(src), "0" * 16, src.sample_shape)
    assert where.startswith("fallback split") and len(val) == round(0.1 * len(src))
    assert len(warnings) == 1 and "fingerprint" in warnings[0]
    val, where, warnings = _held_out(spec, len(src), src.fingerprint(), src.sample_shape)
    assert warnings == [] and val.tolist() == spec.run["split"]["val_indices"]


class _GuardedRows:
    """An array that records how many rows each read takes and refuses to be read whole."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, array.ndim
        self.reads: list[int] = []
        self.recording = True

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index):
        out = self.array[index]
        if self.recording:
            self.reads.append(1 if np.ndim(out) == self.ndim - 1 else len(out))
        return out

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("the whole data set was read at once")


def test_compare_reads_the_data_a_batch_at_a_time(runs, monkeypatch):
    """Compare never reads the whole data set at once (measure's rows streamed, as for a folder
    larger than memory: test_streaming.py); outside measure it reads at most the held-out rows
    at once. Its values are those of the whole array: the data range of digits ([-1, 1]) and
    the reconstruction error computed independently."""
    from latentdist.evaluation.compare import compare

    monkeypatch.setenv("LATENTDIST_STREAM_ROWS", "1")
    src = load_data("digits")
    x_all = src.take()
    src.array = guarded = _GuardedRows(src.array)

    def unrecorded_measure(*args, measure=compare_module.measure, **kwargs):
        guarded.recording = False
        try:
            return measure(*args, **kwargs)
        finally:
            guarded.recording = True

    monkeypatch.setattr(compare_module, "measure", unrecorded_measure)
    run = json.loads((runs / "dae" / "run.json").read_text())
    n_val = run["split"]["n_val"]
    cfg = MeasureConfig(capacities=(4,), steps=5, n_eval=50, seeds=1, proxies=False)
    result = compare(
        [runs / "dae"], src, measure_config=cfg, gen_seeds=1, feature_steps=5,
        prior_components=2, probe_steps=5, encode_batch_size=64, device="cpu", progress=False,
    )  # fmt: skip
    assert max(guarded.reads) <= n_val < len(src)
    report = result.report
    assert report["data"]["range"] == 2.0 and report["data"]["min"] == float(x_all.min())
    val = np.asarray(run["split"]["val_indices"])
    enc = torch.jit.load(str(runs / "dae" / "encoder.pt"))
    dec = torch.jit.load(str(runs / "dae" / "decoder.pt"))
    with torch.no_grad():
        mse = float(((dec(enc(x_all[val])) - x_all[val]) ** 2).double().mean())
    assert report["runs"][0]["reconstruction"]["mse"] == pytest.approx(mse, rel=1e-5)
    assert _finite(report["runs"][0]["probe"]["fd"]["mean"])


def _stable(value):
    """compare.json without what differs between any two runs: times, memory, dates."""
    volatile = ("timings", "memory", "created", "time_s")
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in volatile}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def test_an_interrupted_compare_resumes_to_the_same_result(runs, compared, tmp_path,
                                                           monkeypatch):  # fmt: skip
    """Stopped inside the second run's measurement (the first run finished), then run again:
    the first run is read back, the second's fits resume, and compare.json equals the
    uninterrupted one."""
    from latentdist import checkpoint as ck

    out = tmp_path / "cmp"
    pair = f"ext:{runs / 'joint' / 'encoder.pt'}:{runs / 'joint' / 'decoder.pt'}"
    args = [str(runs / "dae"), str(runs / "joint"), "--pair", pair, "--data", "digits"]
    args += ["--out", str(out), "--checkpoint-every", "0", *MEASURE_FLAGS]
    save, seen = ck.Slot.save, []

    def stop_in_second_run(self, payload):
        save(self, payload)
        seen.append(self.path.relative_to(out / "checkpoint").as_posix())
        if sum(p.startswith("run1-measure/") for p in seen) == 3:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ck.Slot, "save", stop_in_second_run)
        stopped = CliRunner().invoke(compare_cmd, args)
    assert stopped.exit_code != 0 and not (out / "compare.json").exists()
    assert "run0.pt" in seen and (out / "checkpoint" / "run0.pt").is_file()
    resumed = CliRunner().invoke(compare_cmd, args, catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert not (out / "checkpoint").exists()
    _, whole, _ = compared
    assert _stable(json.loads((out / "compare.json").read_text())) == _stable(whole)
