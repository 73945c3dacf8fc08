"""Atlas: Procrustes, generalized Procrustes mean shape, robustness, reproducibility, bad input."""

import subprocess
import sys
import warnings

import numpy as np
import pytest

import fdnc_jax as fd
from fdnc_jax.atlas import Atlas, AtlasConfig, build_atlas, procrustes
from fdnc_jax.datasets import load_bundled_worm
from fdnc_jax.io import load_worm
from fdnc_jax.worm import Worm


def _rotation(rng, proper=True) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) > 0) != proper:
        q[:, 2] = -q[:, 2]
    return q


@pytest.fixture(scope="module")
def base() -> Worm:
    """A real, fully annotated NeuroPAL head (bundled), color included."""
    return load_bundled_worm("NP_11_YAaLR")


def _moved(worm: Worm, rng, *, scale=1.0, mirror=False, noise=0.0, **changes) -> Worm:
    rot = _rotation(rng, proper=not mirror)
    xyz = scale * worm.xyz_um.astype(np.float64) @ rot.T + rng.uniform(-300, 300, 3)
    xyz = xyz + rng.normal(scale=noise, size=xyz.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return worm.replace(xyz_um=xyz.astype(np.float32), **changes)


def _rms_after_fit(a: np.ndarray, b: np.ndarray, **kwargs) -> float:
    t = procrustes(a, b, **kwargs)
    return float(np.sqrt(np.mean(np.sum((t.apply(a) - b) ** 2, axis=1))))


# ----------------------------------------------------------------------------------------------
# Procrustes.


@pytest.mark.parametrize("proper", [True, False])
def test_procrustes_recovers_known_similarity(np_rng, proper):
    x = np_rng.normal(scale=20.0, size=(40, 3))
    rot, s, t = _rotation(np_rng, proper), 1.7, np.array([5.0, -3.0, 12.0])
    y = s * x @ rot.T + t
    fit = procrustes(x, y, allow_reflection=not proper)
    np.testing.assert_allclose(fit.rotation, rot, atol=1e-10)
    assert fit.scale == pytest.approx(s, abs=1e-10)
    np.testing.assert_allclose(fit.translation, t, atol=1e-9)
    assert fit.reflected == (not proper)


def test_procrustes_without_reflection_stays_proper_and_weights_select(np_rng):
    x = np_rng.normal(scale=20.0, size=(30, 3))
    mirrored = x * np.array([1.0, 1.0, -1.0])
    assert not procrustes(x, mirrored).reflected
    assert procrustes(x, mirrored, allow_reflection=True).reflected
    # Zero weights ignore garbage points entirely.
    y = x + np.array([1.0, 2.0, 3.0])
    y[:5] += 100.0
    w = np.r_[np.zeros(5), np.ones(25)]
    fit = procrustes(x, y, w, scale=False)
    np.testing.assert_allclose(fit.apply(x[5:]), y[5:], atol=1e-9)
    with pytest.raises(ValueError, match="source and target"):
        procrustes(x, y[:, :2])
    with pytest.raises(ValueError, match="non-zero weight"):
        procrustes(x, y, np.r_[np.ones(2), np.zeros(28)])


# ----------------------------------------------------------------------------------------------
# Generalized Procrustes atlas.


def test_atlas_of_rigid_copies_is_the_worm(base, np_rng):
    copies = [_moved(base, np_rng) for _ in range(6)]
    atlas = build_atlas(copies)
    labelled = base.subset(base.labelled)
    order = np.argsort(labelled.names)
    truth = labelled.xyz_um[order].astype(np.float64)
    np.testing.assert_array_equal(atlas.names, labelled.names[order])
    assert _rms_after_fit(atlas.xyz_um, truth, scale=False) < 1e-3
    # Size kept (median animal scale = 1): pairwise distances equal.
    d_atlas = np.linalg.norm(atlas.xyz_um[:, None] - atlas.xyz_um[None], axis=-1)
    d_true = np.linalg.norm(truth[:, None] - truth[None], axis=-1)
    np.testing.assert_allclose(d_atlas, d_true, atol=2e-3)
    assert np.max(atlas.cov_um2) < 1e-5
    np.testing.assert_array_equal(atlas.n_animals, 6)
    # Principal frame: centred, longest axis x.
    np.testing.assert_allclose(atlas.xyz_um.mean(axis=0), 0.0, atol=1e-6)
    var = atlas.xyz_um.var(axis=0)
    assert var[0] > var[1] > var[2]
    # Color: mean normalised color of identical animals = the animal's normalised color.
    expect = fd.matching.normalize_color(np.maximum(labelled.color, 0))[order]
    np.testing.assert_allclose(atlas.color, expect, atol=3e-5)  # after the 1e-5 floor


def test_scaled_copies_take_the_median_size(base, np_rng):
    copies = [_moved(base, np_rng, scale=s) for s in (0.9, 1.0, 1.1, 1.2, 1.3)]
    atlas = build_atlas(copies)
    labelled = base.subset(base.labelled)
    truth = labelled.xyz_um[np.argsort(labelled.names)].astype(np.float64)
    fit = procrustes(truth, atlas.xyz_um)
    assert fit.scale == pytest.approx(1.1, rel=1e-4)
    assert [a["scale"] for a in atlas.meta["animals"]] == pytest.approx(
        [1.1 / s for s in (0.9, 1.0, 1.1, 1.2, 1.3)], rel=1e-3
    )


def test_reflection_is_undone_and_majority_handedness_kept(base, np_rng):
    mirror = [False, True, False, True, False]
    copies = [_moved(base, np_rng, mirror=m) for m in mirror]
    atlas = build_atlas(copies)
    assert [a["reflected"] for a in atlas.meta["animals"]] == mirror
    labelled = base.subset(base.labelled)
    truth = labelled.xyz_um[np.argsort(labelled.names)].astype(np.float64)
    assert _rms_after_fit(truth, atlas.xyz_um, scale=False) < 1e-3  # Proper: majority unmirrored.
    # Majority mirrored → the atlas is the mirror image.
    flipped = build_atlas([_moved(base, np_rng, mirror=not m) for m in mirror])
    assert _rms_after_fit(truth, flipped.xyz_um, scale=False) > 1.0
    assert _rms_after_fit(truth, flipped.xyz_um, scale=False, allow_reflection=True) < 1e-3
    # Without reflection handling, mirrored animals cannot be fitted.
    proper = build_atlas(copies, AtlasConfig(allow_reflection=False))
    rms = np.array([a["rms_um"] for a in proper.meta["animals"]])
    assert np.all(rms[mirror] > 5.0) and np.all(rms[~np.array(mirror)] < 1e-3)


def _swap_names(worm: Worm, rng, pairs: int) -> tuple[Worm, list[str]]:
    """Swaps the names of ``pairs`` neighbouring neuron pairs 8–15 µm apart."""
    names = worm.names.copy()
    d = np.linalg.norm(worm.xyz_um[:, None] - worm.xyz_um[None], axis=-1)
    swapped: list[str] = []
    for i in rng.permutation(worm.n):
        if len(swapped) >= 2 * pairs or names[i] in swapped or not names[i]:
            continue
        cand = [j for j in np.flatnonzero((d[i] > 8) & (d[i] < 15)) if names[j] not in swapped]
        if cand and names[cand[0]]:
            j = cand[0]
            swapped += [names[i], names[j]]
            names[i], names[j] = names[j], names[i]
    return worm.replace(names=names), swapped


def test_a_few_swapped_labels_barely_move_the_mean(base, np_rng):
    clean = [_moved(base, np_rng, noise=1.0) for _ in range(10)]
    ref = build_atlas(clean)
    dirty = list(clean)
    swapped: list[str] = []
    for i in (2, 7):
        dirty[i], s = _swap_names(clean[i], np_rng, pairs=4)
        swapped += s
    assert len(swapped) == 16
    robust = build_atlas(dirty)
    plain = build_atlas(dirty, AtlasConfig(robust=False))
    k = np.isin(ref.names, swapped)

    def shift(a):  # Frames agree up to a rigid motion: compare after fitting on all names.
        fitted = procrustes(a.xyz_um, ref.xyz_um, scale=False).apply(a.xyz_um)
        return np.linalg.norm(fitted - ref.xyz_um, axis=1)

    # 2 of 10 animals with names swapped 8–15 µm apart: a plain mean moves ~1–1.5 µm; the robust
    # one stays within the noise of leaving those observations out (1 µm noise / 10 animals).
    assert np.max(shift(robust)[k]) < 0.6
    assert np.max(shift(plain)[k]) > 2 * np.max(shift(robust)[k])
    assert np.mean(shift(plain)[k]) > 3 * np.mean(shift(robust)[k])


def test_rare_names_dropped_and_unusable_names_ignored(base, np_rng):
    copies = [_moved(base, np_rng) for _ in range(5)]
    named = np.flatnonzero(base.labelled)
    # A name present in only 2 animals is dropped (min_animals 3); duplicates are ignored.
    rare = copies[0].names.copy()
    rare[named[0]] = "RARE1"
    dup = copies[1].names.copy()
    dup[named[1]] = dup[named[2]]
    copies[0] = copies[0].replace(names=rare)
    copies[1] = copies[1].replace(names=dup)
    atlas = build_atlas(copies)
    assert "RARE1" not in atlas.names
    counts = dict(zip(atlas.names, atlas.n_animals, strict=True))
    assert counts[base.names[named[2]]] == 4  # the duplicated name is not used in animal 1
    assert counts[base.names[named[1]]] == 4
    strict = build_atlas(copies, AtlasConfig(min_fraction=1.0))
    assert base.names[named[1]] not in strict.names


def test_build_is_deterministic_byte_for_byte(base, np_rng, tmp_path):
    copies = [_moved(base, np_rng, noise=1.0) for _ in range(4)]
    build_atlas(copies).save(tmp_path / "a.npz")
    build_atlas(copies).save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    again = Atlas.load(tmp_path / "a.npz")
    assert again.n == build_atlas(copies).n
    template = load_worm(tmp_path / "a.npz")  # An atlas file is a worm file.
    assert template.labelled.all() and template.has_color


# ----------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input(base, np_rng):
    copies = [_moved(base, np_rng) for _ in range(4)]
    with pytest.raises(ValueError, match="at least 3"):
        build_atlas(copies[:2])
    with pytest.raises(TypeError, match="sequence of Worms"):
        build_atlas(copies[0])
    with pytest.raises(TypeError, match=r"worms\[1\]"):
        build_atlas([copies[0], base.xyz_um, copies[1]])
    nameless = copies[:3] + [copies[3].replace(names=np.full(base.n, ""))]
    with pytest.raises(ValueError, match="no usable neuron names"):
        build_atlas(nameless, ids=["a", "b", "c", "d"])
    pixels = copies[:3] + [Worm.from_pixels(copies[3].xyz_um / 0.42, 1.0, names=copies[3].names)]
    with pytest.raises(ValueError, match=r"'d'.*pixels"):
        build_atlas(pixels, ids=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="unique"):
        build_atlas(copies, ids=["a", "a", "b", "c"])
    few = copies[:3] + [copies[3].subset(np.flatnonzero(base.labelled)[:6])]
    with pytest.raises(ValueError, match="shares only 6 names"):
        build_atlas(few, AtlasConfig(min_animals=1, min_fraction=0.0), ids=list("abcd"))


# ----------------------------------------------------------------------------------------------
# The bundled atlas.


def test_bundled_atlas_is_a_template(base):
    atlas = fd.load_atlas()
    atlas.check_template()
    assert atlas.n >= 150 and atlas.labelled.all() and atlas.has_color
    full = Atlas.load(fd.atlas.bundled_atlas_path())
    assert len(full.meta["animals"]) >= 50
    assert full.meta["command"].startswith("fdnc-atlas build")
    pred = fd.predict(fd.load_pretrained(), atlas, base, top_k=3)
    assert pred.labels.shape == (base.n,)


def test_bundled_atlas_rebuilds_byte_for_byte(shared_data, tmp_path):
    out = tmp_path / "atlas_head.npz"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fdnc_jax.cli.atlas",
            "build",
            f"--data={shared_data / 'data' / 'wormnd'}",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert out.read_bytes() == fd.atlas.bundled_atlas_path().read_bytes()


# ----------------------------------------------------------------------------------------------
# Handedness.


def test_anatomical_handedness_and_mirror_image(np_rng):
    from fdnc_jax.atlas import anatomical_handedness, mirror_image

    for name, expect in (("NP_11_YAaLR", -1), ("EY_20190924_03", -1), ("SF_2023-01-09-15", 1)):
        w = load_bundled_worm(name)
        assert anatomical_handedness(w) == expect, name
        assert anatomical_handedness(mirror_image(w)) == -expect
        assert (
            anatomical_handedness(_moved(w, np_rng, scale=1.3)) == expect
        )  # proper motions keep it
        assert anatomical_handedness(_moved(w, np_rng, mirror=True)) == -expect
    assert anatomical_handedness(Worm(xyz_um=np_rng.uniform(0, 50, (20, 3)))) == 0  # no names
    # The bundled atlas keeps the majority (EY/NP) convention.
    assert anatomical_handedness(fd.load_atlas()) == -1


def test_openworm_positions_are_anatomically_handed(shared_data):
    """OpenWorm's canonical soma positions (a model of the real animal) read as +1."""
    from fdnc_jax.atlas import anatomical_handedness

    with np.load(shared_data / "data" / "c302" / "openworm_canonical_head.npz") as d:
        worm = Worm(xyz_um=d["xyz_um"], names=d["names"])
    assert anatomical_handedness(worm) == 1


def test_dark_color_unnamed_worm_and_corrupt_atlas_file(base, np_rng, tmp_path):
    from fdnc_jax.atlas import unify_handedness
    from fdnc_jax.io import WormFileError

    copies = [_moved(base, np_rng) for _ in range(4)]
    # A worm whose color carries no signal still gives its positions.
    dark = copies[:3] + [copies[3].replace(color=np.zeros_like(base.color))]
    with pytest.warns(UserWarning, match="its color is not"):
        atlas = build_atlas(dark)
    assert atlas.color is not None and np.all(atlas.n_animals == 4)
    # Unlabelled worms are left as they are by unify_handedness.
    unnamed = copies[0].replace(names=np.full(base.n, ""))
    out, flipped = unify_handedness([unnamed, *copies[1:], _moved(base, np_rng, mirror=True)])
    assert flipped.tolist() == [False, False, False, False, True] and out[0] is unnamed
    # A corrupt atlas file is a clear error naming the file.
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(WormFileError, match="bad.npz"):
        Atlas.load(bad)
