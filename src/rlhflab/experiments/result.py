"""What every experiment writes: result.json, its plots and a self-contained report.html.

result.json (schema "rlhflab.experiment/1"):

    {
      "schema": "rlhflab.experiment/1",
      "experiment": str,                  # the name `rlhflab experiment NAME` runs
      "claim": str,                       # the claim, in one sentence
      "source": str,                      # the papers it comes from (authors, year, figure or table)
      "verdict": "reproduced" | "partly reproduced" | "not reproduced",
      "rule": str,                        # how the verdict follows from the table, fixed before the run
      "findings": [str, ...],             # the numbers the verdict rests on, in words
      "table": [{COLUMN: value, ...}],    # one row per method and seed, then the per-method summary rows
      "plots": {NAME: FILE.png},          # written next to result.json
      "runtime_s": float, "seeds": [int], "command": str, "created": ISO 8601 UTC time
    }

Numbers that are not finite are written as null. Every file is written atomically (temporary file, then
rename), so an interrupted experiment leaves no half-written result.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhflab.core.io import atomic_write_bytes, atomic_write_text

SCHEMA = "rlhflab.experiment/1"
VERDICTS = ("reproduced", "partly reproduced", "not reproduced")


def _clean(value: Any) -> Any:
    """JSON-ready: non-finite floats -> None, tuples -> lists, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_result(
    out_dir: str | Path,
    *,
    experiment: str,
    claim: str,
    source: str,
    verdict: str,
    rule: str,
    findings: Sequence[str],
    table: Sequence[Mapping[str, Any]],
    images: Mapping[str, bytes | None],
    runtime_s: float,
    seeds: Sequence[int],
    command: str,
) -> dict[str, Path]:
    """Write OUT/result.json, OUT/NAME.png for each image and OUT/report.html; returns their paths."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    for name, png in images.items():
        if png is not None:
            atomic_write_bytes(out / f"{name}.png", png)
            plots[name] = f"{name}.png"
    result = _clean(
        {
            "schema": SCHEMA,
            "experiment": experiment,
            "claim": claim,
            "source": source,
            "verdict": verdict,
            "rule": rule,
            "findings": list(findings),
            "table": [dict(row) for row in table],
            "plots": plots,
            "runtime_s": float(runtime_s),
            "seeds": [int(s) for s in seeds],
            "command": command,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    atomic_write_text(out / "result.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "report.html", render_html(result, {n: images[n] for n in plots}))
    return {"json": out / "result.json", "html": out / "report.html"}


def publish(out_dir: str | Path, *, experiment: str, findings: Sequence[str], **result: Any) -> Path:
    """`write_result`, then the verdict and its findings on the terminal; returns the path of report.html."""
    paths = write_result(out_dir, experiment=experiment, findings=findings, **result)
    print(f"{experiment}: {result['verdict']}")
    for line in findings:
        print(f"  {line}")
    print(f"report: {paths['html']}")
    return paths["html"]


def command_line(
    name: str, seeds: Sequence[int], output_dir: str, overrides: Sequence[str], flags: str = ""
) -> str:
    """The command that reruns an experiment: `rlhflab experiment NAME [OVERRIDES] [FLAGS] --seeds ... --output-dir
    DIR`. The overrides come before the options: `--seeds` takes every number after it, so the command line
    accepts them only there."""
    words = ["rlhflab", "experiment", name, *overrides, *([flags] if flags else [])]
    return " ".join([*words, "--seeds", *map(str, seeds), "--output-dir", str(output_dir)])


def publish_run(
    module: str,
    out_dir: str | Path,
    *,
    started: float,
    seeds: Sequence[int],
    output_dir: str,
    overrides: Sequence[str],
    flags: str = "",
    **result: Any,
) -> Path:
    """`publish` for the experiment module named `module` (its NAME, CLAIM, SOURCE and RULE), with the runtime
    since `started` and the command that reruns it; `result`: verdict, findings, table, images."""
    import sys
    import time

    m = sys.modules[module]
    return publish(
        out_dir,
        experiment=m.NAME,
        claim=m.CLAIM,
        source=m.SOURCE,
        rule=m.RULE,
        runtime_s=time.time() - started,
        seeds=seeds,
        command=command_line(m.NAME, seeds, output_dir, overrides, flags),
        **result,
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):  # counts (label budgets) print whole, rates and rewards to 3 decimals
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 10 else f"{value:.3f}"
    return html.escape(str(value))


def render_html(result: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    """One self-contained page: the claim, the verdict and its rule, the findings, the table, the plots."""
    e = html.escape
    columns: list[str] = []
    for row in result["table"]:
        columns += [c for c in row if c not in columns]
    head = "".join(f"<th>{e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(row.get(c))}</td>" for c in columns) + "</tr>" for row in result["table"]
    )
    figures = "".join(
        f'<figure><img alt="{e(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{e(name)}</figcaption></figure>"
        for name, png in images.items()
    )
    findings = "".join(f"<li>{e(f)}</li>" for f in result["findings"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{e(result["experiment"])}</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .5em;text-align:right}} .verdict{{font-size:1.3em}}</style></head>
<body><h1>rlhflab experiment: {e(result["experiment"])}</h1>
<p><b>Claim.</b> {e(result["claim"])}</p><p><b>Source.</b> {e(result["source"])}</p>
<p class="verdict"><b>Verdict: {e(result["verdict"])}</b></p><p><b>Rule.</b> {e(result["rule"])}</p>
<ul>{findings}</ul>
<table><tr>{head}</tr>{body}</table>
{figures}
<p>Seeds {e(str(result["seeds"]))}; {result["runtime_s"]:.0f} s; <code>{e(result["command"])}</code>;
{e(result["created"])}</p>
</body></html>
"""
