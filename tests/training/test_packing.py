"""Document boundaries in packed micro-batches (``--reset-attention-mask``).

The boundaries the data path computes equal the blocks of megatron-core's own dense mask; on the local layers
(CPU) a packed micro-batch gives each sample exactly the losses and gradients it gives alone; on Transformer
Engine (``gpu``) the THD path does the same, where a plain causal run of the same pack does not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_anchor.training.packing import block_causal_mask, boundaries, segment_ids
from tests.distributed import run_distributed

EOD = 63
VOCAB = 64


def test_boundaries_cut_after_each_eod_and_at_sample_ends():
    tokens = torch.tensor([[5, EOD, 7, 8, EOD, 9], [EOD, 1, 2, 3, 4, EOD]])
    cu, longest = boundaries(tokens, EOD)
    assert cu.tolist() == [0, 2, 5, 6, 7, 12] and cu.dtype == torch.int32
    assert longest == 5
    assert segment_ids(cu, 2, 6).tolist() == [[0, 0, 1, 1, 1, 2], [3, 4, 4, 4, 4, 4]]


def test_mask_equals_megatron_dense_mask(tmp_path):
    """Our block-causal mask, built from the collated boundaries, is megatron-core's reset_attention_mask mask."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_anchor.data.indexed import write_token_role_documents
    from megatron_anchor.roles import ROLE_DTYPE, Role
    from megatron_anchor.training.data import collate_with_boundaries

    rng = np.random.default_rng(1)
    docs = []
    for _ in range(60):
        ids = rng.integers(0, EOD, rng.integers(2, 30)).astype(np.uint16)
        ids[-1] = EOD
        docs.append((ids, np.full(len(ids), int(Role.TEXT), ROLE_DTYPE)))
    prefix = str(tmp_path / "docs_text_document")
    write_token_role_documents(prefix, docs, np.uint16)

    class Tok:
        vocab_size, eod = VOCAB, EOD
        unique_identifiers = {"class": "Tok"}

    cfg = GPTDatasetConfig(random_seed=3, sequence_length=48, blend=([prefix], None), split="100,0,0",
                           tokenizer=Tok(), reset_position_ids=True, reset_attention_mask=True,
                           eod_mask_loss=False, create_attention_mask=True, path_to_cache=str(tmp_path / "c"))
    train = BlendedMegatronDatasetBuilder(GPTDataset, [16, 0, 0], lambda: True, cfg).build()[0]
    samples = [train[i] for i in range(8)]
    batch = collate_with_boundaries([{k: v for k, v in s.items() if k != "attention_mask"} for s in samples], EOD)
    ours = block_causal_mask(batch["cu_seqlens"], 8, 48)
    theirs = torch.stack([s["attention_mask"] for s in samples])  # [b, 1, s, s], True = masked
    assert torch.equal(ours, theirs)
    # megatron's reset position ids restart exactly at our segment starts
    seg = segment_ids(batch["cu_seqlens"], 8, 48)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    assert torch.equal(batch["position_ids"] == 0, starts)


def _pack(lengths, seq, seed=0):
    """One packed sample: documents of ``lengths`` (each ending in EOD), then padding; plus its loss mask
    (every position whose label lies inside the same document) and per-document slices."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.full((seq + 1,), 0, dtype=torch.long)
    pos = torch.zeros(seq, dtype=torch.long)
    mask = torch.zeros(seq)
    docs, at = [], 0
    for n in lengths:
        doc = torch.randint(0, EOD, (n,), generator=gen)
        doc[-1] = EOD
        tokens[at:at + n] = doc
        pos[at:at + n] = torch.arange(n)
        mask[at:at + n - 1] = 1.0  # the EOD's label is the next document's first token: not this document's
        docs.append((at, n))
        at += n
    pos[at:] = torch.arange(seq - at)
    return tokens[:-1], tokens[1:], pos, mask, docs


def _tiny_model(pe, impl="local", device="cpu", bf16=False):
    from megatron_anchor.training import initialize
    from megatron_anchor.training.arguments import parse_args, validate
    from megatron_anchor.training.model import model_provider

    argv = ["--mock-data", "--vocab-size", str(VOCAB), "--seq-length", "40", "--num-layers", "2",
            "--hidden-size", "32", "--num-attention-heads", "4", "--hidden-dropout", "0", "--attention-dropout",
            "0", "--position-embedding-type", pe, "--transformer-impl", impl, "--make-vocab-size-divisible-by", "1",
            # A bare GPTModel has no DDP gradient buffer for the fused accumulation to write into.
            "--no-gradient-accumulation-fusion"]
    if bf16:
        argv.append("--bf16")
    cfg = parse_args(argv)
    validate(cfg, 1, torch.cuda.is_available(), impl == "transformer_engine")
    initialize.initialize_distributed(cfg)
    initialize.set_seeds(5)
    model = model_provider(cfg, VOCAB).to(device)
    if bf16:
        model = model.to(torch.bfloat16)
    return cfg, model


def _packed_vs_alone(rank, world, pe, mode, device="cpu", bf16=False):
    """Per-document losses and summed gradients: packed micro-batch (``mode``) vs each document alone."""
    from megatron_anchor.training.loss import model_inputs
    from megatron_anchor.training.packing import add_boundaries

    impl = "transformer_engine" if mode == "thd" else "local"
    _, model = _tiny_model(pe, impl, device, bf16)
    lengths = [[7, 12, 9, 5], [3, 20, 11]]
    parts = [_pack(ls, 40, seed=i) for i, ls in enumerate(lengths)]
    batch = {"tokens": torch.stack([p[0] for p in parts]), "labels": torch.stack([p[1] for p in parts]),
             "position_ids": torch.stack([p[2] for p in parts])}
    batch = add_boundaries(batch, EOD)
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    loss_mask = torch.stack([p[3] for p in parts]).to(device)

    model.zero_grad()
    tokens, pos, attn, labels, extra = model_inputs(batch, mode)
    packed = model(tokens, pos, attn, labels=labels, **extra).reshape(loss_mask.shape).float()
    (packed * loss_mask).sum().backward()
    packed_grads = [p.grad.detach().float().clone() for p in model.parameters()]

    model.zero_grad()
    alone = torch.zeros_like(packed)
    for row, (_, lab, _, _, docs) in enumerate(parts):
        for start, n in docs:
            toks = batch["tokens"][row:row + 1, start:start + n]
            lbl = lab[start:start + n].unsqueeze(0).to(device)
            ids = torch.arange(n, device=device).unsqueeze(0)
            out = model(toks, ids, None, labels=lbl).float()
            alone[row, start:start + n] = out[0]
            (out[0, : n - 1]).sum().backward()
    alone_grads = [p.grad.detach().float().clone() for p in model.parameters()]

    keep = loss_mask.bool()
    # Relative to the largest loss: float32 sums in another order differ by a few ulps.
    loss_diff = (packed[keep] - alone[keep]).abs().max().item() / alone[keep].abs().max().item()
    grad_diff = max((a - b).abs().max().item() for a, b in zip(packed_grads, alone_grads))
    grad_scale = max(a.abs().max().item() for a in alone_grads)
    leak = None
    if mode != "none":  # the same pack with plain causal attention: documents see each other
        tokens, pos, attn, labels, extra = model_inputs(batch, "none")
        with torch.no_grad():
            causal = model(tokens, pos, attn, labels=labels).reshape(loss_mask.shape).float()
        leak = (causal[keep] - alone[keep]).abs().max().item() / alone[keep].abs().max().item()
    return loss_diff, grad_diff, grad_scale, leak


@pytest.mark.integration
@pytest.mark.parametrize("pe", ["learned_absolute", "rope"])
def test_packed_equals_each_sample_alone_on_cpu(pe):
    loss_diff, grad_diff, grad_scale, leak = run_distributed(_packed_vs_alone, 1, args=(pe, "mask"))[0]
    assert loss_diff < 1e-6, loss_diff
    assert grad_diff < 1e-6 * max(grad_scale, 1.0), (grad_diff, grad_scale)
    assert leak > 1e-3  # the control: without the boundaries the same pack gives other losses


@pytest.mark.integration
@pytest.mark.gpu
@pytest.mark.parametrize("pe", ["learned_absolute", "rope"])
def test_packed_thd_equals_each_sample_alone_with_transformer_engine(pe):
    """Transformer Engine with THD ``PackedSeqParams`` (bf16 fused attention): packed losses match each document
    run alone to bf16 precision, while the plain causal run of the same pack (the silent leak) does not."""
    pytest.importorskip("transformer_engine")
    loss_diff, grad_diff, grad_scale, leak = run_distributed(_packed_vs_alone, 1,
                                                             args=(pe, "thd", "cuda", True))[0]
    assert loss_diff < 3e-2, loss_diff
    assert grad_diff < 5e-2 * max(grad_scale, 1e-3), (grad_diff, grad_scale)
    assert leak > 10 * loss_diff
