"""Sampling a trained (or zoo) model: the one path `condiff sample`, `condiff eval`, training previews and
the demo share.

  * `spec`     - `SamplingSpec` (sampler, steps, lambda, beta, size conditioning, seed, ...) and
                 `resolve(pipeline, spec) -> Resolved`: the ONE resolution of defaults (output resolution,
                 the lambda actually used after Eq. 4, spacing, schedule, size-conditioning mode).
  * `pipeline` - `Pipeline`: model + schedule + text encoder + autoencoder + checkpoint meta
                 (`Pipeline.from_checkpoint`, `Pipeline.from_zoo`), and its null / semantic conditions.
  * `generate` - `Generator`: images per global sample index, deterministic in the index.
  * `grid`     - `save_grid`: the PNG grid (+ its JSON record) every command writes.
Import the submodules explicitly (`from condiff.inference.spec import SamplingSpec`).
"""
