"""Text encoders: CLIP from a local directory, the shipped MiniLM (parity with sentence-transformers),
the tiny seeded CLIP; tokenization, lengths, pooling, truncation, freezing, errors."""

import json

import pytest
import torch

from condiff.conditioning.text import (
    OpenClipTokenizer,
    TextBatch,
    build_text_encoder,
    minilm_path,
    tiny_clip_model,
)

PROMPTS = ["a red circle to the left of a blue square", "", "Hello   World, naive cafe!"]


@pytest.fixture(scope="module")
def tiny():
    return build_text_encoder({"kind": "tiny-clip", "seed": 0, "dim": 32, "layers": 2, "heads": 2})


def test_tiny_clip_outputs_and_determinism(tiny):
    b = tiny.encode(PROMPTS)
    assert isinstance(b, TextBatch)
    assert b.states.shape == (3, 77, 32) and b.pooled.shape == (3, 32) and b.lengths.dtype == torch.int64
    assert tiny.dim == tiny.pooled_dim == 32 and tiny.max_length == 77
    assert b.lengths.tolist() == [12, 2, 8]  # SOT + 10 BPE tokens + EOT; "" -> SOT, EOT
    # CLIP's pooled output is the (final-layer-normed) state at the EOS token
    torch.testing.assert_close(b.pooled, b.states[torch.arange(3), b.lengths - 1])
    again = build_text_encoder(tiny.config).encode(PROMPTS)
    torch.testing.assert_close(again.states, b.states, rtol=0, atol=0)
    other = build_text_encoder(dict(tiny.config, seed=1)).encode(PROMPTS)
    assert (other.states - b.states).abs().max() > 1e-2
    # batch composition does not change a prompt's encoding (causal attention ignores padding)
    alone = tiny.encode(PROMPTS[:1])
    torch.testing.assert_close(alone.states[0, :12], b.states[0, :12], rtol=1e-5, atol=1e-5)


def test_truncation_keeps_eos_and_custom_length():
    enc = build_text_encoder({"kind": "tiny-clip", "dim": 32, "max_length": 16})
    tok = OpenClipTokenizer(16)
    ids, lengths = tok(["word " * 50, "a cat"])
    assert ids.shape == (2, 16) and lengths.tolist() == [16, 4]
    assert ids[0, -1] == tok.eos_id and ids[1, 3] == tok.eos_id
    assert enc.encode(["word " * 50]).states.shape == (1, 16, 32)


def test_frozen_and_no_grad(tiny):
    assert all(not p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not tiny.model.training
    with torch.enable_grad():
        assert not tiny.encode(["x"]).states.requires_grad
    with pytest.raises(TypeError, match="list of prompts"):
        tiny.encode("a single string")


def _open_clip_vocab_as_hf_tokenizer(path):
    """Write a Hugging Face CLIPTokenizer made from open_clip's BPE vocabulary into `path`."""
    from transformers import CLIPTokenizer

    from condiff.conditioning.text import _open_clip_tokenizer_module

    t = _open_clip_tokenizer_module().SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in t.encoder.items()}
    merges = sorted(t.bpe_ranks, key=t.bpe_ranks.get)
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(str(path))


def test_clip_from_local_directory_with_and_without_tokenizer(tmp_path):
    model = tiny_clip_model(seed=3, dim=32, layers=1, heads=2)
    bare, full = tmp_path / "bare", tmp_path / "full"
    model.save_pretrained(str(bare))
    model.save_pretrained(str(full))
    _open_clip_vocab_as_hf_tokenizer(full)
    a = build_text_encoder({"kind": "clip", "path": str(bare)})
    b = build_text_encoder({"kind": "clip", "path": str(full)})
    assert a.config["tokenizer"] == "open_clip" and b.config["tokenizer"] == str(full)
    assert json.loads(json.dumps(a.config))["kind"] == "clip"
    ea, eb = a.encode(PROMPTS), b.encode(PROMPTS)
    assert ea.lengths.tolist() == eb.lengths.tolist() == [12, 2, 8]
    for i, n in enumerate(ea.lengths.tolist()):  # same valid states (pad ids differ: 0 vs EOS)
        torch.testing.assert_close(ea.states[i, :n], eb.states[i, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ea.pooled, eb.pooled, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the loaded weights are the saved ones
        ids, _ = OpenClipTokenizer(77)(PROMPTS)
        ref = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ea.states, ref, rtol=1e-5, atol=1e-5)


def test_missing_weights_say_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_encoder.path = a local Hugging Face directory of CLIP ViT-L/14"):
        build_text_encoder({"kind": "clip", "path": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="clip"):
        build_text_encoder({"kind": "clip"})
    (tmp_path / "config.json").write_text(tiny_clip_model(dim=32, layers=1).config.to_json_string())
    with pytest.raises(FileNotFoundError, match="could not load the weights"):
        build_text_encoder({"kind": "clip", "path": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="all-MiniLM-L6-v2"):
        build_text_encoder({"kind": "minilm", "path": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="kind"):
        build_text_encoder({"kind": "t5"})
    with pytest.raises(ValueError, match="unknown key"):
        build_text_encoder({"kind": "tiny-clip", "layer": 3})


def test_minilm_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    enc = build_text_encoder({"kind": "minilm", "max_length": 32})
    assert enc.dim == enc.pooled_dim == 384 and enc.max_length == 32
    b = enc.encode(PROMPTS)
    assert b.states.shape == (3, 32, 384) and b.lengths[1] == 2  # "" -> [CLS] [SEP]
    st = SentenceTransformer(minilm_path(), device="cpu")
    ref_pooled = st.encode(PROMPTS, convert_to_tensor=True)  # mean pooling + L2 normalisation
    torch.testing.assert_close(torch.nn.functional.normalize(b.pooled, dim=-1), ref_pooled, rtol=0, atol=1e-5)
    tokens = st.encode(PROMPTS, output_value="token_embeddings")
    for i, t in enumerate(tokens):
        assert t.shape[0] == b.lengths[i]
        torch.testing.assert_close(b.states[i, : t.shape[0]], t, rtol=0, atol=1e-4)
    # semantics: the pretrained encoder puts paraphrases closer than unrelated prompts
    p = torch.nn.functional.normalize(enc.encode(["a red circle", "a crimson ring", "a tax form"]).pooled, dim=-1)
    assert p[0] @ p[1] > p[0] @ p[2] + 0.1
