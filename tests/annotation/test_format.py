"""The interleaved serialisation, tag validation/sanitising, chunking and the annotated JSONL schema."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_anchor.annotation.chunking import split_chunks
from megatron_anchor.annotation.format import (
    ANN_CLOSE,
    ANN_OPEN,
    annotation_segments,
    chunk_segments,
    parse_annotation,
    render,
    sanitize_tags,
    sanitize_value,
    serialize_annotation,
    split_annotated_text,
    tag_problem,
)
from megatron_anchor.annotation.schema import DocumentError, parse_line
from megatron_anchor.roles import Role


def test_annotation_segments_roles_and_text():
    segs = annotation_segments([("topic", "cooking"), ("genre", "recipe")])
    assert render(segs) == "<|ann|>topic:cooking; genre:recipe<|/ann|>"
    assert [(s.text, s.role, s.special) for s in segs] == [
        (ANN_OPEN, Role.ANNOTATION_KEY, True),
        ("topic:", Role.ANNOTATION_KEY, False),
        ("cooking", Role.ANNOTATION_VALUE, False),
        ("; genre:", Role.ANNOTATION_KEY, False),
        ("recipe", Role.ANNOTATION_VALUE, False),
        (ANN_CLOSE, Role.ANNOTATION_KEY, True),
    ]


def test_chunk_without_tags_has_no_annotation_block():
    assert chunk_segments("hello", "\n\n", []) == chunk_segments("hello", "\n\n", None)
    assert render(chunk_segments("hello", "\n\n", None)) == "hello\n\n"


def test_parse_annotation_round_trip():
    tags = [("topic", "space travel"), ("entities", "Kyoto, Lima"), ("tone", "calm")]
    assert parse_annotation(serialize_annotation(tags)) == tags
    anns, plain = split_annotated_text("<|ann|>topic:a<|/ann|>Hello <|ann|>topic:b; x:y<|/ann|>world")
    assert anns == [[("topic", "a")], [("topic", "b"), ("x", "y")]] and plain == "Hello world"


@pytest.mark.parametrize("key,value,needle", [
    ("Topic", "x", "lower-case"),
    ("topic", "", "empty"),
    ("topic", "a<|ann|>b", "delimiter"),
    ("topic", "a<|/ann|>", "delimiter"),
    ("topic", "two\nlines", "newline"),
    ("topic", "a; b", "separator"),
    ("topic", " padded", "whitespace"),
    ("topic", "x" * 500, "limit"),
    ("topic", 3, "strings"),
])
def test_tag_problem_names_the_problem(key, value, needle):
    assert needle in tag_problem(key, value)


def test_tag_problem_accepts_good_tags():
    assert tag_problem("time_period", "19th century, Europe") is None


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_sanitized_values_are_always_valid(value):
    v = sanitize_value(value)
    assert v == "" or tag_problem("topic", v) is None


def test_sanitize_cannot_reassemble_delimiters():
    assert sanitize_value("<|a<|ann|>nn|>x") == "x"
    assert sanitize_value("<|/a<|/ann|>nn|>") == ""
    assert sanitize_tags([("Time Period", "a\nb"), ("bad key!", "v"), ("k", "<|ann|>")]) == [("time_period", "a b")]


@given(st.text(alphabet=st.sampled_from(list("ab \t\n\r.")), max_size=120))
@settings(max_examples=500, deadline=None)
def test_chunking_is_exact(text):
    chunks = split_chunks(text)
    assert "".join(t + s for t, s in chunks) == text
    for t, s in chunks:
        assert t  # no empty chunk text
        assert s.strip() == ""


def test_chunking_examples():
    assert split_chunks("") == []
    assert split_chunks("a\n\nb") == [("a", "\n\n"), ("b", "")]
    assert split_chunks("a\nb\n  \n\t\nc\n\n") == [("a\nb", "\n  \n\t\n"), ("c", "\n\n")]
    assert split_chunks("\n\nlead") == [("\n\nlead", "")]
    assert split_chunks("x\r\n\r\ny") == [("x", "\r\n\r\n"), ("y", "")]


def _err(line: bytes) -> str:
    with pytest.raises(DocumentError) as e:
        parse_line(line, "corpus.jsonl:7")
    assert str(e.value).startswith("corpus.jsonl:7")
    return str(e.value)


def test_schema_errors_name_the_line():
    assert "malformed JSON" in _err(b'{"text": ')
    assert "invalid UTF-8" in _err(b'{"text": "\xff\xfe"}')
    assert "empty document" in _err(b'{"text": "   \\n\\n "}')
    assert "needs 'chunks' (annotated) or 'text'" in _err(b'{"body": "x"}')
    assert "empty list" in _err(b'{"chunks": []}')
    assert "chunk 0" in _err(b'{"chunks": [{"sep": ""}]}')
    assert "pair" in _err(b'{"chunks": [{"text": "x", "tags": [["topic"]]}]}')
    assert "delimiter" in _err(json.dumps({"chunks": [{"text": "x", "tags": [["topic", "<|ann|>"]]}]}).encode())
    assert "newline" in _err(json.dumps({"chunks": [{"text": "x", "tags": [["topic", "a\nb"]]}]}).encode())
    assert "whitespace-only" in _err(json.dumps({"chunks": [{"text": "x", "sep": "y"}]}).encode())
    assert "JSON object" in _err(b"[1, 2]")


def test_schema_round_trip():
    line = json.dumps({"id": 3, "chunks": [{"text": "A", "sep": "\n\n", "tags": [["topic", "t"]]},
                                           {"text": "B", "sep": "", "tags": []}], "meta": {"src": "x"}})
    doc = parse_line(line.encode(), "f:1")
    assert doc.annotated and doc.text == "A\n\nB" and doc.doc_id == 3
    assert json.loads(doc.to_jsonl()) == json.loads(line)
    raw = parse_line(b'{"text": "A\\n\\nB"}', "f:2")
    assert not raw.annotated and [c.text for c in raw.chunks] == ["A", "B"]
