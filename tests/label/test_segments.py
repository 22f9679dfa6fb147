"""Segment items: two clips of an agent compared as Christiano et al. (2017) ask (A better, B better, equally good,
can't tell): the answers, the items, the store round trip, stats and export, the form, and a real browser."""

from __future__ import annotations

import base64
import io
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from rlhflab.control.clips import clip_data_uri
from rlhflab.control.segments import Segment
from rlhflab.errors import UserError
from rlhflab.label.app import create_app
from rlhflab.label.export import export_records
from rlhflab.label.payloads import LabelInvalid, check_item, normalize
from rlhflab.label.stats import format_stats, project_stats
from rlhflab.label.store import Store

from .test_browser import CHROMIUM_ARGS, _chromium, serve

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "label_segment_page.png"
STEPS = 20


def _pendulum(theta0: float, spin: float) -> Segment:
    thetas = theta0 + spin * np.arange(STEPS) * 0.05
    obs = np.stack([np.cos(thetas), np.sin(thetas), np.full(STEPS, spin)], axis=1).astype(np.float32)
    torques = np.clip(np.full((STEPS, 1), spin), -2, 2).astype(np.float32)
    return Segment(obs, torques, -(thetas**2).astype(np.float32))


CLIPS = [
    (clip_data_uri(_pendulum(0.1, 0.5)), clip_data_uri(_pendulum(3.0, -1.5))),
    (clip_data_uri(_pendulum(-0.4, 1.0)), clip_data_uri(_pendulum(2.0, 2.0))),
]


def _items(n: int = 2) -> list[dict]:
    return [
        {"prompt": f"Which clip balances the pendulum better? ({i})", "responses": list(CLIPS[i % 2])}
        for i in range(n)
    ]


# ---- answers -------------------------------------------------------------------------------------------------


def test_segment_answers_map_shown_positions_to_response_indices():
    # Shown B first: position A is response 1.
    assert normalize("segment", {"choice": "A"}, [1, 0]) == {
        "preferred": 1,
        "verdict": "preferred",
        "shown_first": 1,
    }
    assert normalize("segment", {"choice": "B"}, [1, 0]) == {
        "preferred": 0,
        "verdict": "preferred",
        "shown_first": 1,
    }
    assert normalize("segment", {"choice": "equal"}, [0, 1]) == {
        "preferred": None,
        "verdict": "equal",
        "shown_first": 0,
    }
    assert normalize("segment", {"choice": "cannot_tell"}, [1, 0]) == {
        "preferred": None,
        "verdict": "cannot_tell",
        "shown_first": 1,
    }


@pytest.mark.parametrize(
    "answer, field",
    [
        ({}, "choice"),
        ({"choice": "tie"}, "choice"),  # the pairwise word is not a segment answer
        ({"choice": "C"}, "choice"),
        ({"choice": "a"}, "choice"),
        ({"choice": None}, "choice"),
        ({"choice": "A", "strength": "better"}, "strength"),  # no strengths for clips
        (["A"], "label"),
    ],
)
def test_segment_refusals_name_the_field(answer, field):
    with pytest.raises(LabelInvalid) as e:
        normalize("segment", answer, [0, 1])
    assert e.value.field == field and e.value.status == 422


def test_a_segment_item_holds_two_image_data_uris():
    check_item("segment", list(CLIPS[0]), "item 0")
    png = "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()
    check_item("segment", [png, CLIPS[0][1]], "item 0")
    for responses, match in (
        ([CLIPS[0][0]], "needs 2 responses"),
        ([*CLIPS[0], CLIPS[1][0]], "needs 2 responses"),
        (["a clip", CLIPS[0][1]], "response 0.*data: URI"),
        ([CLIPS[0][0], "javascript:alert(1)"], "response 1"),
        ([CLIPS[0][0], "data:text/html;base64,PHNjcmlwdD4="], "response 1"),
        ([CLIPS[0][0], 'data:image/gif;base64,R0l"><script>'], "response 1"),
        ([CLIPS[0][0], 7], "response 1.*int"),
        ([CLIPS[0][0], "data:image/gif;base64," + "A" * 1_500_000], "at most"),
    ):
        with pytest.raises(UserError, match=match):
            check_item("segment", responses, "item 0")


# ---- the store, stats, export --------------------------------------------------------------------------------


def _project(store: Store, names=("ann",)) -> dict:
    store.add_project("p")
    who = {}
    for name in names:
        who[name] = store.user_by_token(store.add_user(name))
        store.add_member("p", name)
    return who


def test_segment_items_round_trip_through_the_store(store):
    who = _project(store, ("ann", "bob"))
    gold = {"choice": "A"}  # response 0 is better: what the true returns say
    items = _items(2)
    items[0]["gold"] = gold
    items[0]["meta"] = {"true_returns": [-1.0, -50.0]}
    ids = store.push("p", "segment", items, overlap=2)
    with pytest.raises(UserError, match="item 0, response 1"):
        store.push("p", "segment", [{"prompt": "x", "responses": [CLIPS[0][0], "not a clip"]}])
    answers = {"ann": ["A", "B"], "bob": ["cannot_tell", "equal"]}  # in shown positions
    shown = {}
    for name, choices in answers.items():
        for n, choice in enumerate(choices):
            view = store.next_assignment(who[name], "p")
            assert view["kind"] == "segment" and view["aspects"] is None
            assert [r["position"] for r in view["responses"]] == ["A", "B"]
            clips = [r["text"] for r in view["responses"]]
            assert sorted(clips) == sorted(CLIPS[n % 2])  # the clips, in their shown order
            shown[(name, n)] = [CLIPS[n % 2].index(c) for c in clips]
            with pytest.raises(LabelInvalid, match="choice"):  # refused, and nothing written
                store.submit_label(who[name], view["assignment"], {"choice": "tie"}, f"{name}{n}")
            answer = {"choice": choice}
            label, created = store.submit_label(who[name], view["assignment"], answer, f"{name}{n}")
            assert created and label["label"]["shown_first"] == shown[(name, n)][0]
        assert store.next_assignment(who[name], "p") is None
    rows = store.labelled("p", ["segment"])
    assert [(r["item_id"], r["annotator"]) for r in rows] == [(ids[0], "ann"), (ids[1], "ann")] + [
        (ids[0], "bob"),
        (ids[1], "bob"),
    ]
    # ann's "A" is the response shown at A; her "B" the one shown at B.
    assert rows[0]["payload"]["preferred"] == shown[("ann", 0)][0]
    assert rows[1]["payload"]["preferred"] == shown[("ann", 1)][1]
    assert [r["payload"]["verdict"] for r in rows[2:]] == ["cannot_tell", "equal"]

    stats = project_stats(store, "p")
    assert stats["counts"]["labels_by_kind"] == {"segment": 4}
    # Gold says response 0: ann right iff she picked it; bob's "cannot tell" on a gold item is a miss.
    assert stats["annotators"]["ann"]["gold_agreement"] == float(shown[("ann", 0)][0] == 0)
    assert stats["annotators"]["bob"]["gold_agreement"] == 0.0
    # bob's "cannot tell" is an abstention: only item 1 has two judgements to compare.
    assert stats["agreement"]["segment"]["items"] == 1
    pb = stats["segment_position_bias"]
    assert (pb["picked_first"], pb["decided"]) == (1, 2)  # ann picked A once, B once
    assert "decided segment labels picked" in format_stats(stats)

    records = export_records(store, "p", "segments")
    assert [r["verdict"] for r in records] == ["preferred", "preferred", "cannot_tell", "equal"]
    first = 1.0 if shown[("ann", 0)][0] == 0 else 0.0
    assert records[0]["label"] == first and records[2]["label"] is None and records[3]["label"] == 0.5
    assert records[0]["meta"] == {"true_returns": [-1.0, -50.0]}
    assert all("responses" not in r and r["annotator"] in ("ann", "bob") for r in records)
    assert export_records(store, "p", "pairs") == []  # a segment label is not a text pair


def test_the_form_takes_the_pressed_button_as_the_answer(sqlite_url):
    store = Store(sqlite_url)
    token = store.add_user("ann")
    store.add_project("p")
    store.add_member("p", "ann")
    store.push("p", "segment", _items(1))
    client = TestClient(create_app(store))
    client.post("/login", data={"token": token})
    page = client.get("/label?project=p").text
    imgs = re.findall(r'<img class="clip" src="(data:image/gif;base64,[^"]+)" alt="clip ([AB])"', page)
    assert [pos for _, pos in imgs] == ["A", "B"] and sorted(uri for uri, _ in imgs) == sorted(CLIPS[0])
    for value, text in (
        ("A", "A better"),
        ("B", "B better"),
        ("equal", "Equally good"),
        ("cannot_tell", "Can"),
    ):
        assert re.search(rf'<button type="submit" name="choice" value="{value}"[^>]*>.*{text}', page)
    assert 'id="submit"' not in page  # no generic submit: every answer is its own button
    assignment = re.search(r'action="/label/(\d+)"', page).group(1)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    r = client.post(f"/label/{assignment}", data={"csrf": csrf, "key": "k1"})  # no button: no answer
    assert r.status_code == 422 and "choice" in r.text
    r = client.post(
        f"/label/{assignment}", data={"csrf": csrf, "key": "k1", "choice": "B"}, follow_redirects=False
    )
    assert r.status_code == 303
    (row,) = store.labelled("p")
    assert row["payload"]["preferred"] == row["shown_order"][1]
    store.close()


def test_label_push_and_export_take_a_file_of_segment_items(tmp_path, capsys):
    import json

    from rlhflab.cli import main

    db = f"sqlite:///{tmp_path / 'labels.db'}"
    items = tmp_path / "clips.jsonl"
    items.write_text("".join(json.dumps(it) + "\n" for it in _items(2)))
    assert main(["label", "init", "--db", db]) == 0
    args = ["label", "push", "--db", db, "--project", "p", "--kind", "segment"]
    assert main([*args, "--responses", str(items)]) == 0
    assert "queued 2 segment items in project p" in capsys.readouterr().out
    assert main([*args, "--policy", str(tmp_path), "--prompts", str(items)]) == 2
    assert "--responses FILE, not --policy" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "responses": ["a", "b"]}) + "\n")
    assert main([*args, "--responses", str(bad)]) == 2
    assert "response 0: a segment clip must be an image data: URI" in capsys.readouterr().err
    store = Store(db)
    who = store.user_by_token(store.add_user("ann", admin=True))
    view = store.next_assignment(who, "p")
    store.submit_label(who, view["assignment"], {"choice": "equal"}, "k")
    store.close()
    out = tmp_path / "segments.jsonl"
    assert (
        main(["label", "export", "--db", db, "--project", "p", "--format", "segments", "--out", str(out)])
        == 0
    )
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (record["verdict"], record["label"], record["preferred"]) == ("equal", 0.5, None)


# ---- a real browser ------------------------------------------------------------------------------------------


def _frames(uri: str) -> int:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).n_frames


def _check_playing(page) -> None:
    """Both clips decoded at their size, and each is animating: two screenshots of it 0.3 s apart differ."""
    for position in "AB":
        img = page.locator(f"#response-{position} img.clip")
        assert page.evaluate("(el) => el.complete && el.naturalWidth", img.element_handle()) == 160
        assert _frames(img.get_attribute("src")) == STEPS
        before = img.screenshot()
        time.sleep(0.3)
        assert img.screenshot() != before, f"clip {position} does not play"


@pytest.mark.slow  # about 25 s (a server process and chromium); the store tests cover PostgreSQL
def test_annotator_compares_clips_in_a_real_browser(sqlite_url, tmp_path):
    chromium = _chromium()
    from playwright.sync_api import expect, sync_playwright

    store = Store(sqlite_url)
    token = store.add_user("ann")
    store.add_project("p")
    store.add_member("p", "ann")
    ids = store.push("p", "segment", _items(2))
    store.close()
    with serve(sqlite_url, tmp_path / "server.log") as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1100, "height": 800}).new_page()
            page.set_default_timeout(10_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.goto(f"{base}/login")
            page.fill("#token", token)
            page.click("#login button[type=submit]")
            page.wait_for_url(f"{base}/")
            page.goto(f"{base}/label?project=p")
            expect(page.locator("#label-form")).to_have_attribute("data-kind", "segment")
            expect(page.locator("img.clip")).to_have_count(2)
            _check_playing(page)
            shown_first = page.locator("#response-A img.clip").get_attribute("src")
            if os.environ.get("RLHFLAB_SCREENSHOT") == "1":
                page.screenshot(path=str(SCREENSHOT), full_page=False)
            page.screenshot(path=str(tmp_path / "segment_page.png"), full_page=False)
            with page.expect_navigation():
                page.click("#choice-A")  # "A better": one click answers
            expect(page.locator(".error")).to_have_count(0)
            expect(page.locator("#progress")).to_have_text("1 labelled, 1 open")
            expect(page.locator("img.clip")).to_have_count(2)
            with page.expect_navigation():
                page.keyboard.press("c")  # "can't tell" from the keyboard
            expect(page.locator("h1")).to_have_text("All done")
            assert errors == [], errors
        finally:
            browser.close()
    store = Store(sqlite_url)
    try:
        rows = store.labelled("p")
        assert [r["item_id"] for r in rows] == ids
        first = rows[0]
        assert first["responses"][first["payload"]["preferred"]] == shown_first  # the clip shown at A
        assert first["payload"]["verdict"] == "preferred"
        assert (rows[1]["payload"]["preferred"], rows[1]["payload"]["verdict"]) == (None, "cannot_tell")
        assert first["seconds"] is not None and first["seconds"] >= 0  # timed, like every label
    finally:
        store.close()
