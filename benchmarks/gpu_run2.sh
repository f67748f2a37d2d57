#!/bin/bash
# Second, short device run (after gpu_run.sh): kill-and-resume on CUDA, the AMP paths not reached
# before, and the trainer's tests on the GPU. Writes OUT/all2.tgz.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
W=/tmp/o; mkdir -p $W
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl > $W/pip.log 2>&1 || { cat $W/pip.log; exit 1; }
G="python3 benchmarks/gpu_checks.py --out $W --quick"
T=${PAR_TIMEOUT:-55}
(timeout $T python3 -m pytest -q -n 4 --dist loadfile -p no:cacheprovider -rfEs tests/test_dae.py > $W/tests_dae.log 2>&1; echo "pytest rc $?" >> $W/tests_dae.log) &
(RESUME_STEPS=100,100 timeout $T $G resume --summary s_r > /dev/null 2>&1) &
(timeout $T $G train --summary s_t --only joint-kl-fp16,joint-gan-fp16,dae-gan-bf16,joint-clip-fp16 > /dev/null 2>&1) &
wait
tar czf $OUT/all2.tgz -C $W .
tail -4 $W/tests_dae.log; cat $W/resume.log | grep '^{'
