"""Checkpoint interop: facebookresearch/DiT and diffusers (DiT, PixArt-alpha, SD3) <-> condiff, both ways.

Every conversion is checked on the FUNCTION: the converted model gives the source model's outputs to float32
rounding on small randomly initialised configs, and round trips give back the exact tensors.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from condiff.conditioning.cond import Cond
from condiff.models import create
from condiff import interop
from condiff.interop import cli as convert_cli

diffusers = pytest.importorskip("diffusers")

TOL = dict(rtol=1e-5, atol=1e-5)


def _randomize(model: nn.Module, std: float = 0.1) -> None:
    """Random weights everywhere (the sources zero-init their outputs; parity must not hide behind zeros)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _assert_same_state(a: dict, b: dict) -> None:
    """Equal tensors; SD3's fixed position table (recomputed, not learned) to float32 rounding."""
    assert sorted(a) == sorted(b)
    for k in a:
        if k == "pos_embed.pos_embed":
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
        else:
            assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------------------------
# facebookresearch/DiT: a faithful small reference of its module naming and forward (models.py of the release:
# timm PatchEmbed / Attention(qkv_bias) / Mlp(GELU tanh), fixed MAE sin-cos `pos_embed` on an arange grid,
# LayerNorm(affine=False, eps=1e-6), adaLN_modulation = SiLU + Linear(D, 6D), learned sigma = 2C outputs).
# --------------------------------------------------------------------------------------------------------------

def _mae_1d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _mae_2d(dim, grid_size, grid_w_size=None):
    """MAE's `get_2d_sincos_pos_embed` (DiT's table); grid_w_size: the same function on a (h, w) arange grid."""
    grid_w_size = grid_w_size or grid_size
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_w_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_w_size)  # w goes first
    return np.concatenate([_mae_1d(dim // 2, grid[0]), _mae_1d(dim // 2, grid[1])], axis=1)


class _Patch(nn.Module):
    def __init__(self, p, c, d):
        super().__init__()
        self.proj = nn.Conv2d(c, d, p, stride=p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class _TimmAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (C // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class _TimmMlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _RefBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = _TimmAttention(d, heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = _TimmMlp(d, 4 * d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(_modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), s2, sc2))


class _RefTimestep(nn.Module):
    def __init__(self, d, freq=256):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t):
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class _RefLabel(nn.Module):
    def __init__(self, n, d):
        super().__init__()
        self.embedding_table = nn.Embedding(n + 1, d)  # class_dropout_prob > 0: one CFG row


class _RefFinal(nn.Module):
    def __init__(self, d, p, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, p * p * out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class RefDiT(nn.Module):
    """facebookresearch/DiT `DiT` with learn_sigma=True, at a small size."""

    def __init__(self, input_size=8, p=2, c=4, d=64, depth=2, heads=4, num_classes=10):
        super().__init__()
        self.p, self.out_c = p, 2 * c
        self.x_embedder = _Patch(p, c, d)
        self.t_embedder = _RefTimestep(d)
        self.y_embedder = _RefLabel(num_classes, d)
        n = (input_size // p) ** 2
        self.pos_embed = nn.Parameter(torch.from_numpy(_mae_2d(d, input_size // p)).float()[None], requires_grad=False)
        assert self.pos_embed.shape[1] == n
        self.blocks = nn.ModuleList([_RefBlock(d, heads) for _ in range(depth)])
        self.final_layer = _RefFinal(d, p, self.out_c)

    def forward(self, x, t, y):
        """DiT's forward; a non-square x (DiT itself is square-only: a fixed table, h = w = sqrt(N)) takes MAE's
        table on its (h, w) arange grid and unpatchifies to (h, w): the natural extension a converted model
        (pos_grid "arange") must reproduce."""
        h, w = x.shape[-2] // self.p, x.shape[-1] // self.p
        pos = self.pos_embed if h == w else torch.from_numpy(_mae_2d(self.pos_embed.shape[-1], h, w)).float()[None]
        x = self.x_embedder(x) + pos
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        x = x.reshape(x.shape[0], h, w, self.p, self.p, self.out_c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.out_c, h * self.p, w * self.p)


def _randomize_ref(ref: RefDiT):
    pos = ref.pos_embed.detach().clone()
    _randomize(ref)
    with torch.no_grad():
        ref.pos_embed.copy_(pos)  # the fixed table stays the sin-cos grid


def test_facebook_dit_state_dict_loads_and_matches(tmp_path):
    ref = RefDiT()
    _randomize_ref(ref)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 321.0, 999.0]), torch.tensor([1, 5, 10])
    expected = ref(x, t, y)  # (3, 8, 8, 8): eps | sigma
    path = tmp_path / "DiT-tiny.pt"
    torch.save(ref.state_dict(), path)
    ours = interop.load_facebook_dit(path, num_heads=4)  # width 64 is none of DiT's configs: heads given
    assert ours.config["pos_grid"] == "arange" and ours.config["num_classes"] == 10
    assert ours.final_layer.linear.out_features == 2 * 2 * 4  # only the epsilon half is kept
    torch.testing.assert_close(ours(x, t, Cond(labels=y)), expected[:, :4], **TOL)
    for hw in ((8, 16), (16, 8)):  # non-square: MAE's table on the (h, w) arange grid, both orientations
        xn = torch.randn(3, 4, *hw)
        torch.testing.assert_close(ours(xn, t, Cond(labels=y)), ref(xn, t, y)[:, :4], **TOL)
    # keep_sigma: same eps; the full 8-channel head is kept
    full = interop.load_facebook_dit(ref.state_dict(), keep_sigma=True, num_heads=4)
    assert full.config["learn_sigma"] and full.final_layer.linear.out_features == 2 * 2 * 8
    torch.testing.assert_close(full(x, t, Cond(labels=y)), expected[:, :4], **TOL)
    # a training checkpoint {"model", "ema", ...}: the EMA weights are taken
    ema = {k: v + 1.0 if k.endswith("bias") else v for k, v in ref.state_dict().items()}
    torch.save({"model": ref.state_dict(), "ema": ema, "args": None}, tmp_path / "0100000.pt")
    got = interop.load_facebook_dit(tmp_path / "0100000.pt", num_heads=4)
    assert torch.equal(got.blocks[0].attn.qkv.bias, ema["blocks.0.attn.qkv.bias"])


def test_facebook_dit_errors(tmp_path):
    ref = RefDiT()
    sd = ref.state_dict()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        interop.load_facebook_dit(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not one of DiT's configs"):
        interop.load_facebook_dit(sd)  # width 64 has no DiT head count
    bad = dict(sd, pos_embed=sd["pos_embed"] * 2)
    with pytest.raises(ValueError, match="positional table differs"):
        interop.load_facebook_dit(bad, num_heads=4)
    extra = dict(sd, **{"blocks.0.attn.q_norm.weight": torch.ones(16)})
    with pytest.raises(KeyError, match="unexpected keys"):
        interop.load_facebook_dit(extra, num_heads=4)


def test_cli_dit_original_writes_a_loadable_checkpoint(tmp_path):
    from condiff.inference.pipeline import Pipeline

    ref = RefDiT()
    _randomize_ref(ref)
    torch.save(ref.state_dict(), tmp_path / "dit.pt")
    assert convert_cli.main(["dit-original", str(tmp_path / "dit.pt"), str(tmp_path / "run"), "--num-heads", "4"]) == 0
    inf = Pipeline.from_checkpoint(tmp_path / "run")
    assert inf.schedule.to_dict()["beta_schedule"] == "linear"
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 600.0]), torch.tensor([2, 3])
    torch.testing.assert_close(inf.model(x, t, Cond(labels=y)), ref(x, t, y)[:, :4], **TOL)
    assert convert_cli.main(["dit-original", str(tmp_path / "nope.pt"), str(tmp_path / "run2")]) == 1


def test_cli_convert_never_clobbers_a_run_without_force(tmp_path, capsys):
    from condiff.io import checkpoint as ck

    torch.save(RefDiT().state_dict(), tmp_path / "dit.pt")
    run = tmp_path / "run"
    w = {"w": torch.zeros(2)}
    ck.save_checkpoint(run, 20, model_state=w, ema_state=w, meta={"model": {"name": "x"}})
    args = ["dit-original", str(tmp_path / "dit.pt"), str(run), "--num-heads", "4"]
    assert convert_cli.main(args) == 1
    assert "already holds checkpoints (newest: step_00000020)" in capsys.readouterr().err
    assert ck.latest_checkpoint(run).name == "step_00000020"
    assert convert_cli.main(args + ["--force"]) == 0 and ck.latest_checkpoint(run).name == "step_00000000"


# --------------------------------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------------------------------

def _diffusers_dit(out_channels=8, norm_eps=1e-6):
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                        out_channels=out_channels, num_layers=2, sample_size=8, patch_size=2,
                                        num_embeds_ada_norm=10, norm_eps=norm_eps)
    _randomize(m)
    with torch.no_grad():  # condiff has ONE timestep / class embedder: diffusers' per-block copies are equal in
        e0 = m.transformer_blocks[0].norm1.emb  # every real checkpoint (converted from DiT)
        for blk in m.transformer_blocks[1:]:
            blk.norm1.emb.load_state_dict(e0.state_dict())
    return m.eval()


class _Captured(Exception):
    pass


def _diffusers_dit_tokens_out(theirs, x, t, y):
    """diffusers DiT on a non-square x: their whole network up to `proj_out_2` (their unpatchify assumes
    h = w = sqrt(N)), then their unpatchify's reshape with the actual (h, w)."""
    got = {}

    def grab(module, args, out):
        got["tokens"] = out
        raise _Captured

    handle = theirs.proj_out_2.register_forward_hook(grab)
    try:
        theirs(x, timestep=t, class_labels=y)
    except _Captured:
        pass
    finally:
        handle.remove()
    p, c = theirs.config.patch_size, theirs.out_channels
    h, w = x.shape[-2] // p, x.shape[-1] // p
    tokens = got["tokens"].reshape(-1, h, w, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", tokens).reshape(-1, c, h * p, w * p)


def test_diffusers_dit_parity_and_round_trip():
    theirs = _diffusers_dit()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 870.0]), torch.tensor([4, 10])
    with torch.no_grad():
        expected = theirs(x, timestep=t, class_labels=y).sample
        ours = interop.from_diffusers(theirs)
        assert ours.config["t_freq_shift"] == 1.0 and ours.config["pos_grid"] == "scaled"
        torch.testing.assert_close(ours(x, t, Cond(labels=y)), expected[:, :4], **TOL)
        x2 = torch.randn(1, 4, 12, 12)  # another size: positions re-gridded alike
        torch.testing.assert_close(ours(x2, t[:1], Cond(labels=y[:1])),
                                   theirs(x2, timestep=t[:1], class_labels=y[:1]).sample[:, :4], **TOL)
        for hw in ((8, 12), (12, 8), (4, 16)):  # non-square: their PatchEmbed re-grids (h, w), blocks run as is
            xn = torch.randn(2, 4, *hw)
            torch.testing.assert_close(ours(xn, t, Cond(labels=y)), _diffusers_dit_tokens_out(theirs, xn, t, y)[:, :4],
                                       **TOL)
        back = interop.to_diffusers(ours)  # 4 output channels (the sigma half was dropped)
        torch.testing.assert_close(back(x, timestep=t, class_labels=y).sample, expected[:, :4], **TOL)
        again = interop.from_diffusers(back)
    _assert_same_state(again.state_dict(), ours.state_dict())
    four = _diffusers_dit(out_channels=4)  # without learned sigma the round trip is exact on their side too
    _assert_same_state(interop.to_diffusers(interop.from_diffusers(four)).state_dict(), four.state_dict())


def test_diffusers_dit_norm_eps_deviation_is_small():
    """diffusers' DiT uses eps 1e-5 in its MLP LayerNorm (the original: 1e-6): documented, tiny difference."""
    theirs = _diffusers_dit(norm_eps=1e-5)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 870.0]), torch.tensor([4, 1])
    with torch.no_grad():
        expected = theirs(x, timestep=t, class_labels=y).sample[:, :4]
        got = interop.from_diffusers(theirs)(x, t, Cond(labels=y))
    rel = ((got - expected).norm() / expected.norm()).item()
    assert 0 < rel < 1e-3


def test_diffusers_dit_untied_embedders_are_refused():
    m = _diffusers_dit()
    with torch.no_grad():
        m.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight.add_(1.0)
    with pytest.raises(ValueError, match="per-block copies must be identical"):
        interop.from_diffusers(m)


@pytest.mark.parametrize("interpolation_scale", [None, 2])
def test_diffusers_pixart_parity_and_round_trip(interpolation_scale):
    theirs = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                                cross_attention_dim=32, caption_channels=12,
                                                interpolation_scale=interpolation_scale)
    _randomize(theirs)
    theirs.eval()
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 640.0]), torch.randn(2, 7, 12)
    kw = dict(added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        expected = theirs(x, encoder_hidden_states=text, timestep=t, **kw).sample
        ours = interop.from_diffusers(theirs)
        assert ours.config["pos_interp_scale"] == float(interpolation_scale or 1)
        torch.testing.assert_close(ours(x, t, Cond(text=text)), expected[:, :4], **TOL)
        back = interop.to_diffusers(ours)
        torch.testing.assert_close(back(x, encoder_hidden_states=text, timestep=t, **kw).sample, expected[:, :4],
                                   **TOL)
        # other resolutions, square and not (both orientations): both re-grid their sin-cos positions alike
        for hw in ((8, 12), (12, 8), (4, 16), (12, 12)):
            x2 = torch.randn(1, 4, *hw)
            torch.testing.assert_close(ours(x2, t[:1], Cond(text=text[:1])),
                                       theirs(x2, encoder_hidden_states=text[:1], timestep=t[:1], **kw).sample[:, :4],
                                       **TOL)
    _assert_same_state(interop.from_diffusers(back).state_dict(), ours.state_dict())


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_diffusers_sd3_parity_and_round_trip(qk_norm):
    theirs = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3,
                                             attention_head_dim=8, num_attention_heads=4, joint_attention_dim=12,
                                             caption_projection_dim=32, pooled_projection_dim=10, out_channels=4,
                                             pos_embed_max_size=12, qk_norm=qk_norm)
    _randomize(theirs)
    theirs.eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([20.0, 900.0])
    text, pooled = torch.randn(2, 5, 12), torch.randn(2, 10)
    with torch.no_grad():
        expected = theirs(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample
        ours = interop.from_diffusers(theirs)
        assert ours.config["context_stream"] == "full" and ours.config["pos_grid"] == "sd3"
        torch.testing.assert_close(ours(x, t, Cond(text=text, pooled=pooled)), expected, **TOL)
        # non-square latents: SD3 crops its position table around the centre, per axis
        for hw in ((12, 16), (16, 12), (8, 24)):
            x2 = torch.randn(1, 4, *hw)
            want = theirs(hidden_states=x2, encoder_hidden_states=text[:1], pooled_projections=pooled[:1],
                          timestep=t[:1]).sample
            torch.testing.assert_close(ours(x2, t[:1], Cond(text=text[:1], pooled=pooled[:1])), want, **TOL)
        back = interop.to_diffusers(ours)
        torch.testing.assert_close(back(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                                        timestep=t).sample, expected, **TOL)
    want_state = theirs.state_dict()
    if qk_norm:  # the last block's context-query norm feeds no output (context_pre_only): it comes back as ones
        dead = "transformer_blocks.2.attn.norm_added_q.weight"
        assert torch.equal(back.state_dict()[dead], torch.ones(8))
        want_state[dead] = torch.ones(8)
    _assert_same_state(back.state_dict(), want_state)  # exact round trip, position table included


def test_condiff_native_models_convert_both_ways():
    """Start from OUR random model (not a diffusers one): ours -> diffusers -> ours is exact and equal in output."""
    ours = create("mmdit-tiny", "text", context_stream="full", control="none", use_pooled=True, text_dim=12,
                  pooled_dim=10, pos_grid="sd3", pos_max_size=12, base_size=4, input_size=8)
    _randomize(ours, 0.05)
    ours.eval()
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 500.0]), Cond(text=torch.randn(2, 6, 12),
                                                                          pooled=torch.randn(2, 10))
    with torch.no_grad():
        theirs = interop.to_diffusers(ours)
        want = theirs(hidden_states=x, encoder_hidden_states=cond.text, pooled_projections=cond.pooled,
                      timestep=t).sample
        torch.testing.assert_close(ours(x, t, cond), want, **TOL)
    _assert_same_state(interop.from_diffusers(theirs).state_dict(), ours.state_dict())


def test_unconvertible_models_are_refused_with_reasons():
    with pytest.raises(ValueError, match="'control': 'additive'"):
        interop.condiff_to_diffusers(create("dit-tiny", "class", pos_grid="scaled", t_freq_shift=1.0,
                                            base_size=16, input_size=32))
    with pytest.raises(ValueError, match="no diffusers counterpart"):
        interop.condiff_to_diffusers(create("dit-tiny", "class", control="none"))  # rectified grid
    with pytest.raises(ValueError, match="no diffusers counterpart"):
        interop.condiff_to_diffusers(create("unet-sdxl-tiny", "class"))
    with pytest.raises(ValueError, match="not supported"):
        interop.diffusers_to_condiff("FluxTransformer2DModel", {}, {})
    cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=1, sample_size=128,
               patch_size=2, caption_channels=12, cross_attention_dim=32)
    with pytest.raises(ValueError, match="use_additional_conditions"):
        interop.diffusers_to_condiff("PixArtTransformer2DModel", cfg, {})


def test_cli_diffusers_directory_round_trip(tmp_path):
    theirs = _diffusers_dit(out_channels=4)
    theirs.save_pretrained(tmp_path / "dit_diffusers")
    assert convert_cli.main(["from-diffusers", str(tmp_path / "dit_diffusers"), str(tmp_path / "run")]) == 0
    assert convert_cli.main(["to-diffusers", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    back = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "back")
    _assert_same_state(back.state_dict(), theirs.state_dict())
    assert convert_cli.main(["to-diffusers", str(tmp_path / "run"), str(tmp_path / "back")]) == 1  # not empty
    assert convert_cli.main(["from-diffusers", str(tmp_path / "run"), str(tmp_path / "x")]) == 1  # no config.json


def test_unet_matches_diffusers_unet2dcondition_both_ways():
    """Our SDXL-style UNet IS diffusers' UNet2DConditionModel (SDXL block types, linear projections, GEGLU,
    projection class embedding for the pooled vector): identical outputs both ways, exact round trip."""
    ours = create("unet-sdxl", "text", model_channels=32, head_channels=16, text_dim=24, pooled_dim=20,
                  norm_groups=8, control="none")  # the paper's text layout (3 levels, depths 0/3/3 + 3), narrow
    _randomize(ours)
    ours.eval()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3.0, 700.0])
    text, pooled = torch.randn(2, 5, 24), torch.randn(2, 20)
    with torch.no_grad():
        theirs = interop.to_diffusers(ours)
        assert list(theirs.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
        want = theirs(x, t, encoder_hidden_states=text, class_labels=pooled).sample
        torch.testing.assert_close(ours(x, t, Cond(text=text, pooled=pooled)), want, **TOL)
        for hw in ((16, 32), (32, 16)):  # non-square latents (sides multiples of the downsample factor 4)
            xn = torch.randn(2, 4, *hw)
            want = theirs(xn, t, encoder_hidden_states=text, class_labels=pooled).sample
            torch.testing.assert_close(ours(xn, t, Cond(text=text, pooled=pooled)), want, **TOL)
        again = interop.from_diffusers(theirs)
    _assert_same_state(again.state_dict(), ours.state_dict())
    assert again.config == ours.config
    with pytest.raises(ValueError, match="no diffusers counterpart"):
        interop.condiff_to_diffusers(create("unet-sdxl-tiny", "text"))  # control embedder


def test_read_diffusers_dir_sharded_and_variants(tmp_path):
    """A sharded save (index + shards) is read through its index; a *.fp16 variant beside it is ignored."""
    theirs = _diffusers_dit(out_channels=4)
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    theirs.half().save_pretrained(tmp_path / "sharded", variant="fp16")
    name, cfg, state = interop.read_diffusers_dir(tmp_path / "sharded")
    assert name == "DiTTransformer2DModel" and cfg["num_layers"] == 2
    want = _diffusers_dit(out_channels=4).state_dict()
    _assert_same_state(state, want)  # the float32 weights, not the fp16 variant


def test_interop_layers_only_the_cli_writes_checkpoints():
    """The rule engine and the format modules import condiff.models only (and no upper layer, even lazily); the
    checkpoint writer (condiff.io) is reached from `condiff.interop.cli` alone."""
    import ast
    from pathlib import Path

    package = Path(interop.__file__).parent
    for path in sorted(package.glob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        layers = {m.split(".")[1] for m in imported if m.startswith("condiff.") and m.count(".") >= 1}
        allowed = {"interop", "models"} | ({"io", "diffusion"} if path.name == "cli.py" else set())
        assert layers <= allowed, f"{path.name} imports {sorted(layers - allowed)}"
    assert (package / "rules.py").is_file() and (package / "dit_original.py").is_file()
