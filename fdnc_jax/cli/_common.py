"""Shared CLI plumbing: make ``--help`` of a console script list its own flags."""

from __future__ import annotations

import sys

from absl import app, flags


def run_main(main, module_name: str) -> None:
    """``app.run(main)`` with the flags defined in ``module_name`` listed by ``--help``.

    absl lists the flags of the program's main module; a console-script wrapper is not that module,
    so its flags are registered as key flags of the running program too.
    """
    fv = flags.FLAGS
    for flag in fv.get_flags_for_module(module_name):
        fv.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)
