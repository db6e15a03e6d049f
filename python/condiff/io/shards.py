"""THE shard-spec grammar, used by the data loader, `condiff precompute` and FID reference sets.

A spec is a string or a list of strings. A string holds one or more items separated by `::` or by
commas outside braces; each item is
  * a brace expansion, `shard-{000000..000099}.tar` or `{train,val}.tar` (expanded first), then per result
  * a directory: every `*.tar` inside, sorted;
  * a glob (`*`, `?`, `[`): its matches, sorted;
  * a path: itself.
`~` is expanded. The result keeps the spec's order (duplicates dropped, first occurrence kept); every
item that matches no file is named in one FileNotFoundError.
"""

from __future__ import annotations

import glob
import os

import braceexpand


def split_spec(spec: str) -> list[str]:
    """Split a spec string at `::` and at commas outside braces."""
    items, depth, cur = [], 0, []
    for part in spec.split("::"):
        for ch in part:
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                items.append("".join(cur))
                cur = []
            else:
                cur.append(ch)
        items.append("".join(cur))
        cur, depth = [], 0
    return [s.strip() for s in items if s.strip()]


def expand_shards(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Shard paths named by `spec` (grammar in the module docstring)."""
    items = [s for x in spec for s in split_spec(str(x))] if isinstance(spec, (list, tuple)) else split_spec(str(spec))
    out: dict[str, None] = {}
    missing: list[str] = []
    for item in items:
        for path in braceexpand.braceexpand(item):
            path = os.path.expanduser(path)
            if os.path.isdir(path):
                found = sorted(glob.glob(os.path.join(path, "*.tar")))
            elif any(ch in path for ch in "*?["):
                found = sorted(p for p in glob.glob(path) if os.path.isfile(p))
            else:
                found = [path] if os.path.isfile(path) else []
            if not found:
                missing.append(path)
            out.update(dict.fromkeys(found))
    if missing:
        raise FileNotFoundError(f"no shard file matches {missing} (from shard spec {spec!r})")
    if not out:
        raise ValueError(f"shard spec {spec!r} names no shard")
    return list(out)
