"""The LM judge: its arithmetic by hand, a judge whose preference is known by construction, a real tiny HF
model end to end, the feedback source over it, and `rlhflab judge`."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from rlhflab.cli import main
from rlhflab.errors import ConfigError
from rlhflab.feedback import PreferenceModelFeedback
from rlhflab.models.judge import (
    LMJudge,
    answer_logprob,
    debiased_preference,
    expected_rating,
    position_consistency,
)
from rlhflab.models.tiny import build_word_tokenizer

from ..helpers import save_model_dir, tiny_lm

WORDS = "good bad fine the a cat dog film is was very not".split() + ["A", "B", "?", "1", "2", "3", "4", "5"]
TEMPLATE = "{prompt} A {first} B {second} ?"


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_answer_logprob_sums_token_variants_and_renormalizes():
    # Vocabulary of 4: answer 0 is written by tokens {0, 1}, answer 1 by {2}; token 3 is neither.
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    out = answer_logprob(logits, [[0, 1], [2]]).exp()
    # P(answer 0) = (0.1 + 0.2) / (0.1 + 0.2 + 0.3) = 0.5; the 0.4 on token 3 does not count.
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5]]))


def test_debiasing_and_consistency_by_hand():
    p_a = torch.tensor([0.9, 0.9, 0.3])
    p_a_swapped = torch.tensor([0.2, 0.8, 0.6])
    # (0.9 + 0.8) / 2 = 0.85; (0.9 + 0.2) / 2 = 0.55; (0.3 + 0.4) / 2 = 0.35
    torch.testing.assert_close(debiased_preference(p_a, p_a_swapped), torch.tensor([0.85, 0.55, 0.35]))
    # Pair 0 answers A then B (the same response, consistent); pair 1 answers A twice (the position decided);
    # pair 2 answers B then A (consistent).
    assert position_consistency(p_a, p_a_swapped).tolist() == [True, False, True]


def test_expected_rating_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25, 1.0]]))  # token 3 is not a rating
    # Ratings 1, 2, 3 with P = 0.5, 0.25, 0.25: 0.5 + 0.5 + 0.75 = 1.75
    torch.testing.assert_close(expected_rating(logits, [[0], [1], [2]], [1, 2, 3]), torch.tensor([1.75]))


class CountingJudge(torch.nn.Module):
    """A stand-in LM whose answer is known by construction: at the last position, logit("A") - logit("B") =
    (number of "good" after the "A" marker) - (number after the "B" marker) + `bias` (a taste for position A)."""

    def __init__(self, tokenizer, bias: float = 0.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # something to find a device on
        self.vocab = len(tokenizer)
        self.a, self.b, self.good = (tokenizer.convert_tokens_to_ids(w) for w in ("A", "B", "good"))
        self.bias = bias

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for i, row in enumerate(input_ids.tolist()):
            ia = row.index(self.a)
            ib = row.index(self.b, ia + 1)
            score = row[ia + 1 : ib].count(self.good) - row[ib + 1 :].count(self.good)
            logits[i, -1, self.a] = score + self.bias
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_word_tokenizer(WORDS)
    tok.chat_template = None  # the plain "question + Answer:" rendering
    return tok


def test_a_judge_known_by_construction(tokenizer):
    judge = LMJudge(CountingJudge(tokenizer), tokenizer, template=TEMPLATE, batch_size=2)
    prompts = ["the film", "the cat", "a dog"]
    first = ["good good film", "bad film", "fine"]
    second = ["bad film", "good film", "fine"]
    c = judge.compare(prompts, first, second)
    # Shown (first, second): score = goods(first) - goods(second); swapped: the negative.
    expected_a = torch.tensor([sigmoid(2), sigmoid(-1), sigmoid(0)])
    torch.testing.assert_close(c.p_a, expected_a)
    torch.testing.assert_close(c.p_a_swapped, 1 - expected_a)
    torch.testing.assert_close(c.p_first, expected_a)  # no position bias: both orders agree exactly
    assert judge.forwards == 6  # two rows per pair


def test_both_orders_cancel_a_taste_for_position_a(tokenizer):
    c_bias = 1.5
    judge = LMJudge(CountingJudge(tokenizer, bias=c_bias), tokenizer, template=TEMPLATE)
    c = judge.compare(["x", "y"], ["good film", "fine"], ["film", "fine"])
    # Pair 0: d = 1; P(A) = s(1 + c) shown in order, s(-1 + c) swapped; debiased (s(1+c) + 1 - s(c-1)) / 2.
    want = (sigmoid(1 + c_bias) + 1 - sigmoid(c_bias - 1)) / 2
    assert c.p_first[0].item() == pytest.approx(want, abs=1e-6)
    assert c.p_first[1].item() == pytest.approx(0.5, abs=1e-6)  # d = 0: exactly a half, the bias gone
    assert c.p_a[1].item() == pytest.approx(sigmoid(c_bias))  # each order alone leans to A
    # s(2.5) > 1/2 and s(0.5) > 1/2: A both times, the position decided both verdicts.
    assert c.consistent.tolist() == [False, False]


def test_feedback_source_over_the_judge(tokenizer):
    judge = LMJudge(CountingJudge(tokenizer), tokenizer, template=TEMPLATE)
    source = PreferenceModelFeedback(judge)
    labels = source.collect(source.ask(["p", "p", "p"], ["good", "film", "fine"], ["film", "good", "fine"]))
    assert labels.tolist() == [1.0, 0.0, 0.5] and source.queries == 3


def test_answers_must_be_single_known_tokens(tokenizer):
    with pytest.raises(ConfigError, match="no single token"):
        LMJudge(CountingJudge(tokenizer), tokenizer, template=TEMPLATE, answers=("yes", "no"))
    with pytest.raises(ConfigError, match="needs {second}"):
        LMJudge(CountingJudge(tokenizer), tokenizer, template="{prompt} {first}")


def test_a_real_tiny_model_end_to_end_with_its_chat_template(tmp_path):
    tok = build_word_tokenizer(WORDS)  # with the chat template this time
    model_dir = save_model_dir(tiny_lm(tok), tok, tmp_path / "judge")
    judge = LMJudge.from_pretrained(str(model_dir), batch_size=3)
    prompts = [[{"role": "user", "content": "the film"}], "a dog", "the cat", "a film"]
    c = judge.compare(prompts, ["good", "bad film", "fine", "good"], ["bad", "good", "fine fine", "the"])
    assert c.p_first.shape == (4,) and ((c.p_first > 0) & (c.p_first < 1)).all()
    # Padding does not change a verdict: the same pair alone gives the same numbers.
    alone = judge.compare(prompts[1:2], ["bad film"], ["good"])
    torch.testing.assert_close(alone.p_a, c.p_a[1:2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone.p_a_swapped, c.p_a_swapped[1:2], atol=1e-5, rtol=1e-4)
    rating = judge.rate(["the film", "a dog"], ["good", "bad"])
    assert rating.shape == (2,) and ((rating >= 1) & (rating <= 5)).all()


def test_rlhflab_judge_reports_agreement_bias_and_gold(tmp_path, capsys):
    tok = build_word_tokenizer(WORDS)
    model_dir = save_model_dir(tiny_lm(tok), tok, tmp_path / "judge")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps(
                {"prompt": f"the {w} film", "chosen": "a very good film", "rejected": "a very bad film"}
            )
            + "\n"
            for w in ("cat", "dog", "good")
        )
    )
    out = tmp_path / "judge.json"
    assert (
        main(
            [
                "judge",
                "--model",
                str(model_dir),
                "--pairs",
                str(pairs),
                "--task",
                "sentiment",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["n_pairs"] == 3 and len(report["per_pair"]) == 3
    # The report's numbers are the per-pair verdicts, summarized.
    p = [r["p_chosen"] for r in report["per_pair"]]
    agree = sum(1.0 if x > 0.5 else 0.5 if x == 0.5 else 0.0 for x in p) / 3
    assert report["agreement"] == pytest.approx(agree, abs=1e-4)
    inconsistent = sum((r["p_a"] > 0.5) == (r["p_a_swapped"] > 0.5) for r in report["per_pair"]) / 3
    assert report["position_bias_rate"] == pytest.approx(inconsistent, abs=1e-4)
    # Gold (VADER + grammar) prefers "a very good film" too: the labels agree with gold on every pair.
    assert report["label_gold_agreement"] == 1.0 and report["gold_pairs"] == 3
    assert report["gold_agreement"] == pytest.approx(agree, abs=1e-4)
    assert "position_bias_rate" in capsys.readouterr().out
    assert main(["judge", "--model", str(tmp_path / "nope"), "--pairs", str(pairs)]) == 2
    point = tmp_path / "pointwise.json"
    assert (
        main(["judge", "--model", str(model_dir), "--pairs", str(pairs), "--pointwise", "--out", str(point)])
        == 0
    )
    report = json.loads(point.read_text())
    ratings = [(r["rating_chosen"], r["rating_rejected"]) for r in report["per_pair"]]
    assert report["mode"] == "pointwise" and all(1 <= x <= 5 for pair in ratings for x in pair)
    agree = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in ratings) / 3
    assert report["agreement"] == pytest.approx(agree, abs=1e-4)


def test_online_dpo_asks_the_judge_named_in_the_config(tmp_path, tiny_model_dir):
    from rlhflab.config import load_config
    from rlhflab.stages import online_dpo
    from rlhflab.stages.on_policy import require_feedback

    from ..helpers import PPO_PROMPTS, stage_config

    judge_dir = save_model_dir(
        tiny_lm(build_word_tokenizer(WORDS), seed=3), build_word_tokenizer(WORDS), tmp_path / "j"
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PPO_PROMPTS[:8]))
    with pytest.raises(ConfigError, match="algo.judge_model is required"):
        load_config("online-dpo", None, ["algo.feedback=judge"])
    with pytest.raises(ConfigError, match="asks no judge"):
        load_config("online-dpo", None, ["algo.reward_model=rule:length", f"algo.judge_model={judge_dir}"])
    with pytest.raises(Exception, match="does not exist"):
        require_feedback(
            load_config("online-dpo", None, ["algo.feedback=judge", "algo.judge_model=/no/such"]).algo
        )
    cfg = stage_config(
        "online-dpo",
        tiny_model_dir,
        "algo.feedback=judge",
        f"algo.judge_model={judge_dir}",
        "algo.prompts_per_step=4",
        "algo.iterations=1",
        "sampling.max_new_tokens=6",
        data=prompts,
        out=tmp_path / "run",
    )
    online_dpo.train(cfg)
    pairs = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    asked = [p for p in pairs if p["first"] != p["second"]]
    assert asked
    judge = LMJudge.from_pretrained(str(judge_dir))
    p_first = judge.prob(
        [p["prompt"] for p in asked], [p["first"] for p in asked], [p["second"] for p in asked]
    )
    # argmax mode: the stage's labels are the judge's own verdicts on the logged pairs.
    want = [1.0 if x > 0.5 + 1e-6 else 0.0 if x < 0.5 - 1e-6 else 0.5 for x in p_first.tolist()]
    assert [p["label"] for p in asked] == want


class CountingRater(torch.nn.Module):
    """A stand-in LM for the pointwise mode: at the last position the logit of digit k is k x (number of "good"
    in the question), so the expected rating is 3 with no "good" and rises with each one."""

    def __init__(self, tokenizer):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab = len(tokenizer)
        self.digits = [tokenizer.convert_tokens_to_ids(str(k)) for k in range(1, 6)]
        self.good = tokenizer.convert_tokens_to_ids("good")

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for i, row in enumerate(input_ids.tolist()):
            for k, token in enumerate(self.digits, start=1):
                logits[i, -1, token] = k * row.count(self.good)
        return SimpleNamespace(logits=logits)


def _expected(goods: int) -> float:
    w = [math.exp(k * goods) for k in range(1, 6)]
    return sum(k * x for k, x in zip(range(1, 6), w)) / sum(w)


def test_pointwise_ratings_known_by_construction(tokenizer):
    from rlhflab.eval.judge import judge_pointwise

    judge = LMJudge(
        CountingRater(tokenizer), tokenizer, template=TEMPLATE, rate_template="{prompt} {response} ?"
    )
    ratings = judge.rate(["the film", "the film", "a good film"], ["bad", "good good", "fine"])
    # 0, 2 and 1 "good" in the three questions: 3.0, then the softmax-weighted means of 1..5.
    torch.testing.assert_close(ratings, torch.tensor([3.0, _expected(2), _expected(1)]))
    report = judge_pointwise(
        judge,
        ["a", "b", "c"],
        ["good", "fine", "bad"],
        ["bad", "fine", "good good"],
        gold_chosen=[1.0, 0.0, 1.0],
        gold_rejected=[0.0, 0.0, 0.0],
    )
    # Pair 0: chosen rated higher (agrees); pair 1: equal ratings (half); pair 2: rejected higher (disagrees).
    assert report["agreement"] == pytest.approx(0.5) and report["n_pairs"] == 3
    # Gold decides pairs 0 and 2 (chosen better), pair 1 is a gold tie: agreement (1 + 0) / 2.
    assert report["gold_pairs"] == 2 and report["gold_agreement"] == pytest.approx(0.5)
    assert report["per_pair"][0]["rating_chosen"] == pytest.approx(_expected(1))
    # Gold deciding pair 0 alone (chosen better), where the ratings agree: full agreement.
    only = judge_pointwise(
        judge,
        ["a", "b", "c"],
        ["good", "fine", "bad"],
        ["bad", "fine", "good good"],
        gold_chosen=[1.0, 0.0, 0.0],
        gold_rejected=[0.0, 0.0, 0.0],
    )
    assert (only["gold_pairs"], only["gold_agreement"]) == (1, 1.0)


def test_judge_reports_time_the_call_itself(tokenizer):
    import time

    from rlhflab.eval.judge import judge_agreement, judge_pointwise

    judge = LMJudge(
        CountingRater(tokenizer),
        tokenizer,
        template="{prompt} A {first} B {second} ?",
        rate_template="{prompt} {response} ?",
    )
    for measure, model in (
        (judge_agreement, CountingJudge(tokenizer)),
        (judge_pointwise, CountingRater(tokenizer)),
    ):
        judge.model = model
        started = time.perf_counter()
        report = measure(judge, ["a", "b"], ["good", "fine"], ["bad", "good"])
        elapsed = time.perf_counter() - started
        assert 0 < report["seconds"] <= elapsed + 0.01
        assert report["pairs_per_s"] == pytest.approx(2 / report["seconds"], rel=0.1)  # seconds are rounded
