"""Hugging Face import: small randomly initialised models of every family the importer maps (built offline by
transformers), imported with the annotation delimiters added; their logits under megatron-core equal transformers'
(float32, relative 1e-4) at TP=1, TP=2 and PP=2, and in the in-house decoder; import -> export gives the original
tensors back (plus the added rows); what cannot be mapped is refused by name before any weight is read; and the
imported checkpoint fine-tunes (mid-training on annotated data) with no model flags. The packaged SmolLM2:
tests/hf_import/test_import_smollm2.py."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

TOL = 1e-4
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
FAMILIES = {
    # name: (config class, settings, rows beyond the tokenizer's vocabulary)
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True), 0),
    "llama31": ("LlamaConfig", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                                    rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                       "low_freq_factor": 1.0,
                                                                       "high_freq_factor": 4.0,
                                                                       "original_max_position_embeddings": 8192}), 0),
    "mistral": ("MistralConfig", dict(sliding_window=None, tie_word_embeddings=False, num_key_value_heads=4), 0),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1000000.0), 30),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=32), 0),
}
EXPORTED_CLASS = {"llama": "LlamaForCausalLM", "llama31": "LlamaForCausalLM", "mistral": "LlamaForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _tokenizer_folder(path, texts):
    """A small byte-level BPE with an end-of-text token and no annotation delimiters (as real models have)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}, f)
    return tok.get_vocab_size()


def _hf_folder(path, family, vocab, seed):
    cls, settings, extra_rows = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, cls)(vocab_size=vocab + extra_rows, **{**COMMON, **settings})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # every tensor random, biases and norms included, so each one's mapping is tested
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path, safe_serialization=True)
    return model.eval()


@pytest.fixture(scope="module")
def imported(tmp_path_factory, corpus_dir):
    """family -> {hf: folder, ckpt: imported checkpoint, model: transformers model} for every family."""
    from megatron_anchor.hf_import import import_hf

    texts = [json.loads(line)["text"] for line in open(corpus_dir / "raw.jsonl")][:200]
    base = tmp_path_factory.mktemp("import_hf")
    out = {}
    for i, family in enumerate(FAMILIES):
        hf = str(base / f"{family}_hf")
        vocab = _tokenizer_folder(hf, texts)
        model = _hf_folder(hf, family, vocab, seed=i)
        ckpt = str(base / f"{family}_ckpt")
        summary = import_hf(hf, ckpt, add_annotation_tokens=True, seq_length=64)
        out[family] = {"hf": hf, "ckpt": ckpt, "model": model, "summary": summary, "vocab": vocab}
    return out


def _ids(vocab, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, n), generator=g)


def _rel(got, ref):
    """max |difference| / max |reference| over the reference's columns (NaN columns left out)."""
    keep = ~torch.isnan(ref)
    diff = (got[..., :ref.shape[-1]] - ref)[keep]
    return (diff.abs().max() / ref[keep].abs().max()).item()


def _reference(entry):
    """Ids and transformers' logits; the columns of the two added ids are left out where they fall inside the
    source's rows (Qwen-style spare rows: their output rows are now the mean row, by design)."""
    ids = _ids(entry["vocab"])
    with torch.no_grad():
        logits = entry["model"](ids).logits
    v = entry["vocab"]
    if logits.shape[-1] > v:
        logits[..., v:v + 2] = float("nan")
    return ids, logits


def test_rows_grow_for_the_added_delimiters(imported):
    """Delimiters get the next ids; rows grow to a multiple of 128 only when they do not fit the source's rows
    (Qwen-style spare rows take them), and the added rows are the mean of the old ones."""
    from safetensors.torch import load_file

    for family, e in imported.items():
        s = e["summary"]
        assert s["added_tokens"] == ["<|ann|>", "<|/ann|>"] and s["tokenizer_vocab"] == e["vocab"] + 2
        extra = FAMILIES[family][2]
        assert s["vocab_rows"] == (e["vocab"] + extra if extra >= 2 else 384), family
    e = imported["llama"]
    with torch.no_grad():
        logits_new_ids = e["model"].get_input_embeddings().weight[:e["vocab"]].mean(0)
    from megatron_anchor.inference.checkpoint import checkpoint_config, load_decoder

    cfg, load = checkpoint_config([], e["ckpt"])
    decoder, tok, _ = load_decoder(cfg, load)
    emb = decoder.model.embed_tokens.weight.detach()
    assert (tok.ann_open, tok.ann_close) == (e["vocab"], e["vocab"] + 1)
    assert torch.allclose(emb[e["vocab"]:], logits_new_ids.expand(emb.shape[0] - e["vocab"], -1))
    # Qwen-style spare rows: the added ids take two of them (mean rows), the others keep the source's values.
    e = imported["qwen2"]
    source = load_file(os.path.join(e["hf"], "model.safetensors"))["model.embed_tokens.weight"]
    cfg, load = checkpoint_config([], e["ckpt"])
    emb = load_decoder(cfg, load)[0].model.embed_tokens.weight.detach()
    v = e["vocab"]
    assert emb.shape == source.shape and torch.equal(emb[:v], source[:v]) and torch.equal(emb[v + 2:], source[v + 2:])
    assert torch.allclose(emb[v:v + 2], source[:v].mean(0).expand(2, -1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tp1_logits_equal_transformers(imported, family):
    """megatron-core (TP=1) and the in-house decoder, both from the imported checkpoint, against transformers."""
    from megatron_anchor.hf_import.parity import megatron_logits
    from megatron_anchor.inference.checkpoint import checkpoint_config, load_decoder, megatron_session

    e = imported[family]
    ids, ref = _reference(e)
    with megatron_session():
        got = megatron_logits(e["ckpt"], ids)
    assert got.shape[-1] == e["summary"]["vocab_rows"]
    assert _rel(got, ref) <= TOL, family
    cfg, load = checkpoint_config([], e["ckpt"])
    decoder, _, _ = load_decoder(cfg, load)
    with torch.no_grad():
        assert _rel(decoder(ids), ref) <= TOL, family


def _layout_logits(rank, world_size, ckpts, ids, tp, pp):
    from megatron_anchor.hf_import.parity import megatron_logits

    return {family: megatron_logits(ckpt, ids[family], tp=tp, pp=pp) for family, ckpt in ckpts.items()}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_tp2_and_pp2_logits_equal_transformers(imported, tp, pp):
    """The same checkpoints loaded under TP=2 (vocabulary, heads and MLP split) and PP=2 (one layer per stage)."""
    from tests.distributed import run_distributed

    refs = {family: _reference(e) for family, e in imported.items()}
    results = run_distributed(_layout_logits, world_size=2, args=(
        {f: e["ckpt"] for f, e in imported.items()}, {f: r[0] for f, r in refs.items()}, tp, pp))
    for rank_result in results:
        for family, got in rank_result.items():
            assert _rel(got, refs[family][1]) <= TOL, (family, tp, pp)


def test_export_returns_the_original_tensors(imported, tmp_path):
    """import -> tools/export_hf.py: every original tensor comes back bit for bit (embedding and output rows
    beyond the source are the added ones), in the family's own transformers class."""
    from safetensors.torch import load_file

    from megatron_anchor.cli import export_hf

    for family, e in imported.items():
        out = tmp_path / family
        assert export_hf.main(["--load", e["ckpt"], "--output", str(out)]) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == [EXPORTED_CLASS[family]]
        back = load_file(str(out / "model.safetensors"))
        original = e["model"].state_dict()
        rows, added = e["summary"]["source_rows"], [e["vocab"], e["vocab"] + 1]
        for name, tensor in original.items():
            if name == "lm_head.weight" and config["tie_word_embeddings"]:
                continue
            got = back[name]
            if name in ("model.embed_tokens.weight", "lm_head.weight"):  # all but the added ids' rows
                keep = [i for i in range(rows) if i not in added]
                got, tensor = got[keep], tensor[keep]
            assert torch.equal(got, tensor), (family, name)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, local_files_only=True)
        ids, ref = _reference(e)
        with torch.no_grad():
            assert _rel(hf.eval()(ids).logits, ref) <= TOL, family


def _config(base, **changes):
    cfg = json.loads(open(os.path.join(base, "config.json")).read())
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("change,needle", [
    (dict(model_type="gemma3", architectures=["Gemma3ForCausalLM"]), "model_type 'gemma3'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling 'yarn'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}), "low_freq_factor"),
    (dict(attention_bias=True, mlp_bias=False), "attention_bias=True with mlp_bias=False"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config 'gptq'"),
])
def test_unmappable_configs_are_refused_before_any_weight_is_read(imported, tmp_path, change, needle, capsys):
    """A config the importer cannot map is refused by name, with the weight file unreadable (never opened) and
    nothing written."""
    import shutil

    from megatron_anchor.cli import import_hf

    src = tmp_path / "src"
    shutil.copytree(imported["llama"]["hf"], src)
    (src / "config.json").write_text(json.dumps(_config(str(src), **change)))
    (src / "model.safetensors").write_bytes(b"not a safetensors file")
    assert import_hf.main(["--input", str(src), "--output", str(tmp_path / "out"), "--add-annotation-tokens"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "config.json" in err, err
    assert not (tmp_path / "out").exists()


def test_mistral_sliding_window_and_unmapped_tensors_are_refused(imported, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_anchor.cli import import_hf

    src = tmp_path / "mistral"
    shutil.copytree(imported["mistral"]["hf"], src)
    (src / "config.json").write_text(json.dumps(_config(str(src), sliding_window=64)))
    assert import_hf.main(["--input", str(src), "--output", str(tmp_path / "a"), "--add-annotation-tokens"]) == 2
    assert "sliding_window 64 < max_position_embeddings 256" in capsys.readouterr().err
    # A bias the config does not announce: refused by name (reading only the file's header).
    src = tmp_path / "llama"
    shutil.copytree(imported["llama"]["hf"], src)
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(state, str(src / "model.safetensors"))
    assert import_hf.main(["--input", str(src), "--output", str(tmp_path / "b"), "--add-annotation-tokens"]) == 2
    assert "unmapped model.layers.0.self_attn.o_proj.bias" in capsys.readouterr().err
    # No delimiters in the tokenizer and no --add-annotation-tokens: refused, naming the flag.
    assert import_hf.main(["--input", imported["llama"]["hf"], "--output", str(tmp_path / "c")]) == 2
    assert "--add-annotation-tokens" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


@pytest.mark.integration
def test_midtraining_from_the_import_needs_no_model_flags(imported, corpus_dir, tmp_path):
    """Annotated data tokenized with the imported tokenizer folder, plain text replayed beside it, and a
    --finetune run from the imported checkpoint naming no model flag: the annotation loss falls; the result
    samples anchored; resuming the import itself is refused (weights only)."""
    from tests.distributed import run_torchrun
    from tests.training.test_trainer_cli import LINE
    from megatron_anchor.cli import generate, preprocess_data

    e = imported["qwen3"]
    tok_dir = os.path.join(e["ckpt"], "tokenizer")
    data = {}
    for name, extra in (("ann", []), ("plain", ["--no-annotations"])):
        prefix = str(tmp_path / name)
        assert preprocess_data.main(["--input", str(corpus_dir / "annotated.jsonl"), "--output-prefix", prefix,
                                     "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_dir,
                                     "--append-eod", "--workers", "1", *extra]) == 0
        data[name] = prefix + "_text_document"
    save = str(tmp_path / "mid")
    train = ["pretrain_anchor.py", "--finetune", "--load", e["ckpt"], "--save", save, "--data-path", "0.8",
             data["ann"], "0.2", data["plain"], "--split", "95,5,0", "--loss-mask-policy", "pretrain",
             "--seq-length", "64", "--micro-batch-size", "4", "--train-iters", "40", "--lr", "3e-3",
             "--lr-warmup-iters", "4", "--lr-decay-style", "cosine", "--min-lr", "3e-4", "--log-interval", "1",
             "--eval-iters", "0", "--hidden-dropout", "0", "--attention-dropout", "0",
             "--data-cache-path", str(tmp_path / "cache")]
    proc = run_torchrun(train, nproc=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ann = [float(m.group(4)) for m in LINE.finditer(proc.stdout)]
    assert len(ann) == 40, proc.stdout[-2000:]
    assert sum(ann[-5:]) / 5 < 0.7 * sum(ann[:5]) / 5, ann
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "The harbour"}) + "\n")
    out = tmp_path / "samples.jsonl"
    assert generate.main(["--load", save, "--prompts", str(prompts), "--n", "2", "--mode", "anchored",
                          "--max-new-tokens", "8", "--output", str(out), "--seed", "0"]) == 0
    assert len(out.read_text().splitlines()) == 2
    proc = run_torchrun([a for a in train if a != "--finetune"] + ["--save", str(tmp_path / "resume")], nproc=1)
    assert proc.returncode != 0 and "holds model weights only" in proc.stdout + proc.stderr
    _evaluation_measures_the_midtraining(e["ckpt"], save, corpus_dir, data["ann"], tmp_path)


def _evaluation_measures_the_midtraining(base, mid, corpus_dir, ann_prefix, tmp_path):
    """tools/evaluate_midtraining.py on the import and its mid-trained checkpoint: the annotation cap is sized
    from the training annotations (the longest one in the role channel), the held-out loss is the same batched
    or window by window and honours its token cap, and every chunk start is sampled n times."""
    import math

    import numpy as np

    from megatron_anchor.data.indexed import iter_documents
    from megatron_anchor.eval.midtrain import (
        annotation_cap,
        chunk_start_prompts,
        fit_prompt,
        heldout_texts,
        prompt_room,
        text_loss,
    )
    from megatron_anchor.inference.prompts import parse_prompt
    from megatron_anchor.inference import load_any
    from megatron_anchor.roles import Role
    from megatron_anchor.cli import evaluate_midtraining

    longest = 0  # the longest run of annotation roles in the training data, delimiters excluded
    for roles in iter_documents(ann_prefix + "_roles"):
        ann = np.isin(roles, [int(Role.ANNOTATION_KEY), int(Role.ANNOTATION_VALUE)]).astype(np.int8)
        edges = np.diff(np.concatenate([[0], ann, [0]]))
        longest = max([longest, *(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1) - 2)])
    gen = load_any(mid)
    annotated = str(corpus_dir / "annotated.jsonl")
    assert annotation_cap(gen.tokenizer, annotated) == {"longest": longest, "cap": math.ceil(1.5 * longest)}
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(open(corpus_dir / "raw.jsonl").readlines()[-6:]))
    texts = heldout_texts(str(heldout))
    whole, one_by_one = text_loss(gen, texts, 32, batch=8), text_loss(gen, texts, 32, batch=1)
    assert whole["tokens"] == one_by_one["tokens"] and abs(whole["loss"] - one_by_one["loss"]) < 1e-5
    assert text_loss(gen, texts, 32, max_tokens=50)["tokens"] == 50
    # Chunk starts longer than the context leaves beside the annotation cap are cut from their start.
    long_start = max(chunk_start_prompts(texts), key=len)
    room = prompt_room(gen, 48)
    assert len(gen.prompt_ids(parse_prompt({"prompt": long_start}, "c", 0), "anchored")) > room
    fitted = fit_prompt(gen, long_start, room, "c", 0)
    assert len(gen.prompt_ids(fitted, "anchored")) <= room and long_start.endswith(fitted.text)
    report_path = tmp_path / "report.json"
    assert evaluate_midtraining.main(["--base", base, "--model", mid, "--heldout", str(heldout), "--annotated",
                                      annotated, "--seq-length", "32", "--n", "3", "--output",
                                      str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["max_annotation_tokens"] == math.ceil(1.5 * longest) and report["prompts"] > 0
    for name in ("base", "midtrained"):
        r = report[name]
        assert r["samples"] == 3 * report["prompts"] and r["heldout_tokens"] == whole["tokens"]
        assert r["mean_annotation_tokens"] <= report["max_annotation_tokens"]
        assert r["annotation_well_formed_ci95"][0] <= r["annotation_well_formed"] <= r["annotation_well_formed_ci95"][1]
    assert report["midtrained"]["heldout_text_loss"] == pytest.approx(whole["loss"], rel=1e-6)
    print("evaluation of the tiny mid-training:", {k: report[k] for k in ("base", "midtrained")})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(SystemExit) as exit_:
        evaluate_midtraining.main(["--base", base, "--model", mid, "--heldout", str(bad)])
    assert exit_.value.code == 2
