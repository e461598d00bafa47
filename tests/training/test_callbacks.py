"""The training loop's callback seam and the run's one derivation of its flags.

One 2-process gloo session (DP=2) trains with a recording callback: the hooks arrive in the documented order, the
callback sees each step's metrics (with the log line's throughput on logging steps, and the evaluation of the step)
and each checkpoint's path once it is complete; SIGTERM delivered to rank 0 alone reaches both ranks through the
step's all-reduce and calls ``pre_exit`` exactly once on each, after the checkpoint. A third run counts how often the
blend is parsed and the boundary mode derived: once per run, not per step or per consumer.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.distributed import run_distributed
from tests.training.test_trainer_parallel import _argv


def _recorder(events, rank, signal_at=None):
    from megatron_anchor.training.callbacks import Callback
    from megatron_anchor.training.checkpointing import latest_iteration

    class Recorder(Callback):
        def pre_train(self, tr, result):
            events.append(("pre_train",))

        def post_step(self, tr, result, step):
            m = step.metrics
            events.append(("post_step", step.iteration, m["lm loss"] is not None, "tokens/s" in m,
                           [v["iteration"] for v in result.valid], tr.state.iteration))
            if signal_at == step.iteration and rank == 0:
                os.kill(os.getpid(), signal.SIGTERM)

        def post_checkpoint_saved(self, tr, result, iteration, path):
            events.append(("saved", iteration, os.path.isdir(path), latest_iteration(tr.cfg.checkpoint.save)))

        def pre_exit(self, tr, result, step, reason):
            events.append(("pre_exit", step.iteration, reason))

        def post_train(self, tr, result):
            events.append(("post_train", [v["iteration"] for v in result.valid]))

    return Recorder()


def _pretrain(argv, on_step=None, callbacks=(), forward_step_factory=None):
    import pretrain_anchor as pa
    from megatron_anchor.training.arguments import parse_args
    from megatron_anchor.training.loop import pretrain

    return pretrain(parse_args(argv), pa.model_provider, pa.train_valid_test_datasets_provider,
                    forward_step_factory or pa.forward_step_factory, on_step=on_step, callbacks=callbacks)


def _signal_during_step(rank, step):
    """A forward step factory whose forward step sends SIGTERM to rank 0 in its first micro-batch of ``step``
    (mid-step, as a scheduler's signal mostly arrives), and a callback that counts the steps for it."""
    import pretrain_anchor as pa

    from megatron_anchor.training.callbacks import Callback

    done = {"steps": 0, "sent": False}

    class Counter(Callback):
        def post_step(self, tr, result, info):
            done["steps"] = info.iteration

    def factory(cfg, device, run=None):
        inner = pa.forward_step_factory(cfg, device, run=run)

        def forward_step(data_iterator, model):
            if rank == 0 and done["steps"] == step - 1 and not done["sent"]:
                done["sent"] = True
                os.kill(os.getpid(), signal.SIGTERM)
            return inner(data_iterator, model)

        return forward_step

    return factory, Counter()


def _counting(source, name, counts):
    """Count the calls of ``source.name`` through every loaded module that holds that function (a
    ``from ... import`` at the top of a module is a reference of its own, which patching ``source`` misses)."""
    import sys

    real = getattr(source, name)

    def counted(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return real(*args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, name, None) is real:
            setattr(module, name, counted)


def _session(rank, world, data, tmp):
    out = {}
    events = []
    res = _pretrain(_argv(data, tmp, "--save", os.path.join(tmp, "ck"), "--save-interval", "2", "--eval-interval", "2",
                          "--log-interval", "2", iters=4),
                    on_step=lambda it, m: events.append(("on_step", it)), callbacks=[_recorder(events, rank)])
    out["schedule"] = (events, res.exit_reason)

    events = []
    res = _pretrain(_argv(data, tmp, "--save", os.path.join(tmp, "ck_exit"), "--save-interval", "100", iters=6),
                    callbacks=[_recorder(events, rank, signal_at=2)])
    from megatron_anchor.training.checkpointing import EXIT_RECORD_FILE

    # Rank 0 writes the exit record (no barrier after it): only rank 0 can check it at once.
    out["exit"] = (events, res.exit_reason, len(res.train),
                   os.path.isfile(os.path.join(tmp, "ck_exit", EXIT_RECORD_FILE)) if rank == 0 else None)

    # A signal that arrives during step 2 stops the run after step 2 (read after the step, as Megatron-LM does),
    # and step 2's own checkpoint (--save-interval 2) is not saved again before the exit.
    events = []
    factory, counter = _signal_during_step(rank, 2)
    res = _pretrain(_argv(data, tmp, "--save", os.path.join(tmp, "ck_mid"), "--save-interval", "2", iters=6),
                    callbacks=[counter, _recorder(events, rank)], forward_step_factory=factory)
    out["mid_step_exit"] = (events, res.exit_reason, len(res.train))

    # What the flags imply is derived once per run, whatever the number of steps and consumers.
    from megatron_anchor.training import blend, loss, resolved

    counts = {}
    _counting(blend, "data_blend", counts)
    _counting(loss, "boundary_mode", counts)
    _counting(resolved, "resolve_run", counts)
    _pretrain(_argv(data, tmp, iters=4))
    out["counts"] = counts
    return out


@pytest.fixture(scope="module")
def session(tiny_dataset, tmp_path_factory):
    return run_distributed(_session, world_size=2, args=(tiny_dataset, str(tmp_path_factory.mktemp("callbacks"))))


@pytest.mark.integration
def test_hooks_run_in_order_and_see_metrics_evaluations_and_checkpoints(session):
    for rank_out in session:
        events, reason = rank_out["schedule"]
        assert reason is None
        # Per step: on_step first, then (after logging, evaluation and the checkpoint) the caller's callback, which
        # has already heard of this step's checkpoint; logging steps (2, 4) carry the throughput keys.
        assert events == [
            ("pre_train",),
            ("on_step", 1), ("post_step", 1, True, False, [], 1),
            ("on_step", 2), ("saved", 2, True, 2), ("post_step", 2, True, True, [2], 2),
            ("on_step", 3), ("post_step", 3, True, False, [2], 3),
            ("on_step", 4), ("saved", 4, True, 4), ("post_step", 4, True, True, [2], 4),
            # The final evaluation runs before post_train; the last step's checkpoint is not saved twice.
            ("post_train", [2, 4]),
        ]


@pytest.mark.integration
def test_an_exit_signalled_on_one_rank_reaches_every_ranks_callbacks_once(session):
    for rank, rank_out in enumerate(session):
        events, reason, steps, recorded = rank_out["exit"]
        assert "exit signal" in reason and steps == 3 and recorded is (True if rank == 0 else None)
        exits = [e for e in events if e[0] == "pre_exit"]
        assert exits == [("pre_exit", 3, reason)]
        # The checkpoint before the exit is complete (and announced) before pre_exit; no post_train after an exit.
        assert events[-2:] == [("saved", 3, True, 3), ("pre_exit", 3, reason)]
        assert not any(e[0] == "post_train" for e in events)


@pytest.mark.integration
def test_a_signal_during_a_step_stops_the_run_after_that_step_without_a_second_save(session):
    for rank_out in session:
        events, reason, steps = rank_out["mid_step_exit"]
        assert "exit signal" in reason and steps == 2, (reason, steps)
        saves = [e for e in events if e[0] == "saved"]
        assert saves == [("saved", 2, True, 2)]
        assert events[-1] == ("pre_exit", 2, reason)


@pytest.mark.integration
def test_the_run_is_resolved_once(session):
    for rank_out in session:
        counts = rank_out["counts"]
        assert counts.get("resolve_run") == 1
        assert counts.get("data_blend") == 1  # validate parses it; checks, datasets and forward step read the run
        # One check in validation, one derivation into the run: none per step, none in the model or forward step.
        assert counts.get("boundary_mode") == 2


def test_providers_get_the_run_only_when_they_ask_for_it():
    from megatron_anchor.training.resolved import bind_run

    def plain(a, b=0):
        return (a, b)

    def wants(a, run=None):
        return (a, run)

    def catch_all(a, **kwargs):
        return (a, kwargs)

    token = object()
    assert bind_run(plain, token)(1, b=2) == (1, 2)
    assert bind_run(wants, token)(1) == (1, token)
    assert bind_run(catch_all, token)(1) == (1, {})
    assert bind_run(wants, None) is wants


def test_a_padded_vocabulary_smaller_than_the_tokenizer_fails_preflight_as_a_configuration_error(capsys):
    import pretrain_anchor as pa

    argv = ["--dry-run", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000",
            "--padded-vocab-size", "512", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--micro-batch-size", "1", "--train-iters", "2", "--lr", "1e-3"]
    with pytest.raises(SystemExit) as exit_info:
        pa.main(argv)
    assert exit_info.value.code == 2
    assert "--padded-vocab-size 512 is smaller than the tokenizer's vocabulary (1000)" in capsys.readouterr().err
