"""DNO (`rlhflab iterative-dpo algo.mode=dno`): the pairs a round builds, checked against the tournament's pure
functions called by hand on the labels the feedback source answered; the label budget; the reference; resume by
rounds; DNO against a general preference model (and online-dpo asking one); config refusals (exit 2)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from rlhflab.cli import main
from rlhflab.config import load_config
from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import ConfigError
from rlhflab.feedback import PreferenceModelFeedback, SyncFeedback
from rlhflab.losses.tournament import (
    best_worst_pairs,
    tournament_matrix,
    tournament_pairs,
    tournament_win_rates,
)
from rlhflab.models.preference_model import PreferenceModel
from rlhflab.stages import iterative_dpo, online_dpo
from rlhflab.stages.on_policy import default_feedback
from rlhflab.stages.tournament import ask_tournament

from ..helpers import PPO_PROMPTS, assert_same_tensors, causal_lm_state, perturb_, stage_config, write_jsonl

K = 4
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class Coin(SyncFeedback):
    """Labels drawn at random among first / second / tie / no answer (a judge with ties, silences and no order
    at all), recording every (prompt, first, second, label) it answered; its draws are checkpointed."""

    name = "coin"

    def __init__(self, seed=0):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)
        self.answers = []

    def judge(self, prompts, first, second):
        choice = torch.randint(0, 10, (len(prompts),), generator=self.generator)
        # 4 in 10 first, 4 in 10 second, 1 tie, 1 no answer
        table = torch.tensor([1.0] * 4 + [0.0] * 4 + [0.5, float("nan")])
        labels = table[choice]
        self.answers += list(zip(prompts, first, second, labels.tolist()))
        return labels

    def state_dict(self):
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])


@pytest.fixture()
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PPO_PROMPTS])


def _cfg(model_dir, data, out, *extra):
    return stage_config(
        "iterative-dpo",
        model_dir,
        "algo.mode=dno",
        f"algo.samples_per_prompt={K}",
        "algo.reward_model=rule:length",  # replaced by the feedback the tests pass in
        "algo.prompts_per_round=8",
        "sampling.max_new_tokens=5",
        "data.max_length=24",
        "data.max_prompt_length=12",
        "optim.batch_size=2",
        "optim.lr=3e-2",
        *extra,
        data=data,
        out=out,
    )


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _expected_round(tournament: list[dict], answers: list, min_margin: float):
    """By hand from the recorded answers (those from this round on): the questions the round must have asked,
    in order, and the pairs the pure functions pick from their labels. Returns (rows, win rates, margins,
    the number of questions)."""
    pairs = tournament_pairs(K)
    asked = [
        (t["prompt"], t["responses"][i], t["responses"][j])
        for t in tournament
        for i, j in pairs
        if t["responses"][i] != t["responses"][j]
    ]
    assert [
        (p, a, b) for p, a, b, _ in answers[: len(asked)]
    ] == asked  # each non-identical pair once, in order
    labels, it = torch.full((len(tournament), len(pairs)), 0.5), iter(lab for *_, lab in answers)
    for p, t in enumerate(tournament):
        for c, (i, j) in enumerate(pairs):
            if t["responses"][i] != t["responses"][j]:  # identical texts: a tie, not asked
                labels[p, c] = next(it)
    win_rates = tournament_win_rates(tournament_matrix(labels, K))
    best, worst, margin, keep = best_worst_pairs(win_rates, min_margin)
    rows = [
        {"prompt": t["prompt"], "chosen": t["responses"][b], "rejected": t["responses"][w]}
        for t, b, w, k in zip(tournament, best.tolist(), worst.tolist(), keep.tolist())
        if k and t["responses"][b].strip() and t["responses"][w].strip()
    ]
    return rows, win_rates, margin, len(asked)


def test_dno_rounds_build_best_vs_worst_pairs_by_win_rate(tiny_model_dir, prompts_file, tmp_path):
    run, min_margin = tmp_path / "run", 0.7
    feedback = Coin()
    cfg = _cfg(tiny_model_dir, prompts_file, run, "algo.rounds=2", f"algo.min_win_rate_margin={min_margin}")
    iterative_dpo.train(cfg, feedback=feedback)
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "feedback/queries" in r]
    assert [r["step"] for r in rows] == [1, 2]
    done, filtered = 0, 0
    for rnd, row in zip((1, 2), rows):
        tournament = _jsonl(run / f"round-{rnd}" / "tournament.jsonl")
        assert len(tournament) == 8 and all(len(t["responses"]) == K for t in tournament)
        expected, win_rates, margin, n_asked = _expected_round(
            tournament, feedback.answers[done:], min_margin
        )
        done += n_asked
        # The label budget, cumulative: every pair asked since the run began (identical texts are not asked).
        assert row["feedback/queries"] == done
        # The pairs file is exactly the pure functions' choice on the recorded labels: chosen = highest win rate.
        assert _jsonl(run / f"round-{rnd}" / "pairs.jsonl") == expected
        got = torch.tensor(
            [[w if w is not None else float("nan") for w in t["win_rates"]] for t in tournament]
        )
        torch.testing.assert_close(got, win_rates.float(), equal_nan=True)
        assert row["feedback/pairs_kept"] == len(expected)
        assert row["feedback/pairs_kept"] + row["feedback/below_margin"] + row["feedback/empty_response"] == 8
        filtered += int(((margin > 0) & (margin < min_margin)).sum())
        dpo_cfg = run / f"round-{rnd}" / "dpo" / "config.yaml"
        if (
            len(expected) >= 2
        ):  # a DPO run (one batch or more): DNO's reference is the round's starting policy
            dpo = yaml.safe_load(dpo_cfg.read_text())
            assert dpo["ref_model"] == dpo["model"]["name_or_path"]
            assert dpo["data"]["train_path"] == str(run / f"round-{rnd}" / "pairs.jsonl")
    assert done == len(feedback.answers) == feedback.queries
    assert 0 < done <= 2 * 8 * K * (K - 1) // 2
    assert filtered > 0  # some pairs had a positive margin below the filter: the filter was exercised
    assert sum(r["feedback/pairs_kept"] for r in rows) > 0


def test_ask_tournament_by_hand():
    """Two prompts, K = 3; prompt 1's responses 0 and 2 are the same text: a tie by antisymmetry, not asked."""
    texts = ["a", "b", "c", "x", "y", "x"]
    feedback = Coin(seed=5)
    labels, identical = ask_tournament(feedback, ["p", "p", "p", "q", "q", "q"], texts, 3, None)
    assert identical.tolist() == [[False, False, False], [False, True, False]]
    asked = [(p, a, b) for p, a, b, _ in feedback.answers]
    assert asked == [("p", "a", "b"), ("p", "a", "c"), ("p", "b", "c"), ("q", "x", "y"), ("q", "y", "x")]
    assert feedback.queries == 5
    answered = [lab for *_, lab in feedback.answers]
    expected = torch.tensor([answered[:3], [answered[3], 0.5, answered[4]]])
    torch.testing.assert_close(labels, expected, equal_nan=True)


def test_dno_resume_skips_finished_rounds(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    def run(out, resume=False):
        cfg = _cfg(tiny_model_dir, prompts_file, out, "algo.rounds=2")
        return iterative_dpo.train(cfg, resume=resume, feedback=Coin(seed=1))

    ref = run(tmp_path / "a")
    real, calls = iterative_dpo.dpo.train, []

    def crash_in_round_2(cfg, **kw):
        calls.append(cfg.logging.output_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cfg, **kw)

    monkeypatch.setattr(iterative_dpo.dpo, "train", crash_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    calls.clear()
    resumed = run(tmp_path / "b", resume=True)
    assert calls == [str(tmp_path / "b" / "round-2" / "dpo")]  # round 1 was not trained again
    assert_same_tensors(causal_lm_state(ref), causal_lm_state(resumed))
    for name in ("tournament.jsonl", "pairs.jsonl"):  # the judge's draws continued where they stopped
        assert (tmp_path / "a" / "round-2" / name).read_text() == (
            tmp_path / "b" / "round-2" / name
        ).read_text()
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("a", "b"))
    key = "feedback/queries"
    assert [r[key] for r in a if key in r] == [r[key] for r in b if key in r]


@pytest.fixture()
def pm_dir(tiny_model_dir, tiny_tokenizer, tmp_path):
    """A (random, perturbed) general preference model saved as `rlhflab pm` saves one."""
    model = PreferenceModel.from_causal_lm(
        tiny_model_dir, tiny_tokenizer, max_length=32, max_prompt_length=12
    )
    return perturb_(model, 0.5, seed=2).save_pretrained(tmp_path / "pm" / "final")


def test_dno_against_a_general_preference_model(tiny_model_dir, prompts_file, pm_dir, tmp_path):
    """algo.feedback=preference_model: the tournament's labels are the model's argmax on every pair."""
    run = tmp_path / "run"
    extra = ("algo.reward_model=", "algo.feedback=preference_model", f"algo.preference_model={pm_dir.parent}")
    iterative_dpo.train(_cfg(tiny_model_dir, prompts_file, run, "algo.rounds=1", *extra))
    model = PreferenceModel.from_pretrained(pm_dir)
    tournament = _jsonl(run / "round-1" / "tournament.jsonl")
    pairs = tournament_pairs(K)
    labels = torch.tensor(
        [
            [
                float(p > 0.5) if abs(p - 0.5) > 1e-6 else 0.5
                for p in model.prob(
                    [t["prompt"]] * len(pairs),
                    [t["responses"][i] for i, _ in pairs],
                    [t["responses"][j] for _, j in pairs],
                ).tolist()
            ]
            for t in tournament
        ]
    )
    win_rates = tournament_win_rates(tournament_matrix(labels, K))
    got = torch.tensor([t["win_rates"] for t in tournament], dtype=torch.float64)
    torch.testing.assert_close(got, win_rates)
    (row,) = [r for r in read_metrics(run / "metrics.jsonl") if "feedback/queries" in r]
    distinct = sum(t["responses"][i] != t["responses"][j] for t in tournament for i, j in pairs)
    assert row["feedback/queries"] == distinct


def test_online_dpo_asks_a_preference_model(tiny_model_dir, prompts_file, pm_dir, tmp_path):
    cfg = stage_config(
        "online-dpo",
        tiny_model_dir,
        "algo.feedback=preference_model",
        f"algo.preference_model={pm_dir}",
        "algo.feedback_mode=bradley_terry",
        "algo.prompts_per_step=4",
        "algo.iterations=1",
        "sampling.max_new_tokens=4",
        data=prompts_file,
        out=tmp_path / "run",
    )
    source = default_feedback(cfg.algo, torch.device("cpu"), 0)
    assert isinstance(source, PreferenceModelFeedback) and source.mode == "bradley_terry"
    online_dpo.train(cfg)
    (row,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "feedback/queries" in r]
    assert row["feedback/queries"] == 4 - row["feedback/identical"]
    logged = _jsonl(tmp_path / "run" / "rollouts.jsonl")
    assert len(logged) == 4 and all(r["label"] in (0.0, 1.0, None) for r in logged)  # draws: never a tie


def test_dno_config_refusals(tiny_model_dir, prompts_file, tmp_path, capsys):
    refused = {
        "algo.samples_per_prompt is set but applies to algo.mode=dno only": ["algo.samples_per_prompt=4"],
        "algo.min_win_rate_margin is set but applies to algo.mode=dno only": [
            "algo.mode=sdpo",
            "algo.min_win_rate_margin=0.2",
        ],
        "algo.samples_per_prompt must be >= 2": ["algo.mode=dno", "algo.samples_per_prompt=1"],
        "algo.min_win_rate_margin must be in \\[0, 1\\)": ["algo.mode=dno", "algo.min_win_rate_margin=1"],
        "algo.reference is initial, but DNO's reference": ["algo.mode=dno", "algo.reference=initial"],
        "algo.preference_model is set but algo.feedback=reward": ["algo.preference_model=x"],
        "algo.reward_model is set but algo.feedback=preference_model": [
            "algo.feedback=preference_model",
            "algo.reward_model=rule:length",
        ],
        "algo.annotators applies to algo.feedback=lab only": [
            "algo.feedback=preference_model",
            "algo.annotators.noise=0.1",
        ],
        "data.pairs_path is set but algo.mode=dno": ["algo.mode=dno", "data.pairs_path=x.jsonl"],
    }
    for message, overrides in refused.items():
        with pytest.raises(ConfigError, match=message):
            load_config("iterative-dpo", None, overrides)
    with pytest.raises(ConfigError, match="algo.preference_model is set but algo.feedback=lab"):
        load_config("online-dpo", None, ["algo.feedback=lab", "algo.preference_model=x"])
    # Through the command line: one line, exit 2, nothing made; a missing preference model is caught before any
    # model or lab work (no run directory).
    for overrides, message in (
        (
            ["algo.mode=dno", "algo.samples_per_prompt=1"],
            "error: config: algo.samples_per_prompt must be >= 2",
        ),
        (
            ["algo.mode=dno", "algo.feedback=preference_model"],
            "error: config: algo.preference_model is empty",
        ),
        (
            ["algo.mode=dno", "algo.feedback=preference_model", f"algo.preference_model={tmp_path / 'none'}"],
            "error: preference model path",
        ),
        (
            ["algo.mode=dno", "algo.feedback=preference_model", f"algo.preference_model={tiny_model_dir}"],
            "error: '",
        ),
    ):
        out = tmp_path / "out"
        args = [
            "iterative-dpo",
            *overrides,
            "model.name_or_path=/no/model",
            f"data.train_path={prompts_file}",
        ]
        assert main([*args, f"logging.output_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(message) and "Traceback" not in err, err
        assert not out.exists()
    shipped = load_config("iterative-dpo", CONFIGS / "iterative_dpo_dno_tiny.yaml")
    assert shipped.algo.mode == "dno" and shipped.algo.feedback == "preference_model"
