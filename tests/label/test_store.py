"""The store's rules, on SQLite and on PostgreSQL: who gets which item, idempotent labels, tokens, schema."""

import random

import pytest
from sqlalchemy import select

from rlhflab.errors import UserError
from rlhflab.label.db import Label, check_schema, head_revision, init_db, make_engine
from rlhflab.label.store import Conflict, Forbidden, NotFound, Store, StoreError

from .conftest import seed


def test_tokens_are_hashed_and_verify(store):
    token = store.add_user("ann")
    who = store.user_by_token(token)
    assert who.name == "ann" and not who.is_admin
    with store.tx() as s:
        from rlhflab.label.db import User

        row = s.scalar(select(User).where(User.name == "ann"))
    assert token.split(".")[1] not in row.token_hash and row.token_hash.startswith("$argon2")
    assert store.user_by_token(token[:-1] + ("x" if token[-1] != "x" else "y")) is None
    assert store.user_by_token("nonsense") is None
    with pytest.raises(Conflict):
        store.add_user("ann")
    rotated = store.add_user("ann", rotate=True)
    assert store.user_by_token(token) is None and store.user_by_token(rotated).name == "ann"


def test_sessions(store):
    who = store.user_by_token(store.add_user("ann"))
    session, csrf = store.open_session(who)
    back = store.user_by_session(session)
    assert back.name == "ann" and back.csrf == csrf
    store.close_session(session)
    assert store.user_by_session(session) is None


def test_next_gives_back_the_open_item_then_the_next_one(store):
    tokens, ids = seed(store, items=3)
    ann = store.user_by_token(tokens["ann"])
    first = store.next_assignment(ann, "p")
    assert store.next_assignment(ann, "p")["assignment"] == first["assignment"]  # a reload: the same item
    store.submit_label(ann, first["assignment"], {"choice": "tie"}, "k1")
    second = store.next_assignment(ann, "p")
    assert second["assignment"] != first["assignment"] and second["prompt"] == "prompt 1"


def test_overlap_hands_each_item_to_that_many_distinct_annotators(store):
    tokens, ids = seed(store, items=2, overlap=2, annotators=("a1", "a2", "a3"))
    seen = {}
    for name in ("a1", "a2", "a3"):
        who = store.user_by_token(tokens[name])
        got = []
        while (view := store.next_assignment(who, "p")) is not None:
            got.append(view["prompt"])
            store.submit_label(who, view["assignment"], {"choice": "tie"}, f"{name}-{len(got)}")
        seen[name] = got
    # Two items x two annotators each: a1 and a2 take both, a3 finds nothing left.
    assert seen == {"a1": ["prompt 0", "prompt 1"], "a2": ["prompt 0", "prompt 1"], "a3": []}


def test_shown_order_is_random_per_assignment_and_labels_mean_response_indices(store):
    tokens, _ = seed(store, items=40)
    ann = store.user_by_token(tokens["ann"])
    rng = random.Random(0)
    orders = []
    for i in range(40):
        view = store.next_assignment(ann, "p", rng=rng)
        texts = [r["text"] for r in view["responses"]]
        orders.append(texts[0].endswith(".1"))
        store.submit_label(ann, view["assignment"], {"choice": "A", "strength": "better"}, f"k{i}")
    assert 5 < sum(orders) < 35  # both orders occur
    rows = store.labelled("p")
    assert {row["annotator"] for row in rows} == {"ann"}  # each label with its own annotator
    for row, swapped in zip(rows, orders):  # choice A = the response shown first
        assert row["payload"]["preferred"] == (1 if swapped else 0) == row["shown_order"][0]


def test_only_members_get_items(store):
    tokens, _ = seed(store, items=1)
    outsider = store.user_by_token(store.add_user("eve"))
    with pytest.raises(Forbidden):
        store.next_assignment(outsider, "p")
    with pytest.raises(NotFound):
        store.next_assignment(outsider, "no-such-project")
    boss = store.user_by_token(tokens["boss"])
    assert store.next_assignment(boss, "p") is not None  # admins may label every project


def test_submit_is_idempotent_by_key_and_refuses_conflicts(store):
    tokens, _ = seed(store, items=2, annotators=("ann", "bob"))
    ann, bob = store.user_by_token(tokens["ann"]), store.user_by_token(tokens["bob"])
    a = store.next_assignment(ann, "p")["assignment"]
    label, created = store.submit_label(ann, a, {"choice": "A", "strength": "better"}, "key-1")
    again, created_again = store.submit_label(ann, a, {"choice": "B", "strength": "better"}, "key-1")
    assert created and not created_again and again == label  # the first answer stands
    with pytest.raises(Conflict, match="already labelled"):
        store.submit_label(ann, a, {"choice": "tie"}, "key-2")
    b = store.next_assignment(ann, "p")["assignment"]
    with pytest.raises(Conflict, match="already used"):
        store.submit_label(ann, b, {"choice": "tie"}, "key-1")
    with pytest.raises(NotFound):  # bob may not label ann's assignment, and learns nothing about it
        store.submit_label(bob, b, {"choice": "tie"}, "bob-1")
    with pytest.raises(NotFound):
        store.submit_label(ann, 10_000, {"choice": "tie"}, "key-3")
    with pytest.raises(UserError, match="ranks"):  # a label of the wrong kind
        store.submit_label(ann, b, {"ranks": [0, 1]}, "key-4")
    with pytest.raises(UserError, match="key"):
        store.submit_label(ann, b, {"choice": "tie"}, "")
    with store.tx() as s:
        assert len(s.scalars(select(Label)).all()) == 1  # refusals wrote nothing


def test_withdrawn_items_are_no_longer_handed_out(store):
    store.add_project("p")
    ann = store.user_by_token(store.add_user("ann", admin=True))
    store.push("p", "pairwise", [{"prompt": "x", "responses": ["a", "b"]}], batch="b1")
    store.push("p", "pairwise", [{"prompt": "y", "responses": ["c", "d"]}], batch="b2")
    assert store.next_assignment(ann, "p")["prompt"] == "x"
    assert store.withdraw("b1") == 1
    assert store.next_assignment(ann, "p")["prompt"] == "y"  # the open assignment on x is gone too


def test_push_refuses_bad_items_and_writes_nothing(store):
    store.add_project("p")
    good = {"prompt": "x", "responses": ["a", "b"]}
    for kind, items, match in (
        ("pairwise", [good, {"prompt": "y", "responses": ["a"]}], "item 1"),
        ("pairwise", [good, {"responses": ["a", "b"]}], "item 1"),
        ("pairwise", [good, {"prompt": "y", "responses": ["a", 3]}], "item 1"),
        ("vote", [good], "kind"),
        ("pairwise", [{**good, "gold": {"choice": "C"}}], "choice"),
    ):
        with pytest.raises(UserError, match=match):
            store.push("p", kind, items)
    with pytest.raises(StoreError, match="overlap"):
        store.push("p", "pairwise", [good], overlap=0)
    assert store.counts("p")["items"] == 0


def test_schema_is_checked_and_migrations_match_the_models(db_url, tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from rlhflab.label.db import Base

    engine = make_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], diff  # the migration creates exactly what the models declare
    assert init_db(db_url) == head_revision()  # migrating an up-to-date database is a no-op
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(UserError, match="label init"):
        check_schema(make_engine(empty), empty)
    with pytest.raises(UserError, match="label init"):
        Store(empty)


def test_bad_urls_are_refused():
    from rlhflab.label.db import normalize_url

    assert normalize_url("postgresql://u:p@h/db").startswith("postgresql+psycopg://")
    for url in ("labels.db", "mysql://u@h/db"):
        with pytest.raises(UserError, match="--db"):
            normalize_url(url)
    with pytest.raises(UserError, match="does not exist"):
        init_db("sqlite:////no/such/dir/labels.db")


def test_a_lease_frees_an_abandoned_slot(db_url):
    import datetime as dt

    from sqlalchemy import update

    from rlhflab.label.db import Assignment

    store = Store(db_url, lease_minutes=30)
    tokens, _ = seed(store, items=1, overlap=2, annotators=("ann", "bob", "cy"))
    ann, bob, cy = (store.user_by_token(tokens[n]) for n in ("ann", "bob", "cy"))
    a_ann = store.next_assignment(ann, "p")["assignment"]
    a_bob = store.next_assignment(bob, "p")["assignment"]
    assert store.next_assignment(cy, "p") is None  # both slots taken
    store.submit_label(bob, a_bob, {"choice": "tie"}, "bob-1")
    with store.tx() as s:  # ann took her item 31 minutes ago and went away; bob's was labelled, so it stays
        old = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(minutes=31)
        s.execute(update(Assignment).values(created_at=old))
    view = store.next_assignment(cy, "p")
    assert view is not None and view["assignment"] not in (a_ann, a_bob)  # ann's slot, taken again
    with store.tx() as s:
        slots = sorted(s.scalars(select(Assignment.slot)).all())
    assert slots == [0, 1]
    with pytest.raises(NotFound):  # ann's late answer finds no assignment
        store.submit_label(ann, a_ann, {"choice": "tie"}, "ann-1")
    store.submit_label(cy, view["assignment"], {"choice": "tie"}, "cy-1")
    assert store.counts("p")["labels"] == 2
    # Without a lease nothing expires: an old unlabelled assignment keeps its slot.
    plain = Store(db_url)
    dan = plain.user_by_token(plain.add_user("dan"))
    plain.add_member("p", "dan")
    plain.push("p", "pairwise", [{"prompt": "late", "responses": ["x", "y"]}])
    held = plain.next_assignment(dan, "p")["assignment"]
    with plain.tx() as s:
        s.execute(update(Assignment).where(Assignment.id == held).values(created_at=old))
    assert plain.next_assignment(dan, "p")["assignment"] == held
