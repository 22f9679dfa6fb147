"""Every read and write of the labelling database, each in one transaction: what the app and the CLI call.

Errors a client can cause raise `StoreError` subclasses that carry the HTTP status the app answers with
(NotFound 404, Forbidden 403, Conflict 409, `payloads.LabelInvalid` 422), and write nothing.

Handing out work (`next_assignment`): an annotator first gets back any item assigned to them and not yet
labelled (a reload shows the same item), else claims the oldest item of the project that still has a free
slot (fewer than `overlap` assignments) and that they have not seen. The slot number is part of a unique key,
so two annotators racing for the last slot cannot both win: the loser's insert fails and it tries the next
item. The responses get a fresh random order per assignment, recorded, so position bias can be measured.
With a lease (`lease_minutes`, `rlhflab label serve --lease-minutes`), an assignment left unlabelled that long
is dropped and its slot handed to the next annotator who asks.

Submitting (`submit_label`) is idempotent under the client's key: the same (user, key) returns the label
stored the first time, whatever the body; a second, different label for one assignment is a conflict.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import secrets
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from rlhflab.errors import UserError
from rlhflab.label import payloads
from rlhflab.label.db import (
    KINDS,
    Assignment,
    Item,
    Label,
    Member,
    Project,
    Session,
    User,
    check_schema,
    make_engine,
    utcnow,
)

SESSION_DAYS = 7
# argon2id with the library's defaults (RFC 9106's second recommendation); tests swap in cheaper parameters.
PASSWORD_HASHER = None
MAX_KEY = 100
_CLAIM_TRIES = 20


class StoreError(UserError):
    status = 400


class NotFound(StoreError):
    status = 404


class Forbidden(StoreError):
    status = 403


class Conflict(StoreError):
    status = 409


def _hasher():
    global PASSWORD_HASHER
    if PASSWORD_HASHER is None:
        from argon2 import PasswordHasher

        PASSWORD_HASHER = PasswordHasher()
    return PASSWORD_HASHER


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Who:
    """The caller of a request, as the app's handlers see it."""

    id: int
    name: str
    is_admin: bool
    csrf: str | None = None  # the session's CSRF token (cookie sessions only)


class Store:
    """The database behind one URL. Thread-safe: each call opens its own session."""

    def __init__(self, url: str, *, check: bool = True, lease_minutes: float = 0):
        self.url, self.lease_minutes = url, lease_minutes
        self.engine = make_engine(url)
        if check:
            check_schema(self.engine, url)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        # sha256(login token) -> (user id, argon2 hash it was verified against): argon2 is slow on purpose, so
        # a bearer token is verified once per process, and again if the user's token changes.
        self._verified: dict[str, tuple[int, str]] = {}
        self._verified_lock = threading.Lock()

    @contextmanager
    def tx(self) -> Iterator[Any]:
        with self._session() as s, s.begin():
            yield s

    def close(self) -> None:
        self.engine.dispose()

    # ---- users, tokens, sessions -------------------------------------------------------------------------

    def add_user(self, name: str, *, admin: bool = False, rotate: bool = False) -> str:
        """Create user `name` (or give an existing one a new token with rotate=True); returns the login token,
        shown once: only its argon2 hash is stored."""
        name = name.strip()
        if not name or len(name) > 100:
            raise StoreError("a user name must be 1 to 100 characters")
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(24)
        token_hash = _hasher().hash(secret)
        with self.tx() as s:
            user = s.scalar(select(User).where(User.name == name))
            if user is not None and not rotate:
                raise Conflict(f"user {name!r} exists; pass --rotate to give them a new token")
            if user is None:
                user = User(name=name, is_admin=admin, token_id=token_id, token_hash=token_hash)
                s.add(user)
            else:
                user.token_id, user.token_hash, user.is_admin = token_id, token_hash, admin or user.is_admin
                s.query(Session).filter(Session.user_id == user.id).delete()
        return f"{token_id}.{secret}"

    def user_by_token(self, token: str) -> Who | None:
        """The user whose login token this is, or None."""
        from argon2.exceptions import InvalidHashError, VerificationError

        token_id, _, secret = token.partition(".")
        if not token_id or not secret:
            return None
        with self.tx() as s:
            user = s.scalar(select(User).where(User.token_id == token_id))
        if user is None:
            return None
        key = _sha256(token)
        with self._verified_lock:
            known = self._verified.get(key)
        if known != (user.id, user.token_hash):
            try:
                _hasher().verify(user.token_hash, secret)
            except (VerificationError, InvalidHashError):
                return None
            with self._verified_lock:
                self._verified[key] = (user.id, user.token_hash)
        return Who(user.id, user.name, user.is_admin)

    def open_session(self, user: Who) -> tuple[str, str]:
        """A new session for `user`: (session token, CSRF token)."""
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        expires = utcnow() + dt.timedelta(days=SESSION_DAYS)
        with self.tx() as s:
            s.add(Session(token_sha256=_sha256(token), user_id=user.id, csrf=csrf, expires_at=expires))
        return token, csrf

    def user_by_session(self, token: str) -> Who | None:
        with self.tx() as s:
            row = s.execute(
                select(User, Session.csrf)
                .join(Session, Session.user_id == User.id)
                .where(Session.token_sha256 == _sha256(token), Session.expires_at > utcnow())
            ).first()
        return None if row is None else Who(row[0].id, row[0].name, row[0].is_admin, row[1])

    def close_session(self, token: str) -> None:
        with self.tx() as s:
            s.query(Session).filter(Session.token_sha256 == _sha256(token)).delete()

    # ---- projects ----------------------------------------------------------------------------------------

    def add_project(self, name: str, aspects: Sequence[str] = payloads.DEFAULT_ASPECTS) -> None:
        name = name.strip()
        if not name or len(name) > 100:
            raise StoreError("a project name must be 1 to 100 characters")
        aspects = [a.strip() for a in aspects if a.strip()]
        if not aspects:
            raise StoreError("a project needs at least one rating aspect")
        with self.tx() as s:
            if s.scalar(select(Project).where(Project.name == name)) is not None:
                raise Conflict(f"project {name!r} exists")
            s.add(Project(name=name, aspects=aspects))

    def _project(self, s, name: str) -> Project:
        project = s.scalar(select(Project).where(Project.name == name))
        if project is None:
            raise NotFound(f"no project {name!r}")
        return project

    def add_member(self, project: str, user: str) -> None:
        with self.tx() as s:
            p = self._project(s, project)
            u = s.scalar(select(User).where(User.name == user))
            if u is None:
                raise NotFound(f"no user {user!r}; create them with `rlhflab label add-user {user}`")
            if s.get(Member, (p.id, u.id)) is None:
                s.add(Member(project_id=p.id, user_id=u.id))

    def _require_member(self, s, who: Who, project: Project) -> None:
        if not who.is_admin and s.get(Member, (project.id, who.id)) is None:
            raise Forbidden(f"{who.name} is not a member of project {project.name!r}")

    def projects_of(self, who: Who) -> list[dict[str, Any]]:
        """The projects `who` may label, each with their progress: labelled by them, and still open to them."""
        with self.tx() as s:
            query = select(Project).order_by(Project.name)
            if not who.is_admin:
                query = query.join(Member, Member.project_id == Project.id).where(Member.user_id == who.id)
            return [self._progress(s, who, p) for p in s.scalars(query)]

    def _progress(self, s, who: Who, project: Project) -> dict[str, Any]:
        done = s.scalar(
            select(func.count(Label.id))
            .join(Item, Item.id == Label.item_id)
            .where(Item.project_id == project.id, Label.user_id == who.id)
        )
        return {"project": project.name, "labelled": done, "open": self._open_count(s, who, project)}

    def _open_count(self, s, who: Who, project: Project) -> int:
        taken = select(func.count(Assignment.id)).where(Assignment.item_id == Item.id).scalar_subquery()
        mine = select(Assignment.id).where(Assignment.item_id == Item.id, Assignment.user_id == who.id)
        unclaimed = s.scalar(
            select(func.count(Item.id)).where(
                Item.project_id == project.id, ~Item.withdrawn, taken < Item.overlap, ~mine.exists()
            )
        )
        return unclaimed + len(self._open_assignments(s, who, project))

    # ---- items -------------------------------------------------------------------------------------------

    def push(
        self,
        project: str,
        kind: str,
        items: Sequence[dict[str, Any]],
        *,
        overlap: int = 1,
        batch: str | None = None,
    ) -> list[int]:
        """Queue items ({"prompt", "responses", optional "gold", "meta"}) of one kind; returns their ids."""
        if kind not in KINDS:
            raise StoreError(f"unknown item kind {kind!r}; expected one of {', '.join(KINDS)}")
        if not isinstance(overlap, int) or overlap < 1:
            raise StoreError(f"overlap must be an integer >= 1, got {overlap!r}")
        rows = []
        for i, it in enumerate(items):
            where = f"item {i}"
            if not isinstance(it, dict) or not isinstance(it.get("prompt"), (str, list)):
                raise StoreError(f"{where}: expected an object with a 'prompt' (text or messages)")
            payloads.check_item(kind, it.get("responses"), where)
            if any(not isinstance(r, str) for r in it["responses"]):
                raise StoreError(f"{where}: every response must be text")
            gold = it.get("gold")
            if gold is not None:
                gold = payloads.normalize(kind, gold, list(range(len(it["responses"]))))
            rows.append(
                Item(
                    kind=kind,
                    prompt=it["prompt"],
                    responses=list(it["responses"]),
                    overlap=overlap,
                    gold=gold,
                    meta=dict(it.get("meta") or {}),
                    batch=batch,
                    withdrawn=False,
                )
            )
        with self.tx() as s:
            p = self._project(s, project)
            for row in rows:
                row.project_id = p.id
            s.add_all(rows)
            s.flush()
            return [row.id for row in rows]

    def withdraw(self, batch: str) -> int:
        """Stop handing out the items of `batch` (labels already given stay); returns how many were open."""
        with self.tx() as s:
            items = s.scalars(select(Item).where(Item.batch == batch, ~Item.withdrawn)).all()
            for item in items:
                item.withdrawn = True
            return len(items)

    def _open_assignments(self, s, who: Who, project: Project) -> list[Assignment]:
        labelled = select(Label.id).where(Label.assignment_id == Assignment.id)
        return list(
            s.scalars(
                select(Assignment)
                .join(Item, Item.id == Assignment.item_id)
                .where(
                    Assignment.user_id == who.id,
                    Item.project_id == project.id,
                    ~Item.withdrawn,
                    ~labelled.exists(),
                )
                .order_by(Assignment.id)
            )
        )

    def next_assignment(self, who: Who, project: str, rng: random.Random | None = None) -> dict | None:
        """The next item for `who` in `project` (see the module docstring), as `view` shows it; None when
        nothing is left for them."""
        rng = rng or random.SystemRandom()
        for _ in range(_CLAIM_TRIES):
            try:
                with self.tx() as s:
                    p = self._project(s, project)
                    self._require_member(s, who, p)
                    self._expire(s, p)
                    mine = self._open_assignments(s, who, p)
                    if mine:
                        return self._view(s.get(Item, mine[0].item_id), mine[0], p)
                    item = self._claimable(s, who, p)
                    if item is None:
                        return None
                    used = set(s.scalars(select(Assignment.slot).where(Assignment.item_id == item.id)))
                    free = [k for k in range(item.overlap) if k not in used]
                    if not free:  # filled since our query's snapshot (PostgreSQL): look again
                        continue
                    slot = free[0]  # a slot an expired assignment left is taken again
                    order = list(range(len(item.responses)))
                    rng.shuffle(order)
                    a = Assignment(item_id=item.id, user_id=who.id, slot=slot, shown_order=order)
                    s.add(a)
                    s.flush()
                    return self._view(item, a, p)
            except IntegrityError:
                continue  # another annotator took that slot at the same moment: try again
        raise Conflict("too many annotators are claiming items at once; retry")

    def _expire(self, s, project: Project) -> int:
        """Free the slots of assignments left unlabelled for longer than the lease (an annotator who took an
        item and went away must not hold it forever); their annotator's late submission then gets 404."""
        if not self.lease_minutes:
            return 0
        cutoff = utcnow() - dt.timedelta(minutes=self.lease_minutes)
        labelled = select(Label.id).where(Label.assignment_id == Assignment.id)
        stale = s.scalars(
            select(Assignment.id)
            .join(Item, Item.id == Assignment.item_id)
            .where(Item.project_id == project.id, Assignment.created_at < cutoff, ~labelled.exists())
        ).all()
        if stale:
            s.execute(delete(Assignment).where(Assignment.id.in_(stale)))
        return len(stale)

    def _claimable(self, s, who: Who, project: Project) -> Item | None:
        taken = select(func.count(Assignment.id)).where(Assignment.item_id == Item.id).scalar_subquery()
        mine = select(Assignment.id).where(Assignment.item_id == Item.id, Assignment.user_id == who.id)
        # PostgreSQL: lock the row, skipping rows other claimers hold, so concurrent annotators spread over the
        # queue instead of all racing for its head (SQLite ignores this; its writers queue anyway).
        return s.scalar(
            select(Item)
            .where(Item.project_id == project.id, ~Item.withdrawn, taken < Item.overlap, ~mine.exists())
            .order_by(Item.id)
            .limit(1)
            .with_for_update(skip_locked=True, of=Item)
        )

    @staticmethod
    def _view(item: Item, a: Assignment, project: Project) -> dict[str, Any]:
        letters = payloads.positions(len(a.shown_order))
        return {
            "assignment": a.id,
            "project": project.name,
            "kind": item.kind,
            "prompt": item.prompt,
            "responses": [
                {"position": letter, "text": item.responses[i]} for letter, i in zip(letters, a.shown_order)
            ],
            "aspects": list(project.aspects) if item.kind == "ratings" else None,
        }

    def assignment_view(self, who: Who, assignment_id: int) -> dict[str, Any]:
        with self.tx() as s:
            a = s.get(Assignment, assignment_id)
            if a is None or a.user_id != who.id:
                raise NotFound(f"no assignment {assignment_id} of yours")
            item = s.get(Item, a.item_id)
            return self._view(item, a, s.get(Project, item.project_id))

    # ---- labels ------------------------------------------------------------------------------------------

    def submit_label(self, who: Who, assignment_id: Any, answer: Any, key: Any) -> tuple[dict, bool]:
        """Store `who`'s answer to one of their assignments under the idempotency `key`. Returns (the stored
        label as `label_view` shows it, created); a repeated key returns the first label and created=False."""
        if isinstance(assignment_id, bool) or not isinstance(assignment_id, int):
            raise payloads.LabelInvalid(
                f"expected an assignment id (integer), got {assignment_id!r}", "assignment"
            )
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY:
            raise payloads.LabelInvalid(f"expected an idempotency key of 1 to {MAX_KEY} characters", "key")
        for _ in range(2):
            try:
                with self.tx() as s:
                    earlier = self._by_key(s, who, key)
                    if earlier is not None:
                        return self._same_key(earlier, assignment_id, key), False
                    a = s.get(Assignment, assignment_id)
                    if a is None or a.user_id != who.id:
                        raise NotFound(f"no assignment {assignment_id} of yours")
                    if s.scalar(select(Label.id).where(Label.assignment_id == a.id)) is not None:
                        raise Conflict(f"assignment {assignment_id} is already labelled (under another key)")
                    item = s.get(Item, a.item_id)
                    aspects = s.get(Project, item.project_id).aspects
                    payload = payloads.normalize(item.kind, answer, list(a.shown_order), aspects)
                    now = utcnow()
                    label = Label(
                        assignment_id=a.id,
                        item_id=item.id,
                        user_id=who.id,
                        idempotency_key=key,
                        payload=payload,
                        seconds=(now - a.created_at).total_seconds(),
                        created_at=now,
                    )
                    s.add(label)
                    s.flush()
                    return self._label_view(label), True
            except IntegrityError:
                continue  # the same key (or assignment) committed by a concurrent retry: answer as it did
        raise Conflict(f"assignment {assignment_id} was labelled concurrently under another key")

    @staticmethod
    def _by_key(s, who: Who, key: str) -> Label | None:
        return s.scalar(select(Label).where(Label.user_id == who.id, Label.idempotency_key == key))

    def _same_key(self, earlier: Label, assignment_id: int, key: str) -> dict:
        if earlier.assignment_id != assignment_id:
            raise Conflict(f"key {key!r} was already used for assignment {earlier.assignment_id}")
        return self._label_view(earlier)

    @staticmethod
    def _label_view(label: Label) -> dict[str, Any]:
        return {
            "id": label.id,
            "assignment": label.assignment_id,
            "item": label.item_id,
            "key": label.idempotency_key,
            "label": label.payload,
        }

    # ---- reading labels back -----------------------------------------------------------------------------

    def labelled(self, project: str, kinds: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Every label of `project` with its item and annotator, oldest first (for stats and export)."""
        with self.tx() as s:
            p = self._project(s, project)
            query = (
                select(Label, Item, User.name, Assignment.shown_order)
                .join(Item, Item.id == Label.item_id)
                .join(User, User.id == Label.user_id)
                .join(Assignment, Assignment.id == Label.assignment_id)
                .where(Item.project_id == p.id)
                .order_by(Label.id)
            )
            if kinds:
                query = query.where(Item.kind.in_(list(kinds)))
            return [
                {
                    "label_id": label.id,
                    "item_id": item.id,
                    "kind": item.kind,
                    "prompt": item.prompt,
                    "responses": item.responses,
                    "gold": item.gold,
                    "meta": item.meta,
                    "annotator": name,
                    "payload": label.payload,
                    "shown_order": shown,
                    "seconds": label.seconds,
                    "created_at": label.created_at,
                }
                for label, item, name, shown in s.execute(query)
            ]

    def counts(self, project: str) -> dict[str, int]:
        with self.tx() as s:
            p = self._project(s, project)
            items = s.scalar(select(func.count(Item.id)).where(Item.project_id == p.id))
            assigned = s.scalar(
                select(func.count(Assignment.id))
                .join(Item, Item.id == Assignment.item_id)
                .where(Item.project_id == p.id)
            )
            labels = s.scalar(
                select(func.count(Label.id))
                .join(Item, Item.id == Label.item_id)
                .where(Item.project_id == p.id)
            )
            members = s.scalar(select(func.count()).select_from(Member).where(Member.project_id == p.id))
        return {"items": items, "assignments": assigned, "labels": labels, "members": members}

    def batch_labels(self, batch: str) -> dict[int, list[dict]]:
        """item id -> the payloads labelled so far, for every item of `batch` (the feedback source's poll)."""
        with self.tx() as s:
            ids = s.scalars(select(Item.id).where(Item.batch == batch).order_by(Item.id)).all()
            out: dict[int, list[dict]] = {i: [] for i in ids}
            for item_id, payload in s.execute(
                select(Label.item_id, Label.payload)
                .join(Item, Item.id == Label.item_id)
                .where(Item.batch == batch)
            ):
                out[item_id].append(payload)
        return out


def new_key() -> str:
    """A fresh idempotency key (what a form embeds, so a double submit stores one label)."""
    return uuid.uuid4().hex


__all__ = ["Conflict", "Forbidden", "NotFound", "Store", "StoreError", "Who", "new_key"]
