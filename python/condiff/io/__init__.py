"""Files condiff reads and writes (one owner per format).

Modules (import each explicitly; this package imports nothing so that every layer can use its leaves):
  * `atomic`     - `atomic_write_bytes` / `atomic_write_text` / `atomic_path`: write beside, fsync, rename.
  * `shards`     - `expand_shards(spec)`: THE shard-spec grammar (loader, FID references, precompute).
  * `images`     - `IMAGE_EXTS` (the image-extension table) and `to_uint8` (float [-1, 1] -> uint8 HWC).
  * `checkpoint` - the run directory and checkpoint format, `CheckpointMeta` (typed meta.json).
`atomic`, `shards` and `images` import nothing from condiff (they sit below every layer, see
`condiff.layers`); `checkpoint` sits above `data` (it rebuilds models from their configs).
"""
