"""Loading config files (``configs/*.py``) by path: they are scripts, not an importable package."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import ml_collections


def load_config_module(path: str | os.PathLike) -> ModuleType:
    """Imports a config file by path (e.g. to derive small.py from default.py).

    Args:
      path: the ``.py`` config file.

    Returns:
      The executed module (not added to ``sys.modules``).

    Raises:
      ValueError: the file does not exist.

    Example:
      >>> import tempfile
      >>> src = "import ml_collections as mc; get_config = lambda: mc.ConfigDict({'seed': 3})"
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = (Path(d) / "cfg.py").write_text(src)
      ...     load_config_module(Path(d) / "cfg.py").get_config().seed
      3
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such config file")
    spec = importlib.util.spec_from_file_location(f"fdnc_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """``get_config()`` of the config file at ``path``.

    Args:
      path: the ``.py`` config file (e.g. ``configs/small.py``).

    Returns:
      The ConfigDict it builds.

    Example:
      >>> import tempfile
      >>> src = "import ml_collections as mc; get_config = lambda: mc.ConfigDict({'seed': 3})"
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = (Path(d) / "cfg.py").write_text(src)
      ...     get_config(Path(d) / "cfg.py").seed
      3
    """
    return load_config_module(path).get_config()
