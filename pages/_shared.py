"""What every page shares: the workspace, cached store reads, empty states and live job panels.

Reads are cached per workspace and keyed by the store file's version (mtime and size), so a page
rerun costs nothing until a job writes; big frames (scored examples) are cached as resources —
one shared copy, never mutated by the pages.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from cinf_core import jobs, paths
from cinf_core.methods import registry
from cinf_core.store import Store
from cinf_core.views.format import store_version
from cinf_core.views.runs import (latest_complete_runs, runs_table, trait_choices,
                                  training_datasets)

WORKSPACE_KEY = "workspace"
JOB_POLL_S = 1.0


def default_workspace() -> str:
    return os.environ.get("CINF_WORKSPACE", "workspace")


def read_only() -> bool:
    """Whether the app serves its workspace read-only (``app --read-only``, or an address other
    than loopback without ``--allow-jobs``): the workspace is the one fixed at start, the store
    is opened read-only, and pages show results with no form, upload or job button."""
    return jobs.serving_read_only()


def workspace() -> str:
    """The workspace folder picked in the sidebar, or the one fixed at start when read-only
    (absolute path)."""
    ws = None if read_only() else st.session_state.get(WORKSPACE_KEY)
    return str(Path(ws or default_workspace()).expanduser().resolve())


@st.cache_resource(show_spinner=False, max_entries=8)
def _store(ws: str) -> Store:
    return Store(ws, read_only=read_only())


def store() -> Store | None:
    """The workspace's Store, or None while the folder has no store yet (never creates one)."""
    ws = workspace()
    if not (Path(ws) / paths.STORE_FILE).exists():
        return None
    return _store(ws)


def ensure_store() -> Store:
    """The workspace's Store, created when missing (for actions that write; refused when the app
    is read-only)."""
    if read_only():
        raise jobs.JobUnavailable(jobs.READ_ONLY_REASON)
    return _store(workspace())


def version() -> str:
    return store_version(workspace())


def _reader_name(reader) -> str:
    """The qualified name of a public Store reader (the cache key); refuses anything else, so
    pages read only through the Store's public methods."""
    name = getattr(reader, "__name__", "")
    if name.startswith("_") or getattr(Store, name, None) is not reader:
        raise TypeError(f"read() takes a public Store method such as Store.runs, got {reader!r}")
    return reader.__qualname__


# The reader itself is not hashable by streamlit; its qualified name keys the cache instead.
@st.cache_data(show_spinner=False, max_entries=128, ttl=3600)
def _read(ws: str, ver: str, name: str, _reader, *args) -> pd.DataFrame:
    return _reader(_store(ws), *args)


@st.cache_resource(show_spinner=False, max_entries=6)
def _read_big(ws: str, ver: str, name: str, _reader, *args) -> pd.DataFrame:
    return _reader(_store(ws), *args)


def read(reader, *args) -> pd.DataFrame:
    """A cached Store read returning a frame, named by the Store method itself:
    ``read(Store.runs)``, ``read(Store.scores, run_id)``. Empty while there is no store."""
    name = _reader_name(reader)
    if store() is None:
        return pd.DataFrame()
    return _read(workspace(), version(), name, reader, *args)


def read_big(reader, *args) -> pd.DataFrame:
    """Like ``read`` for large frames; the result is shared — do not mutate it."""
    name = _reader_name(reader)
    if store() is None:
        return pd.DataFrame()
    return _read_big(workspace(), version(), name, reader, *args)


@st.cache_data(show_spinner=False, max_entries=32)
def _runs_view(ws: str, ver: str) -> pd.DataFrame:
    s = _store(ws)
    return runs_table(s.runs(), s.concepts(), s.datasets())


def runs_view() -> pd.DataFrame:
    """Every run with readable trait/concept/dataset names (see ``views.runs.runs_table``)."""
    if store() is None:
        return runs_table(pd.DataFrame())
    return _runs_view(workspace(), version())


@st.cache_data(show_spinner=False, max_entries=32)
def _meta(ws: str, ver: str, key: str):
    return _store(ws).get_meta(key)


def meta(key: str):
    return None if store() is None else _meta(workspace(), version(), key)


# ---------------------------------------------------------------- presentation

def header(title: str, caption: str) -> None:
    st.title(title)
    st.caption(caption)


def empty_state(message: str, next_step: str | None = None) -> None:
    """A clear 'nothing here yet' box that says what to do next."""
    st.info(message + (f"\n\n**Next step:** {next_step}" if next_step else ""),
            icon=":material/lightbulb:")


def no_store_state() -> None:
    empty_state(f"There is no cinf workspace at `{workspace()}` yet.",
                "open **Overview** and build the demo world, pick another folder in the sidebar, "
                "or run `python -m cinf_core demo --workspace <folder>`.")


def method_explainer(methods) -> None:
    """An expander with each method's formula and a one-line explanation."""
    with st.expander("What do the methods compute?"):
        st.caption(registry.SIGN_CONVENTION)
        for m in sorted(set(methods), key=registry.method_sort_key):
            explained = registry.method_explanation(m)
            if explained is not None:
                st.markdown(f"**{registry.method_label(m)}** — {explained[0]}")
                st.latex(explained[1])


def style_fig(fig: go.Figure, height: int = 380, legend: str = "top") -> go.Figure:
    """Common layout: the title on top, then the legend (``top``), or the legend ``bottom`` /
    ``right`` when it has many entries or the figure has subplot titles."""
    legends = {
        "top": dict(orientation="h", yanchor="bottom", y=1.02, x=0, xanchor="left", title=None),
        "bottom": dict(orientation="h", yanchor="top", y=-0.2, x=0, xanchor="left", title=None),
        "right": dict(orientation="v", yanchor="top", y=1, x=1.02, xanchor="left", title=None),
    }
    margin = dict(l=10, r=10, t=90 if legend == "top" else 60, b=100 if legend == "bottom" else 10)
    fig.update_layout(height=height, margin=margin, legend=legends[legend],
                      title=dict(y=0.98, yanchor="top", x=0, xanchor="left"))
    return fig


def chart(fig: go.Figure, key: str | None = None) -> None:
    st.plotly_chart(fig, key=key, config={"displaylogo": False})


# ---------------------------------------------------------------- jobs

def _job_key(slot: str) -> str:
    return f"job:{slot}"


def job_launcher(slot: str, label: str, kind: str, args: dict, *, help: str | None = None,
                 disabled: bool = False, button_type: str = "primary") -> None:
    """A button that starts a background job, then that job's live panel (per ``slot``); the
    button is disabled while the job it started runs. A read-only app shows neither."""
    if read_only():
        return
    reason = jobs.unavailable_reason(kind)
    if reason is not None:
        st.button(label, key=f"btn:{slot}", disabled=True, help=reason, type=button_type)
        st.warning(f"Not available yet: {reason}.", icon=":material/construction:")
    elif st.button(label, key=f"btn:{slot}", disabled=disabled or _slot_running(slot), help=help,
                   type=button_type):
        try:
            st.session_state[_job_key(slot)] = jobs.start_job(workspace(), kind, args)
        except (jobs.JobUnavailable, OSError, RuntimeError, ValueError) as err:
            st.error(f"Could not start the job: {err}")
    job_panel(slot)


def _slot_running(slot: str) -> bool:
    job_id = st.session_state.get(_job_key(slot))
    if not job_id or store() is None:
        return False
    try:
        return jobs.job_state(store(), job_id)["status"] in jobs.ACTIVE
    except KeyError:
        return False


def job_panel(slot: str) -> dict | None:
    """The job started from ``slot``: a live progress bar while it runs, then its result."""
    job_id = st.session_state.get(_job_key(slot))
    if not job_id or store() is None:
        return None
    try:
        job = jobs.job_state(store(), job_id)
    except KeyError:
        st.session_state.pop(_job_key(slot), None)
        return None
    if job["status"] in jobs.ACTIVE:
        _live_job(job_id, slot)
    else:
        show_finished_job(job)
    return job


@st.fragment(run_every=JOB_POLL_S)
def _live_job(job_id: str, place: str, watch=None, seen=None) -> None:
    job = jobs.job_state(store(), job_id)
    title = jobs.JOB_KINDS[job["kind"]].title if job["kind"] in jobs.JOB_KINDS else job["kind"]
    if job["status"] not in jobs.ACTIVE or (watch is not None and watch() != seen):
        # The job ended, or stored what the page shows: rerun the whole page so it shows.
        st.rerun()
    progress = float(job["progress"] or 0.0)
    st.progress(min(max(progress, 0.0), 1.0),
                text=f"{title}: {job['message'] or job['status']} ({progress:.0%})")
    if not read_only() and st.button("Cancel", key=f"cancel:{place}:{job_id}"):
        jobs.cancel_job(workspace(), job_id)
        st.rerun()


# Jobs that write what a page shows: scoring runs, SAE feature attributions, retrain cells.
SCORING_JOBS = ("demo", "results", "score", "evaluate")
FEATURE_JOBS = ("demo", "results", "score", "features")
RETRAIN_JOBS = ("demo", "results", "retrain")


def running_job(kinds: tuple[str, ...], besides: str | None = None) -> dict | None:
    """The newest queued or running job of ``kinds``, wherever it was started (a page, the app
    command, a terminal), or None; ``besides`` names a launcher slot on the page whose job its
    own panel shows (left out here)."""
    if store() is None:
        return None
    own = st.session_state.get(_job_key(besides)) if besides else None
    found = [j for j in jobs.active_jobs(store(), kinds) if j["job_id"] != own]
    return found[0] if found else None


def _follow(job: dict, watch) -> None:
    _live_job(job["job_id"], "page", watch, None if watch is None else watch())


def job_progress(kinds: tuple[str, ...], watch=None, besides: str | None = None) -> dict | None:
    """While a job of ``kinds`` runs: what it computes and how far (its stage and per cent),
    refreshed on its own. ``watch`` (a cheap function of the store) is checked at each refresh;
    the whole page reruns when its value changes (the job stored more of what the page shows)
    and when the job ends. Returns the job, or None when none runs."""
    job = running_job(kinds, besides)
    if job is not None:
        _follow(job, watch)
    return job


def waiting_state(message: str, next_step: str, kinds: tuple[str, ...], watch=None,
                  besides: str | None = None) -> dict | None:
    """A page's empty state: while a job of ``kinds`` computes the missing data, says so with
    the job's live progress (the page fills in by itself) and returns the job; otherwise
    ``message`` and what to do next (:func:`empty_state`), and None."""
    job = running_job(kinds, besides)
    if job is None:
        empty_state(message, next_step)
        return None
    st.info(f"{message} A background job is computing it now; this page fills in by itself "
            "as soon as the first results are stored.", icon=":material/hourglass_top:")
    _follow(job, watch)
    return job


def n_complete_runs() -> int:
    """Complete scoring runs in the workspace (a :func:`job_progress` watch)."""
    runs = runs_view()
    return 0 if runs.empty else int((runs["status"] == "complete").sum())


def show_finished_job(job: dict) -> None:
    title = jobs.JOB_KINDS[job["kind"]].title if job["kind"] in jobs.JOB_KINDS else job["kind"]
    if job["status"] == "done":
        st.success(f"{title}: done.", icon=":material/check_circle:")
        if job["result"]:
            with st.expander("Result"):
                st.json(job["result"])
    elif job["status"] == "cancelled":
        st.warning(f"{title}: cancelled.")
    else:
        st.error(f"{title} failed: {job['error'] or 'no message'}")
        tail = jobs.log_tail(workspace(), job["job_id"])
        if tail:
            with st.expander("Log"):
                st.code(tail, language=None)


# ---------------------------------------------------------------- picking runs

def pick_scope(runs: pd.DataFrame, key: str, container=None,
               unscored: bool = False) -> tuple[str | None, str | None, pd.DataFrame]:
    """Trait and dataset selectboxes over complete runs; returns ``(trait, dataset_id, runs)``
    with one (latest) complete run per method for that scope.

    ``unscored`` (a page that also works on a trait no run has scored yet, e.g. SAE features):
    the workspace's traits with test queries are offered too, after the scored ones; such a
    trait is scoped to the training datasets and has no runs. The same on any page when no
    run is complete; trait or dataset_id is None when the workspace has none."""
    where = container or st
    done = runs[runs["status"] == "complete"]
    unscored = unscored or done.empty
    traits = trait_choices(done["trait"], read(Store.traits) if unscored else ())
    trait = where.selectbox("Trait / concept", traits, key=f"{key}:trait",
                            help="The trait a run attributes (its concept or test queries)"
                                 + ("; a trait without a run yet: its test queries."
                                    if unscored else "."))
    in_trait = done[done["trait"] == trait]
    if in_trait.empty:  # a trait with test queries but no complete run (or no trait at all)
        train = training_datasets(read(Store.datasets))
        ds_ids = list(train["dataset_id"])
        names = dict(zip(train["dataset_id"], train["name"]))
    else:
        ds_ids = list(dict.fromkeys(in_trait["dataset_id"]))
        names = dict(zip(in_trait["dataset_id"], in_trait["dataset"]))
    dataset_id = ds_ids[0] if ds_ids else None
    if len(ds_ids) > 1:
        dataset_id = where.selectbox("Dataset", ds_ids, format_func=names.get, key=f"{key}:ds")
    if in_trait.empty:
        return trait, dataset_id, runs.iloc[0:0]
    return trait, dataset_id, latest_complete_runs(runs, trait, dataset_id)


def pick_method(scope: pd.DataFrame, label: str, key: str, default: str = "concept_influence",
                exclude: str | None = None, container=None) -> pd.Series | None:
    """A method selectbox over the scope's runs; returns that method's run row."""
    where = container or st
    methods = [m for m in scope["method"] if m != exclude]
    if not methods:
        return None
    index = methods.index(default) if default in methods else 0
    method = where.selectbox(label, methods, index=index, format_func=registry.method_label,
                             key=key)
    return scope[scope["method"] == method].iloc[0]
