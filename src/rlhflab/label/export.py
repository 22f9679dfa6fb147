"""`rlhflab label export`: a project's labels as the record formats `rlhflab rm` / `dpo` / `kto` read.

    pairs      {prompt, chosen, rejected, rating, annotator, ...} from pairwise labels (ties left out); an edited
               response adds two pairs, edit > chosen and edit > rejected (Touvron et al. 2023 train on
               edit > chosen > rejected), rated like the label
    rankings   {prompt, responses (best first), ranks, annotator, ...} from ranking labels
    unpaired   {prompt, completion, label (true = desirable), annotator, ...} from thumbs labels
    ratings    {prompt, completion, ratings {aspect: 1..7}, annotator, ...} from ratings labels
    segments   {prompt, meta, preferred (0 | 1 | null), verdict, label (1.0 | 0.0 | 0.5 | null), annotator, ...}
               from segment labels: label is the first clip's preference as a control `Labeller` answers it
               (null = cannot tell); the clips themselves stay out (they are large, and the item's meta is
               where the pusher says which segments they show)

Every record keeps the annotator and the label and item ids, so per-annotator (or distributional) reward
models can use it and a record can be traced back; extra fields are ignored by the loaders.
"""

from __future__ import annotations

from typing import Any

from rlhflab.label.store import Store

FORMATS = {
    "pairs": "pairwise",
    "rankings": "ranking",
    "unpaired": "thumbs",
    "ratings": "ratings",
    "segments": "segment",
}


def _pairs(row: dict) -> list[dict[str, Any]]:
    p = row["payload"]
    if p["preferred"] is None:
        return []
    chosen, rejected = row["responses"][p["preferred"]], row["responses"][1 - p["preferred"]]
    out = [(chosen, rejected)]
    if p["edited"] and p["edited"] not in (chosen, rejected):
        out += [(p["edited"], chosen), (p["edited"], rejected)]
    extra = {"safe": p["safe"]} if p["safe"] is not None else {}
    return [
        {"prompt": row["prompt"], "chosen": c, "rejected": r, "rating": p["strength"], **extra, **_trace(row)}
        for c, r in out
    ]


def _ranking(row: dict) -> list[dict[str, Any]]:
    ranks = row["payload"]["ranks"]
    order = sorted(range(len(ranks)), key=lambda i: (ranks[i], i))
    return [
        {
            "prompt": row["prompt"],
            "responses": [row["responses"][i] for i in order],
            "ranks": [ranks[i] for i in order],
            **_trace(row),
        }
    ]


def _unpaired(row: dict) -> list[dict[str, Any]]:
    return [
        {
            "prompt": row["prompt"],
            "completion": row["responses"][0],
            "label": row["payload"]["good"],
            **_trace(row),
        }
    ]


def _ratings(row: dict) -> list[dict[str, Any]]:
    return [
        {
            "prompt": row["prompt"],
            "completion": row["responses"][0],
            "ratings": row["payload"]["ratings"],
            **_trace(row),
        }
    ]


def _segments(row: dict) -> list[dict[str, Any]]:
    p = row["payload"]
    if p["verdict"] == "preferred":
        label = 1.0 if p["preferred"] == 0 else 0.0
    else:
        label = 0.5 if p["verdict"] == "equal" else None
    return [
        {
            "prompt": row["prompt"],
            "meta": row["meta"],
            "preferred": p["preferred"],
            "verdict": p["verdict"],
            "label": label,
            **_trace(row),
        }
    ]


def _trace(row: dict) -> dict[str, Any]:
    return {"annotator": row["annotator"], "label_id": row["label_id"], "item_id": row["item_id"]}


_BUILD = {
    "pairs": _pairs,
    "rankings": _ranking,
    "unpaired": _unpaired,
    "ratings": _ratings,
    "segments": _segments,
}


def export_records(store: Store, project: str, fmt: str) -> list[dict[str, Any]]:
    """The records of `project` in format `fmt` (one of FORMATS), oldest label first."""
    return [rec for row in store.labelled(project, [FORMATS[fmt]]) for rec in _BUILD[fmt](row)]
