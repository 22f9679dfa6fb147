"""Databases for the labelling app's tests: a fresh SQLite file, and a fresh PostgreSQL database per test.

PostgreSQL comes from $RLHFLAB_TEST_PG_URL (a role that may CREATE DATABASE; `.ci/services.sh` starts one and
prints the URL). Without it the PostgreSQL cases are skipped, except under CI, where they must run.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from rlhflab.label.db import init_db

PG_URL = os.environ.get("RLHFLAB_TEST_PG_URL", "")


def _pg_database():
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    if not PG_URL:
        if os.environ.get("CI"):
            pytest.fail("CI must test PostgreSQL: run .ci/services.sh and export RLHFLAB_TEST_PG_URL")
        pytest.skip("no PostgreSQL: run .ci/services.sh and export RLHFLAB_TEST_PG_URL")
    admin_url = make_url(PG_URL).set(drivername="postgresql+psycopg")
    name = f"rlhflab_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    return url, admin, name


@pytest.fixture(autouse=True)
def cheap_argon2(monkeypatch):
    """argon2 with small parameters in-process (the default costs ~0.15 s a hash by design); servers started as
    subprocesses keep the defaults."""
    from argon2 import PasswordHasher

    import rlhflab.label.store as store_module

    monkeypatch.setattr(
        store_module, "PASSWORD_HASHER", PasswordHasher(time_cost=1, memory_cost=256, parallelism=1)
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """The URL of an empty, initialized labelling database of each kind."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'labels.db'}"
        init_db(url)
        yield url
        return
    url, admin, name = _pg_database()
    init_db(url)
    yield url
    from sqlalchemy import text

    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture()
def sqlite_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'labels.db'}"
    init_db(url)
    return url


@pytest.fixture()
def store(db_url):
    from rlhflab.label.store import Store

    s = Store(db_url)
    yield s
    s.close()


def seed(store, *, items: int = 3, kind: str = "pairwise", overlap: int = 1, annotators=("ann",)):
    """An admin, annotators who are members of project "p", and `items` items: (tokens by name, item ids)."""
    tokens = {"boss": store.add_user("boss", admin=True)}
    store.add_project("p")
    for name in annotators:
        tokens[name] = store.add_user(name)
        store.add_member("p", name)
    k = {"pairwise": 2, "ranking": 3}.get(kind, 1)
    rows = [{"prompt": f"prompt {i}", "responses": [f"r{i}.{j}" for j in range(k)]} for i in range(items)]
    return tokens, store.push("p", kind, rows, overlap=overlap)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(url: str, port: int, log_path=None):
    """`rlhflab label serve` as a real process on 127.0.0.1:port, once it answers; the caller stops it."""
    import subprocess
    import sys
    import time

    import httpx

    import rlhflab

    command = [sys.executable, "-m", "rlhflab.cli", "label", "serve", "--db", url, "--port", str(port)]
    # The server runs the very code this test imports (a copy of src/ under test included).
    src = str(Path(rlhflab.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    if log_path:
        with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(command, stdout=log, stderr=log, env=env)
    else:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            told = Path(log_path).read_text() if log_path else ""
            raise RuntimeError(f"the server exited with code {proc.returncode}\n{told}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/login", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not answer within 30 s")


def stop_server(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except Exception:
            proc.kill()
            proc.wait()
