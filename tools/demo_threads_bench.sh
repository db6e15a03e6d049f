#!/usr/bin/env bash
# Issue 17 item 2: the demo's wall time on a quiet machine and next to one competing CPU-bound process,
# with the former fixed 2 intra-op threads ("before", --threads 2) and the measured choice ("after",
# the default: condiff.train.threads.ThreadTuner). Usage: tools/demo_threads_bench.sh [STEPS] [OUT]   (default 300 steps, /tmp/demo_threads)
# Prints one line per condition: wall seconds, s/step, threads used; the full report.json stays in OUT.
# The competitor is a pure-Python busy loop started 70 s before the demo so the 1-minute load average sees it.
set -euo pipefail
steps=${1:-300}
out=${2:-/tmp/demo_threads}
mkdir -p "$out"
run() {  # name, extra demo args
  local name=$1; shift
  local t0=$(date +%s.%N)
  python -m condiff demo --out "$out/$name" --steps "$steps" --fresh --quiet "$@" >"$out/$name.log" 2>&1
  local t1=$(date +%s.%N)
  python - "$out/$name/report.json" "$name" "$(echo "$t1 - $t0" | bc)" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c = r["threads_choice"]
how = [(p["step"], p["chose"], p["sec_per_step"]) for p in c.get("probes", [])] or c.get("rule")
print(f"{sys.argv[2]:<22} wall {float(sys.argv[3]):7.1f} s  {r['sec_per_step']:.3f} s/step  "
      f"threads at the end {r['threads']}  load {open('/proc/loadavg').read().split()[0]}  choices {how}")
PY
}
echo "# $(date -u +%F) $(nproc) cores, load before: $(cut -d' ' -f1-3 /proc/loadavg), steps=$steps"
run quiet-before --threads 2
sleep 60   # let the load average settle after the previous run
run quiet-after
python -c "while True: pass" & busy=$!
trap 'kill $busy 2>/dev/null' EXIT
sleep 70
run busy-before --threads 2
run busy-after
