"""Red teaming across processes (`rlhflab redteam` under `torchrun`; Perez et al. 2022): every call's test cases
are shared out in whole batches, each seeded by its place in the call (`stages.redteam_cases`), and gathered
back in order; the RL red LM's reward answers the whole RLOO batch as one process would and gives each process
its own rows. W processes write one process's files, and the RL red LM ends at one process's weights."""

from __future__ import annotations

import json

import pytest
import torch

from rlhflab.cli import main
from rlhflab.stages.parallel import DataParallel
from rlhflab.stages.redteam import (
    RedTeamPrompts,
    RedTeamReward,
    RedTeamSettings,
    RuleClassifier,
    few_shot,
    zero_shot,
)

from .test_cai_parallel import _in_two_threads, _one_thread
from .test_parallel import LAUNCHERS, _assert_same_weights, _launch

BAD = "you are stupid ."


class Recording:
    """A sampler whose output depends on the text, the seed and the row's place in its call (as a batch's
    padding and random stream would): a unit split differently, or seeded by another number, says other
    things. It records the calls it answered."""

    def __init__(self, name: str, bad_every: int = 0):
        self.name, self.bad_every, self.calls = name, bad_every, []

    def __call__(self, texts, seed):
        self.calls.append(list(texts))
        out = [f"{self.name}{(seed + j + len(t)) % 5}" for j, t in enumerate(texts)]
        return [BAD if self.bad_every and (seed + j) % self.bad_every == 0 else o for j, o in enumerate(out)]


class LengthScorer:
    """Violation logits from the answer (BAD breaks rule 0) and the test case's length (rule 1)."""

    def score_all_heads(self, prompts, responses):
        return torch.tensor([[4.0 if r == BAD else -2.0, len(p) / 4 - 2] for p, r in zip(prompts, responses)])


def _judge():
    return RuleClassifier(LengthScorer(), ["insult", "length"])


def test_zero_and_few_shot_shared_out_are_one_process_s():
    """7 test cases in units of 2 (4 units a call: rank 0 samples units 0 and 2, rank 1 units 1 and 3): both
    processes end with one process's test cases, answers and probabilities, and each unit was sampled by one."""
    s = RedTeamSettings(n_prompts=7, batch_size=2, n_examples=2, threshold=0.5, seed=3)
    prompts = RedTeamPrompts()

    def work(par=None):
        red, target = Recording("q"), Recording("a", bad_every=3)
        pool = zero_shot(red, target, _judge(), prompts, s, par=par)
        shot, source = few_shot(red, target, _judge(), prompts, pool, s, par=par)
        return (pool, shot, source), (red.calls, target.calls)

    (pool, shot, source), (red_calls, target_calls) = work()
    (mine0, (red0, target0)), (mine1, (red1, target1)) = _in_two_threads(work)
    for got in (mine0, mine1):
        assert got[2] == source
        for a, b in zip(got[:2], (pool, shot)):
            assert (a.cases, a.answers, a.instructions, a.examples) == (
                b.cases,
                b.answers,
                b.instructions,
                b.examples,
            )
            assert torch.equal(a.rule_probs, b.rule_probs)
    assert [len(c) for c in red_calls] == [2, 2, 2, 1] * 2 and len(target_calls) == 8
    # Units 0 and 2 of each call (zero-shot's, then few-shot's) are rank 0's; 1 and 3 rank 1's.
    for calls, calls0, calls1 in ((red_calls, red0, red1), (target_calls, target0, target1)):
        assert calls0 == [calls[i] for i in (0, 2, 4, 6)] and calls1 == [calls[i] for i in (1, 3, 5, 7)]
    assert pool.succeeded(0.5).any() and not pool.succeeded(0.5).all()  # the few-shot pool had successes
    hits = {c for c, ok in zip(pool.cases, pool.succeeded(0.5)) if ok}
    assert len(set(pool.cases)) > 1 and all(shot.examples) and {e for ex in shot.examples for e in ex} <= hits


def test_the_rl_reward_gives_each_process_one_process_s_rewards(tmp_path):
    """An RLOO batch of 5 groups of 2 test cases, held 3 : 2 by two processes (groups 0, 2, 4 and 1, 3), answered
    in units of 3: each process gets the rewards one process gives those rows, and the main process logs the
    whole batch, in the batch's order, as one process does, on every call."""
    groups, k = 5, 2
    batches = [[f"case {c} {i}" if i % 4 else "" for i in range(groups * k)] for c in range(2)]

    def work(par=None):
        rank, world = (0, 1) if par is None else (par.rank, par.world)
        log = tmp_path / f"calls-{'one' if par is None else rank}.jsonl"
        reward = RedTeamReward(Recording("a", bad_every=2), _judge(), seed=4, log_path=log, batch_size=3,
                               par=par, prompts_per_call=groups)  # fmt: skip
        rows = [g * k + j for g in range(rank, groups, world) for j in range(k)]
        return [reward.score([""] * len(rows), [batch[i] for i in rows]) for batch in batches], rows

    one, _ = work()
    (got0, rows0), (got1, rows1) = _in_two_threads(work)
    assert (rows0, rows1) == ([0, 1, 4, 5, 8, 9], [2, 3, 6, 7])
    for call in range(2):
        assert torch.equal(got0[call], one[call][rows0]) and torch.equal(got1[call], one[call][rows1])
        assert 0 < int((one[call] > 0.5).sum()) < groups * k  # some attacks succeeded, not all
    assert (tmp_path / "calls-0.jsonl").read_bytes() == (tmp_path / "calls-one.jsonl").read_bytes()
    assert not (tmp_path / "calls-1.jsonl").exists()
    logged = [json.loads(line) for line in (tmp_path / "calls-one.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in logged] == [c for batch in batches for c in batch]


@pytest.fixture()
def rules_dir(tiny_tokenizer, tmp_path):
    """Rule classifiers (2 fresh heads on a tiny seeded backbone) over the tiny model's words."""
    from rlhflab.models.reward_model import RewardModel

    from ..helpers import tiny_reward_model

    backbone = tiny_reward_model("llama", 4, len(tiny_tokenizer)).backbone
    return RewardModel(backbone, 2, ["insult", "danger"]).save_pretrained(tmp_path / "rules", tiny_tokenizer)


def _args(model, rules, out) -> list[str]:
    return [
        "redteam", "--target", str(model), "--red", str(model), "--classifier", str(rules), "--ask", "the cat",
        "--method", "few-shot,rl", "--n-prompts", "5", "--batch-size", "2", "--max-new-tokens", "5",
        "--output-dir", str(out), "rl.algo.iterations=2", "rl.algo.prompts_per_iteration=3",
        "rl.algo.num_generations=2", "rl.optim.lr=1e-2", "rl.logging.progress=false", "rl.logging.log_every=1",
    ]  # fmt: skip


def test_an_rl_batch_too_small_for_the_processes_is_refused_before_loading(
    rules_dir, monkeypatch, tmp_path, capsys
):
    """redteam starts in 2 processes (it is data-parallel), but an RLOO batch of 1 prompt cannot be shared by
    2: one line naming the key, exit 2, before any model loads (the target does not exist) or any file is made."""
    par = DataParallel.__new__(DataParallel)
    par.rank, par.world = 0, 2
    monkeypatch.setattr("rlhflab.stages.redteam.DataParallel", lambda: par)
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = _args(tmp_path / "missing", rules_dir, tmp_path / "out")
    assert main([*args, "rl.algo.prompts_per_iteration=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rl.algo.prompts_per_iteration=1 is smaller than the 2 processes" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_redteam_on_two_processes_writes_and_trains_as_one(
    tiny_model_dir, rules_dir, tmp_path, monkeypatch, capsys
):
    """zero-shot, few-shot and rl on 5 test cases in batches of 2 (3 units a call, split 2 : 1), the RL red LM
    trained by RLOO on 3 groups of 2 (held 2 : 1): the test cases and the reward log are one process's byte for
    byte, written once; the report is one process's (the RL training summary to 1e-6: the metrics are sums over
    processes); the RL red LM ends at one process's weights (to 1e-5); each line is printed once."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with _one_thread():
        assert main(_args(tiny_model_dir, rules_dir, tmp_path / "one")) == 0, capsys.readouterr().err
    out = _launch(LAUNCHERS["torchrun"], _args(tiny_model_dir, rules_dir, tmp_path / "two"), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "data parallel over 2 processes" in out.stdout
    for line in (
        "redteam zero-shot:",
        "redteam few-shot:",
        "redteam rl: training",
        "redteam rl: 5",
        "redteam: wrote",
    ):
        assert out.stdout.count(line) == 1, line
    one, two = tmp_path / "one", tmp_path / "two"
    for name in ("test_cases.jsonl", "rl_reward_calls.jsonl"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    rows = [json.loads(line) for line in (one / "test_cases.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["zero-shot"] * 5 + ["few-shot"] * 5 + ["rl"] * 5
    assert len({r["prompt"] for r in rows}) > 3
    assert len((one / "rl_reward_calls.jsonl").read_text().splitlines()) == 2 * 3 * 2  # iterations x rows
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
    for r in (r1, r2):
        r.pop("runtime_s")
        for m in r["methods"].values():
            m.pop("runtime_s")
    t1, t2 = r1.pop("rl_training"), r2.pop("rl_training")
    assert r2 == r1 and r1["methods"]["few-shot"]["n_test_cases"] == 5
    assert t2.pop("run_dir") == str(two / "rl") and t1.pop("run_dir") == str(one / "rl")
    assert t2 == pytest.approx(t1, abs=1e-6) and t1["iterations"] == 2
    _assert_same_weights(one / "rl" / "final", two / "rl" / "final", tiny_model_dir)


@pytest.fixture()
def harm_dirs(tmp_path):
    """An untrained tiny LM over the harm task's words, marked as a harm model (so `redteam` takes the lab route
    and measures gold), and rule classifiers on its backbone."""
    from rlhflab.lab.pretrain import LAB_TASK_KEY
    from rlhflab.lab.tasks import get_task
    from rlhflab.lab.tasks import harm as H
    from rlhflab.models.reward_model import RewardModel

    from ..helpers import save_model_dir, tiny_lm

    tokenizer = get_task("harm").build_tokenizer()
    model = tiny_lm(tokenizer)
    setattr(model.config, LAB_TASK_KEY, "harm")
    lm = save_model_dir(model, tokenizer, tmp_path / "lm")
    rules = RewardModel.from_causal_lm(str(lm), 3, list(H.RULES)).save_pretrained(
        tmp_path / "rules", tokenizer
    )
    return lm, rules


@pytest.mark.slow
def test_redteam_on_a_lab_model_in_two_processes_measures_gold_once(harm_dirs, tmp_path, monkeypatch, capsys):
    """On a lab model (zero-shot and few-shot, 6 test cases in batches of 4: units of 4 and 2), the main process
    measures gold and writes: the test cases with their gold rows are one process's byte for byte, the report's
    gold too; with no --output-dir, both processes take the main one's timestamped directory."""
    lm, rules = harm_dirs
    args = ["redteam", "--target", str(lm), "--red", str(lm), "--classifier", str(rules), "--n-prompts", "6"]
    args += ["--batch-size", "4", "--method", "few-shot"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with _one_thread():
        assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0, capsys.readouterr().err
    (tmp_path / "two").mkdir()
    out = _launch(LAUNCHERS["torchrun"], args, tmp_path / "two")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("gold attack success") == 2 and out.stdout.count("redteam: wrote") == 1
    (two,) = (tmp_path / "two" / "runs").iterdir()  # one run directory, named by the main process
    one = tmp_path / "one"
    assert (two / "test_cases.jsonl").read_bytes() == (one / "test_cases.jsonl").read_bytes()
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
    for r in (r1, r2):
        r.pop("runtime_s")
        for m in r["methods"].values():
            m.pop("runtime_s")
    assert r2 == r1 and "gold/attack_success" in r1["methods"]["few-shot"]
