"""`rlhflab label stats` and `export` on a small project whose numbers are worked out by hand."""

from __future__ import annotations

import random

import pytest

from rlhflab.data import load_records
from rlhflab.data.readers import write_jsonl
from rlhflab.label.export import export_records
from rlhflab.label.stats import format_stats, project_stats


class FixedOrder(random.Random):
    """Shows every item's responses in their stored order (A = response 0), so answers are easy to write."""

    def shuffle(self, x):
        return None


def _label_all(store, name: str, answers: list[dict]) -> None:
    who = store.user_by_token(store.add_user(name))
    store.add_member("p", name)
    for n, answer in enumerate(answers):
        view = store.next_assignment(who, "p", rng=FixedOrder())
        store.submit_label(who, view["assignment"], answer, f"{name}-{n}")
    assert store.next_assignment(who, "p") is None


A = {"choice": "A", "strength": "better"}
B = {"choice": "B", "strength": "slightly_better"}
TIE = {"choice": "tie"}


def test_stats_agreement_gold_and_position_bias(store):
    store.add_project("p")
    # Four pairwise items, two annotators each; item 3 is a gold item whose known answer is B.
    rows = [{"prompt": f"q{i}", "responses": [f"a{i}", f"b{i}"]} for i in range(3)]
    rows.append({"prompt": "q3", "responses": ["a3", "b3"], "gold": {"choice": "B", "strength": "better"}})
    store.push("p", "pairwise", rows, overlap=2)
    _label_all(store, "ann", [A, A, B, B])
    _label_all(store, "bob", [A, B, B, A])
    stats = project_stats(store, "p")
    assert stats["counts"] == {
        "items": 4,
        "assignments": 8,
        "labels": 8,
        "members": 2,
        "labels_by_kind": {"pairwise": 8},
    }
    # Gold: ann said B on item 3 (agrees), bob said A (disagrees).
    assert (
        stats["annotators"]["ann"]["gold_items"] == 1 and stats["annotators"]["ann"]["gold_agreement"] == 1.0
    )
    assert stats["annotators"]["bob"]["gold_agreement"] == 0.0
    assert stats["annotators"]["ann"]["labels"] == 4
    # Agreement on the preferred response: ann 0,0,1,1 and bob 0,1,1,0; they agree on 2 of 4 items.
    # Cohen: p_o = 1/2, both raters 1/2 each way, p_e = 1/2 -> kappa 0. Fleiss (2 raters, pooled 1/2) -> 0.
    # Krippendorff nominal: D_o = 4 disagreeing ordered pairs / 8 = 1/2, D_e = 2 * 4 * 4 / (8 * 7) = 4/7,
    # alpha = 1 - (1/2) / (4/7) = 1/8.
    ag = stats["agreement"]["pairwise"]
    assert ag["items"] == 4 and ag["rater_pairs"] == 1 and ag["fleiss_items"] == 4
    assert ag["mean_cohen_kappa"] == pytest.approx(0.0, abs=1e-4) and ag["fleiss_kappa"] == pytest.approx(
        0.0, abs=1e-4
    )
    assert ag["krippendorff_alpha"] == pytest.approx(0.125, abs=1e-4)
    # Responses were shown in stored order: choice A is the first shown, chosen in 2 + 2 of 8 labels. Wilson
    # 95% interval for 4/8: centre (0.5 + z^2/16) / (1 + z^2/8) = 0.5, half-width
    # z * sqrt(0.25/8 + z^2/256) / (1 + z^2/8) = 0.2847 (z = 1.96).
    pb = stats["position_bias"]
    assert (pb["picked_first"], pb["decided"], pb["rate"]) == (4, 8, 0.5)
    assert pb["ci95"] == pytest.approx([0.5 - 0.2847, 0.5 + 0.2847], abs=1e-3)
    text = format_stats(stats)
    assert "4/8 decided pairwise labels picked the response shown first" in text and "ann" in text


def test_export_formats_load_as_training_records(store, tmp_path):
    store.add_project("p", ["helpful", "harmless"])
    store.push(
        "p",
        "pairwise",
        [{"prompt": "q0", "responses": ["x0", "y0"]}, {"prompt": "q1", "responses": ["x1", "y1"]}],
    )
    store.push("p", "ranking", [{"prompt": "r", "responses": ["r0", "r1", "r2"]}])
    store.push("p", "thumbs", [{"prompt": "t", "responses": ["t0"]}])
    store.push("p", "ratings", [{"prompt": "s", "responses": ["s0"]}])
    _label_all(
        store,
        "ann",
        [
            {"choice": "B", "strength": "significantly_better", "safety": "B", "edited": "y0 but better"},
            TIE,
            {"ranks": [1, 0, 1]},  # shown order = stored order: r1 best, r0 and r2 tied below
            {"thumb": "down"},
            {"ratings": {"helpful": 6, "harmless": 2}},
        ],
    )
    pairs = export_records(store, "p", "pairs")
    trace = {"annotator": "ann"}
    # edit > chosen > rejected: three pairs from the one label; the tie gives none.
    assert [(r["chosen"], r["rejected"], r["rating"], r["safe"]) for r in pairs] == [
        ("y0", "x0", "significantly_better", [1]),
        ("y0 but better", "y0", "significantly_better", [1]),
        ("y0 but better", "x0", "significantly_better", [1]),
    ]
    assert all(r.items() >= trace.items() and r["item_id"] == 1 for r in pairs)
    rankings = export_records(store, "p", "rankings")
    assert [(r["responses"], r["ranks"]) for r in rankings] == [(["r1", "r0", "r2"], [0, 1, 1])]
    assert [(r["completion"], r["label"]) for r in export_records(store, "p", "unpaired")] == [("t0", False)]
    assert [r["ratings"] for r in export_records(store, "p", "ratings")] == [{"helpful": 6, "harmless": 2}]
    # What the stages read: every exported file loads as its record kind.
    for fmt, kind in (("pairs", "pairwise"), ("rankings", "ranked"), ("unpaired", "unpaired")):
        path = tmp_path / f"{fmt}.jsonl"
        write_jsonl(export_records(store, "p", fmt), path)
        assert load_records(str(path), kind).records
    stats = project_stats(store, "p")
    assert stats["counts"]["labels_by_kind"] == {"pairwise": 2, "ranking": 1, "thumbs": 1, "ratings": 1}
    assert stats["agreement"] == {} and "no item was labelled by two annotators" in format_stats(stats)
