"""SFT formatting: exact roles for known samples, decode round trip, templates, bad input, format-stability choice."""

import json

import pytest

from megatron_anchor.annotation.schema import DocumentError
from megatron_anchor.data.sft import (
    TEMPLATE_PRESETS,
    ChatTemplate,
    is_format_stable,
    load_template,
    parse_sample,
    parse_sample_line,
    sample_segments,
)
from megatron_anchor.roles import Role
from megatron_anchor.tokenizer import build_tokenizer

P, K, V, R, E = Role.PROMPT, Role.ANNOTATION_KEY, Role.ANNOTATION_VALUE, Role.RESPONSE, Role.EOD

SINGLE = {"prompt": "Tell me about the oven.", "response": "The oven in Lyon is hot.",
          "annotation": [["topic", "cooking"], ["entities", "Lyon"]]}
MULTI = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": "Hello.", "annotation": [["tone", "neutral"]]},
    {"role": "user", "content": "A song?"},
    {"role": "assistant", "content": "La la.", "annotation": [["topic", "music"], ["genre", "song"]]},
]}


@pytest.fixture(scope="module")
def tok(sp_model):
    return build_tokenizer("SentencePieceTokenizer", sp_model)


def role_runs(tok, ids, roles):
    """Consecutive tokens of one role, decoded: [(text, role), ...]."""
    runs = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or roles[i] != roles[start]:
            runs.append((tok.decode([int(x) for x in ids[start:i]]), Role(int(roles[start]))))
            start = i
    return runs


def encode(tok, obj, template="simple", **kw):
    segs = sample_segments(parse_sample(obj, "t:1"), TEMPLATE_PRESETS[template], eod=tok.eod_segment(), **kw)
    (ids, roles), = tok.encode_segments([segs])
    return segs, ids, roles


def test_single_turn_roles_are_exact(tok):
    segs, ids, roles = encode(tok, SINGLE)
    eod = tok.eod_text
    assert role_runs(tok, ids, roles) == [
        ("User: Tell me about the oven.\nAssistant: ", P),
        ("<|ann|>topic:", K), ("cooking", V), ("; entities:", K), ("Lyon", V), ("<|/ann|>", K),
        ("The oven in Lyon is hot.\n", R), (eod, E),
    ]
    text = "User: Tell me about the oven.\nAssistant: <|ann|>topic:cooking; entities:Lyon<|/ann|>The oven in Lyon is hot.\n"
    assert tok.decode([int(x) for x in ids]) == text + eod
    assert "".join(s.text for s in segs) == text + eod


def test_multi_turn_roles_are_exact_and_only_assistant_turns_are_response(tok):
    _, ids, roles = encode(tok, MULTI)
    assert role_runs(tok, ids, roles) == [
        ("System: Be brief.\nUser: Hi?\nAssistant: ", P),
        ("<|ann|>tone:", K), ("neutral", V), ("<|/ann|>", K), ("Hello.\n", R),
        ("User: A song?\nAssistant: ", P),
        ("<|ann|>topic:", K), ("music", V), ("; genre:", K), ("song", V), ("<|/ann|>", K), ("La la.\n", R),
        (tok.eod_text, E),
    ]
    assert (ids == tok.ann_open).sum() == 2  # the delimiters are their special ids, once per assistant turn


def test_format_stable_sample_keys_are_response_values_stay_masked(tok):
    _, ids, roles = encode(tok, SINGLE, format_stable=True)
    assert role_runs(tok, ids, roles) == [
        ("User: Tell me about the oven.\nAssistant: ", P),
        ("<|ann|>topic:", R), ("cooking", V), ("; entities:", R), ("Lyon", V),
        ("<|/ann|>The oven in Lyon is hot.\n", R), (tok.eod_text, E),
    ]
    assert (ids == tok.ann_open).sum() == 1 and (ids == tok.ann_close).sum() == 1


def test_no_annotations_gives_the_standard_sft_sample(tok):
    _, ids, roles = encode(tok, MULTI, template="chatml", annotations=False)
    assert role_runs(tok, ids, roles) == [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n", P),
        ("Hello.<|im_end|>\n", R),
        ("<|im_start|>user\nA song?<|im_end|>\n<|im_start|>assistant\n", P),
        ("La la.<|im_end|>\n", R), (tok.eod_text, E),
    ]
    assert not (ids == tok.ann_open).any()


def test_delimiter_text_inside_a_response_is_ordinary_text(tok):
    obj = {"prompt": "x", "response": "write <|ann|> literally", "annotation": [["topic", "t"]]}
    _, ids, roles = encode(tok, obj, template="plain")
    assert (ids == tok.ann_open).sum() == 1  # only the real annotation's delimiter
    assert tok.decode([int(x) for x in ids]).endswith("write <|ann|> literally\n\n" + tok.eod_text)


@pytest.mark.parametrize("obj, fragment", [
    ({"prompt": "hi"}, "missing response"),
    ({"prompt": "hi", "response": "  "}, "empty response"),
    ({"prompt": "", "response": "x"}, "empty prompt"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}, "empty assistant turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}, "unknown role 'tool'"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, "must be the assistant"),
    ({"prompt": "a", "response": "b", "annotation": [["Bad Key", "x"]]}, "lower-case identifier"),
    ({"prompt": "a", "response": "b", "annotation": [["k", "a;b"]]}, "separator"),
    ({"text": "pretraining document"}, "needs 'messages' or 'prompt'"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_samples_name_the_line(obj, fragment):
    with pytest.raises(DocumentError) as err:
        parse_sample_line(json.dumps(obj).encode(), "sft.jsonl:17")
    assert str(err.value).startswith("sft.jsonl:17")
    assert fragment in str(err.value)


def test_malformed_json_names_the_line():
    with pytest.raises(DocumentError, match=r"^sft.jsonl:3: malformed JSON"):
        parse_sample_line(b'{"prompt": ', "sft.jsonl:3")


def test_template_presets_and_files(tmp_path):
    assert load_template("chatml") is TEMPLATE_PRESETS["chatml"]
    f = tmp_path / "mine.yaml"
    f.write_text("base: simple\nassistant_prefix: 'Bot: '\n")
    t = load_template(str(f))
    assert t == ChatTemplate(name="mine", system_prefix="System: ", system_suffix="\n", user_prefix="User: ",
                             user_suffix="\n", assistant_prefix="Bot: ", assistant_suffix="\n")
    j = tmp_path / "t.json"
    j.write_text(json.dumps({"user_prefix": "Q: ", "bogus": 1}))
    with pytest.raises(ValueError, match="unknown template fields"):
        load_template(str(j))
    with pytest.raises(ValueError, match="neither a preset"):
        load_template("nope")


def _samples(n):
    return [parse_sample({"prompt": f"question {i}", "response": f"answer {i}"}, "t") for i in range(n)]


@pytest.mark.parametrize("fraction", [0.003, 0.05, 0.3])
def test_format_stability_share_is_honoured_and_deterministic(fraction):
    samples = _samples(20000)
    chosen = [is_format_stable(s, fraction, seed=0) for s in samples]
    n, k = len(samples), sum(chosen)
    sd = (n * fraction * (1 - fraction)) ** 0.5
    assert abs(k - n * fraction) < 5 * sd + 1, (k, n * fraction)
    assert chosen == [is_format_stable(s, fraction, seed=0) for s in _samples(20000)]
    other_seed = [is_format_stable(s, fraction, seed=1) for s in samples]
    assert other_seed != chosen


def test_format_stability_ignores_annotations_and_key_order():
    a = parse_sample({"prompt": "p", "response": "r"}, "t")
    b = parse_sample({"response": "r", "annotation": [["topic", "x"]], "prompt": "p", "id": 9}, "t")
    assert a.content_key() == b.content_key()
    assert is_format_stable(a, 0.5, 3) == is_format_stable(b, 0.5, 3)
    assert all(is_format_stable(a, 1.0, s) for s in range(5))
    assert not any(is_format_stable(a, 0.0, s) for s in range(5))
