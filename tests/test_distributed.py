"""``measure`` under torchrun: two gloo processes give the single-process result, bitwise.

The two-process runs are real ``torchrun`` launches (``python -m torch.distributed.run
--standalone``) of the command line; the single-process run is the same command in this
process with the same number of threads (one), which is what makes the arithmetic identical.
"""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest
import torch

from latentdist.estimator import MeasureConfig
from latentdist.estimator.sharding import plan_members
from latentdist.parallel import deal, shard_rows, split_contiguous
from tests._cli import launch_failure, run_cli
from tests._cli import torchrun as _torchrun

N_IMAGES = 128
ENCODE_BATCH = 16


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An image folder (8x8 grey, smooth random blobs) and a TorchScript encoder to 2x2x2."""
    from PIL import Image

    root = tmp_path_factory.mktemp("dist")
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        low = rng.normal(size=(3, 3))
        img = np.kron(low, np.ones((3, 3)))[:8, :8]
        img = (255 * (img - img.min()) / (np.ptp(img) + 1e-9)).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 4, stride=4), torch.nn.Tanh())
    torch.jit.script(enc).save(str(root / "encoder.pt"))
    return root


# the sweep 4 extends itself to 8 (one capacity cannot show a plateau): torchrun's extension too
FLAGS = [
    "--generator", "mlp", "--capacities", "4", "--max-capacity", "8", "--seeds", "3", "--steps", "20",
    "--batch-size", "32", "--n-eval", "24", "--threads", "1", "--no-progress",
    "--encode-batch-size", str(ENCODE_BATCH), "--device", "cpu",
]  # fmt: skip


def torchrun(args: list[str], cwd) -> subprocess.CompletedProcess:
    return _torchrun(["latentdist", *args], cwd=cwd, timeout=240)


def _strip(report: dict) -> dict:
    """The report without what legitimately differs between runs (times, memory, the split)."""
    out = {k: v for k, v in report.items() if k not in ("timings", "memory", "distributed")}
    out.pop("created")
    out["diagnostics"] = {k: v for k, v in report["diagnostics"].items() if k != "time_s"}
    return out


def test_two_gloo_processes_equal_one_process(images, capsys):
    root = images
    args = ["measure", "--encoder", str(root / "encoder.pt"), "--data", str(root / "images")]
    code, _, err = run_cli([*args, *FLAGS, "--out", str(root / "one")], capsys)
    assert code == 0, err
    proc = torchrun([*args, *FLAGS, "--out", str(root / "two")], root)
    assert proc.returncode == 0, launch_failure(proc.stderr)
    one = json.loads((root / "one" / "measure.json").read_text())
    two = json.loads((root / "two" / "measure.json").read_text())
    assert _strip(two) == _strip(one)  # bitwise: floats compared exactly
    assert two["sweep"]["added"] == [8]
    d = two["distributed"]
    assert (d["world_size"], d["backend"]) == (2, "gloo")
    assert one["distributed"] == {
        "world_size": 1,
        "backend": None,
        "fitted": None,
        "evaluated_seeds": None,
    }
    for fit in two["fits"]:
        blocks = d["fitted"][fit]
        assert len(blocks) == 2 and all(blocks), blocks  # both ranks fitted members
        members = sorted(tuple(m) for b in blocks for m in b)
        assert members == sorted((c, s) for c in (4, 8) for s in (0, 1, 2))  # each once
    assert sorted(s for b in d["evaluated_seeds"] for s in b) == [0, 1, 2]
    assert all(d["evaluated_seeds"])
    mem = two["memory"]
    assert mem["peak_rss_mb"] > 0 and len(mem["per_rank"]) == 2
    assert {"encode", "fit", "evaluate"} <= set(mem["phases_rss_mb"])
    assert two["timings"]["encode_s"] > 0
    # only rank 0 wrote: one set of outputs, no temporary files left
    assert sorted(p.name for p in (root / "two").iterdir()) == [
        "curve.csv",
        "curve.png",
        "measure.json",
    ]


def test_a_failing_rank_stops_every_rank_with_its_error(images, tmp_path):
    """A truncated image only rank 1 decodes: one line naming it, exit 2 on every rank, no
    output folder."""
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(images / "images", folder)
    last = folder / f"{N_IMAGES - 1:03d}.png"  # in rank 1's encoding shard
    last.write_bytes(last.read_bytes()[:60])
    proc = torchrun(
        ["measure", "--encoder", str(images / "encoder.pt"), "--data", str(folder), *FLAGS]
        + ["--out", str(tmp_path / "out")],
        tmp_path,
    )
    assert proc.returncode != 0  # torchrun's own status is 1 when a worker fails
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("latentdist:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("latentdist: error: rank 1 of 2: ")
    assert f"{last.name}: unreadable or corrupt image" in errors[0]
    frames = [ln for ln in proc.stderr.splitlines() if ln.strip().startswith('File "')]
    assert not [f for f in frames if "latentdist" in f.split("site-packages")[-1]]  # none of ours
    # the workers exit with status 2; once one has, torchrun may stop the other (SIGTERM) first
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, codes
    assert not (tmp_path / "out").exists()


def test_plans_cover_every_member_once_in_capacity_order():
    cfg = MeasureConfig(generator="mlp", capacities=(4, 8, 16, 32, 64), seeds=3).validate()
    caps = list(cfg.capacities)
    for world in (1, 2, 3, 4, 16):
        plan = plan_members(cfg, caps, 3, world, (8,), (64,))
        assert len(plan) == world
        flat = [m for b in plan for m in b]
        assert sorted(flat) == sorted((c, s) for c in caps for s in range(3))
        for b in plan:
            assert b == sorted(b, key=lambda m: (caps.index(m[0]), m[1]))


def test_splits_and_shards():
    assert split_contiguous([1.0] * 4, 2) == [[0, 1], [2, 3]]
    assert [len(b) for b in split_contiguous([1.0] * 3, 5)].count(0) == 2
    assert sorted(i for b in deal([3, 1, 2, 2], 2) for i in b) == [0, 1, 2, 3]
    spans = [shard_rows(100, 16, 3, r) for r in range(3)]
    assert spans[0][0] == 0 and spans[-1][1] == 100
    assert all(a % 16 == 0 for a, _ in spans)  # whole encoding batches
    assert all(spans[r][1] == spans[r + 1][0] for r in range(2))
