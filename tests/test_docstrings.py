"""Docstring quality: the examples in the docstrings run (doctest), and every public function,
class and method of the core modules documents itself with an ``Example:`` section.

Examples that need a trained model run or user files are marked ``# doctest: +SKIP``; all others
run on CPU in well under a second each (the shapes are tiny and shared, so compiles are reused).
"""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import fdnc_jax.model
import fdnc_jax.sim
import fdnc_jax.train

# Modules held to the standard: every public function/class/method has an Example (checked below).
DOCUMENTED = [
    "fdnc_jax.worm",
    "fdnc_jax.io",
    "fdnc_jax.matching",
    "fdnc_jax.auction",
    "fdnc_jax.metrics",
    "fdnc_jax.pose",
    "fdnc_jax.cpd",
    "fdnc_jax.datasets",
    "fdnc_jax.checkpoint",
    "fdnc_jax.losses",
    "fdnc_jax.types",
    "fdnc_jax.atlas",
    "fdnc_jax.plots",
    "fdnc_jax.orientation",
    "fdnc_jax.predict",
    "fdnc_jax.evaluate",
    "fdnc_jax.template_eval",
    *(
        f"{pkg.__name__}.{info.name}"
        for pkg in (fdnc_jax.sim, fdnc_jax.model, fdnc_jax.train)
        for info in pkgutil.iter_modules(pkg.__path__)
    ),
]
DOCTESTED: list[str] = []  # Modules whose examples run but whose coverage is not checked.
# Public names deliberately without an example: "module.qualname" -> why.
EXEMPT: dict[str, str] = {}

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.filterwarnings("ignore:xyz_um has .* duplicated identical points:UserWarning")
@pytest.mark.parametrize("name", DOCUMENTED + DOCTESTED)
def test_doctests_pass(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=FLAGS)
    assert result.failed == 0, (
        f"{result.failed} of {result.attempted} docstring examples failed in {name}; the doctest "
        "report is in the captured stdout above"
    )


def _public_api(module):
    """(qualified name, object) of the module's own public functions and classes, and of the public
    methods and properties those classes define themselves (not inherited, not dataclass-made)."""
    for name, obj in vars(module).items():
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if obj.__module__ != module.__name__:  # imported from elsewhere
            continue
        yield name, obj
        if not inspect.isclass(obj):
            continue
        for attr, member in vars(obj).items():
            if attr.startswith("_"):
                continue
            if isinstance(member, property):
                yield f"{name}.{attr}", member.fget
                continue
            if isinstance(member, classmethod | staticmethod):
                member = member.__func__
            if inspect.isfunction(member) and member.__qualname__ == f"{obj.__qualname__}.{attr}":
                yield f"{name}.{attr}", member


@pytest.mark.parametrize("name", DOCUMENTED)
def test_public_api_has_examples(name):
    module = importlib.import_module(name)
    api = dict(_public_api(module))
    missing = [
        qualname
        for qualname, obj in api.items()
        if f"{name}.{qualname}" not in EXEMPT
        and not ("Example:" in (obj.__doc__ or "") and ">>>" in (obj.__doc__ or ""))
    ]
    assert not missing, f"{name}: public names without an 'Example:' doctest: {missing}"


def test_api_walk_finds_members():
    """The walk above sees functions, classes, methods, classmethods and properties."""
    found = set(dict(_public_api(importlib.import_module("fdnc_jax.worm"))))
    assert {"Worm", "to_model_units", "Worm.from_pixels", "Worm.subset", "Worm.n"} <= found
    assert "Mapping" not in found and "Worm.__post_init__" not in found
