"""File formats: npz, CSV, the original fDNC pickle."""

import pickle

import numpy as np
import pytest

from fdnc_jax.io import WormFileError, load_fdnc_pickle, load_worm, save_worm
from fdnc_jax.worm import Worm


@pytest.fixture
def worm(np_rng):
    n = 30
    return Worm(
        xyz_um=np_rng.uniform(0, 120, (n, 3)),
        names=[f"N{i}" if i % 3 else "" for i in range(n)],
        color=np_rng.uniform(0, 1000, (n, 4)),
        meta={"lab": "test"},
    )


@pytest.mark.parametrize("suffix", [".npz", ".csv"])
def test_round_trip_exact(tmp_path, worm, suffix):
    path = tmp_path / f"w{suffix}"
    save_worm(worm, path)
    back = load_worm(path)
    np.testing.assert_array_equal(back.xyz_um, worm.xyz_um)
    np.testing.assert_array_equal(back.names, worm.names)
    np.testing.assert_array_equal(back.color, worm.color)
    assert back.mirrored == worm.mirrored


def test_npz_keeps_meta_and_mirrored(tmp_path, worm):
    path = tmp_path / "w.npz"
    save_worm(worm.replace(mirrored=True), path)
    back = load_worm(path)
    assert back.mirrored and back.meta["lab"] == "test"


def test_csv_generic_channels_and_no_color(tmp_path, np_rng):
    w = Worm(xyz_um=np_rng.uniform(0, 80, (10, 3)), color=np_rng.uniform(1, 2, (10, 6)))
    save_worm(w, tmp_path / "c.csv")
    assert "c5" in (tmp_path / "c.csv").read_text().splitlines()[0]
    np.testing.assert_array_equal(load_worm(tmp_path / "c.csv").color, w.color)
    (tmp_path / "p.csv").write_text("x,y,z\n0,0,0\n50,10,5\n100,0,10\n")
    p = load_worm(tmp_path / "p.csv")
    assert p.color is None and list(p.names) == ["", "", ""]


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty file"),
        ("a,b,c\n1,2,3\n", "lacks column"),
        ("x,y,z\n", "no data rows"),
        ("x,y,z\n1,2,3\n4,5\n", "line 3: 2 fields"),
        ("x,y,z,name\n1,2,3,A\n4,five,6,B\n", "line 3: not a number"),
        ("x,y,z\n1,2,3\nnan,5,6\n7,8,9\n", "line 3: non-finite"),
        ("x,y,z\n1,2,3\n4000,5,6\n7,8,9\n", "pixels"),
        ("x,y,z,r,w\n1,2,3,1,1\n", "r, g and b"),
    ],
)
def test_bad_csv_names_file_and_line(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(WormFileError, match=match) as e:
        load_worm(path)
    assert "bad.csv" in str(e.value)


def test_bad_files(tmp_path, worm):
    with pytest.raises(WormFileError, match="no such file"):
        load_worm(tmp_path / "missing.npz")
    (tmp_path / "trunc.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(WormFileError, match="not a readable npz"):
        load_worm(tmp_path / "trunc.npz")
    np.savez(tmp_path / "nokey.npz", pts=np.zeros((5, 3)))
    with pytest.raises(WormFileError, match="missing array 'xyz_um'"):
        load_worm(tmp_path / "nokey.npz")
    np.savez(tmp_path / "obj.npz", xyz_um=np.array([object()] * 3, dtype=object))
    with pytest.raises(WormFileError, match="obj.npz"):
        load_worm(tmp_path / "obj.npz")
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(WormFileError, match="unknown worm file suffix"):
        load_worm(tmp_path / "x.txt")
    with pytest.raises(WormFileError, match="is a directory"):
        load_worm(tmp_path)
    with pytest.raises(WormFileError, match="load_fdnc_pickle"):
        (tmp_path / "p.data").write_bytes(b"x")
        load_worm(tmp_path / "p.data")


def test_save_is_atomic_and_leaves_no_temp(tmp_path, worm):
    save_worm(worm, tmp_path / "w.npz")
    save_worm(worm, tmp_path / "w.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]
    assert (tmp_path / "w.npz").stat().st_mode & 0o044  # readable by others, not 0600
    with pytest.raises(TypeError, match="worm must be a Worm"):
        save_worm(np.zeros((3, 3)), tmp_path / "z.npz")


def test_pickle_needs_trust(tmp_path, np_rng):
    d = {
        "pts": np_rng.uniform(0, 100, (6, 3)),
        "name": ["A", "", "B", "C", "", "D"],
        "fluo": np_rng.uniform(1, 2, (6, 4)),
        "mask_keep": np.array([0, 2, 3, 5]),
        "side": 0,
    }
    path = tmp_path / "w.data"
    path.write_bytes(pickle.dumps(d))
    with pytest.raises(WormFileError, match="arbitrary code"):
        load_fdnc_pickle(path)
    w = load_fdnc_pickle(path, trust=True)
    assert w.n == 4 and list(w.names) == ["A", "B", "C", "D"] and w.mirrored
    np.testing.assert_allclose(w.xyz_um, d["pts"][[0, 2, 3, 5]].astype(np.float32))
    (tmp_path / "trunc.data").write_bytes(pickle.dumps(d)[:40])
    with pytest.raises(WormFileError, match="not a readable fDNC pickle"):
        load_fdnc_pickle(tmp_path / "trunc.data", trust=True)


def test_original_example_pair(shared_data):
    ex = shared_data / "data" / "fdnc_example"
    tmpl = load_fdnc_pickle(ex / "template.data", trust=True)
    test = load_fdnc_pickle(ex / "test.data", trust=True)
    assert (tmpl.n, test.n) == (127, 143)
    shared = (set(tmpl.names) - {""}) & (set(test.names) - {""})
    assert len(shared) == 48
    npz = load_worm(ex / "template.npz")
    keep = np.load(ex / "template.npz")["mask_keep"]
    np.testing.assert_allclose(npz.xyz_um[keep], tmpl.xyz_um, atol=1e-4)


def test_all_shared_worms_load(shared_data):
    files = sorted((shared_data / "data" / "wormnd").glob("*.npz"))
    assert len(files) == 90
    for f in files:
        w = load_worm(f)
        assert w.n >= 3 and w.color is not None and w.meta["lab"] in {"EY", "NP", "SF", "SK1"}
