#!/usr/bin/env bash
# Wait inside one device call for a detached gpu_calibrate_and_benchmark.sh, copying what it has made into $OUT
# every few seconds, so that a call stopped at its limit (rc 124: the device time left can be shorter than the
# timeout asked for) still brings back the partial results and logs. Stops early once $RES/DONE exists.
#     bash benchmarks/lease_poll.sh 560        # seconds to wait at most; RES defaults to /tmp/res
set -u
LIMIT=${1:-560}
RES=${RES:-/tmp/res}
copy() {
    for f in /tmp/session.log "$RES"/*.log "$RES"/bench/benchmark.json "$RES"/bench/benchmark.partial.json \
             "$RES"/bench/benchmark.png "$RES"/calibrated_table.json; do
        [ -f "$f" ] && cp "$f" "$OUT/" 2>/dev/null
    done
    return 0
}
T0=$(date +%s)
while [ $(( $(date +%s) - T0 )) -lt "$LIMIT" ] && [ ! -f "$RES/DONE" ]; do
    copy
    sleep 10
done
copy
tail -n 5 /tmp/session.log 2>/dev/null || true
