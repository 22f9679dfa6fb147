"""The labelling web app (FastAPI on uvicorn): server-rendered pages for people, a JSON API for programs.

Authentication: `POST /login` (a form) or `POST /api/login` (JSON) trades a login token for a session,
kept in an HttpOnly, SameSite=Strict cookie; a program may instead send `Authorization: Bearer TOKEN` with
either the login token or the session token. A cookie-authenticated write must also carry the session's
CSRF token (the forms' hidden `csrf` field, or the `X-CSRF-Token` header); a bearer request cannot be forged
by another site, so it needs none.

Every page and asset is served by the app itself (no CDN), and everything a model wrote is escaped (Jinja's
autoescape): model outputs are untrusted text. `ENDPOINTS` is the access table the README prints and the
security test walks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from rlhflab.label import payloads
from rlhflab.label.store import Forbidden, Store, StoreError, Who, new_key

HERE = Path(__file__).parent
COOKIE = "rlhflab_session"
# bytes; a label is a few hundred, an edited response a few thousand. An admin pushing segment items through
# `POST /api/items` sends their clips inline (a few tens of KB each), so a handful of items per request.
MAX_BODY = 256 * 1024

# (method, path, who may call it): public, user (any signed-in user), member (of the project named in the
# request; admins are members of every project), owner (the annotator the assignment belongs to), admin.
ENDPOINTS: list[tuple[str, str, str]] = [
    ("GET", "/login", "public"),
    ("POST", "/login", "public"),
    ("POST", "/logout", "user"),
    ("GET", "/", "user"),
    ("GET", "/label?project=P", "member"),
    ("POST", "/label/{assignment}", "owner"),
    ("GET", "/static/{file}", "public"),
    ("POST", "/api/login", "public"),
    ("GET", "/api/me", "user"),
    ("GET", "/api/next?project=P", "member"),
    ("GET", "/api/assignments/{assignment}", "owner"),
    ("POST", "/api/labels", "owner"),
    ("GET", "/api/stats?project=P", "admin"),
    ("GET", "/api/export?project=P&format=F", "admin"),
    ("POST", "/api/users", "admin"),
    ("POST", "/api/projects", "admin"),
    ("POST", "/api/projects/{project}/members", "admin"),
    ("POST", "/api/items", "admin"),
]


class HTTPProblem(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class BodyLimit:
    """ASGI middleware: refuse a request body over `limit` bytes with 413, whether it declares its length or
    streams it in chunks, before any handler sees it. The body (at most `limit` bytes) is read here and replayed
    to the app."""

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _too_large(send, self.limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _too_large(send, self.limit)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for a disconnect, as the server would
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _too_large(send, limit: int) -> None:
    body = json.dumps({"error": f"request body over {limit} bytes"}).encode()
    await send(
        {"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})


def create_app(store: Store) -> Any:
    """The ASGI app over `store` (wrapped in the body-size limit)."""
    app = FastAPI(title="rlhflab label", docs_url=None, redoc_url=None)
    pages = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    pages.filters["text"] = _as_text

    def render(name: str, status: int = 200, **context) -> HTMLResponse:
        return HTMLResponse(pages.get_template(name).render(**context), status_code=status)

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, exc: HTTPProblem):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(payloads.LabelInvalid)
    async def _invalid(request: Request, exc: payloads.LabelInvalid):
        return JSONResponse({"error": str(exc), "field": exc.field}, status_code=exc.status)

    _pages(app, store, render)
    _api(app, store)
    _admin_api(app, store)
    return BodyLimit(app)


async def caller(store: Store, request: Request, *, write: bool = False) -> Who:
    """The signed-in user (401 if none); a cookie-authenticated write must carry the CSRF token."""
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPProblem(401, "Authorization must be 'Bearer TOKEN'")
        token = token.strip()
        who = await run_in_threadpool(store.user_by_session, token)
        who = who or await run_in_threadpool(store.user_by_token, token)
        if who is None:
            raise HTTPProblem(401, "invalid or expired token")
        return who
    cookie = request.cookies.get(COOKIE)
    who = await run_in_threadpool(store.user_by_session, cookie) if cookie else None
    if who is None:
        raise HTTPProblem(401, "sign in first: POST /api/login with your token, or send a bearer token")
    if write:
        sent = request.headers.get("x-csrf-token")
        if sent is None and "form" in request.headers.get("content-type", ""):
            sent = (await request.form()).get("csrf")
        if sent != who.csrf:
            raise HTTPProblem(403, "missing or wrong CSRF token")
    return who


def admin(who: Who) -> Who:
    if not who.is_admin:
        raise Forbidden(f"{who.name} is not an admin")
    return who


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPProblem(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise HTTPProblem(400, f"expected a JSON object, got {type(body).__name__}")
    return body


def project_arg(request: Request) -> str:
    project = request.query_params.get("project")
    if not project:
        raise HTTPProblem(400, "name the project: ?project=NAME")
    return project


async def page_caller(store: Store, request: Request) -> Who | Response:
    """The signed-in user, or a redirect to the sign-in page (what a page answers anonymous visitors)."""
    try:
        return await caller(store, request)
    except HTTPProblem:
        return RedirectResponse("/login", status_code=303)


def _pages(app: FastAPI, store: Store, render) -> None:
    """The pages people use: sign-in, their projects, the labelling page and its form, the static assets."""

    @app.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request):
        return render("login.html", error=None)

    @app.post("/login")
    async def login_form(request: Request):
        token = str((await request.form()).get("token", "")).strip()
        who = await run_in_threadpool(store.user_by_token, token) if token else None
        if who is None:
            return render("login.html", 401, error="That token is not valid.")
        session, _ = await run_in_threadpool(store.open_session, who)
        response = RedirectResponse("/", status_code=303)
        _set_cookie(response, session)
        return response

    @app.post("/logout")
    async def logout(request: Request):
        await caller(store, request, write=True)
        await run_in_threadpool(store.close_session, request.cookies.get(COOKIE, ""))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/", response_class=HTMLResponse)
    async def home(request: Request):
        who = await page_caller(store, request)
        if isinstance(who, Response):
            return who
        projects = await run_in_threadpool(store.projects_of, who)
        return render("projects.html", who=who, projects=projects)

    @app.get("/label", response_class=HTMLResponse)
    async def label_page(request: Request):
        who = await page_caller(store, request)
        if isinstance(who, Response):
            return who
        project = project_arg(request)
        view = await run_in_threadpool(store.next_assignment, who, project)
        return await run_in_threadpool(_label_page, who, project, view, None)

    def _label_page(who: Who, project: str, view: dict | None, error: str | None, status: int = 200):
        progress = next((p for p in store.projects_of(who) if p["project"] == project), None)
        return render(
            "label.html",
            status,
            who=who,
            project=project,
            view=view,
            error=error,
            key=new_key(),
            progress=progress,
            strengths=payloads.STRENGTHS,
        )

    @app.post("/label/{assignment_id}")
    async def label_form(assignment_id: int, request: Request):
        who = await caller(store, request, write=True)
        form = await request.form()
        view = await run_in_threadpool(store.assignment_view, who, assignment_id)
        try:
            answer = _answer_from_form(view, form)
            await run_in_threadpool(store.submit_label, who, assignment_id, answer, str(form.get("key", "")))
        except (payloads.LabelInvalid, StoreError) as e:
            page = await run_in_threadpool(_label_page, who, view["project"], view, str(e), e.status)
            return page
        return RedirectResponse(f"/label?project={quote(view['project'])}", status_code=303)

    @app.get("/static/{name}")
    async def static(name: str):
        files = {"label.js": "text/javascript", "label.css": "text/css"}
        if name not in files:
            raise HTTPProblem(404, f"no static file {name!r}")
        return Response((HERE / "static" / name).read_bytes(), media_type=files[name])


def _api(app: FastAPI, store: Store) -> None:
    """The JSON API of annotators (and programs labelling for them), and the admins' read-outs."""

    @app.post("/api/login")
    async def api_login(request: Request):
        token = (await json_body(request)).get("token")
        who = await run_in_threadpool(store.user_by_token, token) if isinstance(token, str) else None
        if who is None:
            raise HTTPProblem(401, "invalid token")
        session, csrf = await run_in_threadpool(store.open_session, who)
        response = JSONResponse({"user": who.name, "admin": who.is_admin, "session": session, "csrf": csrf})
        _set_cookie(response, session)
        return response

    @app.get("/api/me")
    async def api_me(request: Request):
        who = await caller(store, request)
        projects = await run_in_threadpool(store.projects_of, who)
        return {"user": who.name, "admin": who.is_admin, "projects": projects}

    @app.get("/api/next")
    async def api_next(request: Request):
        who = await caller(store, request)
        view = await run_in_threadpool(store.next_assignment, who, project_arg(request))
        return {"item": view}

    @app.get("/api/assignments/{assignment_id}")
    async def api_assignment(assignment_id: int, request: Request):
        who = await caller(store, request)
        return await run_in_threadpool(store.assignment_view, who, assignment_id)

    @app.post("/api/labels")
    async def api_labels(request: Request):
        who = await caller(store, request, write=True)
        body = await json_body(request)
        label, created = await run_in_threadpool(
            store.submit_label, who, body.get("assignment"), body.get("label"), body.get("key")
        )
        return JSONResponse({**label, "created": created}, status_code=201 if created else 200)

    @app.get("/api/stats")
    async def api_stats(request: Request):
        from rlhflab.label.stats import project_stats

        admin(await caller(store, request))
        return await run_in_threadpool(project_stats, store, project_arg(request))

    @app.get("/api/export")
    async def api_export(request: Request):
        from rlhflab.label.export import FORMATS, export_records

        admin(await caller(store, request))
        fmt = request.query_params.get("format", "pairs")
        if fmt not in FORMATS:
            raise HTTPProblem(400, f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        records = await run_in_threadpool(export_records, store, project_arg(request), fmt)
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        return Response(lines, media_type="application/x-ndjson")


def _admin_api(app: FastAPI, store: Store) -> None:
    """The admins' JSON API: users, projects, members, items."""

    @app.post("/api/users")
    async def api_users(request: Request):
        admin(await caller(store, request, write=True))
        body = await json_body(request)
        name = body.get("name")
        if not isinstance(name, str):
            raise HTTPProblem(400, "give the new user's 'name'")
        token = await run_in_threadpool(store.add_user, name, admin=bool(body.get("admin", False)))
        return JSONResponse({"user": name, "token": token}, status_code=201)

    @app.post("/api/projects")
    async def api_projects(request: Request):
        admin(await caller(store, request, write=True))
        body = await json_body(request)
        name, aspects = body.get("name"), body.get("aspects", list(payloads.DEFAULT_ASPECTS))
        if not isinstance(name, str) or not isinstance(aspects, list):
            raise HTTPProblem(400, "give the project's 'name' (and optionally 'aspects', a list of names)")
        await run_in_threadpool(store.add_project, name, [str(a) for a in aspects])
        return JSONResponse({"project": name}, status_code=201)

    @app.post("/api/projects/{project}/members")
    async def api_members(project: str, request: Request):
        admin(await caller(store, request, write=True))
        user = (await json_body(request)).get("user")
        if not isinstance(user, str):
            raise HTTPProblem(400, "give the member's 'user' name")
        await run_in_threadpool(store.add_member, project, user)
        return JSONResponse({"project": project, "user": user}, status_code=201)

    @app.post("/api/items")
    async def api_items(request: Request):
        admin(await caller(store, request, write=True))
        body = await json_body(request)
        project, kind, items = body.get("project"), body.get("kind"), body.get("items")
        if not isinstance(project, str) or not isinstance(items, list):
            raise HTTPProblem(400, "give 'project', 'kind' and 'items' (a list of {prompt, responses})")
        ids = await run_in_threadpool(store.push, project, kind, items, overlap=body.get("overlap", 1))
        return JSONResponse({"items": ids}, status_code=201)


def _set_cookie(response: Response, session: str) -> None:
    response.set_cookie(COOKIE, session, httponly=True, samesite="strict", max_age=7 * 24 * 3600)


def _as_text(value: Any) -> str:
    """A prompt as the page shows it: text as is, a chat as 'role: content' lines (escaped by the template)."""
    if isinstance(value, list):
        return "\n\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in value)
    return str(value)


def _answer_from_form(view: dict, form: Any) -> dict[str, Any]:
    """The JSON-API answer a labelling form stands for (the same rules then apply to both)."""
    kind = view["kind"]
    if kind == "pairwise":
        choice = form.get("preference", "")
        side, _, strength = str(choice).partition(":")
        answer: dict[str, Any] = {"choice": side or None}
        if side in ("A", "B"):
            answer["strength"] = strength or None
        for key in ("safety", "reason", "edited"):
            if form.get(key):
                answer[key] = str(form.get(key))
        return answer
    if kind == "ranking":
        ranks = []
        for response in view["responses"]:
            value = str(form.get(f"rank_{response['position']}", "")).strip()
            if not value.isdigit():
                raise payloads.LabelInvalid(f"give response {response['position']} a rank", "ranks")
            ranks.append(int(value) - 1)  # the form counts from 1
        return {"ranks": ranks}
    if kind == "thumbs":
        return {"thumb": form.get("thumb")}
    if kind == "segment":  # the answer button pressed (its name and value) is the answer
        return {"choice": form.get("choice")}
    ratings = {}
    for aspect in view["aspects"]:
        value = str(form.get(f"rating_{aspect}", ""))
        ratings[aspect] = int(value) if value.isdigit() else value
    return {"ratings": ratings}
