"""Reports: `report.json`, PNG plots and one self-contained `report.html` (images embedded as base64).

report.json (schema "rlhflab.report/1"):

    {
      "schema": "rlhflab.report/1",
      "title": str, "task": str | null, "created": ISO 8601 UTC time,
      "meta": {...},                               # free-form: seed, versions, timings, settings
      "policies": {NAME: {METRIC: value, ..., "examples": [{"prompt", "response", "gold"}]}},
                                                   # `evaluate_policy` dicts: gold/mean, gold/ci95 [lo, hi],
                                                   # gold/win_rate, kl/ref, sample/*, ... (see rlhflab.eval)
      "reward_models": {NAME: {"rm/accuracy": .., "rm/accuracy_by_rating": {RATING: {"accuracy", "n"}},
                               "rm/gold_accuracy": .., "rm/spearman_gold": .., ...}},
      "curves": {RUN: [{"step": int, METRIC: value, ...}, ...]},   # held-out evaluations over training
                                                   # (gold/mean, kl/ref, ... of each snapshot; step 0 first)
      "rollout_curves": {RUN: [{"step": int, METRIC: value, ...}, ...]},  # per-iteration logs of on-policy
                                                   # runs (their samples' proxy score, gold, KL)
      "curve_keys": {"proxy"|"gold"|"kl": METRIC},  # which logged metric each curve plot uses, if set
      "plots": {PLOT: FILE.png}                    # the PNGs written next to report.json
    }

Numbers that are not finite are written as null. Plots: `gold_by_policy.png` (gold with 95% intervals),
`gold_vs_kl.png` (every method's held-out gold against sqrt(KL to the reference) over training, its final
policy marked: methods compared at matched KL), `training_curves.png` (rollout curves: proxy reward, gold
and KL against step), `gold_vs_proxy.png` (rollout curves: gold against proxy and both against sqrt(KL),
per-iteration points under binned means (`smooth_by_x`): the reward over-optimization picture of Gao et
al.), `rm_accuracy.png` (accuracy by Llama 2 rating, the layout of its
Table 28). Every file is written atomically. In report.html a policy named best_of_N whose KL is
log N - (N - 1)/N shows it as "≤ value (bound)" with a note: that is the analytic bound, not a sampled KL;
meta entries that are mappings (the pipeline's "summary") get their own tables.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlhflab.core.io import atomic_write_bytes

SCHEMA = "rlhflab.report/1"
PROXY_KEYS = ("reward/mean", "reward/score", "reward/rm_mean")
GOLD_KEYS = ("gold/mean",)
KL_KEYS = ("kl/ref", "kl/mean", "kl/seq")
# Curve kind -> (metric names tried in order, namespace searched if none is logged).
CURVE_KEYS = {"proxy": (PROXY_KEYS, "reward/"), "gold": (GOLD_KEYS, "gold/"), "kl": (KL_KEYS, "kl/")}
RATING_ORDER = ("significantly_better", "better", "slightly_better", "negligibly_better")


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats -> None, numpy scalars -> Python, unknown objects dropped."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items() if _serializable(v)}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def _serializable(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, Mapping, list, tuple)) or hasattr(v, "item")


def _is_policy(metrics: Any) -> bool:
    """A policy's metric dict, as opposed to another entry (e.g. a per-policy "summary" of dicts)."""
    if not isinstance(metrics, Mapping):
        return False
    return not (metrics and all(isinstance(v, Mapping) for v in metrics.values()))


def _policies(policies: Mapping[str, Any]) -> dict[str, Mapping]:
    return {n: m for n, m in policies.items() if _is_policy(m)}


def _pick(rows: Sequence[Mapping], preferred: Sequence[str], prefix: str) -> str | None:
    keys = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for k in preferred:
        if k in keys:
            return k
    matches = sorted(k for k in keys if k.startswith(prefix))
    return matches[0] if matches else None


def _curve_key(rows: Sequence[Mapping], kind: str, overrides: Mapping[str, str] | None) -> str | None:
    preferred, prefix = CURVE_KEYS[kind]
    if overrides and kind in overrides:
        preferred = (overrides[kind], *preferred)
    return _pick(rows, preferred, prefix)


def _series(rows: Sequence[Mapping], key: str | None) -> tuple[list[float], list[float]]:
    if key is None:
        return [], []
    pts = [
        (r["step"], r[key])
        for r in rows
        if "step" in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (tight layout, 110 dpi); closes the figure."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def plot_gold_by_policy(policies: Mapping[str, Mapping]) -> bytes | None:
    """Bar chart of gold/mean with its 95% interval per policy."""
    policies = _policies(policies)
    names = [n for n, m in policies.items() if isinstance(m.get("gold/mean"), (int, float))]
    if not names:
        return None
    import matplotlib.pyplot as plt

    means = [policies[n]["gold/mean"] for n in names]
    ci = [policies[n].get("gold/ci95") or [m, m] for n, m in zip(names, means)]
    err = [
        [max(0.0, m - (c[0] if c[0] is not None else m)) for m, c in zip(means, ci)],
        [max(0.0, (c[1] if c[1] is not None else m) - m) for m, c in zip(means, ci)],
    ]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 3.6))
    ax.bar(names, means, yerr=err, capsize=4, color="#4c78a8")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("gold reward (mean, 95% CI)")
    ax.set_title("gold reward by policy")
    return figure_png(fig)


def plot_training_curves(
    curves: Mapping[str, Sequence[Mapping]], keys: Mapping[str, str] | None = None
) -> bytes | None:
    """Proxy reward, gold reward and KL against training step, one line per run."""
    if not curves:
        return None
    import matplotlib.pyplot as plt

    panels = (("proxy reward", "proxy"), ("gold reward", "gold"), ("KL to reference", "kl"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    drawn = False
    for ax, (title, kind) in zip(axes, panels):
        for run, rows in curves.items():
            key = _curve_key(rows, kind, keys)
            x, y = _series(rows, key)
            if x:
                ax.plot(x, y, marker=".", label=f"{run} ({key})")
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return figure_png(fig) if drawn else (plt.close(fig) or None)


def smooth_by_x(
    x: Sequence[float], y: Sequence[float], n_bins: int | None = None
) -> tuple[list[float], list[float]]:
    """Binned means of y over x: the points sorted by x, cut into `n_bins` bins of (nearly) equal count,
    each bin drawn at its (mean x, mean y). The x of the result strictly increases (bins whose mean x ties
    are merged), so a line through it is a curve over x, not a path through time.
    Default bins: about 8 points each, between 1 and 12."""
    pts = sorted(
        (float(a), float(b))
        for a, b in zip(x, y)
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in (a, b))
    )
    if not pts:
        return [], []
    if n_bins is None:
        n_bins = min(12, max(1, round(len(pts) / 8)))
    n_bins = max(1, min(n_bins, len(pts)))
    bins: list[list[tuple[float, float]]] = []
    for i in range(n_bins):
        chunk = pts[i * len(pts) // n_bins : (i + 1) * len(pts) // n_bins]
        if not chunk:
            continue
        mx = sum(p[0] for p in chunk) / len(chunk)
        if bins and mx <= sum(p[0] for p in bins[-1]) / len(bins[-1]):
            bins[-1].extend(chunk)  # same mean x as the previous bin (tied x values): one point
        else:
            bins.append(list(chunk))
    xs = [sum(p[0] for p in b) / len(b) for b in bins]
    ys = [sum(p[1] for p in b) / len(b) for b in bins]
    return xs, ys


def plot_gold_vs_proxy(
    curves: Mapping[str, Sequence[Mapping]], keys: Mapping[str, str] | None = None
) -> bytes | None:
    """Gold against proxy over training, and both against sqrt(KL) (reward over-optimization)."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    drawn = False
    for i, (run, rows) in enumerate(curves.items()):
        color = (
            f"C{i}"  # one colour per run in both panels; on the right, proxy solid (.) and gold dashed (x)
        )
        pk, gk, kk = (_curve_key(rows, kind, keys) for kind in ("proxy", "gold", "kl"))
        both = [
            r
            for r in rows
            if all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for k in (pk, gk) if k)
        ]
        if pk and gk and both:
            ax1.plot([r[pk] for r in both], [r[gk] for r in both], marker=".", label=run, color=color)
            ax1.annotate("end", (both[-1][pk], both[-1][gk]), fontsize=7, color=color)
            drawn = True
        if kk:
            # Per-iteration points are noisy and KL is not monotone in time, so joining them in time order
            # draws a zig-zag: show them as faint markers and, over them, binned means ordered by sqrt(KL).
            for key, style, marker in ((pk, "-", "."), (gk, "--", "x")):
                pts = [
                    (math.sqrt(max(0.0, r[kk])), r[key])
                    for r in rows
                    if key
                    and all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for k in (key, kk))
                ]
                if pts:
                    what = "proxy" if key == pk else "gold"
                    ax2.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        ls="none",
                        marker=marker,
                        markersize=3,
                        alpha=0.35,
                        color=color,
                    )
                    sx, sy = smooth_by_x([p[0] for p in pts], [p[1] for p in pts])
                    ax2.plot(sx, sy, style, lw=1.8, color=color, label=f"{run} {what}")
                    drawn = True
    ax1.set_xlabel("proxy reward (learned RM)")
    ax1.set_ylabel("gold reward")
    ax1.set_title("gold vs proxy during training")
    ax2.set_xlabel("sqrt(KL to reference)")
    ax2.set_title(
        "reward vs distance from the reference\n(points: iterations; lines: binned means)", fontsize=10
    )
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        return None
    return figure_png(fig)


def plot_rm_accuracy(reward_models: Mapping[str, Mapping]) -> bytes | None:
    """Grouped bars: pairwise accuracy per Llama 2 rating (and overall) for each reward model."""
    tables = {
        n: m["rm/accuracy_by_rating"] for n, m in reward_models.items() if m.get("rm/accuracy_by_rating")
    }
    if not tables:
        return None
    import matplotlib.pyplot as plt

    cols = [c for c in (*RATING_ORDER, "overall") if any(c in t for t in tables.values())]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(cols), 3.6))
    width = 0.8 / len(tables)
    for i, (name, table) in enumerate(tables.items()):
        ys = [(table.get(c) or {}).get("accuracy") for c in cols]
        ys = [y if isinstance(y, (int, float)) and math.isfinite(y) else 0.0 for y in ys]
        ax.bar([j + i * width for j in range(len(cols))], [100 * y for y in ys], width, label=name)
    ax.set_xticks([j + width * (len(tables) - 1) / 2 for j in range(len(cols))])
    ax.set_xticklabels([c.replace("_", " ") for c in cols], fontsize=8)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("reward model accuracy by preference rating")
    ax.legend(fontsize=7)
    return figure_png(fig)


def plot_gold_vs_kl(curves: Mapping[str, Sequence[Mapping]], policies: Mapping[str, Mapping]) -> bytes | None:
    """Held-out gold against sqrt(KL to the reference) over training, one line per method in step order (each
    point a snapshot's evaluation), and each final policy's point (with its 95% interval) marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for i, (run, rows) in enumerate(curves.items()):
        pts = [
            (math.sqrt(max(0.0, r["kl/ref"])), r["gold/mean"])
            for r in rows
            if all(
                isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for k in ("kl/ref", "gold/mean")
            )
        ]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", color=f"C{i}", label=run)
            drawn = True
        final = policies.get(run, {})
        if isinstance(final.get("gold/mean"), (int, float)) and isinstance(final.get("kl/ref"), (int, float)):
            lo, hi = final.get("gold/ci95") or (final["gold/mean"], final["gold/mean"])
            x, y = math.sqrt(max(0.0, final["kl/ref"])), final["gold/mean"]
            ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="*", ms=10, color=f"C{i}", capsize=3)
    ax.set_xlabel("sqrt(KL to the reference)")
    ax.set_ylabel("gold reward (held-out prompts)")
    ax.set_title(
        "gold vs distance from the reference over training\n(lines: snapshots; stars: final policies)"
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        return None
    return figure_png(fig)


PLOTS = {
    "gold_by_policy": lambda r: plot_gold_by_policy(r["policies"]),
    "gold_vs_kl": lambda r: plot_gold_vs_kl(r["curves"], r["policies"]),
    "training_curves": lambda r: plot_training_curves(r["rollout_curves"], r["curve_keys"]),
    "gold_vs_proxy": lambda r: plot_gold_vs_proxy(r["rollout_curves"], r["curve_keys"]),
    "rm_accuracy": lambda r: plot_rm_accuracy(r["reward_models"]),
}


def write_report(
    out_dir: str | Path,
    *,
    task: str | None = None,
    policies: Mapping[str, Mapping] | None = None,
    reward_models: Mapping[str, Mapping] | None = None,
    curves: Mapping[str, Sequence[Mapping]] | None = None,
    rollout_curves: Mapping[str, Sequence[Mapping]] | None = None,
    meta: Mapping | None = None,
    title: str = "rlhflab report",
    curve_keys: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write report.json, the PNG plots that have data, and report.html into `out_dir`.

    curve_keys: which logged metric is the "proxy", "gold" and "kl" curve (e.g. {"proxy": "reward/rm"});
    by default the first of `CURVE_KEYS` present, else the first metric of that namespace.

    Returns {"json": path, "html": path, PLOT: path, ...}.
    """
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "schema": SCHEMA,
        "title": title,
        "task": task,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "meta": _clean(dict(meta or {})),
        "policies": _clean(dict(policies or {})),
        "reward_models": _clean(dict(reward_models or {})),
        "curves": {k: _clean(list(v)) for k, v in (curves or {}).items()},
        "rollout_curves": {k: _clean(list(v)) for k, v in (rollout_curves or {}).items()},
        "curve_keys": dict(curve_keys or {}),
        "plots": {},
    }
    paths: dict[str, Path] = {}
    images: dict[str, bytes] = {}
    for name, make in PLOTS.items():
        png = make(report)
        if png:
            atomic_write_bytes(out / f"{name}.png", png)
            report["plots"][name] = f"{name}.png"
            paths[name], images[name] = out / f"{name}.png", png
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    atomic_write_bytes(out / "report.html", render_html(report, images).encode())
    paths["json"], paths["html"] = out / "report.json", out / "report.html"
    return paths


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    if (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(isinstance(x, (int, float, type(None))) for x in v)
    ):
        return f"[{_fmt(v[0], digits)}, {_fmt(v[1], digits)}]"
    if isinstance(v, Mapping):
        return _kv_table(v)  # a nested table, never a raw dict's repr
    return html.escape(str(v))


POLICY_COLUMNS = (
    ("gold/mean", "gold"),
    ("gold/ci95", "gold 95% CI"),
    ("gold/win_rate", "win rate vs ref"),
    ("gold/gain", "gold gain vs ref"),
    ("gold/gain_ci95", "gain 95% CI (paired)"),
    ("kl/ref", "KL to ref"),
    ("sample/len_mean", "length"),
    ("sample/distinct_2", "distinct-2"),
    ("sample/unigram_entropy", "entropy"),
    ("sample/eos_rate", "EOS rate"),
)


BOUND_NOTE = (
    "† best-of-n is a sampling procedure, not a trained model: its KL to the reference is not estimated from "
    "samples like the other rows but is the analytic value log n − (n − 1)/n nats, an upper bound "
    "(exact only for a continuous reward without ties; Stiennon et al. 2020, App. G)."
)


def _best_of_n_bound(name: str) -> float | None:
    """log n - (n - 1) / n for a policy named best_of_N / best-of-N (how the pipeline names it), else None."""
    from rlhflab.eval.best_of_n import best_of_n_kl_formula

    m = re.fullmatch(r"best[_-]of[_-](\d+)", str(name))
    n = int(m.group(1)) if m else 0
    return best_of_n_kl_formula(n) if n >= 1 else None


def _is_kl_bound(name: str, key: str, value: Any) -> bool:
    """Whether this cell is best-of-n's analytic KL bound rather than a sampled KL estimate."""
    bound = _best_of_n_bound(name)
    return (
        bound is not None
        and ("kl" in key.lower())
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isclose(value, bound, rel_tol=1e-6, abs_tol=1e-9)
    )


def _cell(name: str, key: str, value: Any) -> str:
    if _is_kl_bound(name, key, value):
        return f"<td title='analytic upper bound, not a sampled estimate'>≤ {_fmt(value)} (bound)&nbsp;†</td>"
    return f"<td>{_fmt(value)}</td>"


# Shown after the gold column when a policy has them: tasks whose gold has a harmlessness part (harm).
HARM_COLUMNS = (
    ("gold/helpfulness/benign", "helpfulness (benign)"),
    ("gold/harm/risky", "harm rate (risky)"),
    ("gold/refused/benign", "false refusals (benign)"),
)


def _policy_table(policies: Mapping[str, Mapping]) -> str:
    # Only metric dicts are policies: other entries (e.g. a "summary" of dicts) get their own tables.
    policies = _policies(policies)
    harm = [c for c in HARM_COLUMNS if any(c[0] in m for m in policies.values())]
    columns = (*POLICY_COLUMNS[:2], *harm, *POLICY_COLUMNS[2:])
    head = "".join(f"<th>{h}</th>" for _, h in columns)
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td>" + "".join(_cell(n, k, m.get(k)) for k, _ in columns) + "</tr>"
        for n, m in policies.items()
    )
    note = _bound_note(policies, [k for k, _ in columns])
    return f"<table><tr><th>policy</th>{head}</tr>{rows}</table>{note}"


BOUND_NOTE_SHORT = "† best-of-n's KL is the analytic upper bound log n − (n − 1)/n, not a sampled estimate."


def _bound_note(rows: Mapping[str, Mapping], keys: Sequence[str], short: bool = False) -> str:
    if any(_is_kl_bound(n, k, m.get(k)) for n, m in rows.items() for k in keys):
        return f"<p class='note'>{html.escape(BOUND_NOTE_SHORT if short else BOUND_NOTE)}</p>"
    return ""


def _mapping_table(name: str, value: Mapping) -> str:
    """A meta entry that is itself a mapping (e.g. the pipeline's per-policy "summary"), as its own table:
    rows x columns when every value is a mapping, else key/value rows. Never the raw dict text."""
    if value and all(isinstance(v, Mapping) for v in value.values()):
        cols = list(dict.fromkeys(k for v in value.values() for k in v))
        head = "".join(f"<th>{html.escape(str(c).replace('_', ' '))}</th>" for c in cols)
        rows = "".join(
            f"<tr><td>{html.escape(str(n))}</td>"
            + "".join(
                f"<td>{_kv(x)}</td>" if isinstance(x, Mapping) else _cell(str(n), str(c), x)
                for c, x in ((c, v.get(c)) for c in cols)
            )
            + "</tr>"
            for n, v in value.items()
        )
        table = f"<table><tr><th></th>{head}</tr>{rows}</table>" + _bound_note(value, cols, short=True)
    else:
        table = _kv_table(value)
    return f"<h3>{html.escape(str(name).replace('_', ' '))}</h3>{table}"


def _kv_table(value: Mapping) -> str:
    return (
        "<table>"
        + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_kv(v)}</td></tr>" for k, v in value.items())
        + "</table>"
    )


def _kv(v: Any) -> str:
    return _kv_table(v) if isinstance(v, Mapping) else _fmt(v)


def _rm_table(reward_models: Mapping[str, Mapping]) -> str:
    cols = (*RATING_ORDER, "overall")
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols)
    rows = ""
    for n, m in reward_models.items():
        t = m.get("rm/accuracy_by_rating") or {}
        cells = "".join(
            f"<td>{_fmt(100 * t[c]['accuracy'] if (t.get(c) or {}).get('accuracy') is not None else None, 1)}"
            f" <small>(n={(t.get(c) or {}).get('n', 0)})</small></td>"
            for c in cols
        )
        rows += (
            f"<tr><td>{html.escape(n)}</td>{cells}<td>{_fmt(m.get('rm/gold_accuracy'))}</td>"
            f"<td>{_fmt(m.get('rm/spearman_gold'))}</td></tr>"
        )
    return (
        f"<table><tr><th>reward model</th>{head}<th>gold accuracy</th><th>Spearman vs gold</th></tr>"
        f"{rows}</table>"
    )


def _examples(policies: Mapping[str, Mapping]) -> str:
    parts = []
    for n, m in _policies(policies).items():
        ex = m.get("examples") or []
        if ex:
            items = "".join(
                f"<tr><td>{html.escape(str(e.get('prompt')))}</td><td>{html.escape(str(e.get('response')))}"
                f"</td><td>{_fmt(e.get('gold'))}</td></tr>"
                for e in ex
            )
            parts.append(
                f"<h3>{html.escape(n)}</h3><table><tr><th>prompt</th><th>response</th><th>gold</th></tr>"
                f"{items}</table>"
            )
    return "".join(parts)


def render_html(report: Mapping, images: Mapping[str, bytes]) -> str:
    """One self-contained HTML page for a report dict (images inlined as data URIs)."""
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "font-size:13px;text-align:left}th{background:#f3f3f3}img{max-width:100%}"
        ".note{font-size:12px;color:#555;max-width:60em;margin-top:-0.5em}"
    )
    body = [
        f"<h1>{html.escape(str(report.get('title')))}</h1>",
        f"<p>task: <b>{html.escape(str(report.get('task')))}</b> &middot; "
        f"created {html.escape(report['created'])}</p>",
    ]
    meta = report.get("meta") or {}
    scalars = {k: v for k, v in meta.items() if not isinstance(v, Mapping)}
    if scalars:
        body.append(_kv_table(scalars))
    tables = [_mapping_table(k, v) for k, v in meta.items() if isinstance(v, Mapping) and v]
    if report.get("policies"):
        body += ["<h2>Policies (judged by the hidden gold reward)</h2>", _policy_table(report["policies"])]
        body += [
            _mapping_table(n, m) if isinstance(m, Mapping) else _kv_table({n: m})
            for n, m in report["policies"].items()
            if not _is_policy(m)
        ]
    body += tables
    if report.get("reward_models"):
        body += [
            "<h2>Reward models: pairwise accuracy (%) by preference rating</h2>",
            _rm_table(report["reward_models"]),
        ]
    for name, png in images.items():
        b64 = base64.b64encode(png).decode()
        body.append(f"<h2>{name.replace('_', ' ')}</h2><img alt='{name}' src='data:image/png;base64,{b64}'>")
    if report.get("policies"):
        body += ["<h2>Examples</h2>", _examples(report["policies"])]
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(str(report.get('title')))}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )
