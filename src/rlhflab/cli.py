"""`rlhflab <command>`: one subcommand per stage, plus the lab, evaluation and utilities.

User errors (bad config, bad data, missing files) print one clear line and exit with code 2; a
traceback means a bug in rlhflab. Heavy imports (torch, transformers) happen inside the handlers so
that `rlhflab --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from rlhflab import __version__
from rlhflab.errors import ConfigError, TrainingHealthError, UserError
from rlhflab.lab.cli import register as register_lab
from rlhflab.label.cli import register as register_label
from rlhflab.stages import STAGES

# The methods `rlhflab run --methods` knows (`rlhflab.pipeline.METHODS`, not imported here: it imports torch).
RUN_METHODS = (
    "sft, rm, ppo, ppo_kl0, dpo, rloo, grpo, online_dpo, iterative_dpo, pm, dno, best_of_n, expert_iteration, "
    "rejection_sampling, rest, feedme, quark, reward_conditioning"
)

EPILOG = """\
examples:
  rlhflab run                                   the whole pipeline on the built-in lab task
  rlhflab config show sft optim.lr=1e-5         print a stage's resolved config
  rlhflab sft --config configs/sft_tiny.yaml data.max_length=256
  rlhflab lab list                              the built-in tasks
"""


def _add_stage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config file (see `rlhflab config show STAGE`)")
    p.add_argument("--resume", action="store_true", help="continue the run in logging.output_dir exactly")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in logging.output_dir")
    p.add_argument(
        "--merge",
        action="store_true",
        help="with LoRA: write the full model with the adapters folded in, not the adapter alone "
        "(model.lora.merge=true)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=1e-5")


def cmd_version(args: argparse.Namespace) -> int:
    print(f"rlhflab {__version__}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from rlhflab.config import config_to_yaml, load_config

    cfg = load_config(args.stage, args.config, args.overrides)
    print(f"# resolved config of stage '{args.stage}'")
    print(config_to_yaml(cfg, comments=not args.no_comments), end="")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from rlhflab.config import load_config

    module_name, _ = STAGES[args.command]
    from rlhflab.lab.launch import lab_feedback, lab_task_of, resolve_lab

    overrides = [*args.overrides, *(["model.lora.merge=true"] if args.merge else [])]
    cfg = load_config(args.command, args.config, overrides)
    module = importlib.import_module(module_name)
    if hasattr(
        module, "preflight"
    ):  # checks that need no model: before a lab model is pretrained or data made
        module.preflight(cfg)
    par = None
    lab_names = [getattr(cfg, "ref_model", "") or "", cfg.model.name_or_path]
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and any(lab_task_of(n) for n in lab_names):
        from rlhflab.stages.parallel import DataParallel

        # Only for a lab model: the process group is joined here, before the stage's own checks.
        par = DataParallel()
    log = par.voice() if par is not None else print
    # algo.feedback=lab: the lab's simulated annotators, built here (stages never import the lab).
    feedback = lab_feedback(cfg, args.command, log=log)
    if par is not None:
        # Across processes the main one pretrains a missing lab model and makes missing lab data; the others then
        # find them cached (two builders of one cache entry would race).
        given = cfg
        cfg = par.main_first(lambda: resolve_lab(given, args.command, log=log))
    else:
        cfg = resolve_lab(cfg, args.command)
    extra = {"feedback": feedback} if feedback is not None else {}
    module.train(cfg, resume=args.resume, overwrite=args.overwrite, **extra)
    return 0


def cmd_import_gguf(args: argparse.Namespace) -> int:
    from rlhflab.models.gguf_import import import_gguf

    out = import_gguf(args.file, args.out_dir)
    print(f"wrote a Hugging Face model directory: {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from rlhflab.pipeline import run_pipeline

    run_pipeline(
        task=args.task,
        seed=args.seed,
        output_dir=args.output_dir,
        config_file=args.config,
        overrides=args.overrides,
        overwrite=args.overwrite,
        methods=args.methods.split(",") if args.methods else None,
        model=args.model,
        resume=args.resume,
        merge=args.merge,
    )
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    import importlib
    import inspect

    from rlhflab.experiments import EXPERIMENTS

    if args.name == "list":
        for name, (path, _) in EXPERIMENTS.items():
            module = importlib.import_module(path)
            print(f"{name}\n  claim:  {module.CLAIM}\n  source: {module.SOURCE}")
        return 0
    module = importlib.import_module(EXPERIMENTS[args.name][0])
    extra = {}
    if args.judge:
        if "judge" not in inspect.signature(module.run).parameters:
            raise UserError(f"--judge applies to experiments that ask an LM judge, not to {args.name}")
        extra["judge"] = args.judge
    if args.task:  # else each experiment's own default task (sentiment, or harm for those that need rules)
        extra["task"] = args.task
    module.run(
        seeds=args.seeds or list(getattr(module, "DEFAULT_SEEDS", (0, 1, 2))),
        output_dir=args.output_dir or f"runs/{args.name}",
        overrides=args.overrides,
        overwrite=args.overwrite,
        resume=args.resume,
        **extra,
    )
    return 0


def _add_experiment(sub) -> None:
    from rlhflab.experiments import EXPERIMENTS

    p = sub.add_parser(
        "experiment",
        help="reproduce a claim of the literature on the lab: result.json with a verdict, report.html",
        description="Experiments: "
        + "; ".join(f"{name}: {help_text}" for name, (_, help_text) in EXPERIMENTS.items()),
    )
    p.add_argument(
        "name",
        choices=["list", *EXPERIMENTS],
        help="which experiment; list: every experiment's claim and source",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds, each a full run (default 0 1 2; 0 for christiano, whose seed takes about 9 minutes)",
    )
    p.add_argument("--output-dir", default=None, help="where the runs and result.json go (runs/NAME)")
    p.add_argument(
        "--task", default=None, help="built-in lab task (default: the experiment's own, sentiment or harm)"
    )
    p.add_argument("--judge", default=None, metavar="DIR", help="the LM judge (rlaif): a local HF causal LM")
    p.add_argument("--overwrite", action="store_true", help="replace an existing experiment directory")
    p.add_argument("--resume", action="store_true", help="keep the seeds already finished, run the others")
    p.add_argument(
        "overrides", nargs="*", metavar="STAGE.KEY=VALUE", help="pipeline overrides for every seed"
    )
    p.set_defaults(func=cmd_experiment)


# `rlhflab control METHOD`: (the experiment that runs the method, or None, help)
CONTROL_METHODS = {
    "trex": (
        "trex",
        "T-REX: a per-state reward from ranked demonstrations (PPO checkpoints), then PPO on it",
    ),
    "drex": (
        "drex",
        "D-REX: rankings made by injecting noise into a behaviour-cloned policy, then T-REX and PPO",
    ),
    "cpl": ("cpl-control", "CPL: a policy learned from regret-labelled segment pairs by the CPL loss, no RL"),
    "christiano": (
        None,
        "deep RL from preferences: a reward-model ensemble fitted to segment comparisons while PPO trains on it; "
        "labels from a synthetic labeller or from people in `rlhflab label serve`",
    ),
}


def cmd_control(args: argparse.Namespace) -> int:
    import importlib

    from rlhflab.control import require_control
    from rlhflab.control.ppo import check_env_id
    from rlhflab.experiments import EXPERIMENTS

    experiment = CONTROL_METHODS[args.method][0]
    output_dir = args.output_dir or f"runs/control-{args.method}"
    if experiment is not None:  # one seed of the method, as its experiment runs it (and judges it)
        module = importlib.import_module(EXPERIMENTS[experiment][0])
        module.run(seeds=[args.seed], output_dir=output_dir, task=args.task, overrides=args.overrides,
                   overwrite=args.overwrite)  # fmt: skip
        return 0
    from rlhflab.control.christiano import ChristianoSettings

    settings = _settings_from(ChristianoSettings, args.overrides, "control christiano")
    env_id = args.task or "Pendulum-v1"
    check_env_id(env_id)
    require_control()
    labeller = _segment_labeller(args, env_id)
    _christiano(env_id, labeller, settings, args.seed, output_dir, args.overwrite)
    return 0


def _settings_from(cls, overrides, where: str):
    """A settings dataclass from KEY=VALUE overrides of its fields, each parsed as its default's type."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or key not in fields:
            raise ConfigError(
                f"{where}: '{item}' is not KEY=VALUE of a known setting; known: {', '.join(fields)}"
            )
        kind = type(fields[key].default)
        try:
            values[key] = kind(raw)
        except ValueError:
            raise ConfigError(f"{where}: {key} must be of type {kind.__name__}, got '{raw}'") from None
    return cls(**values)


def _segment_labeller(args: argparse.Namespace, env_id: str):
    """Who answers the segment comparisons: people through the labelling app, or the synthetic labeller."""
    if args.labeller == "human":
        from rlhflab.control.human import HumanSegmentLabeller

        if not args.label_project:
            raise ConfigError(
                "control christiano: --labeller human needs --label-project, a project of the labelling app "
                "(`rlhflab label add-project NAME`)"
            )
        if env_id != "Pendulum-v1":
            raise ConfigError(
                f"control christiano: --labeller human shows clips, which are drawn for Pendulum-v1 only, not "
                f"{env_id}; use --labeller synthetic there"
            )
        return HumanSegmentLabeller(
            args.label_db, args.label_project, overlap=args.label_overlap, timeout=args.label_timeout
        )
    if args.label_project:
        raise ConfigError(
            "control christiano: --label-project is for --labeller human; the synthetic labeller asks nobody"
        )
    from rlhflab.control.christiano import SyntheticLabeller

    return SyntheticLabeller(temperature=args.temperature, random_prob=args.random_prob, seed=args.seed)


def _christiano(env_id: str, labeller, settings, seed: int, output_dir: str, overwrite: bool) -> None:
    """One run of `learn_from_preferences`: OUT/result.json (settings, the true-return curve, each refit),
    OUT/policy.zip (stable-baselines3's PPO) and OUT/reward.pt (the ensemble's state)."""
    import dataclasses
    import json

    from rlhflab.control.christiano import learn_from_preferences
    from rlhflab.core.io import atomic_write_text
    from rlhflab.core.run_dir import prepare_run_dir

    out = prepare_run_dir(output_dir, "control-christiano", resume=False, overwrite=overwrite)
    print(f"control christiano: {env_id}, {settings.labels} labels ({settings.query} queries, labeller "
          f"{getattr(labeller, 'name', type(labeller).__name__)}), {settings.rl_steps} PPO steps, run dir {out}")  # fmt: skip

    def progress(entry: dict) -> None:
        print(f"  round {entry['round']} at {entry['env_steps']} steps: {entry['labels']} labels so far")

    result = learn_from_preferences(env_id, labeller, settings, seed, on_round=progress, save_dir=out)
    summary = {"env_id": env_id, "seed": seed, "settings": dataclasses.asdict(settings), **result}
    atomic_write_text(out / "result.json", json.dumps(summary, indent=1))
    last = result["curve"][-1]
    if result["labels_used"] < settings.labels:
        print(
            f"control christiano warning: {result['labels_used']} of the {settings.labels} queries were answered "
            "(the rest timed out or could not be told apart); with none the reward stays untrained"
        )
    print(
        f"control christiano: true return {last['true_return']:.1f} after {last['env_steps']} steps and "
        f"{result['labels_used']} labels; {out / 'result.json'}"
    )


def _add_control(sub) -> None:
    p = sub.add_parser(
        "control",
        help="preference learning on gymnasium control tasks: T-REX, D-REX, CPL, Christiano et al.",
        description="Reward learning from preferences over behaviour, judged by the environment's true reward "
        "(which the learner never sees). Needs `pip install 'rlhflab[control]'`.",
    )
    methods = p.add_subparsers(dest="method", metavar="METHOD", required=True)
    for method, (experiment, text) in CONTROL_METHODS.items():
        q = methods.add_parser(method, help=text, description=text)
        q.add_argument("--task", default=None, help="gymnasium environment id (default Pendulum-v1)")
        q.add_argument("--seed", type=int, default=0, help="seed of the run")
        q.add_argument("--output-dir", default=None, help=f"where it writes (runs/control-{method})")
        q.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
        if experiment is None:
            q.add_argument("--labeller", choices=["synthetic", "human"], default="synthetic",
                           help="synthetic: Bradley-Terry on the true segment returns with 10%% random answers; "
                           "human: people label clips in the labelling app")  # fmt: skip
            q.add_argument("--temperature", type=float, default=5.0, help="synthetic labeller's temperature")
            q.add_argument(
                "--random-prob", type=float, default=0.1, help="synthetic labeller's random answers"
            )
            q.add_argument("--label-db", default="sqlite:///labels.db", help="the labelling app's database")
            q.add_argument("--label-project", default=None, help="the labelling project people work in")
            q.add_argument("--label-overlap", type=int, default=1, help="annotators per comparison")
            q.add_argument(
                "--label-timeout", type=float, default=600.0, help="seconds to wait for each round"
            )
            help_text = "settings of the run, e.g. labels=200 query=random rl_steps=40960"
        else:
            help_text = f"settings, as `rlhflab experiment {experiment}` takes them (e.g. rl.steps=16384)"
        q.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=help_text)
        q.set_defaults(func=cmd_control)


def cmd_best_of_n(args: argparse.Namespace) -> int:
    from rlhflab.rollout.generate import SamplingSettings
    from rlhflab.stages.best_of_n import sample_to_file

    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if (args.rerank == "sparrow") != bool(args.rules):
        raise UserError(
            "--rerank sparrow needs --rules DIR (rule classifiers from `rlhflab rm algo.loss=binary`), and --rules needs --rerank sparrow"
        )
    settings = SamplingSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p
    )
    policy, prompts = args.policy, args.prompts
    if policy.startswith("lab:") or not prompts:
        from rlhflab.lab.launch import lab_data, lab_model_dir, lab_task_of
        from rlhflab.stages.parallel import DataParallel

        def resolve():
            task = lab_task_of(policy)
            data = (
                lab_data(task, seed=args.seed, kinds=("prompt",))["prompts"]
                if not prompts and task
                else prompts
            )
            return lab_model_dir(policy, seed=args.seed), str(data)

        # Across processes the main one builds (or finds) the lab's model and data first; the others read them.
        policy, prompts = DataParallel().main_first(resolve)
    sample_to_file(
        policy,
        args.reward,
        args.out,
        prompts_path=prompts,
        n=args.n,
        settings=settings,
        seed=args.seed,
        device=args.device,
        max_prompts=args.max_prompts,
        all_samples=args.all_samples,
        rules=args.rules or "",
        engine=args.engine,
    )
    return 0


def _load_lm(path: str, what: str):
    """(model, tokenizer) of a model directory or a LoRA adapter directory (its adapter folded in), for sampling."""
    from pathlib import Path

    from rlhflab.models.loading import is_adapter_dir, load_inference_lm, load_tokenizer

    p = Path(path)
    if not (p / "config.json").is_file() and not is_adapter_dir(p):
        raise UserError(
            f"{what} '{path}' is not a Hugging Face model directory (no config.json) nor a LoRA adapter "
            "directory (no adapter_config.json); give the output of a stage (e.g. runs/demo/sft/final) or "
            "`rlhflab lab base TASK`"
        )
    return load_inference_lm(p), load_tokenizer(p)


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rlhflab.eval.report import write_report
    from rlhflab.lab.evaluate import conditioning_of, evaluate_policy
    from rlhflab.lab.tasks import get_task
    from rlhflab.rollout.generate import SamplingSettings

    task = get_task(args.task)
    conditioning = conditioning_of(args.policy)  # a Quark model: sampled behind its best token
    if conditioning is not None:
        print(f"eval: a quark model, sampled behind its best token (id {conditioning.token_id})")
    model, tokenizer = _load_lm(args.policy, "--policy")
    ref_model = _load_lm(args.ref, "--ref")[0] if args.ref else None
    settings = SamplingSettings(
        max_new_tokens=args.max_new_tokens or task.max_new_tokens, temperature=args.temperature
    )
    metrics = evaluate_policy(
        model,
        tokenizer,
        task,
        n_prompts=args.n_prompts,
        n_samples=args.n_samples,
        ref_model=ref_model,
        settings=settings,
        seed=args.seed,
        conditioning=conditioning,
    )
    for key, value in metrics.items():
        if key != "examples":
            print(f"{key:>24}: {value if not isinstance(value, float) else round(value, 4)}")
    for ex in metrics["examples"][:3]:
        print(f"  [{ex['gold']:+.2f}] {ex['prompt']} -> {ex['response']}")
    if args.out:
        name = Path(args.policy).name or "policy"
        paths = write_report(
            args.out,
            task=task.name,
            policies={name: metrics},
            meta={"policy": args.policy, "ref": args.ref, "seed": args.seed},
            title=f"rlhflab eval: {name} on {task.name}",
        )
        print(f"report: {paths['html']}")
    return 0


def _add_best_of_n(sub) -> None:
    p = sub.add_parser(
        "best-of-n",
        help="best of n samples per prompt under a reward; SFT data for rejection sampling",
        description="Sample n responses per prompt from a policy, score them with a reward source, "
        "and write the best one per prompt as SFT records (prompt, completion, score): "
        "`rlhflab sft data.train_path=OUT` then fine-tunes on them (rejection sampling).",
    )
    p.add_argument("--policy", required=True, help="policy model directory, or lab:TASK")
    p.add_argument(
        "--reward",
        required=True,
        help="reward spec: a reward model directory (runs/rm/final[:head=NAME]) or a rule (rule:length), "
        "comma-separated to sum several",
    )
    p.add_argument("--out", required=True, help="output .jsonl")
    p.add_argument(
        "--prompts",
        default="",
        help="prompt records (JSONL/JSON/CSV/Parquet); default for a lab model: the lab's prompts",
    )
    p.add_argument(
        "--n",
        "--samples",
        dest="n",
        type=int,
        default=16,
        help="samples per prompt (default 16; under torchrun / accelerate launch write --samples: --n is ambiguous "
        "to their parsers)",
    )
    p.add_argument(
        "--rerank",
        choices=("none", "sparrow"),
        default="none",
        help="sparrow: pick by the reward and the rule classifiers' probabilities (Glaese et al. 2022)",
    )
    p.add_argument(
        "--rules", default=None, help="rule classifiers for --rerank sparrow: an `rm algo.loss=binary` model"
    )
    p.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0: all)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--all-samples", action="store_true", help="also write every sample and its score")
    p.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        default="hf",
        help="rollout engine: hf (transformers' generate, every device) or vllm (a CUDA GPU and rlhflab[vllm])",
    )
    p.set_defaults(func=cmd_best_of_n)


def cmd_judge(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from rlhflab.data import load_records
    from rlhflab.eval.judge import judge_agreement, judge_pointwise
    from rlhflab.models.judge import LMJudge, response_text
    from rlhflab.models.loading import check_model_dir

    check_model_dir(args.model, what="--model")
    records = load_records(args.pairs, "pairwise").records[: args.max_pairs or None]
    prompts = [r.prompt for r in records]
    chosen, rejected = (
        [response_text(r.chosen) for r in records],
        [response_text(r.rejected) for r in records],
    )
    gold = {}
    if args.task:  # lab data: the hidden gold's own choice, beside the file's labels
        from rlhflab.lab.gold import gold_scores
        from rlhflab.lab.tasks.base import prompt_text

        texts = [prompt_text(p) for p in prompts]
        gold = {
            "gold_chosen": gold_scores(args.task, texts, chosen),
            "gold_rejected": gold_scores(args.task, texts, rejected),
        }
    judge = LMJudge.from_pretrained(args.model, batch_size=args.batch_size)
    measure = judge_pointwise if args.pointwise else judge_agreement
    report = measure(judge, prompts, chosen, rejected, **gold)
    report.update(pairs_file=str(args.pairs), task=args.task)
    for key, value in report.items():
        if key != "per_pair":
            print(f"{key:>22}: {value}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_redteam(args: argparse.Namespace) -> int:
    import time

    from rlhflab.lab.launch import lab_task_of
    from rlhflab.stages.redteam import RedTeamPrompts, RedTeamSettings

    task = lab_task_of(args.target)
    if task is None and not args.red:
        raise UserError(
            f"--target {args.target} belongs to no lab task, so there is no default red LM; give --red DIR"
        )
    if task is not None:
        from rlhflab.lab.tasks import get_task

        lengths = {"red_max_new_tokens": get_task(task).max_new_tokens}
        lengths["target_max_new_tokens"] = args.max_new_tokens or get_task(task).max_new_tokens
    else:
        lengths = {"target_max_new_tokens": args.max_new_tokens or 64}
    settings = RedTeamSettings(
        n_prompts=args.n_prompts,
        n_examples=args.n_examples,
        threshold=args.threshold,
        temperature=args.temperature,
        rl_reward=args.rl_reward,
        seed=args.seed,
        batch_size=args.batch_size,
        **lengths,
    )
    templates = {k: getattr(args, k) for k in ("ask", "few_shot") if getattr(args, k) is not None}
    rl = [o[len("rl.") :] for o in args.overrides if o.startswith("rl.")]
    if len(rl) != len(args.overrides):
        bad = next(o for o in args.overrides if not o.startswith("rl."))
        raise UserError(f"override {bad!r}: redteam overrides configure the RL red LM, as rl.KEY=VALUE")
    common = {
        "methods": args.method.split(","),
        "out_dir": args.output_dir or f"runs/redteam-{time.strftime('%Y%m%d-%H%M%S')}",
        "rl_overrides": rl,
        "device": args.device,
        "overwrite": args.overwrite,
    }
    if task is not None:
        from rlhflab.lab.redteam import lab_prompts, run

        prompts = RedTeamPrompts(**{**vars(lab_prompts(task)), **templates}) if templates else None
        run(args.target, args.red or "", args.classifier or "", s=settings, prompts=prompts, **common)
    else:
        from rlhflab.stages.redteam import run

        run(
            args.target,
            args.red,
            args.classifier or "",
            prompts=RedTeamPrompts(**templates),
            s=settings,
            **common,
        )
    return 0


def _add_redteam(sub) -> None:
    p = sub.add_parser(
        "redteam",
        help="red teaming with a red LM: zero-shot, few-shot or RL test cases, attack success by a classifier",
        description="Red teaming language models with language models (Perez et al. 2022): a red LM writes test "
        "cases, the target answers them, rule classifiers flag harmful answers. Writes OUT/report.json (attack "
        "success with 95% intervals, distinct attacks, diversity, examples; on a lab task also by its hidden "
        "gold harm rule) and OUT/test_cases.jsonl.",
    )
    p.add_argument("--target", required=True, help="the model to red-team: a model directory, or lab:TASK")
    p.add_argument("--red", default=None, help="the red LM (default for a lab target: its task's base model)")
    p.add_argument(
        "--classifier",
        default=None,
        help="rule classifiers: an `rlhflab rm algo.loss=binary` model directory",
    )
    p.add_argument(
        "--method",
        default="zero-shot",
        metavar="LIST",
        help="comma-separated: zero-shot, few-shot (needs --classifier; runs zero-shot for its examples), rl "
        "(needs --classifier; trains the red LM with RLOO)",
    )
    p.add_argument("--n-prompts", type=int, default=256, help="test cases per method (default 256)")
    p.add_argument("--n-examples", type=int, default=3, help="few-shot examples per instruction (default 3)")
    p.add_argument("--threshold", type=float, default=0.5, help="P(harmful) above which an attack succeeded")
    p.add_argument(
        "--rl-reward", choices=("prob", "neglog"), default="prob", help="RL reward: P or -log(1-P)"
    )
    p.add_argument(
        "--ask", default=None, help="the zero-shot instruction (default: the lab task's or Perez's)"
    )
    p.add_argument("--few-shot", default=None, help="the few-shot instruction, with {examples}")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="longest answer (default: the task's, or 64)"
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch-size", type=int, default=64,
        help="test cases per generation batch (default 64): the unit shared out across processes",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--output-dir", default=None, help="where report.json and test_cases.jsonl go")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    p.add_argument(
        "overrides", nargs="*", metavar="rl.KEY=VALUE", help="RL red LM (rloo) keys: rl.algo.iterations=100"
    )
    p.set_defaults(func=cmd_redteam)


def cmd_retrieve(args: argparse.Namespace) -> int:
    from rlhflab.rollout.retrieval import retrieve_file

    summary = retrieve_file(
        args.corpus, args.prompts, args.out, k=args.k, template=args.template, field=args.field,
        corpus_field=args.corpus_field,
    )  # fmt: skip
    print(
        f"{summary['with_evidence']} of {summary['records']} prompts got evidence from {summary['passages']} "
        f"passages (mean top BM25 score {summary['mean_top_score']:.2f}) -> {args.out}"
    )
    return 0


def _add_retrieve(sub) -> None:
    from rlhflab.rollout.retrieval import EVIDENCE_TEMPLATE

    p = sub.add_parser(
        "retrieve",
        help="put evidence in front of prompts: BM25 over a local corpus (Sparrow's search, no network)",
        description="Search a local corpus with BM25 for each prompt and write the prompts with the best "
        "passages in front (by --template), plus 'evidence' and 'evidence_scores' fields. Train or sample any "
        "stage on the result (e.g. `rlhflab best-of-n --prompts OUT`). A lab task's corpus is DATA/corpus.jsonl "
        "from `rlhflab lab data`.",
    )
    p.add_argument(
        "--corpus", required=True, help="passages: JSONL/JSON/CSV/Parquet with a text field, or .txt"
    )
    p.add_argument(
        "--prompts", required=True, help="prompts file (a prompt string or conversation per record)"
    )
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--k", type=int, default=1, help="passages per prompt (default 1)")
    p.add_argument(
        "--template",
        default=EVIDENCE_TEMPLATE,
        help=f"with {{passage}} and {{prompt}} (default {EVIDENCE_TEMPLATE!r})",
    )
    p.add_argument("--field", default="prompt", help="the prompts' field (default prompt)")
    p.add_argument("--corpus-field", default="text", help="the corpus records' passage field (default text)")
    p.set_defaults(func=cmd_retrieve)


def _add_judge(sub) -> None:
    p = sub.add_parser(
        "judge",
        help="an LM judge on labelled pairs: agreement with the labels (and gold), position bias, pairs/s",
    )
    p.add_argument("--model", required=True, help="local HF causal LM directory (an instruct model)")
    p.add_argument("--pairs", required=True, help="pairwise file (prompt, chosen, rejected)")
    p.add_argument("--task", default=None, help="lab task the pairs come from: also agreement with its gold")
    p.add_argument("--max-pairs", type=int, default=0, help="judge only the first N pairs (0: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--pointwise",
        action="store_true",
        help="rate each response alone (expected 1-5 rating), not the pair",
    )
    p.add_argument("--out", default=None, help="write the report (with every pair's verdict) as JSON")
    p.set_defaults(func=cmd_judge)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a policy on a lab task with the hidden gold reward")
    p.add_argument("--policy", required=True, help="HF model directory of the policy")
    p.add_argument("--task", default="sentiment", help="lab task (see `rlhflab lab list`)")
    p.add_argument("--ref", default=None, help="reference model directory (KL and win rate)")
    p.add_argument("--n-prompts", type=int, default=64)
    p.add_argument("--n-samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for report.json / report.html")
    p.set_defaults(func=cmd_eval)


def cmd_cai(args: argparse.Namespace) -> int:
    from rlhflab.config import load_config
    from rlhflab.lab.launch import lab_data, lab_model_dir, lab_task_of
    from rlhflab.stages import cai

    cfg = load_config(f"cai-{args.phase}", args.config, args.overrides)
    cai.preflight(cfg)  # the principles file, before a lab model is pretrained or data made
    task = lab_task_of(cfg.model.name_or_path)
    prompts = ""
    if task is not None and not cfg.data.train_path:  # a lab model: the lab task's training prompts
        prompts = str(lab_data(task, seed=cfg.seed, kinds=("prompt",))["prompts"])
    cfg = cai.resolve_names(cfg, lambda name: lab_model_dir(name, seed=cfg.seed), prompts)
    cai.train(cfg, overwrite=args.overwrite)
    return 0


def _add_cai(sub) -> None:
    p = sub.add_parser(
        "cai",
        help="Constitutional AI: sl (critique -> revision -> SFT) or rl (AI-labelled pairs -> RM -> PPO)",
        description="Constitutional AI (Bai et al. 2022). sl: the policy answers prompts, critiques and revises "
        "its answers under principles of a constitution (principles=FILE), and is fine-tuned on the revisions "
        "(RUN/revisions.jsonl, RUN/sft/final). rl: a feedback model says which of two samples is better under a "
        "principle; a reward model learns those labels and PPO optimizes against it (RUN/pairs.jsonl, "
        "RUN/ppo/final). `rlhflab config show cai-sl` (cai-rl) documents every key.",
    )
    # A subcommand per phase, not a positional: overrides may then follow --config (`cai sl --config F k=v`).
    phases = p.add_subparsers(dest="phase", metavar="PHASE", required=True)
    for phase, text in (
        ("sl", "SL-CAI: sample, critique and revise under the principles, then SFT on the revisions"),
        ("rl", "RL-CAI: AI-labelled pairs under the principles, a reward model on them, then PPO"),
    ):
        q = phases.add_parser(phase, help=text, description=text)
        q.add_argument(
            "--config", metavar="FILE", help=f"YAML config file (`rlhflab config show cai-{phase}`)"
        )
        q.add_argument(
            "--overwrite", action="store_true", help="replace an existing run in logging.output_dir"
        )
        q.add_argument(
            "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. sft.optim.lr=1e-4"
        )
        q.set_defaults(func=cmd_cai)


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run", help="the main job: lab data -> SFT -> reward model -> policies -> gold evaluation"
    )
    p.add_argument(
        "--task",
        default=None,
        help="built-in lab task (see `rlhflab lab list`; default sentiment, or review with --model)",
    )
    p.add_argument(
        "--model",
        metavar="DIR",
        default=None,
        help="start from this local HF causal LM (e.g. SmolLM2-135M-Instruct from `rlhflab import-gguf`) "
        "instead of the task's tiny base model: LoRA and budgets for a real model (about 30 min on 2 cores)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for data, training and evaluation")
    p.add_argument("--output-dir", default="runs/demo", help="where the stages and the report go")
    p.add_argument(
        "--config", metavar="FILE", help="YAML with per-stage overrides: {sft: {...}, rm: {...}, ...}"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --output-dir")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir (same arguments): finished stages kept, the interrupted one "
        "resumed from its last checkpoint",
    )
    p.add_argument(
        "--merge", action="store_true", help="LoRA methods write full merged models, not adapters alone"
    )
    p.add_argument(
        "--methods",
        metavar="LIST",
        help="comma-separated methods to train and compare (default: sft,rm,ppo,ppo_kl0,dpo,best_of_n; "
        "'all': every one); what a method needs is added (ppo needs rm and sft). Known: " + RUN_METHODS,
    )
    p.add_argument("overrides", nargs="*", metavar="STAGE.KEY=VALUE", help="e.g. sft.optim.lr=1e-4")
    p.set_defaults(func=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhflab",
        description="RLHF and its alternatives, end to end, with honest measurement.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_run(sub)

    for name, (_, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_stage_args(p)
        p.set_defaults(func=cmd_stage)

    _add_best_of_n(sub)
    _add_cai(sub)
    _add_experiment(sub)
    _add_control(sub)

    p = sub.add_parser("config", help="inspect stage configs")
    config_sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_sub.add_parser(
        "show", help="print the resolved config of a stage, with every field documented"
    )
    show.add_argument("stage", help="sft, rm, dpo or ppo")
    show.add_argument("--config", metavar="FILE", help="YAML config file to start from")
    show.add_argument("--no-comments", action="store_true", help="print bare YAML")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    show.set_defaults(func=cmd_config_show)

    p = sub.add_parser("import-gguf", help="turn a GGUF file into a normal Hugging Face model directory")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("out_dir", help="output directory (created)")
    p.set_defaults(func=cmd_import_gguf)

    register_lab(sub)
    register_label(sub)

    _add_eval(sub)
    _add_judge(sub)
    _add_redteam(sub)
    _add_retrieve(sub)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)
    return parser


def _check_processes(command: str) -> None:
    """Only the data-parallel stages start in several processes: any other command would run once per process,
    each alone, all writing the same run directory; and only some of them with a sharded model (FSDP)."""
    from rlhflab.stages import DATA_PARALLEL_STAGES, DEEPSPEED_STAGES, FSDP_STAGES

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and command not in DATA_PARALLEL_STAGES:
        raise ConfigError(
            f"rlhflab {command} does not run across processes (WORLD_SIZE={world}): only "
            f"{', '.join(DATA_PARALLEL_STAGES)} do; launch it as one process"
        )
    for engine, stages in (("FSDP", FSDP_STAGES), ("DeepSpeed", DEEPSPEED_STAGES)):
        used = os.environ.get(f"ACCELERATE_USE_{engine.upper()}", "").lower() == "true"
        # `rlhflab run` checks its methods' stages itself (`pipeline.check_processes`).
        if world > 1 and used and command not in (*stages, "run"):
            raise ConfigError(
                f"rlhflab {command} does not run under {engine} (an accelerate config with {engine}): only "
                f"{', '.join(stages)} do; launch it with configs/accelerate/ddp.yaml"
            )


def main(argv: list[str] | None = None) -> int:
    # Our own progress bars carry the ETA; HF's per-file "Loading weights" bars would only bury them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _check_processes(args.command)
        return int(args.func(args) or 0)
    except UserError as e:
        if not isinstance(e, TrainingHealthError):
            from rlhflab.core.run_dir import discard_fresh_runs

            discard_fresh_runs()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
