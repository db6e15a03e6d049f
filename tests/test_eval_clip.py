"""CLIP score from a local HF directory: the stated definition, the open_clip tokenizer fallback, errors."""

from __future__ import annotations

import json

import pytest
import torch

from condiff.eval.clip_score import CLIP_ENV, ClipScorer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(path)
    return path


PROMPTS = ["a red circle to the left of a blue square", "A photo of a dog!", "two cats " * 60]


def _images(n=3):
    return torch.rand(n, 3, 40, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_definition_100_cosine_clipped_at_zero(tiny_clip_dir):
    scorer = ClipScorer(tiny_clip_dir)
    images = torch.cat([_images(), _images()])
    prompts = PROMPTS + PROMPTS[::-1]
    got = scorer(images, prompts)
    # by hand: processor -> projected embeddings -> 100 cos, clipped at 0
    u8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pixels = scorer.processor(images=list(u8), return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (32, 32)
    ids, mask = scorer.tokenize(prompts)
    with torch.no_grad():
        img = scorer._pooled(scorer.model.get_image_features(pixel_values=pixels))
        txt = scorer._pooled(scorer.model.get_text_features(input_ids=ids, attention_mask=mask))
    cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
    torch.testing.assert_close(got, (100 * cos).clamp(min=0), atol=1e-4, rtol=1e-4)
    assert (got >= 0).all() and ((100 * cos) < 0).any()  # the clipping is exercised
    assert got.shape == (6,)


def test_open_clip_fallback_tokenizer_matches_hf_clip_tokenizer(tiny_clip_dir, tmp_path):
    """Without tokenizer files the open_clip BPE gives the ids an HF CLIPTokenizer gives with the same
    vocabulary, so the scores agree."""
    import shutil

    from transformers import CLIPTokenizer

    from condiff.conditioning.text import _open_clip_tokenizer_module

    bpe = _open_clip_tokenizer_module().SimpleTokenizer()
    with_tok = tmp_path / "with_tok"
    shutil.copytree(tiny_clip_dir, with_tok)
    # open_clip names the specials <start_of_text>/<end_of_text>; OpenAI's HF vocab.json <|startoftext|>/...
    vocab = {{"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}.get(k, k): v
             for k, v in bpe.encoder.items()}
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    (with_tok / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (with_tok / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    CLIPTokenizer(str(with_tok / "vocab.json"), str(with_tok / "merges.txt")).save_pretrained(with_tok)

    a, b = ClipScorer(tiny_clip_dir), ClipScorer(with_tok)
    assert a.tokenizer is None and b.tokenizer is not None
    ids_a, mask_a = a.tokenize(PROMPTS)
    ids_b, mask_b = b.tokenize(PROMPTS)
    assert torch.equal(mask_a, mask_b)
    assert torch.equal(ids_a * mask_a, ids_b * mask_b)
    assert ids_a.shape == (3, 77) and mask_a[2].sum() == 77  # the long prompt is truncated to the context
    torch.testing.assert_close(a(_images(), PROMPTS), b(_images(), PROMPTS))


def test_missing_model_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(CLIP_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="--clip DIR"):
        ClipScorer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=CLIP_ENV):
        ClipScorer(None)
