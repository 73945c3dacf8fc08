#!/usr/bin/env bash
# One accelerator session, as run on a lent H100/H200 (`device`): the
# paper-size model (configs/default.py) trained in four variants side by side on the one GPU, each
# under the same wall-clock budget, each variant's best weights exported for evaluation, then the
# GPU benchmarks in the time left before DEADLINE.
#
# Variants (the ablation chain of MODEL_CARD.md; all hold out the NP lab for validation):
#   paper  configs/default.py as is (the paper's recipe: raw frame, dropout 0.1, Adam 2e-4, batch 64)
#   canon  + canonical pose (principal-axes frame) and no dropout
#   real   + real across-animal pairs (half of the pairs), best weights chosen on real NP pairs
#   color  + NeuroPAL color as a network input
#   dbias  canon + the distance-biased attention (model.distance_bias) of configs/small.py
#   fast   dbias + a moving average of the weights (train.ema_decay 0.999), as configs/small.py
#   fastreal / fastcolor  fast + real across-animal pairs (/ + color input): the candidates for the
#          next shipped default / color models (from scratch: the distance bias changes the network)
#
# Usage (repository root; data under $FDNC_SHARED/data/wormnd):
#   FDNC_SHARED=... OUT=runs/gpu_session bash benchmarks/gpu_session.sh
# Knobs: TRAIN_MINUTES (per variant, default 4.5; with BENCH_FIRST=1 at most what the DEADLINE
#   leaves after the benchmark), BASE_CONFIG (default configs/default.py),
#   VARIANTS (default "paper canon real color"), BENCH (1: run the benchmarks at the end), WHEELS (a
#   folder of wheels to use when the installed flax/optax/orbax fail the smoke run), BENCH_FIRST (1:
#   matching_bench (MATCHING_CAP seconds) and predict_bench (PREDICT_CAP seconds) before the
#   training; simulate_bench after it only if time is left), FROM_SHIPPED
#   (1: the real and color variants start from the bundled "default" / "color" weights —
#   train.init_weights — so a new session continues their training instead of starting over),
#   SMOKE (0: skip the 10-step smoke run, e.g. in a second call on the same machine),
#   PREDICT_ARGS (e.g. --accelerator_sweep_only: predict_bench's GPU sweep alone; add --quick for
#   its default-solver rows only), BENCHES (which benchmarks BENCH=1 runs: default
#   "simulate matching predict").
# VARIANTS="" runs no training (benchmarks only). Two calls on one lease, e.g.:
#   BENCH=0 VARIANTS="real color dbias" ...   then   VARIANTS="" BENCH_FIRST=1 SMOKE=0 ...
# Results in $OUT: <variant>.npz (best weights), logs.tar.gz (metrics, logs), session.log.
set -u
OUT=${OUT:-runs/gpu_session}
TRAIN_MINUTES=${TRAIN_MINUTES:-4.5}
BASE_CONFIG=${BASE_CONFIG:-configs/default.py}
VARIANTS=${VARIANTS-"paper canon real color"}  # set but empty: no training
BENCH=${BENCH:-1}
BENCH_FIRST=${BENCH_FIRST:-0}
PREDICT_CAP=${PREDICT_CAP:-240}  # predict_bench times predict_batch by chunk, solver and orientation mode too
TRAIN_OVERHEAD=${TRAIN_OVERHEAD:-110}  # seconds: start-up, final validation and export of a run
FROM_SHIPPED=${FROM_SHIPPED:-0}
WHEELS=${WHEELS:-_carry/whl}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/fdnc_gpu_session}
DEADLINE=${DEADLINE:-570}  # seconds after the start: the benchmarks (run last) end by then
SIMULATE_CAP=${SIMULATE_CAP:-90}
MATCHING_CAP=${MATCHING_CAP:-120}
SMOKE=${SMOKE:-1}
PREDICT_ARGS=${PREDICT_ARGS:-}
BENCHES=${BENCHES:-"simulate matching predict"}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
say() { echo "[$(date +%T)] $*"; }

smoke() {
  rm -rf "$WORK/smoke"
  timeout 240 $PY -m fdnc_jax.cli.train --config=configs/tiny.py --workdir="$WORK/smoke" \
    --config.train.steps=10 > "$WORK/smoke.log" 2>&1
}

say "start; $(nvidia-smi -L 2>/dev/null | head -1)"
if [ -d "$WHEELS" ] && ls "$WHEELS"/ml_collections*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" \
    "$WHEELS"/ml_collections*.whl && export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
$PY -c "import jax, flax, optax, orbax.checkpoint as o, ml_collections; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"
if [ "$SMOKE" != 1 ]; then
  say "smoke run skipped"
elif ! smoke; then
  say "smoke run failed with the installed packages:"; tail -20 "$WORK/smoke.log"
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site2" "$WHEELS"/*.whl
  export PYTHONPATH="$WORK/site2:$PYTHONPATH"
  smoke || { say "smoke run failed with the carried wheels too:"; tail -30 "$WORK/smoke.log"; exit 1; }
fi
[ "$SMOKE" = 1 ] && say "smoke run ok"

shipped() { [ "$FROM_SHIPPED" = 1 ] && echo "--config.train.init_weights=$1"; }

variant_flags() {
  local canon="--config.model.canonical_pose=True --config.model.dropout=0.0"
  local real="--config.sim.real_pair_fraction=0.5 --config.train.select_on=real_accuracy"
  local color="--config.model.color_features=3 --config.sim.color_neuron_jitter=0.3"
  local fast="--config.model.distance_bias=True --config.train.ema_decay=0.999"
  case "$1" in
    paper) echo "" ;;
    canon) echo "$canon" ;;
    real) echo "$canon $real $(shipped default)" ;;
    color) echo "$canon $real $color $(shipped color)" ;;
    dbias) echo "$canon --config.model.distance_bias=True" ;;
    fast) echo "$canon $fast" ;;  # configs/fast.py
    fastreal) echo "$canon $fast $real" ;;
    fastcolor) echo "$canon $fast $real $color" ;;
  esac
}

left() { echo $((DEADLINE - SECONDS)); }
wanted() { [[ " $BENCHES " == *" $1 "* ]]; }
predict_bench() {
  local cap=$1
  wanted predict || return 0
  say "predict_bench (${cap}s at most)"
  # shellcheck disable=SC2086
  timeout "$cap" $PY benchmarks/predict_bench.py $PREDICT_ARGS > "$WORK/predict_bench.txt" 2>&1
  grep -v -i warning "$WORK/predict_bench.txt"
}
matching_bench() {
  wanted matching || return 0
  say "matching_bench (${MATCHING_CAP}s at most)"
  timeout "$MATCHING_CAP" $PY benchmarks/matching_bench.py > "$WORK/matching_bench.txt" 2>&1
  grep -v -i warning "$WORK/matching_bench.txt"
}
if [ "$BENCH" = 1 ] && [ "$BENCH_FIRST" = 1 ]; then
  matching_bench
  predict_bench "$PREDICT_CAP"
  TRAIN_MINUTES=$($PY -c "print(round(max(0.5, min($TRAIN_MINUTES, ($(left) - $TRAIN_OVERHEAD) / 60)), 2))")
fi

if [ -n "${VARIANTS// /}" ]; then
  n=$(echo $VARIANTS | wc -w)
  frac=$($PY -c "print(round(0.9 / $n, 3))")
  say "training variants [$VARIANTS], $TRAIN_MINUTES min each, side by side (GPU memory fraction $frac)"
  pids=""
  for v in $VARIANTS; do
    rm -rf "$WORK/$v"
    # shellcheck disable=SC2046
    XLA_PYTHON_CLIENT_MEM_FRACTION=$frac timeout $($PY -c "print(int($TRAIN_MINUTES * 60 + $TRAIN_OVERHEAD - 40))") \
      $PY -m fdnc_jax.cli.train --config="$BASE_CONFIG" --workdir="$WORK/$v" \
      --config.data.sources="$FDNC_SHARED/data/wormnd/*.npz" --config.train.progress_bar=False \
      --config.train.max_minutes="$TRAIN_MINUTES" $(variant_flags "$v") > "$WORK/$v.log" 2>&1 &
    pids="$pids $!"
  done
  for p in $pids; do wait "$p" || say "a training process exited with status $?"; done
  say "training done"

  for v in $VARIANTS; do
    echo "== $v"; grep -v -i "warning" "$WORK/$v.log" | tail -4
    $PY - "$WORK/$v" "$OUT/$v.npz" <<'EOF' || say "export of $v failed"
import json, sys
from fdnc_jax.checkpoint import load_checkpoint, save_weights
workdir, dest = sys.argv[1:]
records = [json.loads(x) for x in open(f"{workdir}/metrics.jsonl")]
last = records[-1]
model = load_checkpoint(workdir)
save_weights(model, dest)
print(f"steps {last['step']} in {last['elapsed_s']:.0f} s ({last['step'] / last['elapsed_s']:.1f} steps/s); "
      f"best {model.info}; last validation: "
      + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if "accuracy" in k))
EOF
  done
fi
if [ "$BENCH" = 1 ] && wanted simulate && [ "$(left)" -gt 30 ]; then
  say "simulate_bench (${SIMULATE_CAP}s at most)"
  timeout $(( $(left) < SIMULATE_CAP ? $(left) : SIMULATE_CAP )) $PY benchmarks/simulate_bench.py \
    > "$WORK/simulate_bench.txt" 2>&1
  grep -v -i warning "$WORK/simulate_bench.txt"
fi
if [ "$BENCH" = 1 ] && [ "$BENCH_FIRST" != 1 ] && [ "$(left)" -gt 30 ]; then
  matching_bench
  predict_bench "$(left)"
fi
tar czf "$OUT/logs.tar.gz" -C "$WORK" --exclude='checkpoints' --exclude='site*' --exclude='smoke' .
say "end"
