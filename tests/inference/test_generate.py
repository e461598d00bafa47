"""Anchored, conditioned and plain generation on a tiny trained checkpoint; KV cache; bad input."""

import json

import pytest
import torch

from megatron_anchor.annotation.format import ANN_CLOSE, ANN_OPEN, serialize_annotation
from megatron_anchor.inference import CheckpointError, PromptFileError, SamplingParams, generate_ids, read_prompts
from megatron_anchor.inference.prompts import parse_prompt

TAGS = [["topic", "cooking"], ["genre", "recipe"], ["location", "Lyon"]]


def _prompt(**kw):
    return parse_prompt({"prompt": "The market in the old town", **kw}, "test", 0)


@pytest.mark.integration
def test_anchored_writes_annotation_then_response(tiny_generator):
    g, tok = tiny_generator, tiny_generator.tokenizer
    params = SamplingParams(max_new_tokens=24, max_annotation_tokens=32)
    prompt_ids = g.prompt_ids(_prompt(), "anchored")
    samples = generate_ids(g.model, prompt_ids, 4, "anchored", params, tok.eod, tok.ann_open, tok.ann_close,
                           vocab_size=tok.vocab_size, seed=3)
    for s in samples:
        assert 1 <= len(s.annotation_ids) <= 32
        assert tok.ann_open not in s.annotation_ids and tok.ann_close not in s.annotation_ids
        assert not {tok.ann_open, tok.ann_close} & set(s.response_ids)
        assert len(s.response_ids) <= 24
    rows = g.generate(_prompt(), 4, "anchored", params, seed=3)
    for row, s in zip(rows, samples):  # same seed: same draws through the high-level API
        assert ANN_OPEN not in row["response"] and ANN_CLOSE not in row["response"]
        assert row["annotation_tokens"] == len(s.annotation_ids)
        assert row["annotation"]["text"] == tok.decode(s.annotation_ids)


@pytest.mark.integration
def test_annotation_cap_forces_the_closing_delimiter(tiny_generator):
    rows = tiny_generator.generate(_prompt(), 3, "anchored", SamplingParams(max_new_tokens=8,
                                                                            max_annotation_tokens=4), seed=0)
    for r in rows:
        ann = r["annotation"]
        # A tiny model may not close by itself: then the cap closes it, and the report says so.
        assert r["annotation_tokens"] <= 4 and (ann["closed"] or r["annotation_tokens"] == 4)
        assert all(len(t) == 2 for t in ann["tags"])


@pytest.mark.integration
def test_conditioned_uses_the_given_tags_in_training_format(tiny_generator):
    g, tok = tiny_generator, tiny_generator.tokenizer
    prompt = _prompt(annotation=TAGS)
    ids = g.prompt_ids(prompt, "conditioned")
    plain = g.prompt_ids(prompt, "plain")
    ann_ids = ids[len(plain):]
    # Exactly the annotation as preprocessing serialises it: delimiters as special ids, tags as text.
    assert ann_ids[0] == tok.ann_open and ann_ids[-1] == tok.ann_close
    assert tok.decode(ann_ids) == serialize_annotation([tuple(t) for t in TAGS])
    rows = g.generate(prompt, 3, "conditioned", SamplingParams(max_new_tokens=16), seed=1)
    for r in rows:
        assert r["annotation"]["tags"] == TAGS
        assert ANN_OPEN not in r["response"] and ANN_CLOSE not in r["response"]
    with pytest.raises(ValueError, match="needs an 'annotation'"):
        g.generate(_prompt(), 1, "conditioned", SamplingParams())


@pytest.mark.integration
def test_seeds_reproduce_and_differ(tiny_generator):
    p = SamplingParams(max_new_tokens=12)
    a = tiny_generator.generate(_prompt(), 2, "plain", p, seed=5)
    b = tiny_generator.generate(_prompt(), 2, "plain", p, seed=5)
    c = tiny_generator.generate(_prompt(), 2, "plain", p, seed=6)
    assert a == b and a != c


@pytest.mark.integration
def test_kv_cache_matches_full_recompute(tiny_generator):
    g, tok = tiny_generator, tiny_generator.tokenizer
    ids = g.prompt_ids(_prompt(), "anchored")
    kw = dict(eod=tok.eod, ann_open=tok.ann_open, ann_close=tok.ann_close, vocab_size=tok.vocab_size, seed=2)
    cached = generate_ids(g.model, ids, 2, "anchored", SamplingParams(temperature=0, max_new_tokens=20), **kw)
    full = generate_ids(g.model, ids, 2, "anchored", SamplingParams(temperature=0, max_new_tokens=20,
                                                                    use_cache=False), **kw)
    assert [(s.annotation_ids, s.response_ids) for s in cached] == [(s.annotation_ids, s.response_ids) for s in full]


@pytest.mark.parametrize("position_embedding", ["rope", "learned_absolute"])
def test_prompts_batched_together_sample_what_each_samples_alone(position_embedding):
    """Prompts of different lengths in one left-padded batch: every row's draws equal those of its prompt sampled
    alone with its seed (greedy and at temperature 1, cached and recomputed), rows cut at the context length
    included, and the padded forward pass gives each row its unpadded logits."""
    from megatron_anchor.inference import DecoderLM, ModelSpec, generate_batch

    torch.manual_seed(0)
    spec = ModelSpec(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     ffn_hidden_size=64, max_positions=40, position_embedding=position_embedding)
    model = DecoderLM(spec).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    long, short = [1, 2, 3, 4, 5, 6, 7], [9, 8, 7]
    with torch.no_grad():
        padded = model(torch.tensor([long, [0] * 4 + short]), 0, None, pad=torch.tensor([0, 4]))
        assert torch.isfinite(padded).all()  # padding slots attend to themselves only: no fully masked row
        assert torch.allclose(padded[0], model(torch.tensor([long]))[0], atol=1e-5)
        assert torch.allclose(padded[1, 4:], model(torch.tensor([short]))[0], atol=1e-5)
    kw = dict(eod=0, ann_open=48, ann_close=49)

    def key(samples):
        return [(s.annotation_ids, s.response_ids, s.annotation_closed, s.finished) for s in samples]

    for temperature in (0.0, 1.0):
        for use_cache in (True, False):
            params = SamplingParams(temperature=temperature, max_new_tokens=30, max_annotation_tokens=5,
                                    use_cache=use_cache)
            together = generate_batch(model, [long, short], [2, 3], "anchored", params, seeds=[1, 2], **kw)
            alone = [generate_ids(model, long, 2, "anchored", params, seed=1, **kw),
                     generate_ids(model, short, 3, "anchored", params, seed=2, **kw)]
            assert [key(t) for t in together] == [key(a) for a in alone]
    # 7 + 1 prompt tokens, up to 5 + 1 annotation tokens and 30 response tokens overrun 40 positions: some cut.
    assert any(not s.finished and len(s.response_ids) < 30 for s in together[0])


@pytest.mark.integration
def test_decoder_matches_megatron_logits(tiny_checkpoint, tiny_generator):
    from megatron_anchor.inference.checkpoint import config_from_args, load_megatron_model, megatron_session

    cfg = config_from_args(tiny_checkpoint["args"])
    tok = tiny_generator.tokenizer
    ids = torch.tensor([[tok.ann_open] + tok.encode_text("topic:food") + [tok.ann_close] +
                        tok.encode_text("The bread in the oven is warm.")])
    with megatron_session():
        loaded = load_megatron_model(cfg, tiny_checkpoint["load"], tok.vocab_size, keep_model=True)
        assert loaded.saved_layout["tp"] == 2  # resharded TP=2 -> one process
        with torch.no_grad():
            ref = loaded.megatron_model(ids, torch.arange(ids.shape[1])[None], attention_mask=None)
    with torch.no_grad():
        ours = tiny_generator.model(ids)
    assert (ref - ours).abs().max().item() <= 1e-4


@pytest.mark.integration
def test_generate_tool_end_to_end(tiny_checkpoint, tmp_path):
    from megatron_anchor.cli import generate

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "x", "prompt": "A story about the sea", "annotation": TAGS}) + "\n" +
                       json.dumps({"id": "y", "messages": [{"role": "user", "content": "Hello"}], "n": 1,
                                   "annotation": TAGS}) + "\n")
    for mode in ("anchored", "conditioned", "plain"):
        out = tmp_path / f"{mode}.jsonl"
        assert generate.main(["--prompts", str(prompts), "--output", str(out), "--load", tiny_checkpoint["load"],
                              "--mode", mode, "--n", "2", "--max-new-tokens", "8", *tiny_checkpoint["args"]]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [(r["id"], r["sample"]) for r in rows] == [("x", 0), ("x", 1), ("y", 0)]
        assert all(ANN_OPEN not in r["response"] for r in rows)
        assert all(("annotation" in r) == (mode != "plain") for r in rows)


@pytest.mark.parametrize("content,message", [
    ("", "no prompts"),
    ('{"prompt": "ok"}\n{"prompt": \n', ":2: malformed JSON"),
    ('{"text": "x"}\n', "needs 'prompt' or 'messages'"),
    ('{"prompt": ""}\n', "non-empty string"),
    ('{"prompt": "a", "n": 0}\n', "'n' must be a positive integer"),
    ('{"prompt": "a", "annotation": [["Bad Key!", "v"]]}\n', "lower-case identifier"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n', "ends with a user"),
    ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', "duplicate prompt id"),
])
def test_prompt_file_errors(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(PromptFileError, match=message):
        read_prompts(str(path))


@pytest.mark.integration
def test_bad_checkpoints_give_clear_errors(tiny_checkpoint, tmp_path, capsys):
    from megatron_anchor.inference import load_from_checkpoint
    from megatron_anchor.cli import generate

    (tmp_path / "junk").mkdir()
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_from_checkpoint(tiny_checkpoint["args"], str(tmp_path / "junk"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_from_checkpoint(tiny_checkpoint["args"], str(tmp_path / "missing"))
    wrong = [a if a != "128" else "64" for a in tiny_checkpoint["args"]]  # hidden size 64 instead of 128
    with pytest.raises(CheckpointError, match="model flags do not match"):
        load_from_checkpoint(wrong, tiny_checkpoint["load"])
    # Another end-of-document token than the run's: refused by the checkpoint's tokenizer record, naming the fix.
    import sentencepiece

    model = tiny_checkpoint["args"][tiny_checkpoint["args"].index("--tokenizer-model") + 1]
    piece = sentencepiece.SentencePieceProcessor(model_file=model).id_to_piece(10)
    with pytest.raises(CheckpointError, match="another tokenizer: end-of-document id .* pass --eod-token '</s>'"):
        load_from_checkpoint([*tiny_checkpoint["args"], "--eod-token", piece], tiny_checkpoint["load"])
    with pytest.raises(CheckpointError, match="is not a piece of the model"):
        load_from_checkpoint([*tiny_checkpoint["args"], "--eod-token", "<no such piece>"], tiny_checkpoint["load"])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    assert generate.main(["--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                          "--load", str(tmp_path / "junk"), *tiny_checkpoint["args"]]) == 2
    assert "unknown checkpoint layout" in capsys.readouterr().err
    assert generate.main(["--prompts", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                          "--load", tiny_checkpoint["load"], *tiny_checkpoint["args"]]) == 2
    assert "not found" in capsys.readouterr().err
    from megatron_anchor.cli import export_hf

    assert export_hf.main(["--load", tiny_checkpoint["load"], "--output", str(tmp_path / "hf"),
                           *tiny_checkpoint["args"], "--eod-token", piece]) == 2
    assert "another tokenizer" in capsys.readouterr().err and not (tmp_path / "hf").exists()


@pytest.mark.integration
def test_checkpoint_carries_its_run_config(tiny_checkpoint):
    """The trainer writes run_config.yaml beside the checkpoint; loading needs no model flags then."""
    import dataclasses
    import os

    from megatron_anchor.inference.checkpoint import config_from_args

    assert os.path.isfile(os.path.join(tiny_checkpoint["load"], "run_config.yaml"))
    explicit = config_from_args(tiny_checkpoint["args"])
    from_file = config_from_args(["--load", tiny_checkpoint["load"]])
    assert dataclasses.asdict(from_file.model) == dataclasses.asdict(explicit.model)
    assert os.path.samefile(from_file.data.tokenizer_model, explicit.data.tokenizer_model)
    # flags still override the file
    assert config_from_args(["--load", tiny_checkpoint["load"], "--seed", "7"]).training.seed == 7
