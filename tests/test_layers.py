"""Imports flow one way (`condiff.layers`): every `import condiff...` of every module, lazy ones included."""

import ast
from pathlib import Path

import pytest

import condiff
from condiff import layers

ROOT = Path(condiff.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def condiff_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a condiff module in `path` (relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "condiff"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "condiff":
                continue
            for a in node.names:  # `from condiff.io import checkpoint` imports the submodule
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if (ROOT.parent / sub.replace(".", "/")).with_suffix(".py").is_file()
                            or (ROOT.parent / sub.replace(".", "/")).is_dir() else base))
    return out


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in sorted(ROOT.rglob("*.py"))
               if layers.place(module_name(p)) is None and not layers.is_foundation(module_name(p))]
    assert not missing, f"modules outside condiff.layers.LAYERS: {missing}"


def test_no_upward_or_sibling_import():
    bad = [f"{module_name(p)}:{line} imports {target}"
           for p in sorted(ROOT.rglob("*.py")) for line, target in condiff_imports(p)
           if not layers.allowed(module_name(p), target)]
    assert not bad, "imports against condiff.layers:\n" + "\n".join(bad)


@pytest.mark.parametrize("importer, imported, ok", [
    ("condiff.models.dit", "condiff.io.checkpoint", False),  # upward
    ("condiff.train.loop", "condiff.eval.align", False),  # sibling of the same layer
    ("condiff.demo", "condiff.eval.align", True),  # the cli layer may import anything below
    ("condiff.eval.__main__", "condiff.sample", False),  # eval -> cli
    ("condiff.data.loader", "condiff.io.shards", True),  # foundation leaf
    ("condiff.data.loader", "condiff.io.checkpoint", False),
    ("condiff.inference.pipeline", "condiff.io.checkpoint", True),
    ("condiff.interop.cli", "condiff.io.checkpoint", True),  # interop sits above io
    ("condiff.reports.table_a1", "condiff.flops", True),
])
def test_rule_table(importer, imported, ok):
    assert layers.allowed(importer, imported) is ok


def test_checker_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    fake = ROOT / "models" / "_layer_probe.py"
    fake.write_text("def f():\n    from condiff.train import loop\n\nfrom .posemb import sincos_pos_embed_2d\n")
    try:
        found = condiff_imports(fake)
    finally:
        fake.unlink()
    assert (2, "condiff.train.loop") in found and (4, "condiff.models.posemb") in found
    assert not layers.allowed("condiff.models._layer_probe", "condiff.train.loop")
