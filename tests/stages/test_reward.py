import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from rlhflab.config import load_config
from rlhflab.core.metrics_log import read_metrics
from rlhflab.data import PairwiseRecord
from rlhflab.data.reward_batch import collate_reward_batch
from rlhflab.errors import ConfigError, DataError, TrainingHealthError
from rlhflab.eval.reward_accuracy import accuracy_by_rating, format_accuracy_table
from rlhflab.losses import pairwise_all_pairs, plackett_luce
from rlhflab.losses.reward import ranked_loss, stacked_bradley_terry
from rlhflab.models.final_layer import supports_shared_prompt
from rlhflab.models.reward_model import RewardModel, batch_rewards
from rlhflab.rewards import LearnedReward
from rlhflab.stages import reward, reward_data

from ..helpers import (
    SHORT_TEXT,
    assert_resume_matches,
    assert_stopped_with_checkpoint_intact,
    poison_from_call,
    stage_config,
    tiny_reward_model,
    write_jsonl,
)

SUBJECTS = ["the cat", "the dog", "the film", "the day", "this movie", "it"]
RATINGS = ["significantly_better", "better", "slightly_better", "negligibly_better"]


def _pairs(n=96, chosen_word="good", rejected_word="bad", seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        s = rng.choice(SUBJECTS)
        rows.append(
            {
                "prompt": f"what is {rng.choice(SUBJECTS)} ?",
                "chosen": f"{s} is very {chosen_word} .",
                "rejected": f"{s} is very {rejected_word} .",
                "rating": RATINGS[i % 4],
            }
        )
    return rows


def _cfg(model_dir, out, *extra, data=None):
    return stage_config("rm", model_dir, *SHORT_TEXT, *extra, data=data, out=out)


def _eval_rows(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval/accuracy" in r]


@pytest.mark.parametrize("chosen_word,rejected_word", [("good", "bad"), ("bad", "good")])
def test_rm_separates_a_separable_set(tiny_model_dir, tmp_path, chosen_word, rejected_word):
    # Both orientations must reach high accuracy, so it cannot be a lucky initial head.
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(chosen_word=chosen_word, rejected_word=rejected_word))
    out = tmp_path / "run"
    final = reward.train(
        _cfg(
            tiny_model_dir,
            out,
            "optim.max_steps=30",
            "data.eval_fraction=0.25",
            "logging.eval_every=10",
            data=data,
        )
    )
    evals = _eval_rows(out)
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["eval/accuracy"] > 0.9
    assert evals[-1]["eval/loss"] < 0.25 * evals[0]["eval/loss"]
    train_rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss/rm" in r]
    assert train_rows[-1]["reward/accuracy"] > 0.9
    # Throughput without the clock: 8 pairs per logged step, so its real tokens = 8 * tokens_per_s / pairs_per_s,
    # a whole number; each epoch (9 steps over the same 72 training pairs) sees the same tokens in all.
    tokens = [8 * r["perf/tokens_per_s"] / r["perf/pairs_per_s"] for r in train_rows]
    assert len(tokens) == 30 and tokens == pytest.approx([round(t) for t in tokens], rel=1e-9)
    assert len({round(sum(tokens[i : i + 9])) for i in (0, 9, 18)}) == 1
    # Table 28 layout on disk; the saved model is a plain HF sequence classifier with its settings file.
    table = json.loads((out / "eval_accuracy.json").read_text())["reward"]
    assert list(table) == [*RATINGS, "avg"] and table["avg"]["n"] == 24
    assert "| head | Significantly Better | Better |" in (out / "eval_accuracy.md").read_text()
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(final).config.num_labels == 1
    assert json.loads((final / "rlhflab_reward.json").read_text())["max_length"] == 32
    # Normalization stats fitted on training responses: whitened training rewards have mean ~0, std ~1.
    rm = LearnedReward.from_pretrained(final, normalize=True)
    rows = _pairs(chosen_word=chosen_word, rejected_word=rejected_word)
    scores = rm.score(
        [r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    )
    assert abs(float(scores.mean())) < 0.2 and 0.7 < float(scores.std()) < 1.3


def test_rm_starts_from_the_sft_backbone(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tiny_model_dir, "unused", "algo.heads=helpful,safe")
    model, _ = reward._build_model(cfg, str(tiny_model_dir), ["helpful", "safe"])
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for name, p in model.backbone.named_parameters():
        assert torch.equal(p, lm.model.get_parameter(name)), name
    assert model.head_names == ["helpful", "safe"] and model.score.weight.shape == (2, 32)


def test_rm_with_lora_and_gradient_checkpointing(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(n=32))
    cfg = _cfg(
        tiny_model_dir,
        tmp_path / "run",
        "model.lora.enabled=true",
        "model.lora.r=4",
        "model.gradient_checkpointing=true",
        "optim.max_steps=6",
        data=data,
    )
    model, _ = reward._build_model(cfg, str(tiny_model_dir), ["reward"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and all("lora_" in n for n in trainable - {"score.weight"})
    final = reward.train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss/rm" in r]
    assert rows[-1]["loss/rm"] < rows[0]["loss/rm"]
    merged = RewardModel.from_pretrained(final)  # LoRA folded into plain weights
    assert not any("lora_" in n for n in merged.state_dict())


def test_pairwise_loss_uses_margins_by_hand():
    """chosen [1, 0], rejected [0, 0]: no margin -> [-log s(1), log 2] = [0.313262, 0.693147];
    margins [1, 0] -> [log 2, log 2]; centering 0.5 * (r_c + r_r)^2 adds [0.5, 0]."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    plain = stacked_bradley_terry(rewards, None)
    torch.testing.assert_close(plain.loss, torch.tensor([0.313262, math.log(2)]), atol=1e-6, rtol=0)
    with_margin = stacked_bradley_terry(rewards, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(with_margin.loss, torch.tensor([math.log(2), math.log(2)]))
    centered = stacked_bradley_terry(rewards, None, center_coef=0.5)
    torch.testing.assert_close(centered.loss, plain.loss + torch.tensor([0.5, 0.0]))
    smoothed = stacked_bradley_terry(rewards, None, label_smoothing=0.1)
    # 0.9 * -log s(1) + 0.1 * -log s(-1) = 0.9 * 0.313262 + 0.1 * 1.313262
    assert float(smoothed.loss[0]) == pytest.approx(0.413262, abs=1e-6)


def test_margins_come_from_the_rating_table():
    rec = PairwiseRecord("p", "a", "b", rating="better")
    assert reward_data.margin_of(rec, "none", "f") is None
    assert reward_data.margin_of(rec, "small", "f") == pytest.approx(2 / 3)
    assert reward_data.margin_of(rec, "large", "f") == 2.0
    assert reward_data.margin_of(PairwiseRecord("p", "a", "b", margin=0.7), "data", "f") == 0.7
    with pytest.raises(DataError, match="f, record with prompt 'p', field 'rating': algo.margin=large needs"):
        reward_data.margin_of(PairwiseRecord("p", "a", "b"), "large", "f")


def test_margin_training_raises_the_first_loss_and_the_separation(tiny_model_dir, tmp_path):
    # Same seed, same initial rewards: a positive margin can only raise the step-1 loss, and training
    # against it pushes chosen and rejected further apart.
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(n=64))
    first, gap = {}, {}
    for margin in ("none", "large"):
        out = tmp_path / margin
        reward.train(
            _cfg(
                tiny_model_dir,
                out,
                "optim.max_steps=8",
                f"algo.margin={margin}",
                "algo.normalization_samples=0",
                "optim.lr=3e-3",
                data=data,
            )
        )
        rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss/rm" in r]
        first[margin], gap[margin] = rows[0]["loss/rm"], rows[-1]["reward/margin"]
    assert first["large"] > first["none"] + 0.3
    assert gap["large"] > gap["none"]


def _ranked_rows(n=64, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        s = rng.choice(SUBJECTS)
        row = {
            "prompt": f"how was {s} ?",
            "responses": [
                f"{s} was good good good .",
                f"{s} was good good .",
                f"{s} was good .",
                f"{s} was .",
            ],
        }
        if rng.random() < 0.3:  # a tie between the two middle responses
            row["responses"][2] = f"yes {s} was good good ."
            row["ranks"] = [0, 1, 1, 2]
        rows.append(row)
    return rows


@pytest.mark.parametrize("loss", ["plackett_luce", "all_pairs"])
def test_kwise_training_raises_kendall_tau(tiny_model_dir, tmp_path, loss):
    data = write_jsonl(tmp_path / "ranked.jsonl", _ranked_rows())
    out = tmp_path / "run"
    reward.train(
        _cfg(
            tiny_model_dir,
            out,
            f"algo.loss={loss}",
            "optim.max_steps=24",
            "data.eval_fraction=0.25",
            "logging.eval_every=12",
            data=data,
        )
    )
    evals = _eval_rows(out)
    assert evals[0]["eval/kendall_tau"] < 0.5
    assert evals[-1]["eval/kendall_tau"] > 0.9 and evals[-1]["eval/accuracy"] > 0.9
    assert evals[-1]["eval/kendall_tau"] > evals[0]["eval/kendall_tau"] + 0.4


def _ranked(scores, batch, **kw):
    return ranked_loss(scores, batch["num_responses"], batch["ranks"], **kw)


def _ranked_batch(ranks_list):
    examples = []
    for ranks in ranks_list:
        k = len(ranks)
        ex = {
            "input_ids": [[1, 5]] * k,
            "attention_mask": [[1, 1]] * k,
            "loss_mask": [[False, True]] * k,
            "ranks": ranks,
            "head": 0,
        }
        ex["pairs"] = [(i, j) for i in range(k) for j in range(i + 1, k) if ranks[i] < ranks[j]]
        examples.append(ex)
    return collate_reward_batch(examples, "ranked", pad_id=0)


def test_ranked_losses_without_ties_match_the_loss_library():
    scores = torch.tensor([2.0, 0.5, -1.0, 0.3, 0.1])  # one ranking of 3, one of 2
    for loss, ref in (("all_pairs", pairwise_all_pairs), ("plackett_luce", plackett_luce)):
        out = _ranked(scores, _ranked_batch([[0, 1, 2], [0, 1]]), loss=loss)
        expected = torch.cat([ref(scores[None, :3]).loss, ref(scores[None, 3:]).loss])
        torch.testing.assert_close(out.loss, expected)
    acc = _ranked(torch.tensor([0.0, 1.0, -1.0]), _ranked_batch([[0, 1, 2]]), loss="all_pairs")
    assert acc.metrics["reward/accuracy"].tolist() == [pytest.approx(2 / 3)]


def test_ranked_losses_with_ties_by_hand():
    """ranks [0, 1, 1], scores r = [1, 0, 0.5].
    all_pairs: pairs (0,1), (0,2) only: mean(-log s(1), -log s(0.5)) = (0.313262 + 0.474077) / 2 = 0.393669.
    plackett_luce: orders (0,1,2) and (0,2,1): P = e^1/Z * (e^0 / (e^0 + e^.5) + e^.5 / (e^0 + e^.5)) = e^1/Z,
    Z = e^1 + e^0 + e^.5, so the loss is -(1 - log Z) = log(e + 1 + e^.5) - 1 = 0.832945."""
    r = torch.tensor([1.0, 0.0, 0.5])
    out = _ranked(r, _ranked_batch([[0, 1, 1]]), loss="all_pairs")
    assert float(out.loss[0]) == pytest.approx(
        (-F.logsigmoid(torch.tensor(1.0)) - F.logsigmoid(torch.tensor(0.5))).item() / 2
    )
    assert float(out.loss[0]) == pytest.approx(0.393669, abs=1e-6)
    out = _ranked(r, _ranked_batch([[0, 1, 1]]), loss="plackett_luce")
    assert float(out.loss[0]) == pytest.approx(math.log(math.e + 1 + math.exp(0.5)) - 1, abs=1e-6)
    assert reward_data.tie_orders([0, 1, 1, 2]) == [[0, 1, 2, 3], [0, 2, 1, 3]]
    with pytest.raises(ConfigError, match="use algo.loss=all_pairs"):
        reward_data.tie_orders([0] * 6 + [1])


def test_accuracy_by_rating_on_a_hand_made_example():
    chosen = [2.0, 1.0, 0.0, 3.0, 1.0, 0.5]
    rejected = [1.0, 2.0, 0.0, 1.0, 0.0, 0.0]
    ratings = ["significantly_better", "significantly_better", "better", "slightly_better", None, "custom"]
    table = accuracy_by_rating(chosen, rejected, ratings)
    # sig: 1 right, 1 wrong -> 0.5; better: a tie -> 0.5; slightly: 1; negligibly: empty; unrated: 1;
    # custom: 1; avg: (1 + 0 + 0.5 + 1 + 1 + 1) / 6 = 0.75.
    assert list(table) == [*RATINGS, "custom", "unrated", "avg"]
    assert table["significantly_better"] == {"accuracy": 0.5, "n": 2}
    assert table["better"] == {"accuracy": 0.5, "n": 1}
    assert table["slightly_better"] == {"accuracy": 1.0, "n": 1}
    assert math.isnan(table["negligibly_better"]["accuracy"]) and table["negligibly_better"]["n"] == 0
    assert table["avg"] == {"accuracy": 0.75, "n": 6}
    text = format_accuracy_table({"helpful": table})
    assert text.splitlines()[0] == (
        "| head | Significantly Better | Better | Slightly Better | "
        "Negligibly Better / Unsure | custom | Unrated | Avg |"
    )
    assert text.splitlines()[2] == (
        "| helpful | 50.0 (n=2) | 50.0 (n=1) | 100.0 (n=1) | - | 100.0 (n=1) | 100.0 (n=1) | 75.0 (n=6) |"
    )


def test_two_heads_each_learn_their_own_aspect(tiny_model_dir, tmp_path):
    rng = random.Random(1)
    sentiment, animal = [], []
    for _ in range(64):
        who, how = rng.choice(["the cat", "the dog"]), rng.choice(["good", "bad"])
        sentiment.append({"prompt": "say it", "chosen": f"{who} is good .", "rejected": f"{who} is bad ."})
        animal.append(
            {"prompt": "say it", "chosen": f"the cat is {how} .", "rejected": f"the dog is {how} ."}
        )
    files = [write_jsonl(tmp_path / f"{n}.jsonl", rows) for n, rows in (("s", sentiment), ("a", animal))]
    out = tmp_path / "run"
    final = reward.train(
        _cfg(
            tiny_model_dir,
            out,
            f"algo.heads=sentiment={files[0]},animal={files[1]}",
            "optim.max_steps=40",
            "data.eval_fraction=0.2",
        )
    )
    last = _eval_rows(out)[-1]
    assert last["eval/sentiment/accuracy"] > 0.9 and last["eval/animal/accuracy"] > 0.9
    # Conflicting probes: each head must follow its own aspect and ignore the other.
    prompts, responses = ["say it"] * 2, ["the dog is good .", "the cat is bad ."]
    s = LearnedReward.from_pretrained(final, head="sentiment").score(prompts, responses)
    a = LearnedReward.from_pretrained(final, head="animal").score(prompts, responses)
    assert s[0] > s[1] and a[1] > a[0]


def test_config_refuses_impossible_combinations():
    with pytest.raises(ConfigError, match="algo.margin 'small' needs algo.loss=bradley_terry"):
        load_config("rm", None, ["algo.loss=plackett_luce", "algo.margin=small"])
    with pytest.raises(ConfigError, match="algo.heads names head 'a' twice"):
        load_config("rm", None, ["algo.heads=a,a=x.jsonl"])
    with pytest.raises(ConfigError, match="algo.label_smoothing"):
        load_config("rm", None, ["algo.loss=plackett_luce", "algo.label_smoothing=0.1"])
    assert [
        (h.name, h.data) for h in load_config("rm", None, ["algo.heads=h=a.jsonl, s"]).algo.head_specs()
    ] == [("h", "a.jsonl"), ("s", "")]


def _rm_state(final_dir):
    """The saved reward model's weights and its normalization statistics (buffers outside the state dict)."""
    rm = RewardModel.from_pretrained(final_dir)
    return {**rm.state_dict(), "reward_mean": rm.reward_mean, "reward_std": rm.reward_std}


def test_rm_resume_is_exact(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(n=48))

    def run(out, resume):
        cfg = _cfg(tiny_model_dir, out, "optim.max_steps=6", "logging.save_every=3", data=data)
        return reward.train(cfg, resume=resume)

    # Ctrl-C at the 5th optimizer step: resumed from the step-3 checkpoint.
    assert_resume_matches(
        run,
        tmp_path,
        crash_in=(reward, "optimizer_step"),
        crash_on_call=5,
        checkpoint_step=3,
        final_state=_rm_state,
    )


def test_rm_stops_on_nan_with_checkpoint_intact(tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(n=48))
    poison_from_call(monkeypatch, reward, "_row_rewards", 5)
    with pytest.raises(TrainingHealthError, match="step 5: loss/rm is not finite.*step-00000004"):
        reward.train(
            _cfg(tiny_model_dir, tmp_path / "run", "optim.max_steps=6", "logging.save_every=2", data=data)
        )
    assert_stopped_with_checkpoint_intact(tmp_path / "run", 4)


def _shared_vs_stacked_model(arch, kv_heads, tokenizer):
    # gpt2: absolute positions, so a response's position ids must continue from the prompt.
    return tiny_reward_model(arch, kv_heads, vocab=len(tokenizer))


def test_shared_prompt_rows_only_where_the_mask_is_known_to_work(tiny_tokenizer):
    from transformers import BloomConfig, BloomModel

    assert not supports_shared_prompt(
        RewardModel(
            BloomModel(BloomConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, n_layer=1, n_head=4)), 1
        )
    )  # ALiBi from a 2-D mask
    windowed = _shared_vs_stacked_model("mistral", 2, tiny_tokenizer)
    assert supports_shared_prompt(windowed)
    windowed.config.sliding_window = 16  # a custom mask would override the window
    assert not supports_shared_prompt(windowed)
    windowed.config._attn_implementation = "flash_attention_2"
    assert not supports_shared_prompt(windowed)


@pytest.mark.parametrize(
    "arch,kv_heads", [("llama", 4), ("llama", 2), ("gpt2", 4), ("qwen2", 2), ("mistral", 2)]
)
def test_shared_prompt_rows_give_the_rewards_and_gradients_of_separate_rows(tiny_tokenizer, arch, kv_heads):
    from rlhflab.data import tokenize_pair, tokenize_ranked
    from rlhflab.data.records import RankedRecord

    model = _shared_vs_stacked_model(arch, kv_heads, tiny_tokenizer)
    assert supports_shared_prompt(model)
    pairs = [
        tokenize_pair(
            PairwiseRecord(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"] + " very bad" * i),
            tiny_tokenizer,
        )
        for i, r in enumerate(_pairs(n=3))
    ]
    ranked = [
        tokenize_ranked(
            RankedRecord(
                prompt="what is it ?",
                responses=["it is good .", "it is very very bad .", "bad"],
                ranks=[0, 1, 2],
            ),
            tiny_tokenizer,
        ),
        tokenize_ranked(
            RankedRecord(prompt="what is the day ?", responses=["good", "bad ."], ranks=[0, 1]),
            tiny_tokenizer,
        ),
    ]
    for kind, examples in (("pairwise", pairs), ("ranked", ranked)):
        for e in examples:
            e["head"], e["pairs"] = 1, [(0, 1)]
        results = []
        for shared in (True, False):
            batch = collate_reward_batch(examples, kind, tiny_tokenizer.pad_token_id, shared=shared)
            assert ("read_rows" in batch) == shared
            model.zero_grad(set_to_none=True)
            rewards = batch_rewards(model, batch, torch.device("cpu"))
            weights = torch.linspace(-1.0, 2.0, rewards.numel()).view_as(
                rewards
            )  # every reward its own gradient
            (rewards * weights).sum().backward()
            results.append(
                (
                    rewards.detach(),
                    {n: p.grad.clone() for n, p in model.named_parameters()},
                    int(batch["attention_mask"].sum()),
                )
            )
        (shared_r, shared_g, shared_tokens), (rows_r, rows_g, rows_tokens) = results
        assert torch.allclose(shared_r, rows_r, atol=1e-5), kind
        for name, grad in rows_g.items():
            assert torch.allclose(shared_g[name], grad, atol=1e-5), (kind, name)
        # The prompt ran once per example instead of once per response.
        n_responses = [2] * len(pairs) if kind == "pairwise" else [3, 2]
        saved = sum(len(e["prompt_input_ids"]) * (k - 1) for e, k in zip(examples, n_responses))
        assert rows_tokens - shared_tokens == saved > 0, kind


def _labelled(n=96, word="good", seed=0):
    """Single responses, half of them containing `word` (labelled True): a rule a classifier can learn."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        subjects = [x for x in SUBJECTS if (word in x.split()) == positive] or SUBJECTS
        words = [
            x
            for x in ("good", "bad", "great", "sad")
            if (x == word) == positive or word in " ".join(subjects)
        ]
        completion = f"{rng.choice(subjects)} is very {rng.choice(words)} ."
        rows.append(
            {
                "prompt": f"what is {rng.choice(SUBJECTS)} ?",
                "completion": completion,
                "label": word in completion.split(),
            }
        )
    return rows


def test_binary_rm_learns_a_classifier_and_each_rule_head_its_own_rule(tiny_model_dir, tmp_path):
    from rlhflab.eval.reward_accuracy import binary_auc
    from rlhflab.losses import binary_classifier

    rule_a = write_jsonl(tmp_path / "a.jsonl", _labelled(word="good"))
    rule_b = write_jsonl(tmp_path / "b.jsonl", _labelled(word="cat", seed=1))
    out = tmp_path / "run"
    cfg = _cfg(
        tiny_model_dir,
        out,
        "algo.loss=binary",
        f"algo.heads=good={rule_a},cat={rule_b}",
        "optim.max_steps=40",
        "data.eval_fraction=0.25",
        "logging.eval_every=20",
    )
    final = reward.train(cfg)
    evals = _eval_rows(out)
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    for head in ("good", "cat"):
        assert evals[-1][f"eval/{head}/accuracy"] > 0.85 and evals[-1][f"eval/{head}/auc"] > 0.9
        assert evals[-1][f"eval/{head}/loss"] < evals[0][f"eval/{head}/loss"]
    # Wiring: the stage's loss on a batch is the loss library's classifier on the rewards of the heads the rows
    # train, and the rewards read back from the saved model separate each rule.
    model = RewardModel.from_pretrained(final)
    examples, _ = reward_data.load_examples(cfg, "unpaired", _tokenizer(tiny_model_dir), out)
    batch = collate_reward_batch(examples[:8], "unpaired", pad_id=0)
    assert batch["label"].tolist() == [e["label"] for e in examples[:8]]
    heads = batch["row_head"]
    assert heads.tolist() == [e["head"] for e in examples[:8]]
    scores = batch_rewards(model, batch, "cpu").gather(1, heads[:, None]).squeeze(1)
    got = reward._batch_loss(model, batch, "unpaired", cfg, torch.device("cpu"))
    torch.testing.assert_close(got.loss, binary_classifier(scores, batch["label"]).loss)
    for head, word, seed in (("good", "good", 5), ("cat", "cat", 6)):
        rows = _labelled(n=60, word=word, seed=seed)
        s = LearnedReward.from_pretrained(final, head=head).score(
            [r["prompt"] for r in rows], [r["completion"] for r in rows]
        )
        assert binary_auc(s, torch.tensor([r["label"] for r in rows])) > 0.9, head
    with pytest.raises(ConfigError, match="algo.loss=binary reads each label"):
        load_config("rm", None, ["algo.loss=binary", "algo.label_smoothing=0.1"])


def _tokenizer(model_dir):
    from rlhflab.models.loading import load_tokenizer

    return load_tokenizer(model_dir)
