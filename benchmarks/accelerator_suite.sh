#!/usr/bin/env bash
# Every accelerator number of BENCHMARKS.md section 7 in one run: pre-training
# steps (ResNet-50 and -152, 128 and 256 pairs, bf16), the fine-tuning step,
# evaluation and the PyTorch reference (eager and torch.compile) on the same
# GPU, under 8 minutes on one H200 (benchmarks/accelerator_suite.py).
#
# 1. Here, once: fetch the one wheel the GPU image lacks into .whl/ (git-ignored),
#    check that the tree and the wheels fit the device tool's 64 MiB, and print
#    the call:
#      PYTHON=.venv/bin/python bash benchmarks/accelerator_suite.sh --fetch_wheels
# 2. On the GPU machine, through the device tool:
#      run(command="bash benchmarks/accelerator_suite.sh", carry=[".whl"],
#          timeout_s=540)
#    It prints progress lines and, last, the summary table as JSON, and writes
#    $OUT/accelerator_suite.json (every part's full JSON). Options go to the
#    driver: --budget_s (default 420), --only PART..., --out PATH.
# 3. CPU smoke check (tiny sizes, PyTorch on the CPU; tests/test_benchmarks.py):
#      PYTHON=.venv/bin/python bash benchmarks/accelerator_suite.sh --smoke \
#          --out /tmp/suite.json
#
# The GPU image has jax, flax, optax, orbax-checkpoint, torch and opencv, but
# not ml-collections, grain, tensorflow-datasets or array-record. The parts
# feed synthetic batches and the package imports grain and TFDS only where a
# run reads data, so only ml-collections (pure Python) travels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(ml-collections==1.1.0)
LIMIT=$((64 * 1024 * 1024))

if [[ "${1:-}" == "--fetch_wheels" ]]; then
  mkdir -p .whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "${WHEELS[@]}"
  # What travels: tracked and untracked-not-ignored files, and the wheels.
  tree=$(git ls-files -z --cached --others --exclude-standard \
         | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}' \
         || true)
  wheels=$(stat -c %s .whl/* | awk '{s += $1} END {print s + 0}')
  echo "travels: tree $tree B + .whl $wheels B = $((tree + wheels)) B of $LIMIT B"
  if ((tree + wheels >= LIMIT)); then
    echo "accelerator_suite.sh: the tree and .whl/ exceed the device tool's 64 MiB" >&2
    exit 1
  fi
  echo 'run(command="bash benchmarks/accelerator_suite.sh", carry=[".whl"], timeout_s=540)'
  exit 0
fi

# The wheels only where they are missing (the GPU image); a venv has them.
# Not fatal: without them every part records its ImportError in the JSON.
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl \
    || echo "accelerator_suite.sh: no wheels installed (carry .whl?)" >&2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The package from this checkout (the GPU machine has it installed nowhere).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "$PY" benchmarks/accelerator_suite.py "$@"
