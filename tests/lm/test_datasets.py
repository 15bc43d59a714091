"""The corpus registry: cache, offline mirror (folder or URL), checksums, and one-line errors.

No test touches the network: the synthetic corpora's canonical addresses point at a closed port on
loopback, and the registered corpora are read from the mirror that tests/conftest.py sets up.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lm import datasets
from lm.datasets import REGISTRY, Dataset, DatasetError, describe, fetch, format_table, read_text

CLOSED = "http://127.0.0.1:9"  # the discard port on loopback: refused at once, never the internet
TEXT = "It was the best of times,\nit was the worst of times.\n" * 20
PAIRS = "Go.\tVa !\nHi.\tSalut !\n"


@dataclass
class Synthetic:
    mirror: Path
    cache: Path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def synthetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Synthetic:
    """Two registered corpora (a text, a zip with a member) held by a mirror folder; an empty cache."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "tiny.txt").write_bytes(TEXT.encode())
    with zipfile.ZipFile(mirror / "pairs.zip", "w") as zf:
        zf.writestr("pairs/p.txt", PAIRS)
    monkeypatch.setitem(
        REGISTRY,
        "tiny",
        Dataset("tiny", f"{CLOSED}/canonical/tiny.txt", _sha(TEXT.encode()), None, "tiny.txt", "test"),
    )
    monkeypatch.setitem(
        REGISTRY,
        "pairs",
        Dataset(
            "pairs",
            f"{CLOSED}/canonical/pairs.zip",
            _sha((mirror / "pairs.zip").read_bytes()),
            "pairs/p.txt",
            "pairs.zip",
            "test",
        ),
    )
    monkeypatch.setenv("RNNLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RNNLAB_DATA_MIRROR", str(mirror))
    return Synthetic(mirror, tmp_path / "cache")


def test_fetch_copies_from_the_mirror_into_the_cache_then_uses_the_cache(
    synthetic: Synthetic, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = fetch("tiny")
    assert path == synthetic.cache / "tiny.txt" and path.read_text() == TEXT
    monkeypatch.setenv("RNNLAB_DATA_MIRROR", f"{CLOSED}/gone")  # every source is down now
    assert fetch("tiny") == path
    assert read_text("tiny") == TEXT
    assert sorted(p.name for p in synthetic.cache.iterdir()) == ["tiny.txt"]  # no temporary files


def test_archive_member_is_extracted_into_the_cache(synthetic: Synthetic) -> None:
    path = fetch("pairs")
    assert path == synthetic.cache / "pairs" / "p.txt"
    assert read_text("pairs") == PAIRS
    assert (synthetic.cache / "pairs.zip").is_file()


def test_a_modified_cached_file_is_detected_and_fetched_again(synthetic: Synthetic) -> None:
    fetch("tiny")
    member = fetch("pairs")
    (synthetic.cache / "tiny.txt").write_text("edited by hand")
    member.write_text("edited too")
    assert read_text("tiny") == TEXT
    assert read_text("pairs") == PAIRS


def test_checksum_mismatch_names_file_and_both_digests(synthetic: Synthetic) -> None:
    wrong = b"not the registered file\n"
    (synthetic.mirror / "tiny.txt").write_bytes(wrong)
    with pytest.raises(DatasetError) as caught:
        fetch("tiny")
    message = str(caught.value)
    assert "tiny.txt" in message and REGISTRY["tiny"].sha256 in message and _sha(wrong) in message
    assert "\n" not in message
    assert not synthetic.cache.exists() or list(synthetic.cache.iterdir()) == []  # nothing half-written


def test_no_network_and_no_mirror_says_which_address_failed(
    synthetic: Synthetic, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RNNLAB_DATA_MIRROR")
    with pytest.raises(DatasetError) as caught:
        fetch("tiny")
    message = str(caught.value)
    assert f"{CLOSED}/canonical/tiny.txt" in message and "RNNLAB_DATA_MIRROR" in message
    monkeypatch.setenv("RNNLAB_DATA_MIRROR", f"{CLOSED}/mirror/")
    with pytest.raises(DatasetError, match=r"0\.1:9/mirror/tiny\.txt: .*0\.1:9/canonical/tiny\.txt: "):
        fetch("tiny")
    monkeypatch.setenv("RNNLAB_DATA_MIRROR", str(synthetic.mirror / "empty"))
    with pytest.raises(DatasetError, match=r"empty/tiny\.txt: no such file"):
        fetch("tiny")


@pytest.fixture
def http_mirror(synthetic: Synthetic) -> Iterator[str]:
    """The synthetic mirror folder served over HTTP on 127.0.0.1 (a port the OS picks)."""
    handler = functools.partial(_QuietHandler, directory=str(synthetic.mirror))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_mirror_may_be_a_url_prefix(
    synthetic: Synthetic, http_mirror: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RNNLAB_DATA_MIRROR", http_mirror)
    assert read_text("pairs") == PAIRS
    assert read_text("tiny") == TEXT


def test_unknown_corpus_lists_the_known_ones() -> None:
    with pytest.raises(DatasetError) as caught:
        read_text("wikitext-404")
    message = str(caught.value)
    assert "'wikitext-404'" in message
    assert all(name in message for name in ("timemachine", "tinyshakespeare", "fra-eng"))


def test_any_local_utf8_file_is_a_corpus(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes("caf\u00e9\r\nna\u00efve\n".encode())
    assert read_text(str(path)) == "caf\u00e9\nna\u00efve\n"
    assert read_text(path) == read_text(str(path))


def test_non_utf8_file_names_the_file_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("abc caf\u00e9".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1\.txt: not UTF-8 text \(byte 0xe9 at offset 7\)"):
        read_text(str(path))
    with pytest.raises(DatasetError, match="not a regular file"):
        read_text(str(tmp_path))


def test_describe_lists_every_corpus_and_whether_it_is_cached(synthetic: Synthetic) -> None:
    rows = {row["name"]: row for row in describe()}
    assert {"timemachine", "tinyshakespeare", "fra-eng", "tiny"} <= set(rows)
    assert rows["tiny"]["cached"] is False and rows["tiny"]["path"] is None
    fetch("tiny")
    rows = {row["name"]: row for row in describe()}
    assert rows["tiny"]["cached"] is True and rows["tiny"]["path"] == str(synthetic.cache / "tiny.txt")
    table = format_table(describe())
    assert table.splitlines()[0].split() == ["NAME", "SIZE", "CACHED", "LICENCE", "DESCRIPTION"]
    assert any(line.startswith("fra-eng ") for line in table.splitlines())


def test_registered_corpora_match_their_checksums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real registry entries against the offline mirror (tests/conftest.py points at it)."""
    mirror = os.environ.get("RNNLAB_DATA_MIRROR")
    if not mirror or "://" in mirror or not Path(mirror, "fra-eng.zip").is_file():
        pytest.skip("needs the offline data mirror folder (../shared/data); never downloads in tests")
    monkeypatch.setenv("RNNLAB_CACHE", str(tmp_path))
    assert read_text("timemachine").startswith("The Time Machine, by H. G. Wells")
    pairs = fetch("fra-eng")
    assert pairs == tmp_path / "fra-eng" / "fra.txt"
    with pairs.open(encoding="utf-8") as handle:
        assert handle.readline().split("\t") == ["Go.", "Va !\n"]
    assert datasets.cache_dir() == tmp_path
