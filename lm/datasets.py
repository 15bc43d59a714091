"""The corpus registry: named public data sets, fetched into a local cache and checked by sha256.

Where a file comes from, in order: the cache (``$RNNLAB_CACHE``, default ``~/.cache/rnnlab``), the
offline mirror ``$RNNLAB_DATA_MIRROR`` (a folder or a URL prefix holding the files under their
registry ``filename``), then the canonical address. Every file is hashed before it is used: a
download or copy must match the registry's sha256 before it enters the cache, and a cached file is
hashed again on each use (a few milliseconds for these sizes), so a modified cache is noticed and
fetched afresh. Archive members are extracted beside the archive, with a ``.sha256`` marker holding
their digest at extraction time. Every write into the cache is atomic. Torch-free.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from serving.errors import UserError
from serving.files import atomic_target, sha256_file

CACHE_ENV = "RNNLAB_CACHE"
MIRROR_ENV = "RNNLAB_DATA_MIRROR"
TIMEOUT_S = 30.0
_CHUNK = 1 << 16


class DatasetError(UserError):
    """A corpus cannot be found, fetched, verified or decoded; the message is one user-facing line."""


@dataclass(frozen=True)
class Dataset:
    name: str
    url: str
    sha256: str
    member: str | None  # the text file inside an archive, or None when the download is the text
    filename: str  # the download's name in the cache and in a mirror
    licence: str
    description: str = ""
    size: int | None = None  # bytes of the download, for listings


REGISTRY: dict[str, Dataset] = {
    "timemachine": Dataset(
        name="timemachine",
        url="http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
        sha256="8424dbd9532ac81f7e5f0b6add90e6952baea29158309d7d1bf3884f4e12c516",
        member=None,
        filename="timemachine.txt",
        size=178979,
        licence="public domain (Project Gutenberg)",
        description="H. G. Wells, The Time Machine (d2l.ai copy)",
    ),
    "tinyshakespeare": Dataset(
        name="tinyshakespeare",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        member=None,
        filename="tinyshakespeare.txt",
        size=1115394,
        licence="public domain",
        description="Shakespeare excerpts, char-rnn tiny shakespeare",
    ),
    "fra-eng": Dataset(
        name="fra-eng",
        url="http://d2l-data.s3-accelerate.amazonaws.com/fra-eng.zip",
        sha256="fa96382b2c8b609e1662654c1e6e6baeb8d30b3bf63dfb4a5a261cc36347df13",
        member="fra-eng/fra.txt",
        filename="fra-eng.zip",
        size=3420152,
        licence="CC-BY 2.0 FR (tatoeba.org, manythings.org/anki)",
        description="Tatoeba English-French pairs, 'english<TAB>french' lines",
    ),
    "co2": Dataset(
        name="co2",
        url="https://raw.githubusercontent.com/statsmodels/statsmodels/main/statsmodels/datasets/co2/co2.csv",
        sha256="16695fa2786e53414e5a6b54767a3fdf5de99cfbc68617f69d1362d92776a92f",
        member=None,
        filename="co2.csv",
        size=33974,
        licence="public domain",
        description="Mauna Loa weekly CO2 (ppm) 1958-2001, 'date,co2' CSV (statsmodels copy), a series",
    ),
    "sunspots": Dataset(
        name="sunspots",
        url="https://raw.githubusercontent.com/statsmodels/statsmodels/main/statsmodels/datasets/sunspots/sunspots.csv",
        sha256="f67889b1d9002cd5227f0e0ef54e35b419cdd85a31279adef6f73fb41e5c0a9b",
        member=None,
        filename="sunspots.csv",
        size=2944,
        licence="public domain",
        description="Yearly sunspot activity 1700-2008 (NOAA NGDC), 'YEAR,SUNACTIVITY' CSV, a series",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rnnlab")


def get_dataset(name: str) -> Dataset:
    try:
        return REGISTRY[name]
    except KeyError:
        raise DatasetError(
            f"unknown corpus {name!r}; known corpora: {', '.join(sorted(REGISTRY))} "
            "(or give the path of a UTF-8 text file)"
        ) from None


def _sources(dataset: Dataset) -> list[str]:
    """Addresses to try in order: the mirror (folder path or URL), then the canonical URL."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    sources = []
    if mirror:
        if "://" in mirror:
            sources.append(mirror.rstrip("/") + "/" + dataset.filename)
        else:
            sources.append(str(Path(mirror).expanduser() / dataset.filename))
    sources.append(dataset.url)
    return sources


def _open_source(source: str) -> BinaryIO:
    if "://" in source:
        return urllib.request.urlopen(source, timeout=TIMEOUT_S)
    return open(source, "rb")


def _download(dataset: Dataset, source: str, target: Path) -> None:
    """Copies ``source`` into ``target`` atomically, refusing it unless its sha256 matches."""
    digest = hashlib.sha256()
    with _open_source(source) as response, atomic_target(target) as out:
        for chunk in iter(lambda: response.read(_CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
        if digest.hexdigest() != dataset.sha256:
            raise DatasetError(
                f"checksum mismatch for {dataset.filename} from {source}: expected sha256 "
                f"{dataset.sha256}, got {digest.hexdigest()}"
            )


def _fetch_download(dataset: Dataset) -> Path:
    target = cache_dir() / dataset.filename
    if target.is_file() and sha256_file(target) == dataset.sha256:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(
            f"cannot create the cache folder {target.parent} ({exc.strerror}); "
            f"set {CACHE_ENV} to a writable folder"
        ) from None
    failures = []
    for source in _sources(dataset):
        try:
            _download(dataset, source, target)
            return target
        except FileNotFoundError:
            failures.append(f"{source}: no such file")
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
            failures.append(f"{source}: {reason}")
    raise DatasetError(
        f"cannot fetch {dataset.name} ({'; '.join(failures)}); without network access, set "
        f"{MIRROR_ENV} to a folder or URL prefix holding {dataset.filename}"
    )


def _extract_member(dataset: Dataset, archive: Path) -> Path:
    assert dataset.member is not None
    target = cache_dir() / dataset.member
    marker = target.with_name(target.name + ".sha256")
    if target.is_file() and marker.is_file() and sha256_file(target) == marker.read_text().strip():
        return target
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(dataset.member) as src, atomic_target(target) as out:
            shutil.copyfileobj(src, out, _CHUNK)
        with atomic_target(marker) as out:
            out.write(sha256_file(target).encode("ascii") + b"\n")
    except KeyError:
        raise DatasetError(f"{archive}: archive has no member {dataset.member}") from None
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"{archive}: broken archive ({exc})") from None
    except OSError as exc:
        reason = exc.strerror or exc
        raise DatasetError(f"cannot extract {dataset.member} into {target.parent} ({reason})") from None
    return target


def fetch(name: str) -> Path:
    """The local path of corpus ``name``'s text file, downloading and extracting it when needed."""
    dataset = get_dataset(name)
    path = _fetch_download(dataset)
    return _extract_member(dataset, path) if dataset.member else path


def read_text(name_or_path: str | Path) -> str:
    """The text of a registered corpus or of any local UTF-8 file (``\\r\\n`` read as ``\\n``)."""
    key = str(name_or_path)
    if key in REGISTRY:
        path = fetch(key)
    else:
        path = Path(key).expanduser()
        if not path.is_file():
            if path.exists():
                raise DatasetError(f"{path}: not a regular file")
            get_dataset(key)  # raises: neither a corpus name nor a file
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = f"0x{data[exc.start]:02x}"
        raise DatasetError(f"{path}: not UTF-8 text (byte {bad} at offset {exc.start})") from None
    return text.replace("\r\n", "\n")


def is_cached(dataset: Dataset) -> bool:
    return (cache_dir() / (dataset.member or dataset.filename)).is_file()


def describe() -> list[dict[str, object]]:
    """One row per registered corpus, for ``rnnlab-lm data list``."""
    rows: list[dict[str, object]] = []
    for dataset in REGISTRY.values():
        cached = is_cached(dataset)
        rows.append(
            {
                "name": dataset.name,
                "description": dataset.description,
                "licence": dataset.licence,
                "url": dataset.url,
                "size": dataset.size,
                "cached": cached,
                "path": str(cache_dir() / (dataset.member or dataset.filename)) if cached else None,
            }
        )
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    """The rows of :func:`describe` as an aligned text table."""
    header = ("NAME", "SIZE", "CACHED", "LICENCE", "DESCRIPTION")
    lines = [header] + [
        (
            str(r["name"]),
            f"{r['size'] / 1e6:.1f} MB" if isinstance(r["size"], int) else "?",
            "yes" if r["cached"] else "no",
            str(r["licence"]),
            str(r["description"]),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
