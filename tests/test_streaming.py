"""Rows read on demand (``estimator/rows.py``) give the result of rows held in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import latentdist as ld
from latentdist.data import load_data
from latentdist.estimator.rows import LazyRows, should_stream


def _strip(report: dict) -> dict:
    out = {k: v for k, v in report.items() if k not in ("timings", "memory", "created", "data")}
    out["diagnostics"] = {k: v for k, v in report["diagnostics"].items() if k != "time_s"}
    return out


@pytest.fixture()
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 1, 6, 6)).astype(np.float32)
    z = (x.reshape(400, -1)[:, :5] @ rng.normal(size=(5, 5))).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "z.npy", z)
    return tmp_path


def test_streamed_rows_give_the_in_memory_result(arrays, monkeypatch):
    def run(stream: str) -> dict:
        monkeypatch.setenv("LATENTDIST_STREAM_ROWS", stream)
        x = load_data(str(arrays / "x.npy"))  # memory-mapped
        z = load_data(str(arrays / "z.npy"))
        return ld.measure(
            z, x, generator="mlp", capacities=(4, 8), seeds=2, steps=15, n_eval=40, progress=False
        ).report

    held, streamed = run("0"), run("1")
    assert (held["data"]["streamed"], streamed["data"]["streamed"]) == (False, True)
    assert held["data"]["rows_loaded"] == streamed["data"]["rows_loaded"]
    assert _strip(streamed) == _strip(held)  # bitwise


def test_lazy_rows_index_like_the_block(arrays):
    x = load_data(str(arrays / "x.npy"))
    rows = torch.tensor([3, 7, 7, 100, 399])
    lazy = LazyRows(x, rows)
    block = x.take(rows.numpy())
    idx = torch.tensor([[4, 0, 1], [2, 2, 3]])
    assert torch.equal(lazy[idx], block[idx])
    assert torch.equal(lazy[1:4], block[1:4])
    assert lazy.shape == block.shape and len(lazy) == len(block)


def test_should_stream_by_budget(monkeypatch):
    monkeypatch.delenv("LATENTDIST_STREAM_ROWS", raising=False)
    assert should_stream(1000, (3, 64, 64), budget=10 * 2**20)  # 49 MB > half of 10 MB
    assert not should_stream(1000, (3, 64, 64), budget=10 * 2**30)
    monkeypatch.setenv("LATENTDIST_STREAM_ROWS", "0")
    assert not should_stream(10**9, (3, 64, 64), budget=1)
