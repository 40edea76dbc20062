"""What the Overview says about a workspace's results and what it offers to compute: the methods
scored and the filter-and-retrain cells finished, per trait, and — only for what is missing — the
results job, worded by what it would add (everything on a fresh world, the rest otherwise); and
whether ``python -m cinf_core app`` starts that job itself as it opens the workspace."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import pandas as pd

from ..experiments.evaluate import missing_phrases
from ..experiments.retrain import REFERENCE_CELLS
from ..methods.registry import method_label, method_sort_key

MODE_WORDS = {"most": "Remove Most", "least": "Remove Least"}


@dataclass(frozen=True)
class ResultsOffer:
    """``have``: what the workspace holds (markdown; None when nothing is computed); ``todo``:
    what the results job would add (None when nothing is missing); ``button``: the launcher's
    label (None: nothing to offer); ``fresh``: nothing is computed yet, so the offer is the
    page's call to action rather than a remainder."""

    have: str | None
    todo: str | None
    button: str | None
    fresh: bool


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _join(words: Sequence[str]) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _labels(keys) -> list[str]:
    return [method_label(k) for k in sorted(keys, key=method_sort_key)]


def _percent(fractions) -> str:
    return _join([f"{f:.0%}" for f in sorted(set(float(f) for f in fractions))])


def _modes_in_order(modes) -> list[str]:
    """Remove Most before Remove Least, as on the Filter & retrain page."""
    order = list(MODE_WORDS)
    return sorted(set(modes), key=lambda m: (order.index(m) if m in order else len(order), m))


def _grid_words(methods, modes, fractions, seeds) -> str:
    """``Remove Most 25% and 50% by Concept Influence and Random; seeds 0 and 1``."""
    modes = [MODE_WORDS.get(m, m) for m in _modes_in_order(modes)]
    seeds = sorted(set(int(s) for s in seeds))
    return (f"{_join(modes)} {_percent(fractions)} by {_join(_labels(set(methods)))}; "
            f"seed{'s' * (len(seeds) != 1)} {_join([str(s) for s in seeds])}")


def _scored_words(traits: Mapping[str, Mapping], n_methods: int) -> str:
    """``all 8 methods for evil and sycophantic (…)``, or per trait when they differ."""
    scored = {t: tuple(p["scored"]) for t, p in traits.items()}
    if len(set(scored.values())) == 1 and not any(p["unscored"] for p in traits.values()):
        keys = next(iter(scored.values()))
        return (f"all {_plural(n_methods, 'method')} for {_join(list(traits))} "
                f"({', '.join(_labels(keys))})")
    parts = []
    for trait, keys in scored.items():
        of = len(keys) + len(traits[trait]["unscored"])
        parts.append(f"{trait}: {len(keys)} of {_plural(of, 'method')} "
                     f"({', '.join(_labels(keys))})" if keys else f"{trait}: none")
    return "; ".join(parts)


def _complete(cells: pd.DataFrame | None) -> pd.DataFrame:
    """The complete retrain cells (no rows, the columns read here, when there are none)."""
    if cells is None or cells.empty:
        return pd.DataFrame(columns=["trait", "method", "mode", "fraction", "seed", "experiment_id"])
    return cells[cells["status"].fillna("complete") == "complete"]


def _cells_words(cells: pd.DataFrame, trait: str) -> str:
    """``11 cells for evil (Remove Most 50% by …; seeds 0 and 1; with the base model and the
    model fine-tuned on all data)``."""
    mine = cells[cells["trait"] == trait]
    grid = mine[~mine["method"].isin(REFERENCE_CELLS)]
    refs = [name for cell, name in zip(REFERENCE_CELLS, ("the base model",
                                                         "the model fine-tuned on all data"))
            if (mine["method"] == cell).any()]
    inner = []
    if not grid.empty:
        inner.append(_grid_words(grid["method"], grid["mode"], grid["fraction"], grid["seed"]))
    if refs:
        inner.append("with " + _join(refs) if inner else "only " + _join(refs))
    n_exp = mine["experiment_id"].nunique()
    if n_exp > 1:
        inner.append(f"{n_exp} experiments")
    return f"{_plural(len(mine), 'cell')} for {trait} ({'; '.join(inner)})"


def results_offer(status: Mapping, cells: pd.DataFrame | None) -> ResultsOffer:
    """The Overview's account of ``status`` (from
    :func:`~cinf_core.experiments.evaluate.results_status`) and of the retrain ``cells`` stored
    (every experiment; only complete ones count).

    Nothing computed yet (no scored method, no finished cell): the results job is offered as
    "Compute the results". Otherwise ``have`` says which methods are scored and which cells exist
    for which traits, and only what is missing is offered, named by what it would add ("Compute
    the rest of the default grid: 8 more retrain cells"); nothing is offered when nothing is
    missing.
    """
    traits: Mapping[str, Mapping] = status.get("traits", {})
    done = _complete(cells)
    runs_missing = {t: len(p["unscored"]) for t, p in traits.items() if p["unscored"]}
    grid_missing = {t: int(p["grid_missing"]) for t, p in traits.items() if p["grid_missing"]}
    n_runs, n_cells = sum(runs_missing.values()), sum(grid_missing.values())
    anything = any(p["scored"] for p in traits.values()) or not done.empty

    if not anything:
        if not (n_runs or n_cells):
            return ResultsOffer(None, None, None, fresh=True)
        todo = ("Not computed yet: " + "; ".join(missing_phrases(status)) + ". The results job "
                "scores every method (the cheap ones first, each shown as soon as it is stored), "
                "computes the SAE feature views, then a small filter-and-retrain grid (Figure 2).")
        return ResultsOffer(None, todo, "Compute the results", fresh=True)

    n_methods = max((len(p["scored"]) + len(p["unscored"]) for p in traits.values()), default=0)
    have = ["**Scored:** " + _scored_words(traits, n_methods) + "."] if traits else []
    cell_traits = [t for t in list(traits) + sorted(set(done["trait"]) - set(traits))
                   if (done["trait"] == t).any()]
    if cell_traits:
        none = [t for t in traits if t not in cell_traits]
        have.append("**Filter and retrain:** "
                    + "; ".join(_cells_words(done, t) for t in cell_traits)
                    + (f"; none for {_join(none)}" if none else "") + ".")
    elif status.get("retrain_unavailable"):
        why = status["retrain_unavailable"]
        have.append(f"**Filter and retrain:** not available here ({why}).")
    else:
        have.append("**Filter and retrain:** no cells yet.")
    if not (n_runs or n_cells):
        return ResultsOffer("\n\n".join(have), None, None, fresh=False)

    todo = []
    if n_runs:
        todo.append("Not scored yet: " + "; ".join(
            f"{t} by {', '.join(_labels(traits[t]['unscored']))}" for t in runs_missing) + ".")
    if n_cells:
        grid = status["grid"]
        todo.append(
            f"The default filter-and-retrain grid the app runs for every trait "
            f"({_grid_words(grid['methods'], grid['modes'], grid['fractions'], grid['seeds'])}; "
            f"with the base model and all-data references: {grid['cells']} cells a trait) "
            f"still lacks " + _join([f"{_plural(n, 'cell')} for {t}"
                                     for t, n in grid_missing.items()])
            + "; finished cells are reused, never recomputed.")
    todo.append("The job also recomputes the evaluation"
                + (" and the SAE feature views (a forward pass over the training set)."
                   if status.get("sae") else "."))
    if n_runs and n_cells:
        button = (f"Compute the rest of the results: {_plural(n_runs, 'more scoring run')} and "
                  f"{_plural(n_cells, 'more retrain cell')}")
    elif n_runs:
        button = f"Compute the rest of the results: {_plural(n_runs, 'more scoring run')}"
    else:
        button = f"Compute the rest of the default grid: {_plural(n_cells, 'more retrain cell')}"
    return ResultsOffer("\n\n".join(have), " ".join(todo), button, fresh=False)


@dataclass(frozen=True)
class OpenAction:
    """What ``python -m cinf_core app`` does about the results job as it opens a workspace:
    ``start`` it with ``args`` or not, and the ``line`` it prints on stderr (None: nothing)."""

    start: bool
    args: dict
    line: str | None


BACKGROUND = "the pages fill in as each part is stored (see Overview > Background jobs)"


def _computed_words(status: Mapping, cells: pd.DataFrame | None) -> str:
    """``all 8 methods scored for evil and sycophantic, 11 filter-and-retrain cells for evil``."""
    traits: Mapping[str, Mapping] = status.get("traits", {})
    n_of = max((len(p["scored"]) + len(p["unscored"]) for p in traits.values()), default=0)
    counts = {t: len(p["scored"]) for t, p in traits.items()}
    if not traits:
        scored = None
    elif set(counts.values()) == {n_of} and n_of:
        scored = f"all {_plural(n_of, 'method')} scored for {_join(list(traits))}"
    elif not any(counts.values()):
        scored = "no method scored"
    else:
        scored = ", ".join(f"{t}: {n} of {_plural(n_of, 'method')} scored" if n else
                           f"{t}: no method scored" for t, n in counts.items())
    per_trait = _complete(cells)["trait"].value_counts()
    retrained = (_join([f"{_plural(int(n), 'filter-and-retrain cell')} for {t}"
                        for t, n in per_trait.items()]) if len(per_trait)
                 else "no filter-and-retrain cells")
    return f"{scored}, {retrained}" if scored else retrained


def results_on_open(missing: Sequence[str], status: Mapping, cells: pd.DataFrame | None,
                    running: Sequence[Mapping], last: Mapping | None) -> OpenAction:
    """Whether the app command starts the results job on the workspace it opens.

    ``missing``: what the job would compute
    (:func:`~cinf_core.experiments.evaluate.results_missing`); ``status`` and ``cells`` as for
    :func:`results_offer`; ``running``: the results jobs queued or running
    (:func:`~cinf_core.jobs.active_jobs`); ``last``: the newest results job that ended, or None
    when none ever ran.

    It starts the job only where the user expects it: on a fresh world (nothing computed, no
    results job ever: the demo's first minutes, the pages filling in as the job stores each
    part), or to resume a results job that was interrupted (its runner or command killed, the
    machine restarted; :func:`~cinf_core.jobs.job_interrupted`) with that job's args. A workspace
    that holds results computed otherwise (another grid, by hand, a job that finished, failed or
    was cancelled) gets a line saying what is computed and that the Overview offers the rest;
    retraining the default grid can take hours, so it is never started just by opening the app.
    """
    from ..jobs import job_interrupted

    if running:
        job = running[0]
        doing = f": {job['message']}" if job.get("message") else ""
        at = f"{float(job.get('progress') or 0):.0%}{doing}"
        return OpenAction(False, {}, f"a results job is already running ({at}); {BACKGROUND}")
    offer = results_offer(status, cells)
    if not missing:  # nothing to say on a workspace without traits or anything computed
        return OpenAction(False, {}, None if offer.fresh else (
            "results computed: " + _computed_words(status, cells) + "; nothing left to compute"))
    todo = ", ".join(missing)
    if last is not None and job_interrupted(last):
        args = dict(last.get("args") or {})
        return OpenAction(True, args, f"resuming the results job that was interrupted (still to "
                                      f"compute: {todo}; what it stored is kept); {BACKGROUND}")
    if offer.fresh and last is None:
        return OpenAction(True, {}, f"computing in the background ({todo}); {BACKGROUND}")
    if last is not None and last.get("status") == "cancelled":
        why = "the last results job was cancelled, so none is started"
    elif last is not None and last.get("status") == "failed":
        error = last.get("error") or "no message"
        why = f"the last results job failed ({error}), so none is started"
    else:
        why = "no job started"
    computed = "nothing computed yet" if offer.fresh else ("results computed: "
                                                           + _computed_words(status, cells))
    button = offer.button or "Compute the results"
    return OpenAction(False, {}, f"{computed}; {why}: the Overview offers '{button}' ({todo})")


def app_results_action(store) -> OpenAction:
    """:func:`results_on_open` for ``store``'s workspace (a results job whose runner is gone is
    marked failed on the way, see :func:`~cinf_core.jobs.active_jobs`)."""
    from ..experiments.evaluate import missing_phrases, results_status
    from ..jobs import ACTIVE, active_jobs

    running = active_jobs(store, ("results",))
    if running:
        return results_on_open([], {"traits": {}}, None, running, None)
    frame, last = store.jobs(), None  # newest first
    if not frame.empty:
        ended = frame[(frame["kind"] == "results") & ~frame["status"].isin(ACTIVE)]
        if not ended.empty:
            last = store.job(ended["job_id"].iloc[0])
    status = results_status(store)
    return results_on_open(missing_phrases(status), status, store.retrain_cells(), [], last)
