"""CLI of the lab: `rlhflab lab list|base|data`.

`register(subparsers)` adds the commands to the main parser; each handler returns an exit code and raises
`UserError` for anything the user can fix. Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json


def _thresholds(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return values  # type: ignore[return-value]


def cmd_lab_list(args: argparse.Namespace) -> int:
    from rlhflab.lab.tasks import DEFAULT_TASK, TASKS

    for name, cls in TASKS.items():
        mark = " (default)" if name == DEFAULT_TASK else ""
        print(f"{name}{mark}: {cls.description}")
    return 0


def cmd_lab_base(args: argparse.Namespace) -> int:
    from rlhflab.lab.pretrain import ensure_base_model
    from rlhflab.lab.tasks import get_task

    path = ensure_base_model(
        get_task(args.task), budget=args.budget, seed=args.seed, cache_dir=args.cache_dir, verbose=True
    )
    info = json.loads((path / "lab_info.json").read_text())
    print(f"base model of '{args.task}': {path}")
    print(
        f"  {info['parameters']} parameters, {info['steps']} steps, final loss {info['final_loss']:.3f}, "
        f"pretrained in {info['seconds']} s"
    )
    return 0


def cmd_lab_data(args: argparse.Namespace) -> int:
    from rlhflab.lab.annotators import AnnotatorSettings
    from rlhflab.lab.make_data import make_task_data
    from rlhflab.lab.tasks import get_task

    settings = AnnotatorSettings(
        temperature=args.temperature,
        noise=args.noise,
        n_annotators=args.n_annotators,
        length_bias=args.length_bias,
        bias_spread=args.bias_spread,
        tie_margin=args.tie_margin,
        keep_ties=args.keep_ties,
        rating_thresholds=args.rating_thresholds,
        margin_table=None if args.margin == "none" else args.margin,
    )
    paths = make_task_data(
        get_task(args.task),
        args.out,
        n_sft=args.n_sft,
        n_pairs=args.n_pairs,
        n_prompts=args.n_prompts,
        n_heldout=args.n_heldout,
        n_rankings=args.n_rankings,
        k=args.k,
        n_unpaired=args.n_unpaired,
        n_steps=args.n_steps,
        n_helpful_pairs=args.n_helpful_pairs,
        n_safety_pairs=args.n_safety_pairs,
        n_rule_labels=args.n_rule_labels,
        annotator_settings=settings,
        pair_source=args.pair_source,
        seed=args.seed,
        chat=not args.plain_text,
        budget=args.budget,
        cache_dir=args.cache_dir,
    )
    manifest = json.loads(paths["manifest"].read_text())
    for kind, path in paths.items():
        n = manifest["counts"].get(kind)
        print(f"{kind:>13}: {path}" + (f"  ({n} records)" if n is not None else ""))
    pairs, gold = manifest["pairs"], manifest["gold"]
    if pairs.get("agreement_with_gold") is not None:
        print(
            f"annotators agree with gold on {100 * pairs['agreement_with_gold']:.1f}% of pairs "
            f"(Bradley-Terry prediction {100 * pairs['predicted_agreement']:.1f}%); "
            f"ratings {pairs['ratings']}"
        )
    if gold.get("sft_data"):
        print(
            f"gold of the SFT data {gold['sft_data']['mean']:.3f}; best achievable about "
            f"{gold['best_achievable_heldout']:.3f}"
        )
    return 0


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", help="task name (see `rlhflab lab list`)")
    p.add_argument("--out", required=True, help="output directory for the JSONL files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-sft", type=int, default=2000, help="SFT demonstrations")
    p.add_argument(
        "--n-pairs", type=int, default=2000, help="annotated preference pairs (before dropping ties)"
    )
    p.add_argument("--n-prompts", type=int, default=1000, help="RL training prompts")
    p.add_argument("--n-heldout", type=int, default=256, help="held-out evaluation prompts")
    p.add_argument("--n-rankings", type=int, default=0, help="K-wise rankings (InstructGPT style)")
    p.add_argument("--k", type=int, default=4, help="responses per ranking")
    p.add_argument("--n-unpaired", type=int, default=0, help="unpaired good/bad labels (KTO style)")
    p.add_argument("--n-steps", type=int, default=0, help="per-step process labels (arith only)")
    p.add_argument(
        "--n-helpful-pairs", type=int, default=0, help="pairs judged on helpfulness alone (harm only)"
    )
    p.add_argument(
        "--n-safety-pairs",
        type=int,
        default=0,
        help="pairs on risky prompts with Llama 2's safety label (harm only)",
    )
    p.add_argument(
        "--n-rule-labels",
        type=int,
        default=0,
        help="responses labelled for each rule, one file per rule (Sparrow; harm only)",
    )
    p.add_argument(
        "--pair-source",
        default="demonstrator",
        help="responses to annotate: 'demonstrator', 'base' or a model directory",
    )
    g = p.add_argument_group("annotators")
    g.add_argument(
        "--temperature", type=float, default=0.1, help="Bradley-Terry temperature (0 = deterministic)"
    )
    g.add_argument("--noise", type=float, default=0.0, help="label flip probability in [0, 0.5]")
    g.add_argument("--n-annotators", type=int, default=1)
    g.add_argument(
        "--length-bias",
        type=float,
        default=0.0,
        help="the annotators' shared length bias (gold per 10 words; > 0 prefers longer answers)",
    )
    g.add_argument(
        "--bias-spread",
        type=float,
        default=0.0,
        help="std of annotators' own length bias (gold per 10 words)",
    )
    g.add_argument("--tie-margin", type=float, default=0.0, help="perceived gold gaps below this are ties")
    g.add_argument("--keep-ties", action="store_true", help="write ties as negligibly_better pairs")
    g.add_argument(
        "--rating-thresholds",
        type=_thresholds,
        default=(0.1, 0.3, 0.6),
        metavar="T1,T2,T3",
        help="gold gaps for slightly_better, better, significantly_better",
    )
    g.add_argument(
        "--margin", choices=("small", "large", "none"), default="small", help="Llama 2 margin table"
    )
    p.add_argument(
        "--plain-text", action="store_true", help="write prompts as plain text instead of chat messages"
    )
    p.add_argument("--budget", default="default", help="base model budget when --pair-source base")
    p.add_argument(
        "--cache-dir", default=None, help="cache root (default $RLHFLAB_CACHE or ~/.cache/rlhflab)"
    )


def register(subparsers) -> None:
    """Add `lab` (list, base, data) to an argparse subparsers object."""
    lab = subparsers.add_parser("lab", help="built-in tasks with hidden gold rewards: list, base model, data")
    lab_sub = lab.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    p = lab_sub.add_parser("list", help="the built-in tasks")
    p.set_defaults(func=cmd_lab_list)
    p = lab_sub.add_parser("base", help="pretrain (or find in the cache) a task's base model; print its path")
    p.add_argument("task")
    p.add_argument("--budget", choices=("default", "tiny"), default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=cmd_lab_base)
    p = lab_sub.add_parser("data", help="make SFT, preference and prompt data with simulated annotators")
    _add_data_args(p)
    p.set_defaults(func=cmd_lab_data)
