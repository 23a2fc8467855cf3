#!/usr/bin/env bash
# One lease, end to end, on a fresh GPU machine (started detached: it outlives the device call that starts it):
#   setup -> [CALIBRATE=1: `calibrate`, the full grid, and plan the runs with that table] -> the five-run
#   benchmark on full-size checkpoint files -> [STEPS=1: the step costs of one denoising step (THG's ceiling)].
# Everything lands in $RES (default /tmp/res) as it is made; a later device call copies $RES to its $OUT.
#     setsid nohup bash benchmarks/gpu_calibrate_and_benchmark.sh > /tmp/session.log 2>&1 < /dev/null &
set -u
RES=${RES:-/tmp/res}
RUNS=${RUNS:-uncapped,8GB,6GB,12GB,cfg}
mkdir -p "$RES"
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
stamp "setup"
. benchmarks/gpu_env.sh && wait_nvdiffrast
TABLE=()
if [ "${CALIBRATE:-0}" = 1 ]; then
    stamp "calibrate" && date -u +%s > "$RES/calibrate.start"
    python3 cli.py calibrate --gpu 0 --work /tmp/cal --out "$RES/calibrated_table.json" > "$RES/calibrate.log" 2>&1
    stamp "calibrate exit $?"
    cp /tmp/cal/measurements.json "$RES/measurements.json" 2>/dev/null
    TABLE=(--table "$RES/calibrated_table.json")
fi
stamp "benchmark $RUNS"
python3 benchmarks/run_benchmark.py --runs "$RUNS" --profile full-files --weights-cache /tmp/up2you-full-files \
    "${TABLE[@]}" --work /tmp/bw --out "$RES/bench" > "$RES/bench.log" 2>&1
stamp "benchmark exit $?"
if [ "${STEPS:-0}" = 1 ]; then
    OUT="$RES/steps" && mkdir -p "$OUT" && OUT="$OUT" python3 benchmarks/gpu_step_costs.py > "$RES/steps.log" 2>&1
    stamp "step costs exit $?"
fi
touch "$RES/DONE"
