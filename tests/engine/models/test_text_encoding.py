"""ComfyUI's chunking, weighting, clip skip and textual inversion on top of the CLIP text model.

Expected chunks and formulas are written out from comfy/sd1_clip.py (tokenize_with_weights,
encode_token_weights, gen_empty_tokens) and comfy/sd.py (CLIP.encode_from_tokens).
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from engine.errors import ModelError
from engine.models.clip_text import CLIPTextConfig, CLIPTextModel, random_state_dict
from engine.models.text_encoding import (
    SD1,
    SD2,
    EmbeddingFolder,
    TextEncoder,
    empty_tokens,
    encode,
    encode_token_weights,
    load_text_encoder,
    resolve_layer,
    select_embedding,
    tokenize_with_weights,
)
from engine.models.tokenizer import CLIPTokenizer

START, END = 49406, 49407
A, B, C, D, CAT = 320, 321, 322, 323, 2368


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.from_package()


@pytest.fixture(scope="module")
def sd1_model() -> CLIPTextModel:
    return CLIPTextModel.from_state_dict(
        random_state_dict(CLIPTextConfig.tiny(), seed=31), "cond_stage_model."
    )


@pytest.fixture(scope="module")
def sd2_model() -> CLIPTextModel:
    cfg = CLIPTextConfig.tiny(activation="gelu", projection_dim=80)
    return CLIPTextModel.from_state_dict(random_state_dict(cfg, seed=32, layout="sd2"), "cond_stage_model.")


def ids(chunk):
    return [t for t, _ in chunk]


def weights(chunk):
    return [w for _, w in chunk]


def padded(entries, pad=END):
    """[start, *entries, end, pad...] with weight 1 for the specials, as (token, weight) pairs."""
    out = [(START, 1.0), *entries, (END, 1.0)]
    return out + [(pad, 1.0)] * (77 - len(out))


# ------------------------------------------------------------------------------------- chunking


def test_empty_prompt(tok):
    assert tokenize_with_weights("", tok, SD1) == [padded([])]
    assert tokenize_with_weights("", tok, SD2) == [padded([], pad=0)]


def test_short_prompt(tok):
    chunks = tokenize_with_weights("a photo of a cat", tok)
    assert chunks == [padded([(A, 1.0), (1125, 1.0), (539, 1.0), (A, 1.0), (CAT, 1.0)])]


def test_sd2_pads_with_zero(tok):
    (chunk,) = tokenize_with_weights("a cat", tok, SD2)
    assert ids(chunk)[:4] == [START, A, CAT, END]
    assert ids(chunk)[4:] == [0] * 73


def test_weighted_segments(tok):
    (chunk,) = tokenize_with_weights("a (cat:1.5) ((b)) [c]", tok)
    assert chunk[:4] == [(START, 1.0), (A, 1.0), (CAT, 1.5), (B, 1.1 * 1.1)]
    # "[c]" is literal text: "[", "c", "]" at weight 1.
    assert chunk[4:8] == [*((t, 1.0) for t in tok.encode(" [c]")), (END, 1.0)]


def test_exactly_75_tokens_fit_one_chunk(tok):
    chunks = tokenize_with_weights("a " * 75, tok)
    assert chunks == [[(START, 1.0), *[(A, 1.0)] * 75, (END, 1.0)]]


def test_long_segment_is_cut_at_75(tok):
    # One unweighted segment of 80 tokens is a single group (>= 8), cut at the chunk edge.
    chunks = tokenize_with_weights("a " * 80, tok)
    assert chunks == [
        [(START, 1.0), *[(A, 1.0)] * 75, (END, 1.0)],
        padded([(A, 1.0)] * 5),
    ]


def test_short_group_moves_whole_to_the_next_chunk(tok):
    # 74 tokens, then a 3-token group that does not fit: chunk 1 is closed and padded.
    chunks = tokenize_with_weights("a " * 74 + "(b c d:1.5)", tok)
    assert chunks == [
        [(START, 1.0), *[(A, 1.0)] * 74, (END, 1.0), (END, 1.0)],
        padded([(B, 1.5), (C, 1.5), (D, 1.5)]),
    ]


def test_seven_token_group_moves_eight_token_group_splits(tok):
    seven = tokenize_with_weights("a " * 70 + "(" + "b " * 7 + ":1.2)", tok)
    assert ids(seven[0]) == [START, *[A] * 70, END, *[END] * 5]
    assert seven[1][:9] == [(START, 1.0), *[(B, 1.2)] * 7, (END, 1.0)]
    eight = tokenize_with_weights("a " * 70 + "(" + "b " * 8 + ":1.2)", tok)
    assert eight[0] == [(START, 1.0), *[(A, 1.0)] * 70, *[(B, 1.2)] * 5, (END, 1.0)]
    assert eight[1] == padded([(B, 1.2)] * 3)


def test_many_chunks(tok):
    chunks = tokenize_with_weights("a " * 200, tok)
    assert len(chunks) == 3
    assert all(len(c) == 77 for c in chunks)
    assert ids(chunks[2]).count(A) == 200 - 150


def test_empty_tokens():
    assert empty_tokens(SD1, 5) == [START, END, END, END, END]
    assert empty_tokens(SD2, 5) == [START, END, 0, 0, 0]


# ------------------------------------------------------------------------------------- encoding


def _run(model, chunks_ids):
    with torch.no_grad():
        return model(torch.tensor(chunks_ids))


def test_unweighted_prompt_is_the_model_output(tok, sd1_model):
    chunks = tokenize_with_weights("a photo of a cat", tok)
    cond, pooled = encode_token_weights(sd1_model, chunks, SD1)
    ref = _run(sd1_model, [ids(chunks[0])])
    assert cond.shape == (1, 77, 128) and cond.dtype == torch.float32
    assert torch.equal(cond, ref.last_hidden_state)
    assert torch.equal(pooled, ref.pooled)  # SD1: the unprojected pooled output


def test_weights_follow_comfyui_formula(tok, sd1_model):
    chunks = tokenize_with_weights("a (photo:1.3) of (a cat:0.7)", tok)
    cond, _ = encode_token_weights(sd1_model, chunks, SD1)
    out = _run(sd1_model, [ids(chunks[0]), empty_tokens(SD1, 77)])
    z, z_empty = out.last_hidden_state[0].clone(), out.last_hidden_state[1]
    for j, (_, w) in enumerate(chunks[0]):
        if w != 1.0:
            z[j] = (z[j] - z_empty[j]) * w + z_empty[j]
    assert weights(chunks[0])[:6] == [1.0, 1.0, 1.3, 1.0, 0.7, 0.7]
    torch.testing.assert_close(cond[0], z, rtol=1e-6, atol=1e-6)
    # Unweighted positions are untouched.
    torch.testing.assert_close(cond[0, :2], out.last_hidden_state[0, :2], rtol=0, atol=1e-6)


def test_chunks_are_concatenated_and_pooled_from_the_first(tok, sd1_model):
    chunks = tokenize_with_weights("a " * 80 + "(cat:1.2)", tok)
    assert len(chunks) == 2
    cond, pooled = encode_token_weights(sd1_model, chunks, SD1)
    assert cond.shape == (1, 154, 128)
    out = _run(sd1_model, [ids(chunks[0]), ids(chunks[1]), empty_tokens(SD1, 77)])
    torch.testing.assert_close(cond[0, :77], out.last_hidden_state[0], rtol=0, atol=1e-6)
    assert torch.allclose(pooled[0], out.pooled[0], atol=1e-6)
    assert pooled.shape == (1, 128)


def test_resolve_layer():
    assert resolve_layer(None, SD1, 12) is None
    assert resolve_layer(-1, SD1, 12) == -1
    assert resolve_layer(-2, SD1, 12) == -2
    assert resolve_layer(-12, SD1, 12) == -12
    assert resolve_layer(-13, SD1, 12) is None  # |idx| > layers: last layer
    assert resolve_layer(-24, SD1, 12) is None
    assert resolve_layer(None, SD2, 24) == -2  # SD2 defaults to the penultimate layer
    assert resolve_layer(-1, SD2, 24) == -1  # CLIPSetLastLayer(-1) on SD2 selects the LAST layer


def test_clip_skip_sd1(tok, sd1_model):
    chunks = tokenize_with_weights("a photo of a cat", tok)
    last, _ = encode_token_weights(sd1_model, chunks, SD1, layer_idx=-1)
    default, _ = encode_token_weights(sd1_model, chunks, SD1)
    skip2, pooled2 = encode_token_weights(sd1_model, chunks, SD1, layer_idx=-2)
    out = _run(sd1_model, [ids(chunks[0])])
    raw = sd1_model(torch.tensor([ids(chunks[0])]), hidden_layer=-2, normalize_hidden=False).hidden_state
    torch.testing.assert_close(last, default, rtol=0, atol=1e-6)
    # Penultimate block output, passed through the final LayerNorm (layer_norm_hidden_state=True).
    torch.testing.assert_close(skip2, sd1_model.final_norm(raw).detach(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(skip2, default)
    # pooled always comes from the last layer.
    torch.testing.assert_close(pooled2, out.pooled, rtol=0, atol=1e-6)
    # Out of range (tiny model has 3 layers): last layer.
    far, _ = encode_token_weights(sd1_model, chunks, SD1, layer_idx=-4)
    torch.testing.assert_close(far, default, rtol=0, atol=1e-6)


def test_sd2_defaults(tok, sd2_model):
    chunks = tokenize_with_weights("a (photo:1.2) of a cat", tok, SD2)
    assert ids(chunks[0])[-1] == 0
    cond, pooled = encode_token_weights(sd2_model, chunks, SD2)
    with torch.no_grad():
        out = sd2_model(torch.tensor([ids(chunks[0]), empty_tokens(SD2, 77)]), hidden_layer=-2)
    z, z_empty = out.hidden_state[0].clone(), out.hidden_state[1]
    z[2] = (z[2] - z_empty[2]) * 1.2 + z_empty[2]
    torch.testing.assert_close(cond[0], z, rtol=1e-6, atol=1e-6)
    assert pooled.shape == (1, 80)  # projected by text_projection
    torch.testing.assert_close(pooled[0], out.projected[0], rtol=0, atol=1e-6)
    last, _ = encode_token_weights(sd2_model, chunks, SD2, layer_idx=-1)
    assert not torch.allclose(last, cond)


# ---------------------------------------------------------------------------- textual inversion


@pytest.fixture
def embeddings_dir(tmp_path):
    g = torch.Generator().manual_seed(5)
    safetensors.torch.save_file(
        {"emb_params": torch.randn(2, 128, generator=g)}, tmp_path / "style.safetensors"
    )
    safetensors.torch.save_file(
        {"emb_params": torch.randn(3, 1024, generator=g)}, tmp_path / "sd2only.safetensors"
    )
    (tmp_path / "sub").mkdir()
    safetensors.torch.save_file(
        {"vec": torch.randn(128, generator=g)}, tmp_path / "sub" / "single.safetensors"
    )
    (tmp_path / "old.pt").write_bytes(b"not really a pickle")
    return tmp_path


def test_embedding_folder_lookup(embeddings_dir):
    folder = EmbeddingFolder([embeddings_dir])
    assert folder("style").shape == (2, 128)
    assert folder("style.safetensors").shape == (2, 128)
    assert folder("single").shape == (128,)  # found in a sub-folder
    assert folder("sub/single").shape == (128,)
    assert folder("missing") is None
    assert folder("../etc/passwd") is None
    assert folder("/etc/passwd") is None
    assert folder("") is None
    with pytest.raises(ModelError):
        folder("old")


def test_select_embedding_order():
    t = {k: torch.full((1, 4), float(i)) for i, k in enumerate(["a_first", "clip_g", "clip_l"])}
    assert select_embedding(t, "clip_l") is t["clip_l"]
    bundled = {
        "bundle_emb.x.string_to_param.*": torch.zeros(2, 4),
        "bundle_emb.y.string_to_param.*": torch.ones(1, 4),
        "lora_unet.weight": torch.ones(3, 3),
    }
    assert select_embedding(bundled, "clip_l").shape == (3, 4)
    per_encoder = {"bundle_emb.x.clip_g": torch.zeros(1, 8), "bundle_emb.x.clip_l": torch.ones(2, 4)}
    assert select_embedding(per_encoder, "clip_l").shape == (2, 4)
    assert select_embedding({"emb_params": torch.ones(5, 4)}, "clip_l").shape == (5, 4)
    assert select_embedding({"b": torch.ones(1), "a": torch.zeros(1)}, "clip_l") is not None
    assert select_embedding({}, "clip_l") is None


def test_embedding_tokens(tok, embeddings_dir):
    folder = EmbeddingFolder([embeddings_dir])
    (chunk,) = tokenize_with_weights("a (embedding:style:1.2) cat", tok, SD1, folder)
    # "(embedding:style:1.2)" weights a segment that starts with "embedding:".
    assert ids(chunk)[1] == A
    assert isinstance(chunk[2][0], torch.Tensor) and isinstance(chunk[3][0], torch.Tensor)
    assert weights(chunk)[2:4] == [1.2, 1.2]
    assert torch.equal(chunk[2][0], folder("style")[0])
    assert ids(chunk)[4:6] == [CAT, END]


def test_embedding_leftover_and_missing(tok, embeddings_dir):
    folder = EmbeddingFolder([embeddings_dir])
    (chunk,) = tokenize_with_weights("a embedding:style, cat", tok, SD1, folder)
    # "style," is not found, "style" is; the comma goes back to the text.
    assert ids(chunk)[4:7] == [*tok.encode(", cat"), END]
    (missing,) = tokenize_with_weights("a embedding:nothere cat", tok, SD1, folder)
    assert ids(missing)[:4] == [START, A, CAT, END]  # the unknown name is dropped
    (literal,) = tokenize_with_weights("a embedding:style cat", tok, SD1, None)
    assert ids(literal)[: 2 + len(tok.encode("embedding:style cat"))] == [
        START,
        A,
        *tok.encode("embedding:style cat"),
    ]


def test_embedding_encoding(tok, sd1_model, embeddings_dir):
    folder = EmbeddingFolder([embeddings_dir])
    chunks = tokenize_with_weights("a embedding:style cat", tok, SD1, folder)
    cond, pooled = encode_token_weights(sd1_model, chunks, SD1)
    token_ids = [t if isinstance(t, int) else 0 for t in ids(chunks[0])]
    with torch.no_grad():
        x = sd1_model.embed_tokens(torch.tensor(token_ids)).clone()
        x[2:4] = folder("style")
        ref = sd1_model(embeds=x[None], eos_index=torch.tensor([5]))
    torch.testing.assert_close(cond[0], ref.last_hidden_state[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled[0], ref.pooled[0], rtol=0, atol=1e-6)


def test_wrong_width_embedding_is_dropped_and_padded(tok, sd1_model, embeddings_dir):
    folder = EmbeddingFolder([embeddings_dir])
    chunks = tokenize_with_weights("a embedding:sd2only cat", tok, SD1, folder)
    assert sum(isinstance(t, torch.Tensor) for t in ids(chunks[0])) == 3
    cond, _ = encode_token_weights(sd1_model, chunks, SD1)
    plain = [(t, w) for t, w in chunks[0] if isinstance(t, int)] + [(END, 1.0)] * 3
    ref, _ = encode_token_weights(sd1_model, [plain], SD1)
    torch.testing.assert_close(cond, ref, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ the CLIP object


def test_load_text_encoder_detects_flavor(tok):
    sd1 = load_text_encoder(random_state_dict(CLIPTextConfig.tiny(), seed=1), tokenizer=tok)
    assert sd1.flavor is SD1
    cfg2 = CLIPTextConfig.tiny(activation="gelu", projection_dim=64)
    sd2 = load_text_encoder(random_state_dict(cfg2, seed=1, layout="sd2"), tokenizer=tok)
    assert sd2.flavor is SD2
    assert sd2.model.config.activation == "gelu"


def test_text_encoder_clip_layer_is_a_copy(tok, sd1_model):
    clip = TextEncoder(sd1_model, tok)
    skipped = clip.clip_layer(-2)
    assert clip.layer_idx is None and skipped.layer_idx == -2
    assert skipped.model is clip.model
    cond, pooled = skipped.encode("a photo of a cat")
    ref, ref_pooled = encode("a photo of a cat", tok, sd1_model, SD1, layer_idx=-2)
    assert torch.equal(cond, ref) and torch.equal(pooled, ref_pooled)
    assert not torch.equal(cond, clip.encode("a photo of a cat")[0])
