"""Tests for fdnc_jax.plots."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest
from matplotlib.figure import Figure

from fdnc_jax import plots
from fdnc_jax.sim import pairs
from fdnc_jax.sim.config import SimConfig
from fdnc_jax.worm import Worm


def _source():
    r = np.random.default_rng(0)
    xyz = np.stack([r.uniform(0, 120, 40), r.normal(40, 7, 40), r.normal(15, 5, 40)], 1)
    return pairs.make_source_bank([Worm(xyz_um=xyz)])


def test_plot_simulated_copies_writes_a_figure(tmp_path):
    bank = _source()
    x, m = bank.xyz[0], bank.mask[0]
    copies = [pairs.synthesize(jax.random.key(i), x, m, None, SimConfig()) for i in range(2)]
    path = tmp_path / "copies.png"
    fig = plots.plot_simulated_copies(x, copies, path, source_mask=m, titles=["a", "b"])
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2 * 3
    assert path.stat().st_size > 1000
    assert fig.axes[1].get_title().startswith("a")
    # Outliers are drawn as their own collection where present.
    n_out = sum(int((np.asarray(c[2]) == -2).sum()) for c in copies)
    labels = [h.get_label() for ax in fig.axes for h in ax.collections]
    assert any(lab.startswith("outliers") for lab in labels) == (n_out > 0)


def test_plot_simulated_copies_rejects_bad_shapes():
    with pytest.raises(ValueError, match="source_xyz"):
        plots.plot_simulated_copies(np.zeros((4, 2)), [])
    with pytest.raises(ValueError, match="copies"):
        plots.plot_simulated_copies(np.zeros((4, 3)), [(np.zeros((4, 3)), np.ones(4, bool))])


def test_importing_plots_selects_no_backend():
    code = "import sys, fdnc_jax.plots; print('matplotlib.pyplot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_plot_atlas_three_projections(tmp_path):
    from fdnc_jax import plots
    from fdnc_jax.atlas import Atlas, bundled_atlas_path

    fig = plots.plot_atlas(path=tmp_path / "atlas.png")
    assert len(fig.axes) == 3 and (tmp_path / "atlas.png").stat().st_size > 10_000
    atlas = Atlas.load(bundled_atlas_path())
    ax = fig.axes[0]
    assert len(ax.lines) == atlas.n  # one covariance ellipse per name
    assert len(ax.texts) == atlas.n
    # The ellipse of a name spans its positional standard deviation along x.
    e = plots._ellipse_path(np.zeros(2), np.diag([4.0, 1.0]), 1.0)
    np.testing.assert_allclose(np.ptp(e, axis=0), [4.0, 2.0], atol=0.02)
    with pytest.raises(TypeError, match="atlas must be"):
        plots.plot_atlas(42)
