"""CLI of the labelling app: `rlhflab label init|add-user|add-project|add-member|push|serve|stats|export`.

Every command takes `--db URL` (default: $RLHFLAB_LABEL_DB, else sqlite:///labels.db). Heavy imports happen in
the handlers; `push` alone loads torch (to sample from a policy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rlhflab.errors import UserError


def _db(args) -> str:
    return args.db or os.environ.get("RLHFLAB_LABEL_DB") or "sqlite:///labels.db"


def _store(args):
    _require_extras()
    from rlhflab.label.store import Store

    return Store(_db(args))


def _require_extras() -> None:
    missing = []
    for module in ("fastapi", "uvicorn", "sqlalchemy", "alembic", "argon2", "python_multipart"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(
            f"the labelling app needs {', '.join(missing)}: install them with pip install 'rlhflab[label]'"
        )


def cmd_init(args) -> int:
    _require_extras()
    from rlhflab.label.db import init_db

    revision = init_db(_db(args))
    print(f"database {_db(args)} is at schema {revision}")
    return 0


def cmd_add_user(args) -> int:
    store = _store(args)
    token = store.add_user(args.name, admin=args.admin, rotate=args.rotate)
    for project in args.project or []:
        store.add_member(project, args.name)
    role = "admin" if args.admin else "annotator"
    print(f"{role} {args.name}: login token (shown once, keep it secret):", file=sys.stderr)
    print(token)
    return 0


def cmd_add_project(args) -> int:
    store = _store(args)
    store.add_project(args.name, [a for a in args.aspects.split(",")])
    print(f"project {args.name} (ratings ask about: {args.aspects})")
    return 0


def cmd_add_member(args) -> int:
    _store(args).add_member(args.project, args.user)
    print(f"{args.user} labels project {args.project}")
    return 0


def _kind(args) -> str:
    if args.kind:
        return args.kind
    return "pairwise" if args.k == 2 else "ranking" if args.k > 2 else "thumbs"


def cmd_push(args) -> int:
    store = _store(args)
    kind = _kind(args)
    if (args.policy is None) == (args.responses is None):
        raise UserError("give either --policy DIR (with --prompts FILE) or --responses FILE")
    if kind == "segment" and args.policy is not None:
        raise UserError(
            "--kind segment items are clips of an agent: give them with --responses FILE, not --policy"
        )
    if args.responses:
        from rlhflab.label.push import read_items

        items, skipped = read_items(args.responses, None if kind in ("thumbs", "ratings") else args.k), 0
    else:
        if not args.prompts:
            raise UserError('--policy needs --prompts FILE (JSONL of {"prompt": ...})')
        from rlhflab.data import load_records
        from rlhflab.label.push import sample_items
        from rlhflab.rollout.generate import SamplingSettings

        prompts = [r.prompt for r in load_records(args.prompts, "prompt").records]
        settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        items, skipped = sample_items(args.policy, prompts, args.k, settings, seed=args.seed)
    if kind in ("thumbs", "ratings"):  # one response per item
        items = [{**it, "responses": [r]} for it in items for r in it["responses"]]
    try:
        store.counts(args.project)
    except UserError:
        store.add_project(args.project)
        print(f"created project {args.project}", file=sys.stderr)
    ids = store.push(args.project, kind, items, overlap=args.overlap)
    note = f" ({skipped} prompts left out: their samples repeated or were empty)" if skipped else ""
    print(f"queued {len(ids)} {kind} items in project {args.project}, {args.overlap} annotator(s) each{note}")
    return 0


def cmd_serve(args) -> int:
    _require_extras()
    import uvicorn

    from rlhflab.label.app import create_app
    from rlhflab.label.store import Store

    if args.lease_minutes < 0:
        raise UserError(f"--lease-minutes must be >= 0 (0: never), got {args.lease_minutes}")
    app = create_app(Store(_db(args), lease_minutes=args.lease_minutes))
    print(f"labelling app on http://{args.host}:{args.port} (database {_db(args)})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_stats(args) -> int:
    from rlhflab.label.stats import format_stats, project_stats

    stats = project_stats(_store(args), args.project)
    print(json.dumps(stats, indent=2, default=str) if args.json else format_stats(stats))
    return 0


def cmd_export(args) -> int:
    from rlhflab.data.readers import write_jsonl
    from rlhflab.label.export import export_records

    records = export_records(_store(args), args.project, args.format)
    if not records:
        raise UserError(f"project {args.project} has no labels to export as {args.format}")
    n = write_jsonl(records, args.out)
    print(f"wrote {n} {args.format} records to {args.out}")
    return 0


def register(sub) -> None:
    """Add `rlhflab label ...` to the main parser's subcommands."""
    label = sub.add_parser("label", help="the human-feedback web app: users, items, serving, stats, export")
    cmds = label.add_subparsers(dest="label_command", metavar="COMMAND")
    label.set_defaults(func=lambda args: label.print_help() or 2)

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = cmds.add_parser(name, help=help, description=help)
        p.add_argument("--db", metavar="URL", help="sqlite:///FILE.db or postgresql://USER:PASS@HOST/DB")
        p.set_defaults(func=func)
        return p

    add("init", cmd_init, "create the database, or migrate it to the newest schema")
    p = add("add-user", cmd_add_user, "create a user and print their login token (shown once)")
    p.add_argument("name")
    p.add_argument("--admin", action="store_true", help="may create users, projects and items, and export")
    p.add_argument("--project", action="append", metavar="P", help="make them a member of project P")
    p.add_argument("--rotate", action="store_true", help="give an existing user a new token")
    p = add("add-project", cmd_add_project, "create a labelling project")
    p.add_argument("name")
    p.add_argument("--aspects", default="helpful,honest,harmless", help="what ratings items ask about")
    p = add("add-member", cmd_add_member, "let a user label a project")
    p.add_argument("project")
    p.add_argument("user")
    p = add("push", cmd_push, "queue items: K responses per prompt from a policy, or from a file")
    p.add_argument("--project", required=True, help="the project (created if missing)")
    p.add_argument("--policy", metavar="DIR", help="a local HF causal LM to sample responses from")
    p.add_argument("--prompts", metavar="FILE", help="prompts to sample for (with --policy)")
    p.add_argument("--responses", metavar="FILE", help='JSONL of {"prompt", "responses": [...]} instead')
    p.add_argument("--k", type=int, default=2, help="responses per prompt (default 2)")
    p.add_argument(
        "--kind",
        choices=("pairwise", "ranking", "thumbs", "ratings", "segment"),
        help="default: from --k; segment: --responses holds two image data: URIs (clips) per item",
    )
    p.add_argument("--overlap", type=int, default=1, help="annotators per item (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p = add("serve", cmd_serve, "serve the labelling pages and the JSON API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8600)
    p.add_argument("--log-level", default="warning")
    p.add_argument(
        "--lease-minutes",
        type=float,
        default=60.0,
        help="hand an item to someone else when its annotator has not labelled it for this long (0: never)",
    )
    p = add("stats", cmd_stats, "counts, throughput, agreement, position bias, gold agreement")
    p.add_argument("--project", required=True)
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add(
        "export",
        cmd_export,
        "write a project's labels as pairs / rankings / unpaired / ratings / segments JSONL",
    )
    p.add_argument("--project", required=True)
    p.add_argument(
        "--format", choices=("pairs", "rankings", "unpaired", "ratings", "segments"), default="pairs"
    )
    p.add_argument("--out", required=True, metavar="FILE")
