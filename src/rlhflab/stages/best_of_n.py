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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rlhflab.errors import ConfigError, UserError
from rlhflab.rollout.generate import SamplingSettings, generate


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

    @property
    def n(self) -> int:
        return self.all_scores.shape[1]

    @classmethod
    def from_scores(cls, all_texts: list[list[str]], all_scores: Tensor) -> BestOfN:
        """Pick the argmax of each row of all_scores [P, n] (ties: the first)."""
        best = all_scores.argmax(dim=1)
        return cls(
            texts=[row[int(j)] for row, j in zip(all_texts, best)],
            scores=all_scores.gather(1, best[:, None]).squeeze(1),
            all_texts=all_texts,
            all_scores=all_scores,
            best_index=best,
        )

    def best_of(self, k: int) -> BestOfN:
        """Best-of-k from the first k samples of each prompt (k <= n): a whole reward-vs-n curve from one
        sampling pass. best_of(1) is plain sampling from the policy."""
        if not 1 <= k <= self.n:
            raise ConfigError(f"best_of(k) needs 1 <= k <= n = {self.n}, got {k}")
        return BestOfN.from_scores([row[:k] for row in self.all_texts], self.all_scores[:, :k])


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || policy) = log n - (n - 1) / n nats, for continuous reward without ties (an upper
    bound otherwise; Stiennon et al. 2020, App. G.3; Beirami et al. 2024 on when it is loose)."""
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


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

    Returns:
        BestOfN with texts [P], scores [P], all_texts [P][n], all_scores [P, n], best_index [P].
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
    # Prompt-major: the n samples of prompt i are rows i*n .. i*n + n-1.
    repeated = [p for p in prompts for _ in range(n)]
    rollout = generate(model, tokenizer, repeated, settings, batch_size=batch_size, seed=seed)
    scores = score_in_batches(reward, repeated, rollout.texts, score_batch_size)
    all_texts = [rollout.texts[i * n : (i + 1) * n] for i in range(len(prompts))]
    return BestOfN.from_scores(all_texts, scores.view(len(prompts), n))


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
    log=print,
) -> dict[str, float]:
    """`rlhflab best-of-n`: the best of n samples of `policy` per prompt, scored by `reward` (a reward spec,
    `rlhflab.rewards.load_rewards`), written to `out_path` as JSONL rows {"prompt", "completion", "score",
    "mean_score"} (+ "samples", "sample_scores" with all_samples). The rows are SFT demonstrations, so
    `rlhflab sft data.train_path=OUT` fine-tunes on them: rejection-sampling fine-tuning (one round of expert
    iteration). Prompts come from `prompts_path` (prompt records).

    Returns {"best_score": mean best score, "sample_score": mean score of all samples, "kl_bound": nats}.
    """
    from rlhflab.config import PromptDataSection
    from rlhflab.data import PromptRecord, write_jsonl
    from rlhflab.models.loading import load_causal_lm, load_tokenizer
    from rlhflab.rewards import load_rewards
    from rlhflab.stages.common import resolve_device, resolve_model_path
    from rlhflab.stages.data_source import load_train_records

    out = Path(out_path)
    if out.suffix != ".jsonl":
        raise UserError(f"--out {out} must be a .jsonl file (the rows are SFT records: prompt, completion)")
    path = resolve_model_path(policy)
    dev = resolve_device(device)
    records = load_train_records(PromptDataSection(train_path=prompts_path), "prompt", log=log)
    prompts = [r.prompt if isinstance(r, PromptRecord) else r for r in records]
    prompts = prompts[:max_prompts] if max_prompts else prompts
    source = load_rewards(reward, device=dev)
    model = load_causal_lm(path, device=str(dev))
    log(f"best-of-n: {len(prompts)} prompts x {n} samples from {policy}, scored by {reward}")
    result = best_of_n(model, load_tokenizer(path), prompts, source, n=n, settings=settings, seed=seed)
    rows = []
    for i, prompt in enumerate(prompts):
        row = {
            "prompt": prompt,
            "completion": result.texts[i],
            "score": float(result.scores[i]),
            "mean_score": float(result.all_scores[i].mean()),
        }
        if all_samples:
            row.update(samples=result.all_texts[i], sample_scores=result.all_scores[i].tolist())
        rows.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(rows, out)  # atomic: never a half-written file at `out`
    summary = {
        "best_score": float(result.scores.mean()),
        "sample_score": float(result.all_scores.mean()),
        "kl_bound": best_of_n_kl(n),
    }
    log(
        f"best-of-n: mean score {summary['sample_score']:.4f} per sample, {summary['best_score']:.4f} best of "
        f"{n} (KL to the policy at most {summary['kl_bound']:.2f} nats); wrote {out}"
    )
    return summary
