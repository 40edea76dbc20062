"""Lexical baseline: how far does a bag of words get?

``score(z_i) = cos(tfidf(y_i), mean_q tfidf(y_q))``: the TF-IDF cosine between a training
response and the mean TF-IDF vector of the test queries' responses (each L2-normalised first),
with the inverse document frequency taken over the training responses (smoothed:
``idf(w) = ln((1 + N) / (1 + df(w))) + 1``). No model is involved.

It is a check on the other methods rather than one of them: when it retrieves the labelled trait
data as well as a method does, the trait is written in the words themselves and the method's
ranking adds little beyond vocabulary; when the methods beat it, they see something a word count
does not.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np
from scipy import sparse

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased words (letters and digits; an inner apostrophe stays: ``don't``)."""
    return _WORD.findall(text.lower())


def _counts(texts: Iterable[str], vocab: dict[str, int], grow: bool) -> sparse.csr_matrix:
    indptr, indices, data = [0], [], []
    for text in texts:
        row: dict[int, int] = {}
        for w in words(text):
            j = vocab.get(w)
            if j is None:
                if not grow:
                    continue
                j = vocab[w] = len(vocab)
            row[j] = row.get(j, 0) + 1
        indices.extend(row)
        data.extend(row.values())
        indptr.append(len(indices))
    return sparse.csr_matrix((np.asarray(data, dtype=np.float64), indices, indptr),
                             shape=(len(indptr) - 1, max(len(vocab), 1)))


def _normalise(m: sparse.csr_matrix) -> sparse.csr_matrix:
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sparse.diags(1.0 / norms) @ m


def lexical_scores(train_responses: Sequence[str], query_responses: Sequence[str]) -> np.ndarray:
    """TF-IDF cosine of each training response with the test queries' mean vector (float64)."""
    if not query_responses:
        raise ValueError("the lexical baseline needs at least one test query response")
    vocab: dict[str, int] = {}
    train = _counts(train_responses, vocab, grow=True)
    queries = _counts(query_responses, vocab, grow=False)
    n = train.shape[0]
    df = np.bincount(train.indices, minlength=train.shape[1])
    idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
    weight = sparse.diags(idf)
    train_v = _normalise(train @ weight)
    query_mean = np.asarray(_normalise(queries @ weight).mean(axis=0)).ravel()
    return np.asarray(train_v @ query_mean, dtype=np.float64).ravel()
