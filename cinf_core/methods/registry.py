"""The method registry: every caller (CLI choices, runner, torchrun path, bench, evaluation,
retrain grid, app pickers and legends) lists and looks up methods here.

Add a method by writing one :class:`~cinf_core.methods.base.Method` subclass and registering it::

    @register
    class ResponseLength(Method):
        name, label, short = "response_length", "Response length", "Len"
        loads_model = False
        def prepare(self, ctx):
            examples = ctx.examples()
            return lambda idx: np.array([len(examples[i].response) for i in idx], float)

Modules named in the environment variable ``CINF_METHODS`` (comma-separated, importable) are
imported the first time the registry is read, so a method registered there also exists in
``python -m cinf_core score``, under ``torchrun`` and in the app.
"""
from __future__ import annotations

import importlib
import os
from typing import Iterable, Mapping

from .base import Method

PLUGINS_ENV = "CINF_METHODS"
SIGN_CONVENTION = ("score > 0 means upweighting the example in training pushes the behaviour up; "
                   "rank 1 is the highest score; Remove Most drops the top.")

_REGISTRY: dict[str, Method] = {}
_loaded = False
_EXTRA_COLORS = ["#F0E442", "#000000", "#8C564B", "#17BECF", "#BCBD22"]


def register(method):
    """Register a Method instance, or a Method subclass (instantiated with no arguments; usable
    as a class decorator, which returns the class). A key registered twice is an error."""
    instance = method() if isinstance(method, type) else method
    if not isinstance(instance, Method):
        raise TypeError(f"register() takes a Method subclass or instance, got {method!r}")
    if instance.key in _REGISTRY and type(_REGISTRY[instance.key]) is not type(instance):
        raise ValueError(f"method {instance.key!r} is already registered by "
                         f"{type(_REGISTRY[instance.key]).__name__}; pick another name")
    _REGISTRY[instance.key] = instance
    return method


def unregister(key: str) -> None:
    """Remove a registered method (tests register toy methods and remove them again)."""
    _REGISTRY.pop(key, None)


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from .builtin import BUILTIN_METHODS

    for method in BUILTIN_METHODS:
        register(method)
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ImportError(f"{PLUGINS_ENV} names module {module!r}, which cannot be imported "
                              f"({err}); put it on PYTHONPATH or remove it from {PLUGINS_ENV}") from err


def registered() -> list[Method]:
    """Every registered method (variants included), in display order."""
    _ensure_loaded()
    return list(_REGISTRY.values())


def method_keys(results_order: bool = False) -> list[str]:
    """Every registered method key: display order, or cheapest first (``results_order``)."""
    methods = registered()
    if results_order:
        methods = sorted(methods, key=lambda m: m.cost)  # stable: display order within a tier
    return [m.key for m in methods]


def get_method(key: str) -> Method:
    """The method a key names: a registered key, or a variant of a registered method
    (``concept_influence@start5``); a clear error for anything else."""
    _ensure_loaded()
    if key in _REGISTRY:
        return _REGISTRY[key]
    for method in _REGISTRY.values():
        found = method.variant_for_key(key)
        if found is not None:
            return found
    raise ValueError(f"unknown method {key!r}; use one of {', '.join(_REGISTRY)}")


def find_method(key: str) -> Method | None:
    """Like :func:`get_method`, None for a key no registered method knows (a run scored by a
    method whose module is not loaded here)."""
    try:
        return get_method(key)
    except ValueError:
        return None


def method_key(method: str, config: Mapping | None = None) -> str:
    """The key of a run stored as ``method`` with ``config`` (its stored or requested settings)."""
    found = find_method(method)
    return method if found is None else found.variant(config or {}).key


def is_signed(key: str) -> bool:
    """Whether a method key's scores are signed (:attr:`Method.signed`); False for a key no
    registered method knows (its sign convention is unknown here)."""
    found = find_method(key)
    return found is not None and found.signed


def figure4_keys() -> list[str]:
    """Method keys whose runs are attributed to SAE features (Figure 4)."""
    return [m.key for m in registered() if m.in_figure4]


# ---------------------------------------------------------------- presentation (the app's pages)

def method_label(key: str) -> str:
    found = find_method(key)
    return found.label if found is not None else key.replace("_", " ").capitalize()


def method_short(key: str) -> str:
    found = find_method(key)
    return found.short if found is not None else key


def method_color(key: str) -> str:
    """The method's colour; unknown methods get a stable colour from a spare palette."""
    found = find_method(key)
    return found.color if found is not None else _EXTRA_COLORS[sum(map(ord, key)) % len(_EXTRA_COLORS)]


def method_sort_key(key: str) -> tuple[int, int, str]:
    """Display order: registration order, variants after their method, unknown keys last."""
    keys = [m.key for m in registered()]
    found = find_method(key)
    if key in keys:
        return keys.index(key), 0, key
    if found is not None and found.name in keys:
        return keys.index(found.name), 1, key
    return len(keys), 0, key


def method_explanation(key: str) -> tuple[str, str] | None:
    """``(one-line explanation, LaTeX formula)`` of a method key, None for unknown methods or
    methods registered without them."""
    found = find_method(key)
    if found is None or not found.explanation:
        return None
    return found.explanation, found.formula


def score_flags(key: str) -> str:
    """The ``score`` command's flags that produce a run of this method key (a variant's options
    as their own flags: ``--method concept_influence --concept-window 3``)."""
    found = find_method(key)
    if found is None:
        return f"--method {key}"
    return " ".join([f"--method {found.name}"] + [f"--{k.replace('_', '-')} {v}"
                                                   for k, v in found.options.items()])


def color_map(keys: Iterable[str], by_label: bool = False) -> dict[str, str]:
    """``{method key or its label: colour}`` for plotly's ``color_discrete_map``."""
    return {(method_label(k) if by_label else k): method_color(k) for k in keys}
