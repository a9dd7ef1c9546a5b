"""Where an index lives (CTFMLib.retrieval.backends): a folder, a postgresql:// URL, or env:NAME naming one."""

from pathlib import Path

import pytest

from CTFMLib.retrieval import backends


def test_a_folder_and_a_url_are_told_apart(tmp_path):
    assert backends.resolve(str(tmp_path)) == tmp_path
    assert backends.resolve("~/index") == Path.home() / "index"
    url = "postgresql://reader@db.hospital.org:5432/pacs?schema=ctfm"
    assert backends.resolve(url) == url and backends.is_database(url)
    assert backends.is_database("POSTGRES://x@y/z")
    assert not backends.is_database(str(tmp_path)) and not backends.is_database(tmp_path)


def test_env_names_the_variable_that_holds_the_url(monkeypatch):
    monkeypatch.setenv("CTFM_INDEX_URL", " postgresql://reader@db/pacs ")
    assert backends.resolve("env:CTFM_INDEX_URL") == "postgresql://reader@db/pacs"
    monkeypatch.delenv("CTFM_INDEX_URL")
    with pytest.raises(ValueError, match="CTFM_INDEX_URL is not set") as e:
        backends.resolve("env:CTFM_INDEX_URL")
    assert "\n" not in str(e.value)


def test_a_password_is_never_shown():
    shown = backends.display("postgresql://alice:s3cr%40t@db:5432/pacs?schema=lung")
    assert shown == "postgresql://alice@db:5432/pacs?schema=lung"
    assert "s3cr" not in shown
    assert backends.display("postgresql://alice@db/pacs") == "postgresql://alice@db/pacs"
    assert backends.display("/data/index") == "/data/index"


def test_a_folder_exists_only_once_its_database_holds_something(tmp_path):
    assert not backends.exists(tmp_path / "new")
    (tmp_path / "index.sqlite").write_bytes(b"")  # a creator that died before filling it
    assert not backends.exists(tmp_path)
    (tmp_path / "index.sqlite").write_bytes(b"SQLite format 3\x00")
    assert backends.exists(tmp_path)
