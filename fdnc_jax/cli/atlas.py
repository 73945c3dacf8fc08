"""fdnc-atlas: build a statistical atlas template from labelled worms, or describe one.

Usage:
  fdnc-atlas build --data=DIR --out=atlas.npz [--min_fraction=0.1] [--noallow_reflection]
  fdnc-atlas info [--atlas=atlas.npz]          # default: the bundled atlas

The atlas file is also a worm file: use it anywhere a template is expected
(``fdnc-predict --template=atlas.npz``, ``fd.load_atlas(path)``). The same inputs give the same
file byte for byte. Intentionally kept short: all logic is in fdnc_jax.atlas.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from absl import flags

from fdnc_jax.cli._common import run_main

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "data",
    None,
    "build: labelled worm files (positions in µm, names): a folder, a glob or a "
    "comma-separated list of .npz/.csv files; ≥ 3 animals.",
)
flags.DEFINE_string("out", None, "build: the atlas .npz to write (atomically).")
flags.DEFINE_string("atlas", None, "info: the atlas .npz to describe (default: the bundled one).")
flags.DEFINE_integer(
    "min_animals", 3, "Keep names annotated in at least this many animals (count)."
)
flags.DEFINE_float(
    "min_fraction", 0.1, "... and in at least this fraction of the animals (0–1); the larger wins."
)
flags.DEFINE_bool("scale", True, "Fit an isotropic size per animal (atlas = median animal size).")
flags.DEFINE_bool(
    "allow_reflection",
    True,
    "Allow mirror-image animals (the atlas keeps the majority handedness).",
)
flags.DEFINE_bool("robust", True, "Down-weight outlying (likely mislabelled) neurons (Tukey).")
flags.DEFINE_bool("skip_uncertain", True, "Leave out names marked uncertain ('?').")

_SETTINGS = ("min_animals", "min_fraction", "scale", "allow_reflection", "robust", "skip_uncertain")


def _command() -> str:
    """The build command as recorded in the atlas: data paths by their last component only, so the
    record (and the file's bytes) do not depend on where the data lives."""
    data = ",".join(Path(p.strip()).name for p in FLAGS.data.split(",") if p.strip())
    parts = [f"--data={data}", f"--out={Path(FLAGS.out).name}"]
    parts += [f"--{k}={FLAGS[k].value}" for k in _SETTINGS if FLAGS[k].present]
    return "fdnc-atlas build " + " ".join(parts)


def _build() -> int:
    from fdnc_jax.atlas import AtlasConfig, build_atlas
    from fdnc_jax.datasets import resolve_worm_files
    from fdnc_jax.io import load_worm

    if not FLAGS.data or not FLAGS.out:
        raise ValueError("build needs --data (labelled worm files) and --out (the atlas .npz)")
    paths = resolve_worm_files(FLAGS.data)
    worms = [load_worm(p) for p in paths]
    config = AtlasConfig(**{k: FLAGS[k].value for k in _SETTINGS})
    ids = [p.stem for p in paths]
    if len(set(ids)) < len(ids):  # Same file name in two folders: the ids say which.
        ids = [str(p) for p in paths]
    atlas = build_atlas(worms, config, ids=ids, command=_command())
    atlas.save(FLAGS.out)
    _describe(atlas)
    print(f"wrote {FLAGS.out}")
    return 0


def _describe(atlas) -> None:
    animals = atlas.meta.get("animals", [])
    n_reflected = sum(a["reflected"] for a in animals)
    print(
        f"atlas: {atlas.n} names from {len(animals)} animals ({n_reflected} mirrored onto the "
        f"majority handedness); color: {'yes' if atlas.color is not None else 'no'}"
    )
    span = atlas.xyz_um.max(axis=0) - atlas.xyz_um.min(axis=0)
    print(f"extent (µm, principal axes): {span[0]:.1f} × {span[1]:.1f} × {span[2]:.1f}")
    spread = (atlas.cov_um2.trace(axis1=1, axis2=2)) ** 0.5
    print(
        f"positional spread per name (µm, rms over animals): median {float(np.median(spread)):.1f}, "
        f"animals per name: median {int(np.median(atlas.n_animals))}"
    )
    if atlas.meta.get("command"):
        print(f"built by: {atlas.meta['command']}")


def _info() -> int:
    from fdnc_jax.atlas import Atlas, bundled_atlas_path

    path = FLAGS.atlas or bundled_atlas_path()
    _describe(Atlas.load(path))
    return 0


def main(argv):
    commands = {"build": _build, "info": _info}
    if len(argv) != 2 or argv[1] not in commands:
        print("fdnc-atlas: error: give one command: build or info (see --help)", file=sys.stderr)
        return 2
    try:
        return commands[argv[1]]()
    except (ValueError, TypeError, OSError) as e:
        print(f"fdnc-atlas: error: {e}", file=sys.stderr)
        return 2


def run():
    run_main(main, __name__)


if __name__ == "__main__":
    run()
