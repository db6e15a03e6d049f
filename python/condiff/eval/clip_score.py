"""CLIP score: image-text alignment through a CLIP model loaded from a local Hugging Face directory.

Definition (Hessel et al. 2021 with w = 100, as torchmetrics' `CLIPScore` and the papers the paper
follows [7, 14]): for an image I and its prompt T,
    CLIPScore(I, T) = max(100 * cos(E_img(I), E_txt(T)), 0),
with E_* the projected CLIP embeddings; the reported number is the mean over samples. Prompts longer
than the text model's context (77 tokens) are truncated.

COCO protocol (paper Sec. 3, following Esser et al. [14]): 25 sampling steps, guidance 5.0, prompts from
the COCO validation captions (about 40k): the `coco` preset of `condiff eval` (see `PRESETS` in
`condiff.eval.__main__`); the captions file comes from the user (`--prompts`), nothing is downloaded.

Model directory: `CLIPModel.from_pretrained(path)` (e.g. a local copy of openai/clip-vit-large-patch14).
Its image processor is used when the directory has one (else CLIP's defaults at the model's image size);
its tokenizer likewise, else the CLIP BPE vocabulary shipped inside open_clip (the same token ids).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

CLIP_ENV = "CONDIFF_CLIP"


def _resolve(path: str | os.PathLike | None) -> Path:
    p = path or os.environ.get(CLIP_ENV)
    if not p or not (Path(p) / "config.json").is_file():
        raise FileNotFoundError(
            f"CLIP score needs a CLIP model in Hugging Face format in a local directory (config.json + weights), "
            f"e.g. a copy of openai/clip-vit-large-patch14 made on a machine with internet by "
            f"`CLIPModel.from_pretrained(...).save_pretrained(DIR)`; pass --clip DIR or set {CLIP_ENV}=DIR "
            f"(got {str(p) if p else 'nothing'}).")
    return Path(p)


class ClipScorer:
    """`scorer(images, prompts) -> (B,) CLIP scores`; images (B, 3, H, W) in [-1, 1] or uint8."""

    def __init__(self, path: str | os.PathLike | None = None, device="cpu", batch_size: int = 64):
        from transformers import CLIPImageProcessor, CLIPModel

        self.path = _resolve(path)
        self.device, self.batch_size = torch.device(device), batch_size
        self.model = CLIPModel.from_pretrained(str(self.path)).to(self.device).eval()
        size = self.model.config.vision_config.image_size
        if (self.path / "preprocessor_config.json").is_file():
            self.processor = CLIPImageProcessor.from_pretrained(str(self.path))
        else:
            self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.context = self.model.config.text_config.max_position_embeddings
        self.tokenizer = self._fallback = None
        if any((self.path / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.name = f"clip:{self.path.name}"

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(input_ids (B, L), attention_mask (B, L)), truncated to the model's context."""
        if self.tokenizer is not None:
            enc = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.context,
                                 return_tensors="pt")
            return enc["input_ids"], enc["attention_mask"]
        from condiff.conditioning.text import OpenClipTokenizer

        if self._fallback is None:
            self._fallback = OpenClipTokenizer(self.context)
        ids, lengths = self._fallback(prompts)  # (B, L) <sot> ... <eot> then 0s; lengths include <eot>
        mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
        return ids, mask

    @staticmethod
    def _pooled(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"CLIP score: {images.shape[0]} images but {len(prompts)} prompts")
        if images.dtype != torch.uint8:
            images = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        scores = []
        for i in range(0, len(prompts), self.batch_size):
            u8 = [np.ascontiguousarray(x) for x in images[i:i + self.batch_size].cpu().permute(0, 2, 3, 1).numpy()]
            pixels = self.processor(images=u8, return_tensors="pt")["pixel_values"].to(self.device)
            ids, mask = self.tokenize(list(prompts[i:i + self.batch_size]))
            img = self._pooled(self.model.get_image_features(pixel_values=pixels))
            txt = self._pooled(self.model.get_text_features(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)))
            cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)  # (b,)
            scores.append((100.0 * cos).clamp(min=0.0).cpu())
        return torch.cat(scores)
