"""Our Flax model computes the original PyTorch architecture's function (when torch is installed).

torch is a benchmark-only extra (``pip install -e .[bench]``); without it this module is skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from torch_reference import canonical_pose, from_fdnc  # noqa: E402

from fdnc_jax.model.fdnc import Model, ModelConfig  # noqa: E402
from fdnc_jax.pose import canonical_pose as canonical_pose_jax  # noqa: E402


@pytest.mark.parametrize("canonical", [False, True])
def test_flax_model_equals_torch_original_with_same_weights(canonical):
    cfg = ModelConfig(
        width=32, layers=2, heads=4, ff_width=64, dropout=0.0, canonical_pose=canonical
    )
    model = Model.create(cfg, seed=3)
    net = from_fdnc(model)
    rng = np.random.default_rng(0)
    t = (rng.normal(size=(1, 30, 3)) * [0.5, 0.2, 0.1]).astype(np.float32)
    s = (rng.normal(size=(1, 25, 3)) * [0.5, 0.2, 0.1]).astype(np.float32)
    t_mask, s_mask = np.ones((1, 30), bool), np.ones((1, 25), bool)
    ours = np.asarray(model.module()(t, t_mask, s, s_mask))
    tt, ss = torch.from_numpy(t), torch.from_numpy(s)
    if canonical:
        tt, ss = canonical_pose(tt), canonical_pose(ss)
        np.testing.assert_allclose(
            tt[0].numpy(), np.asarray(canonical_pose_jax(t[0], t_mask[0])), atol=1e-5
        )
    with torch.inference_mode():
        theirs = net(tt, torch.from_numpy(t_mask), ss, torch.from_numpy(s_mask)).numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4)
