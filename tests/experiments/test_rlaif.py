"""`rlhflab experiment rlaif`: the verdict rule, the judge's relabelling of the pairs, and a tiny run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from rlhflab.cli import main
from rlhflab.data.readers import write_jsonl
from rlhflab.experiments import rlaif as E
from rlhflab.models.tiny import build_word_tokenizer

from ..helpers import save_model_dir, tiny_lm

TINY = [
    "data.n_sft=64",
    "data.n_pairs=24",
    "data.n_prompts=16",
    "data.n_heldout=16",
    "eval.prompts=4",
    "eval.samples=2",
    "sft.model.name_or_path=lab:sentiment:tiny",
    "sft.optim.max_steps=2",
    "rm.optim.max_steps=2",
    "rm.optim.batch_size=4",
    "rm.data.eval_fraction=0.25",
    "ppo.algo.iterations=2",
    "ppo.algo.rollout_batch_size=8",
    "ppo.algo.minibatch_size=4",
    "dpo.optim.max_steps=2",
    "dpo.optim.batch_size=8",
]


def _row(arm, method, seed, matches=True, beats=True):
    return {"arm": arm, "method": method, "seed": seed, "matches_human": matches, "beats_sft": beats}


def test_verdict_rule():
    both = [_row("ai", m, s) for s in (0, 1) for m in ("sft", "ppo", "dpo")]
    assert E.decide(both) == "reproduced"
    ppo_below_sft = [_row("ai", m, s, beats=m != "ppo" or s == 0) for s in (0, 1) for m in ("ppo", "dpo")]
    assert E.decide(ppo_below_sft) == "partly reproduced"
    dpo_only_once = [
        _row("ai", m, s, matches=(m == "dpo" and s == 1)) for s in (0, 1) for m in ("ppo", "dpo")
    ]
    assert E.decide(dpo_only_once) == "partly reproduced"
    none = [_row("ai", m, s, matches=False) for s in (0, 1) for m in ("ppo", "dpo")]
    assert E.decide(none + [_row("human", "ppo", 0)]) == "not reproduced"  # human rows never count


class FixedJudge:
    """A judge whose P(first better) is given per (first) response text; P("A") mirrors it (no bias)."""

    name = "fixed"

    def __init__(self, p: dict[str, float]):
        self.p = p

    def compare(self, prompts, first, second):
        p = torch.tensor([self.p[f] for f in first], dtype=torch.float64)
        return SimpleNamespace(
            p_first=p, p_a=p, p_a_swapped=1 - p, consistent=torch.ones(len(p), dtype=torch.bool)
        )


def test_relabel_flips_drops_ties_and_forgets_ratings(tmp_path):
    path = tmp_path / "pairs.jsonl"
    prompt = [{"role": "user", "content": "how was the film ?"}]
    write_jsonl(
        [
            {
                "prompt": prompt,
                "chosen": "the film was great .",
                "rejected": "the film was bad .",
                "rating": "better",
            },
            {
                "prompt": prompt,
                "chosen": "the plot was dull .",
                "rejected": "the plot was superb .",
                "rating": "better",
            },
            {
                "prompt": prompt,
                "chosen": "the cast was fine .",
                "rejected": "the cast was good .",
                "margin": 1.0,
            },
        ],
        path,
    )
    judge = FixedJudge({"the film was great .": 0.9, "the plot was dull .": 0.2, "the cast was fine .": 0.5})
    stats = E.judge_relabel(judge, "sentiment")(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    texts = [(r["chosen"], r["rejected"]) for r in rows]
    chosen_text = [c if isinstance(c, str) else c[0]["content"] for c, _ in texts]
    assert chosen_text == ["the film was great .", "the plot was superb ."]  # kept, flipped; the tie dropped
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
    assert (stats["n_pairs"], stats["kept"], stats["flipped"]) == (3, 2, 1)
    # Gold (VADER) prefers great > bad, superb > dull and good > fine: the file's labels are right on pair 0
    # only (1/3); the judge on pairs 0 and 1, and even on pair 2, which counts half: (1 + 1 + 0.5) / 3.
    assert stats["gold_agreement"] == pytest.approx(2.5 / 3, abs=1e-4)
    assert stats["annotator_gold_agreement"] == pytest.approx(1 / 3, abs=1e-4)


def test_tiny_rlaif_run_writes_the_result(tmp_path, tiny_lab_cache, capsys):
    words = "the film was good bad great a very not".split() + ["A", "B", "1", "2", "3", "4", "5"]
    tok = build_word_tokenizer(words)
    judge = save_model_dir(tiny_lm(tok, seed=1), tok, tmp_path / "judge")
    out = tmp_path / "exp"
    assert main(["experiment", "online-vs-offline", "--judge", str(judge), "--output-dir", str(out)]) == 2
    assert "--judge applies to" in capsys.readouterr().err
    argv = ["experiment", "rlaif", *TINY, "--judge", str(judge), "--seeds", "0", "--output-dir", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["experiment"] == "rlaif" and result["verdict"] in (
        "reproduced",
        "partly reproduced",
        "not reproduced",
    )
    assert result["verdict"] == E.decide(result["table"])
    assert {(r["arm"], r["method"]) for r in result["table"]} == {
        (a, m) for a in E.ARMS for m in ("sft", "ppo", "dpo")
    }
    relabel = json.loads((out / "seed-0" / "ai" / "data" / "relabel.json").read_text())
    ai_pairs = (out / "seed-0" / "ai" / "data" / "pairs.jsonl").read_text().splitlines()
    assert relabel["kept"] == len(ai_pairs) and relabel["n_pairs"] >= len(ai_pairs)
    assert all("rating" not in json.loads(line) for line in ai_pairs)
    human_pairs = (out / "seed-0" / "human" / "data" / "pairs.jsonl").read_text().splitlines()
    assert len(human_pairs) == relabel["n_pairs"]  # the judge was asked the annotators' candidate pairs
    assert (out / "report.html").exists() and "gold_by_arm" in result["plots"]
