"""A trained reward model as a reward source.

    reward = LearnedReward.from_pretrained("runs/rm/final", head="safety", normalize=True)
    scores = reward.score(prompts, responses)   # [B] float32

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

from rlhflab.data.tokenize import encode_prompt, encode_response, fit_lengths
from rlhflab.errors import ConfigError, UserError
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
    ) -> LearnedReward:
        """Load a reward model saved by `rlhflab rm` (or any HF *ForSequenceClassification directory).

        max_length / max_prompt_length default to the training values stored beside the model.
        """
        from rlhflab.models.loading import load_tokenizer

        p = resolve_reward_dir(path)
        model = RewardModel.from_pretrained(p, dtype=dtype, device=str(device))
        model.requires_grad_(False).eval()
        settings = json.loads((p / SETTINGS_FILE).read_text()) if (p / SETTINGS_FILE).is_file() else {}
        return cls(
            model,
            load_tokenizer(p),
            head=head,
            normalize=normalize,
            batch_size=batch_size,
            max_length=max_length if max_length is not None else settings.get("max_length"),
            max_prompt_length=(
                max_prompt_length if max_prompt_length is not None else settings.get("max_prompt_length")
            ),
            name=name,
        )

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


def check_reward_dir(path: str | Path) -> Path:
    """The reward-model directory of `path`, or a UserError that says what was expected."""
    p = resolve_reward_dir(path)
    if not p.exists():
        raise UserError(
            f"reward model '{path}' does not exist; give the directory written by `rlhflab rm` "
            "(RUN/final, or the run directory RUN) or a rule such as 'rule:length'"
        )
    return p


__all__ = ["SETTINGS_FILE", "LearnedReward", "check_reward_dir", "resolve_reward_dir"]
