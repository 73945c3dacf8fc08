"""Reading and writing worms and recordings (many volumes of one animal): npz, CSV and the original
fDNC pickle (explicit opt-in).

Every loader returns a validated ``Worm`` (``load_recording``: one per volume) or raises
``WormFileError`` (a ``ValueError``) naming the file; never a partial worm. NWB is not read yet: no NWB
file could be checked here, so no untested reader ships.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from fdnc_jax.worm import Worm, as_worm_list

PathLike = str | os.PathLike


class WormFileError(ValueError):
    """A worm file is missing, unreadable or not in the expected format.

    A ``ValueError`` whose message starts with the file's path.

    Example:
      >>> try:
      ...     load_worm("no_such_worm.npz")
      ... except WormFileError as e:
      ...     print(e)
      no_such_worm.npz: no such file
    """


def _fail(path: PathLike, problem: str) -> WormFileError:
    return WormFileError(f"{os.fspath(path)}: {problem}")


def load_worm(path: PathLike) -> Worm:
    """Loads a worm from ``.npz`` or ``.csv`` (by suffix).

    npz keys: ``xyz_um`` [N, 3] µm, ``names`` [N] str, optional ``rgb`` [N, C], ``uncertain`` [N] bool,
    ``mirrored`` bool, ``meta`` JSON str. CSV: a header with ``x,y,z`` (µm), optional ``name``, color
    columns ``r,g,b[,w]`` or ``c0..cK``, optional ``uncertain`` (0/1).

    Args:
      path: the file.

    Returns:
      The validated Worm.

    Raises:
      WormFileError: the file is missing, unreadable, of an unknown suffix or holds an invalid worm.

    Example:
      >>> worm = load_worm("template.npz")  # doctest: +SKIP
      >>> from fdnc_jax.datasets import bundled_worm_paths
      >>> worm = load_worm(bundled_worm_paths()[0])
      >>> worm.xyz_um.shape == (worm.n, 3)
      True
    """
    p = Path(path)
    if not p.exists():
        raise _fail(p, "no such file")
    if p.is_dir():
        raise _fail(p, "is a directory, expected a worm file (.npz or .csv)")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return _load_npz(p)
    if suffix == ".csv":
        return _load_csv(p)
    if suffix == ".data":
        raise _fail(
            p,
            "looks like an original fDNC pickle; pickle files can run arbitrary code when loaded, so "
            "they are read only through load_fdnc_pickle(path, trust=True) for files you trust",
        )
    if suffix == ".nwb":
        raise _fail(p, "NWB files are not supported yet (convert to .npz or .csv)")
    raise _fail(p, f"unknown worm file suffix {suffix!r}; expected .npz or .csv")


def save_worm(worm: Worm, path: PathLike) -> None:
    """Saves a worm to ``.npz`` or ``.csv`` atomically (written to a temporary file, then renamed).

    The file holds positions in µm ([N, 3]), names ([N]), color ([N, C]) if any, ``mirrored`` and
    the metadata, in the layout ``load_worm`` reads back.

    Args:
      worm: the Worm.
      path: the destination; its suffix (``.npz`` or ``.csv``) picks the format.

    Raises:
      WormFileError: an unsupported suffix.
      ValueError: a mirrored worm to ``.csv`` (CSV has no mirrored flag: it would come back unmirrored).

    Example:
      >>> import pathlib, tempfile
      >>> w = Worm(xyz_um=np.random.default_rng(0).uniform(0, 100, (50, 3)))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_worm(w, pathlib.Path(d) / "w.csv")
      ...     load_worm(pathlib.Path(d) / "w.csv").n
      50
    """
    if not isinstance(worm, Worm):
        raise TypeError(f"worm must be a Worm, got {type(worm).__name__}")
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".npz", ".csv"):
        raise _fail(p, f"cannot save to suffix {suffix!r}; use .npz or .csv")
    if suffix == ".npz":
        atomic_write(p, lambda f: _write_npz(worm, f), binary=True)
    else:
        atomic_write(p, lambda f: _write_csv(worm, f), binary=False)


def atomic_write(path: PathLike, write: Callable[[IO], None], binary: bool = True) -> None:
    """Writes a file through ``write(f)`` into a temporary sibling, then renames it into place.

    A crash mid-write leaves the previous file (if any) untouched and no partial file behind.

    Args:
      path: the destination (parent folders are created).
      write: called once with the open temporary file.
      binary: open the file in binary mode (else text, UTF-8).

    Example:
      >>> import pathlib, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     atomic_write(pathlib.Path(d) / "a.txt", lambda f: f.write("hi"), binary=False)
      ...     (pathlib.Path(d) / "a.txt").read_text()
      'hi'
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with (
            os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="", encoding="utf-8") as f
        ):
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _worm_from_fields(path: PathLike, **fields: Any) -> Worm:
    try:
        return Worm(**fields)
    except (ValueError, TypeError) as e:
        raise _fail(path, str(e)) from e


def _npz_arrays(p: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(p, allow_pickle=False) as d:
            return {k: d[k] for k in d.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise _fail(p, f"not a readable npz file ({e})") from e


def _load_npz(p: Path) -> Worm:
    arrays = _npz_arrays(p)
    if "xyz_um" not in arrays:
        raise _fail(p, f"missing array 'xyz_um' (found {sorted(arrays)})")
    volumes = np.unique(arrays["volume"]).size if "volume" in arrays else 1
    if volumes > 1:
        raise _recording_error(p, volumes)
    return _worm_from_arrays(p, arrays)


def _worm_from_arrays(p: Path, arrays: dict[str, Any]) -> Worm:
    """The Worm of a worm npz's arrays (a recording's volume: the rows of that volume)."""
    meta: dict[str, Any] = {}
    if "meta" in arrays:
        try:
            meta = json.loads(str(arrays["meta"]))
        except json.JSONDecodeError as e:
            raise _fail(p, f"'meta' is not valid JSON ({e})") from e
        if not isinstance(meta, dict):
            meta = {"meta": meta}
    meta.setdefault("file", os.fspath(p))
    uncertain = arrays.get("uncertain")
    if uncertain is not None:
        meta["uncertain"] = np.asarray(uncertain, bool).tolist()
    mirrored = arrays.get("mirrored", False)
    if np.size(mirrored) != 1:
        raise _fail(p, f"'mirrored' must be one bool, got shape {np.shape(mirrored)}")
    return _worm_from_fields(
        p,
        xyz_um=arrays["xyz_um"],
        names=arrays.get("names"),
        color=arrays.get("rgb"),
        mirrored=bool(np.asarray(mirrored).reshape(())),
        meta=meta,
    )


def _write_npz(worm: Worm, f) -> None:
    arrays: dict[str, Any] = {"xyz_um": worm.xyz_um, "names": worm.names}
    if worm.color is not None:
        arrays["rgb"] = worm.color
    meta = dict(worm.meta)
    if meta.pop("uncertain", None) is not None:
        arrays["uncertain"] = _uncertain_flags(worm)
    arrays["mirrored"] = np.asarray(worm.mirrored)
    arrays["meta"] = np.asarray(json.dumps(meta, sort_keys=True, default=str))
    write_npz(f, arrays)


def write_npz(f: IO[bytes], arrays: dict[str, Any]) -> None:
    """Writes ``arrays`` as a compressed ``.npz`` whose bytes depend on the arrays only.

    ``np.savez_compressed`` stamps each member with the current time, so two saves of the same
    arrays differ; here every member gets a fixed 1980-01-01 timestamp and the members are written
    in sorted order, so bundled files can be rebuilt byte for byte (with the same zlib build: the
    deflate stream is zlib's). ``np.load`` reads the result.

    Args:
      f: a binary file object opened for writing.
      arrays: name → array of any shape (names without the ``.npy`` suffix).

    Example:
      >>> buf = io.BytesIO()
      >>> write_npz(buf, {"xyz_um": np.zeros((4, 3))})
      >>> np.load(io.BytesIO(buf.getvalue()))["xyz_um"].shape
      (4, 3)
    """
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            info.create_system = 3  # Unix on every platform (Windows would write 0).
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arrays[name]), allow_pickle=False)
            zf.writestr(info, buf.getvalue(), compresslevel=6)


_RGB = ("r", "g", "b", "w")


def _color_columns(header: list[str]) -> list[str]:
    cs = sorted((h for h in header if h[:1] == "c" and h[1:].isdigit()), key=lambda h: int(h[1:]))
    if cs:
        if [int(h[1:]) for h in cs] != list(range(len(cs))):
            raise ValueError(f"color columns must be c0..cK without gaps, got {cs}")
        return cs
    rgb = [h for h in _RGB if h in header]
    if rgb and rgb[:3] != ["r", "g", "b"]:
        raise ValueError(f"color columns must include r, g and b, got {rgb}")
    return rgb


def _read_csv_table(p: Path) -> dict[str, Any]:
    """The rows of a worm or recording CSV: ``xyz`` [R, 3] float64 µm, ``names`` [R] str,
    ``color`` [R, C] float32 or None, ``uncertain`` [R] bool list or None, ``volume`` [R] raw
    strings or None (the column of recordings); ``lines`` [R] the file's line numbers."""
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(p, f"not a readable text file ({e})") from e
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise _fail(p, "empty file; expected a header line with x,y,z")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in ("x", "y", "z") if c not in header]
    if missing:
        raise _fail(p, f"line 1: header {rows[0]} lacks column(s) {missing} (x, y, z in µm)")
    try:
        ccols = _color_columns(header)
    except ValueError as e:
        raise _fail(p, f"line 1: {e}") from e
    col = {h: i for i, h in enumerate(header)}
    xyz, names, color, uncertain, volume, lines = [], [], [], [], [], []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise _fail(p, f"line {lineno}: {len(row)} fields, header has {len(header)}")
        try:
            xyz.append([float(row[col[c]]) for c in ("x", "y", "z")])
            color.append([float(row[col[c]]) for c in ccols])
        except ValueError as e:
            raise _fail(p, f"line {lineno}: not a number ({e})") from e
        names.append(row[col["name"]].strip() if "name" in col else "")
        if "uncertain" in col:
            uncertain.append(row[col["uncertain"]].strip().lower() in ("1", "true", "yes"))
        if "volume" in col:
            volume.append(row[col["volume"]].strip())
        lines.append(lineno)
    if not xyz:
        raise _fail(p, "no data rows after the header")
    arr = np.asarray(xyz, np.float64)
    bad = np.flatnonzero(~np.all(np.isfinite(arr), axis=1))
    if bad.size:
        raise _fail(p, f"line {lines[int(bad[0])]}: non-finite coordinate")
    return {
        "xyz": arr,
        "names": np.asarray(names, dtype=str),
        "color": np.asarray(color, np.float32) if ccols else None,
        "uncertain": uncertain if "uncertain" in col else None,
        "volume": volume if "volume" in col else None,
        "lines": lines,
    }


def _load_csv(p: Path) -> Worm:
    table = _read_csv_table(p)
    volumes = 1 if table["volume"] is None else len(set(table["volume"]))
    if volumes > 1:
        raise _recording_error(p, volumes)
    meta: dict[str, Any] = {"file": os.fspath(p)}
    if table["uncertain"] is not None:
        meta["uncertain"] = table["uncertain"]
    return _worm_from_fields(
        p, xyz_um=table["xyz"], names=table["names"], color=table["color"], meta=meta
    )


def _recording_error(p: Path, volumes: int) -> WormFileError:
    return _fail(
        p,
        f"has a 'volume' column with {volumes} volumes: a recording, not one worm; read it with "
        "fdnc_jax.load_recording (fdnc-predict --recording)",
    )


def _write_csv(worm: Worm, f) -> None:
    _write_csv_rows([worm], f)


def _write_csv_rows(worms: list[Worm], f, volumes: list[int] | None = None) -> None:
    """The CSV of one worm, or of a recording's volumes (``volumes``: one number per worm, written
    in a last ``volume`` column). The worms share their color channels (checked by the caller).
    Mirrored worms are refused (ValueError): CSV has no mirrored flag, they would come back
    unmirrored; ``atomic_write`` then leaves the file there untouched."""
    if any(w.mirrored for w in worms):
        what = "the worm is" if volumes is None else "the volumes are"
        raise ValueError(f"{what} mirrored and CSV has no mirrored flag: save as .npz")
    color = worms[0].color
    ccols: list[str] = []
    if color is not None:
        c = color.shape[1]
        ccols = list(_RGB[:c]) if 3 <= c <= 4 else [f"c{i}" for i in range(c)]
    flags = any(w.meta.get("uncertain") is not None for w in worms)
    w = csv.writer(f)
    w.writerow(
        ["x", "y", "z", "name", *ccols]
        + (["uncertain"] if flags else [])
        + (["volume"] if volumes is not None else [])
    )
    for k, worm in enumerate(worms):
        uncertain = _uncertain_flags(worm)
        for i in range(worm.n):
            row = [repr(float(v)) for v in worm.xyz_um[i]] + [worm.names[i]]
            if worm.color is not None:
                row += [repr(float(v)) for v in worm.color[i]]
            if flags:
                row.append(str(int(bool(uncertain[i]))))
            if volumes is not None:
                row.append(str(volumes[k]))
            w.writerow(row)


def load_recording(path: PathLike, skip_invalid: bool = False) -> list[Worm]:
    """Loads a recording: the neurons of many volumes (time points) of one animal, in one file.

    CSV: the columns of a worm CSV (``load_worm``) plus an integer ``volume`` column, one row per
    neuron per volume (a volume's rows need not be contiguous). npz: the arrays of a worm npz over
    all rows (``xyz_um`` [R, 3] µm, optional ``names`` [R], ``rgb`` [R, C], ``uncertain`` [R]) plus
    ``volume`` [R] int; ``mirrored`` and ``meta`` hold for every volume. ``save_recording`` writes
    both. Match it with ``predict_batch(model, template, load_recording(path))`` or
    ``fdnc-predict --recording``.

    Args:
      path: the ``.csv`` or ``.npz`` file.
      skip_invalid: leave out, with a warning naming them, the volumes that are not valid worms
        (e.g. a failed segmentation with fewer than 3 neurons); default: an error.

    Returns:
      One Worm per volume, by increasing volume number; ``worm.meta["volume"]`` is its number.

    Raises:
      WormFileError: a missing or unreadable file, no ``volume`` column, no rows, a volume number
        that is not an integer, or a volume that is not a valid worm (named; unless
        ``skip_invalid``), or no valid volume at all.

    Example:
      >>> import pathlib, tempfile
      >>> rng = np.random.default_rng(0)
      >>> volumes = [Worm(xyz_um=rng.uniform(0, 100, (n, 3))) for n in (40, 45)]
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_recording(volumes, pathlib.Path(d) / "rec.csv", numbers=[3, 7])
      ...     back = load_recording(pathlib.Path(d) / "rec.csv")
      >>> [(w.meta["volume"], w.n) for w in back]
      [(3, 40), (7, 45)]
    """
    p = Path(path)
    if not p.is_file():
        raise _fail(
            p, "is a directory, expected a recording file" if p.is_dir() else "no such file"
        )
    suffix = p.suffix.lower()
    if suffix not in (".csv", ".npz"):
        raise _fail(p, f"unknown recording file suffix {suffix!r}; expected .csv or .npz")
    arrays, volume = _recording_csv(p) if suffix == ".csv" else _recording_npz(p)
    order = np.argsort(volume, kind="stable")  # rows grouped by volume, file order within one
    numbers, starts = np.unique(volume[order], return_index=True)
    worms, skipped = [], []
    for v, rows in zip(numbers, np.split(order, starts[1:]), strict=True):
        part = {k: (a[rows] if k in _PER_ROW else a) for k, a in arrays.items()}
        try:
            worm = _worm_from_arrays(p, part)
        except WormFileError as e:
            problem = f"volume {int(v)}: " + str(e)[len(os.fspath(p)) + 2 :]  # "path: problem"
            if not skip_invalid:
                raise _fail(p, problem) from e
            skipped.append(problem)
            continue
        worms.append(worm.replace(meta={**worm.meta, "volume": int(v)}))
    if skipped:
        warnings.warn(
            f"{os.fspath(p)}: skipped {len(skipped)} of {len(numbers)} volumes: "
            + "; ".join(skipped[:5])
            + (" ..." if len(skipped) > 5 else ""),
            stacklevel=2,
        )
    if not worms:
        raise _fail(p, f"none of its {len(numbers)} volumes is a valid worm")
    return worms


def _recording_csv(p: Path) -> tuple[dict[str, Any], np.ndarray]:
    """(worm npz-style arrays over all rows, volume number [R]) of a recording CSV."""
    table = _read_csv_table(p)
    if table["volume"] is None:
        raise _fail(p, "line 1: no 'volume' column: one worm, not a recording (load_worm)")
    volume = np.empty(len(table["volume"]), np.int64)
    for j, v in enumerate(table["volume"]):
        try:
            volume[j] = int(v)
        except (ValueError, OverflowError):
            raise _fail(p, f"line {table['lines'][j]}: volume {v!r} is not an integer") from None
    arrays: dict[str, Any] = {"xyz_um": table["xyz"], "names": table["names"]}
    if table["color"] is not None:
        arrays["rgb"] = table["color"]
    if table["uncertain"] is not None:
        arrays["uncertain"] = np.asarray(table["uncertain"], bool)
    return arrays, volume


def _recording_npz(p: Path) -> tuple[dict[str, Any], np.ndarray]:
    """(its arrays but ``volume``, volume number [R]) of a recording npz, shapes checked."""
    arrays = _npz_arrays(p)
    for key in ("volume", "xyz_um"):
        if key not in arrays:
            raise _fail(p, f"missing array {key!r} (found {sorted(arrays)}): not a recording")
    volume = arrays.pop("volume")
    if volume.dtype.kind not in "iu":
        raise _fail(p, f"'volume' must hold integers, got dtype {volume.dtype}")
    rows = np.shape(arrays["xyz_um"])[:1]
    if rows in ((), (0,)):
        raise _fail(p, f"'xyz_um' has shape {np.shape(arrays['xyz_um'])}: no neurons")
    if np.ndim(volume) != 1 or np.shape(volume)[:1] != rows:
        raise _fail(p, f"'volume' has shape {np.shape(volume)}; expected one per row of 'xyz_um'")
    for key in _PER_ROW:
        if key in arrays and np.shape(arrays[key])[:1] != rows:
            raise _fail(
                p, f"{key!r} has shape {np.shape(arrays[key])}; expected one row per neuron"
            )
    return arrays, volume


# A recording npz's arrays with one row per neuron.
_PER_ROW = ("xyz_um", "names", "rgb", "uncertain")


def save_recording(worms: list[Worm], path: PathLike, numbers: list[int] | None = None) -> None:
    """Saves the volumes of a recording to one ``.csv`` or ``.npz`` (atomic), as ``load_recording``
    reads them.

    Args:
      worms: one Worm per volume, all with color (the same channels) or none, all on the same side
        (mirrored volumes: ``.npz`` only; CSV has no mirrored flag).
      path: the destination; its suffix picks the format.
      numbers: each volume's number (default: ``meta["volume"]`` when every worm has one, else
        0, 1, ...); distinct integers.

    Raises:
      WormFileError: an unsupported suffix. ValueError / TypeError: no worms, mixed color channels or
        sides, or volume numbers that are not distinct integers.

    Example:
      >>> import pathlib, tempfile
      >>> rng = np.random.default_rng(0)
      >>> volumes = [Worm(xyz_um=rng.uniform(0, 100, (n, 3))) for n in (40, 45)]
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_recording(volumes, pathlib.Path(d) / "rec.npz")
      ...     [w.n for w in load_recording(pathlib.Path(d) / "rec.npz")]
      [40, 45]
    """
    if isinstance(worms, Worm):
        raise TypeError("worms must be a list of Worms (one per volume), got a single Worm")
    worms = as_worm_list(worms)
    if not worms:
        raise ValueError("worms is empty: a recording needs at least one volume")
    if numbers is None:
        have = all(isinstance(w.meta.get("volume"), int | np.integer) for w in worms)
        numbers = [int(w.meta["volume"]) for w in worms] if have else list(range(len(worms)))
    numbers = [_volume_number(v) for v in numbers]
    if len(numbers) != len(worms) or len(set(numbers)) != len(numbers):
        raise ValueError(f"numbers must be {len(worms)} distinct integers, got {numbers}")
    channels = {None if w.color is None else w.color.shape[1] for w in worms}
    if len(channels) > 1:
        raise ValueError(
            f"the volumes must share their color channels, got {sorted(channels, key=str)}"
        )
    if len({w.mirrored for w in worms}) > 1:
        raise ValueError("the volumes must all be mirrored or all not (one animal, one side)")
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".csv":
        atomic_write(p, lambda f: _write_csv_rows(worms, f, numbers), binary=False)
    elif suffix == ".npz":
        atomic_write(p, lambda f: _write_recording_npz(worms, numbers, f), binary=True)
    else:
        raise _fail(p, f"cannot save a recording to suffix {suffix!r}; use .csv or .npz")


def _uncertain_flags(worm: Worm) -> np.ndarray:
    """[N] bool: the worm's ``meta["uncertain"]`` flags, all False when it has none."""
    flags = worm.meta.get("uncertain")
    return np.zeros(worm.n, bool) if flags is None else np.asarray(flags, bool)


def _volume_number(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer):
        raise TypeError(f"volume numbers must be integers, got {v!r}")
    return int(v)


def _write_recording_npz(worms: list[Worm], numbers: list[int], f) -> None:
    arrays: dict[str, Any] = {
        "xyz_um": np.concatenate([w.xyz_um for w in worms]),
        "names": np.concatenate([w.names for w in worms]),
        "volume": np.repeat(np.asarray(numbers, np.int64), [w.n for w in worms]),
        "mirrored": np.asarray(worms[0].mirrored),
    }
    if worms[0].color is not None:
        arrays["rgb"] = np.concatenate([w.color for w in worms])
    if any(w.meta.get("uncertain") is not None for w in worms):
        arrays["uncertain"] = np.concatenate([_uncertain_flags(w) for w in worms])
    shared = {k: v for k, v in worms[0].meta.items() if k not in ("uncertain", "volume", "file")}
    arrays["meta"] = np.asarray(json.dumps(shared, sort_keys=True, default=str))
    write_npz(f, arrays)


def load_fdnc_pickle(path: PathLike, trust: bool = False) -> Worm:
    """Loads a worm from the original fDNC pickle (``.data``: keys pts µm, name, fluo, mask_keep, side).

    Applies ``mask_keep`` (the neurons the original kept) and ``side`` (side == 0 → mirrored), as the
    original did.

    Args:
      path: the ``.data`` file.
      trust: must be True: unpickling runs code from the file, so only load files you trust.

    Returns:
      The Worm of the kept neurons (``pts`` [N, 3] µm), color [N, C] from ``fluo``.

    Raises:
      WormFileError: ``trust`` is False, or the file is missing or not an fDNC worm pickle.

    Example:
      >>> import pathlib, tempfile
      >>> d = {"pts": np.random.default_rng(0).uniform(0, 100, (5, 3)), "side": 0}
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     _ = (pathlib.Path(tmp) / "w.data").write_bytes(pickle.dumps(d))
      ...     load_fdnc_pickle(pathlib.Path(tmp) / "w.data", trust=True)
      Worm(n=5, labelled=0, color=none, mirrored=True)
    """
    p = Path(path)
    if not trust:
        raise _fail(
            p,
            "refusing to unpickle: pickle files can execute arbitrary code when loaded. If you trust "
            "this file, call load_fdnc_pickle(path, trust=True)",
        )
    if not p.is_file():
        raise _fail(p, "no such file")
    try:
        with open(p, "rb") as f:
            d = pickle.load(f)  # noqa: S301 - explicit opt-in above.
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unreadable file.
        raise _fail(p, f"not a readable fDNC pickle ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict) or "pts" not in d:
        raise _fail(p, "not an fDNC worm pickle: expected a dict with key 'pts'")
    pts = np.asarray(d["pts"], np.float64)
    n = len(pts)
    keep = np.asarray(d.get("mask_keep", np.arange(n)), np.int64)
    if keep.size and (keep.min() < 0 or keep.max() >= n):
        raise _fail(p, f"mask_keep indexes outside the {n} points")
    names = d.get("name")
    fluo = d.get("fluo")
    return _worm_from_fields(
        p,
        xyz_um=pts[keep],
        names=None if names is None else np.asarray(names, dtype=object)[keep],
        color=None if fluo is None else np.asarray(fluo, np.float32)[keep],
        mirrored=int(d.get("side", 1)) == 0,
        meta={"file": os.fspath(p), "format": "fdnc_pickle", "mask_keep_applied": True},
    )
