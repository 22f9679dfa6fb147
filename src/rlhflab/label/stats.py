"""`rlhflab label stats`: what a labelling project has produced and how far its labels can be trusted.

Counts; per annotator their throughput (labels, median seconds from assignment to label, labels per hour of
active labelling) and their agreement with the gold items an admin seeded; agreement between annotators on
the items several of them labelled (Krippendorff's alpha for every kind, Fleiss' and mean pairwise Cohen's
kappa for the categorical kinds); and the position-bias rate, the share of decided pairwise labels that
picked the response shown first (1/2 without bias), with its 95% Wilson interval, and the same for segment
labels (clips shown left and right). A segment label of "cannot tell" is an abstention, not a category: it is
left out of the agreement between annotators, as Christiano et al. (2017, Sec. 2.2) leave it out of training;
against a gold answer it counts as a miss (the gold item says the answer can be told).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from rlhflab.label.agreement import (
    fleiss_kappa_from_labels,
    krippendorff_alpha,
    mean_pairwise_cohen_kappa,
    position_bias,
)
from rlhflab.label.store import Store

CATEGORICAL = ("pairwise", "thumbs", "segment")


def _category(kind: str, payload: dict) -> Any:
    """The categorical value of a pairwise, thumbs or segment label (what kappa compares)."""
    if kind == "pairwise":
        return "tie" if payload["preferred"] is None else payload["preferred"]
    if kind == "segment":
        return payload["verdict"] if payload["preferred"] is None else payload["preferred"]
    return payload["good"]


def _matches_gold(kind: str, payload: dict, gold: dict) -> float:
    """1.0 if the label agrees with the gold answer, else 0.0 (ratings: minus the mean absolute gap)."""
    if kind in CATEGORICAL:
        return float(_category(kind, payload) == _category(kind, gold))
    if kind == "ranking":  # the same best response(s)
        best = [i for i, r in enumerate(payload["ranks"]) if r == 0]
        return float(best == [i for i, r in enumerate(gold["ranks"]) if r == 0])
    gaps = [abs(payload["ratings"][a] - gold["ratings"][a]) for a in gold["ratings"]]
    return -sum(gaps) / len(gaps)


def _finite(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, 4)


def _annotators(rows: list[dict]) -> dict[str, dict]:
    by: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by[row["annotator"]].append(row)
    out = {}
    for name, mine in sorted(by.items()):
        seconds = [r["seconds"] for r in mine if r["seconds"] is not None]
        span = (mine[-1]["created_at"] - mine[0]["created_at"]).total_seconds()
        gold = [(r["kind"], _matches_gold(r["kind"], r["payload"], r["gold"])) for r in mine if r["gold"]]
        categorical = [m for k, m in gold if k != "ratings"]
        out[name] = {
            "labels": len(mine),
            "median_seconds": _finite(statistics.median(seconds)) if seconds else None,
            "labels_per_hour": _finite(3600 * (len(mine) - 1) / span) if len(mine) > 1 and span > 0 else None,
            "gold_items": len(gold),
            "gold_agreement": _finite(sum(categorical) / len(categorical)) if categorical else None,
        }
    return out


def _agreement(rows: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for kind in CATEGORICAL:
        units: dict[int, dict[str, Any]] = defaultdict(dict)
        for r in rows:
            if r["kind"] == kind and _category(kind, r["payload"]) != "cannot_tell":
                units[r["item_id"]][r["annotator"]] = _category(kind, r["payload"])
        shared = {i: u for i, u in units.items() if len(u) >= 2}
        if shared:
            fleiss, n_fleiss = fleiss_kappa_from_labels(shared)
            cohen, pairs = mean_pairwise_cohen_kappa(shared)
            out[kind] = {
                "items": len(shared),
                "krippendorff_alpha": _finite(krippendorff_alpha(shared, "nominal")),
                "fleiss_kappa": _finite(fleiss),
                "fleiss_items": n_fleiss,
                "mean_cohen_kappa": _finite(cohen),
                "rater_pairs": pairs,
            }
    ranked: dict[tuple, dict[str, Any]] = defaultdict(dict)  # unit = (item, response): its rank
    rated: dict[tuple, dict[str, Any]] = defaultdict(dict)  # unit = (item, aspect): its rating
    for r in rows:
        if r["kind"] == "ranking":
            for i, rank in enumerate(r["payload"]["ranks"]):
                ranked[(r["item_id"], i)][r["annotator"]] = rank
        elif r["kind"] == "ratings":
            for aspect, value in r["payload"]["ratings"].items():
                rated[(r["item_id"], aspect)][r["annotator"]] = value
    for kind, units in (("ranking", ranked), ("ratings", rated)):
        shared = {u: v for u, v in units.items() if len(v) >= 2}
        if shared:
            out[kind] = {
                "units": len(shared),
                "krippendorff_alpha_interval": _finite(krippendorff_alpha(shared, "interval")),
            }
    return out


def _position_bias(rows: list[dict], kind: str = "pairwise") -> dict[str, Any] | None:
    decided = [r["payload"] for r in rows if r["kind"] == kind and r["payload"]["preferred"] is not None]
    if not decided:
        return None
    first = sum(p["preferred"] == p["shown_first"] for p in decided)
    rate, low, high = position_bias(first, len(decided))
    return {"picked_first": first, "decided": len(decided), "rate": round(rate, 4), "ci95": [low, high]}


def project_stats(store: Store, project: str) -> dict[str, Any]:
    """Everything `rlhflab label stats` prints, as a JSON-ready dict."""
    rows = store.labelled(project)
    kinds = defaultdict(int)
    for r in rows:
        kinds[r["kind"]] += 1
    return {
        "project": project,
        "counts": {**store.counts(project), "labels_by_kind": dict(kinds)},
        "annotators": _annotators(rows),
        "agreement": _agreement(rows),
        "position_bias": _position_bias(rows),
        "segment_position_bias": _position_bias(rows, "segment"),
    }


def format_stats(stats: dict[str, Any]) -> str:
    """The stats as the terminal shows them."""
    c = stats["counts"]
    lines = [
        f"project {stats['project']}: {c['items']} items, {c['assignments']} assigned, {c['labels']} labels "
        f"({', '.join(f'{k} {v}' for k, v in c['labels_by_kind'].items()) or 'none yet'}), {c['members']} members",
        "",
        f"{'annotator':<20} {'labels':>7} {'median s':>9} {'per hour':>9} {'gold':>5} {'gold agree':>10}",
    ]
    for name, a in stats["annotators"].items():
        cells = [a["median_seconds"], a["labels_per_hour"], a["gold_agreement"]]
        med, rate, gold = ("-" if x is None else f"{x:.2f}" for x in cells)
        lines.append(f"{name:<20} {a['labels']:>7} {med:>9} {rate:>9} {a['gold_items']:>5} {gold:>10}")
    lines.append("")
    for kind, ag in stats["agreement"].items():
        values = ", ".join(f"{k} {v}" for k, v in ag.items())
        lines.append(f"agreement ({kind}): {values}")
    if not stats["agreement"]:
        lines.append("agreement: no item was labelled by two annotators yet")
    for key, what in (("position_bias", "pairwise labels"), ("segment_position_bias", "segment labels")):
        pb = stats.get(key)
        if pb:
            lo, hi = pb["ci95"]
            lines.append(
                f"position bias: {pb['picked_first']}/{pb['decided']} decided {what} picked the response "
                f"shown first: {pb['rate']:.3f} (95% CI {lo:.3f}-{hi:.3f}; 0.5 = no bias)"
            )
    return "\n".join(lines)
