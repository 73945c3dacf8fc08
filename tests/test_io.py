"""File formats: npz, CSV, the original fDNC pickle."""

import pickle

import numpy as np
import pytest

from fdnc_jax.io import (
    WormFileError,
    load_fdnc_pickle,
    load_recording,
    load_worm,
    save_recording,
    save_worm,
)
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


def test_csv_refuses_a_mirrored_worm_and_leaves_the_file(tmp_path, worm):
    path = tmp_path / "w.csv"
    save_worm(worm, path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="mirrored and CSV has no mirrored flag: save as .npz"):
        save_worm(worm.replace(mirrored=True), path)
    assert path.read_bytes() == before


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


@pytest.fixture
def volumes(worm, np_rng):
    """Three volumes of one animal: the worm's neurons, some dropped, moved a little; the middle
    one with a neuron flagged uncertain."""
    out = []
    for k, drop in enumerate((0, 3, 5)):
        w = worm.subset(np.sort(np_rng.permutation(worm.n)[: worm.n - drop]))
        w = w.replace(xyz_um=w.xyz_um + np_rng.normal(0, 0.5, (w.n, 3)))
        if k == 1:
            w = w.replace(meta={**w.meta, "uncertain": [True] + [False] * (w.n - 1)})
        out.append(w)
    return out


@pytest.mark.parametrize("suffix", [".csv", ".npz"])
def test_recording_round_trip(tmp_path, volumes, suffix):
    """save_recording → load_recording gives every volume back (positions, names, color, the
    uncertain flags), by volume number, whatever the order of the rows."""
    path = tmp_path / f"rec{suffix}"
    save_recording(volumes, path, numbers=[12, 3, 7])
    back = load_recording(path)
    assert [w.meta["volume"] for w in back] == [3, 7, 12]
    for w, want in zip(back, [volumes[1], volumes[2], volumes[0]], strict=True):
        np.testing.assert_array_equal(w.xyz_um, want.xyz_um)
        np.testing.assert_array_equal(w.names, want.names)
        np.testing.assert_array_equal(w.color, want.color)
        assert w.meta.get("uncertain", [False] * w.n) == want.meta.get("uncertain", [False] * w.n)
    if suffix == ".csv":  # Rows of the volumes interleaved: each volume keeps its rows' order.
        lines = path.read_text().splitlines()
        rows = lines[1:]
        order = np.random.default_rng(0).permutation(len(rows))
        path.write_text("\n".join([lines[0], *(rows[i] for i in order)]) + "\n")
        again = load_recording(path)
        v3 = np.array([i for i in order if rows[i].endswith(",3")])  # volume 3's file rows
        np.testing.assert_array_equal(again[0].xyz_um, volumes[1].xyz_um[v3 - v3.min()])


def test_recording_keeps_side_and_default_numbers(tmp_path, volumes):
    mirrored = [v.replace(mirrored=True, meta={}) for v in volumes]
    save_recording(mirrored, tmp_path / "m.npz")
    back = load_recording(tmp_path / "m.npz")
    assert [w.meta["volume"] for w in back] == [0, 1, 2] and all(w.mirrored for w in back)
    save_recording(back, tmp_path / "again.npz")  # numbers from meta["volume"]
    assert [w.meta["volume"] for w in load_recording(tmp_path / "again.npz")] == [0, 1, 2]
    with pytest.raises(ValueError, match="CSV has no mirrored flag"):
        save_recording(back, tmp_path / "again.csv")


def test_a_recording_is_not_read_as_one_worm(tmp_path, volumes, worm):
    """load_worm refuses a file with a volume column (it would mix every volume into one worm);
    load_recording refuses a single worm."""
    for suffix in (".csv", ".npz"):
        save_recording(volumes, tmp_path / f"rec{suffix}")
        with pytest.raises(WormFileError, match="3 volumes.*load_recording"):
            load_worm(tmp_path / f"rec{suffix}")
        save_worm(worm, tmp_path / f"one{suffix}")
        with pytest.raises(WormFileError, match="not a recording"):
            load_recording(tmp_path / f"one{suffix}")


def test_a_one_volume_file_is_still_a_worm(tmp_path, volumes):
    """A worm file that carries its volume number (one value) loads with load_worm as before."""
    save_recording(volumes[:1], tmp_path / "one.csv", numbers=[4])
    save_recording(volumes[:1], tmp_path / "one.npz", numbers=[4])
    for suffix in (".csv", ".npz"):
        np.testing.assert_array_equal(
            load_worm(tmp_path / f"one{suffix}").xyz_um, volumes[0].xyz_um
        )


def test_skip_invalid_volumes(tmp_path, volumes):
    """A failed segmentation (< 3 neurons) in one volume: an error naming it, or with
    skip_invalid=True the other volumes and a warning naming it."""
    rows = ["1,2,3,0", "40,5,6,0", "7,80,2,0", "7,8,9,1", "50,5,6,1", "9,9,40,1", "1,60,9,2"]
    rows.append("30,6,9,2")  # volume 2: two neurons
    (tmp_path / "r.csv").write_text("x,y,z,volume\n" + "\n".join(rows) + "\n")
    with pytest.raises(WormFileError, match="volume 2: .*at least 3"):
        load_recording(tmp_path / "r.csv")
    with pytest.warns(UserWarning, match="skipped 1 of 3 volumes: volume 2: "):
        kept = load_recording(tmp_path / "r.csv", skip_invalid=True)
    assert [(w.meta["volume"], w.n) for w in kept] == [(0, 3), (1, 3)]
    (tmp_path / "bad.csv").write_text("x,y,z,volume\n1,2,3,0\n4,5,6,0\n")
    with pytest.raises(WormFileError, match="none of its 1 volumes is a valid worm"):
        with pytest.warns(UserWarning):
            load_recording(tmp_path / "bad.csv", skip_invalid=True)


def test_bad_recordings_name_the_problem(tmp_path, volumes):
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y,z,volume\n1,2,3,0\n4,5,6,zero\n")
    with pytest.raises(WormFileError, match="line 3: volume 'zero' is not an integer"):
        load_recording(bad)
    rows = ["1,2,3,0", "4,5,6,0", "7,8,2,0", "7,8,9,1", "4000,5,6,1", "1,9,9,1"]
    bad.write_text("x,y,z,volume\n" + "\n".join(rows) + "\n")
    with pytest.raises(WormFileError, match="bad.csv: volume 1: .*pixels"):
        load_recording(bad)
    xyz = np.random.default_rng(0).uniform(0, 50, (6, 3))
    np.savez(tmp_path / "f.npz", xyz_um=xyz, volume=np.zeros(6))
    with pytest.raises(WormFileError, match="'volume' must hold integers"):
        load_recording(tmp_path / "f.npz")
    np.savez(tmp_path / "s.npz", xyz_um=xyz, volume=np.zeros(5, int))
    with pytest.raises(WormFileError, match="'volume' has shape"):
        load_recording(tmp_path / "s.npz")
    np.savez(tmp_path / "n.npz", xyz_um=xyz, volume=np.zeros(6, int), names=np.array(["A"] * 4))
    with pytest.raises(WormFileError, match="'names' has shape"):
        load_recording(tmp_path / "n.npz")
    with pytest.raises(WormFileError, match="no such file"):
        load_recording(tmp_path / "missing.csv")
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(WormFileError, match="unknown recording file suffix"):
        load_recording(tmp_path / "x.txt")
    np.savez(tmp_path / "e.npz", xyz_um=np.zeros((0, 3)), volume=np.zeros(0, int))
    with pytest.raises(WormFileError, match="no neurons"):
        load_recording(tmp_path / "e.npz")
    np.savez(tmp_path / "m.npz", xyz_um=xyz, volume=np.zeros(6, int), mirrored=np.zeros(6, bool))
    with pytest.raises(WormFileError, match="'mirrored' must be one bool"):
        load_recording(tmp_path / "m.npz")
    bad.write_text("x,y,z,volume\n1,2,3,99999999999999999999\n")
    with pytest.raises(WormFileError, match="line 2: volume .* is not an integer"):
        load_recording(bad)


def test_save_recording_bad_input(tmp_path, volumes):
    with pytest.raises(ValueError, match="worms is empty"):
        save_recording([], tmp_path / "r.csv")
    with pytest.raises(TypeError, match="got a single Worm"):
        save_recording(volumes[0], tmp_path / "r.csv")
    with pytest.raises(TypeError, match=r"worms\[1\] is a ndarray, expected a Worm"):
        save_recording([volumes[0], np.zeros((5, 3))], tmp_path / "r.csv")
    with pytest.raises(ValueError, match="distinct integers"):
        save_recording(volumes, tmp_path / "r.csv", numbers=[1, 1, 2])
    with pytest.raises(TypeError, match="volume numbers must be integers"):
        save_recording(volumes, tmp_path / "r.csv", numbers=[0, 1.5, 2])
    with pytest.raises(ValueError, match="share their color channels"):
        save_recording([volumes[0], volumes[1].replace(color=None)], tmp_path / "r.csv")
    with pytest.raises(ValueError, match="all be mirrored or all not"):
        save_recording([volumes[0], volumes[1].replace(mirrored=True)], tmp_path / "r.csv")
    with pytest.raises(WormFileError, match="cannot save a recording"):
        save_recording(volumes, tmp_path / "r.txt")
    assert not any(tmp_path.iterdir())  # nothing half-written


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
