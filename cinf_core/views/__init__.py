"""Plain data shaping for the app's pages, one module per thing shaped.

``runs`` (the runs table, costs), ``examples`` (scored examples: lists, quantiles, histograms,
rank comparisons), ``agreement`` (methods side by side: correlations, retrieval of labelled data),
``features`` (SAE features, Figure 4), ``retrain`` (filter-and-retrain curves, Figure 2),
``labels`` (data labels and their colours), ``concepts`` (concept geometry, token highlighting),
``format`` (the workspace, numbers and summaries as text).

Everything here is importable without streamlit and unit-tested (tests/test_views_*.py). Pages
read through the Store, call these helpers and draw. Frames that come from the store are never
mutated here (the app caches them and shares one copy).
"""
