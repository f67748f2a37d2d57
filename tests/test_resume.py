"""Resumable ``measure``: a run interrupted at any checkpoint and run again returns, bitwise, the
result of a run never interrupted; a checkpoint of other inputs or settings is refused."""

from __future__ import annotations

import json

import pytest
import torch

from latentdist import checkpoint as ck
from latentdist._io import to_json
from latentdist.cli.measure import measure as measure_cmd
from latentdist.data import load_data
from latentdist.errors import UsageError
from latentdist.estimator import measure

SMALL = dict(capacities=(2, 4), seeds=2, steps=12, n_eval=60, proxies=False, progress=False)


@pytest.fixture(scope="module")
def rows():
    x = load_data("digits").take()[:400]
    g = torch.Generator().manual_seed(0)
    z = torch.tanh(x.flatten(1) @ torch.randn(64, 5, generator=g) / 8)
    return z, x


def _stable(report: dict) -> dict:
    """The report without what differs between any two runs: times, memory, the date."""
    r = json.loads(to_json(report))
    for key in ("timings", "memory", "created"):
        r.pop(key)
    r["diagnostics"].pop("time_s")
    return r


def _interrupted(monkeypatch, after: int):
    """Make the ``after``-th checkpoint save stop the run (as a kill right after it would)."""
    saves = {"n": 0}
    save = ck.Slot.save

    def stop_after(self, payload):
        save(self, payload)
        saves["n"] += 1
        if saves["n"] == after:
            raise KeyboardInterrupt

    monkeypatch.setattr(ck.Slot, "save", stop_after)
    return saves


# a sweep that extends itself (1, 2 -> 4 -> 8 on these rows), stopped inside the last extension
EXTENDED = {"capacities": (1, 2), "seeds": 3, "max_capacity": 8}


@pytest.mark.parametrize(
    ("fit", "metric", "after", "more"),
    [
        ("mmd", "mmd", 5, {}),
        ("mmd", "mmd", 30, {}),
        ("adversarial", "mmd", 9, {}),
        ("ot", "w2", 40, {}),
        ("mmd", "mmd", 94, EXTENDED),  # save 94 of 100: inside fit-mmd-c8 (88-99)
    ],
)
def test_an_interrupted_measure_resumes_to_the_same_result(rows, tmp_path, monkeypatch, fit,
                                                           metric, after, more):  # fmt: skip
    z, x = rows
    settings = {**SMALL, "fit": fit, "metric": metric, **more}
    whole = _stable(measure(z, x, **settings).report)
    folder = tmp_path / "checkpoint"
    with monkeypatch.context() as m:
        _interrupted(m, after)
        with pytest.raises(KeyboardInterrupt):
            measure(z, x, checkpoint=folder, checkpoint_every=0, **settings)
    kept = sorted(p.name for p in folder.iterdir())
    assert "fingerprint.json" in kept and len(kept) > 1, kept
    if more:  # stopped inside the extension's fits, after the sweep below was evaluated
        assert "fit-mmd-c8.pt" in kept and "evaluate-c4.pt" in kept, kept
        assert whole["sweep"]["added"] == [4, 8]
    resumed = measure(z, x, checkpoint=folder, checkpoint_every=0, **settings)
    assert _stable(resumed.report) == whole  # bitwise: floats compared exactly


def test_a_finished_checkpoint_is_read_back_not_recomputed(rows, tmp_path, monkeypatch):
    """Every fit and capacity kept: the rerun fits nothing (no fitting step runs)."""
    z, x = rows
    folder = tmp_path / "checkpoint"
    first = measure(z, x, checkpoint=folder, **SMALL)
    from latentdist.estimator import fit as fit_module

    def no_step(*args, **kwargs):
        raise AssertionError("a fitting step ran although its loop was kept at its end")

    monkeypatch.setattr(fit_module, "_member_losses", no_step)
    again = measure(z, x, checkpoint=folder, **SMALL)
    assert _stable(again.report) == _stable(first.report)


def test_a_changed_setting_or_input_is_refused_unless_restart(rows, tmp_path):
    z, x = rows
    folder = tmp_path / "checkpoint"
    measure(z, x, checkpoint=folder, **SMALL)
    with pytest.raises(UsageError, match=r"steps: 12 -> 13.*--restart"):
        measure(z, x, checkpoint=folder, **{**SMALL, "steps": 13})
    with pytest.raises(UsageError, match="latents:"):
        measure(z + 1e-3, x, checkpoint=folder, **SMALL)
    fresh = measure(z, x, checkpoint=folder, restart=True, **{**SMALL, "steps": 13})
    plain = measure(z, x, **{**SMALL, "steps": 13})
    assert _stable(fresh.report) == _stable(plain.report)


def test_a_damaged_checkpoint_file_is_one_line(rows, tmp_path):
    z, x = rows
    folder = tmp_path / "checkpoint"
    measure(z, x, checkpoint=folder, **SMALL)
    (folder / "evaluate-c2.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match=r"evaluate-c2.pt: unreadable checkpoint.*--restart"):
        measure(z, x, checkpoint=folder, **SMALL)


def test_a_checkpoint_file_is_never_unpickled(tmp_path):
    """A slot is read with weights_only: a file that would run code on loading is refused."""

    class Payload:
        def __reduce__(self):
            return (exec, ("import sys; sys.modules['latentdist'].HACKED = True",))

    path = tmp_path / "fit-mmd.pt"
    torch.save({"x": Payload()}, path)
    with pytest.raises(UsageError, match="unreadable checkpoint"):
        ck.Slot(path).load()
    import latentdist

    assert not hasattr(latentdist, "HACKED")


def test_cli_resumes_and_removes_its_checkpoint_once_written(rows, tmp_path, monkeypatch):
    from click.testing import CliRunner

    z, x = rows
    torch.save({"z": z}, tmp_path / "z.pt")
    torch.save({"x": x}, tmp_path / "x.pt")
    out = tmp_path / "out"
    args = [
        "--latents", str(tmp_path / "z.pt"), "--data", str(tmp_path / "x.pt"),
        "--capacities", "2,4", "--seeds", "2", "--steps", "12", "--n-eval", "60",
        "--no-proxies", "--quiet", "--format", "json", "--checkpoint-every", "0",
        "--out", str(out),
    ]  # fmt: skip
    whole = CliRunner().invoke(measure_cmd, [*args[:-1], str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    with monkeypatch.context() as m:
        _interrupted(m, 20)
        stopped = CliRunner().invoke(measure_cmd, args)
    assert stopped.exit_code != 0 and not (out / "measure.json").exists()
    assert (out / "checkpoint" / "fingerprint.json").is_file()
    resumed = CliRunner().invoke(measure_cmd, args)
    assert resumed.exit_code == 0, resumed.output
    assert not (out / "checkpoint").exists()  # the result is written: nothing left to resume
    one, two = (json.loads((d / "measure.json").read_text()) for d in (tmp_path / "whole", out))
    assert _stable(two) == _stable(one)


def test_train_dae_resumes_past_a_metrics_line_cut_short(tmp_path):
    """A kill (or a full disk) while a metrics.jsonl line is appended leaves it cut short:
    resuming keeps the whole records up to the checkpoint and drops the rest."""
    from latentdist.dae.log import RunLog

    lines = [json.dumps({"step": s, "stage": "stage1", "loss": 1.0 / s}) for s in (10, 20, 30)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 40, "sta')
    log = RunLog(tmp_path, "test")
    log.start(start_step=20, resumed=True, tensorboard=False)
    assert [r["step"] for r in log.history] == [10, 20]
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\n"
