#!/usr/bin/env bash
# One call on a lent GPU machine: build the extension with its CUDA kernels, run the GPU tests
# (every test parametrised on CUDA, marked gpu, or of a Triton kernel) and the GPU benchmarks, and leave logs and JSON
# under $OUT (at most 8 files come back from the device tool). Every stage has its own time limit
# and a failing stage does not stop the next, so one call gives all it can.
# Usage: bash bench/gpu_session.sh [tests|bench|all]   (OUT defaults to bench/out)
# Knobs: BUILD_TIMEOUT, TEST_TIMEOUT, BENCH_TIMEOUT (seconds), PYTEST_ARGS, TESTS, BENCH_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
what="${1:-all}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
# Each pytest-xdist worker compiles with Inductor: keep its compile pool small.
export TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-2}"
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (liger-kernel): pure Python
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts under bench/ import this checkout
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python3 -c "import liger_kernel; print('liger-kernel', getattr(liger_kernel, '__version__', 'installed'))" 2>&1 | tail -1
} 2>&1 | tee "$OUT/env.txt"
# Incremental (ninja): a warm machine that built before only recompiles what changed.
start=$SECONDS
timeout "${BUILD_TIMEOUT:-240}" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - start)) s" | tee -a "$OUT/env.txt"
python3 -c "import kdkernels; print('cuda backends:', kdkernels.backends.available('cuda'))" 2>&1 | tee -a "$OUT/env.txt"
if [ "$what" = tests ] || [ "$what" = all ]; then
  start=$SECONDS
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -rfEs ${PYTEST_ARGS:--n 6} --timeout 150 -k "cuda or gpu or triton" ${TESTS:-tests} > "$OUT/pytest.log" 2>&1
  echo "pytest exit $? after $((SECONDS - start)) s"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -40; tail -3 "$OUT/pytest.log"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  # Interleaved candidates (the harness rotates them run by run); each script stops starting
  # configurations at its --time-budget and keeps what it measured in its JSON.
  budget="${BENCH_TIMEOUT:-150}"
  {
    timeout "$budget" python3 bench/bench_kd_loss.py --device cuda --shapes 8192x128256 4096x32000 \
      --dtypes bf16 fp32 --time-budget $((budget * 5 / 10)) --out "$OUT/kd_loss_cuda.json" ${BENCH_ARGS:-}
    timeout $((budget / 4)) python3 bench/bench_kl_div.py --device cuda --shapes 8192x128256 --dtypes bf16 \
      --time-budget $((budget / 6)) --out "$OUT/kl_div_cuda.json"
    timeout $((budget / 4)) python3 bench/bench_weighted_soft_ce.py --device cuda --shapes 8192x128256 --dtypes bf16 \
      --time-budget $((budget / 6)) --out "$OUT/weighted_soft_ce_cuda.json"
  } > "$OUT/bench.log" 2>&1
  grep -vE "^\s*$" "$OUT/bench.log" | tail -60
fi
