"""PostgreSQL fixtures: one embedded server (pgserver: PostgreSQL 16 + pgvector on a Unix socket) per test
session, and a fresh schema per test, so tests never share an index. Skipped, with the reason, where pgserver,
psycopg or pgvector is missing or the server does not start."""

import shutil
import tempfile
import uuid

import pytest


@pytest.fixture(scope="session")
def postgres_server():
    """The session's pgserver ``PostgresServer`` (its ``get_uri()`` names the Unix socket folder)."""
    for module in ("pgserver", "psycopg", "pgvector.psycopg"):
        pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[test]')")
    import pgserver

    folder = tempfile.mkdtemp(prefix="ctfm-pg-", dir="/tmp")  # short: a socket path has at most 107 bytes
    try:
        server = pgserver.get_server(folder, cleanup_mode="stop")
    except Exception as e:  # noqa: BLE001  (any failure to start means: cannot test here)
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"the embedded PostgreSQL server did not start: {str(e).splitlines()[0] if str(e) else e!r}")
    try:
        yield server
    finally:
        try:
            server.cleanup()
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A ``postgresql://`` URL of the session server with a schema of its own (nothing created yet)."""
    uri = postgres_server.get_uri()
    return f"{uri}{'&' if '?' in uri else '?'}schema=t_{uuid.uuid4().hex[:16]}"
