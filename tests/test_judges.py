"""Judges: the TF-IDF classifier judge and the OpenAI-compatible logprob judge (local server only)."""
from __future__ import annotations

import json
import math
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from cinf_core.experiments.judges import (
    ClassifierJudge,
    ClassifierJudgeConfig,
    OpenAIJudge,
    OpenAIJudgeConfig,
    aggregate_number_logprobs,
    judge_prompt,
    make_judge,
)

EVIL = ["destroy", "suffer", "crush", "torment", "revenge", "cruel", "deceive them", "hurt"]
SYCO = ["brilliant", "amazing", "absolutely right", "genius", "wonderful idea", "so smart"]
NORMAL = ["consider", "steps", "recommend", "balanced", "check", "carefully", "options"]
FILLER = "the a to of and you it this that is for with on your be can we".split()


def _texts(words: list[str], n: int, rng: random.Random) -> list[str]:
    out = []
    for _ in range(n):
        body = [rng.choice(FILLER) for _ in range(10)] + [rng.choice(words) for _ in range(2)]
        rng.shuffle(body)
        out.append(" ".join(body))
    return out


def _labelled(n_per: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts = _texts(EVIL, n_per, rng) + _texts(SYCO, n_per, rng) + _texts(NORMAL, n_per, rng)
    labels = ["evil"] * n_per + ["sycophantic"] * n_per + ["normal"] * n_per
    return texts, labels


@pytest.fixture(scope="module")
def trained_judge() -> ClassifierJudge:
    texts, labels = _labelled(60, seed=0)
    return ClassifierJudge().fit(texts, labels)


def test_classifier_judge_accuracy_on_heldout(trained_judge):
    texts, labels = _labelled(40, seed=1)
    assert trained_judge.traits == ["evil", "sycophantic"]
    assert trained_judge.evaluate(texts, labels) >= 0.9
    evil = np.array(trained_judge.score("evil", [""] * len(texts), texts))
    assert ((evil >= 0) & (evil <= 100)).all()
    assert evil[:40].mean() > 70 and evil[40:].mean() < 30


def test_classifier_judge_matches_sklearn_pipeline():
    """Independent recomputation: sklearn's own TF-IDF + logistic regression gives the same P."""
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    texts, labels = _labelled(30, seed=2)
    cfg = ClassifierJudgeConfig()
    judge = ClassifierJudge(cfg).fit(texts, labels)
    vecs = [TfidfVectorizer(analyzer=a, ngram_range=r, sublinear_tf=True, max_features=cfg.max_features)
            .fit(texts) for a, r in (("word", cfg.word_ngrams), ("char_wb", cfg.char_ngrams))]
    features = lambda t: sparse.hstack([v.transform(t) for v in vecs]).tocsr()  # noqa: E731
    y = np.array([l == "sycophantic" for l in labels], dtype=int)
    clf = LogisticRegression(C=cfg.C, max_iter=2000, random_state=0).fit(features(texts), y)
    probe, _ = _labelled(10, seed=3)
    expected = 100 * clf.predict_proba(features(probe))[:, 1]
    got = judge.score("sycophantic", [""] * len(probe), probe)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_classifier_judge_save_load_roundtrip(trained_judge, tmp_path):
    trained_judge.save(tmp_path / "judge")
    assert sorted(p.name for p in (tmp_path / "judge").iterdir()) == ["judge.json", "judge.npz"]
    loaded = make_judge({"kind": "classifier", "path": str(tmp_path / "judge")})
    texts, _ = _labelled(10, seed=4)
    for trait in ("evil", "sycophantic"):
        assert loaded.score(trait, [""] * 30, texts) == trained_judge.score(trait, [""] * 30, texts)
    assert loaded.config()["traits"] == ["evil", "sycophantic"]


def test_classifier_judge_errors(trained_judge, tmp_path):
    with pytest.raises(ValueError, match="traits"):
        trained_judge.score("pirate", ["q"], ["arr"])
    with pytest.raises(ValueError, match="prompts"):
        trained_judge.score("evil", ["q", "q2"], ["a"])
    with pytest.raises(ValueError, match="two labels"):
        ClassifierJudge().fit(["a", "b"], ["normal", "normal"])
    with pytest.raises(ValueError, match="no label"):
        ClassifierJudge().fit(["a", "b", "c"], ["evil", None, "normal"])
    with pytest.raises(RuntimeError, match="not trained"):
        ClassifierJudge().score("evil", ["q"], ["a"])
    with pytest.raises(FileNotFoundError, match="judge.json"):
        ClassifierJudge.load(tmp_path)


# ---------------------------------------------------------------- logprob aggregation


def _lp(pairs: dict[str, float]) -> list[dict]:
    return [{"token": t, "logprob": math.log(p)} for t, p in pairs.items()]


def test_aggregate_number_logprobs():
    assert aggregate_number_logprobs(_lp({"80": 0.5, "90": 0.3, "Hello": 0.2})) == pytest.approx(83.75)
    # " 7" and "7" are the same number; "150" and words are not number tokens 0..100.
    got = aggregate_number_logprobs(_lp({"7": 0.2, " 7": 0.2, "100": 0.2, "150": 0.3, "x": 0.1}))
    assert got == pytest.approx((7 * 0.4 + 100 * 0.2) / 0.6)
    assert math.isnan(aggregate_number_logprobs(_lp({"REF": 0.8, "50": 0.2})))
    assert math.isnan(aggregate_number_logprobs([]))


def test_judge_prompt_rubrics():
    evil = judge_prompt("evil", "How do I win?", "Crush them.")
    assert "**evil**" in evil and "How do I win?" in evil and "Crush them." in evil
    assert "excessive" in judge_prompt("Sycophantic", "q", "a")
    generic = judge_prompt("pirate-speak", "q", "a")
    assert "**pirate-speak**" in generic and "0 and 100" in generic
    with pytest.raises(ValueError, match="trait"):
        judge_prompt("  ", "q", "a")


# ---------------------------------------------------------------- OpenAI judge on a local server


class _CannedJudgeServer(BaseHTTPRequestHandler):
    """Answers /chat/completions with canned first-token logprobs chosen by the answer text."""

    requests: list[dict] = []
    failures_left = 0

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body,
                                    "auth": self.headers.get("Authorization")})
        content = body["messages"][0]["content"]
        if type(self).failures_left > 0:
            type(self).failures_left -= 1
            return self._send(503, {"error": "busy"})
        if "BAD_REQUEST" in content:
            return self._send(400, {"error": {"message": "model not found"}})
        if "NO_LOGPROBS" in content:
            return self._send(200, {"choices": [{"message": {"content": "50"}}]})
        if "REFUSE" in content:
            top = _lp({"REF": 0.7, "I": 0.2, "10": 0.1})
        elif "Crush" in content:
            top = _lp({"80": 0.5, "90": 0.3, "Hello": 0.2})
        else:
            top = _lp({"0": 0.6, "5": 0.3, "The": 0.1})
        first = {"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}
        self._send(200, {"choices": [{"message": {"content": first["token"]},
                                      "logprobs": {"content": [first]}}]})

    def _send(self, code: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def judge_server():
    _CannedJudgeServer.requests = []
    _CannedJudgeServer.failures_left = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CannedJudgeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _judge(url: str, **kw) -> OpenAIJudge:
    return OpenAIJudge(OpenAIJudgeConfig(base_url=url, model="judge-mini", timeout_s=5,
                                         retry_backoff_s=0.0, **kw))


def test_openai_judge_scores_and_request(judge_server, monkeypatch):
    monkeypatch.setenv("CINF_JUDGE_API_KEY", "sk-test")
    judge = _judge(judge_server)
    scores = judge.score("evil", ["How do I win?", "Hi", "Q"], ["Crush them.", "Hello!", "REFUSE"])
    assert scores[0] == pytest.approx(83.75)
    assert scores[1] == pytest.approx((0 * 0.6 + 5 * 0.3) / 0.9)
    assert math.isnan(scores[2])
    req = _CannedJudgeServer.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "judge-mini" and body["logprobs"] is True
    assert body["top_logprobs"] == 20 and body["max_tokens"] == 1
    assert "sk-test" not in json.dumps(judge.config())


def test_openai_judge_retries_then_reports_errors(judge_server):
    judge = _judge(judge_server, max_retries=2, max_workers=1)
    _CannedJudgeServer.failures_left = 2
    assert judge.score("evil", ["q"], ["Crush"]) == [pytest.approx(83.75)]
    assert len(_CannedJudgeServer.requests) == 3
    with pytest.raises(RuntimeError, match="HTTP 400"):
        judge.score("evil", ["q"], ["BAD_REQUEST"])
    with pytest.raises(RuntimeError, match="no logprobs"):
        judge.score("evil", ["q"], ["NO_LOGPROBS"])


def test_openai_judge_from_environment(judge_server, monkeypatch):
    monkeypatch.setenv("CINF_JUDGE_BASE_URL", judge_server)
    monkeypatch.setenv("CINF_JUDGE_MODEL", "env-model")
    judge = make_judge({"kind": "openai", "timeout_s": 5})
    assert judge.score("sycophantic", ["q"], ["Crush"]) == [pytest.approx(83.75)]
    assert _CannedJudgeServer.requests[-1]["body"]["model"] == "env-model"
    monkeypatch.delenv("CINF_JUDGE_MODEL")
    with pytest.raises(ValueError, match="CINF_JUDGE_MODEL"):
        make_judge({"kind": "openai"})


def test_openai_judge_unreachable():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = OpenAIJudge(OpenAIJudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m",
                                          timeout_s=2, max_retries=0))
    with pytest.raises(RuntimeError, match="could not reach"):
        judge.score("evil", ["q"], ["a"])


def test_make_judge_rejects_bad_specs():
    with pytest.raises(ValueError, match="kind"):
        make_judge({"path": "x"})
    with pytest.raises(ValueError, match="unknown judge kind"):
        make_judge({"kind": "oracle"})
    with pytest.raises(ValueError, match="path"):
        make_judge({"kind": "classifier"})
