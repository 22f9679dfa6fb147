"""Rejection-sampling fine-tuning, expert iteration and ReST (`rlhflab.stages.rejection_sampling`): the selection
maths by hand, each round's fine-tuning data against its recorded candidates, the chain of models, the reward
rising on a toy, resume by rounds and the config refusals."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rlhflab.cli import build_parser, main
from rlhflab.config import load_config
from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import ConfigError
from rlhflab.stages import STAGES
from rlhflab.stages import rejection_sampling as rs
from rlhflab.stages.common import snapshot_dir
from rlhflab.stages.parallel import DataParallel
from rlhflab.stages.selection import (
    Candidates,
    Kept,
    above_threshold,
    best_per_prompt,
    pool_best,
    threshold_values,
)

from ..helpers import PPO_PROMPTS, QUIET, assert_same_tensors, causal_lm_state, stage_config, write_jsonl

CONFIGS = Path(__file__).parents[2] / "configs"


class WordCount:
    """A reward whose preference is known: how often `word` appears in the response."""

    name = "word-count"

    def __init__(self, word="good"):
        self.word = word

    def score(self, prompts, responses):
        return torch.tensor([r.split().count(self.word) for r in responses], dtype=torch.float32)


class CharCount:
    """A reward with few ties: the response's length in characters."""

    name = "char-count"

    def score(self, prompts, responses):
        return torch.tensor([len(r) for r in responses], dtype=torch.float32)


# ---- the selection maths, by hand -------------------------------------------------------------------------------

RECORDED = Candidates(
    ids=[0, 1, 2, 5],
    texts=[["a", "b b", " "], ["", "", ""], ["x y", "z", "w"], ["p", "q", "r"]],
    scores=torch.tensor([[1.0, 3.0, 5.0], [9.0, 9.0, 9.0], [2.0, 2.0, 1.0], [-1.0, 0.5, 0.25]]),
)


def test_best_per_prompt_and_pooling_by_hand():
    best = best_per_prompt(RECORDED, rnd=2)
    # prompt 0: the 5.0 sample is blank text, so 3.0 wins; prompt 1: every sample empty, nothing kept;
    # prompt 2: a tie at 2.0 keeps the first sampled; prompt 5: 0.5.
    assert best == {0: Kept("b b", 3.0, 2), 2: Kept("x y", 2.0, 2), 5: Kept("q", 0.5, 2)}
    pool = {0: Kept("old", 4.0, 1), 2: Kept("tie", 2.0, 1), 5: Kept("worse", 0.0, 1), 7: Kept("only", 1.0, 1)}
    pooled = pool_best(pool, best)
    # the max over rounds per prompt: the old 4.0 beats 3.0; a tie stays with the earlier round; 0.5 beats 0.0;
    # a prompt not sampled this round keeps its sample
    assert pooled == {0: pool[0], 2: pool[2], 5: best[5], 7: pool[7]}
    assert pool_best({}, best) == best


def test_rest_thresholds_keep_exactly_the_samples_at_or_above_tau():
    scores = RECORDED.scores
    assert threshold_values(scores, [0.5, 2.0], "reward") == [0.5, 2.0]
    flat = scores.flatten().numpy()
    assert threshold_values(scores, [0.0, 0.5, 0.9], "quantile") == pytest.approx(
        [float(np.quantile(flat, q)) for q in (0.0, 0.5, 0.9)]
    )
    kept = above_threshold(RECORDED, 2.0, rnd=1)
    assert [(i, k.text, k.score) for i, k in kept] == [(0, "b b", 3.0), (2, "x y", 2.0), (2, "z", 2.0)]
    # the 5.0 and 9.0 samples are empty text (no completion to train on); everything else >= tau is kept
    means = []
    for tau in (-1.0, 0.3, 1.0, 2.5):
        kept = above_threshold(RECORDED, tau, rnd=1)
        expected = [
            (i, t, float(s))
            for i, row, srow in zip(RECORDED.ids, RECORDED.texts, RECORDED.scores.tolist())
            for t, s in zip(row, srow)
            if s >= tau and t.strip()
        ]
        assert [(i, k.text, k.score) for i, k in kept] == expected
        means.append(np.mean([k.score for _, k in kept]))
    assert all(a < b for a, b in zip(means, means[1:])), means


# ---- the stage on a tiny model ----------------------------------------------------------------------------------


@pytest.fixture()
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PPO_PROMPTS])


def _cfg(model_dir, data, out, *extra):
    return stage_config(
        "rs",
        model_dir,
        "algo.reward_model=rule:length",  # replaced by the reward the tests pass in
        "algo.samples_per_prompt=4",
        "algo.eval_prompts=0",  # a test that reads reward/eval_mean turns it on
        "sampling.max_new_tokens=6",
        "data.max_length=24",
        "data.max_prompt_length=12",
        "optim.batch_size=8",
        "optim.max_steps=3",  # the wiring tests need a model that moved, not a trained one
        "optim.lr=1e-2",
        *extra,
        data=data,
        out=out,
    )


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _best_by_hand(row: dict) -> tuple[str, float] | None:
    """A prompt's highest-scoring non-empty sample, the first on a tie, without the stage's code."""
    best = None
    for text, score in zip(row["samples"], row["scores"]):
        if text.strip() and (best is None or score > best[1]):
            best = (text, score)
    return best


@pytest.mark.parametrize("pool", [False, True])
def test_rounds_fine_tune_on_exactly_the_selected_samples(tiny_model_dir, prompts_file, tmp_path, pool):
    run = tmp_path / "run"
    cfg = _cfg(
        tiny_model_dir,
        prompts_file,
        run,
        "algo.rounds=2",
        f"algo.pool={str(pool).lower()}",
        "algo.eval_prompts=4",
    )
    final = rs.train(cfg, reward=CharCount())
    expected: dict[int, tuple] = {}
    for rnd in (1, 2):
        cands = _jsonl(run / f"round-{rnd}" / "candidates.jsonl")
        assert len(cands) == len(PPO_PROMPTS) and all(len(r["samples"]) == 4 for r in cands)
        assert all(
            r["scores"] == [float(len(t)) for t in r["samples"]] for r in cands
        )  # scored by the reward
        now = {r["prompt_index"]: (*b, rnd) for r in cands if (b := _best_by_hand(r))}
        if pool:  # per prompt the max over the rounds so far, the earlier round on a tie
            expected = {
                i: now[i] if i not in expected or now[i][1] > expected[i][1] else expected[i] for i in now
            }
        else:
            expected = now
        written = _jsonl(run / f"round-{rnd}" / "sft.jsonl")
        assert {r["prompt_index"]: (r["completion"], r["score"], r["round"]) for r in written} == expected
        assert all(r["prompt"] == PPO_PROMPTS[r["prompt_index"]] for r in written)
        row = next(m for m in read_metrics(run / "metrics.jsonl") if m["step"] == rnd)
        all_scores = [s for r in cands for s in r["scores"]]
        assert row["reward/candidates_mean"] == pytest.approx(np.mean(all_scores))
        assert row["reward/kept_mean"] == pytest.approx(np.mean([r["score"] for r in written]))
        assert row["reward/kept_mean"] >= row["reward/candidates_mean"]
        assert (
            row["reward/queries"] == rnd * len(PPO_PROMPTS) * 4
        )  # cumulative reward calls for training data
        assert row["perf/wall_s"] > 0 and row["sft/steps"] >= 1 and "reward/eval_mean" in row
    if pool:
        assert any(r["round"] == 1 for r in _jsonl(run / "round-2" / "sft.jsonl"))
    # round 2 samples round 1's model and fine-tunes from it (round_start); RUN/final and the snapshots are copies
    second = yaml.safe_load((run / "round-2" / "sft" / "config.yaml").read_text())
    assert second["model"]["name_or_path"] == str(run / "round-1" / "sft" / "final")
    assert (
        second["data"]["train_path"] == str(run / "round-2" / "sft.jsonl") and second["optim"]["lr"] == 1e-2
    )
    assert final == run / "final"
    assert_same_tensors(causal_lm_state(final), causal_lm_state(run / "round-2" / "sft" / "final"))
    assert_same_tensors(
        causal_lm_state(snapshot_dir(run, 1)), causal_lm_state(run / "round-1" / "sft" / "final")
    )


def test_expert_iteration_is_one_round_from_the_command_line(tiny_model_dir, prompts_file, tmp_path, capsys):
    """AlpacaFarm's expert iteration: best-of-K samples of the SFT model, one fine-tuning on them; launched as a
    user would, with a reward spec (rule:length, -0.01 per word: the shortest non-empty sample wins)."""
    run = tmp_path / "run"
    common = [f"model.name_or_path={tiny_model_dir}", f"data.train_path={prompts_file}", *QUIET]
    args = ["rs", *common, "algo.reward_model=rule:length", "algo.samples_per_prompt=4", "algo.rounds=1"]
    args += ["algo.eval_prompts=4", "sampling.max_new_tokens=6", "optim.batch_size=8", "optim.max_steps=2"]
    assert main([*args, f"logging.output_dir={run}"]) == 0
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("round-")) == ["round-1"]
    first = yaml.safe_load((run / "round-1" / "sft" / "config.yaml").read_text())
    assert first["model"]["name_or_path"] == str(tiny_model_dir)
    assert_same_tensors(causal_lm_state(run / "final"), causal_lm_state(run / "round-1" / "sft" / "final"))
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "reward/eval_mean" in r] == [0, 1]
    shortest = {}
    for row in _jsonl(run / "round-1" / "candidates.jsonl"):
        usable = [t for t in row["samples"] if t.strip()]
        shortest[row["prompt_index"]] = min(usable, key=lambda t: len(t.split()))  # the first on a tie
    assert {r["prompt_index"]: r["completion"] for r in _jsonl(run / "round-1" / "sft.jsonl")} == shortest
    # a config error exits 2 with one line and leaves no run directory
    capsys.readouterr()
    bad = tmp_path / "bad"
    code = main(["rs", *common, "algo.mode=rest", "algo.thresholds=0.5,0.2", f"logging.output_dir={bad}"])
    err = capsys.readouterr().err
    assert code == 2 and "algo.thresholds must rise strictly" in err and "Traceback" not in err
    assert not bad.exists()


def test_reward_rises_over_rounds(tiny_model_dir, tmp_path):
    """Fine-tuning on the best of 8 by the count of "good" lifts that count in the model's own samples, round
    over round (reward/eval_mean: one sample per prompt at a fixed seed; step 0 is the initial model)."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PPO_PROMPTS * 2])
    run = tmp_path / "run"
    cfg = _cfg(
        tiny_model_dir,
        prompts,
        run,
        "algo.rounds=3",
        "algo.samples_per_prompt=8",
        "algo.eval_prompts=32",
        "sampling.max_new_tokens=10",
        "optim.max_steps=0",
        "optim.epochs=2",
    )
    rs.train(cfg, reward=WordCount())
    rows = read_metrics(run / "metrics.jsonl")
    evals = [r["reward/eval_mean"] for r in rows if "reward/eval_mean" in r]
    sampled = [r["reward/candidates_mean"] for r in rows if "reward/candidates_mean" in r]
    assert len(evals) == 4 and evals[3] > evals[0] + 0.5, evals
    assert len(sampled) == 3 and sampled[2] > sampled[1] > sampled[0], sampled


def test_rest_improve_steps_filter_at_rising_thresholds(tiny_model_dir, prompts_file, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(
        tiny_model_dir,
        prompts_file,
        run,
        "algo.mode=rest",
        "algo.grow_steps=2",
        "algo.thresholds=0.0,0.6",
        "algo.threshold_kind=quantile",
        "algo.samples_per_prompt=6",
        "algo.eval_prompts=4",
    )
    rs.train(cfg, reward=CharCount())
    rows = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}
    previous = str(tiny_model_dir)
    for g in (1, 2):
        cands = _jsonl(run / f"grow-{g}" / "candidates.jsonl")
        scores = [s for r in cands for s in r["scores"]]
        kept_means = []
        for i, q in enumerate((0.0, 0.6), 1):
            step_dir, row = run / f"grow-{g}" / f"improve-{i}", rows[(g - 1) * 2 + i]
            tau = float(np.quantile(np.array(scores, dtype=np.float32), q))
            assert row["rest/threshold"] == pytest.approx(tau) and row["rest/grow"] == g
            expected = [
                (r["prompt_index"], t, s)
                for r in cands
                for t, s in zip(r["samples"], r["scores"])
                if s >= row["rest/threshold"] and t.strip()
            ]
            written = [
                (r["prompt_index"], r["completion"], r["score"]) for r in _jsonl(step_dir / "sft.jsonl")
            ]
            assert written == expected
            assert row["rs/kept_share"] == pytest.approx(len(expected) / len(scores))
            assert row["reward/kept_mean"] == pytest.approx(np.mean([s for _, _, s in expected]))
            kept_means.append(row["reward/kept_mean"])
            # each Improve step fine-tunes the previous one's model (the next Grow samples the last one)
            sft_cfg = yaml.safe_load((step_dir / "sft" / "config.yaml").read_text())
            assert sft_cfg["model"]["name_or_path"] == previous
            previous = str(step_dir / "sft" / "final")
            assert "reward/eval_mean" in row
        assert kept_means[0] < kept_means[1], kept_means
        # quantile 0 keeps the whole grown set but its empty responses
        assert kept_means[0] == pytest.approx(
            np.mean([s for r in cands for t, s in zip(r["samples"], r["scores"]) if t.strip()])
        )
    assert rows[4]["reward/queries"] == 2 * len(PPO_PROMPTS) * 6


@pytest.mark.parametrize("mode", ["rejection_sampling", "rest"])
def test_resume_redoes_the_first_step_without_a_model(
    tiny_model_dir, prompts_file, tmp_path, monkeypatch, mode
):
    extra = ("algo.rounds=2", "algo.pool=true")
    if mode == "rest":
        extra = ("algo.mode=rest", "algo.thresholds=0.0,0.5", "algo.threshold_kind=quantile")
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, prompts_file, run, *extra)
    rs.train(cfg, reward=CharCount())
    last = run / ("round-2" if mode == "rejection_sampling" else "grow-1/improve-2")
    weights, data = causal_lm_state(run / "final"), (last / "sft.jsonl").read_text()
    queries = [r["reward/queries"] for r in read_metrics(run / "metrics.jsonl") if "reward/queries" in r]
    shutil.rmtree(last / "sft" / "final")  # as if killed while the last fine-tuning ran
    real, calls = rs.sft.train, []
    monkeypatch.setattr(rs.sft, "train", lambda c, **kw: calls.append(c.logging.output_dir) or real(c, **kw))
    rs.train(cfg, resume=True, reward=CharCount())
    assert calls == [str(last / "sft")]  # the finished step was not trained again
    assert (last / "sft.jsonl").read_text() == data
    assert_same_tensors(weights, causal_lm_state(run / "final"))
    resumed = [r["reward/queries"] for r in read_metrics(run / "metrics.jsonl") if "reward/queries" in r]
    assert resumed == queries + [queries[-1]]  # the redone step logs the same cumulative count


def test_config_refusals_and_registration(tiny_model_dir, prompts_file, tmp_path):
    refused = {
        "algo.thresholds must rise strictly": ["algo.mode=rest", "algo.thresholds=0.5,0.5"],
        "algo.thresholds is empty but algo.mode=rest": ["algo.mode=rest"],
        "algo.thresholds are quantiles": [
            "algo.mode=rest",
            "algo.thresholds=0.5,1.5",
            "algo.threshold_kind=quantile",
        ],
        "algo.samples_per_prompt must be >= 1": ["algo.samples_per_prompt=0"],
        "algo.thresholds is set but applies to algo.mode=rest only": ["algo.thresholds=0.1,0.2"],
        "algo.grow_steps is set but applies to algo.mode=rest": ["algo.grow_steps=2"],
        "algo.pool is set but applies to algo.mode=rejection_sampling only": [
            "algo.mode=rest",
            "algo.thresholds=0.1",
            "algo.pool=true",
        ],
        "algo.finetune_from is set but applies": [
            "algo.mode=rest",
            "algo.thresholds=0.1",
            "algo.finetune_from=initial",
        ],
        "algo.rounds must be >= 1": ["algo.rounds=0"],
        "logging.save_every is not used by rs": ["logging.save_every=2"],
        "data.max_prompt_length \\(64\\) must be smaller": ["data.max_length=64"],
        "unknown key 'algo.iterations'": ["algo.iterations=3"],
    }
    for message, overrides in refused.items():
        with pytest.raises(ConfigError, match=message):
            load_config("rs", None, overrides)
    # No reward source: refused before a run directory exists.
    with pytest.raises(ConfigError, match="algo.reward_model is empty"):
        rs.train(stage_config("rs", tiny_model_dir, data=prompts_file, out=tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    assert (
        STAGES["rs"][0] == rs.__name__ and build_parser().parse_args(["rs", "algo.rounds=1"]).command == "rs"
    )
    shipped = load_config("rs", CONFIGS / "rs_tiny.yaml")
    assert shipped.algo.mode == "rejection_sampling" and shipped.algo.rounds == 3
    rest = load_config("rs", CONFIGS / "rest_tiny.yaml")
    assert rest.algo.mode == "rest" and rest.algo.thresholds == [0.5, 0.75, 0.9]


# ---- data parallelism: each row from its own seed --------------------------------------------------------------


class _Rank(DataParallel):
    """Rank `rank` of `world` processes without collectives: `gather` hands back this process's own share."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def gather(self, items: list) -> list:
        return list(items)


def test_per_row_seeds_make_the_candidates_independent_of_how_prompts_are_batched(
    tiny_model_dir, prompts_file, tmp_path, monkeypatch
):
    """A round's K samples of a prompt come from the seeds of their rows in the round, whatever the generation
    batches and whichever process samples them: two processes' shares (3 and 2 prompts, batches of 3 rows that
    cut across prompts), interleaved as `par.gather` puts them back, are the candidates of one process."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = _cfg(tiny_model_dir, prompts_file, tmp_path / "run", "sampling.max_new_tokens=8")
    ids, device, model = [5, 0, 3, 2, 7], torch.device("cpu"), str(tiny_model_dir)
    whole, metrics = rs.sample_candidates(
        cfg, model, PPO_PROMPTS, ids, CharCount(), 11, device, DataParallel()
    )
    monkeypatch.setattr(rs, "SAMPLE_BATCH", 3)
    prompts = [PPO_PROMPTS[i] for i in ids]
    shares = [rs.sample_rows(cfg, model, prompts, CharCount(), 11, device, _Rank(r, 2), k=4) for r in (0, 1)]
    assert [len(s) for s in shares] == [3, 2]
    gathered = [shares[i % 2][i // 2] for i in range(len(ids))]
    assert [texts for texts, _, _ in gathered] == whole.texts
    assert torch.equal(torch.tensor([scores for _, scores, _ in gathered]), whole.scores)
    assert whole.ids == ids and whole.scores.shape == (5, 4)
    assert len({t for row in whole.texts for t in row}) > 5  # sampled, not one response everywhere
    lengths = [n for _, _, row in gathered for n in row]
    assert metrics["perf/response_length"] == pytest.approx(np.mean(lengths))
    # another round (another seed) samples other responses
    other, _ = rs.sample_candidates(cfg, model, PPO_PROMPTS, ids, CharCount(), 12, device, DataParallel())
    assert other.texts != whole.texts


def test_what_cannot_run_across_processes_is_refused(
    tiny_model_dir, prompts_file, tmp_path, monkeypatch, capsys
):
    """rs is launched in several processes (`rlhflab.cli._check_processes` lets it through), but the Llama 2 gate
    whitens over each scoring batch, which each process would do over its share: exit 2 with one line, before
    anything is loaded or a process group is joined, no run directory left; and so is a sharded model (FSDP)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = tmp_path / "run"
    args = ["rs", f"model.name_or_path={tiny_model_dir}", f"data.train_path={prompts_file}", *QUIET]
    args += ["algo.reward_model=rule:length,rule:length", "algo.reward_combine=llama2_gate"]
    assert main([*args, f"logging.output_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not run across processes" not in err
    assert "llama2_gate whitens the scores over the whole batch" in err and "(WORLD_SIZE=2)" in err
    assert not run.exists()
    # Each process samples its own prompts, while a sharded model's every forward pass needs every process.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert main([*args[:-2], "algo.reward_model=rule:length", f"logging.output_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rlhflab rs does not run under FSDP" in err and not run.exists()


def test_each_row_is_sampled_from_the_seed_of_its_row_in_the_round(
    tiny_model_dir, prompts_file, tmp_path, monkeypatch
):
    """Process 1 of 2 samples prompts 1 and 3 of 5 (k=4): rows 4-7 and 12-15 of the round, each from
    `row_seeds(seed, 20)` at that row."""
    from types import SimpleNamespace

    from rlhflab.stages.on_policy import row_seeds

    got = []

    def fake(cfg, model_dir, rows, reward, seed, seeds, device):
        got.append(list(seeds))
        n = len(rows)
        return SimpleNamespace(
            texts=[""] * n, response_lengths=torch.zeros(n, dtype=torch.long)
        ), torch.zeros(n)

    monkeypatch.setattr(rs, "_sample_scored", fake)
    cfg = _cfg(tiny_model_dir, prompts_file, tmp_path / "run")
    rs.sample_rows(cfg, "unused", PPO_PROMPTS[:5], None, 11, torch.device("cpu"), _Rank(1, 2), k=4)
    seeds = row_seeds(11, 20)
    assert got == [[seeds[i] for i in (4, 5, 6, 7, 12, 13, 14, 15)]]
