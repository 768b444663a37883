#!/usr/bin/env bash
# Every check that needs a GPU, in one run sized for a short lease on a GPU machine:
#
#     bash benchmarks/cuda_run.sh DATA [OUT]     # DATA: a prepared dataset (python -m training.prepare)
#
# 1. the CUDA tests (tests/test_cuda.py: invariance, bf16, compile, resume, DDP, NCCL);
# 2. benchmarks.gather_backward (the decoder's one-hot backward against scatter_add and the
#    segment sum, fp32 and bf16) and benchmarks.train_step on CUDA (ours against the naive decoder, small and
#    default) at 2 and at 8 windows per step;
# 3. benchmarks.train_throughput on DATA at default: fp32 and bf16 (profiled), each against
#    its -conv twin (the decoder's earlier channel-major forward), the same at 32 windows per
#    step, bf16 with train.deterministic (a process per variant, so that the cuBLAS workspace
#    setting does not leak into the others), and bf16 under torch.compile against its -conv
#    twin (recompilations logged, profiled);
# 4. the whole float64 invariance grid on the GPU (python -m training.invariance --device cuda).
# STAGES="pytest compile" runs only the stages named (env gather_backward pytest train_step
# train_step_w8 throughput throughput_w32 deterministic compile invariance). Each stage has its own time
# limit and log under OUT (default: $OUT, else artifacts/cuda_run); a failing stage does not
# stop the later ones. The limits add up to more than one 600 s device call: name a subset of
# STAGES per call. Exit status: 0 all stages passed, 1 some failed, 2 usage error.
set -u
data=${1:?usage: cuda_run.sh DATA [OUT]}
out=${2:-${OUT:-artifacts/cuda_run}}
py=${PYTHON:-python3}
if [ ! -f "$data/index.json" ]; then
    echo "error: $data is not a prepared dataset (python -m training.prepare --out $data)" >&2
    exit 2
fi
all_stages="env gather_backward pytest train_step train_step_w8 throughput throughput_w32 deterministic compile invariance"
for name in ${STAGES:-}; do
    if [[ " $all_stages " != *" $name "* ]]; then
        echo "error: unknown stage '$name' in STAGES (stages: $all_stages)" >&2
        exit 2
    fi
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout -k 15 "$limit" "$@" >"$out/$name.txt" 2>&1  # -k: a stage deaf to TERM is killed
    local rc=$?
    tail -n 25 "$out/$name.txt"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

want() { [ -z "${STAGES:-}" ] || [[ " $STAGES " == *" $1 "* ]]; }
bench=("$py" -m benchmarks.train_throughput --data "$data")

want env && stage env 30 bash -c 'nvidia-smi && "$0" -c "import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version(), torch.cuda.get_device_name(0))"' "$py"
want gather_backward && stage gather_backward 60 bash -c 'rc=0; for d in float32 bfloat16; do "$0" -m benchmarks.gather_backward --dtype $d || rc=1; done; exit $rc' "$py"
want pytest && stage pytest 240 "$py" -m pytest -m gpu tests/test_cuda.py -v -s -p no:cacheprovider
want train_step && stage train_step 90 "$py" -m benchmarks.train_step --devices cuda
want train_step_w8 && stage train_step_w8 90 "$py" -m benchmarks.train_step --devices cuda --windows 8
want throughput && stage throughput 200 "${bench[@]}" --variants fp32 fp32-conv bf16 bf16-conv --steps 15 --skip 5 --profile 2
want throughput_w32 && stage throughput_w32 90 "${bench[@]}" --variants fp32 bf16 --windows 32 --steps 15 --skip 5
want deterministic && stage deterministic 150 bash -c 'rc=0; for v in bf16-deterministic bf16-deterministic-conv bf16; do "$@" --variants $v --steps 15 --skip 5 || rc=1; done; exit $rc' _ "${bench[@]}"
want compile && stage compile 300 env TORCH_LOGS=recompiles "${bench[@]}" --variants bf16-compile bf16-compile-conv --steps 12 --skip 8 --profile 1
want invariance && stage invariance 120 "$py" -m training.invariance --config tiny --device cuda
echo "stages failed: $failed"
[ "$failed" -eq 0 ]
