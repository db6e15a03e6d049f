"""Data pipeline: webdataset shards in, training batches out.

  loader.py       `ShardLoader`: streaming reader (split over ranks/workers, seeded shuffle, exact resume,
                  bad samples skipped and counted), batch format of docs/ARCHITECTURE.md
  transforms.py   crop strategies (global / local / mix / center) + flip, recording `Cond`'s control metadata
  conditions.py   condition dropout for guidance (Eq. 2) and `build_cond(batch) -> Cond`
  autoencoder.py  pixels / diffusers AutoencoderKL (`build_autoencoder`)
  shapes.py       the built-in procedural `shapes` dataset, its vocabulary and caption grammar; skimage photos
  make_shards.py  `condiff make-shards`    precompute.py  `condiff precompute`    writer.py  atomic shard writer

Modules are imported explicitly (`from condiff.data import shapes`), so importing the package stays cheap.
"""
