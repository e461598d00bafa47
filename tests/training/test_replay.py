"""Pretraining replay inside SFT: one loss-mask policy per dataset of the blend, chosen per sample.

Single process: the blend and its weights, the start-up errors, the per-dataset tables and per-source reports,
and the tripwire on megatron-core's ``BlendedDataset`` tagging samples with ``dataset_id``. One 2-process gloo
session: in a batch holding an SFT sample and a replayed pretraining sample, with TP=2 and with PP=2, the labels
of the SFT sample's prompt and annotation tokens do not change the gradients by a single bit, while the replay
sample's annotation and text tokens carry loss (under ``pretrain``; under ``pretrain-text`` only its text does);
a short TP=2 run logs the SFT and replay losses separately; a replayed sample attends only within its document.
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_anchor.roles import Role
from megatron_anchor.training.arguments import ConfigError, data_blend, parse_args, validate
from megatron_anchor.training.config import LOSS_MASK_POLICIES, REPLAY_POLICIES, SFT_POLICIES
from megatron_anchor.training.loss import POLICY_ROLES, REPORT_KEYS, SOURCES, apply_policy, loss_func, policy_tables
from tests.distributed import gradients, run_distributed

SHARE = 0.5


def _cfg(*extra):
    return parse_args(["--tokenizer-type", "NullTokenizer", "--vocab-size", "300", "--data-path", "sft",
                       "--loss-mask-policy", "sft-anchored", *extra])


def _errors(*extra) -> str:
    with pytest.raises(ConfigError) as exc:
        validate(_cfg(*extra), 1, False, False)
    return str(exc.value)


def test_policy_names_have_one_table_each():
    assert set(POLICY_ROLES) == set(LOSS_MASK_POLICIES)
    assert set(REPLAY_POLICIES) <= set(LOSS_MASK_POLICIES) and set(SFT_POLICIES) <= set(LOSS_MASK_POLICIES)
    assert set(POLICY_ROLES["pretrain"]) - set(POLICY_ROLES["pretrain-text"]) == {Role.ANNOTATION_KEY,
                                                                                  Role.ANNOTATION_VALUE}


def test_blend_gives_replay_exactly_its_share():
    blend = data_blend(_cfg("--replay-data-path", "pre", "--replay-share", "0.3",
                            "--replay-loss-mask-policy", "pretrain-text"))
    assert blend.prefixes == ["sft", "pre"] and blend.weights == pytest.approx([0.7, 0.3])
    assert blend.policies == ["sft-anchored", "pretrain-text"] and blend.sources == ["sft", "replay"]
    cfg = _cfg("--replay-data-path", "1", "a", "3", "b", "--replay-share", "0.2")
    cfg.data.data_path = ["2", "s1", "2", "s2"]
    blend = data_blend(cfg)
    assert blend.prefixes == ["s1", "s2", "a", "b"]
    assert blend.weights == pytest.approx([0.4, 0.4, 0.05, 0.15])
    assert data_blend(_cfg()).policies == ["sft-anchored"] and data_blend(_cfg()).weights is None


def test_replay_settings_are_checked_at_start_up(tmp_path):
    assert "--replay-share 0.3 needs --replay-data-path" in _errors("--replay-share", "0.3")
    assert "needs --replay-share between 0 and 1" in _errors("--replay-data-path", "pre")
    assert "between 0 and 1" in _errors("--replay-data-path", "pre", "--replay-share", "1")
    assert "give --replay-data-path blend weights" in _errors("--replay-data-path", "a", "b", "--replay-share", "0.3")
    err = _errors("--replay-data-path", "pre", "--replay-share", "0.3", "--loss-mask-policy", "pretrain")
    assert "is for fine-tuning" in err and "weight them in --data-path" in err
    with pytest.raises(SystemExit):  # argparse: invalid choice
        _cfg("--replay-loss-mask-policy", "sft-anchored")
    cfg = _cfg("--replay-data-path", "pre", "--replay-share", "0.3")
    cfg.training.replay_loss_mask_policy = "text"  # a config built in code, past the flags' choices
    with pytest.raises(ConfigError, match="--replay-loss-mask-policy 'text' is not one of pretrain, pretrain-text"):
        validate(cfg, 1, False, False)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("replay_loss_mask_policy: everything\n")
    with pytest.raises(ConfigError, match="replay_loss_mask_policy must be one of"):
        parse_args(["--config", str(yaml_file)])


def test_a_replay_runs_config_loads_for_sampling():
    """Generation and export rebuild the model from the checkpoint's run config, replay settings included."""
    from megatron_anchor.inference.checkpoint import prepare_config

    cfg = _cfg("--replay-data-path", "pre", "--replay-share", "0.3", "--replay-loss-mask-policy", "pretrain-text")
    out = prepare_config(cfg)
    assert out.data.replay_data_path == [] and out.data.replay_share == 0.0
    assert cfg.data.replay_data_path == ["pre"]  # a copy: the caller's config is untouched


def test_per_dataset_tables_pick_each_samples_policy():
    roles = torch.tensor([[Role.PROMPT, Role.ANNOTATION_VALUE, Role.RESPONSE, Role.TEXT],
                          [Role.PROMPT, Role.ANNOTATION_VALUE, Role.RESPONSE, Role.TEXT]], dtype=torch.uint8)
    table = policy_tables(["sft-anchored", "pretrain"])
    mask = apply_policy(torch.ones(2, 4), roles, table, dataset_id=torch.tensor([1, 0], dtype=torch.int16))
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 0]]
    assert apply_policy(torch.ones(2, 4), roles, table).tolist() == [[0, 0, 1, 0]] * 2  # no id: dataset 0


def test_loss_reports_each_source_separately():
    losses = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    total, count, report = loss_func(mask, None, losses, sources=torch.tensor([0, 1]))
    assert float(total) == 35.0 and int(count) == 4
    assert report["sft loss"].tolist() == [5.0, 2.0] and report["replay loss"].tolist() == [30.0, 2.0]
    assert set(report) <= set(REPORT_KEYS) and SOURCES == ("sft", "replay")


def test_blended_dataset_tags_samples_with_their_dataset(sft_data, tiny_dataset):
    """Tripwire on megatron-core: BlendedDataset adds ``dataset_id``, the index of the sample's dataset in the
    blend (in --data-path then --replay-data-path order), and draws replay at the requested share. Per-dataset
    loss-mask policies depend on both."""
    from megatron.core.datasets.blended_dataset import BlendedDataset

    from megatron_anchor.training.data import build_datasets, build_tokenizer

    cfg = parse_args(["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                      tiny_dataset["tokenizer_model"], "--data-path", sft_data["anchored"], "--replay-data-path",
                      tiny_dataset["prefix"], "--replay-share", "0.3", "--loss-mask-policy", "sft-anchored",
                      "--split", "90,10,0", "--seq-length", "64", "--micro-batch-size", "4", "--train-iters", "50",
                      "--eval-iters", "1"])  # no cache path: megatron then builds without a process group
    validate(cfg, 1, False, False)
    train, valid, _ = build_datasets(cfg, build_tokenizer(cfg))
    assert isinstance(train, BlendedDataset) and isinstance(valid, BlendedDataset)
    assert [d.dataset.path_prefix for d in train.datasets] == [sft_data["anchored"], tiny_dataset["prefix"]]
    ids = []
    for i in range(200):
        sample = train[i]
        ids.append(int(sample["dataset_id"]))
        roles = set(sample["roles"].tolist())
        sft_roles = {int(Role.PROMPT), int(Role.RESPONSE)}
        if ids[-1] == 0:  # SFT samples: prompts and responses, no pretraining text
            assert roles & sft_roles and int(Role.TEXT) not in roles, roles
        else:  # replayed pretraining documents: text and annotations, no prompt or response
            assert int(Role.TEXT) in roles and not roles & sft_roles, roles
    assert abs(ids.count(1) / len(ids) - 0.3) < 0.02
    assert "dataset_id" in valid[0]


# ------------------------------------------------------------------------------------------------------------
# Distributed: gradients, per-source logging, attention within documents
# ------------------------------------------------------------------------------------------------------------


def _argv(sft, replay, tmp, *extra):
    return ["--data-path", sft["anchored"], "--replay-data-path", replay["prefix"], "--replay-share", str(SHARE),
            "--loss-mask-policy", "sft-anchored", "--tokenizer-type", replay["tokenizer_type"],
            "--tokenizer-model", replay["tokenizer_model"], "--split", "90,10,0",
            "--data-cache-path", os.path.join(tmp, "cache"), "--num-layers", "2", "--hidden-size", "64",
            "--num-attention-heads", "4", "--seq-length", "128", "--untie-embeddings-and-output-weights",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "3e-3", "--eval-iters", "1",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", "7", "--log-interval", "1", *extra]


def _setup(argv):
    import pretrain_anchor as pa
    from megatron_anchor.training.loop import setup

    return setup(parse_args(argv), pa.model_provider, pa.train_valid_test_datasets_provider,
                 pa.forward_step_factory)


def _with_boundaries(batch, eod):
    """The batch with its document boundaries recomputed, as the loader computes them (--reset-attention-mask)."""
    from megatron_anchor.training.packing import add_boundaries

    return add_boundaries(batch, eod) if eod is not None else batch


def _one_of_each(tr, want=lambda row: True):
    """A micro-batch [SFT sample, replay sample] assembled from the run's own training batches; returns it and
    the EOD id when the loader adds document boundaries (else None)."""
    from megatron_anchor.training.packing import CU_SEQLENS, MAX_SEQLEN

    found, eod = {}, None
    # Each pipeline stage is handed only the keys it uses; with one rank per tensor-parallel group every rank
    # reads, so take the whole batches from its reader (the checks feed the same batch to every stage).
    whole = tr.cfg.parallel.tensor_model_parallel_size == 1 and tr.source is not None and tr.source.loader
    batches = tr.source.loader if whole else tr.train_iter
    for _ in range(50):
        batch = next(batches)
        if CU_SEQLENS in batch:
            from megatron_anchor.training.data import build_tokenizer

            eod = build_tokenizer(tr.cfg).eod
        for i, d in enumerate(batch["dataset_id"].tolist()):
            row = {k: v[i: i + 1] for k, v in batch.items()
                   if isinstance(v, torch.Tensor) and k not in (CU_SEQLENS, MAX_SEQLEN)}  # per-sample tensors
            if d not in found and want(row):
                found[d] = row
        if len(found) == 2:
            return _with_boundaries({k: torch.cat([found[0][k], found[1][k]]) for k in found[0]}, eod), eod
    raise AssertionError(f"no SFT and replay sample in 50 batches (found datasets {sorted(found)})")


def _label_checks(tr, batch):
    """For each group of (row, role) positions: do the gradients stay bit-identical when its labels change?"""
    gen = torch.Generator().manual_seed(0)  # identical on every rank
    groups = {"sft prompt": (0, Role.PROMPT), "sft annotation key": (0, Role.ANNOTATION_KEY),
              "sft annotation value": (0, Role.ANNOTATION_VALUE), "sft response": (0, Role.RESPONSE),
              "replay annotation key": (1, Role.ANNOTATION_KEY),
              "replay annotation value": (1, Role.ANNOTATION_VALUE), "replay text": (1, Role.TEXT)}
    g0 = gradients(tr, batch)
    out = {}
    for name, (row, role) in groups.items():
        where = torch.zeros_like(batch["labels"], dtype=torch.bool)
        where[row] = batch["roles"][row] == int(role)
        changed = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        noise = (changed["labels"] + 1 + torch.randint(0, 50, changed["labels"].shape, generator=gen)) % 500
        changed["labels"] = torch.where(where, noise, changed["labels"])
        g1 = gradients(tr, changed)
        out[name] = {"positions": int(where.sum()), "identical": all(torch.equal(a, b) for a, b in zip(g0, g1))}
    return out


def _isolation_check(tr):
    """Per-token losses after an EOD inside a replayed sample do not move when the previous document changes."""
    seq = tr.cfg.model.seq_length

    def inner_eod(row):
        eods = (row["roles"][0] == int(Role.EOD)).nonzero().flatten().tolist()
        return int(row["dataset_id"][0]) == 0 or any(8 <= p < seq - 8 for p in eods)

    batch, eod = _one_of_each(tr, inner_eod)
    assert eod is not None  # the loader adds boundaries under --reset-attention-mask
    # roles[i] is the role of label i = token i + 1: the EOD token is input p + 1, the last one of its document
    # (it still sees that document); the next document starts at input p + 2.
    p = next(q for q in (batch["roles"][1] == int(Role.EOD)).nonzero().flatten().tolist() if 8 <= q < seq - 8)
    changed = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    changed["tokens"][1, : p + 1] = (changed["tokens"][1, : p + 1] + 7) % 500
    changed = _with_boundaries(changed, eod)
    with torch.no_grad():
        for chunk in tr.model:
            chunk.eval()
        out0, _ = tr.forward_step(iter([batch]), tr.model[0])
        out1, _ = tr.forward_step(iter([changed]), tr.model[0])
    return {"before_differs": not torch.equal(out0[1, : p + 1], out1[1, : p + 1]),
            "after_identical": torch.equal(out0[1, p + 2:], out1[1, p + 2:])}


def _session(rank, world, sft, replay, tmp):
    out = {}
    for name, extra in (("tp2", ["--tensor-model-parallel-size", "2"]),
                        ("tp2 pretrain-text", ["--tensor-model-parallel-size", "2",
                                               "--replay-loss-mask-policy", "pretrain-text"]),
                        ("pp2", ["--pipeline-model-parallel-size", "2"])):
        # Never stepped: the iterations only size the datasets these batches are drawn from.
        tr = _setup(_argv(sft, replay, tmp, "--train-iters", "40", *extra))
        out[name] = _label_checks(tr, _one_of_each(tr)[0])
    tr = _setup(_argv(sft, replay, tmp, "--train-iters", "40", "--tensor-model-parallel-size", "2",
                      "--reset-attention-mask", "--reset-position-ids"))
    out["isolation"] = _isolation_check(tr)

    import pretrain_anchor as pa
    from megatron_anchor.training.loop import pretrain

    res = pretrain(parse_args(_argv(sft, replay, tmp, "--train-iters", "4", "--tensor-model-parallel-size", "2",
                                    "--global-batch-size", "8")),
                   pa.model_provider, pa.train_valid_test_datasets_provider, pa.forward_step_factory)
    out["train"], out["valid"] = res.train, res.valid
    return out


@pytest.fixture(scope="module")
def session(sft_data, tiny_dataset, tmp_path_factory):
    return run_distributed(_session, 2, args=(sft_data, tiny_dataset, str(tmp_path_factory.mktemp("replay"))))


CARRY = {"pretrain": ("sft response", "replay annotation key", "replay annotation value", "replay text"),
         "pretrain-text": ("sft response", "replay text")}


@pytest.mark.integration
@pytest.mark.parametrize("run,policy", [("tp2", "pretrain"), ("pp2", "pretrain"), ("tp2 pretrain-text", "pretrain-text")])
def test_each_sample_is_scored_under_its_own_datasets_policy(session, run, policy):
    for rank, result in enumerate(session):
        checks = result[run]
        for name, check in checks.items():
            assert check["positions"] > 0, (rank, name)
            if name in CARRY[policy]:  # carries loss: its labels must move the gradients
                assert not check["identical"], (rank, run, name)
            else:  # masked: exactly zero gradient
                assert check["identical"], (rank, run, name)


@pytest.mark.integration
def test_replayed_documents_attend_only_within_themselves(session):
    for result in session:
        assert result["isolation"] == {"before_differs": True, "after_identical": True}


@pytest.mark.integration
def test_sft_and_replay_losses_are_logged_separately(session):
    for metrics in session[-1]["train"] + session[-1]["valid"]:
        sft, replay = metrics["sft loss"], metrics["replay loss"]
        n_sft, n_replay = metrics["sft loss tokens"], metrics["replay loss tokens"]
        assert sft is not None and replay is not None and n_sft > 0 and n_replay > 0
        assert metrics["lm loss"] == pytest.approx((sft * n_sft + replay * n_replay) / (n_sft + n_replay), rel=1e-6)  # float32 sums
    losses = [[(m["lm loss"], m["sft loss"], m["replay loss"]) for m in r["train"]] for r in session]
    assert losses[0] == losses[1]  # every rank reports the same (timings differ)
