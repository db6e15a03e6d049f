"""Checkpoint interop: facebookresearch/DiT checkpoints and diffusers transformers <-> condiff models.

Layout: `rules` (the rule engine), one module per source format (`dit_original`, `diffusers_dit`,
`diffusers_pixart`, `diffusers_sd3`, `diffusers_unet`), `diffusers` (their registry and the object-level
entry points), `cli` (`condiff convert`, the only module that writes checkpoints). All but `cli` import only
`condiff.models`.

Supported (a converted model computes the source model's function to float32 rounding, tests/test_convert.py):
  * facebookresearch/DiT `.pt` checkpoints (a raw state dict, or a training checkpoint {"model", "ema", ...})
    -> `dit` (one way: it is a reference release). Its fixed `pos_embed` (an `arange` sin-cos grid) becomes
    `pos_grid="arange"`; its learned-sigma output (8 channels) keeps the epsilon half (the paper trains without
    learned sigma), or all of it with `keep_sigma=True` (`learn_sigma=True`: forward still returns eps).
  * diffusers `DiTTransformer2DModel` <-> `dit`; `PixArtTransformer2DModel` <-> `pixart-alpha` (text);
    `SD3Transformer2DModel` <-> `mmdit` with the full SD3 dual stream (`context_stream="full"`, pooled
    projection, `pos_grid="sd3"`); `UNet2DConditionModel` with SDXL's block types (linear projections,
    "projection" class embedding = the pooled vector) <-> `unet-sdxl` (text). Both directions;
    `from_diffusers` / `to_diffusers` work on diffusers model objects (diffusers needed),
    `diffusers_to_condiff` / `condiff_to_diffusers` on plain (config, state dict).

Conventions: every conversion is a table of `Rule`s (ours <- theirs), run forwards or backwards, so the two
directions cannot drift apart. Converted models have `control="none"` (the sources have no control embedder);
the timestep convention is the same (DDPM t in [0, 1000)). What the models compute is the source's function,
not its training objective: SD3 predicts a flow velocity, the others epsilon.

Known deviations (not ours to fix): diffusers' `DiTTransformer2DModel` normalises its MLP input with
`norm_eps` (1e-5 by default) where the original DiT (and condiff) uses 1e-6; converting such a model is exact
for `norm_eps=1e-6` and differs by a relative ~2e-6 otherwise (tests: < 1e-3). SD3's last block keeps a
context-query RMSNorm weight that no output depends on (context_pre_only); condiff has none: it is dropped,
and written back as ones.

CLI (`condiff convert`):
  condiff convert dit-original CKPT.pt OUT_DIR [--keep-sigma] [--num-heads H]
  condiff convert from-diffusers DIFFUSERS_MODEL_DIR OUT_DIR      (config.json + *.safetensors)
  condiff convert to-diffusers CONDIFF_CHECKPOINT OUT_DIR          (writes config.json + safetensors)
OUT_DIR of the first two is a condiff checkpoint (step 0) that `condiff sample` loads.
"""

from condiff.interop.diffusers import (condiff_to_diffusers, diffusers_to_condiff, from_diffusers, read_diffusers_dir,
                                       to_diffusers)
from condiff.interop.dit_original import facebook_dit_to_condiff, load_facebook_dit

__all__ = ["load_facebook_dit", "facebook_dit_to_condiff", "from_diffusers", "to_diffusers", "diffusers_to_condiff",
           "condiff_to_diffusers", "read_diffusers_dir"]
