"""Finding worm files: the bundled demo worms, globs of user files, lab splits."""

from __future__ import annotations

import glob
import importlib.resources
import os
from collections.abc import Sequence
from pathlib import Path

from fdnc_jax.io import load_worm
from fdnc_jax.worm import Worm

DEMO_TEMPLATE = "NP_11_YAaLR"
DEMO_TEST = "NP_20_YAaLR"
WORM_SUFFIXES = (".npz", ".csv")


def bundled_worm_paths() -> list[Path]:
    """Paths of the CC-BY-4.0 NeuroPAL demo worms shipped in ``fdnc_jax/data/worms`` (sorted).

    Returns:
      The ``.npz`` files (positions in µm), sorted by name.

    Example:
      >>> [p.stem for p in bundled_worm_paths()][:2]
      ['EY_20190924_03', 'EY_20190928_08']
    """
    root = importlib.resources.files("fdnc_jax") / "data" / "worms"
    return sorted(Path(os.fspath(p)) for p in root.iterdir() if p.name.endswith(".npz"))


def load_bundled_worm(name: str) -> Worm:
    """One bundled worm by name (file stem), e.g. ``"NP_11_YAaLR"``.

    Args:
      name: the file stem of one of ``bundled_worm_paths()``.

    Returns:
      The Worm (``xyz_um`` [N, 3] µm, names [N], color [N, C]).

    Raises:
      ValueError: no bundled worm of that name (the message lists the available ones).

    Example:
      >>> load_bundled_worm("NP_11_YAaLR").xyz_um.shape
      (194, 3)
    """
    paths = {p.stem: p for p in bundled_worm_paths()}
    if name not in paths:
        raise ValueError(f"no bundled worm {name!r}; available: {sorted(paths)}")
    return load_worm(paths[name])


def load_demo_pair() -> tuple[Worm, Worm]:
    """(template, test): two fully annotated NeuroPAL animals of the same lab, shipped with the package.

    Returns:
      Two Worms (positions in µm, names, RGBW color [N, 4]).

    Example:
      >>> template, test = load_demo_pair()
      >>> template.n, test.n
      (194, 194)
    """
    return load_bundled_worm(DEMO_TEMPLATE), load_bundled_worm(DEMO_TEST)


def resolve_worm_files(spec: str | Sequence[str]) -> list[Path]:
    """Worm files named by ``spec``: ``"bundled"``, a folder, a glob, or comma-separated mixes of these.

    Args:
      spec: the sources, as a string (comma-separated) or a sequence of strings.

    Returns:
      The matching files, in order, without duplicates.

    Raises:
      ValueError: when nothing matches (naming the pattern).

    Example:
      >>> resolve_worm_files("bundled") == bundled_worm_paths()
      True
    """
    parts = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not parts:
        raise ValueError("no worm files given (empty sources)")
    files: list[Path] = []
    for part in parts:
        if part == "bundled":
            found = bundled_worm_paths()
        elif os.path.isdir(part):
            found = sorted(p for p in Path(part).iterdir() if p.suffix.lower() in WORM_SUFFIXES)
        else:
            found = sorted(Path(p) for p in glob.glob(os.path.expandvars(os.path.expanduser(part))))
        if not found:
            raise ValueError(f"no worm files match {part!r}")
        files.extend(found)
    return list(dict.fromkeys(files))


def lab_of(worm: Worm) -> str:
    """The lab a worm comes from (``meta['lab']``, else the file-name prefix before '_').

    Args:
      worm: the Worm.

    Returns:
      The lab's short name, e.g. ``"NP"``.

    Example:
      >>> lab_of(load_bundled_worm("NP_11_YAaLR"))
      'NP'
    """
    lab = worm.meta.get("lab")
    if lab:
        return str(lab)
    return Path(str(worm.meta.get("file", "unknown"))).stem.split("_")[0]
