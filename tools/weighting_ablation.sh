#!/usr/bin/env bash
# Loss-weighting ablation on the shapes demo (issue item: App. C's weighting in its EDM reading).
# Trains `condiff demo` (mmdit-ours-tiny, 16 px shapes, text-conditioned) at equal steps with each weighting
# and seed, two runs at a time on one thread each, and prints one line per run plus a mean per weighting:
# final loss, s/step and the shapes alignment score (condiff.eval.align) of the EMA samples.
#   usage: tools/weighting_ablation.sh [STEPS=200] [OUT=/tmp/weighting_ablation] [SAMPLE_STEPS=25]
# Runs from the repository root with PYTHONPATH=python (or condiff installed).
set -euo pipefail
STEPS=${1:-200}
OUT=${2:-/tmp/weighting_ablation}
SAMPLE_STEPS=${3:-25}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
jobs=()
for seed in 0 1; do
  for w in eps-inv-snr edm min-snr-gamma; do jobs+=("$w $seed"); done
done
printf '%s\n' "${jobs[@]}" | xargs -P 2 -L 1 bash -c \
  'python -m condiff demo --out "'"$OUT"'/$0-s$1" --steps '"$STEPS"' --seed $1 --weighting $0 --threads 1 --fresh --quiet \
   --sample-steps '"$SAMPLE_STEPS"' \
   > "'"$OUT"'/$0-s$1.log" 2>&1'
python - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
rows = {}
for rep in sorted(Path(sys.argv[1]).glob("*/report.json")):
    r = json.loads(rep.read_text())
    a = r["alignment"]
    rows.setdefault(r["weighting"], []).append(a["overall"])
    print(f"| {r['weighting']} | {r['seed']} | {r['steps']} | {r['final_loss']:.4f} | {r['sec_per_step']:.3f} | "
          f"{a['colour']:.3f} | {a['shape']:.3f} | {a['relation']:.3f} | {a['overall']:.3f} |")
for w, v in rows.items():
    print(f"| {w} | mean of {len(v)} | | | | | | | {statistics.mean(v):.3f} |")
PY
