#!/usr/bin/env bash
# One call on a lent GPU machine: build the extension with its CUDA kernels, run the test suite
# (GPU tests included) and the benchmarks, and leave logs and JSON under $OUT.
# Usage: bash bench/gpu_session.sh [tests|bench|all]   (OUT defaults to bench/out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
what="${1:-all}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (liger-kernel): pure Python
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts under bench/ import this checkout
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
# Incremental (ninja): a warm machine that built before only recompiles what changed.
(time python3 setup.py build_ext --inplace) > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python3 -c "import kdkernels; print('cuda backends:', kdkernels.backends.available('cuda'))" 2>&1 | tee -a "$OUT/env.txt"
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q ${PYTEST_ARGS:--x} --timeout 120 ${TESTS:-tests} > "$OUT/pytest.log" 2>&1
  echo "pytest exit $?"; tail -25 "$OUT/pytest.log"
fi
if [ "$what" = tune ] || [ "$what" = all ]; then
  timeout 200 python3 bench/tune_triton.py --out "$OUT/tune_triton.json" 2>&1 | tail -80
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 bench/bench_kd_loss.py --device cuda --out "$OUT/kd_loss_h100.json" ${BENCH_ARGS:-} 2>&1 | tail -60
fi
