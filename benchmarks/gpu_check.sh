#!/usr/bin/env bash
# The GPU checks of docs/solvers.md#gpu-check in one run of under ten minutes on a machine with a CUDA device:
#   bash benchmarks/gpu_check.sh [results folder]         # default: $OUT, else gpu_check/
# It needs hcl installed (pip install -e .) and MNIST's raw files under $MNIST_ROOT/MNIST/raw (default: data).
# Each check writes <name>.txt to the results folder, with its exit status last; a failing check stops no other,
# and the script exits 1 when any failed. The limits add up to 570 s: within one 600 s command on the device.
set -uo pipefail
out=${1:-${OUT:-gpu_check}}
root=${MNIST_ROOT:-data}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0

check() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    local status=$?
    echo "exit $status" >>"$out/$name.txt"
    [ "$status" -eq 0 ] || failed=1
    tail -n 20 "$out/$name.txt"
}

check machine 30 bash -c 'nvidia-smi; python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"'
# the tests that run only where there is a CUDA device (skipped on the CPU machines)
check cuda_tests 180 python -m pytest -q -rs -p no:cacheprovider tests/test_admm.py tests/test_patterns.py \
    tests/test_datamodules.py tests/test_data_loaders.py -k "gpu or cuda"
# the ADMM where the CPU was measured (docs/solvers.md#admm): n = 2 000 and 10 000, 100 network patterns, c = 10
check monitor_10000 150 python benchmarks/mnist_monitor.py --root "$root" --device cuda --sizes 2000 10000 \
    --seeds 0 --steps 100 --methods admm --time-limit 60
# full MNIST with 100 network patterns, and the 1 000 of the target: the memory plan's choice (or its refusal)
check monitor_60000 210 bash -c "python benchmarks/mnist_monitor.py --root '$root' --device cuda --sizes 60000 \
    --seeds 0 --steps 0 --methods admm --time-limit 60 --memory-limit 120 && python benchmarks/mnist_monitor.py \
    --root '$root' --device cuda --sizes 60000 --hidden 1000 --seeds 0 --steps 0 --methods admm fista \
    --time-limit 60 --memory-limit 120"
exit "$failed"
