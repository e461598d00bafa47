"""tools/preprocess_sft.py: outputs, the standard-SFT baseline, bad input, over-long samples, determinism."""

import json
import os
import random

import numpy as np
import pytest

from megatron_anchor.data.indexed import check_role_channel
from megatron_anchor.roles import Role
from tests.conftest import file_bytes
from megatron_anchor.cli import preprocess_sft

TOPIC_WORDS = {"cooking": "oven flour butter garlic sauce soup", "music": "song band album guitar piano",
               "space": "planet star moon orbit rocket galaxy", "sports": "team player match score goal"}


def write_sft_jsonl(path, n, seed=0, multi_every=4):
    """``n`` synthetic SFT samples (every ``multi_every``-th one a two-turn conversation)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            topic = rng.choice(sorted(TOPIC_WORDS))
            words = TOPIC_WORDS[topic].split()
            resp = " ".join(f"The {rng.choice(words)} is near the {rng.choice(words)}." for _ in range(rng.randint(1, 3)))
            if multi_every and i % multi_every == 0:
                obj = {"messages": [{"role": "user", "content": f"Say something about {topic}."},
                                    {"role": "assistant", "content": resp},
                                    {"role": "user", "content": "And more?"},
                                    {"role": "assistant", "content": f"Yes, the {rng.choice(words)}."}]}
            else:
                obj = {"id": i, "prompt": f"Tell me about the {rng.choice(words)}.", "response": resp}
            f.write(json.dumps(obj) + "\n")
    return path


def sft_argv(sp_model, inp, out, *extra):
    return ["--input", str(inp), "--output-prefix", str(out), "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", sp_model, "--no-progress", *extra]


def read_docs(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    toks, roles = IndexedDataset(prefix, mmap=False), IndexedDataset(prefix + "_roles", mmap=False)
    return [(np.array(toks[i]), np.array(roles[i])) for i in range(len(toks))]


def stats(out):
    with open(str(out) + "_text_document.sft_stats.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def sft_input(tmp_path_factory):
    return write_sft_jsonl(str(tmp_path_factory.mktemp("sft") / "sft.jsonl"), 300)


def test_anchored_and_standard_outputs(sp_model, sft_input, tmp_path):
    from megatron_anchor.tokenizer import build_tokenizer

    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    assert preprocess_sft.main(sft_argv(sp_model, sft_input, tmp_path / "anch", "--chat-template", "simple")) == 0
    assert preprocess_sft.main(sft_argv(sp_model, sft_input, tmp_path / "std", "--chat-template", "simple",
                                        "--no-annotations")) == 0
    anch, std = str(tmp_path / "anch_text_document"), str(tmp_path / "std_text_document")
    check_role_channel(anch)
    check_role_channel(std)
    a_docs, s_docs = read_docs(anch), read_docs(std)
    assert len(a_docs) == len(s_docs) == 300
    lines = open(sft_input).read().splitlines()
    for line, (ai, ar), (si, sr) in zip(lines, a_docs, s_docs):
        obj = json.loads(line)
        n_asst = 1 if "prompt" in obj else 2
        assert (ai == tok.ann_open).sum() == n_asst and not (si == tok.ann_open).any()
        assert ar[-1] == Role.EOD and sr[-1] == Role.EOD and ai[-1] == tok.eod
        # Removing the annotation tokens from the anchored sample gives the standard sample exactly.
        keep = ~np.isin(ar, (Role.ANNOTATION_KEY, Role.ANNOTATION_VALUE))
        assert np.array_equal(ai[keep], si) and np.array_equal(ar[keep], sr)
        text = tok.decode([int(x) for x in ai])
        response = obj["response"] if "prompt" in obj else obj["messages"][-1]["content"]
        assert text.endswith(response + "\n" + tok.eod_text)
    s = stats(tmp_path / "anch")
    assert s["samples"] == 300 and s["assistant_turns"] == 300 + 75 and s["annotated_here"] == 375
    assert stats(tmp_path / "std")["annotation_tokens"] == 0


def test_format_stability_share_in_the_output_is_exact_and_repeatable(sp_model, sft_input, tmp_path):
    from megatron_anchor.data.sft import is_format_stable, parse_sample_line

    argv = ["--format-stability-fraction", "0.2", "--format-stability-seed", "5"]
    assert preprocess_sft.main(sft_argv(sp_model, sft_input, tmp_path / "a", *argv)) == 0
    assert preprocess_sft.main(sft_argv(sp_model, sft_input, tmp_path / "b", *argv, "--workers", "2",
                                        "--docs-per-part", "64")) == 0
    a, b = file_bytes(str(tmp_path / "a_text_document")), file_bytes(str(tmp_path / "b_text_document"))
    assert list(a.values()) == list(b.values())  # byte-identical whatever the workers and parts
    docs = read_docs(str(tmp_path / "a_text_document"))
    # A format-stability sample is one with no ANNOTATION_KEY token left (its keys are RESPONSE).
    stable = [not (r == Role.ANNOTATION_KEY).any() and (r == Role.ANNOTATION_VALUE).any() for _, r in docs]
    expected = [is_format_stable(parse_sample_line(line.encode(), "x"), 0.2, 5)
                for line in open(sft_input).read().splitlines()]
    assert stable == expected
    assert 0.12 < sum(stable) / len(stable) < 0.28
    assert stats(tmp_path / "a")["format_stable"] == sum(stable)
    assert stats(tmp_path / "b")["format_stable"] == sum(stable)


def _bad_input(path):
    lines = [
        {"prompt": "fine", "response": "fine too"},
        {"prompt": "where is it?"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "   "}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
        {"prompt": "ok", "response": "ok"},
    ]
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_bad_input_stops_with_the_line(sp_model, tmp_path, capsys):
    inp = _bad_input(tmp_path / "bad.jsonl")
    assert preprocess_sft.main(sft_argv(sp_model, inp, tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert f"{inp}:2: missing response ('response')" in err
    assert not os.path.exists(tmp_path / "o_text_document.bin")


def test_bad_input_skipped_and_counted(sp_model, tmp_path):
    inp = _bad_input(tmp_path / "bad.jsonl")
    assert preprocess_sft.main(sft_argv(sp_model, inp, tmp_path / "o", "--skip-bad-samples")) == 0
    assert len(read_docs(str(tmp_path / "o_text_document"))) == 2
    s = stats(tmp_path / "o")
    assert s["skipped_bad"] == 3 and s["samples"] == 2 and s["dropped_overlong"] == 0


def test_unannotated_input_with_annotator_none_is_an_error(sp_model, sft_input, tmp_path, capsys):
    assert preprocess_sft.main(sft_argv(sp_model, sft_input, tmp_path / "o", "--annotator", "none")) == 1
    assert f"{sft_input}:1" in capsys.readouterr().err


def test_overlong_samples_dropped_or_truncated_and_counted(sp_model, sft_input, tmp_path):
    full = read_docs_for(sp_model, sft_input, tmp_path / "full")
    lengths = np.array([len(i) for i, _ in full])
    limit = int(np.percentile(lengths, 70))
    n_over = int((lengths > limit).sum())
    assert n_over > 0
    assert preprocess_sft.main(sft_argv(sp_model, sft_input, tmp_path / "drop", "--seq-length", str(limit))) == 0
    assert stats(tmp_path / "drop")["dropped_overlong"] == n_over
    assert len(read_docs(str(tmp_path / "drop_text_document"))) == len(full) - n_over
    assert preprocess_sft.main(sft_argv(sp_model, sft_input, tmp_path / "cut", "--seq-length", str(limit),
                                        "--overlong", "truncate")) == 0
    cut = read_docs(str(tmp_path / "cut_text_document"))
    s = stats(tmp_path / "cut")
    assert s["truncated"] + s["dropped_overlong"] == n_over and s["truncated"] > 0
    assert len(cut) == len(full) - s["dropped_overlong"]
    assert max(len(i) for i, _ in cut) <= limit
    truncated = [(i, r) for i, r in cut if len(i) == limit and r[-1] == Role.PAD]
    assert len(truncated) == s["truncated"]
    for ids, roles in truncated:  # closed by the EOD id (document masking), which carries no loss
        assert ids[-1] == full[0][0][-1] and (roles == Role.RESPONSE).any()


def read_docs_for(sp_model, inp, out):
    assert preprocess_sft.main(sft_argv(sp_model, inp, out)) == 0
    return read_docs(str(out) + "_text_document")


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        preprocess_sft.main(["--help"])
    text = capsys.readouterr().out
    for action in preprocess_sft.get_parser()._actions:
        assert action.help, action.option_strings
    for flag in ("--no-annotations", "--format-stability-fraction", "--overlong", "--chat-template", "--annotator"):
        assert flag in text


def test_llm_annotator_stage_annotates_responses_and_resumes(sp_model, tmp_path):
    from tests.annotator_fixtures import FakeOpenAIServer

    inp = write_sft_jsonl(str(tmp_path / "sft.jsonl"), 20, seed=1)
    srv = FakeOpenAIServer().start()
    try:
        argv = sft_argv(sp_model, inp, tmp_path / "llm", "--annotator", "vllm", "--url", srv.url)
        assert preprocess_sft.main(argv) == 0
        first = len(srv.requests)
        annotated = [json.loads(x) for x in open(str(tmp_path / "llm") + ".sft_annotated.jsonl")]
        assert len(annotated) == 20
        turns = [m for a in annotated for m in a.get("messages", [a]) if m.get("role", "assistant") == "assistant"]
        assert len(turns) == 25 and first <= 25  # one request per distinct response
        assert all(t["annotation"][0][0] == "topic" and t["annotation"][0][1].startswith("subject ") for t in turns)
        assert preprocess_sft.main(argv + ["--overwrite"]) == 0  # answers come from the cache
        assert len(srv.requests) == first
    finally:
        srv.stop()
    assert stats(tmp_path / "llm")["annotated_here"] == 0 and stats(tmp_path / "llm")["samples"] == 20


def test_pack_aligns_every_training_sample_with_whole_samples(sp_model, sft_input, tmp_path):
    """Packs are exactly --seq-length tokens, hold whole samples, and megatron's GPTDataset never splits one."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    from megatron_anchor.data.anchor_dataset import AnchorGPTDataset
    from megatron_anchor.tokenizer import build_tokenizer

    seq = 256
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    assert preprocess_sft.main(sft_argv(sp_model, sft_input, plain, "--seq-length", str(seq))) == 0
    assert preprocess_sft.main(sft_argv(sp_model, sft_input, packed, "--seq-length", str(seq), "--pack",
                                        "--docs-per-part", "70")) == 0
    samples = read_docs(str(plain) + "_text_document")
    packs = read_docs(str(packed) + "_text_document")
    assert all(len(ids) == seq for ids, _ in packs) and len(packs) < len(samples)
    s = stats(packed)
    assert s["samples"] == len(samples) == stats(plain)["samples"] and s["sequences"] == len(packs)
    # every sample appears whole in some pack; padding is role PAD
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    pad_total = 0
    unpacked = []
    for ids, roles in packs:
        real = roles != Role.PAD
        pad_total += int((~real).sum())
        assert (ids[~real] == tok.eod).all()
        cut = np.flatnonzero((roles == Role.EOD))
        start = 0
        for c in cut:
            unpacked.append(ids[start:c + 1].tobytes())
            start = c + 1
    assert sorted(unpacked) == sorted(ids.tobytes() for ids, _ in samples)
    assert pad_total == s["pack_padding_tokens"]
    # through megatron-core: each training sample is one pack, its first token a sample start
    cfg = GPTDatasetConfig(random_seed=3, sequence_length=seq, blend=([str(packed) + "_text_document"], None),
                           split="100,0,0", tokenizer=tok, reset_position_ids=True, reset_attention_mask=True,
                           eod_mask_loss=False, create_attention_mask=False, path_to_cache=str(tmp_path / "c"))
    train = BlendedMegatronDatasetBuilder(AnchorGPTDataset, [3 * len(packs), 0, 0], lambda: True, cfg).build()[0]
    pack_set = {ids.tobytes() for ids, _ in packs}
    for i in range(len(train)):
        assert train[i]["tokens"].numpy().astype(packs[0][0].dtype).tobytes() in pack_set


@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_sharded_sft_runs_merge_to_the_unsharded_output(sp_model, sft_input, tmp_path, num_shards):
    from megatron_anchor.cli import merge_datasets

    extra = ("--seq-length", "128", "--overlong", "truncate")
    assert preprocess_sft.main(sft_argv(sp_model, sft_input, tmp_path / "single", *extra)) == 0
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(num_shards):
        assert preprocess_sft.main(sft_argv(sp_model, sft_input, shards / "s", *extra, "--num-shards",
                                            str(num_shards), "--shard-index", str(i))) == 0
    out = str(tmp_path / "merged_text_document")
    assert merge_datasets.main(["--input", str(shards), "--output-prefix", out]) == 0
    assert list(file_bytes(out).values()) == list(file_bytes(str(tmp_path / "single_text_document")).values())
