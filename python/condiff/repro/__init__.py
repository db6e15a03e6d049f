"""`condiff repro`: the paper's findings as experiments a laptop runs (specs in configs/repro/).

`spec` (the YAML experiment specs), `runner` (training and evaluation as `condiff train` / `condiff eval`
processes, J at a time, resumable), `stats` (t-intervals and verdicts), `report` (report.md/json, plots,
grids, docs/REPRODUCTION.md)."""
