"""The labelling app in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright; no browser
download) against the real server started as a subprocess (`rlhflab label serve`). An annotator signs in,
labels three pairwise items with the keyboard and one ranking with the mouse, and the export holds exactly
those labels. A model output holding a <script> shows as text and never runs.

Without chromium (or Playwright) the test is skipped, except under CI, where it must run (`.ci/services.sh`
installs chromium). With RLHFLAB_SCREENSHOT=1 it saves the labelling page as docs/label_page.png (the README's
screenshot); otherwise it writes nothing into the repository.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from rlhflab.label.export import export_records
from rlhflab.label.store import Store

from .conftest import free_port, start_server, stop_server

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "label_page.png"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
XSS = "<script>window.__pwned = 1</script>"

PAIRS = [
    {
        "prompt": (
            "Write a short review of a neighbourhood coffee shop for a local news site. Mention the coffee, "
            "the food and the service, and keep it under 80 words."
        ),
        "responses": [
            "Corner Grind is the quiet hero of Elm Street. The house espresso is bright and chocolatey, the "
            "oat-milk flat white is silky, and the cardamom buns sell out by ten for good reason. Service is "
            "quick and friendly even at the morning rush, and the baristas remember regulars' orders. Seating "
            "is tight, so come early or take it to go. Four stars.",
            "Coffee shop review: the coffee was good. The food was also good. The service was good too. I "
            "would go there again because it was good. Overall it is a good coffee shop and I recommend it "
            "to people who like coffee.",
        ],
    },
    {
        "prompt": "How do I show an alert when my web page loads?",
        "responses": [
            f"Put this at the end of the body:\n\n{XSS}\n\nand replace the assignment with alert('hello').",
            "Add an event listener: window.addEventListener('load', () => alert('hello'));",
        ],
    },
    {
        "prompt": "Name a primary colour.",
        "responses": ["Red.", "Blue."],
    },
]
RANKING = {
    "prompt": "Explain in one sentence why the sky is blue.",
    "responses": [
        "Air molecules scatter short (blue) wavelengths of sunlight far more than long ones (Rayleigh "
        "scattering), so blue light reaches our eyes from every direction of the sky.",
        "Because sunlight is scattered by the air, and blue is scattered most.",
        "Because it reflects the ocean.",
    ],
}
# The keys pressed on each pairwise item, and the label they stand for: (keys, choice, strength, safety).
PAIR_KEYS = [
    (["2", "q"], "A", "better", "both"),  # A better, both safe
    (["7"], "B", "slightly_better", None),  # B slightly better
    (["5"], "tie", None, None),  # a tie: left out of the pairs export
]
RANK_CLICKS = ["C", "A", "B"]  # the positions clicked, best first


def _chromium() -> str:
    """The path of Debian's chromium, or skip (fail under CI) if it or Playwright is missing."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    missing = None
    if path is None:
        missing = "chromium is not installed (apt-get install chromium, or run .ci/services.sh)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "playwright is not installed (pip install -e '.[dev]')"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {missing}")
        pytest.skip(missing)
    return path


@contextmanager
def serve(url: str, log: Path):
    """The base URL of `rlhflab label serve` on a free port, once it answers."""
    port = free_port()
    server = start_server(url, port, log)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(server)


def _setup(url: str) -> tuple[str, list[int], int]:
    """Project "p" with annotator "ann" (and an admin), three pairwise items, then one ranking of three."""
    store = Store(url)
    try:
        store.add_user("boss", admin=True)
        store.add_project("p")
        token = store.add_user("ann")
        store.add_member("p", "ann")
        pair_ids = store.push("p", "pairwise", PAIRS)
        (rank_id,) = store.push("p", "ranking", [RANKING])
    finally:
        store.close()
    return token, pair_ids, rank_id


def _shown(page) -> dict[str, str]:
    """Position letter -> the response text the page shows there (its text, as the browser decoded it)."""
    cards = page.locator("div.response")
    return {
        cards.nth(i).get_attribute("data-position"): cards.nth(i).locator("pre").text_content()
        for i in range(cards.count())
    }


def test_annotator_labels_in_a_real_browser(db_url, tmp_path):
    chromium = _chromium()
    from playwright.sync_api import expect, sync_playwright

    token, pair_ids, rank_id = _setup(db_url)
    shown_pairs: list[dict[str, str]] = []
    with serve(db_url, tmp_path / "server.log") as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
            page.set_default_timeout(10_000)
            errors: list[str] = []
            elsewhere: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.on("request", lambda r: None if r.url.startswith(base) else elsewhere.append(r.url))

            # Sign in with the login token; the project list links to the labelling page.
            page.goto(f"{base}/login")
            page.fill("#token", token)
            page.click("#login button[type=submit]")
            page.wait_for_url(f"{base}/")
            page.click('a[href="/label?project=p"]')
            page.wait_for_url(f"{base}/label?project=p")
            for n, (keys, choice, strength, safety) in enumerate(PAIR_KEYS):
                form = page.locator("#label-form")
                expect(form).to_have_attribute("data-kind", "pairwise")
                expect(page.locator("#progress")).to_have_text(f"{n} labelled, {4 - n} open")
                shown = _shown(page)
                assert sorted(shown.values()) == sorted(PAIRS[n]["responses"])  # oldest item first
                assert page.locator("div.response script").count() == 0
                assert page.evaluate("typeof window.__pwned") == "undefined"
                shown_pairs.append(shown)
                if n == 0 and os.environ.get("RLHFLAB_SCREENSHOT") == "1":
                    page.screenshot(path=str(SCREENSHOT), full_page=False)
                for key in keys:
                    page.keyboard.press(key)
                value = choice if choice == "tie" else f"{choice}:{strength}"
                expect(page.locator(f'input[name=preference][value="{value}"]')).to_be_checked()
                if safety:
                    expect(page.locator(f'input[name=safety][value="{safety}"]')).to_be_checked()
                action = form.get_attribute("action")
                with page.expect_navigation():
                    page.keyboard.press("Enter")
                assert page.locator("#label-form").get_attribute("action") != action
                expect(page.locator(".error")).to_have_count(0)

            # The script in a model output was shown as text, and never ran.
            assert any(XSS in text for text in shown_pairs[1].values())

            # The ranking: click the cards best first, then submit with the mouse.
            expect(page.locator("#label-form")).to_have_attribute("data-kind", "ranking")
            shown_ranking = _shown(page)
            assert sorted(shown_ranking.values()) == sorted(RANKING["responses"])
            for rank, position in enumerate(RANK_CLICKS, start=1):
                page.click(f"#response-{position}")
                expect(page.locator(f"#badge-{position}")).to_have_text(str(rank))
                expect(page.locator(f"#rank-{position}")).to_have_value(str(rank))
            with page.expect_navigation():
                page.click("#submit")
            expect(page.locator("h1")).to_have_text("All done")
            expect(page.locator("#progress")).to_have_text("4 labelled, 0 open")
            assert page.evaluate("typeof window.__pwned") == "undefined"
            assert errors == [], errors  # no script error and no failed request on any page
            assert elsewhere == [], elsewhere  # every page and asset came from the app itself
        finally:
            browser.close()

    # The export holds exactly what was clicked and typed.
    store = Store(db_url)
    try:
        expected_pairs = []
        for n, (_, choice, strength, safety) in enumerate(PAIR_KEYS):
            if choice == "tie":
                continue
            other = "B" if choice == "A" else "A"
            record = {
                "prompt": PAIRS[n]["prompt"],
                "chosen": shown_pairs[n][choice],
                "rejected": shown_pairs[n][other],
                "rating": strength,
                "annotator": "ann",
                "item_id": pair_ids[n],
            }
            if safety == "both":
                record["safe"] = [0, 1]
            expected_pairs.append(record)
        pairs = [{k: v for k, v in r.items() if k != "label_id"} for r in export_records(store, "p", "pairs")]
        assert pairs == expected_pairs

        rankings = export_records(store, "p", "rankings")
        assert [{k: v for k, v in r.items() if k != "label_id"} for r in rankings] == [
            {
                "prompt": RANKING["prompt"],
                "responses": [shown_ranking[p] for p in RANK_CLICKS],
                "ranks": [0, 1, 2],
                "annotator": "ann",
                "item_id": rank_id,
            }
        ]

        rows = store.labelled("p")
        assert [(r["item_id"], r["annotator"]) for r in rows] == [(i, "ann") for i in [*pair_ids, rank_id]]
        tie = rows[2]["payload"]
        assert (tie["preferred"], tie["strength"], tie["safe"]) == (None, None, None)
    finally:
        store.close()
