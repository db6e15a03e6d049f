"""The import layers of condiff (the one table; `tests/test_layers.py` enforces it on every import,
lazy ones included).

A module may import modules of its own package, of any LOWER layer, and of `FOUNDATION`; never a higher
layer nor a sibling package of its own layer (train, eval and repro do not import each other: what two of
them share lives below them). The most specific entry names a module's place.
"""

from __future__ import annotations

# layer -> top-level names (packages or modules) under `condiff`, lowest first
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("ops", ("ops",)),
    ("core", ("conditioning", "models", "diffusion", "flops")),  # flops: counts model FLOPs, imports models only
    ("data", ("data",)),
    ("io", ("io",)),
    ("interop", ("interop",)),  # checkpoint conversion: reads models, writes through io
    ("inference", ("inference",)),
    ("apps", ("train", "eval", "repro")),
    ("cli", ("cli", "sample", "demo", "reports", "__main__", "layers")),
]

# leaf modules that import nothing from condiff: any layer may use them
FOUNDATION = ("io.atomic", "io.images", "io.shards", "distributed", "__init__")


def place(module: str) -> tuple[int, str] | None:
    """(layer index, owning entry) of a dotted module name under `condiff` (None: not in the table)."""
    name = module.removeprefix("condiff.").removeprefix("condiff")
    best: tuple[int, str] | None = None
    for rank, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if (name == entry or name.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (rank, entry)
    return best


def is_foundation(module: str) -> bool:
    name = module.removeprefix("condiff.")
    return name in FOUNDATION or module == "condiff"


def allowed(importer: str, imported: str) -> bool:
    """True when `importer` may import `imported` (dotted names under condiff)."""
    if is_foundation(imported):
        return True
    src, dst = place(importer), place(imported)
    if src is None or dst is None:
        return False
    if dst[0] < src[0]:
        return True
    return dst[0] == src[0] and (dst[1] == src[1] or LAYERS[src[0]][0] != "apps")
