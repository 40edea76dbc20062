"""cinf — the Streamlit frame: page config, navigation over the pages, the workspace picker (or,
when the app serves read-only, the fixed workspace and a note saying so).

Run with ``python -m cinf_core app`` (CINF_WORKSPACE picks the folder). That launcher tells
Streamlit up front that this app navigates with ``st.navigation``: with plain ``streamlit run
app.py`` Streamlit treats the ``pages/`` folder as an old-style multipage app until the first
session has run this frame, so a deep link opened first after a restart would show its page alone.
"""
import sys
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # pages import cinf_core and pages._shared from the repo root
    sys.path.insert(0, str(ROOT))

from cinf_core.views.format import built_worlds, workspace_info  # noqa: E402
from pages import _shared  # noqa: E402

st.set_page_config(page_title="cinf — Concept Influence explorer",
                   page_icon=":material/explore:", layout="wide")

PAGES = {
    "Explore": [
        st.Page("pages/overview.py", title="Overview", icon=":material/home:", default=True),
        st.Page("pages/influential_examples.py", title="Influential examples",
                icon=":material/manage_search:"),
        st.Page("pages/concepts.py", title="Concepts", icon=":material/explore:"),
        st.Page("pages/sae_features.py", title="SAE features", icon=":material/extension:"),
    ],
    "Evaluate": [
        st.Page("pages/method_agreement.py", title="Method agreement", icon=":material/hub:"),
        st.Page("pages/filter_retrain.py", title="Filter & retrain", icon=":material/science:"),
        st.Page("pages/runs_cost.py", title="Runs & cost", icon=":material/timer:"),
    ],
}
page = st.navigation(PAGES)

with st.sidebar:
    if _shared.read_only():
        st.markdown(":material/lock: **Read-only**: the results of one workspace; no jobs, "
                    "forms or uploads.")
    else:
        st.text_input("Workspace folder", value=_shared.default_workspace(),
                      key=_shared.WORKSPACE_KEY,
                      help="A folder with a cinf store (cinf.duckdb). Default: $CINF_WORKSPACE.")
        worlds = built_worlds(_shared.default_workspace())
        if len(worlds) > 1:  # both worlds built: one click between them
            st.caption("Switch world")
            for name, folder in worlds.items():
                st.button(name, key=f"world:{name}", use_container_width=True,
                          on_click=st.session_state.__setitem__,
                          args=(_shared.WORKSPACE_KEY, str(folder)))
    info = workspace_info(_shared.workspace())
    if info.exists:
        st.caption(f"`{info.path}`")
    else:
        st.caption(f"No store in `{info.path}` yet.")
    if not _shared.read_only():
        st.caption("Jobs allowed: this app starts jobs and reads any folder typed above.")

page.run()
