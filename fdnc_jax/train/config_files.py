"""Loading config files (``configs/*.py``) by path: they are scripts, not an importable package."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import ml_collections


def load_config_module(path: str | os.PathLike) -> ModuleType:
    """Imports a config file by path (e.g. to derive small.py from default.py)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such config file")
    spec = importlib.util.spec_from_file_location(f"fdnc_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """``get_config()`` of the config file at ``path``."""
    return load_config_module(path).get_config()
