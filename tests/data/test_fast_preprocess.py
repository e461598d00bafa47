"""Canonical tokens, the gigatoken backend's identity checks, and the annotation budget.

- ``--no-annotations`` output is byte-identical to what Megatron-LM's preprocess_data.py writes: each document's
  whole-text encode plus EOD, through megatron-core's own ``IndexedDatasetBuilder``.
- In annotated mode each run of text between annotations is encoded as one string.
- gigatoken is used only when identical to the reference for the model; refused (with a notice, or an error
  when required) when it differs or cannot load the model.
- The budget options merge short chunks before annotation and cap tags, the same in tools/annotate.py and the
  embedded path.
"""

import io
import json
import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from megatron_anchor.annotation.budget import AnnotationBudget
from megatron_anchor.annotation.format import ANN_CLOSE, ANN_OPEN
from megatron_anchor.annotation.schema import Chunk, Document, DocumentError, parse_line
from megatron_anchor.data.indexed import iter_documents, roles_prefix
from megatron_anchor.roles import Role
from megatron_anchor.tokenizer import build_tokenizer
from megatron_anchor.tokenizer.fast import FastBackendError, GigatokenEncoder, first_difference, select_backend
from tests.conftest import file_bytes
from megatron_anchor.cli import annotate, preprocess_data

TYPES = {"sp": "SentencePieceTokenizer", "hf": "HuggingFaceTokenizer"}
HOSTILE_DOC = {"text": "Line one.\n\nA second <|ann|>x<|/ann|> paragraph <|endoftext|></s>\n\n\n  \nlast\n\n"}


@pytest.fixture(params=["sp", "hf"])
def model(request, sp_model, hf_tokenizer_dir):
    return TYPES[request.param], sp_model if request.param == "sp" else hf_tokenizer_dir


def _preprocess(inp, out, ttype, tmodel, *extra):
    return preprocess_data.main(["--input", str(inp), "--output-prefix", str(out), "--tokenizer-type", ttype,
                                 "--tokenizer-model", tmodel, "--no-progress", *extra])


def _megatron_reference(prefix, texts, tok):
    """What Megatron-LM's preprocess_data.py writes: whole-document encode + EOD, via IndexedDatasetBuilder."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(tok.vocab_size))
    for text in texts:
        ids = tok.encode_texts_reference([text])[0] + [tok.eod]
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
    builder.finalize(prefix + ".idx")


def test_plain_output_is_byte_identical_to_whole_document_encode(model, corpus_dir, tmp_path):
    ttype, tmodel = model
    tok = build_tokenizer(ttype, tmodel)
    raw = tmp_path / "raw.jsonl"
    lines = open(corpus_dir / "raw.jsonl", "rb").read().splitlines(keepends=True)[:150]
    raw.write_bytes(b"".join(lines) + (json.dumps(HOSTILE_DOC) + "\n").encode())
    texts = [json.loads(line)["text"] for line in raw.read_bytes().splitlines()]
    ref = str(tmp_path / "megatron")
    _megatron_reference(ref, texts, tok)
    want = {ext: open(ref + ext, "rb").read() for ext in (".bin", ".idx")}
    # raw input, annotated input (same text), fast backend and reference backend: all the same bytes
    annotated = tmp_path / "annotated.jsonl"
    assert annotate.main(["-i", str(raw), "-o", str(annotated), "--no-progress"]) == 0
    for name, inp, backend in (("raw", raw, "auto"), ("ann", annotated, "auto"), ("ref", raw, "reference")):
        out = tmp_path / name
        assert _preprocess(inp, out, ttype, tmodel, "--no-annotations", "--append-eod", "--workers", "2",
                           "--docs-per-part", "40", "--tokenizer-backend", backend) == 0
        got = file_bytes(str(out) + "_text_document")
        assert got[f"{name}_text_document.bin"] == want[".bin"], (name, backend)
        assert got[f"{name}_text_document.idx"] == want[".idx"], (name, backend)
        roles = list(iter_documents(roles_prefix(str(out) + "_text_document")))
        assert all((r[:-1] == Role.TEXT).all() and r[-1] == Role.EOD for r in roles)
    # the hostile document's delimiter and EOD texts stayed ordinary tokens
    last = list(iter_documents(str(tmp_path / "raw_text_document")))[-1]
    assert (last == tok.eod).sum() == 1 and not np.isin(last, [tok.ann_open, tok.ann_close]).any()


def test_annotated_runs_are_encoded_whole(hf_tokenizer_dir, tmp_path):
    """Chunks without tags join the run before them; each run is encoded as the tokenizer encodes it, so the
    blank line inside a run is the same tokens as in the whole text."""
    tok = build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir)
    doc = {"chunks": [{"text": "The chef baked.", "sep": "\n\n", "tags": [["topic", "cooking"]]},
                      {"text": "Then more bread.", "sep": "\n\n", "tags": []},
                      {"text": "And soup.", "sep": "\n\n", "tags": []},
                      {"text": "The band played.", "sep": "", "tags": [["topic", "music"], ["genre", "live"]]}]}
    inp = tmp_path / "a.jsonl"
    inp.write_text(json.dumps(doc) + "\n")
    assert _preprocess(inp, tmp_path / "o", "HuggingFaceTokenizer", hf_tokenizer_dir, "--append-eod") == 0
    [ids] = list(iter_documents(str(tmp_path / "o_text_document")))
    [roles] = list(iter_documents(roles_prefix(str(tmp_path / "o_text_document"))))
    text = ids[roles == Role.TEXT]
    run1 = tok.encode_text("The chef baked.\n\nThen more bread.\n\nAnd soup.\n\n")
    run2 = tok.encode_text("The band played.")
    assert text.tolist() == run1 + run2
    assert tok.decode(ids) == ("<|ann|>topic:cooking<|/ann|>The chef baked.\n\nThen more bread.\n\nAnd soup.\n\n"
                               "<|ann|>topic:music; genre:live<|/ann|>The band played.<|endoftext|>")


def test_annotated_fast_loop_makes_the_general_paths_pieces(hf_tokenizer_dir, corpus_dir):
    """The hot loop over annotated chunks (typed decoding, whole annotations memoised by their raw JSON bytes) gives
    exactly the pieces of the general path, repeated annotations and two spellings of the same JSON included;
    whatever it does not vouch for goes back to the general path, which names the chunk that is wrong. A tag list
    that only *looks* like a validated one (a dict whose keys spell a known tag) is not taken from the memo."""
    from megatron_anchor.data.convert import DocumentConverter, PartStats, PreprocessConfig, _add_annotated
    from megatron_anchor.tokenizer.pieces import PieceBatch

    tok = build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir)
    cfg = PreprocessConfig(input="x", output_prefix="y", tokenizer_type="HuggingFaceTokenizer",
                           tokenizer_model=hf_tokenizer_dir)
    docs = [json.loads(line) for line in open(corpus_dir / "annotated.jsonl", "rb")][:60]
    docs.append({"chunks": [{"text": "a", "tags": []}, {"text": "b", "sep": " \n", "tags": [["topic", "x"]]},
                            {"text": "c", "tags": [["topic", "x"]]}], "id": 3, "meta": {"k": 1}})
    docs += docs[:5]  # repeated annotations now come from the memo
    fast, slow = PieceBatch(), PieceBatch()
    for i, d in enumerate(docs):
        line = json.dumps(d, separators=(",", ":") if i % 2 else (", ", ": ")).encode()  # two spellings
        assert _add_annotated(line, fast, tok.pieces) == len(d["chunks"])
        fast.end_document()
        DocumentConverter()._add_document_slow(d, "w", cfg, tok.pieces, slow, PartStats())
        slow.end_document()
    assert (fast.codes, fast.texts, fast.text_roles, fast.doc_ends) == (slow.codes, slow.texts, slow.text_roles,
                                                                       slow.doc_ends)
    enc = lambda b: tok.pieces.encode(b)  # noqa: E731
    a, b = enc(fast), enc(slow)
    assert a.ids.tolist() == b.ids.tolist() and a.roles.tolist() == b.roles.tolist()

    known = {"chunks": [{"text": "x", "tags": [["topic", "cooking"]]}]}
    assert _add_annotated(json.dumps(known).encode(), PieceBatch(), tok.pieces) == 1
    for bad, needle in (([{"topic": 1, "cooking": 2}], "[key, value] pair"), ({"topic": "cooking"}, "must be a list"),
                        ([["topic", "a<|ann|>"]], "delimiter"), ("topic", "must be a list"),
                        (["topic"], "[key, value] pair")):
        doc = {"chunks": [{"text": "fine", "tags": [["topic", "cooking"]]}, {"text": "x", "tags": bad}]}
        batch = PieceBatch()
        assert _add_annotated(json.dumps(doc).encode(), batch, tok.pieces) is None
        batch.drop_open_document()
        assert batch.codes == [] and batch.texts == []
        with pytest.raises(DocumentError, match="chunk 1") as e:
            DocumentConverter()._add_document_slow(doc, "f.jsonl:9", cfg, tok.pieces, batch, PartStats())
        assert needle in str(e.value) and "f.jsonl:9" in str(e.value)
    # a chunk without tags makes the document raw (the general path annotates it); whatever else the typed
    # decoder does not vouch for goes back to the general path too, which decodes it as usual and says why
    for line in (b'{"chunks": [{"text": "x", "tags": [["topic", "a"]]}, {"text": "y"}]}',
                 b'{"chunks": [{"text": "x", "tags": null}]}', b'{"text": "raw"}', b'{"chunks": []}', b'[1]',
                 b'{"chunks": [{"text": "x", "sep": null, "tags": []}]}', b'{"chunks": [{"text": "", "tags": []}]}',
                 b'{"chunks": [{"text": "x", "sep": "y", "tags": []}]}', b'{"chunks": 3}', b'not json',
                 b'{"chunks": [{"text": 3, "tags": []}]}', b'{"chunks": [{"text": "a\xff", "tags": []}]}',
                 b'{"chunks": [{"text": "\\ud800", "tags": []}]}'):
        assert _add_annotated(line, PieceBatch(), tok.pieces) is None, line
    # duplicate keys resolve as the general decoder resolves them (the last wins)
    dup = b'{"chunks": [{"text": "first", "text": "last", "tags": [["topic", "x"]]}]}'
    one, two = PieceBatch(), PieceBatch()
    assert _add_annotated(dup, one, tok.pieces) == 1
    DocumentConverter()._add_document_slow(json.loads(dup), "w", cfg, tok.pieces, two, PartStats())
    assert one.texts == two.texts == ["last"] and one.codes == two.codes


def test_piece_layout_follows_the_codes(hf_tokenizer_dir):
    """A part's ids and roles are its pieces' in the order of the codes, whatever order the text pieces were
    added in: annotation pieces from the pool with their roles, each text piece encoded whole, EOD last."""
    from megatron_anchor.tokenizer.pieces import PieceBatch

    tok = build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir)
    enc = tok.pieces
    texts = ["First run of text.", " second\n\n", "third, with more words in it"]
    ann = enc.annotation_codes([("topic", "cooking"), ("tone", "dry")])
    in_order = PieceBatch(codes=[*ann, ~0, ~1, enc.eod, *ann, ~2, enc.eod], texts=list(texts),
                          text_roles=[int(Role.TEXT)] * 3, doc_ends=[2 + len(ann) + 1, 2 * len(ann) + 5],
                          meta=[None, None])
    shuffled = PieceBatch(codes=[*ann, ~1, ~0, enc.eod, *ann, ~2, enc.eod], texts=[texts[1], texts[0], texts[2]],
                          text_roles=[int(Role.TEXT)] * 3, doc_ends=list(in_order.doc_ends), meta=[None, None])
    a, b = enc.encode(in_order), enc.encode(shuffled)
    assert a.ids.tolist() == b.ids.tolist() and a.roles.tolist() == b.roles.tolist()
    assert a.doc_lengths.tolist() == b.doc_lengths.tolist() and a.longest_text.tolist() == b.longest_text.tolist()
    one = lambda t: tok.encode_texts_reference([t])[0]  # noqa: E731
    text_ids = one(texts[0]) + one(texts[1])
    first = a.documents()[0]
    n_ann = len(first[0]) - len(text_ids) - 1
    assert n_ann > 2 and first[0][n_ann:].tolist() == text_ids + [tok.eod]
    assert first[0][0] == tok.special_ids[ANN_OPEN] and first[0][n_ann - 1] == tok.special_ids[ANN_CLOSE]
    assert set(first[1][:n_ann].tolist()) <= {int(Role.ANNOTATION_KEY), int(Role.ANNOTATION_VALUE)}
    assert set(first[1][n_ann:-1].tolist()) == {int(Role.TEXT)} and first[1][-1] == int(Role.EOD)


def test_fast_backend_identity_check_accepts_and_matches(model, corpus_dir):
    ttype, tmodel = model
    tok = build_tokenizer(ttype, tmodel)
    assert tok.backend_name == tok.reference_name
    notice = select_backend(tok, "auto", ["a sample text", "with\n\nblank lines"])
    assert notice.startswith("tokenizer: gigatoken") and "identical" in notice and "\n" not in notice
    assert tok.backend_name == "gigatoken"
    texts = [json.loads(line)["text"] for line in open(corpus_dir / "raw.jsonl")]
    ids, lengths = tok.encode_flat(texts)
    ref = tok.encode_texts_reference(texts)
    assert lengths.tolist() == [len(r) for r in ref] and ids.tolist() == [i for r in ref for i in r]
    # every special token's text inside ordinary text stays ordinary tokens, as with the reference
    for special in tok.special_texts():
        got, _ = tok.encode_flat([f"a{special}b"])
        assert not np.isin(got, [tok.ann_open, tok.ann_close, tok.eod]).any()


def _hf_variant(hf_tokenizer_dir, tmp_path):
    """A legal tokenizer.json that gigatoken 0.10 encodes differently: a non-special added token."""
    data = json.load(open(os.path.join(hf_tokenizer_dir, "tokenizer.json")))
    data["added_tokens"].append({"id": len(data["model"]["vocab"]), "content": "the", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False, "special": False})
    data["model"]["vocab"]["the-added"] = len(data["model"]["vocab"])
    d = tmp_path / "variant"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(data))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return str(d)


def test_fast_backend_is_refused_when_it_differs(hf_tokenizer_dir, corpus_dir, tmp_path, caplog):
    variant = _hf_variant(hf_tokenizer_dir, tmp_path)
    tok = build_tokenizer("HuggingFaceTokenizer", variant, check_roundtrip=False)
    fast = GigatokenEncoder.for_tokenizer(tok)
    sample = ["the cat and the dog"]
    assert first_difference(tok, fast, sample) is not None  # a real disagreement, not a simulated one
    notice = select_backend(tok, "auto", sample)
    assert notice.startswith("tokenizer: tokenizers") and "differs" in notice and "\n" not in notice
    assert tok.backend_name == tok.reference_name
    with pytest.raises(FastBackendError, match="differs"):
        select_backend(build_tokenizer("HuggingFaceTokenizer", variant, check_roundtrip=False), "gigatoken", sample)
    # the tool: auto falls back (same bytes as the reference backend), gigatoken stops with the reason
    inp = corpus_dir / "raw.jsonl"
    import logging

    caplog.set_level(logging.INFO)
    assert _preprocess(inp, tmp_path / "auto", "HuggingFaceTokenizer", variant, "--no-annotations") == 0
    assert "differs from tokenizers" in caplog.text
    assert _preprocess(inp, tmp_path / "ref", "HuggingFaceTokenizer", variant, "--no-annotations",
                       "--tokenizer-backend", "reference") == 0
    assert (list(file_bytes(str(tmp_path / "auto_text_document")).values())
            == list(file_bytes(str(tmp_path / "ref_text_document")).values()))
    assert _preprocess(inp, tmp_path / "req", "HuggingFaceTokenizer", variant, "--no-annotations",
                       "--tokenizer-backend", "gigatoken") == 1


def test_fast_backend_refused_for_models_it_cannot_load(tmp_path, monkeypatch, sp_model):
    import sentencepiece as spm

    from megatron_anchor.tokenizer import fast

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world", "abc def"] * 50), model_writer=model,
                                   vocab_size=40, model_type="unigram", minloglevel=2, hard_vocab_limit=False)
    path = tmp_path / "unigram.model"
    path.write_bytes(model.getvalue())
    tok = build_tokenizer("SentencePieceTokenizer", str(path), check_roundtrip=False)
    assert "cannot load unigram.model" in select_backend(tok, "auto")
    assert tok.backend_name.startswith("sentencepiece")
    with pytest.raises(FastBackendError, match="cannot load"):
        select_backend(tok, "gigatoken")
    assert "--tokenizer-backend reference" in select_backend(build_tokenizer("SentencePieceTokenizer", sp_model),
                                                              "reference")
    monkeypatch.setattr(fast, "gigatoken_version", lambda: None)  # what a machine without the extra sees
    assert "not installed" in select_backend(build_tokenizer("SentencePieceTokenizer", sp_model), "auto")


def test_gigatoken_internals_we_rely_on(sp_model):
    """Tripwire: the SentencePiece converter is a gigatoken internal; encode_batch must stay a flat awkward list."""
    import awkward as ak
    import gigatoken
    from gigatoken._load.sentencepiece import sentencepiece_to_tokenizer_json

    data = json.loads(sentencepiece_to_tokenizer_json(open(sp_model, "rb").read()))
    assert "added_tokens" in data and "model" in data
    arr = gigatoken.Tokenizer.from_json(json.dumps(data)).encode_batch(["ab", "", "abc abc"], parallel=False)
    assert ak.to_numpy(ak.num(arr, axis=1)).tolist()[1] == 0 and ak.flatten(arr, axis=1).ndim == 1


def test_sentencepiece_conversion_is_cached_and_still_checked(sp_model, tmp_path, monkeypatch):
    """The SentencePiece -> gigatoken conversion is kept in the cache; a damaged entry is converted again, and a
    wrong one (another model's) is caught by the identity check, never used."""
    import gigatoken._load.sentencepiece as gsp
    import sentencepiece as spm

    from megatron_anchor.tokenizer import fast

    monkeypatch.setenv("MEGATRON_ANCHOR_CACHE", str(tmp_path / "cache"))
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    assert "identical" in select_backend(tok, "auto")
    (entry,) = (tmp_path / "cache" / "gigatoken").iterdir()
    first = entry.read_text()

    convert = gsp.sentencepiece_to_tokenizer_json
    calls = []
    monkeypatch.setattr(gsp, "sentencepiece_to_tokenizer_json", lambda b: calls.append(1) or convert(b))
    assert "identical" in select_backend(build_tokenizer("SentencePieceTokenizer", sp_model), "auto")
    assert calls == []  # served by the cache
    entry.write_text('{"half a file')
    assert "identical" in select_backend(build_tokenizer("SentencePieceTokenizer", sp_model), "gigatoken")
    assert calls == [1] and entry.read_text() == first  # converted again, entry replaced

    other = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world", "abc def ghi"] * 50), model_writer=other,
                                   vocab_size=300, model_type="bpe", byte_fallback=True, minloglevel=2,
                                   hard_vocab_limit=False)
    entry.write_text(convert(other.getvalue()))  # valid, but another model's
    again = build_tokenizer("SentencePieceTokenizer", sp_model)
    notice = select_backend(again, "auto")
    assert "differs" in notice and again.backend_name.startswith("sentencepiece"), notice
    with pytest.raises(FastBackendError, match="differs"):
        select_backend(build_tokenizer("SentencePieceTokenizer", sp_model), "gigatoken")

    (tmp_path / "ro").write_text("a file where the cache folder would be")
    monkeypatch.setenv("MEGATRON_ANCHOR_CACHE", str(tmp_path / "ro"))  # an unusable cache: convert every time
    assert fast.sentencepiece_json(sp_model) == first


def test_budget_merge_and_cap_keep_the_text():
    doc = Document([Chunk("a", "\n\n"), Chunk("bb", "\n\n"), Chunk("c" * 50, "\n\n"), Chunk("d", "\n\n",
                    [("topic", "x"), ("genre", "y"), ("tone", "z")]), Chunk("e", "\n"), Chunk("f", "")])
    text = doc.text
    AnnotationBudget(merge_below_chars=6, max_tags=2).merge(doc)
    assert [c.text for c in doc.chunks] == ["a\n\nbb\n\n" + "c" * 50, "d", "e\nf"] and doc.text == text
    AnnotationBudget(max_tags=2).cap(doc)
    assert doc.chunks[1].tags == [("topic", "x"), ("genre", "y")]
    with pytest.raises(ValueError):
        AnnotationBudget(merge_below_chars=-1)


def test_budget_is_shared_by_annotate_and_the_embedded_path(corpus_dir, sp_model, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    raw = corpus_dir / "raw.jsonl"
    budget = ["--merge-chunks-below", "400", "--max-tags-per-chunk", "3"]
    annotated = tmp_path / "ann.jsonl"
    assert annotate.main(["-i", str(raw), "-o", str(annotated), "--no-progress", *budget]) == 0
    docs = [parse_line(line, "x") for line in open(annotated, "rb")]
    plain = [parse_line(line, "x") for line in open(raw, "rb")]
    assert [d.text for d in docs] == [d.text for d in plain]
    assert sum(len(d.chunks) for d in docs) < sum(len(d.chunks) for d in plain)
    assert max(len(c.tags) for d in docs for c in d.chunks) == 3
    args = ["--append-eod", "--tokenizer-backend", "reference"]
    assert _preprocess(annotated, tmp_path / "two_step", "SentencePieceTokenizer", sp_model, *args) == 0
    assert _preprocess(raw, tmp_path / "embedded", "SentencePieceTokenizer", sp_model, *args, *budget) == 0
    assert (list(file_bytes(str(tmp_path / "two_step_text_document")).values())
            == list(file_bytes(str(tmp_path / "embedded_text_document")).values()))
    assert _preprocess(raw, tmp_path / "paper", "SentencePieceTokenizer", sp_model, *args) == 0
    shares = [float(line.split(": ")[1].split("%")[0]) for line in caplog.text.splitlines()
              if "of this dataset's tokens" in line]
    assert len(shares) == 3 and shares[2] > shares[1] + 5  # the paper's default spends far more on annotations
    assert "at most 3 tags per chunk" in caplog.text
