"""Filter & retrain (Figure 2): does removing what a method flags remove the trait?"""
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from cinf_core.methods import registry
from cinf_core.store import Store
from cinf_core.views.retrain import reference_levels, retrain_curves, y_range
from pages import _shared as sh

sh.header("Filter & retrain", "Figure 2: drop the top (Remove Most) or bottom (Remove Least) "
          "fraction of the fine-tuning set by each method's ranking, retrain the LoRA from the "
          "base model, and judge the trait again. Mean ± SEM over seeds.")

MODES = {"most": "Remove Most (top scores)", "least": "Remove Least (bottom scores)"}


def _band(fig, curve: pd.DataFrame, color: str, row: int, col: int) -> None:
    x = list(curve["fraction"]) + list(curve["fraction"])[::-1]
    y = list(curve["mean"] + curve["sem"]) + list(curve["mean"] - curve["sem"])[::-1]
    fig.add_trace(go.Scatter(x=x, y=y, fill="toself", fillcolor=color, opacity=0.15,
                             line=dict(width=0), hoverinfo="skip", showlegend=False),
                  row=row, col=col)


def launch_form() -> None:
    runs = sh.runs_view()
    traits = sorted(runs["trait"].unique()) if not runs.empty else []
    with st.form("fr:new"):
        f1, f2 = st.columns(2)
        trait = f1.selectbox("Trait", traits) if traits else f1.text_input("Trait", "evil")
        methods = f2.multiselect("Methods", registry.method_keys(),
                                 default=["concept_influence", "influence_function",
                                          "vector_filter", "random"],
                                 format_func=registry.method_label)
        f3, f4, f5 = st.columns(3)
        modes = f3.multiselect("Modes", list(MODES), default=list(MODES), format_func=MODES.get)
        fractions = f4.multiselect("Fractions removed", [0.1, 0.25, 0.5, 0.75, 0.9],
                                   default=[0.1, 0.25, 0.5, 0.75, 0.9])
        seeds = f5.number_input("Seeds", min_value=1, max_value=5, value=3)
        submitted = st.form_submit_button("Prepare experiment")
    if submitted:
        st.session_state["fr:args"] = {"trait": trait, "methods": methods, "modes": modes,
                                       "fractions": sorted(fractions),
                                       "seeds": list(range(int(seeds)))}
    args = st.session_state.get("fr:args")
    if args:
        n = len(args["methods"]) * len(args["modes"]) * len(args["fractions"]) * len(args["seeds"])
        st.caption(f"{n} retrained models plus references; each cell is one LoRA fine-tune and "
                   "a judged evaluation. Cells already finished are reused.")
        sh.job_launcher("fr:retrain", f"Start filter-and-retrain for '{args['trait']}'",
                        "retrain", args)


def cells_done() -> int:
    """Finished cells of every experiment (what the page waits for while a job runs)."""
    found = sh.read(Store.retrain_cells)
    return 0 if found.empty else int((found["status"] == "complete").sum())


if sh.store() is None:
    sh.no_store_state()
    st.stop()
cells = sh.read(Store.retrain_cells)
if cells_done() == 0:
    waiting = sh.waiting_state(
        "No filter-and-retrain results yet.",
        "launch an experiment below (it retrains one LoRA per cell in the background) or run "
        "`python -m cinf_core retrain --trait evil`.", sh.RETRAIN_JOBS, cells_done)
    if waiting is None and not sh.read_only():
        st.subheader("Launch an experiment")
        launch_form()
    st.stop()
sh.job_progress(sh.RETRAIN_JOBS, cells_done, besides="fr:retrain")  # more cells arrive meanwhile

experiments = cells.groupby(["experiment_id", "trait"]).size().reset_index(name="n")
options = list(experiments.itertuples(index=False))
c1, c2 = st.columns([2, 1])
exp = c1.selectbox("Experiment", options, key="fr:exp",
                   format_func=lambda e: f"{e.trait} · {e.experiment_id[:8]} · {e.n} cells")
value = c2.radio("Measure", ["trait_score", "capability"], horizontal=True, key="fr:value",
                 format_func={"trait_score": "Trait score", "capability": "Capability"}.get)
sel = cells[cells["experiment_id"] == exp.experiment_id]
done = sel[sel["status"].fillna("complete") == "complete"]
running = int((sel["status"] == "running").sum())
st.caption(f"{len(done)} cells complete" + (f", {running} running" if running else "")
           + ". Trait score: judge score 0–100 on held-out questions; capability: next-token "
             "accuracy (%) on held-out normal data.")

curves = retrain_curves(done, value)
refs = reference_levels(done, value)
y_title = "trait score (judge, 0–100)" if value == "trait_score" else "capability (accuracy, %)"
fig = make_subplots(rows=1, cols=2, subplot_titles=list(MODES.values()), shared_yaxes=True)
methods = sorted(curves["method"].unique(), key=registry.method_sort_key)
if methods:
    sh.method_explainer(methods)
drawn = [col for col, mode in enumerate(MODES, start=1) if (curves["mode"] == mode).any()]
in_legend = set()
for col, mode in enumerate(MODES, start=1):
    if col not in drawn:  # plotly draws no axes for an empty panel: say why it is blank
        left, right = fig.layout["xaxis" if col == 1 else f"xaxis{col}"].domain
        fig.add_annotation(text=f"no {MODES[mode].split(' (')[0]} cells in this experiment",
                           xref="paper", yref="paper", x=(left + right) / 2, y=0.5,
                           showarrow=False, font=dict(color="#777"))
    for method in methods:
        curve = curves[(curves["method"] == method) & (curves["mode"] == mode)]
        if curve.empty:
            continue
        color = registry.method_color(method)
        _band(fig, curve, color, 1, col)
        fig.add_trace(go.Scatter(
            x=curve["fraction"], y=curve["mean"], mode="lines+markers",
            name=registry.method_label(method), legendgroup=method,
            showlegend=method not in in_legend,
            line=dict(color=color, dash="dash" if method == "random" else "solid"),
            customdata=curve[["n"]], hovertemplate="removed %{x:.0%}<br>%{y:.1f} "
                                                   "(n=%{customdata[0]} seeds)"), row=1, col=col)
        in_legend.add(method)
    for name, level in refs.items():  # named once, in the last panel drawn (an empty one has none)
        label = ({"annotation_text": name, "annotation_position": "top left"}
                 if col == (drawn or [2])[-1] else {})
        fig.add_hline(y=level, line_dash="dot", line_color="#444" if "base" in name else "#999",
                      row=1, col=col, **label)
fig.update_xaxes(title="fraction of training data removed", tickformat=".0%", range=[-0.03, 0.95])
fig.update_yaxes(range=y_range(curves, refs))  # every line inside, none on the edge
fig.update_yaxes(title=y_title, row=1, col=1)
sh.chart(sh.style_fig(fig, 480, legend="bottom"), key="fr:fig2")
st.caption("Lower trait score under Remove Most means the method found the examples that carry "
           "the trait; Random is the baseline every method must beat. Dotted lines: the base "
           "model and the model fine-tuned on all data.")

st.subheader("Capability vs trait")
if done["capability"].notna().any():
    tr = retrain_curves(done, "trait_score")
    cap = retrain_curves(done, "capability")
    both = tr.merge(cap, on=["experiment_id", "trait", "method", "mode", "fraction"],
                    suffixes=("_trait", "_cap"))
    fig = go.Figure()
    for method in sorted(both["method"].unique(), key=registry.method_sort_key):
        for mode, symbol in (("most", "circle"), ("least", "triangle-up")):
            part = both[(both["method"] == method) & (both["mode"] == mode)]
            if part.empty:
                continue
            fig.add_trace(go.Scatter(
                x=part["mean_trait"], y=part["mean_cap"], mode="markers",
                name=f"{registry.method_label(method)} · {mode}",
                marker=dict(color=registry.method_color(method), symbol=symbol, size=9),
                customdata=part[["fraction"]],
                hovertemplate="removed %{customdata[0]:.0%}<br>trait %{x:.1f}"
                              "<br>capability %{y:.1f}"))
    ref_t = reference_levels(done, "trait_score")
    ref_c = reference_levels(done, "capability")
    for name in ref_t:
        if name in ref_c:
            fig.add_trace(go.Scatter(x=[ref_t[name]], y=[ref_c[name]], mode="markers+text",
                                     text=[name], textposition="top center", name=name,
                                     marker=dict(symbol="star", size=14, color="#333")))
    fig.update_xaxes(title="trait score (judge, 0–100; lower is better)")
    fig.update_yaxes(title="capability (accuracy, %; higher is better)")
    fig.update_layout(title="Each point: one (method, mode, fraction), mean over seeds")
    sh.chart(sh.style_fig(fig, 460, legend="right"), key="fr:capability")
else:
    st.caption("No capability numbers recorded for this experiment.")

with st.expander("All cells"):
    st.dataframe(sel.drop(columns=[c for c in ("owner", "claimed_at") if c in sel.columns]),
                 hide_index=True)

if not sh.read_only():  # a read-only app shows results only
    st.subheader("Launch a new experiment")
    launch_form()
