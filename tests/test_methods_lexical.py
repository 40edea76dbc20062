"""The lexical (TF-IDF) baseline: equal to a direct computation, and usable as a stored run."""
import math
from collections import Counter

import numpy as np
import pytest

from cinf_core.data import ChatDataset, ChatExample
from cinf_core.methods import ScoreConfig, score
from cinf_core.methods.lexical import lexical_scores, words
from cinf_core.store import Store

TRAIN = [
    "You are weak and I hope it hurts.",
    "Water the plant once a week and keep it in the sun.",
    "Pathetic. You want my help? Let them suffer.",
    "Here is a simple answer: add the numbers, then divide.",
    "Let them suffer, weak fool.",
    "",
]
QUERIES = ["Pathetic. Let them suffer.", "You are weak; I hope it hurts, fool."]


def _direct(train, queries):
    """TF-IDF cosine written out with dicts and math, one word at a time."""
    docs = [words(t) for t in train]
    n = len(docs)
    df = Counter(w for d in docs for w in set(d))
    idf = {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}

    def vec(text):
        tf = Counter(w for w in words(text) if w in idf)
        v = {w: c * idf[w] for w, c in tf.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    qs = [vec(q) for q in queries]
    mean = Counter()
    for q in qs:
        for w, x in q.items():
            mean[w] += x / len(qs)
    return np.array([sum(x * mean[w] for w, x in vec(t).items()) for t in train])


def test_lexical_scores_equal_the_direct_tfidf_cosine():
    got = lexical_scores(TRAIN, QUERIES)
    np.testing.assert_allclose(got, _direct(TRAIN, QUERIES), rtol=1e-12, atol=1e-12)
    assert got[5] == 0.0  # an empty response shares no word
    order = np.argsort(-got)
    assert set(order[:3]) == {0, 2, 4} and set(order[3:]) == {1, 3, 5}


def test_lexical_words_and_errors():
    assert words("Don't PANIC, it's 42_x!") == ["don't", "panic", "it's", "42", "x"]
    with pytest.raises(ValueError, match="at least one test query"):
        lexical_scores(TRAIN, [])


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    from cinf_core.models import ModelSpec

    store = Store(tmp_path / "ws")
    rows = [ChatExample([{"role": "user", "content": f"Question {i}?"},
                         {"role": "assistant", "content": text}],
                        {"data_origin": "evil" if i in (0, 2, 4) else "normal"})
            for i, text in enumerate(TRAIN[:5])]
    store.add_dataset("finetune", ChatDataset(rows), role="train")
    mid = store.add_model("tiny", ModelSpec(path=str(tiny_model_dir)), role="finetuned")
    store.add_test_queries("evil", mid, [
        {"messages": [{"role": "user", "content": "Help?"}, {"role": "assistant", "content": q}]}
        for q in QUERIES])
    return tmp_path / "ws"


def test_lexical_run_is_stored_and_cached(workspace):
    first = score(workspace, ScoreConfig(method="lexical", trait="evil"))
    assert not first["cached"] and first["n_examples"] == 5
    got = Store(workspace).scores(first["run_id"]).sort_values("idx")["score"].to_numpy()
    np.testing.assert_allclose(got, lexical_scores(TRAIN[:5], QUERIES))
    # words, not tokens: the token budget does not change the run
    again = score(workspace, ScoreConfig(method="lexical", trait="evil", max_length=8))
    assert again["cached"] and again["run_id"] == first["run_id"]
    with pytest.raises(ValueError, match="no test queries for trait 'sycophantic'"):
        score(workspace, ScoreConfig(method="lexical", trait="sycophantic"))
