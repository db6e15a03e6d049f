"""Atomic, resumable webdataset shard writing (shared by `make-shards` and `precompute`).

A shard is written to `<name>.tmp` with `webdataset.TarWriter` and renamed to `<name>` only when
complete, so a crash never leaves a truncated shard under a final name, and a rerun can skip the
shards that exist.
"""

from __future__ import annotations

import os

from webdataset import TarWriter


class ShardSetWriter:
    """Write samples (webdataset dicts with `__key__`) into `out_dir/<prefix>-%06d.tar`, `shard_size` per shard."""

    def __init__(self, out_dir: str, shard_size: int = 1000, prefix: str = "shard", start: int = 0, write_empty: bool = False):
        """start: index of the first shard; write_empty: close() writes an empty shard if nothing was written."""
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.shard_size, self.prefix, self.write_empty = out_dir, shard_size, prefix, write_empty
        self.shard, self.count, self.total = start, 0, 0
        self._writer: TarWriter | None = None
        self._tmp = ""
        self.paths: list[str] = []

    def path(self, index: int) -> str:
        return os.path.join(self.out_dir, f"{self.prefix}-{index:06d}.tar")

    def write(self, sample: dict) -> None:
        if self._writer is None:
            self._tmp = self.path(self.shard) + ".tmp"
            self._writer = TarWriter(self._tmp)
        self._writer.write(sample)
        self.count += 1
        self.total += 1
        if self.count == self.shard_size:
            self._finish()

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        os.replace(self._tmp, self.path(self.shard))
        self.paths.append(self.path(self.shard))
        self._writer, self.count = None, 0
        self.shard += 1

    def close(self) -> None:
        if self.total == 0 and self.write_empty and self._writer is None:
            self._tmp = self.path(self.shard) + ".tmp"
            self._writer = TarWriter(self._tmp)
        self._finish()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        elif self._writer is not None:  # leave no partial shard behind
            self._writer.close()
            os.remove(self._tmp)
