"""Best-of-n sampling: draw n responses per prompt, score them with a reward source, keep the best.

A baseline policy that needs no training (AlpacaFarm's best-of-n, Dubois et al. 2023; Gao et al. 2023
measure reward over-optimization along n), and the sampling half of rejection-sampling fine-tuning. Its KL
to the sampling policy has a closed form, log n - (n - 1) / n (Stiennon et al. 2020, App. G), so best-of-n
points sit on the same KL axis as PPO and DPO policies.

    result = best_of_n(model, tokenizer, prompts, reward, n=16, settings=SamplingSettings(temperature=1.0))
    result.texts[i], result.scores[i]          # the best response to prompt i and its score
    result.all_texts[i][j], result.all_scores  # every sample, [P, n], for analysis
    result.best_of(4)                          # best-of-4 from the first 4 samples, no new sampling
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rlhflab.errors import ConfigError, UserError
from rlhflab.rollout.generate import SamplingSettings, encode_prompts, generate


@dataclass
class BestOfN:
    """The best of n samples per prompt. P prompts.

    texts: [P] the highest-scoring response to each prompt (the first one on a tie); scores [P] float32
    its score; all_texts: [P][n] every sample, in sampling order; all_scores [P, n] float32 their scores;
    best_index [P] long, the column of the best sample in all_texts / all_scores.
    """

    texts: list[str]
    scores: Tensor
    all_texts: list[list[str]]
    all_scores: Tensor
    best_index: Tensor
    rule_logits: Tensor | None = None  # [P, n, R] rule classifiers' violation logits (Sparrow re-ranking)
    rerank_scores: Tensor | None = None  # [P, n] the re-rank score the best was chosen by

    @property
    def n(self) -> int:
        return self.all_scores.shape[1]

    @classmethod
    def from_scores(
        cls, all_texts: list[list[str]], all_scores: Tensor, rule_logits: Tensor | None = None
    ) -> BestOfN:
        """Pick the argmax of each row of all_scores [P, n] (ties: the first); with rule_logits [P, n, R], the
        argmax of Sparrow's re-rank score instead (`sparrow_scores`)."""
        rerank = None if rule_logits is None else sparrow_scores(all_scores, rule_logits)
        best = (all_scores if rerank is None else rerank).argmax(dim=1)
        return cls(
            texts=[row[int(j)] for row, j in zip(all_texts, best)],
            scores=all_scores.gather(1, best[:, None]).squeeze(1),
            all_texts=all_texts,
            all_scores=all_scores,
            best_index=best,
            rule_logits=rule_logits,
            rerank_scores=rerank,
        )

    def best_of(self, k: int) -> BestOfN:
        """Best-of-k from the first k samples of each prompt (k <= n): a whole reward-vs-n curve from one
        sampling pass. best_of(1) is plain sampling from the policy."""
        if not 1 <= k <= self.n:
            raise ConfigError(f"best_of(k) needs 1 <= k <= n = {self.n}, got {k}")
        rules = None if self.rule_logits is None else self.rule_logits[:, :k]
        return BestOfN.from_scores([row[:k] for row in self.all_texts], self.all_scores[:, :k], rules)


def sparrow_scores(preference_scores: Tensor, rule_logits: Tensor) -> Tensor:
    """Sparrow's re-rank score [P, n] of n candidates per prompt: `rlhflab.losses.combine.sparrow_rerank` of the
    preference scores [P, n] and each rule's probability of being followed, 1 - sigmoid(violation logit) for
    rule_logits [P, n, R] (rule classifiers trained with label true = the response breaks the rule; Glaese et
    al. 2022). A candidate that likely breaks any rule loses however much the preference model likes it."""
    from rlhflab.losses.combine import sparrow_rerank

    return sparrow_rerank(
        preference_scores.double(), 1.0 - torch.sigmoid(rule_logits.double())
    ).rewards.float()


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || policy) = log n - (n - 1) / n nats, for continuous reward without ties (an upper
    bound otherwise; Stiennon et al. 2020, App. G.3; Beirami et al. 2024 on when it is loose)."""
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    from rlhflab.eval.best_of_n import best_of_n_kl_formula

    return best_of_n_kl_formula(n)


def score_in_batches(reward, prompts: Sequence, responses: Sequence[str], batch_size: int = 256) -> Tensor:
    """reward.score over (prompt, response) pairs, `batch_size` at a time: [B] float32 on the CPU.

    Raises UserError when the source returns the wrong number of scores or a non-finite one: a NaN would
    otherwise win (or lose) every argmax silently.
    """
    if batch_size < 1:
        raise ConfigError(f"score batch_size must be >= 1, got {batch_size}")
    name = getattr(reward, "name", type(reward).__name__)
    chunks = []
    for s in range(0, len(responses), batch_size):
        p, r = list(prompts[s : s + batch_size]), list(responses[s : s + batch_size])
        scores = torch.as_tensor(reward.score(p, r)).detach().to("cpu", torch.float32).reshape(-1)
        if scores.shape[0] != len(r):
            raise UserError(
                f"reward source '{name}' returned {scores.shape[0]} scores for {len(r)} "
                "responses; score(prompts, responses) must return one score per response"
            )
        chunks.append(scores)
    scores = torch.cat(chunks) if chunks else torch.zeros(0)
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).nonzero()[0])
        raise UserError(
            f"reward source '{name}' returned a non-finite score ({float(scores[bad])}) for "
            f"response {bad} ({responses[bad]!r}); fix the reward source before ranking with it"
        )
    return scores


def best_of_n(
    model,
    tokenizer,
    prompts: Sequence,
    reward,
    n: int = 16,
    settings: SamplingSettings | None = None,
    *,
    batch_size: int = 64,
    score_batch_size: int = 256,
    seed: int | None = None,
    rules=None,
    sample_prompts: Sequence | None = None,
    engine=None,
    row_seeds: Sequence[int] | None = None,
) -> BestOfN:
    """Sample n responses to each prompt, score them all, keep the best per prompt.

    Args:
        model, tokenizer: the policy (any HF causal LM and its tokenizer).
        prompts: P prompts (text, chat message lists or token-id lists, as `rlhflab.rollout.generate`).
        reward: any object with `score(prompts, responses) -> Tensor [B]` (`rlhflab.rewards`), higher better.
        n: samples per prompt.
        settings: sampling settings (default: temperature 1, no top-k/top-p: the policy itself).
        batch_size: sequences per `generate` call; score_batch_size: responses per `reward.score` call.
        seed: makes the samples reproducible without touching the global RNG.
        rules: rule classifiers, anything with `score_all_heads(prompts, responses) -> Tensor [B, R]` of
            violation logits (a `LearnedReward` of an `rlhflab rm algo.loss=binary` model): the best is then
            Sparrow's re-rank of the reward and the rules (`sparrow_scores`), not the reward alone.
        sample_prompts: what the policy samples from, one per prompt, when it is not `prompts` (a Quark model's
            prompts behind its best token, `quark.best_token_prompts`); the reward always reads `prompts`.
        engine: a `rlhflab.rollout.vllm_engine.VLLMEngine` of the same model, to sample with vLLM (None: HF).
        row_seeds: one seed per sampled row (P * n, prompt-major), so that a row's sample depends on nothing else
            (processes may each sample a share); None: all from `seed`.

    Returns:
        BestOfN with texts [P], scores [P], all_texts [P][n], all_scores [P, n], best_index [P] (and with rules
        rule_logits [P, n, R], rerank_scores [P, n]).
    """
    if n < 1:
        raise ConfigError(f"best-of-n needs n >= 1, got {n}")
    if not callable(getattr(reward, "score", None)):
        raise TypeError(
            f"best_of_n(model, tokenizer, prompts, reward, ...): reward must have "
            f"score(prompts, responses), got {type(reward).__name__}"
        )
    prompts = list(prompts)
    if not prompts:
        raise ConfigError("best-of-n needs at least one prompt")
    if sample_prompts is not None and len(sample_prompts) != len(prompts):
        raise ConfigError(f"best-of-n: {len(sample_prompts)} sample_prompts for {len(prompts)} prompts")
    if row_seeds is not None and len(row_seeds) != len(prompts) * n:
        raise ConfigError(
            f"best-of-n: {len(row_seeds)} row seeds for {len(prompts)} prompts x {n} samples; give one per sample"
        )
    # Prompt-major: the n samples of prompt i are rows i*n .. i*n + n-1.
    repeated = [p for p in prompts for _ in range(n)]
    sampled = repeated if sample_prompts is None else [p for p in sample_prompts for _ in range(n)]
    rollout = (
        engine.sample(
            encode_prompts(tokenizer, sampled),
            settings or SamplingSettings(),
            row_seeds,
            prompts=sampled,
            seed=seed,
        )
        if engine is not None
        else generate(
            model, tokenizer, sampled, settings, batch_size=batch_size, seed=seed, row_seeds=row_seeds
        )
    )
    scores = score_in_batches(reward, repeated, rollout.texts, score_batch_size)
    all_texts = [rollout.texts[i * n : (i + 1) * n] for i in range(len(prompts))]
    rule_logits = _rule_logits(rules, repeated, rollout.texts, n) if rules is not None else None
    return BestOfN.from_scores(all_texts, scores.view(len(prompts), n), rule_logits)


def _rule_logits(rules, prompts: list, texts: list[str], n: int) -> torch.Tensor:
    """The rule classifiers' violation logits of every sample ([P * n] rows, prompt-major) as [P, n, R]."""
    logits = torch.as_tensor(rules.score_all_heads(prompts, texts)).float().cpu()
    if logits.dim() != 2 or logits.shape[0] != len(prompts) or not torch.isfinite(logits).all():
        raise UserError(
            f"the rule classifiers returned {tuple(logits.shape)} scores (or non-finite ones) for {len(prompts)} responses"
        )
    return logits.view(len(prompts) // n, n, -1)


def sample_to_file(
    policy: str,
    reward: str,
    out_path: str,
    *,
    prompts_path: str = "",
    n: int = 16,
    settings: SamplingSettings | None = None,
    seed: int = 0,
    device: str = "auto",
    max_prompts: int = 0,
    all_samples: bool = False,
    rules: str = "",
    log=print,
    engine: str = "hf",
) -> dict[str, float]:
    """`rlhflab best-of-n`: the best of n samples of `policy` per prompt, scored by `reward` (a reward spec,
    `rlhflab.rewards.load_rewards`), written to `out_path` as JSONL rows {"prompt", "completion", "score",
    "mean_score"} (+ "samples", "sample_scores" with all_samples). The rows are SFT demonstrations, so
    `rlhflab sft data.train_path=OUT` fine-tunes on them: rejection-sampling fine-tuning (one round of expert
    iteration). Prompts come from `prompts_path` (prompt records). `rules`: a rule-classifier model directory
    (`rlhflab rm algo.loss=binary`, one head per rule, label true = breaks the rule): the best sample is then
    Sparrow's re-rank, and each row adds "rule_violation" {rule: probability} of the chosen sample and its
    "rerank_score". `engine`: "hf" (transformers' generate) or "vllm" (`_vllm_engine`).

    Each sample comes from its row's own seed; across processes (`stages.parallel`) each samples and scores its
    share of the prompts and the main process writes the file one process writes.
    Returns {"best_score": mean best score, "sample_score": mean score of all samples, "kl_bound": nats}.
    """
    from rlhflab.config import PromptDataSection, _check_engine
    from rlhflab.data import PromptRecord, write_jsonl
    from rlhflab.stages.common import resolve_device, resolve_model_path
    from rlhflab.stages.data_source import load_train_records
    from rlhflab.stages.parallel import DataParallel

    out = Path(out_path)
    if out.suffix != ".jsonl":
        raise UserError(f"--out {out} must be a .jsonl file (the rows are SFT records: prompt, completion)")
    path = resolve_model_path(policy)
    if engine not in ("hf", "vllm"):
        raise UserError(f"best-of-n: the engine must be hf or vllm, got {engine}")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if engine == "vllm" and world > 1:
        # One vLLM engine already spreads a model over the GPUs it is given; W processes would each start one.
        raise ConfigError(
            f"best-of-n: --engine vllm runs in one process (WORLD_SIZE={world}); launch it as one process, "
            "or use --engine hf across processes"
        )
    _check_engine(engine, "best-of-n: --engine")  # vllm without a GPU or the package: refused before loading
    par = DataParallel()  # one process, or one of those `accelerate launch` / `torchrun` started
    log = par.voice(log)
    dev = par.device if par.device is not None else resolve_device(device)
    records = load_train_records(PromptDataSection(train_path=prompts_path), "prompt", log=log)
    prompts = [r.prompt if isinstance(r, PromptRecord) else r for r in records]
    prompts = prompts[:max_prompts] if max_prompts else prompts
    how = f", re-ranked with the rules of {rules} (Sparrow)" if rules else ""
    log(
        f"best-of-n: {len(prompts)} prompts x {n} samples from {policy}, scored by {reward}{how}{par.describe()}"
    )
    mine = _sample_share(
        path, reward, prompts, par, n=n, settings=settings, seed=seed, dev=dev, all_samples=all_samples,
        rules=rules, engine=engine, log=log,
    )  # fmt: skip
    results = par.gather(mine)  # (row, its n scores) of every prompt, in prompt order
    all_scores = torch.tensor([scores for _, scores in results], dtype=torch.float32)
    summary = {
        "best_score": float(torch.tensor([row["score"] for row, _ in results], dtype=torch.float32).mean()),
        "sample_score": float(all_scores.mean()),
        "kl_bound": best_of_n_kl(n),
    }
    if par.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl([row for row, _ in results], out)  # atomic: never a half-written file at `out`
        log(
            f"best-of-n: mean score {summary['sample_score']:.4f} per sample, {summary['best_score']:.4f} best "
            f"of {n} (KL to the policy at most {summary['kl_bound']:.2f} nats); wrote {out}"
        )
    par.wait()  # the file is there before any process returns
    return summary


def _sample_share(
    path: str, reward: str, prompts: list, par, *, n, settings, seed, dev, all_samples, rules, engine, log
) -> list[tuple[dict, list[float]]]:
    """(output row, its n sample scores) of each of this process's prompts (`par.shard`), in shard order; row i
    of the whole run (prompt i // n) is sampled from `row_seeds(seed, ...)[i]` whichever process samples it."""
    from rlhflab.models.loading import load_inference_lm, load_tokenizer
    from rlhflab.rewards import load_rewards
    from rlhflab.stages.on_policy import row_seeds

    mine = par.shard(list(range(len(prompts))))
    if not mine and prompts:  # more processes than prompts: this one has none
        return []
    source = load_rewards(reward, device=dev)
    rule_model = _rule_classifiers(rules, dev) if rules else None
    tokenizer = load_tokenizer(path)
    model = load_inference_lm(path, device=str(dev)) if engine == "hf" else None
    sample_prompts, settings = _control_token_prompts(path, tokenizer, prompts, settings, log)
    seeds = row_seeds(seed, len(prompts) * n)
    result = best_of_n(
        model, tokenizer, [prompts[q] for q in mine], source, n=n, settings=settings, seed=seed,
        rules=rule_model, sample_prompts=None if sample_prompts is None else [sample_prompts[q] for q in mine],
        engine=_vllm_engine(path, tokenizer, settings, seed) if model is None else None,
        row_seeds=[seeds[q * n + j] for q in mine for j in range(n)],
    )  # fmt: skip
    return [
        (_row(result, k, prompts[q], all_samples, rule_model), result.all_scores[k].tolist())
        for k, q in enumerate(mine)
    ]


def _vllm_engine(path: str, tokenizer, settings: SamplingSettings | None, seed: int):
    """A vLLM engine of the model directory `path` (a full model: vLLM reads no adapter-only directory)."""
    from rlhflab.rollout.vllm_engine import VLLMEngine

    if (Path(path) / "adapter_config.json").exists():
        raise UserError(
            f"best-of-n: {path} is a LoRA adapter; vLLM samples full models: save it merged (--merge)"
        )
    # Nothing trains beside it; the reward model (loaded first) and the rule classifiers share the GPU.
    return VLLMEngine(
        path, tokenizer, settings or SamplingSettings(), sleep=False, seed=seed, gpu_memory_utilization=0.5
    )


def _control_token_prompts(path, tokenizer, prompts: list, settings: SamplingSettings | None, log):
    """(prompts to sample from, settings): a Quark model (`rlhflab quark`, its quark.json) samples behind its best
    reward token and never writes a control token in a response; any other model: (None, settings)."""
    from rlhflab.models.control_tokens import condition_prompts, conditioning_of

    conditioning = conditioning_of(path)
    if conditioning is None:
        return None, settings
    log(
        f"best-of-n: a quark model: sampling behind its best token {tokenizer.decode([conditioning.token_id])}"
    )
    return condition_prompts(conditioning, tokenizer, prompts, settings or SamplingSettings())


def _rule_classifiers(path: str, device):
    """Every head of a rule-classifier model as one scorer (`score_all_heads`), raw logits."""
    from rlhflab.rewards.learned import LearnedReward, check_reward_dir

    return LearnedReward.from_pretrained(check_reward_dir(path), device=device)


def _row(result: BestOfN, i: int, prompt, all_samples: bool, rules) -> dict:
    """The output record of prompt i: the chosen sample and its scores (and every sample with all_samples)."""
    j = int(result.best_index[i])
    row = {
        "prompt": prompt,
        "completion": result.texts[i],
        "score": float(result.scores[i]),
        "mean_score": float(result.all_scores[i].mean()),
    }
    if rules is not None:
        probs = torch.sigmoid(result.rule_logits[i, j]).tolist()
        row["rule_violation"] = dict(zip(rules.model.head_names, probs))
        row["rerank_score"] = float(result.rerank_scores[i, j])
    if all_samples:
        row.update(samples=result.all_texts[i], sample_scores=result.all_scores[i].tolist())
    return row
