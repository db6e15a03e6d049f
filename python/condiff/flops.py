"""Parameters and GFLOPs of every backbone beside the paper's Table A1 (numbers only; `condiff flops`, which
prints them with the notes, is `condiff.reports.table_a1`).

Protocol (Table A1's caption and App. "Computational costs"): batch 1; SD-VAE latents of 4 channels at
32 x 32 (256 px) and 64 x 64 (512 px); FLOPs = 2 x multiply-accumulates of every matmul and convolution,
the attention matmuls (QK^T and AV) included; elementwise ops, norms and softmax are not counted (the
convention of `torch.utils.flop_counter`, fvcore and DiT's Gflops). Conditioning: ImageNet = one class id;
CC12M = CLIP ViT-L/14-shaped text states (1, 77, 768) plus the pooled vector (1, 768).

Counting: each model is built on the meta device (no memory, no weights) and run once under
`torch.utils.flop_counter.FlopCounterMode`. On the meta device `F.scaled_dot_product_attention` decomposes
into two counted `bmm`s; on a real CPU it calls a fused kernel the counter does not know, for which we
register the counter's own SDPA formula (`_COUNTER_EXTRAS`), so counts agree on both devices.
Parameters: trainable parameters (`requires_grad`), i.e. fixed sin-cos position tables are not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from condiff.conditioning.cond import Cond

aten = torch.ops.aten



def _sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and AV of one SDPA call (the counter's own formula), from the argument shapes."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Fused SDPA kernels the counter does not map (the CPU flash kernel).
_COUNTER_EXTRAS = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flop}

RESOLUTIONS = (256, 512)
LATENT_CHANNELS, VAE_FACTOR = 4, 8
TEXT_TOKENS, TEXT_DIM, POOLED_DIM = 77, 768, 768  # CLIP ViT-L/14
DATASETS = {"class": "imagenet", "text": "cc12m"}

# Table A1 of the paper: backbone -> conditioning -> (params M, GFLOPs @256, GFLOPs @512).
PAPER_TABLE_A1: dict[str, dict[str, tuple[float, float, float]]] = {
    "unet-sdxl": {"class": (401.75, 95.38, 390.0), "text": (864.31, 189.78, 819.56)},
    "pixart-alpha": {"class": (611.7, 275.14, 1200.0), "text": (610.12, 314.68, 1140.0)},
    "mmdit": {"class": (679.09, 237.93, 1050.0), "text": (791.64, 397.06, 1260.0)},
    "dit-att": {"class": (792.44, 237.93, 1050.0), "text": (940.49, 407.88, 1500.0)},
    "mdt-v2": {"class": (748.07, 259.08, 1140.0)},
    "dit": {"class": (679.09, 237.4, 1050.0)},
}
# Cells where the paper is internally inconsistent (notes/table-a1.md): (backbone, conditioning, resolution).
INCONSISTENT = {(b, "text", r) for b in ("pixart-alpha", "mmdit", "dit-att") for r in RESOLUTIONS}
TOLERANCE = {"params": 0.02, "gflops": 0.05}  # relative agreement required of every internally consistent Table A1 cell (docs/table-a1.md)


@dataclass
class Record:
    model: str  # zoo name, e.g. "dit-xl/2"
    dataset: str  # "imagenet" (class-cond) or "cc12m" (text-cond)
    resolution: int  # pixels; the latent is resolution / 8
    params_m: float  # trainable parameters, millions
    gflops: float  # 1e9 FLOPs (2 x MACs) of one forward at batch 1
    paper_params_m: float | None
    paper_gflops: float | None
    rel_diff_params: float | None  # (ours - paper) / paper
    rel_diff_gflops: float | None
    consistent: bool  # False where the paper's GFLOPs cell is internally inconsistent (footnoted)


def count_flops(model: nn.Module, *inputs, **kwargs) -> int:
    """FLOPs (2 x MACs) of one forward `model(*inputs, **kwargs)`, attention matmuls included."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_COUNTER_EXTRAS) as counter:
        model(*inputs, **kwargs)
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def example_inputs(conditioning: str, resolution: int, device="meta", text_dim: int = TEXT_DIM,
                   pooled_dim: int = POOLED_DIM) -> tuple[torch.Tensor, torch.Tensor, Cond]:
    """Batch-1 inputs of Table A1: latent (1, 4, r/8, r/8), t (1,), and a class id or CLIP-L-shaped text
    (77 tokens; widths 768 unless a model expects others)."""
    side = resolution // VAE_FACTOR
    x = torch.zeros(1, LATENT_CHANNELS, side, side, device=device)
    t = torch.full((1,), 500.0, device=device)
    if conditioning == "class":
        cond = Cond(labels=torch.zeros(1, dtype=torch.long, device=device))
    elif conditioning == "text":
        cond = Cond(text=torch.zeros(1, TEXT_TOKENS, text_dim, device=device),
                    pooled=torch.zeros(1, pooled_dim, device=device))
    else:
        raise ValueError(f"conditioning must be 'class' or 'text', got {conditioning!r}")
    return x, t, cond


def _create(name: str, conditioning: str, **overrides) -> nn.Module:
    from condiff.models import create

    return create(name, conditioning=conditioning, **overrides)


def build_meta(name: str, conditioning: str, build: Callable[[str, str], nn.Module] = _create) -> nn.Module:
    """`build(name, conditioning)` on the meta device: no memory, no weights, instant."""
    with torch.device("meta"):
        return build(name, conditioning)


def measure(name: str, conditioning: str, resolutions=RESOLUTIONS, build: Callable[[str, str], nn.Module] = _create,
            model: nn.Module | None = None) -> tuple[int, dict[int, int]]:
    """Count `name` (built on the meta device unless `model` is given) -> (trainable params, {resolution: FLOPs})."""
    model = build_meta(name, conditioning, build) if model is None else model
    cfg = model.config  # every family names its text widths text_dim / pooled_dim
    dims = dict(text_dim=cfg.get("text_dim", TEXT_DIM), pooled_dim=cfg.get("pooled_dim", POOLED_DIM))
    flops = {r: count_flops(model, *example_inputs(conditioning, r, **dims)) for r in resolutions}
    return count_params(model), flops


def _rel(ours: float, paper: float | None) -> float | None:
    return None if paper is None else (ours - paper) / paper


def records_for(name: str, backbone: str, conditioning: str, build=_create, model: nn.Module | None = None
                ) -> list[Record]:
    """Our measurement of one zoo model beside the paper's Table A1 column `backbone`."""
    params, flops = measure(name, conditioning, build=build, model=model)
    paper = PAPER_TABLE_A1.get(backbone, {}).get(conditioning)
    out = []
    for i, r in enumerate(RESOLUTIONS):
        p_params, p_gflops = (None, None) if paper is None else (paper[0], paper[1 + i])
        out.append(Record(
            model=name, dataset=DATASETS[conditioning], resolution=r, params_m=params / 1e6, gflops=flops[r] / 1e9,
            paper_params_m=p_params, paper_gflops=p_gflops, rel_diff_params=_rel(params / 1e6, p_params),
            rel_diff_gflops=_rel(flops[r] / 1e9, p_gflops),
            consistent=(backbone, conditioning, r) not in INCONSISTENT,
        ))
    return out


# The rows of `condiff flops`: (zoo name, Table A1 column). mmdit-ours (the paper's improved mmDiT: class as
# tokens, control embedders of Eq. 1) is compared with the paper's mmDiT column, as the paper reports one.
ROWS: tuple[tuple[str, str], ...] = (
    ("unet-sdxl", "unet-sdxl"),
    ("pixart-alpha-xl/2", "pixart-alpha"),
    ("mmdit-xl/2", "mmdit"),
    ("mmdit-ours-xl/2", "mmdit"),
    ("dit-att-xl/2", "dit-att"),
    ("mdt-v2-xl/2", "mdt-v2"),
    ("dit-xl/2", "dit"),
)


def collect(rows=ROWS, build=_create) -> tuple[list[Record], dict]:
    """Measure every (row, conditioning) the zoo supports -> (records, {(name, conditioning): model config}).

    A conditioning the zoo refuses with a ValueError (e.g. text for DiT, class-only) is skipped.
    """
    records, configs = [], {}
    for name, column in rows:
        for conditioning in ("class", "text"):
            try:
                model = build_meta(name, conditioning, build)
            except ValueError:
                continue
            records += records_for(name, column, conditioning, build, model=model)
            configs[(name, conditioning)] = model.config
    return records, configs


def _cell(records: list[Record], name: str, conditioning: str, resolution: int) -> Record | None:
    for r in records:
        if r.model == name and r.dataset == DATASETS[conditioning] and r.resolution == resolution:
            return r
    return None


def _tokens(resolution: int, patch: int = 2) -> int:
    return (resolution // VAE_FACTOR // patch) ** 2


def footnote_figures(records: list[Record], configs: dict, build=_create) -> dict[str, dict]:
    """The arithmetic behind the inconsistent cells (notes/table-a1.md), recomputed with our own models: one dict
    of named numbers per note (GFLOPs, M params); `condiff flops` words them (`condiff.reports.table_a1`)."""
    figs: dict[str, dict] = {}
    P = PAPER_TABLE_A1
    n256, n512 = _tokens(256), _tokens(512)
    m = TEXT_TOKENS

    mm_t256, mm_c256 = _cell(records, "mmdit-xl/2", "text", 256), _cell(records, "mmdit-xl/2", "class", 256)
    if mm_t256 and mm_c256:
        cfg = configs[("mmdit-xl/2", "text")]
        d, L = cfg["hidden_size"], cfg["depth"]
        # our own F(N) = a + b N + c N^2 fitted on three resolutions (128 / 256 / 512 px)
        _, f = measure("mmdit-xl/2", "text", resolutions=(128,), build=build)
        f.update({r: _cell(records, "mmdit-xl/2", "text", r).gflops * 1e9 for r in RESOLUTIONS})
        a, b, c = _fit_quadratic([_tokens(r) for r in (128, 256, 512)], [f[r] / 1e9 for r in (128, 256, 512)])
        # the paper's two cells with our N^2 coefficient: solve a, b
        p256, p512 = P["mmdit"]["text"][1:]
        bp = ((p512 - c * n512**2) - (p256 - c * n256**2)) / (n512 - n256)
        figs["mmdit_text"] = dict(
            params_text=mm_t256.params_m, params_class=mm_c256.params_m,
            context_stream_params=L * (3 * d * d + 3 * d) / 1e6,
            paper_params_gap=P["mmdit"]["text"][0] - P["mmdit"]["class"][0], fit=(a, b, c),
            paper_gflops=(p256, p512), paper_params=P["mmdit"]["text"][0], text_tokens=m,
            fixed_needed=p256 - c * n256**2 - bp * n256,
            fixed_bound=2 * m * P["mmdit"]["text"][0] * 1e6 / 1e9 + 4 * m * m * d * L / 1e9)
    px_t = [_cell(records, "pixart-alpha-xl/2", "text", r) for r in RESOLUTIONS]
    px_c = [_cell(records, "pixart-alpha-xl/2", "class", r) for r in RESOLUTIONS]
    if all(px_t) and all(px_c):
        pt, pc = P["pixart-alpha"]["text"], P["pixart-alpha"]["class"]
        figs["pixart_text"] = dict(
            paper_gap=(pt[1] - pc[1], pt[2] - pc[2]), our_gap=tuple(t.gflops - c.gflops for t, c in zip(px_t, px_c)),
            text_tokens=m, paper_text_512=pt[2], paper_class_512=pc[2], our_class_512=px_c[1].gflops,
            params=px_t[0].params_m, paper_params=pt[0])
    if ("dit-att-xl/2", "class") in configs:
        cfg = configs[("dit-att-xl/2", "class")]
        d, L = cfg["hidden_size"], cfg["depth"]
        pa, pm = P["dit-att"]["text"], P["mmdit"]["text"]
        at = [_cell(records, "dit-att-xl/2", "text", r) for r in RESOLUTIONS]
        mm = [_cell(records, "mmdit-xl/2", "text", r) for r in RESOLUTIONS]
        figs["dit_att_text"] = dict(
            paper_params_gap=pa[0] - pm[0], cross_attn_params=L * (4 * d * d + 4 * d) / 1e6, text_tokens=m,
            gap_growth=(4 * d * d + 4 * m * d) * L * (n512 - n256) / 1e9,  # N-dependent part, 256 -> 512 px
            paper_gap=(pa[1] - pm[1], pa[2] - pm[2]),
            our_gap=(at[0].gflops - mm[0].gflops, at[1].gflops - mm[1].gflops) if all(at) and all(mm) else None,
            qo_gflops=2 * 2 * n256 * d * d * L / 1e9)  # q and o projections of one cross-attention per block, N 256
    if mm_t256 and all(px_t):
        figs["pixart_equals_mmdit"] = dict(
            paper=P["pixart-alpha"]["text"][1:],
            ours=(mm_t256.gflops, _cell(records, "mmdit-xl/2", "text", 512).gflops))
    un = [_cell(records, "unet-sdxl", "text", r) for r in RESOLUTIONS]
    if all(un):
        # the nearest standard alternative (SD-2-like width 320, depth-2 transformers), counted here too
        alt_kw = dict(model_channels=320, transformer_depth=[0, 2, 2], transformer_depth_middle=2)
        a_params, a_flops = measure("unet-sdxl", "text", build=lambda n, c: build(n, c, **alt_kw))
        figs["unet_text"] = dict(
            paper=P["unet-sdxl"]["text"], alternative=(a_params / 1e6, a_flops[256] / 1e9, a_flops[512] / 1e9),
            ours=(un[0].params_m, un[0].gflops, un[1].gflops))
    return figs


def _fit_quadratic(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Exact a + b x + c x^2 through three points."""
    A = torch.tensor([[1.0, x, x * x] for x in xs], dtype=torch.float64)
    a, b, c = torch.linalg.solve(A, torch.tensor(ys, dtype=torch.float64)).tolist()
    return a, b, c


def record_dict(r: Record) -> dict:
    d = asdict(r)
    for k in ("params_m", "gflops", "rel_diff_params", "rel_diff_gflops"):
        if d[k] is not None:
            d[k] = round(d[k], 6)
    return d
