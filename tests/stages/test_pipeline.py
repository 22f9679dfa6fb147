"""`rlhflab run` end to end on a tiny budget: every stage runs, the report holds the promised fields."""

from __future__ import annotations

import json
import math

import pytest

from rlhflab.cli import RUN_METHODS, main
from rlhflab.config import load_config
from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import ConfigError
from rlhflab.lab.evaluate import heldout_pairs
from rlhflab.lab.gold import gold_scores
from rlhflab.pipeline import DEFAULT_METHODS, METHODS, _user_sections, resolve_methods, run_pipeline
from rlhflab.rewards import LearnedReward

TINY = [
    "data.n_sft=64",
    "data.n_pairs=64",
    "data.n_prompts=32",
    "data.n_heldout=16",
    "eval.prompts=4",
    "eval.samples=2",
    "eval.best_of_n=2",
    "sft.model.name_or_path=lab:sentiment:tiny",
    "sft.optim.max_steps=3",
    "rm.optim.max_steps=3",
    "rm.data.eval_fraction=0.25",
    "ppo.algo.iterations=2",
    "ppo.algo.rollout_batch_size=8",
    "ppo.algo.minibatch_size=4",
    "ppo_kl0.algo.iterations=2",
    "ppo_kl0.algo.rollout_batch_size=8",
    "ppo_kl0.algo.minibatch_size=4",
    "dpo.optim.max_steps=3",
]


def test_pipeline_runs_every_stage_and_writes_the_report(tmp_path, tiny_lab_cache, capsys):
    html = run_pipeline(output_dir=str(tmp_path / "run"), seed=3, overrides=TINY)
    out = tmp_path / "run"
    assert html == out / "report.html" and html.read_text().startswith("<!")
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "sentiment" and report["seed"] == 3
    assert report["runtime_s"] == report["meta"]["runtime_s"]
    assert 0 < report["meta"]["curves_eval_s"] < report["runtime_s"]  # the held-out curves' own seconds
    # The held-out RM accuracy is the saved RM's on the lab's held-out pairs for seed 3, recomputed here by hand.
    rm = report["reward_models"]["rm"]
    accuracy = report["reward_model"]["heldout_accuracy"]
    assert accuracy == rm["rm/accuracy"] == rm["rm/accuracy_by_rating"]["overall"]["accuracy"]
    pairs = heldout_pairs("sentiment", seed=3)
    scorer = LearnedReward.from_pretrained(out / "rm" / "final")
    chosen = scorer.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs]).tolist()
    rejected = scorer.score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs]).tolist()
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)]
    assert rm["rm/n_pairs"] == len(pairs) and accuracy == pytest.approx(sum(wins) / len(wins))
    assert set(report["policies"]) == {"sft", "ppo", "ppo_kl0", "dpo", "best_of_2"}
    # Label budget: SFT none; the RM's methods and DPO every pair the annotators were asked (ties included).
    lab_pairs = json.loads((out / "data" / "lab_data.json").read_text())["pairs"]
    offline_labels = lab_pairs["n"] + lab_pairs["ties"]
    assert lab_pairs["n"] == len((out / "data" / "pairs.jsonl").read_text().splitlines())
    for name, row in report["policies"].items():
        assert set(row) == {
            "gold_reward_mean",
            "gold_reward_ci95",
            "win_rate_vs_sft",
            "kl_to_sft",
            "mean_length",
            "label_queries",
            "gold_gain_vs_sft",
            "gold_gain_vs_sft_ci95",
        }
        # The summary row is the policy's gold evaluation, field by field.
        m = report["policy_metrics"][name]
        lo, hi = m["gold/ci95"]
        assert row.pop("gold_gain_vs_sft_ci95") == pytest.approx(m["gold/gain_ci95"]), name
        assert row == pytest.approx(
            {
                "gold_reward_mean": m["gold/mean"],
                "gold_reward_ci95": (hi - lo) / 2,
                "win_rate_vs_sft": m["gold/win_rate"],
                "kl_to_sft": m["kl/ref"],
                "mean_length": m["sample/len_mean"],
                "label_queries": 0 if name == "sft" else offline_labels,
                "gold_gain_vs_sft": m["gold/gain"],
            }
        ), name
        # Every row is judged against the same SFT samples (as many per prompt as the row's own): the paired
        # gain is the difference of the means, and SFT's own samples score gold/ref_mean.
        sft_gold = report["policy_metrics"]["sft"]["gold/ref_mean"]
        assert row["gold_gain_vs_sft"] == pytest.approx(row["gold_reward_mean"] - sft_gold), name
        glo, ghi = m["gold/gain_ci95"]
        assert glo < row["gold_gain_vs_sft"] < ghi, name
        assert m["eval/seconds"] > 0.0, name
        # The examples' gold is the gold reward of their text.
        assert len(m["examples"]) == 4, name
        for ex in m["examples"]:
            assert ex["gold"] == pytest.approx(gold_scores("sentiment", [ex["prompt"]], [ex["response"]])[0])
    assert report["policies"]["sft"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-5)
    # Best-of-2 is not sampled for a KL: the analytic log n - (n - 1) / n.
    assert report["policies"]["best_of_2"]["kl_to_sft"] == pytest.approx(math.log(2) - 0.5)
    # Every trained policy's win rate is against the same SFT samples.
    ref_means = {report["policy_metrics"][name]["gold/ref_mean"] for name in ("sft", "ppo", "ppo_kl0", "dpo")}
    assert len(ref_means) == 1
    # The PPO rollout curves are scored by gold after training: one point per iteration, both runs, whose proxy
    # score and KL are the ones the stage logged for that iteration.
    for run in ("ppo", "ppo_kl0"):
        logged = [r for r in read_metrics(out / run / "metrics.jsonl") if "reward/score" in r]
        assert [p["step"] for p in report["rollout_curves"][run]] == [r["step"] for r in logged] == [1, 2]
        for point, row in zip(report["rollout_curves"][run], logged):
            assert point["reward/score"] == pytest.approx(row["reward/score"], rel=1e-5, abs=1e-6)
            assert point["kl/ref"] == pytest.approx(row["kl/sequence"], rel=1e-5, abs=1e-6)
    # Held-out curves for every trained policy from its snapshots (curve_points=5 over 2 or 3 steps: every
    # step), starting from SFT at step 0 with KL 0.
    assert set(report["curves"]) == {"ppo", "ppo_kl0", "dpo"}
    assert [p["step"] for p in report["curves"]["ppo"]] == [0, 1, 2]
    assert [p["step"] for p in report["curves"]["dpo"]] == [0, 1, 2, 3]
    assert report["curves"]["dpo"][0]["kl/ref"] == 0.0 and "gold_vs_kl" in report["plots"]
    # Each stage is an ordinary run directory that can be re-run alone from its config.
    for stage in ("sft", "rm", "ppo", "ppo_kl0", "dpo"):
        cfg = load_config("ppo" if stage == "ppo_kl0" else stage, out / stage / "config.yaml")
        assert (
            cfg.seed == 3 and cfg.logging.output_dir == str(out / stage) and (out / stage / "final").is_dir()
        )
        if stage != "sft":
            assert cfg.model.name_or_path == str(out / "sft" / "final"), stage
    assert (out / "ppo_kl0" / "config.yaml").read_text().count("kl_coef: 0.0") == 1
    printed = capsys.readouterr().out
    assert "gold-reward evaluation" in printed and str(html) in printed


def test_pipeline_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown pipeline section 'sfft'"):
        _user_sections(None, ["sfft.optim.lr=1"])
    with pytest.raises(ConfigError, match="unknown key 'data.n_pair'"):
        _user_sections(None, ["data.n_pair=10"])
    with pytest.raises(ConfigError, match="'eval.samples' must be a positive integer"):
        _user_sections(None, ["eval.samples=0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml: 'sft' must be a section"):
        _user_sections(str(bad), [])


def test_run_cli_reports_a_bad_stage_key_without_traceback(tmp_path, capsys):
    # A typo in a stage key is caught by the stage config (with a suggestion) before any work is done.
    code = main(
        [
            "run",
            "--output-dir",
            str(tmp_path / "r"),
            "sft.optim.batch_sise=4",
            "sft.model.name_or_path=lab:sentiment:tiny",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "batch_size" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_methods_are_resolved_with_what_they_need():
    assert resolve_methods(None) == list(DEFAULT_METHODS)
    assert resolve_methods(["grpo"]) == ["sft", "rm", "grpo"]
    assert resolve_methods(["online_dpo", "dpo"]) == ["sft", "dpo", "online_dpo"]
    assert resolve_methods(["all"]) == list(METHODS)
    with pytest.raises(ConfigError, match="unknown method 'grop'"):
        resolve_methods(["grop"])
    # The command line's list of methods is the pipeline's.
    assert RUN_METHODS.split(", ") == list(METHODS)


def test_pipeline_runs_the_chosen_methods(tmp_path, tiny_lab_cache):
    """--methods grpo,rloo,online_dpo: SFT and the RM are added; each method is trained, evaluated and curved."""
    tiny = [o for o in TINY if not o.startswith(("ppo", "dpo"))] + [
        f"{m}.algo.{k}" for m in ("rloo", "grpo") for k in ("iterations=2", "prompts_per_iteration=4")
    ]
    tiny += ["online_dpo.algo.iterations=2", "online_dpo.algo.prompts_per_step=4"]
    run_pipeline(
        output_dir=str(tmp_path / "run"), seed=3, overrides=tiny, methods=["rloo", "grpo", "online_dpo"]
    )
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["policies"]) == {"sft", "rloo", "grpo", "online_dpo"}
    assert report["meta"]["methods"] == ["sft", "rm", "rloo", "grpo", "online_dpo"]
    assert set(report["curves"]) == {"rloo", "grpo", "online_dpo"} and set(report["rollout_curves"]) == {
        "rloo",
        "grpo",
    }
    assert all([p["step"] for p in c] == [0, 1, 2] for c in report["curves"].values())
    # Online DPO asked the lab's annotators: 2 steps x 4 prompts = 8 queries at most (identical pairs not asked).
    logged = read_metrics(tmp_path / "run" / "online_dpo" / "metrics.jsonl")
    queries = max(r.get("feedback/queries", 0) for r in logged)
    assert 0 < queries <= 8
    assert report["policies"]["online_dpo"]["label_queries"] == queries
    lab_pairs = json.loads((tmp_path / "run" / "data" / "lab_data.json").read_text())["pairs"]
    for name in ("rloo", "grpo"):
        assert report["policies"][name]["label_queries"] == lab_pairs["n"] + lab_pairs["ties"] > 0
    with pytest.raises(ConfigError, match="'ppo' is for a method that is not run"):
        run_pipeline(output_dir=str(tmp_path / "x"), overrides=["ppo.optim.lr=1e-4"], methods=["dpo"])


def test_pipeline_runs_dno_against_a_preference_model(tmp_path, tiny_lab_cache):
    """--methods dno: SFT and the general preference model are added; the PM judges DNO's tournaments, and is
    a judge, not a policy (no gold row, no curve); DNO's label budget is the PM's pairs."""
    tiny = [o for o in TINY if o.startswith(("data.", "eval.", "sft."))] + [
        "pm.optim.max_steps=3",
        "dno.algo.rounds=2",
        "dno.algo.prompts_per_round=4",
        "dno.optim.batch_size=2",
    ]
    run_pipeline(output_dir=str(tmp_path / "run"), seed=3, overrides=tiny, methods=["dno"])
    out = tmp_path / "run"
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["methods"] == ["sft", "pm", "dno"]
    assert set(report["policies"]) == {"sft", "dno"} and set(report["curves"]) == {"dno"}
    cfg = load_config("iterative-dpo", out / "dno" / "config.yaml")
    assert cfg.algo.mode == "dno" and cfg.algo.feedback == "preference_model"
    assert cfg.algo.preference_model == str(out / "pm" / "final")
    # Every prompt's tournament asked the PM its 6 pairs (identical texts are ties, not asked).
    logged = [r for r in read_metrics(out / "dno" / "metrics.jsonl") if "feedback/queries" in r]
    assert 0 < logged[-1]["feedback/queries"] <= 2 * 4 * 6
    lab_pairs = json.loads((out / "data" / "lab_data.json").read_text())["pairs"]
    assert report["policies"]["dno"]["label_queries"] == lab_pairs["n"] + lab_pairs["ties"]


def test_rule_data_counts_may_be_zero_but_not_negative():
    from rlhflab.pipeline import _user_sections

    assert (
        _user_sections(None, ["data.n_rule_labels=0", "data.n_safety_pairs=30"])["data"]["n_safety_pairs"]
        == 30
    )
    with pytest.raises(ConfigError, match="'data.n_rule_labels' must be an integer >= 0"):
        _user_sections(None, ["data.n_rule_labels=-1"])
    with pytest.raises(ConfigError, match="'data.n_pairs' must be a positive integer"):
        _user_sections(None, ["data.n_pairs=0"])


def test_the_filtering_methods_get_ppos_sampling_budget(tmp_path):
    """expert_iteration, rejection_sampling and rest are `rlhflab rs` runs from the SFT model against the RM, each
    sampling PPO's 6,400 responses (100 iterations x 64 rollouts), built before any work."""
    from rlhflab.pipeline import _configs, _section

    out = tmp_path / "run"
    data = {name: out / "data" / f"{name}.jsonl" for name in ("sft", "pairs", "prompts")}
    names = ["sft", "rm", "ppo", "expert_iteration", "rejection_sampling", "rest"]
    configs = _configs(names, out, 0, "sentiment", {}, data, _section({}, "eval"))
    ppo = configs["ppo"].algo
    for name in ("expert_iteration", "rejection_sampling", "rest"):
        cfg = configs[name]
        assert METHODS[name].stage == "rs" and cfg.model.name_or_path == str(out / "sft" / "final")
        assert cfg.algo.reward_model == [str(out / "rm" / "final")]
        assert cfg.data.train_path == str(data["prompts"])
        a = cfg.algo
        runs = a.rounds if a.mode == "rejection_sampling" else a.grow_steps
        assert (
            abs(runs * a.samples_per_prompt * a.prompts_per_round - ppo.iterations * ppo.rollout_batch_size)
            <= 4
        )
    assert (
        configs["expert_iteration"].algo.rounds == 1
        and configs["expert_iteration"].algo.samples_per_prompt == 16
    )
    assert configs["rejection_sampling"].algo.pool
    assert configs["rest"].algo.mode == "rest" and configs["rest"].algo.thresholds == [0.5, 0.75, 0.9]
    # Snapshots: rs's own default, one per fine-tuning run (rest: 2 Grow x 3 Improve steps = 6), is kept.
    assert configs["rejection_sampling"].logging.snapshot_every == 1
    assert configs["rest"].logging.snapshot_every == 1


def test_pipeline_runs_rejection_sampling(tmp_path, tiny_lab_cache):
    """--methods rejection_sampling,rest: SFT and the RM are added, both rs runs are trained, evaluated by gold and
    curved over their fine-tuning runs, and cost the RM's label budget."""
    tiny = [o for o in TINY if o.startswith(("data.", "eval.", "sft.", "rm."))]
    for name in ("rejection_sampling", "rest"):
        tiny += [
            f"{name}.algo.prompts_per_round=4",
            f"{name}.algo.samples_per_prompt=2",
            f"{name}.algo.eval_prompts=2",
        ]
    tiny += ["rejection_sampling.algo.rounds=2", "rest.algo.grow_steps=1", "rest.algo.thresholds=[0.5]"]
    tiny += ["annotators.noise=0.25", "annotators.n_annotators=3"]  # they label the pairs
    run_pipeline(
        output_dir=str(tmp_path / "run"), seed=3, overrides=tiny, methods=["rejection_sampling", "rest"]
    )
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["meta"]["methods"] == ["sft", "rm", "rejection_sampling", "rest"]
    assert set(report["policies"]) == {"sft", "rejection_sampling", "rest"}
    assert [p["step"] for p in report["curves"]["rejection_sampling"]] == [0, 1, 2]
    assert [p["step"] for p in report["curves"]["rest"]] == [0, 1]
    lab_pairs = json.loads((tmp_path / "run" / "data" / "lab_data.json").read_text())["pairs"]
    assert report["policies"]["rest"]["label_queries"] == lab_pairs["n"] + lab_pairs["ties"] > 0
    cfg = load_config("rs", tmp_path / "run" / "rejection_sampling" / "config.yaml")
    assert cfg.algo.rounds == 2 and cfg.algo.pool
    annotators = json.loads((tmp_path / "run" / "data" / "lab_data.json").read_text())["annotators"]
    assert (
        annotators["noise"] == 0.25 and annotators["n_annotators"] == 3 and annotators["temperature"] == 0.1
    )


def test_annotator_settings_reach_the_data_and_the_online_methods(tmp_path):
    from rlhflab.pipeline import _annotator_settings, _configs, _section

    user = _user_sections(None, ["annotators.noise=0.25", "annotators.keep_ties=true"])
    settings = _annotator_settings(user)
    assert settings.noise == 0.25 and settings.keep_ties and settings.temperature == 0.1
    out = tmp_path / "run"
    data = {name: out / "data" / f"{name}.jsonl" for name in ("sft", "pairs", "prompts")}
    user = _user_sections(None, ["annotators.noise=0.25", "iterative_dpo.algo.annotators.noise=0.1"])
    configs = _configs(
        ["sft", "online_dpo", "iterative_dpo"], out, 0, "sentiment", user, data, _section(user, "eval")
    )
    assert configs["online_dpo"].algo.annotators.noise == 0.25
    assert configs["iterative_dpo"].algo.annotators.noise == 0.1  # the method's own section wins
    for bad, message in [
        ("annotators.noise=0.7", r"annotators: annotator noise must be in \[0, 0.5\]"),
        ("annotators.loudness=1", "unknown key 'annotators.loudness'; known: annotators.temperature"),
        ("annotators.n_annotators=1.5", "'annotators.n_annotators' must be an integer"),
        ("annotators.keep_ties=1", "'annotators.keep_ties' must be a bool"),
        ("annotators.temperature=hot", "'annotators.temperature' must be a float"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _user_sections(None, [bad])


def test_pipeline_runs_binary_feedme_on_the_chosen_responses(tmp_path, tiny_lab_cache):
    """--methods feedme: SFT continued from the SFT model on the pairs file, its completion read from `chosen`."""
    from rlhflab.stages.data_source import load_stage_records

    tiny = [o for o in TINY if o.startswith(("data.", "eval.", "sft."))] + ["feedme.optim.max_steps=2"]
    run_pipeline(output_dir=str(tmp_path / "run"), seed=3, overrides=tiny, methods=["feedme"])
    out = tmp_path / "run"
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["methods"] == ["sft", "feedme"] and set(report["policies"]) == {"sft", "feedme"}
    cfg = load_config("sft", out / "feedme" / "config.yaml")
    assert cfg.model.name_or_path == str(out / "sft" / "final") and cfg.data.columns == {
        "completion": "chosen"
    }
    records, _ = load_stage_records(cfg.data, "sft", seed=cfg.seed)
    pairs = [json.loads(line) for line in (out / "data" / "pairs.jsonl").read_text().splitlines()]
    # A chat prompt's completion is its assistant turn.
    assert [r.completion[0]["content"] for r in records] == [p["chosen"] for p in pairs]
    lab_pairs = json.loads((out / "data" / "lab_data.json").read_text())["pairs"]
    assert report["policies"]["feedme"]["label_queries"] == lab_pairs["n"] + lab_pairs["ties"]


def test_pipeline_runs_quark_and_reward_conditioning_and_judges_them_behind_their_token(
    tmp_path, tiny_lab_cache
):
    """--methods quark,reward_conditioning: `rlhflab quark` runs from the SFT model against the RM; the evaluation
    samples each behind its best token (its own tokenizer), measures its KL to SFT on the plain prompts, and its
    curve's snapshots likewise."""
    tiny = [o for o in TINY if o.startswith(("data.", "eval.", "sft.", "rm."))]
    for name in ("quark", "reward_conditioning"):  # a first pool of 8 (or 16) samples fills a batch of 8
        tiny += [
            f"{name}.algo.prompts_per_iteration=4",
            f"{name}.algo.eval_prompts=2",
            f"{name}.optim.batch_size=8",
        ]
    tiny += [
        "quark.algo.iterations=2",
        "quark.optim.steps_per_iteration=2",
        "reward_conditioning.optim.epochs=1",
    ]
    run_pipeline(
        output_dir=str(tmp_path / "run"), seed=3, overrides=tiny, methods=["quark", "reward_conditioning"]
    )
    out = tmp_path / "run"
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["methods"] == ["sft", "rm", "quark", "reward_conditioning"]
    assert set(report["policies"]) == {"sft", "quark", "reward_conditioning"}
    for name, k in (("quark", 5), ("reward_conditioning", 2)):
        cfg = load_config("quark", out / name / "config.yaml")
        assert cfg.algo.n_quantiles == k and cfg.algo.reward_model == [str(out / "rm" / "final")]
        assert cfg.model.name_or_path == str(out / "sft" / "final")
        # Measured behind the token against SFT on the plain prompts (not NaN, not the policy against itself).
        kl = report["policy_metrics"][name]["kl/ref"]
        assert math.isfinite(kl) and kl != 0.0, name
        assert [p["step"] for p in report["curves"][name]][0] == 0 and len(report["curves"][name]) >= 2
