"""Worm validation and model-unit conversion."""

import numpy as np
import pytest

from fdnc_jax.worm import (
    UM_PER_PX,
    Worm,
    from_model_units,
    to_model_units,
    to_model_units_padded,
)


def _cloud(rng, n=40, extent=100.0):
    return rng.uniform(0, extent, (n, 3)).astype(np.float32)


def test_model_units_match_reference(np_rng):
    xyz = _cloud(np_rng)
    w = Worm(xyz_um=xyz)
    units, center = to_model_units(w)
    px = xyz.astype(np.float64) / 0.42
    np.testing.assert_allclose(units, (px - np.median(px, 0)) / 200.0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(center, np.median(px, 0), rtol=1e-6)
    np.testing.assert_allclose(from_model_units(units, center), xyz, rtol=1e-5, atol=1e-4)


def test_mirrored_negates_x_and_z_and_round_trips(np_rng):
    xyz = _cloud(np_rng)
    plain, _ = to_model_units(Worm(xyz_um=xyz))
    mirrored, center = to_model_units(Worm(xyz_um=xyz, mirrored=True))
    np.testing.assert_allclose(mirrored, plain * np.array([-1, 1, -1]), atol=1e-7)
    np.testing.assert_allclose(from_model_units(mirrored, center, True), xyz, atol=1e-4)


def _np_median_units(worm):
    """The conversion written with np.median, independent of fdnc_jax.worm's implementation."""
    px = worm.xyz_um.astype(np.float64) / 0.42
    xyz = (px - np.median(px, axis=0)) / 200.0
    return (xyz * ([-1.0, 1.0, -1.0] if worm.mirrored else 1.0)).astype(np.float32)


@pytest.mark.filterwarnings("ignore:xyz_um has .* duplicated")
def test_padded_model_units_equal_one_worm_at_a_time(np_rng):
    # Odd and even sizes (median of one vs two middle points), a worm filling the whole size,
    # mirrored worms and ties: exactly np.median's numbers, one worm at a time or padded, zeros
    # past each worm.
    sizes = [3, 4, 7, 40, 63, 64]
    worms = [Worm(xyz_um=_cloud(np_rng, n), mirrored=bool(i % 2)) for i, n in enumerate(sizes)]
    worms.append(Worm(xyz_um=4.0 * np.round(_cloud(np_rng, 20, extent=3.0))))  # many ties
    xyz, mask = to_model_units_padded(worms, 64)
    assert xyz.shape == (7, 64, 3) and xyz.dtype == np.float32
    for j, w in enumerate(worms):
        np.testing.assert_array_equal(xyz[j, : w.n], _np_median_units(w))
        np.testing.assert_array_equal(to_model_units(w)[0], _np_median_units(w))
        assert not xyz[j, w.n :].any() and mask[j].sum() == w.n and mask[j, : w.n].all()
    with pytest.raises(ValueError, match="does not fit size=32"):
        to_model_units_padded(worms, 32)


def test_from_pixels_scales_per_axis(np_rng):
    px = _cloud(np_rng, extent=200)
    w = Worm.from_pixels(px, [0.5, 0.5, 1.5])
    np.testing.assert_allclose(w.xyz_um, px * np.array([0.5, 0.5, 1.5]), rtol=1e-6)
    assert UM_PER_PX == 0.42


def test_worm_is_frozen_and_arrays_read_only(np_rng):
    w = Worm(xyz_um=_cloud(np_rng))
    with pytest.raises(AttributeError):
        w.mirrored = True
    with pytest.raises(ValueError):
        w.xyz_um[0, 0] = 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"xyz_um": np.full((10, 3), np.nan)}, "non-finite"),
        ({"xyz_um": np.zeros((10, 2))}, r"shape \[N, 3\]"),
        ({"xyz_um": np.zeros((3, 10, 3))}, r"shape \[N, 3\]"),
        ({"xyz_um": [[0, 0, 0], [10, 10, 10]]}, "at least 3"),
        ({"xyz_um": np.zeros((0, 3))}, "at least 3"),
        ({"names": ["a", "b"]}, "names has 2 entries"),
        ({"color": np.ones((2, 3))}, "color has 2 rows"),
        ({"color": np.full((40, 3), np.inf)}, "color contains non-finite"),
        ({"xyz_um": np.random.default_rng(1).uniform(0, 5000, (40, 3))}, "pixels"),
        ({"xyz_um": np.random.default_rng(1).uniform(0, 1.2, (40, 3))}, "implausible"),
        ({"mirrored": "yes"}, "mirrored must be a bool"),
    ],
)
def test_bad_input_is_named(np_rng, kwargs, match):
    args = {"xyz_um": _cloud(np_rng)} | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        Worm(**args)


def test_names_wrong_type():
    with pytest.raises(TypeError, match="names must be a sequence"):
        Worm(xyz_um=np.random.default_rng(0).uniform(0, 50, (5, 3)), names="AVAL")


def test_duplicated_points_warn(np_rng):
    xyz = _cloud(np_rng)
    xyz[1] = xyz[0]
    with pytest.warns(UserWarning, match="duplicated identical points"):
        Worm(xyz_um=xyz)


def test_template_duplicate_names(np_rng):
    names = ["AVAL", "AVAR", "AVAL"] + [""] * 37
    w = Worm(xyz_um=_cloud(np_rng), names=names)
    with pytest.raises(ValueError, match="duplicated.*AVAL"):
        w.check_template()
    Worm(xyz_um=_cloud(np_rng), names=["", ""] + [f"N{i}" for i in range(38)]).check_template()


def test_color_for_matching(np_rng):
    xyz = _cloud(np_rng)
    color = np_rng.uniform(1, 2, (40, 4))
    out = Worm(xyz_um=xyz, color=color).color_for_matching("template")
    np.testing.assert_allclose(out, color.astype(np.float32))
    color[3] = [-0.1, 1, 1, 1]
    with pytest.warns(UserWarning, match="negative values clipped"):
        out = Worm(xyz_um=xyz, color=color).color_for_matching("test")
    assert out.min() >= 0
    with pytest.raises(ValueError, match="test color has negative values in"):
        Worm(xyz_um=xyz, color=-color).color_for_matching("test")
    with pytest.raises(ValueError, match="no color signal"):
        Worm(xyz_um=xyz, color=np.zeros((40, 3))).color_for_matching("test")
    with pytest.raises(ValueError, match="needs ≥ 3"):
        Worm(xyz_um=xyz, color=np.ones((40, 2))).color_for_matching("test")
    with pytest.raises(ValueError, match="template has no color"):
        Worm(xyz_um=xyz).color_for_matching("template")


def test_subset_keeps_fields(np_rng):
    w = Worm(xyz_um=_cloud(np_rng), names=[f"N{i}" for i in range(40)], color=np.ones((40, 3)))
    s = w.subset([0, 2, 4])
    assert s.n == 3 and list(s.names) == ["N0", "N2", "N4"] and s.color.shape == (3, 3)


def test_subset_slices_uncertain_flags(np_rng):
    flags = [i % 3 == 0 for i in range(40)]
    w = Worm(xyz_um=_cloud(np_rng), names=[f"N{i}" for i in range(40)], meta={"uncertain": flags})
    s = w.subset([0, 1, 3])
    assert s.meta["uncertain"] == [True, False, True]
