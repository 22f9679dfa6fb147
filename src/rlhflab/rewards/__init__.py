"""Reward sources behind one protocol: `score(prompts, responses) -> Tensor [B]` (+ a `name`).

PPO, best-of-n and rejection sampling call them; they never see the lab's gold reward.

- base: `RewardSource` (the protocol), `Reward` (a base class), `check_batch`
- learned: `LearnedReward` (a trained `RewardModel` directory + its tokenizer, one head, optional whitening);
  `ProcessReward` (a process reward model: step probabilities, aggregated by product or minimum);
  `DistributionalReward` (a mean-and-variance model: the mean, or mean - k std)
- rules: `LengthPenalty`, `RegexRule`, `MissingEOSPenalty` (`RuleReward`: 0 when followed, -penalty when not),
  `ArithmeticVerifier` (1 when the final answer is the prompt's sum: a verifiable reward)
- combined: `CombinedReward` (weighted sum, Llama 2 safety gate, Sparrow re-rank, reward-model ensembles: mean,
  WCO, UWO; maths in losses.combine)
- spec: `load_reward("runs/rm/final:head=safety")`, `load_rewards("a,b", weights="1,0.5")`
"""

from rlhflab.rewards.base import Prompt, Reward, RewardSource, check_batch
from rlhflab.rewards.combined import CombinedReward
from rlhflab.rewards.learned import SETTINGS_FILE, DistributionalReward, LearnedReward, ProcessReward
from rlhflab.rewards.rules import ArithmeticVerifier, LengthPenalty, MissingEOSPenalty, RegexRule, RuleReward
from rlhflab.rewards.spec import load_reward, load_rewards, parse_spec

__all__ = [
    "SETTINGS_FILE",
    "ArithmeticVerifier",
    "CombinedReward",
    "DistributionalReward",
    "LearnedReward",
    "LengthPenalty",
    "MissingEOSPenalty",
    "ProcessReward",
    "Prompt",
    "RegexRule",
    "Reward",
    "RewardSource",
    "RuleReward",
    "check_batch",
    "load_reward",
    "load_rewards",
    "parse_spec",
]
