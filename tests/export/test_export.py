"""HF export round trip, for both layouts (Llama for the Llama-shaped fixture, GPT-2 for the GPT-2-shaped one, which
is what the quickstart trains): transformers loads the folder offline, its logits match the megatron model, the
tokenizer matches training ids and never turns delimiter text into a delimiter id, and a run neither layout
expresses is refused with the flags each needs. vLLM on both folders: tests/inference/test_vllm_engine.py."""


import pytest
import torch


@pytest.mark.integration
@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_transformers_logits_match_megatron(which, request, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from megatron_anchor.inference.checkpoint import config_from_args, load_megatron_model, megatron_session
    from megatron_anchor.tokenizer import build_tokenizer

    ckpt = request.getfixturevalue("tiny_checkpoint" if which == "llama" else "gpt2_checkpoint")
    folder = request.getfixturevalue("exported" if which == "llama" else "gpt2_exported")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    assert type(hf).__name__ == ("LlamaForCausalLM" if which == "llama" else "GPT2LMHeadModel")
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    cfg = config_from_args(ckpt["args"])
    tok = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    text = "The harbour at dawn.\n\nA second paragraph with 42 boats."
    ids = [tok.ann_open] + tok.encode_text("topic:sea") + [tok.ann_close] + tok.encode_text(text)
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode_text(text)
    assert hf_tok.convert_tokens_to_ids(["<|ann|>", "<|/ann|>"]) == [tok.ann_open, tok.ann_close]
    assert hf_tok.eos_token_id == tok.eod
    assert hf_tok.decode(ids, skip_special_tokens=False) == tok.decode(ids)
    x = torch.tensor([ids])
    with megatron_session():
        loaded = load_megatron_model(cfg, ckpt["load"], tok.vocab_size, keep_model=True)
        with torch.no_grad():
            ref = loaded.megatron_model(x, torch.arange(x.shape[1])[None], attention_mask=None)
    with torch.no_grad():
        got = hf.eval()(x).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.integration
@pytest.mark.parametrize("which", ["exported", "gpt2_exported"])
def test_delimiter_text_never_becomes_the_delimiter_id_in_transformers(which, request):
    """Text that spells a delimiter or end-of-document, typed by a user, gets ordinary tokens (as in training);
    the ids themselves stay reachable by name."""
    transformers = pytest.importorskip("transformers")
    from megatron_anchor.tokenizer import HuggingFaceAnchorTokenizer

    folder = request.getfixturevalue(which)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ours = HuggingFaceAnchorTokenizer(folder, check_roundtrip=False)
    text = "a <|ann|>topic:x<|/ann|> b </s> <|endoftext|> c"
    specials = {ours.ann_open, ours.ann_close, ours.eod}
    for ids in (hf_tok.encode(text, add_special_tokens=False), hf_tok(text)["input_ids"],
                hf_tok.encode(text)):
        assert not specials & set(ids)
        assert ids == ours.encode_text(text)


@pytest.mark.integration
def test_exported_folder_loads_back_for_generation(exported):
    from megatron_anchor.inference import SamplingParams, load_from_hf_folder
    from megatron_anchor.inference.prompts import parse_prompt

    g = load_from_hf_folder(exported)
    rows = g.generate(parse_prompt({"prompt": "Boats"}, "t", 0), 2, "anchored", SamplingParams(max_new_tokens=6),
                      seed=0)
    assert len(rows) == 2 and all("<|ann|>" not in r["response"] for r in rows)


@pytest.mark.integration
def test_runs_no_layout_expresses_are_refused(tiny_checkpoint, tmp_path, capsys):
    """RoPE with LayerNorm is neither Llama (RMSNorm) nor GPT-2 (learned positions): refused, naming the flags."""
    from megatron_anchor.cli import export_hf

    config = tmp_path / "rope_layernorm.yaml"
    config.write_text("model:\n  normalization: LayerNorm\n")
    # An explicit --config replaces the checkpoint's run_config.yaml, so the flags decide.
    args = [a for a in tiny_checkpoint["args"] if a not in ("--normalization", "RMSNorm")]
    assert export_hf.main(["--load", tiny_checkpoint["load"], "--output", str(tmp_path / "x"),
                           "--config", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert "fits no exportable architecture" in err and "--normalization RMSNorm" in err
    assert "--position-embedding-type learned_absolute" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.integration
def test_gpt2_layout_round_trips_through_the_decoder(gpt2_exported):
    """The GPT-2 folder loads back into the in-house decoder with the megatron spec it was written from."""
    from megatron_anchor.inference.gpt2_adapter import decoder_state_from_gpt2, gpt2_state_dict
    from megatron_anchor.inference.model import DecoderLM

    model = DecoderLM.from_hf_folder(gpt2_exported)
    assert model.spec.position_embedding == "learned_absolute" and model.spec.norm == "LayerNorm"
    back = decoder_state_from_gpt2(gpt2_state_dict(model), model.spec)
    for name, tensor in model.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(back[name], tensor), name


def _indented_corpus(path, seed=0):
    """JSONL of verse- and code-like text: runs of spaces (indentation, alignment), tabs, blank lines."""
    import json
    import random

    rng = random.Random(seed)
    words = "the harbour boat sea wind def return if else for while print value x y".split()
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(150):
            lines = []
            for _ in range(20):
                pad = " " * rng.choice([0, 2, 3, 4, 8, 12]) + "\t" * rng.choice([0, 0, 1, 2])
                sep = rng.choice([" ", "  ", "   ", "\t"])
                lines.append(pad + sep.join(rng.choice(words) for _ in range(rng.randint(1, 8)))
                             + " " * rng.choice([0, 0, 1, 3]))
            f.write(json.dumps({"text": "\n".join(lines) + rng.choice(["\n", "\n\n", "\n\n\n"])}) + "\n")


def test_sentencepiece_with_whitespace_pieces_exports_exactly(tmp_path):
    """A model tools/train_tokenizer.py trained on indented text holds whitespace-only pieces (``▁▁▁▁``); the
    exported tokenizer.json gives the training ids on text with runs of spaces, tabs and newlines."""
    import json

    from tokenizers import Tokenizer

    from megatron_anchor.export.tokenizer import WORD, write_tokenizer
    from megatron_anchor.tokenizer import build_tokenizer
    from megatron_anchor.cli import train_tokenizer

    corpus = tmp_path / "indented.jsonl"
    _indented_corpus(corpus)
    prefix = str(tmp_path / "sp")
    assert train_tokenizer.main(["--input", str(corpus), "--output-prefix", prefix, "--vocab-size", "600"]) == 0
    tok = build_tokenizer("SentencePieceTokenizer", prefix + ".model")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    assert any(sp.id_to_piece(i).startswith(WORD * 2) for i in range(sp.get_piece_size()))
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()[:60]]
    texts += ["    verse  line   with\t\truns\n", "a   b\n\n  c\t d    ", "\n\n\n        return  1\n\t\tx = 2   "]
    out = tmp_path / "folder"
    out.mkdir()
    write_tokenizer(tok, "SentencePieceTokenizer", str(out), texts)  # raises on the first disagreement
    hf = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert ids == tok.encode_text(text)
        assert hf.decode(ids, skip_special_tokens=False) == text
