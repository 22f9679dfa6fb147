"""The web app in-process (Starlette's TestClient), on SQLite and PostgreSQL: the access table, CSRF, bad input,
escaping, and the forms."""

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rlhflab.label.app import ENDPOINTS, MAX_BODY, create_app

from .conftest import seed

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture()
def app_env(store):
    tokens, ids = seed(store, items=4, annotators=("ann", "bob"))
    store.push("p", "ranking", [{"prompt": "rank", "responses": ["x", "y", "z"]}])
    client = TestClient(create_app(store))
    return client, tokens, store


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def label_count(store):
    return store.counts("p")["labels"]


def test_readme_prints_the_access_table():
    text = README.read_text()
    rows = re.findall(r"^\| `(GET|POST) ([^`]+)` \| (\w+) \|", text, flags=re.M)
    assert rows == ENDPOINTS


def _concrete(path: str, assignment: int) -> str:
    return (
        path.replace("{assignment}", str(assignment))
        .replace("{project}", "p")
        .replace("{file}", "label.css")
        .replace("=P", "=p")
        .replace("=F", "=pairs")
    )


def test_access_table_is_enforced(app_env):
    client, tokens, store = app_env
    ann_view = client.get("/api/next?project=p", headers=bearer(tokens["ann"])).json()["item"]
    outsider = store.add_user("eve")
    for method, path, who in ENDPOINTS:
        url = _concrete(path, ann_view["assignment"])

        def send(token=None, method=method, url=url):
            return client.request(
                method,
                url,
                headers=bearer(token) if token else {},
                content=b"{}" if method == "POST" else None,
                follow_redirects=False,
            )

        if (
            who == "public"
        ):  # answered without a session (a login with no token in the body is refused as such)
            response = send()
            assert response.status_code < 400 or "sign in first" not in response.text, (method, path)
            continue
        anonymous = send()
        if path.startswith("/api/") or method == "POST":
            assert anonymous.status_code == 401, (method, path, anonymous.status_code)
        else:  # a page sends people to the sign-in form
            assert anonymous.status_code == 303 and anonymous.headers["location"] == "/login"
        if who == "admin":
            assert send(tokens["ann"]).status_code == 403, (method, path)
            assert send(tokens["boss"]).status_code != 403, (method, path)
        if who == "member":
            assert send(outsider).status_code in (403, 303) or "not a member" in send(outsider).text
        if who == "owner":  # bob asks about ann's assignment
            response = send(tokens["bob"])
            assert response.status_code in (404, 422), (method, path, response.status_code)
    assert label_count(store) == 0


def test_label_through_the_api_with_a_bearer_token(app_env):
    client, tokens, store = app_env
    view = client.get("/api/next?project=p", headers=bearer(tokens["ann"])).json()["item"]
    assert [r["position"] for r in view["responses"]] == ["A", "B"]
    body = {"assignment": view["assignment"], "key": "k-1", "label": {"choice": "A", "strength": "better"}}
    first = client.post("/api/labels", headers=bearer(tokens["ann"]), json=body)
    retry = client.post("/api/labels", headers=bearer(tokens["ann"]), json=body)
    assert (first.status_code, retry.status_code) == (201, 200)
    assert first.json()["id"] == retry.json()["id"] and label_count(store) == 1
    other = client.get("/api/next?project=p", headers=bearer(tokens["ann"])).json()["item"]
    assert other["assignment"] != view["assignment"]


def test_sessions_need_csrf_for_writes(app_env):
    client, tokens, store = app_env
    login = client.post("/api/login", json={"token": tokens["ann"]})
    assert login.status_code == 200 and "rlhflab_session" in login.cookies
    csrf = login.json()["csrf"]
    view = client.get("/api/next?project=p").json()["item"]  # the cookie signs in
    body = {"assignment": view["assignment"], "key": "c-1", "label": {"choice": "tie"}}
    assert client.post("/api/labels", json=body).status_code == 403
    assert client.post("/api/labels", json=body, headers={"X-CSRF-Token": "wrong"}).status_code == 403
    assert label_count(store) == 0
    assert client.post("/api/labels", json=body, headers={"X-CSRF-Token": csrf}).status_code == 201
    # The session token works as a bearer token too (for programs that logged in with /api/login).
    fresh = TestClient(client.app)
    assert fresh.get("/api/me", headers=bearer(login.json()["session"])).json()["user"] == "ann"
    assert client.post("/api/login", json={"token": "nope.nope"}).status_code == 401


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"assignment": 99999, "key": "a", "label": {"choice": "tie"}}, 404, None),
        ({"assignment": "one", "key": "a", "label": {"choice": "tie"}}, 422, "assignment"),
        ({"key": "a", "label": {"choice": "tie"}}, 422, "assignment"),
        ("OWN", 422, "ranks"),  # a ranking label on a pairwise item: the wrong kind
        ("RANK", 422, "ranks"),  # a ranking that is not a permutation
        ("NOKEY", 422, "key"),
    ],
)
def test_bad_labels_get_4xx_and_write_nothing(app_env, body, status, field):
    client, tokens, store = app_env
    view = client.get("/api/next?project=p", headers=bearer(tokens["ann"])).json()["item"]
    if body == "OWN":
        body = {"assignment": view["assignment"], "key": "a", "label": {"ranks": [0, 1]}}
    elif body == "RANK":
        boss = bearer(tokens["boss"])
        # The boss labels the pairwise items ann has not taken, so the ranking comes next.
        while (rank_view := client.get("/api/next?project=p", headers=boss).json()["item"])[
            "kind"
        ] != "ranking":
            answer = {"assignment": rank_view["assignment"], "key": f"b{rank_view['assignment']}"}
            answer["label"] = {"choice": "tie"}
            assert client.post("/api/labels", headers=boss, json=answer).status_code == 201
        before = label_count(store)
        answer = {"assignment": rank_view["assignment"], "key": "r", "label": {"ranks": [0, 0, 2]}}
        r = client.post("/api/labels", headers=boss, json=answer)
        assert r.status_code == 422 and r.json()["field"] == "ranks" and label_count(store) == before
        return
    elif body == "NOKEY":
        body = {"assignment": view["assignment"], "label": {"choice": "tie"}}
    r = client.post("/api/labels", headers=bearer(tokens["ann"]), json=body)
    assert r.status_code == status, r.text
    if field:
        assert r.json()["field"] == field
    assert "error" in r.json() and label_count(store) == 0


def test_malformed_and_oversized_bodies(app_env):
    client, tokens, store = app_env
    h = {**bearer(tokens["ann"]), "content-type": "application/json"}
    r = client.post("/api/labels", headers=h, content=b'{"assignment": 1,')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.post("/api/labels", headers=h, content=b"[1, 2]")
    assert r.status_code == 400 and "JSON object" in r.json()["error"]
    big = json.dumps({"assignment": 1, "key": "x", "label": {"choice": "tie", "reason": "x" * MAX_BODY}})
    r = client.post("/api/labels", headers=h, content=big.encode())
    assert r.status_code == 413

    def chunks():  # no Content-Length: the limit must hold while streaming too
        for _ in range(MAX_BODY // 1000 + 2):
            yield b" " * 1000

    r = client.post("/api/labels", headers=h, content=chunks())
    assert r.status_code == 413 and label_count(store) == 0


def test_pages_escape_model_output_and_forms_store_labels(store):
    store.add_project("p")
    token = store.add_user("ann")
    store.add_member("p", "ann")
    evil = "<script>alert('x')</script><img src=x onerror=alert(1)>"
    store.push("p", "pairwise", [{"prompt": "<b>hi</b>", "responses": [evil, "fine"]}])
    client = TestClient(create_app(store))
    assert client.get("/", follow_redirects=False).headers["location"] == "/login"
    assert client.post("/login", data={"token": "bad.token"}).status_code == 401
    r = client.post("/login", data={"token": token}, follow_redirects=False)
    assert r.status_code == 303
    page = client.get("/label?project=p").text
    assert "<script>alert" not in page and "&lt;script&gt;alert" in page and "&lt;b&gt;hi&lt;/b&gt;" in page
    assert "<img src=x" not in page
    assignment = re.search(r'action="/label/(\d+)"', page).group(1)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    key = re.search(r'name="key" value="([^"]+)"', page).group(1)
    form = {"csrf": csrf, "key": key, "preference": "B:slightly_better", "safety": "both"}
    assert client.post(f"/label/{assignment}", data={**form, "csrf": "forged"}).status_code == 403
    r = client.post(f"/label/{assignment}", data={**form, "preference": ""})
    assert r.status_code == 422 and "choice" in r.text  # the page again, with the problem named
    r = client.post(f"/label/{assignment}", data=form, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/label?project=p"
    client.post(f"/label/{assignment}", data=form)  # a double submit: the same key, one label
    rows = store.labelled("p")
    assert len(rows) == 1 and rows[0]["payload"]["strength"] == "slightly_better"
    assert "All done" in client.get("/label?project=p").text
    for name in ("label.js", "label.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/static/../db.py").status_code == 404


def test_ranking_form_counts_ranks_from_one(store):
    store.add_project("p")
    token = store.add_user("ann")
    store.add_member("p", "ann")
    store.push("p", "ranking", [{"prompt": "q", "responses": ["r0", "r1", "r2"]}])
    client = TestClient(create_app(store))
    client.post("/login", data={"token": token})
    page = client.get("/label?project=p").text
    shown = re.findall(
        r'<div class="response" data-position="([A-C])"[^>]*>\s*<h3>[^<]*<span[^>]*></span></h3>\s*<pre>([^<]*)</pre>',
        page,
    )
    assert sorted(text for _, text in shown) == ["r0", "r1", "r2"]
    assignment = re.search(r'action="/label/(\d+)"', page).group(1)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    form = {"csrf": csrf, "key": "k", "rank_A": "2", "rank_B": "1", "rank_C": "2"}  # B best, A and C tied
    assert client.post(f"/label/{assignment}", data=form, follow_redirects=False).status_code == 303
    ranks = store.labelled("p")[0]["payload"]["ranks"]
    by_text = {text: ranks[int(text[1])] for _, text in shown}
    assert by_text == {text: {"A": 1, "B": 0, "C": 1}[pos] for pos, text in shown}


def test_body_limit_replays_the_body_once_then_passes_receive_through():
    import asyncio

    from rlhflab.label.app import BodyLimit

    seen = []

    async def app(scope, receive, send):
        seen.append(await receive())
        seen.append(await receive())  # what a server says after the body: the client went away

    incoming = [
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"c", "more_body": False},
        {"type": "http.disconnect"},
    ]

    async def receive():
        return incoming.pop(0)

    async def send(message):
        raise AssertionError(f"nothing should be sent, got {message}")

    asyncio.run(BodyLimit(app, limit=10)({"type": "http", "headers": []}, receive, send))
    assert seen == [{"type": "http.request", "body": b"abc", "more_body": False}, {"type": "http.disconnect"}]
