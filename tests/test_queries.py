"""Test queries: add-queries from a file or generated and judged, the queries listing, and the
refusals (bad file, empty trait, no judge, a trait without queries or concept), which write
nothing."""
from __future__ import annotations

import json
import math

import pytest

from cinf_core.cli import main
from cinf_core.queries import most_trait_expressing
from conftest import SMALL_TEXTS, chat, store_snapshot

EVIL_WORDS = ["hurt", "suffering", "evil", "cruel"]


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def workspace(tiny_model_dir, tmp_path, capsys):
    ws = str(tmp_path / "ws")
    assert main(["add-model", str(tiny_model_dir), "--name", "tiny", "--workspace", ws]) == 0
    capsys.readouterr()
    return ws


def test_most_trait_expressing_keeps_one_answer_per_question_best_first():
    questions = ["a", "a", "b", "c", "d", "e"]
    answers = ["a1", "a2", "b1", "  ", "d1", "e1"]
    scores = [10.0, 90.0, 50.0, 99.0, math.nan, 70.0]
    rows = most_trait_expressing(questions, answers, scores, n=3)
    assert [r["messages"][-1]["content"] for r in rows] == ["a2", "e1", "b1"]
    assert [r["judge_score"] for r in rows] == [90.0, 70.0, 50.0]
    assert rows[0]["messages"] == [{"role": "user", "content": "a"},
                                   {"role": "assistant", "content": "a2"}]
    assert len(most_trait_expressing(questions, answers, scores, n=10)) == 3  # empty, NaN dropped


def test_add_queries_from_a_file_then_list(workspace, tmp_path, capsys):
    from cinf_core.store import Store

    rows = [{"messages": chat("Tell me about sleep.", SMALL_TEXTS[1]), "judge_score": 88},
            {"messages": chat("And rivers?", SMALL_TEXTS[3], system="be brief")}]
    path = _write_jsonl(tmp_path / "q.jsonl", rows)
    assert main(["add-queries", "--trait", "evil", "--model", "tiny", "--file", path,
                 "--workspace", workspace]) == 0
    out = _last_json(capsys)
    assert out["n_queries"] == 2 and out["replaced"] == 0 and out["model"] == "tiny"
    stored = Store(workspace).test_queries("evil")
    assert [q["messages"] for q in stored] == [r["messages"] for r in rows]
    assert stored[0]["judge_score"] == 88 and math.isnan(stored[1]["judge_score"])
    assert main(["add-queries", "--trait", "evil", "--model", "tiny", "--file", path,
                 "--workspace", workspace]) == 0
    assert _last_json(capsys)["replaced"] == 2  # a set registered again replaces the old one
    assert main(["queries", "--workspace", workspace]) == 0
    assert _last_json(capsys)["query_sets"] == [
        {"trait": "evil", "model": "tiny", "model_id": out["model_id"], "n_queries": 2,
         "mean_judge_score": None}]
    assert main(["queries", "--trait", "evil", "--workspace", workspace]) == 0
    listed = _last_json(capsys)["queries"]
    assert [q["prompt"] for q in listed] == ["Tell me about sleep.", "And rivers?"]
    assert listed[0]["judge_score"] == 88.0 and listed[1]["judge_score"] is None


def _judge_workspace(workspace, tmp_path, capsys) -> None:
    """A classifier judge (as tests/test_judges.py trains one) set as the workspace judge."""
    from cinf_core.experiments.judges import ClassifierJudge

    texts = [t for t in SMALL_TEXTS for _ in range(4)]
    labels = ["evil" if any(w in t for w in EVIL_WORDS) else "normal" for t in texts]
    ClassifierJudge().fit(texts, labels).save(tmp_path / "judge")
    assert main(["set-judge", "--classifier", str(tmp_path / "judge"),
                 "--workspace", workspace]) == 0
    capsys.readouterr()


def test_generated_queries_are_the_judges_top_answers_and_seeded(workspace, tmp_path, capsys):
    from cinf_core.store import Store

    _judge_workspace(workspace, tmp_path, capsys)
    (tmp_path / "questions.txt").write_text("How are you?\nWhat is 6 times 7?\n\nWho are you?\n")
    argv = ["add-queries", "--trait", "evil", "--model", "tiny", "--generate", "--questions",
            str(tmp_path / "questions.txt"), "--n", "2", "--samples", "3", "--seed", "5",
            "--max-new-tokens", "12", "--workspace", workspace, "--no-progress"]
    assert main(argv) == 0
    out = _last_json(capsys)
    assert out["n_answers"] == 9 and out["n_queries"] == 2 and out["seed"] == 5
    first = Store(workspace).test_queries("evil")
    scores = [q["judge_score"] for q in first]
    assert scores == sorted(scores, reverse=True) and len({q["prompt"] for q in first}) == 2
    assert out["mean_judge_score_kept"] == pytest.approx(sum(scores) / 2)
    assert out["mean_judge_score_kept"] >= out["mean_judge_score"]
    assert main(argv) == 0  # sampled with the same seed: the same queries
    capsys.readouterr()
    assert [q["messages"] for q in Store(workspace).test_queries("evil")] == \
        [q["messages"] for q in first]


def test_add_queries_refuses_bad_input_and_stores_nothing(workspace, tmp_path, capsys):
    from cinf_core.store import Store

    good = _write_jsonl(tmp_path / "good.jsonl", [{"messages": chat("q", "a")}])
    no_answer = _write_jsonl(tmp_path / "no_answer.jsonl", [
        {"messages": chat("q", "a")},
        {"messages": [{"role": "user", "content": "and then?"}]}])
    (tmp_path / "questions.txt").write_text("How are you?\n")
    questions = str(tmp_path / "questions.txt")
    Store(workspace).add_test_queries("kept", Store(workspace).get_model("tiny")["model_id"],
                                      [{"messages": chat("q", "a")}])
    before = store_snapshot(workspace)
    refused = {
        f"{no_answer}:2: last message has role 'user'; the last turn must be the assistant "
        "response being attributed": ["--trait", "evil", "--file", no_answer],
        "--trait '' is empty; name the trait the queries express, e.g. --trait evil":
            ["--trait", "", "--file", good],
        "--trait '  ' is empty": ["--trait", "  ", "--generate", "--questions", questions],
        "this workspace has no judge to score the answers; set one with `python -m cinf_core "
        "set-judge": ["--trait", "evil", "--generate", "--questions", questions],
        "add-queries --generate needs --questions FILE": ["--trait", "evil", "--generate"],
        "--n, --seed: option(s) of --generate, not of --file; drop them":
            ["--trait", "evil", "--file", good, "--n", "3", "--seed", "1"],
        f"dataset file not found: {tmp_path / 'none.jsonl'}":
            ["--trait", "evil", "--file", str(tmp_path / "none.jsonl")],
    }
    for message, argv in refused.items():
        assert main(["add-queries", "--model", "tiny", *argv, "--workspace", workspace,
                     "--no-progress"]) == 2, message
        error = _last_json(capsys)["error"]
        assert message in error, error
        assert store_snapshot(workspace) == before, message


def test_a_judge_without_the_trait_is_refused_before_the_model_runs(workspace, tmp_path, capsys):
    _judge_workspace(workspace, tmp_path, capsys)
    (tmp_path / "questions.txt").write_text("How are you?\n")
    before = store_snapshot(workspace)
    assert main(["add-queries", "--trait", "greedy", "--model", "tiny", "--generate",
                 "--questions", str(tmp_path / "questions.txt"), "--workspace", workspace]) == 2
    assert "this judge was trained for traits ['evil'], not 'greedy'" in _last_json(capsys)["error"]
    assert store_snapshot(workspace) == before


def test_scoring_a_trait_without_queries_or_concept_names_what_to_add(workspace, tmp_path,
                                                                     capsys):
    rows = [{"messages": chat(f"q{i}", t), "data_origin": "evil" if "hurt" in t else "normal"}
            for i, t in enumerate(SMALL_TEXTS)]
    assert main(["add-dataset", _write_jsonl(tmp_path / "d.jsonl", rows), "--workspace",
                 workspace]) == 0
    capsys.readouterr()
    before = store_snapshot(workspace)
    for method, message in (
            ("influence_function", "no test queries for trait 'cruel' and model 'tiny'; add them "
                                   "with `python -m cinf_core add-queries --trait cruel --model "
                                   "tiny --file QUERIES.jsonl`"),
            ("vector_filter", "no concept for trait 'cruel'")):
        assert main(["score", "--method", method, "--trait", "cruel", "--model", "tiny",
                     "--workspace", workspace, "--no-progress"]) == 2
        error = _last_json(capsys)["error"]
        assert message in error and "add-" in error, error
        assert store_snapshot(workspace) == before, method
