"""Load against the real server process: 50 concurrent clients submit 1,000 labels; every acknowledged label is
stored exactly once, retries by idempotency key store nothing new, and a kill -9 of the server in the middle
loses no acknowledged label and leaves nothing half-written. Each on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid

import httpx
from sqlalchemy import func, select, text

from rlhflab.label.db import Label, make_engine
from rlhflab.label.store import Store

from .conftest import free_port, start_server, stop_server

CLIENTS, LABELS = 50, 1000


def _setup(url: str) -> dict[str, str]:
    """Project "load" with LABELS pairwise items (one annotator each) and CLIENTS annotators: their tokens."""
    store = Store(url)
    store.add_project("load")
    tokens = {}
    for i in range(CLIENTS):
        tokens[f"a{i}"] = store.add_user(f"a{i}")
        store.add_member("load", f"a{i}")
    items = [{"prompt": f"prompt {i}", "responses": [f"x{i}", f"y{i}"]} for i in range(LABELS)]
    store.push("load", "pairwise", items)
    store.close()
    return tokens


class Client(threading.Thread):
    """One annotator labelling through the API until nothing is left; it survives a server outage by
    retrying the same request (same idempotency key) until the server answers."""

    def __init__(self, base: str, token: str, seed: int, outage_s: float = 60.0):
        super().__init__(daemon=True)
        self.base, self.token, self.rng, self.outage_s = base, token, random.Random(seed), outage_s
        self.acked: dict[str, int] = {}  # idempotency key -> label id, for every 201/200 answer
        self.duplicates_ok = 0
        self.error: BaseException | None = None

    def call(self, method: str, path: str, **kw) -> httpx.Response:
        deadline = time.monotonic() + self.outage_s
        while True:
            try:
                return self.http.request(method, path, **kw)
            except httpx.TransportError:  # the server is down (killed): retry until it is back
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.base, timeout=30) as self.http:
                session = self.call("POST", "/api/login", json={"token": self.token}).json()["session"]
                self.http.headers["Authorization"] = f"Bearer {session}"
                while True:
                    item = self.call("GET", "/api/next", params={"project": "load"}).json()["item"]
                    if item is None:
                        return
                    self.label(item["assignment"])
        except BaseException as e:  # reported by the test
            self.error = e

    def label(self, assignment: int) -> None:
        key = uuid.uuid4().hex
        choice = self.rng.choice(["A", "B"])
        body = {"assignment": assignment, "key": key, "label": {"choice": choice, "strength": "better"}}
        r = self.call("POST", "/api/labels", json=body)
        assert r.status_code in (200, 201), r.text  # 200: stored before a crash, the ack lost with it
        self.acked[key] = r.json()["id"]
        if self.rng.random() < 0.1:  # a client that retries an acknowledged request
            again = self.call("POST", "/api/labels", json=body)
            assert again.status_code == 200 and again.json()["id"] == r.json()["id"], again.text
            self.duplicates_ok += 1


def _run_clients(base: str, tokens: dict[str, str]) -> list[Client]:
    clients = [Client(base, token, i) for i, token in enumerate(tokens.values())]
    for c in clients:
        c.start()
    return clients


def _check_db(url: str, clients: list[Client]) -> None:
    acked = {key: label_id for c in clients for key, label_id in c.acked.items()}
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(select(Label.idempotency_key, Label.id, Label.payload)).all()
        per_item = conn.execute(select(Label.item_id, func.count()).group_by(Label.item_id)).all()
        if url.startswith("sqlite"):
            assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
    engine.dispose()
    stored = {key: label_id for key, label_id, _ in rows}
    assert len(rows) == len(stored) == LABELS  # one label per item, no key twice
    assert all(n == 1 for _, n in per_item) and len(per_item) == LABELS
    assert {k: stored.get(k) for k in acked} == acked  # every acknowledged label, under its id
    assert all(p["preferred"] in (0, 1) and p["strength"] == "better" for *_, p in rows)  # whole payloads


def test_fifty_clients_thousand_labels(db_url, tmp_path):
    tokens = _setup(db_url)
    port = free_port()
    server = start_server(db_url, port, tmp_path / "server.log")
    try:
        started = time.monotonic()
        clients = _run_clients(f"http://127.0.0.1:{port}", tokens)
        for c in clients:
            c.join(180)
        seconds = time.monotonic() - started
    finally:
        stop_server(server)
    errors = [c.error for c in clients if c.error is not None]
    assert not errors, errors[0]
    assert sum(len(c.acked) for c in clients) == LABELS
    assert sum(c.duplicates_ok for c in clients) > 0
    _check_db(db_url, clients)
    print(f"{LABELS} labels from {CLIENTS} clients in {seconds:.1f} s")


def test_kill_9_in_the_middle_loses_no_acknowledged_label(db_url, tmp_path):
    tokens = _setup(db_url)
    port = free_port()
    log = tmp_path / "server.log"
    server = start_server(db_url, port, log)
    try:
        clients = _run_clients(f"http://127.0.0.1:{port}", tokens)
        while sum(len(c.acked) for c in clients) < LABELS // 3:
            time.sleep(0.02)
        os.kill(server.pid, signal.SIGKILL)  # no shutdown, no flush: whatever was committed must be there
        server.wait()
        at_kill = sum(len(c.acked) for c in clients)
        time.sleep(1.0)  # clients meet a dead server and keep retrying
        server = start_server(db_url, port, log)
        for c in clients:
            c.join(180)
    finally:
        stop_server(server)
    errors = [c.error for c in clients if c.error is not None]
    assert not errors, errors[0]
    assert LABELS // 3 <= at_kill < LABELS
    _check_db(db_url, clients)
