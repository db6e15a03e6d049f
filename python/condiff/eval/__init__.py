"""Evaluation with a pinned, reproducible protocol (paper Sec. 3 "Evaluation").

Modules (each importable on its own; heavy libraries load lazily):
  features    FID features from memory with clean-fid's conventions (Inception-V3 or a custom extractor)
  statistics  FID statistics (mean, covariance, streaming moments) and the Frechet distance
  reference   FID reference statistics of a shard set, cached by content hash
  clip_score  CLIP score = max(100 cos, 0) from a local Hugging Face CLIP directory
  lpips_size  LPIPS size-diversity protocol (ten size conditionings, same seed / prompt / noise)
  align       analytic shapes-alignment detector (colour, shape, left/right) - `align.score_images`
  generate    in-memory sampling split across ranks, deterministic per global sample index
  manifest    the record every result carries (JSON + Markdown + image grid)
  metrics/    the metric protocol (update by sample index, state / merge across ranks, compute) and its
              plug-ins: fid, clip, lpips, align (plus the run's image grid)
`condiff eval` / `torchrun -m condiff.eval` (`__main__.py`) ties them together: set-up, one generation
loop feeding every metric, one gather / merge, compute, report.
"""
