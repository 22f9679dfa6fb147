import math

import pytest
import torch

from rlhflab.errors import ConfigError, UserError
from rlhflab.rollout.generate import SamplingSettings, generate
from rlhflab.stages.best_of_n import BestOfN, best_of_n, best_of_n_kl

from ..helpers import write_jsonl

PROMPTS = [
    "the cat sat on the mat",
    "what is the cat",
    "i like the dog",
    "why is the day sad",
    "say hi",
    "hello",
]


class WordCount:
    """A toy reward source: how often `word` occurs in the response; records its batch sizes."""

    name = "word_count"

    def __init__(self, word: str = "cat"):
        self.word, self.calls = word, []

    def score(self, prompts, responses):
        assert len(prompts) == len(responses)
        self.calls.append(len(responses))
        return torch.tensor([float(r.split().count(self.word)) for r in responses])


SETTINGS = SamplingSettings(max_new_tokens=12, temperature=1.0)


def test_best_of_n_picks_the_argmax_of_the_reward(tiny_model, tiny_tokenizer):
    reward = WordCount("cat")
    result = best_of_n(
        tiny_model, tiny_tokenizer, PROMPTS, reward, n=16, settings=SETTINGS, seed=0, score_batch_size=10
    )
    assert len(result.texts) == len(PROMPTS) and result.all_scores.shape == (len(PROMPTS), 16)
    assert all(len(row) == 16 for row in result.all_texts)
    # Scoring was batched: 96 responses, at most 10 per call, every response scored once.
    assert max(reward.calls) <= 10 and sum(reward.calls) == 96
    # The scores are the reward of the texts, and the pick is the first argmax of each row.
    again = WordCount("cat").score(PROMPTS, result.texts)
    assert torch.equal(result.scores, again)
    assert torch.equal(result.scores, result.all_scores.max(dim=1).values)
    for i, row in enumerate(result.all_texts):
        j = int(result.best_index[i])
        assert result.texts[i] == row[j]
        assert all(result.all_scores[i, k] < result.all_scores[i, j] for k in range(j))
        assert result.all_scores[i].tolist() == [float(t.split().count("cat")) for t in row]
    # Best-of-16 beats plain sampling (best-of-1) on the same samples; this toy has cats to find.
    assert result.scores.sum() > result.all_scores[:, 0].sum()


def test_best_of_k_curve_from_one_pass(tiny_model, tiny_tokenizer):
    result = best_of_n(tiny_model, tiny_tokenizer, PROMPTS, WordCount("the"), n=8, settings=SETTINGS, seed=1)
    one = result.best_of(1)
    assert one.texts == [row[0] for row in result.all_texts]
    for k in (1, 2, 4, 8):
        # Best-of-k is the first argmax over the first k samples, recounted here from their text.
        counts = [[t.split().count("the") for t in row[:k]] for row in result.all_texts]
        best = result.best_of(k)
        assert best.scores.tolist() == [float(max(c)) for c in counts], k
        assert best.texts == [row[c.index(max(c))] for row, c in zip(result.all_texts, counts)], k
    assert torch.equal(result.best_of(8).scores, result.scores)
    with pytest.raises(ConfigError, match="1 <= k <= n = 8"):
        result.best_of(9)


def test_best_of_n_is_reproducible_with_a_seed(tiny_model, tiny_tokenizer):
    a = best_of_n(tiny_model, tiny_tokenizer, PROMPTS[:2], WordCount(), n=4, settings=SETTINGS, seed=3)
    b = best_of_n(tiny_model, tiny_tokenizer, PROMPTS[:2], WordCount(), n=4, settings=SETTINGS, seed=3)
    assert a.all_texts == b.all_texts


def test_from_scores_ties_pick_the_first():
    scores = torch.tensor([[1.0, 3.0, 3.0], [0.0, -1.0, -2.0]])
    r = BestOfN.from_scores([["a", "b", "c"], ["d", "e", "f"]], scores)
    assert r.texts == ["b", "d"] and r.best_index.tolist() == [1, 0] and r.scores.tolist() == [3.0, 0.0]


def test_analytic_kl():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)


class Broken:
    name = "broken"

    def __init__(self, scores):
        self.scores = scores

    def score(self, prompts, responses):
        return torch.tensor(self.scores[: len(responses)])


def test_bad_reward_sources_get_clear_errors(tiny_model, tiny_tokenizer):
    with pytest.raises(UserError, match="'broken' returned a non-finite score"):
        best_of_n(tiny_model, tiny_tokenizer, PROMPTS[:1], Broken([1.0, math.nan]), n=2, settings=SETTINGS)
    with pytest.raises(UserError, match="returned 1 scores for 2 responses"):
        best_of_n(tiny_model, tiny_tokenizer, PROMPTS[:1], Broken([1.0]), n=2, settings=SETTINGS)
    with pytest.raises(ConfigError, match="n >= 1"):
        best_of_n(tiny_model, tiny_tokenizer, PROMPTS, WordCount(), n=0)
    with pytest.raises(TypeError, match="reward must have score"):
        best_of_n(tiny_model, tiny_tokenizer, WordCount(), PROMPTS)


def _best_of_4_args(policy, prompts_file, out, *extra: str) -> list[str]:
    """`rlhflab best-of-n` on the tiny policy: 4 samples of 6 tokens per prompt under -|words - 8|, all logged."""
    return [
        "best-of-n",
        "--policy",
        str(policy),
        "--reward",
        "rule:length:coef=1:target=8",
        "--prompts",
        str(prompts_file),
        "--out",
        str(out),
        "--n",
        "4",
        "--max-new-tokens",
        "6",
        "--all-samples",
        *extra,
    ]


def test_best_of_n_command_writes_sft_records(tiny_model_dir, tmp_path, capsys):
    # A rule reward that prefers responses near 8 words: -|words - 8| (rule:length with target 8).
    import json

    from rlhflab.cli import main
    from rlhflab.data import load_records

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ["the cat", "the dog", "i say"] * 3)
    )
    out = tmp_path / "bo" / "best.jsonl"
    args = _best_of_4_args(tiny_model_dir, prompts_file, out, "--max-prompts", "6")
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        assert len(row["samples"]) == 4 and row["score"] == max(row["sample_scores"])
        assert row["completion"] == row["samples"][row["sample_scores"].index(row["score"])]
        assert row["sample_scores"] == [-abs(len(t.split()) - 8.0) for t in row["samples"]]  # -|words - 8|
        assert row["mean_score"] == pytest.approx(sum(row["sample_scores"]) / 4)
    assert len(load_records(str(out), "sft").records) == 6  # ready for `rlhflab sft data.train_path=OUT`
    assert "best of 4" in capsys.readouterr().out
    for bad, message in (
        (["--n", "0"], "--n must be >= 1"),
        (["--out", str(tmp_path / "x.txt")], "must be a .jsonl"),
    ):
        assert main(args + bad) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists()


def test_sparrow_rerank_by_hand():
    from rlhflab.stages.best_of_n import sparrow_scores

    # One prompt, three samples with preference scores 2, 1, 0 (mean 1) and one rule. Sample 0 very likely
    # breaks it (violation logit +5: followed with 1 - sigma(5) = 0.006693), samples 1 and 2 very likely not
    # (followed with 0.993307). Re-rank = sigma(r - 1) * P(followed):
    #   0.731059 * 0.006693 = 0.004893,  0.5 * 0.993307 = 0.496654,  0.268941 * 0.993307 = 0.267141.
    pref = torch.tensor([[2.0, 1.0, 0.0]])
    logits = torch.tensor([[[5.0], [-5.0], [-5.0]]])
    torch.testing.assert_close(
        sparrow_scores(pref, logits), torch.tensor([[0.004893, 0.496654, 0.267141]]), atol=1e-6, rtol=0
    )
    plain, sparrow = (
        BestOfN.from_scores([["a", "b", "c"]], pref),
        BestOfN.from_scores([["a", "b", "c"]], pref, logits),
    )
    assert (plain.texts, sparrow.texts) == (["a"], ["b"])
    assert sparrow.scores.tolist() == [1.0]  # the reported score stays the preference score of the pick
    # Best-of-2 from the first two samples re-ranks among them (mean 1.5): sample 1 still wins.
    assert sparrow.best_of(2).texts == ["b"] and sparrow.best_of(2).rule_logits.shape == (1, 2, 1)


def test_best_of_n_command_reranks_with_rule_classifiers(tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    import json

    from rlhflab.cli import main
    from rlhflab.rewards.learned import LearnedReward
    from rlhflab.stages.best_of_n import sparrow_scores

    from ..helpers import tiny_reward_model

    rules = tiny_reward_model("llama", 4, len(tiny_tokenizer)).save_pretrained(
        tmp_path / "rules", tiny_tokenizer
    )
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ["the cat", "the dog", "i say"])
    )
    out = tmp_path / "best.jsonl"
    args = _best_of_4_args(tiny_model_dir, prompts_file, out)
    assert main([*args, "--rerank", "sparrow"]) == 2 and "needs --rules" in capsys.readouterr().err
    assert main([*args, "--rerank", "sparrow", "--rules", str(rules)]) == 0
    scorer = LearnedReward.from_pretrained(rules)
    for row in (json.loads(line) for line in out.read_text().splitlines()):
        # Recomputed from the logged samples: the rule heads' logits, the re-rank, its argmax.
        logits = scorer.score_all_heads([row["prompt"]] * 4, row["samples"])
        rerank = sparrow_scores(torch.tensor([row["sample_scores"]]), logits[None])[0]
        j = int(rerank.argmax())
        assert row["completion"] == row["samples"][j] and row["score"] == row["sample_scores"][j]
        assert row["rerank_score"] == pytest.approx(float(rerank[j]), abs=1e-6)
        assert list(row["rule_violation"]) == scorer.model.head_names
        assert list(row["rule_violation"].values()) == pytest.approx(
            torch.sigmoid(logits[j]).tolist(), abs=1e-6
        )


def test_a_quark_model_is_sampled_behind_its_best_token(tiny_model, tiny_tokenizer, tmp_path, capsys):
    """`rlhflab best-of-n` on a model saved by `rlhflab quark`: every sample drawn behind the best reward token
    (the same samples as `best_of_n(..., sample_prompts=best_token_prompts(...))` at the same seed, not those of
    the plain prompts), no control token in a response, the reward reading the plain prompts."""
    import copy
    import json

    from rlhflab.cli import main
    from rlhflab.stages import quark as qk
    from rlhflab.stages.on_policy import row_seeds

    model, tokenizer = copy.deepcopy(tiny_model), copy.deepcopy(tiny_tokenizer)
    tokens = qk.add_control_tokens(model, tokenizer, 2, seed=0)
    # Give each control token the output row of the token the model writes most: each is then as likely as that
    # token, so a sampler that did not block them would write them often.
    first = generate(model, tokenizer, PROMPTS * 4, SamplingSettings(6), seed=0)
    counts = torch.bincount(first.response_ids[first.response_mask])
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[tokens.ids] = head[int(counts[: tokens.vocab_before].argmax())].clone()
    saved = qk.save_quark_model(model, tokenizer, tokens, tmp_path / "quark")
    prompts = ["the cat", "the dog", "i say"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "best.jsonl"
    assert main(_best_of_4_args(saved, tmp_path / "prompts.jsonl", out)) == 0
    assert "sampling behind its best token" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    settings = SamplingSettings(max_new_tokens=6, suppress_token_ids=tuple(tokens.ids))
    ids = qk.best_token_prompts(saved, prompts, tokenizer=tokenizer)
    # The command samples each row from its own seed (`row_seeds` of --seed and the row's index in the run).
    kw = {"n": 4, "seed": 0, "row_seeds": row_seeds(0, 12)}
    by_hand = best_of_n(model, tokenizer, prompts, WordCount(), settings=settings, sample_prompts=ids, **kw)
    plain = best_of_n(model, tokenizer, prompts, WordCount(), settings=settings, **kw)
    # Unblocked, the (boosted) control tokens are sampled; decoding drops them, so the texts differ.
    unblocked = best_of_n(
        model, tokenizer, prompts, WordCount(), settings=SamplingSettings(6), sample_prompts=ids, **kw
    )
    samples = [r["samples"] for r in rows]
    assert samples == by_hand.all_texts and samples != plain.all_texts and samples != unblocked.all_texts
    written = generate(model, tokenizer, [x for x in ids for _ in range(4)], SamplingSettings(6), seed=0)
    assert torch.isin(written.response_ids[written.response_mask], torch.tensor(tokens.ids)).any()
    with pytest.raises(ConfigError, match="sample_prompts"):
        best_of_n(model, tokenizer, prompts, WordCount(), n=2, sample_prompts=ids[:1])


def test_row_seeded_samples_depend_on_their_seed_and_prompt_only(tiny_model, tiny_tokenizer):
    """With `row_seeds`, a prompt's n samples are the same whatever the batch size and whatever the other prompts
    of the call: what lets processes each sample a share of the prompts and get the rows of one process."""
    from rlhflab.stages.on_policy import row_seeds

    prompts, seeds = PROMPTS[:5], row_seeds(7, 20)
    kw = {"n": 4, "settings": SETTINGS, "seed": 7}
    whole = best_of_n(tiny_model, tiny_tokenizer, prompts, WordCount("the"), row_seeds=seeds, **kw)
    small = best_of_n(
        tiny_model, tiny_tokenizer, prompts, WordCount("the"), row_seeds=seeds, batch_size=3, **kw
    )
    assert small.all_texts == whole.all_texts and torch.equal(small.all_scores, whole.all_scores)
    # Prompts 1 and 3 alone (their rows' seeds): their samples in the whole run.
    alone = best_of_n(
        tiny_model, tiny_tokenizer, [prompts[1], prompts[3]], WordCount("the"),
        row_seeds=seeds[4:8] + seeds[12:16], **kw,
    )  # fmt: skip
    assert alone.all_texts == [whole.all_texts[1], whole.all_texts[3]]
    # Not a constant: the samples of one prompt differ, and another seed draws others.
    assert len({t for row in whole.all_texts for t in row}) > 5
    other = best_of_n(tiny_model, tiny_tokenizer, prompts, WordCount("the"), row_seeds=row_seeds(8, 20), **kw)
    assert other.all_texts != whole.all_texts
    with pytest.raises(ConfigError, match="19 row seeds for 5 prompts x 4 samples"):
        best_of_n(tiny_model, tiny_tokenizer, prompts, WordCount(), row_seeds=seeds[:19], **kw)


def test_the_command_writes_the_same_file_whatever_the_batch_size(tiny_model_dir, tmp_path, monkeypatch):
    """`rlhflab best-of-n` samples every row from its own seed: its output does not depend on how many prompts
    share a `generate` call."""
    import functools
    import json

    from rlhflab.cli import main
    from rlhflab.stages import best_of_n as bon

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:5]))
    assert main(_best_of_4_args(tiny_model_dir, prompts_file, tmp_path / "a.jsonl")) == 0
    monkeypatch.setattr(bon, "best_of_n", functools.partial(bon.best_of_n, batch_size=3))
    assert main(_best_of_4_args(tiny_model_dir, prompts_file, tmp_path / "b.jsonl")) == 0
    a, b = ((tmp_path / f).read_text() for f in ("a.jsonl", "b.jsonl"))
    assert a == b and len(a.splitlines()) == 5
    assert len({t for line in a.splitlines() for t in json.loads(line)["samples"]}) > 5


class FakeEngine:
    """Stands in for a `VLLMEngine`: records what it was asked, answers one text per row."""

    def __init__(self):
        self.calls = []

    def sample(self, rows, settings, row_seeds=None, *, prompts=None, seed=None):
        self.calls.append({"rows": len(rows), "row_seeds": row_seeds, "seed": seed})
        from types import SimpleNamespace

        return SimpleNamespace(texts=[f"the {'cat ' * (i % 3)}" for i in range(len(rows))])


def test_an_engine_gets_the_row_seeds(tiny_tokenizer):
    engine = FakeEngine()
    result = best_of_n(
        None, tiny_tokenizer, PROMPTS[:2], WordCount(), n=3, seed=5, engine=engine, row_seeds=list(range(6))
    )
    assert engine.calls == [{"rows": 6, "row_seeds": list(range(6)), "seed": 5}]
    assert result.all_scores.tolist() == [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]


def test_the_vllm_engine_is_refused_by_the_flag_that_asked_for_it(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """`--engine vllm` on a machine without CUDA: one line naming the command's flag, exit 2, nothing written."""
    from rlhflab.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the cat"}])
    args = [
        "best-of-n",
        "--policy",
        str(tiny_model_dir),
        "--reward",
        "rule:length",
        "--prompts",
        str(prompts),
    ]
    assert main([*args, "--out", str(tmp_path / "out.jsonl"), "--engine", "vllm"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "best-of-n: --engine=vllm needs a CUDA GPU" in err
        and "use --engine=hf" in err
    )
    assert not (tmp_path / "out.jsonl").exists()
