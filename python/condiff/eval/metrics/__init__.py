"""Metrics as plug-ins of `condiff eval`: one protocol (`base.Metric`: update with a batch and its global
sample indices, state / merge across ranks, compute), implemented by

  fid.Fid             FID_train / FID_val against cached reference statistics (Inception or custom features)
  clip.ClipScore      mean CLIP score, 100 x cosine clipped at 0
  lpips.LpipsSize     LPIPS size-diversity over size sweeps
  align.Align         shapes alignment accuracies (analytic detector)
  shapes_fd.ShapesFd  Frechet distance on a small shapes-trained CNN's features against rendered shapes
  content_change.ContentChange  content change across a size sweep (detected objects + low-pass pixels)

and fed by `condiff.eval.__main__`'s one generation loop (`base.Stream` says which samples each needs).
`grid.Grid` gathers the run's image grid the same way.
"""

from condiff.eval.metrics.base import IndexedState, Metric, Stream

__all__ = ["IndexedState", "Metric", "Stream"]
