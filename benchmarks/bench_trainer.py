"""The DAE trainer's step time against a bare PyTorch loop, side by side in one process.

Same model (``build_models`` with the same seed), same global batch, same Adam settings, same
data order, joint mode with the ``ae`` bottleneck (no sampling noise). The bare loop is the
minimum a user would write: index a preloaded tensor, forward, MSE, backward, step. The trainer
runs with its defaults (logging every 10 steps, a checkpoint every 100, NaN checks); its own
loop time (``run.json: loop_time_s``, from the first step to the end of the last, checkpoints
included) is compared. Repeats are interleaved and the median ratio is reported.
Goal (issue): overhead <= 10 % on CPU.

On a GPU it also records throughput (images/s) with bf16 autocast and channels_last, and the
fraction of the GPU's peak dense bf16 FLOP/s (FLOPs of one step counted by
``torch.utils.flop_counter``).

    python benchmarks/bench_trainer.py [--data mnist5k] [--steps 200] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_result  # noqa: E402

from latentdist.dae import TrainConfig, build_models, train  # noqa: E402
from latentdist.dae.data import BatchStream, split_indices  # noqa: E402
from latentdist.dae.models import data_statistics  # noqa: E402
from latentdist.data import load_data  # noqa: E402

# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets
PEAK_BF16_TFLOPS = {
    "H100": 989.4,
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "A10": 125.0,
    "L4": 121.0,
}


def bare_loop(
    config: TrainConfig, device: torch.device, amp: torch.dtype | None, channels_last: bool
) -> float:
    """Seconds for ``config.total_steps`` steps of the plainest equivalent loop."""
    src = load_data(config.data)
    train_idx, _ = split_indices(len(src), config.val_fraction, config.split_seed)
    x_all = src.take(train_idx)
    shift, scale = data_statistics(x_all, src.kind)
    m = build_models(config, src.sample_shape, src.kind, shift, scale)
    enc, dec = m.encoder.to(device), m.decoder.to(device)
    if channels_last:
        enc, dec = (
            enc.to(memory_format=torch.channels_last),
            dec.to(memory_format=torch.channels_last),
        )
    x_all = m.normalize(x_all).to(device)
    stream = BatchStream(len(train_idx), config.batch_size, config.seed)
    batches = [
        torch.from_numpy(stream.global_indices(t)).to(device) for t in range(config.total_steps)
    ]
    opt = torch.optim.Adam(
        [*enc.parameters(), *dec.parameters()], lr=config.lr, betas=config.adam_betas
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for idx in batches:
        x = x_all[idx]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = torch.nn.functional.mse_loss(dec(enc(x)).float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return time.perf_counter() - t0


def trainer_loop(config: TrainConfig) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        config.out = tmp
        return train(config)["loop_time_s"]


def step_flops(config: TrainConfig, device: torch.device) -> float:
    """FLOPs of one forward + backward of encoder + decoder at the configured batch."""
    from torch.utils.flop_counter import FlopCounterMode

    src = load_data(config.data)
    m = build_models(config, src.sample_shape, src.kind, torch.zeros(1, 1, 1), torch.ones(1, 1, 1))
    enc, dec = m.encoder.to(device), m.decoder.to(device)
    x = torch.randn(config.batch_size, *src.sample_shape, device=device)
    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.mse_loss(dec(enc(x)), x).backward()
    return float(fc.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--gpu-batch-size", type=int, default=512)
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="override the GPU's peak bf16 TFLOP/s"
    )
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def cfg(**kw) -> TrainConfig:
        base = dict(data=args.data, mode="joint", bottleneck="ae", stage1_steps=args.steps, stage2_steps=0,
                    batch_size=args.batch_size, progress=False, overwrite=True, device="cpu")  # fmt: skip
        return TrainConfig(**{**base, **kw})

    rows, record = [], {}
    bare_t, trainer_t = [], []
    bare_loop(cfg(stage1_steps=5), torch.device("cpu"), None, False)  # warm-up (allocator, kernels)
    for _ in range(args.repeats):
        bare_t.append(bare_loop(cfg(), torch.device("cpu"), None, False))
        trainer_t.append(trainer_loop(cfg()))
    ratios = [t / b for t, b in zip(trainer_t, bare_t, strict=True)]
    cpu = {
        "bare_step_ms": 1e3 * statistics.median(bare_t) / args.steps,
        "trainer_step_ms": 1e3 * statistics.median(trainer_t) / args.steps,
        "overhead_ratio_median": statistics.median(ratios),
        "overhead_ratios": ratios,
    }
    record["cpu"] = cpu
    rows.append({"device": "cpu", "precision": "fp32", "batch": args.batch_size, "bare ms/step": cpu["bare_step_ms"],
                 "trainer ms/step": cpu["trainer_step_ms"], "trainer / bare": cpu["overhead_ratio_median"]})  # fmt: skip

    if torch.cuda.is_available():
        dev = torch.device("cuda")
        name = torch.cuda.get_device_name(0)
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        for prec in ("bf16", "fp32"):
            c = cfg(
                device="cuda", precision=prec, batch_size=args.gpu_batch_size, channels_last=True
            )
            amp = torch.bfloat16 if prec == "bf16" else None
            bare_loop(c, dev, amp, True)  # warm-up (cuDNN autotuning)
            b = bare_loop(
                cfg(
                    device="cuda",
                    precision=prec,
                    batch_size=args.gpu_batch_size,
                    channels_last=True,
                ),
                dev,
                amp,
                True,
            )
            t = trainer_loop(
                cfg(
                    device="cuda",
                    precision=prec,
                    batch_size=args.gpu_batch_size,
                    channels_last=True,
                )
            )
            flops = step_flops(c, dev)
            ips = args.gpu_batch_size * args.steps / t
            frac = flops * args.steps / t / (peak * 1e12) if peak else None
            record[f"cuda_{prec}"] = {"device": name, "images_per_s": ips, "bare_images_per_s": args.gpu_batch_size * args.steps / b,
                                      "trainer_over_bare": t / b, "step_flops": flops, "peak_tflops": peak, "fraction_of_peak_bf16": frac}  # fmt: skip
            rows.append({"device": name, "precision": prec, "batch": args.gpu_batch_size, "bare ms/step": 1e3 * b / args.steps,
                         "trainer ms/step": 1e3 * t / args.steps, "trainer / bare": t / b, "images/s": ips,
                         "fraction of peak bf16": frac if frac is not None else "n/a"})  # fmt: skip
        keys = sorted(
            {k for r in rows for k in r}, key=lambda k: [*rows[-1]].index(k) if k in rows[-1] else 0
        )
        rows = [{k: r.get(k, "") for k in keys} for r in rows]

    print(json.dumps(record, indent=2))
    body = (
        f"Data `{args.data}`, joint mode, `ae` bottleneck, default model widths, {args.steps} steps, "
        f"{args.repeats} interleaved repeats on CPU (median). Trainer defaults: log every 10 steps, "
        "checkpoint every 100, NaN checks. Goal: trainer / bare <= 1.10 on CPU.\n\n"
        + markdown_table(rows)
        + f"\n\nCPU ratios per repeat: {', '.join(f'{r:.3f}' for r in ratios)}\n"
    )
    if not args.no_write:
        print(write_result("bench_trainer", "DAE trainer vs a bare PyTorch loop", body))


if __name__ == "__main__":
    main()
