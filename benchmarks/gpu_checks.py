"""Exercise the GPU paths (CUDA, AMP, torchrun/NCCL) and record what they give.

Each check runs the real command line in a subprocess with a time limit; a failure is recorded
(exit status and the end of stderr) and the next check runs. Results go to ``OUT/summary.json``
and one log per phase. On a machine without a GPU, ``--device cpu --quick`` runs the same
commands on the CPU (to test this script).

    python benchmarks/gpu_checks.py PHASE... [--out DIR] [--device cuda] [--quick]
    phases: info train torchrun resume measure

Used for benchmarks/results/gpu_h100.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
RESULTS: dict = {}
ONLY: set | None = None


def log(phase: str, text: str) -> None:
    with open(OUT / f"{phase}.log", "a") as f:
        f.write(text + "\n")
    print(text, flush=True)


def sh(phase: str, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run ``cmd``; keep rc, seconds, stdout (parsed as JSON when it is) and the end of stderr."""
    if ONLY is not None and name not in ONLY:
        return {"rc": "skipped", "cmd": " ".join(cmd)}
    log(phase, f"$ {' '.join(cmd)}")
    t0 = time.perf_counter()
    try:
        r = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "LATENTDIST_DEBUG": "1", **(env or {})},
        )
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", str(e.stdout or ""), str(e.stderr or "")
    rec = {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(time.perf_counter() - t0, 2)}
    try:
        rec["json"] = json.loads(out)
    except ValueError:
        rec["stdout_tail"] = out[-1500:]
    if rc != 0:
        rec["stderr_tail"] = err[-3000:]
    log(phase, f"  -> rc {rc} in {rec['wall_s']} s" + (f"\n{err[-3000:]}" if rc != 0 else ""))
    RESULTS.setdefault(phase, {})[name] = rec
    save()
    return rec


def save() -> None:
    (OUT / f"{SUMMARY}.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def train_cmd(out: str, *flags: str) -> list[str]:
    return [PY, "-m", "latentdist.dae", "--out", out, "--overwrite", "--no-progress",
            "--format", "json", "--device", DEV, *flags]  # fmt: skip


def brief(rec: dict) -> dict:
    if rec["rc"] == "skipped":
        return {"rc": "skipped"}
    j = rec.get("json") or {}
    f = j.get("final", {})
    return {
        "rc": rec["rc"],
        "val_mse": f.get("val_mse"),
        "val_mse_aux": f.get("val_mse_aux"),
        "samples_per_s": j.get("samples_per_s"),
        "loop_s": j.get("loop_time_s"),
        "world": j.get("world_size"),
    }


def phase_info() -> None:
    import torch

    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version()))
        if torch.cuda.is_available()
        else None,
        "python": sys.version.split()[0],
    }
    for mod in ("ot", "skdim", "mlxtend", "numpy", "scipy", "sklearn"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            info[mod] = f"missing: {e}"
    RESULTS["info"] = info
    log("info", json.dumps(info, indent=1))
    save()


def phase_train() -> None:
    data = "digits" if QUICK else "mnist5k"
    steps = ["--stage1-steps", "20", "--stage2-steps", "20"] if QUICK else []
    table = {}
    precisions = ("fp32", "bf16", "fp16") if DEV == "cuda" else ("fp32", "bf16")
    for mode in ("dae", "joint"):
        for prec in precisions:
            name = f"{mode}-kl-{prec}"
            rec = sh("train", name, train_cmd(f"runs/{name}", "--data", data, "--mode", mode,
                     "--precision", prec, *steps), 240)  # fmt: skip
            table[name] = brief(rec)
    extras = {
        "dae-vq-fp16": ["--mode", "dae", "--bottleneck", "vq", "--precision", precisions[-1]],
        "dae-vqema-bf16": ["--mode", "dae", "--bottleneck", "vq", "--vq-ema", "--precision", "bf16"],
        "joint-gan-fp16": ["--mode", "joint", "--disc-weight", "0.5", "--disc-start", "100" if not QUICK else "5", "--precision", precisions[-1]],
        "dae-gan-bf16": ["--mode", "dae", "--disc-weight", "0.5", "--disc-start", "100" if not QUICK else "5", "--precision", "bf16"],
        "joint-clip-fp16": ["--mode", "joint", "--grad-clip", "1", "--precision", precisions[-1]],
        "joint-compile-bf16": ["--mode", "joint", "--compile", "--precision", "bf16"],
        "joint-kl-bf16-b512": ["--mode", "joint", "--precision", "bf16", "--batch-size", "512"],
        "dae-nochannelslast-bf16": ["--mode", "dae", "--precision", "bf16", "--no-channels-last"],
    }  # fmt: skip
    for name, flags in extras.items():
        rec = sh("train", name, train_cmd(f"runs/{name}", "--data", data, *flags, *steps), 300)
        table[name] = brief(rec)
    RESULTS["train_table"] = table
    save()


def phase_torchrun() -> None:
    data = "digits" if QUICK else "mnist5k"
    steps = ["--stage1-steps", "20", "--stage2-steps", "20"] if QUICK else []
    table = {}
    for n in (1, 2):
        name = f"torchrun-{n}"
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "latentdist.dae", "--data", data, "--out", f"runs/{name}", "--overwrite",
               "--no-progress", "--format", "json", "--device", DEV, "--precision", "bf16", *steps]  # fmt: skip
        rec = sh("torchrun", name, cmd, 240, env={"NCCL_DEBUG": "WARN", "OMP_NUM_THREADS": "1"})
        if rec.get("json") is None:  # torchrun prefixes nothing with --standalone; parse the tail
            text = rec.get("stdout_tail", "")
            start = text.find("{")
            if start >= 0:
                try:
                    rec["json"] = json.loads(text[start:])
                except ValueError:
                    pass
        table[name] = brief(rec)
    # NCCL itself with two ranks on the one GPU (what torchrun --nproc_per_node 2 asks of it)
    probe = (
        "import os, torch, torch.distributed as d; d.init_process_group('nccl');"
        "r = d.get_rank(); torch.cuda.set_device(0); t = torch.ones(1, device='cuda') * (r + 1);"
        "d.all_reduce(t); print('rank', r, 'all_reduce', t.item()); d.destroy_process_group()"
    )
    if DEV == "cuda":
        rec = sh("torchrun", "nccl-2-ranks-1-gpu", [PY, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "2", "--no-python", PY, "-c", probe], 120,
                 env={"NCCL_DEBUG": "WARN"})  # fmt: skip
        table["nccl-2-ranks-1-gpu"] = {"rc": rec["rc"]}
    RESULTS["torchrun_table"] = table
    save()


def phase_resume() -> None:
    """Kill a run with SIGKILL after a checkpoint, resume it, compare with an uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    data = "digits" if QUICK else "mnist5k"
    s1, s2 = os.environ.get("RESUME_STEPS", "20,20" if QUICK else "300,300").split(",")
    table = {}
    for prec in os.environ.get("RESUME_PRECISIONS", "fp32,bf16").split(","):
        flags = ["--data", data, "--mode", "dae", "--bottleneck", "kl", "--precision", prec,
                 "--stage1-steps", s1, "--stage2-steps", s2, "--checkpoint-every", "10"]  # fmt: skip
        ref = f"runs/resume-ref-{prec}"
        sh("resume", f"ref-{prec}", train_cmd(ref, *flags), 240)
        again = f"runs/resume-again-{prec}"
        sh("resume", f"again-{prec}", train_cmd(again, *flags), 240)
        out = Path(f"runs/resume-killed-{prec}")
        cmd = train_cmd(str(out), *flags)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ckpt, step, deadline = out / "checkpoint.pt", 0, time.time() + 200
        target = int(s1) // 2 + int(s1) // 3  # stage 1, past the first checkpoints
        while time.time() < deadline and proc.poll() is None:
            if ckpt.is_file():
                try:
                    step = torch.load(ckpt, weights_only=True)["step"]
                except Exception:  # noqa: BLE001 (being written)
                    step = step
                if step >= target:
                    break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = step
        sh("resume", f"resumed-{prec}", [c for c in cmd if c != "--overwrite"] + ["--resume"], 240)
        res = {"killed_at_step": killed_at, "killed_rc": proc.returncode}
        try:
            a = load_file(f"{ref}/model.safetensors")
            for other, key in ((again, "rerun"), (str(out), "resumed")):
                b = load_file(f"{other}/model.safetensors")
                diffs = [
                    float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()
                ]
                res[f"{key}_bitwise_equal"] = all(torch.equal(a[k], b[k]) for k in a)
                res[f"{key}_max_abs_diff"] = max(diffs)
                la = [json.loads(x)["loss"] for x in open(f"{ref}/metrics.jsonl")]
                lb = [json.loads(x)["loss"] for x in open(f"{other}/metrics.jsonl")]
                res[f"{key}_losses_equal"] = la == lb
                res[f"{key}_final_val_mse"] = json.load(open(f"{other}/run.json"))["final"][
                    "val_mse"
                ]
            res["ref_final_val_mse"] = json.load(open(f"{ref}/run.json"))["final"]["val_mse"]
        except Exception as e:  # noqa: BLE001
            res["error"] = repr(e)
        table[prec] = res
        log("resume", json.dumps(res))
    RESULTS["resume_table"] = table
    save()


def phase_measure() -> None:
    table = {}
    for data in ("digits",) if QUICK else ("digits", "mnist5k"):
        enc = f"{ENC}/{data}/encoder.pt"
        for gen in ("mlp", "conv"):
            for fit in ("ot", "adversarial", "paired"):
                name = f"{data}-{gen}-{fit}"
                cmd = [PY, "-m", "latentdist", "measure", "--encoder", enc, "--data", data,
                       "--generator", gen, "--fit", fit, "--seeds", "2", "--steps",
                       "20" if QUICK else str(STEPS), "--no-proxies", "--device", DEV, "--format",
                       "json", "--quiet", "--capacities", "4,16" if gen == "conv" else "8,32,128"]  # fmt: skip
                rec = sh("measure", name, cmd, float(os.environ.get("MEASURE_TIMEOUT", "300")))
                j = rec.get("json") or {}
                table[name] = {
                    "rc": rec["rc"],
                    "floor": (j.get("floor") or {}).get("mean"),
                    "distances": {
                        str(e["capacity"]): e["distance"]["mean"] for e in j.get("curve", [])
                    },
                    "fit_s": (j.get("timings") or {}).get("fit_s"),
                    "total_s": (j.get("timings") or {}).get("total_s"),
                }
    RESULTS[f"measure_table_{DEV}"] = table
    save()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("phases", nargs="+")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--encoders", default="enc", help="folder with DATA/encoder.pt")
    ap.add_argument("--measure-steps", type=int, default=200)
    ap.add_argument("--summary", default="summary", help="OUT/SUMMARY.json (one per process)")
    ap.add_argument("--only", default=None, help="comma-separated check names to run")
    args = ap.parse_args()
    OUT, DEV, QUICK, ENC, STEPS, SUMMARY = (
        Path(args.out),
        args.device,
        args.quick,
        args.encoders,
        args.measure_steps,
        args.summary,
    )
    ONLY = set(args.only.split(",")) if args.only else None
    OUT.mkdir(parents=True, exist_ok=True)
    prev = OUT / f"{SUMMARY}.json"
    if prev.is_file():
        RESULTS.update(json.loads(prev.read_text()))
    for p in args.phases:
        globals()[f"phase_{p}"]()
