"""Quark and binary reward conditioning (`rlhflab.stages.quark`) on the tiny lab setup of the rs tests: the control
tokens on the word-level tokenizer, the pool growing by the right count, quantile tokens as the pure function
assigns them, the training loss on a recorded batch against `quark_loss`, the saved model, exact resume, the
shipped configs and the config refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhflab.cli import build_parser, main
from rlhflab.config import load_config
from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import ConfigError, TrainingHealthError
from rlhflab.losses.quark import quark_loss, reward_quantiles
from rlhflab.rollout.generate import generate
from rlhflab.stages import STAGES
from rlhflab.stages import quark as qk
from rlhflab.stages.rejection_sampling import round_prompt_ids

from ..helpers import (
    PPO_PROMPTS,
    QUIET,
    assert_resume_matches,
    assert_same_tensors,
    assert_stopped_with_checkpoint_intact,
    causal_lm_state,
    poison_from_call,
    stage_config,
    tiny_lm,
    write_jsonl,
)

CONFIGS = Path(__file__).parents[2] / "configs"


class WordCount:
    """A reward whose preference is known: how often `word` appears in the response."""

    name = "word-count"

    def __init__(self, word="good"):
        self.word = word

    def score(self, prompts, responses):
        assert all(isinstance(p, str) for p in prompts)  # a reward sees the plain prompt, never the token
        return torch.tensor([r.split().count(self.word) for r in responses], dtype=torch.float32)


class CharCount:
    """A reward with few ties: the response's length in characters."""

    name = "char-count"

    def score(self, prompts, responses):
        return torch.tensor([len(r) for r in responses], dtype=torch.float32)


@pytest.fixture()
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PPO_PROMPTS])


def _cfg(model_dir, data, out, *extra):
    return stage_config(
        "quark",
        model_dir,
        "algo.reward_model=rule:length",  # replaced by the reward the tests pass in
        "algo.iterations=3",
        "algo.samples_per_prompt=2",
        "algo.eval_prompts=0",  # a test that reads reward/eval_mean turns it on
        "sampling.max_new_tokens=6",
        "data.max_length=24",
        "data.max_prompt_length=12",
        "optim.batch_size=8",
        "optim.steps_per_iteration=3",
        "optim.lr=1e-2",
        *extra,
        data=data,
        out=out,
    )


def _pool(run: Path, it: int) -> list[dict]:
    return [json.loads(line) for line in (run / f"iter-{it}" / "pool.jsonl").read_text().splitlines()]


# ---- control tokens on the lab's word-level tokenizer -----------------------------------------------------------


def test_control_tokens_on_the_tiny_tokenizer(tiny_tokenizer, tmp_path):
    """Added tokens are single ids after the vocabulary, encode from text as one id (the word-level
    pre-tokenizer would split them at '<', '|'), keep the chat roles special, survive save/load, and the new
    embeddings leave the model's distribution over the old words as it was."""
    tok = AutoTokenizer.from_pretrained(_saved(tiny_tokenizer, tmp_path / "tok"))
    model = tiny_lm(tiny_tokenizer)
    x = torch.tensor([tok("the cat is")["input_ids"]])
    with torch.no_grad():
        before = model(x).logits[0, -1].softmax(-1)
    n = len(tok)
    tokens = qk.add_control_tokens(model, tok, 3)
    assert tokens.tokens == ["<|reward_0|>", "<|reward_1|>", "<|reward_2|>"]
    assert tokens.ids == [n, n + 1, n + 2] and tokens.vocab_before == n and tokens.best_id == n + 2
    assert model.get_input_embeddings().num_embeddings == n + 3 == len(tok)
    assert tok("<|reward_2|> the cat")["input_ids"] == [n + 2, *tok("the cat")["input_ids"]]
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    chat = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode([n + 1, *chat], skip_special_tokens=True).strip() == "hi"  # roles still special
    with torch.no_grad():
        after = model(x).logits[0, -1].softmax(-1)
    # The words keep their relative probabilities exactly; the new rows are distinct draws with the words'
    # per-dimension mean and spread (Quark's initialization), seeded.
    emb = model.get_input_embeddings().weight.detach()
    assert torch.cdist(emb[n:], emb[n:]).triu(1).max() > 0.1 * emb[:n].norm(dim=1).mean()
    torch.testing.assert_close(emb[n:].mean(0), emb[:n].mean(0), atol=3 * emb[:n].std(0).max().item(), rtol=0)
    torch.testing.assert_close(after[:n] / after[:n].sum(), before, atol=1e-6, rtol=0)
    assert qk.add_control_tokens(model, tok, 3) == tokens  # a second call reuses them
    reloaded = AutoTokenizer.from_pretrained(_saved(tok, tmp_path / "tok2"))
    assert reloaded.convert_tokens_to_ids(tokens.tokens) == tokens.ids


def _saved(tokenizer, path: Path) -> Path:
    tokenizer.save_pretrained(path)
    return path


def test_the_token_goes_first_after_a_bos_and_survives_truncation(tiny_tokenizer):
    assert qk.with_token([5, 6], 99, bos_id=1) == [99, 5, 6]
    assert qk.with_token([1, 5, 6], 99, bos_id=1) == [1, 99, 5, 6]  # a BOS stays first
    assert qk.with_token([1, 5], 99, bos_id=None) == [99, 1, 5]
    long = "the cat sat on the mat and the dog sat on the cat"  # 13 words
    ids = qk.conditioned_prompt_ids(tiny_tokenizer, long, 99, max_prompt_length=5)
    assert ids == [99, *tiny_tokenizer(long)["input_ids"][-4:]]  # the end of the prompt, the token kept
    assert (
        qk.conditioned_prompt_ids(tiny_tokenizer, "the cat", None) == tiny_tokenizer("the cat")["input_ids"]
    )


# ---- the stage ---------------------------------------------------------------------------------------------------


def test_pool_grows_and_its_tokens_are_the_pure_quantiles(tiny_model_dir, prompts_file, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, prompts_file, run, "algo.prompts_per_iteration=8", "algo.eval_prompts=4",
               "logging.snapshot_every=2")  # fmt: skip
    final = qk.train(cfg, reward=CharCount())
    new = 8 * 2  # prompts per iteration x samples per prompt
    # Snapshots count iterations: every 2nd of 3 is the model after iteration 2 (optimizer step 6), tokens and all.
    assert sorted((run / "snapshots").iterdir()) == [run / "snapshots" / "step-000006"]
    assert (run / "snapshots" / "step-000006" / "quark.json").is_file()
    rows = {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "quark/iteration" in r}
    previous: list[dict] = []
    for it in (1, 2, 3):
        pool = _pool(run, it)
        assert len(pool) == it * new
        assert [{k: v for k, v in r.items() if k != "quantile"} for r in pool[: len(previous)]] == [
            {k: v for k, v in r.items() if k != "quantile"} for r in previous
        ]  # the pool only grows: the earlier rows stay as they were, in order
        added = pool[len(previous) :]
        ids = round_prompt_ids(len(PPO_PROMPTS), 8, cfg.seed, it)
        assert [r["prompt_index"] for r in added] == [i for i in ids for _ in range(2)]
        assert all(r["iteration"] == it and r["prompt"] == PPO_PROMPTS[r["prompt_index"]] for r in added)
        assert all(r["score"] == len(r["response"]) for r in added)  # scored by the reward passed in
        scores = torch.tensor([r["score"] for r in pool], dtype=torch.float64)
        assert [r["quantile"] for r in pool] == reward_quantiles(scores, 5).tolist()
        row = rows[3 * it]  # 3 optimizer steps per iteration
        assert row["quark/pool_size"] == len(pool) and row["reward/queries"] == it * new
        assert row["reward/sampled_mean"] == pytest.approx(float(scores[-new:].mean()))
        assert (
            row["reward/top_quantile_mean"] >= row["reward/pool_mean"] >= row["reward/bottom_quantile_mean"]
        )
        assert "reward/eval_mean" in row and (it == 1 or 0 <= row["quark/control_token_rate"] <= 1)
        previous = pool
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "reward/eval_mean" in r] == [0, 3, 6, 9]
    # The saved model carries its tokens, names the best one, and samples with it in front of the prompt.
    saved = json.loads((final / "quark.json").read_text())
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert (
        saved["best_token"] == "<|reward_4|>" and tok.convert_tokens_to_ids(saved["tokens"]) == saved["ids"]
    )
    assert model.get_input_embeddings().num_embeddings == len(tok) == saved["best_token_id"] + 1
    prompts = qk.best_token_prompts(final, PPO_PROMPTS[:3], max_prompt_length=12)
    assert prompts == [[saved["best_token_id"], *tok(p)["input_ids"]] for p in PPO_PROMPTS[:3]]
    assert len(generate(model, tok, prompts, seed=0).texts) == 3


@pytest.mark.parametrize("micro", [0, 4])
def test_training_loss_is_quark_loss_on_the_recorded_batch(
    tiny_model_dir, prompts_file, tmp_path, monkeypatch, micro
):
    """The wiring test: the first step's batch rebuilt from the recorded pool (each row behind the token of its
    quantile, the reference without it), scored by plain HF forwards of the policy and reference as they were, gives
    through `quark_loss` the loss the stage logged, micro-batched or not."""
    real, seen = qk.micro_batch_loss, []

    def record(d, policy_batch, ref_batch, n_tokens):
        if len(seen) < max(1, 8 // (micro or 8)):  # the micro-batches of step 1
            seen.append(({k: v.clone() for k, v in d.policy.state_dict().items()}, policy_batch, ref_batch))
        return real(d, policy_batch, ref_batch, n_tokens)

    monkeypatch.setattr(qk, "micro_batch_loss", record)
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, prompts_file, run, "algo.iterations=1", f"optim.micro_batch_size={micro}")
    qk.train(cfg, reward=CharCount())
    assert cfg.algo.kl_coef > 0 and cfg.algo.entropy_coef > 0  # the defaults: every term of the loss counts
    pool = _pool(run, 1)
    tokens = qk.read_control_tokens(run / "final")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = qk.step_batch(len(pool), 8, cfg.seed, 1, 0)
    state = seen[0][0]
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    policy.resize_token_embeddings(len(tok) + 5)
    policy.load_state_dict(state)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    policy_logits, ref_logits, labels = [], [], []
    for k, i in enumerate(rows):
        prompt_ids, response_ids = qk.pool_tokens(tok, pool[i], cfg)
        token = tokens.ids[pool[i]["quantile"]]
        policy_batch, ref_batch = seen[k // len(rows[: micro or 8])][1:]
        row = k % (micro or 8)
        n = len(prompt_ids) + len(response_ids)
        assert policy_batch["input_ids"][row, : n + 1].tolist() == [token, *prompt_ids, *response_ids]
        assert ref_batch["input_ids"][row, :n].tolist() == [*prompt_ids, *response_ids]
        with torch.no_grad():  # positions t - 1 predict the response tokens t
            p = policy(torch.tensor([[token, *prompt_ids, *response_ids]])).logits[0]
            r = ref(torch.tensor([[*prompt_ids, *response_ids]])).logits[0]
        policy_logits.append(p[len(prompt_ids) : n])
        ref_logits.append(r[len(prompt_ids) - 1 : n - 1])
        labels.append(torch.tensor(response_ids))
    pad = torch.nn.utils.rnn.pad_sequence
    mask = pad([torch.ones(len(x), dtype=torch.bool) for x in labels], batch_first=True)
    out = quark_loss(
        pad(policy_logits, batch_first=True),
        pad(labels, batch_first=True),
        mask,
        pad(ref_logits, batch_first=True)[..., : tokens.vocab_before],
        beta=cfg.algo.kl_coef,
        alpha=cfg.algo.entropy_coef,
    )
    logged = next(r for r in read_metrics(run / "metrics.jsonl") if r["step"] == 1 and "loss/quark" in r)
    assert logged["loss/quark"] == pytest.approx(float(out.loss.mean()), rel=1e-5)
    assert logged["kl/ref"] > 0 and logged["loss/entropy"] > 0


@pytest.mark.slow  # 288 optimizer steps: ~9 s on 2 idle cores, minutes when they are shared
def test_the_best_token_asks_for_the_reward_on_a_toy(tiny_model_dir, tmp_path):
    """Reward conditioning on a learnable toy (the count of "good"): after three iterations the policy's samples
    with the best token score well above the initial model's, and above its own samples with the worst token."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PPO_PROMPTS * 2])
    run = tmp_path / "run"
    extra = ["algo.n_quantiles=2", "algo.iterations=3", "algo.samples_per_prompt=8", "algo.eval_prompts=32"]
    extra += ["algo.kl_coef=0", "algo.entropy_coef=0", "optim.steps_per_iteration=0", "optim.epochs=3"]
    cfg = _cfg(tiny_model_dir, prompts, run, *extra, "sampling.max_new_tokens=10", "optim.batch_size=16")
    final = qk.train(cfg, reward=WordCount())
    evals = [r["reward/eval_mean"] for r in read_metrics(run / "metrics.jsonl") if "reward/eval_mean" in r]
    assert len(evals) == 4 and evals[3] > evals[0] + 0.4, evals
    tok, model = AutoTokenizer.from_pretrained(final), AutoModelForCausalLM.from_pretrained(final)
    tokens = qk.read_control_tokens(final)
    counts = []
    for token in (tokens.ids[0], tokens.best_id):
        ids = [qk.conditioned_prompt_ids(tok, p, token, 12) for p in PPO_PROMPTS * 4]
        counts.append(WordCount().score(PPO_PROMPTS * 4, generate(model, tok, ids, seed=1).texts).mean())
    assert counts[1] > counts[0] + 0.3, counts


def test_resume_after_a_crash_in_training_gives_the_same_weights_and_metrics(
    tiny_model_dir, prompts_file, tmp_path
):
    """Ctrl-C during iteration 2's training (step 5 of 3 per iteration): --resume continues from iteration 1's
    checkpoint, reads iteration 2's pool back, and ends bit for bit where an uninterrupted run does."""

    def run(out: Path, resume: bool) -> Path:
        cfg = _cfg(tiny_model_dir, prompts_file, out, "algo.prompts_per_iteration=8", "algo.eval_prompts=4")
        return qk.train(cfg, resume=resume, reward=CharCount())

    assert_resume_matches(
        run, tmp_path, crash_in=(qk, "micro_batch_loss"), crash_on_call=5, checkpoint_step=3
    )


def test_resume_after_a_crash_in_sampling(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    """Ctrl-C while iteration 3 samples: --resume reads iteration 2's pool and the reward-call count from the
    checkpoint, samples iteration 3 again (the same samples: seeded) and gives the same weights."""
    cfg = _cfg(tiny_model_dir, prompts_file, tmp_path / "a")
    a = qk.train(cfg, reward=WordCount())
    grow = qk.Driver.grow

    def crash(d, it):
        if it == 3:
            raise KeyboardInterrupt
        return grow(d, it)

    b_cfg = _cfg(tiny_model_dir, prompts_file, tmp_path / "b")
    monkeypatch.setattr(qk.Driver, "grow", crash)
    with pytest.raises(KeyboardInterrupt):
        qk.train(b_cfg, reward=WordCount())
    monkeypatch.setattr(qk.Driver, "grow", grow)
    b = qk.train(b_cfg, resume=True, reward=WordCount())
    assert_same_tensors(causal_lm_state(a), causal_lm_state(b))
    assert _pool(tmp_path / "a", 3) == _pool(tmp_path / "b", 3)
    queries = [
        [r["reward/queries"] for r in read_metrics(p / "metrics.jsonl") if "reward/queries" in r]
        for p in (tmp_path / "a", tmp_path / "b")
    ]
    assert queries[0] == queries[1] == [32, 64, 96]


def test_a_nan_loss_stops_the_run_at_the_last_checkpoint(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    """Logits turned NaN from step 4 (the first of iteration 2; the policy's and the reference's LM heads run once
    each per step): the run stops at once naming iteration 1's checkpoint, which holds finite weights, and writes
    no final model."""
    poison_from_call(monkeypatch, qk, "hidden_to_logits", 2 * 3 + 1)
    run = tmp_path / "run"
    with pytest.raises(TrainingHealthError, match="step 4: loss/quark is not finite.*step-00000003"):
        qk.train(_cfg(tiny_model_dir, prompts_file, run), reward=CharCount())
    assert_stopped_with_checkpoint_intact(run, 3)


def test_pool_from_demonstrations(tiny_model_dir, prompts_file, sft_file, tmp_path):
    """algo.pool_init=data: the first pool is the SFT file's demonstrations, scored; sampling starts at iteration 2."""
    run = tmp_path / "run"
    cfg = _cfg(
        tiny_model_dir,
        prompts_file,
        run,
        "algo.iterations=2",
        "algo.pool_init=data",
        f"algo.init_data_path={sft_file}",
    )
    qk.train(cfg, reward=WordCount("happy"))
    demos = [json.loads(line) for line in sft_file.read_text().splitlines()]
    first = _pool(run, 1)
    assert [(r["prompt"], r["response"], r["score"]) for r in first] == [
        (d["prompt"], d["completion"], 1.0) for d in demos
    ]
    assert len(_pool(run, 2)) == len(demos) + len(PPO_PROMPTS) * 2
    assert [r["reward/queries"] for r in read_metrics(run / "metrics.jsonl") if "reward/queries" in r] == [
        32,
        64,
    ]


def test_reward_conditioning_config_runs_from_the_command_line(
    tiny_model_dir, prompts_file, tmp_path, monkeypatch
):
    """configs/reward_conditioning_tiny.yaml as a user launches it (a rule reward: -0.01 per word): K = 2 tokens,
    one iteration, the good token on the samples above the pool's median, no reference (its KL is 0)."""
    run = tmp_path / "run"
    args = ["quark", "--config", str(CONFIGS / "reward_conditioning_tiny.yaml"), *QUIET]
    args += [
        f"model.name_or_path={tiny_model_dir}",
        f"data.train_path={prompts_file}",
        f"logging.output_dir={run}",
    ]
    args += ["algo.reward_model=rule:length", "algo.prompts_per_iteration=16", "algo.eval_prompts=4"]
    args += [
        "sampling.max_new_tokens=6",
        "data.max_length=24",
        "data.max_prompt_length=12",
        "optim.batch_size=8",
    ]
    monkeypatch.setattr(qk, "load_inference_lm", lambda *a, **k: pytest.fail("kl_coef=0 loads no reference"))
    assert main(args) == 0
    saved = json.loads((run / "final" / "quark.json").read_text())
    assert saved["tokens"] == ["<|reward_0|>", "<|reward_1|>"] and saved["best_token"] == "<|reward_1|>"
    pool = _pool(run, 1)
    assert len(pool) == 16 * 4 and not (run / "iter-2").exists()
    scores = torch.tensor([r["score"] for r in pool], dtype=torch.float64)
    good = [r["quantile"] == 1 for r in pool]
    assert good == (reward_quantiles(scores, 2) == 1).tolist() and 0 < sum(good) < len(pool)
    # A split by reward: every good sample scores above every bad one (equal rewards share a token).
    assert min(s for s, g in zip(scores, good) if g) > max(s for s, g in zip(scores, good) if not g)
    steps = [r for r in read_metrics(run / "metrics.jsonl") if "loss/quark" in r]
    assert len(steps) == 2 * (64 // 8)  # optim.epochs=2 passes over the pool
    assert all(r["kl/ref"] == 0 for r in steps)


def test_config_refusals_and_registration(tiny_model_dir, prompts_file, tmp_path, capsys):
    refused = {
        "algo.n_quantiles must be >= 2": ["algo.n_quantiles=1"],
        "algo.init_data_path is empty but algo.pool_init=data": ["algo.pool_init=data"],
        "algo.init_data_path is set but algo.pool_init=samples": ["algo.init_data_path=x.jsonl"],
        "optim.epochs is set but optim.steps_per_iteration=4": [
            "optim.steps_per_iteration=4",
            "optim.epochs=2",
        ],
        "model.lora.enabled is not supported by quark": ["model.lora.enabled=true"],
        "data.max_prompt_length must be >= 2 for quark": ["data.max_prompt_length=1"],
        "algo.kl_coef must be >= 0": ["algo.kl_coef=-0.1"],
        "algo.entropy_coef must be >= 0": ["algo.entropy_coef=-0.1"],
        "optim.micro_batch_size \\(3\\) must divide": ["optim.micro_batch_size=3"],
        "unknown key 'algo.rounds'": ["algo.rounds=3"],
    }
    for message, overrides in refused.items():
        with pytest.raises(ConfigError, match=message):
            load_config("quark", None, overrides)
    # No reward source: refused before a run directory exists; from the command line, exit 2 and one line.
    with pytest.raises(ConfigError, match="algo.reward_model is empty"):
        qk.train(stage_config("quark", tiny_model_dir, data=prompts_file, out=tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    capsys.readouterr()
    common = [f"model.name_or_path={tiny_model_dir}", f"data.train_path={prompts_file}", *QUIET]
    code = main(
        [
            "quark",
            *common,
            "algo.reward_model=rule:length",
            "optim.batch_size=64",
            f"logging.output_dir={tmp_path / 'b'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "the first pool holds 16 samples, fewer than optim.batch_size (64)" in err
    assert "Traceback" not in err and not (tmp_path / "b").exists()
    assert STAGES["quark"][0] == qk.__name__ and build_parser().parse_args(["quark"]).command == "quark"
    shipped = load_config("quark", CONFIGS / "quark_tiny.yaml")
    assert shipped.algo.n_quantiles == 5 and shipped.algo.kl_coef > 0 and shipped.algo.iterations > 1
    rc = load_config("quark", CONFIGS / "reward_conditioning_tiny.yaml")
    assert (rc.algo.n_quantiles, rc.algo.iterations, rc.algo.kl_coef, rc.algo.entropy_coef) == (2, 1, 0, 0)


def test_steps_are_planned_over_the_growing_pool():
    """steps_per_iteration=0: optim.epochs passes over the pool as it stands; it grows by n_new each iteration.
    Pools 8, 12, 16 at batch 4 and 2 epochs: 4, 6 and 8 steps, cumulative [0, 4, 10, 18]."""
    from rlhflab.config import STAGE_CONFIGS, build_config

    cfg = build_config(
        STAGE_CONFIGS["quark"],
        {"optim": {"batch_size": 4, "epochs": 2}, "algo": {"iterations": 3, "n_quantiles": 2}},
    )
    assert qk.plan_steps(cfg, 8, 4) == [0, 4, 10, 18]
    fixed = build_config(STAGE_CONFIGS["quark"], {"optim": {"batch_size": 4, "steps_per_iteration": 5}, "algo": {"iterations": 2, "n_quantiles": 2}})  # fmt: skip
    assert qk.plan_steps(fixed, 8, 4) == [0, 5, 10]
    with pytest.raises(ConfigError, match="first pool holds 3 samples"):
        qk.plan_steps(cfg, 3, 4)
