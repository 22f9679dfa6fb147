"""Tables, engines and migrations of the labelling database (SQLAlchemy 2, Alembic).

One schema serves SQLite (a file, WAL mode, the default) and PostgreSQL. Constraints carry the rules the app
must never break under concurrency, so a race cannot break them either:

- an item is handed out to at most `overlap` annotators: an assignment takes a `slot` below the item's
  overlap, and (item, slot) is unique; (item, user) is unique too, so nobody labels an item twice;
- an assignment holds at most one label (`labels.assignment_id` unique);
- a retried submission never stores a second label: (user, idempotency key) is unique.

Tokens and sessions are stored hashed: a login token as argon2 (it is a password), a session id as SHA-256
(it is 256 random bits, so a fast hash is safe and a lookup by hash is possible).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from rlhflab.errors import UserError

DEFAULT_URL = "sqlite:///labels.db"
MIGRATIONS = Path(__file__).parent / "migrations"
KINDS = ("pairwise", "ranking", "thumbs", "ratings", "segment")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    token_id: Mapped[str] = mapped_column(String(32), unique=True)  # the public half of the login token
    token_hash: Mapped[str] = mapped_column(String(200))  # argon2 of the secret half
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Session(Base):
    __tablename__ = "sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    aspects: Mapped[list[Any]] = mapped_column(JSON)  # the aspects a `ratings` item asks about
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Member(Base):
    __tablename__ = "members"
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    prompt: Mapped[Any] = mapped_column(JSON)  # text, or a list of chat messages
    responses: Mapped[list[Any]] = mapped_column(JSON)
    overlap: Mapped[int] = mapped_column(Integer, default=1)  # annotators that label it
    gold: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # an admin's known answer
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)  # where the responses came from
    batch: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    withdrawn: Mapped[bool] = mapped_column(Boolean, default=False)  # no longer handed out
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("item_id", "slot", name="uq_assignment_slot"),
        UniqueConstraint("item_id", "user_id", name="uq_assignment_user"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    slot: Mapped[int] = mapped_column(Integer)
    shown_order: Mapped[list[Any]] = mapped_column(JSON)  # response indices in the order shown
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Label(Base):
    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("user_id", "idempotency_key", name="uq_label_key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"), unique=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    idempotency_key: Mapped[str] = mapped_column(String(100))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)  # normalized: response indices, not shown positions
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)  # from assignment to label
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


def normalize_url(url: str) -> str:
    """A database URL SQLAlchemy can open: `postgresql://` goes through psycopg 3 (the driver we install);
    a bare path is refused with the forms we accept."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(
            f"--db {url!r} is not a database URL; use sqlite:///FILE.db or postgresql://USER:PASS@HOST/DB"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif not parsed.drivername.startswith(("sqlite", "postgresql")):
        raise UserError(f"--db {url!r}: only SQLite (sqlite:///FILE.db) and PostgreSQL are supported")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str) -> Engine:
    """An engine for `url`. SQLite: WAL journal, full sync (an acknowledged label survives kill -9), foreign
    keys on, a 30 s busy timeout, and every transaction BEGIN IMMEDIATE, so two writers queue instead of
    failing on a lock upgrade."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_size=10, max_overflow=40, pool_pre_ping=True)


def _alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def _sqlite_dir_exists(url: str) -> None:
    parsed = make_url(normalize_url(url))
    if parsed.drivername.startswith("sqlite") and parsed.database and parsed.database != ":memory:":
        parent = Path(parsed.database).expanduser().resolve().parent
        if not parent.is_dir():
            raise UserError(f"--db {url!r}: the directory {parent} does not exist; create it first")


def init_db(url: str) -> str:
    """Create the database's tables, or migrate them to the newest schema; returns the revision."""
    from alembic import command

    _sqlite_dir_exists(url)
    try:
        command.upgrade(_alembic_config(url), "head")
    except OperationalError as e:
        raise UserError(f"--db {url!r}: cannot open the database ({e.orig})") from None
    return head_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def check_schema(engine: Engine, url: str) -> None:
    """Refuse a database that `rlhflab label init` has not created or migrated to the newest schema."""
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
            has_users = inspect(conn).has_table("users")
    except OperationalError as e:
        raise UserError(f"--db {url!r}: cannot open the database ({e.orig})") from None
    if current != head_revision() or not has_users:
        state = "is empty" if current is None else f"is at schema {current}, not {head_revision()}"
        raise UserError(f"--db {url!r} {state}; run `rlhflab label init --db {url}` first")
