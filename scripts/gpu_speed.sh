#!/usr/bin/env bash
# The GPU speed figures in one call, on a machine with a CUDA GPU, from the repository root:
#   1. `python -m raydistill.bench --gpu`: 3 ResNet-32 peers (DML, batch 128, bf16, 100 classes) sharing the GPU on
#      synthetic CIFAR-shaped data; rows: the plain PyTorch reference loop, in-process, object store, collective,
#      and in-process and collective with the peers stacked;
#   2. the reference loop with one model alone (`python -m raydistill.bench.reference_loop --standalone`);
#   3. scripts/gpu_checks.py: no host sync in a call of steps (loop and stacked peers), stacked against loop, and
#      train.compile=graphs against eager.
# Output on the console and, when OUT is set, in $OUT/bench-gpu.txt. Each part is bounded by `timeout`; the whole
# takes about 2-5 minutes on one large GPU. STEPS (100) and REPEATS (3) change the timed steps.
#
# Ray must be importable first. Where the machine has none, the caller installs the wheels kept in .whl/:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
set -u -o pipefail

PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-100}
REPEATS=${REPEATS:-3}
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-390}
STANDALONE_TIMEOUT_S=${STANDALONE_TIMEOUT_S:-90}
CHECKS_TIMEOUT_S=${CHECKS_TIMEOUT_S:-240}
report=${OUT:+$OUT/bench-gpu.txt}
report=${report:-/dev/null}

say_exit() {   # name, exit status, time limit
    [ "$2" -eq 0 ] || echo "$1: exit $2$([ "$2" -eq 124 ] && echo ": over ${3}s")"
}

{
    echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) raydistill $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    "$PYTHON" -c 'import torch, ray
print("torch", torch.__version__, "CUDA", torch.version.cuda, "ray", ray.__version__)'
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo "gpu_speed.sh: needs a CUDA device, and torch sees none here"
        exit 2
    fi

    echo "== raydistill bench --gpu --steps $STEPS --repeats $REPEATS"
    timeout --kill-after=20 "$BENCH_TIMEOUT_S" "$PYTHON" -m raydistill.bench --gpu --steps "$STEPS" --repeats "$REPEATS"
    bench=$?
    say_exit bench "$bench" "$BENCH_TIMEOUT_S"

    echo "== reference loop, one model alone"
    timeout --kill-after=20 "$STANDALONE_TIMEOUT_S" "$PYTHON" -m raydistill.bench.reference_loop --standalone \
        --steps "$STEPS" --repeats "$REPEATS"
    standalone=$?
    say_exit standalone "$standalone" "$STANDALONE_TIMEOUT_S"
    echo "== device-path checks: host syncs, stacked against loop, train.compile=graphs"
    timeout --kill-after=20 "$CHECKS_TIMEOUT_S" "$PYTHON" scripts/gpu_checks.py --steps 30
    checks=$?
    say_exit checks "$checks" "$CHECKS_TIMEOUT_S"
    [ "$bench" -eq 0 ] && [ "$standalone" -eq 0 ] && [ "$checks" -eq 0 ]
} 2>&1 | tee "$report"
