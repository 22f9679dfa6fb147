"""A trained reward model as a reward source.

    reward = LearnedReward.from_pretrained("runs/rm/final", head="safety", normalize=True)
    scores = reward.score(prompts, responses)   # [B] float32
    prm = LearnedReward.from_pretrained("runs/prm/final", aggregate="min")   # a ProcessReward

A process reward model (`rlhflab rm algo.loss=step`) loads as a `ProcessReward`: each response is split into its
steps at the separator it was trained with, the model's probability that each step is correct is read at the
step's last token, and the solution's score is their product (Lightman et al. 2023, Sec. 2.6) or minimum
(`rlhflab.losses.PRM_AGGREGATES`).

Each (prompt, response) is tokenized exactly as `rlhflab rm` tokenized its training data (prompt with the
chat template's generation prompt or the tokenizer's BOS, response plus EOS or the template's end of
turn, the same truncation read from `rlhflab_reward.json` beside the model), then scored in batches of
similar length. `normalize` whitens with the mean/std of training rewards stored in the model (Llama 2).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhflab.data.tokenize import encode_prompt, encode_response, encode_steps, fit_lengths
from rlhflab.errors import ConfigError, UserError
from rlhflab.losses.reward import PRM_AGGREGATES
from rlhflab.models.reward_model import RewardModel
from rlhflab.rewards.base import Prompt, Reward, check_batch

# Written by the reward stage beside the model: the tokenization settings of training.
SETTINGS_FILE = "rlhflab_reward.json"


def resolve_reward_dir(path: str | Path) -> Path:
    """A reward-model directory; a run directory (RUN/final holds the model) is accepted too."""
    p = Path(path).expanduser()

    def saved(d: Path) -> bool:  # a merged model, or a LoRA reward model's adapter
        return (d / "config.json").is_file() or (d / "adapter_config.json").is_file()

    if not saved(p) and saved(p / "final"):
        return p / "final"
    return p


class LearnedReward(Reward):
    """Scores from one head of a `RewardModel` (raw, or whitened with its stored statistics)."""

    def __init__(
        self,
        model: RewardModel,
        tokenizer: Any,
        *,
        head: int | str = 0,
        normalize: bool = False,
        batch_size: int = 32,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        name: str | None = None,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if tokenizer.pad_token_id is None:
            raise ConfigError(
                "the reward model's tokenizer has no pad token; load it with "
                "rlhflab.models.loading.load_tokenizer, which sets one"
            )
        self.model, self.tokenizer = model, tokenizer
        self.head = model.head_index(head)
        self.normalize, self.batch_size = normalize, batch_size
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        head_name = model.head_names[self.head]
        self.name = name or (head_name if model.num_heads > 1 else "learned")

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        head: int | str = 0,
        normalize: bool = False,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        name: str | None = None,
        aggregate: str | None = None,
        risk_aversion: float = 0.0,
    ) -> LearnedReward:
        """Load a reward model saved by `rlhflab rm` (or any HF *ForSequenceClassification directory); a process
        reward model (trained with algo.loss=step) comes back as a `ProcessReward` scoring by `aggregate`
        ("product", the default, or "min"), which other reward models refuse.

        max_length / max_prompt_length default to the training values stored beside the model. A distributional
        reward model (algo.loss=distributional) comes back as a `DistributionalReward` scoring mean -
        risk_aversion * std; other models refuse a risk_aversion other than 0.
        """
        from rlhflab.models.loading import load_tokenizer

        p = resolve_reward_dir(path)
        settings = json.loads((p / SETTINGS_FILE).read_text()) if (p / SETTINGS_FILE).is_file() else {}
        process = settings.get("loss") == "step"
        if aggregate is not None and not process:
            raise ConfigError(
                f"aggregate={aggregate!r} combines a process reward model's step scores, but '{p}' was trained "
                f"with algo.loss={settings.get('loss', 'bradley_terry')} and gives one score per response; drop it"
            )
        distributional = settings.get("loss") == "distributional"
        if risk_aversion and not distributional:
            raise ConfigError(
                f"risk_aversion={risk_aversion} subtracts a multiple of a distributional reward model's std, but "
                f"'{p}' was trained with algo.loss={settings.get('loss', 'bradley_terry')} and has none; drop it"
            )
        model = RewardModel.from_pretrained(p, dtype=dtype, device=str(device))
        model.requires_grad_(False).eval()
        kwargs: dict[str, Any] = {
            "head": head,
            "normalize": normalize,
            "batch_size": batch_size,
            "max_length": max_length if max_length is not None else settings.get("max_length"),
            "max_prompt_length": (
                max_prompt_length if max_prompt_length is not None else settings.get("max_prompt_length")
            ),
            "name": name,
        }
        if process:
            return ProcessReward(
                model,
                load_tokenizer(p),
                step_separator=settings["step_separator"],
                aggregate=aggregate or "product",
                score_stats=settings.get("score_stats") or None,
                **kwargs,
            )
        if distributional:
            return DistributionalReward(model, load_tokenizer(p), risk_aversion=risk_aversion, **kwargs)
        return cls(model, load_tokenizer(p), **kwargs)

    def encode(self, prompt: Prompt, response: str) -> list[int]:
        """Token ids of prompt + response, as the reward stage's `tokenize_pair` builds one side of a pair."""
        # Training records turn a text response to a chat prompt into one assistant turn (the data layer's
        # rule), so the chat template wraps it here exactly as it did there.
        reply: Any = [{"role": "assistant", "content": response}] if isinstance(prompt, list) else response
        prompt_ids = encode_prompt(prompt, self.tokenizer)
        response_ids = encode_response(prompt, reply, self.tokenizer)
        prompt_ids, (response_ids,) = fit_lengths(
            prompt_ids, [response_ids], self.tokenizer, self.max_length, self.max_prompt_length
        )
        return prompt_ids + response_ids

    @torch.no_grad()
    def score_all_heads(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        """Every head's scores: [B, H] float32 on the CPU."""
        prompts, responses = check_batch(prompts, responses)
        rows = [self.encode(p, r) for p, r in zip(prompts, responses)]
        device = next(self.model.parameters()).device
        # Similar lengths share a batch, so little compute goes to padding.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out = torch.zeros(len(rows), self.model.num_heads)
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                width = max(len(rows[i]) for i in idx)
                ids = torch.full((len(idx), width), self.tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for j, i in enumerate(idx):
                    ids[j, : len(rows[i])] = torch.tensor(rows[i])
                    mask[j, : len(rows[i])] = 1
                rewards = self.model(ids.to(device), mask.to(device), normalize=self.normalize)
                out[torch.tensor(idx)] = rewards.float().cpu()
        finally:
            self.model.train(was_training)
        return out

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        return self.score_all_heads(prompts, responses)[:, self.head]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "head": self.model.head_names[self.head],
            "normalize": self.normalize,
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
        }


class ProcessReward(LearnedReward):
    """A process reward model's score of whole solutions: its probability that each step is right, aggregated.

    A response is split at `step_separator` (blank pieces dropped) and tokenized as `rlhflab rm algo.loss=step`
    tokenized its training solutions (`encode_steps`); the head's logit at each step's last token is the step's
    verdict, and `aggregate` ("product": the probability that every step is right, Lightman et al. 2023, Sec.
    2.6; "min": the weakest step) makes the score in [0, 1]. A response with no step scores 0. `normalize`
    whitens that score with the mean/std of the training solutions' scores, stored beside the model.
    """

    def __init__(
        self,
        model: RewardModel,
        tokenizer: Any,
        *,
        step_separator: str,
        aggregate: str = "product",
        score_stats: dict | None = None,
        **kwargs: Any,
    ):
        super().__init__(model, tokenizer, **kwargs)
        if aggregate not in PRM_AGGREGATES:
            raise ConfigError(f"aggregate must be one of {', '.join(PRM_AGGREGATES)}, got {aggregate!r}")
        if not step_separator:
            raise ConfigError("a process reward model needs its step separator (the text between steps)")
        if self.normalize and not (score_stats or {}).get(aggregate):
            raise ConfigError(
                f"normalize=true needs the mean/std of the {aggregate} scores of training solutions, which this "
                "model does not store (it was trained with algo.normalization_samples=0); drop normalize"
            )
        self.step_separator, self.aggregate = step_separator, aggregate
        self.score_stats = score_stats or {}
        if kwargs.get("name") is None:
            self.name = f"{self.name}_{aggregate}"

    def split_steps(self, response: str) -> list[str]:
        """The steps of a response: its pieces between separators, blank ones dropped."""
        return [piece for piece in response.split(self.step_separator) if piece.strip()]

    def encode_solution(self, prompt: Prompt, response: str) -> tuple[list[int], list[int]]:
        """Token ids of prompt + the response's steps (each followed by the separator), and where each step ends."""
        return encode_steps(
            prompt,
            self.split_steps(response),
            self.tokenizer,
            separator=self.step_separator,
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
        )

    @torch.no_grad()
    def step_logits(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[torch.Tensor]:
        """Every head's logit at each step's last token: one [n_steps, H] CPU tensor per response."""
        prompts, responses = check_batch(prompts, responses)
        rows = [self.encode_solution(p, r) for p, r in zip(prompts, responses)]
        device = next(self.model.parameters()).device
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths share a batch
        out: list[torch.Tensor] = [torch.zeros(0, self.model.num_heads)] * len(rows)
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                width = max(len(rows[i][0]) for i in idx)
                ids = torch.full((len(idx), width), self.tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for j, i in enumerate(idx):
                    ids[j, : len(rows[i][0])] = torch.tensor(rows[i][0])
                    mask[j, : len(rows[i][0])] = 1
                tokens = self.model.token_rewards(ids.to(device), mask.to(device)).cpu()
                for j, i in enumerate(idx):
                    out[i] = tokens[j, rows[i][1]]
        finally:
            self.model.train(was_training)
        return out

    def step_probabilities(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[torch.Tensor]:
        """This head's probability that each step is right: one [n_steps] tensor per response."""
        return [torch.sigmoid(x[:, self.head]) for x in self.step_logits(prompts, responses)]

    def score_all_heads(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        """Every head's aggregated solution score: [B, H] float32 (whitened with `normalize`)."""
        logits = self.step_logits(prompts, responses)
        if not logits:
            return torch.zeros(0, self.model.num_heads)
        solutions = torch.nn.utils.rnn.pad_sequence(logits, batch_first=True)  # [B, S, H]
        present = torch.arange(solutions.shape[1])[None] < torch.tensor([len(x) for x in logits])[:, None]
        aggregate = PRM_AGGREGATES[self.aggregate]
        scores = torch.stack([aggregate(solutions[..., h], present) for h in range(self.model.num_heads)], 1)
        if self.normalize:
            stats = self.score_stats[self.aggregate]
            scores = (scores - torch.tensor(stats["mean"])) / torch.tensor(stats["std"])
        return scores.float()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "aggregate": self.aggregate, "step_separator": self.step_separator}


class DistributionalReward(LearnedReward):
    """A distributional reward model's score (`rlhflab rm algo.loss=distributional`): heads 'mean' and 'log_var',
    the mean mu and log sigma^2 of a response's utility over the annotators (Siththaranjan et al. 2023).

    `score` is mu - risk_aversion * sigma: 0 (the default) optimizes the average annotator; > 0 is risk-averse,
    preferring responses fewer annotators would reject. `normalize` whitens with the mean head's stored statistics:
    (mu - m) / s and sigma / s, one affine map, so mu - k sigma keeps its meaning. `mean_std` gives both.
    """

    def __init__(self, model: RewardModel, tokenizer: Any, *, risk_aversion: float = 0.0, **kwargs: Any):
        if model.head_names != ["mean", "log_var"]:
            raise ConfigError(
                f"a distributional reward model has heads ['mean', 'log_var'], this one {model.head_names}"
            )
        if not risk_aversion >= 0:
            raise ConfigError(f"risk_aversion must be >= 0 (0 = the mean), got {risk_aversion}")
        if kwargs.get("head", 0) not in (0, "mean"):
            raise ConfigError(
                f"head={kwargs['head']!r}: a distributional reward model scores by its mean (and std, through "
                "risk_aversion); drop head"
            )
        normalize = kwargs.pop("normalize", False)
        super().__init__(model, tokenizer, **{**kwargs, "head": "mean"})
        # Whitening is applied here, to mu and sigma together, not per head (a whitened log-variance means nothing).
        self.whiten, self.risk_aversion = normalize, float(risk_aversion)
        if kwargs.get("name") is None:
            self.name = "distributional" + (f"_k{risk_aversion:g}" if risk_aversion else "")

    def mean_std(
        self, prompts: Sequence[Prompt], responses: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu [B], sigma [B]) float32 on the CPU, whitened with `normalize`."""
        both = self.score_all_heads(prompts, responses)
        mean, std = both[:, 0], torch.exp(0.5 * both[:, 1])
        if self.whiten:
            m, s = float(self.model.reward_mean[0]), float(self.model.reward_std[0])
            mean, std = (mean - m) / s, std / s
        return mean, std

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        mean, std = self.mean_std(prompts, responses)
        return mean - self.risk_aversion * std

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "normalize": self.whiten, "risk_aversion": self.risk_aversion}


def check_reward_dir(path: str | Path) -> Path:
    """The reward-model directory of `path`, or a UserError that says what was expected."""
    p = resolve_reward_dir(path)
    if not p.exists():
        raise UserError(
            f"reward model '{path}' does not exist; give the directory written by `rlhflab rm` "
            "(RUN/final, or the run directory RUN) or a rule such as 'rule:length'"
        )
    return p


__all__ = [
    "SETTINGS_FILE",
    "DistributionalReward",
    "LearnedReward",
    "ProcessReward",
    "check_reward_dir",
    "resolve_reward_dir",
]
