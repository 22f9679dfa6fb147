"""Contrastive Preference Learning on a control task: a policy learned from regret-based preferences, no RL.

Hejna, Rafailov, Sikchi, Finn, Niekum, Knox and Sadigh (2023, "Contrastive Preference Learning: Learning from
Human Feedback without Reinforcement Learning", ICLR 2024) model a person's preference between two segments by
their regret, the discounted sum of the optimal advantage A*(s_t, a_t) (Sec. 3, after Knox et al. 2022), not
by their reward. In the maximum-entropy setting A*(s, a) = alpha log pi*(a | s) (Sec. 3.1, Eq. 3), so the
preference model becomes a function of the policy alone and the policy is fitted by a contrastive loss over
segments (Eq. 5, `rlhflab.losses.preference.cpl`), with no reward and no RL.

This module owns the pieces of that on a gymnasium task: segments of offline rollouts with an oracle's
advantages (`SegmentBatch`, `cut_segments`, `expert_advantages`), regret labels (`regret_labels`), a Gaussian
policy for a box action (`GaussianPolicy`), behaviour-cloning pretraining on every segment and the CPL loss on
the labelled pairs (`train_cpl`), and how often the policy's likelihood prefers the chosen segment
(`likelihood_accuracy`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rlhflab.control.segments import Segment
from rlhflab.control.trajectories import Trajectory
from rlhflab.losses.preference import cpl
from rlhflab.losses.utils import LossOutput

LOG_STD_MIN, LOG_STD_MAX = -5.0, 1.0


@dataclass(frozen=True)
class SegmentBatch:
    """N segments of L steps. states: [N, L+1, obs_dim], s_t ... s_{t+L} (the policy reads s_t, the per-state
    reward the states reached); actions: [N, L, act_dim]; rewards: [N, L], the true ones (the evaluation's
    only); advantages: [N, L], the oracle's A*(s_t, a_t) (the labeller's only)."""

    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    advantages: np.ndarray

    def __post_init__(self):
        n, length = self.rewards.shape
        if self.states.shape[:2] != (n, length + 1) or self.actions.shape[:2] != (n, length):
            raise ValueError(
                f"{n} segments of {length} steps need states [N, L+1, ...] and actions [N, L, ...], got "
                f"{self.states.shape} and {self.actions.shape}"
            )
        if self.advantages.shape != self.rewards.shape:
            raise ValueError(
                f"advantages {self.advantages.shape} must be shaped like rewards {self.rewards.shape}"
            )

    def __len__(self) -> int:
        return len(self.rewards)

    def take(self, idx: np.ndarray) -> SegmentBatch:
        return SegmentBatch(self.states[idx], self.actions[idx], self.rewards[idx], self.advantages[idx])

    def segments(self, env_id: str = "Pendulum-v1") -> list[Segment]:
        """As `Segment`s (the states reached, s_{t+1} ... s_{t+L}), what a per-state reward model scores."""
        return [Segment(s[1:], a, r, env_id) for s, a, r in zip(self.states, self.actions, self.rewards)]


def expert_advantages(value_fn, trajectory: Trajectory, gamma: float) -> np.ndarray:
    """[T]: A(s_t, a_t) ~ r_t + gamma V(s_{t+1}) - V(s_t), the one-step estimate of the expert's advantage.

    Hejna et al. (2023, Sec. 6.1) label with a trained SAC critic's advantage. We take the temporal-difference
    residual of the critic of a PPO expert trained on the true reward: that critic is trained anyway (it is the
    oracle whose return the report shows), whereas a SAC oracle would cost several more CPU minutes per seed;
    the residual is an unbiased estimate of the expert's A(s_t, a_t) given its V (Schulman et al. 2016, "High-
    Dimensional Continuous Control Using Generalized Advantage Estimation", Eq. 10), and a near-optimal expert's
    A approximates A*. Pendulum's episodes end only by the time limit, so the last step bootstraps too.
    value_fn: states [n, obs_dim] -> V [n]."""
    values = np.asarray(value_fn(trajectory.observations), dtype=np.float64).reshape(-1)
    return trajectory.rewards + gamma * values[1:] - values[:-1]


def ppo_value_fn(model):
    """A stable-baselines3 PPO model's critic as states [n, obs_dim] -> V [n] (numpy)."""

    def value(states: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            obs = torch.as_tensor(np.asarray(states), dtype=torch.float32)
            return model.policy.predict_values(obs).squeeze(-1).double().numpy()

    return value


def cut_segments(
    trajectories: Sequence[Trajectory],
    advantages: Sequence[np.ndarray],
    n: int,
    length: int,
    rng: np.random.Generator,
) -> SegmentBatch:
    """`n` segments of `length` steps, each from a trajectory drawn uniformly, starting uniformly within it."""
    if len(trajectories) != len(advantages) or not trajectories:
        raise ValueError(f"{len(trajectories)} trajectories but {len(advantages)} advantage arrays")
    parts: list[tuple] = []
    for _ in range(n):
        k = int(rng.integers(len(trajectories)))
        t = trajectories[k]
        if len(t) < length:
            raise ValueError(f"a trajectory of {len(t)} steps is shorter than the segment length {length}")
        s = int(rng.integers(0, len(t) - length + 1))
        acts = np.asarray(t.actions[s : s + length], dtype=np.float32).reshape(length, -1)
        parts.append(
            (
                t.observations[s : s + length + 1],
                acts,
                t.rewards[s : s + length],
                advantages[k][s : s + length],
            )
        )
    states, actions, rewards, adv = (np.stack(x) for x in zip(*parts))
    return SegmentBatch(states.astype(np.float32), actions, rewards, adv)


def regret(advantages: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """[N]: each segment's discounted sum of advantages, sum_t gamma^t A*(s_t, a_t) (the negated regret of
    Knox et al. 2022, the score of CPL's preference model, Hejna et al. 2023 Eq. 2)."""
    return (np.asarray(advantages, dtype=np.float64) * gamma ** np.arange(advantages.shape[-1])).sum(-1)


def regret_labels(
    first_advantages: np.ndarray,
    second_advantages: np.ndarray,
    *,
    gamma: float = 1.0,
    temperature: float = 0.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """[N] float: 1.0 where the first segment is preferred, 0.0 where the second is.

    temperature 0: deterministic, the segment with the larger discounted advantage sum (ties: the first), the
    noiseless synthetic labeller of Hejna et al. (2023, Sec. 6.1). temperature > 0: drawn from the Bradley-Terry
    model of the regret, P(first) = sigmoid((S1 - S2) / temperature) (Knox et al. 2022), which needs `rng`."""
    diff = regret(first_advantages, gamma) - regret(second_advantages, gamma)
    if temperature == 0.0:
        return (diff >= 0).astype(np.float64)
    if temperature < 0 or rng is None:
        raise ValueError(f"temperature must be >= 0 (and a Generator given when > 0), got {temperature}")
    return (rng.random(len(diff)) < 1.0 / (1.0 + np.exp(-diff / temperature))).astype(np.float64)


def order_pairs(
    first: SegmentBatch, second: SegmentBatch, labels: np.ndarray
) -> tuple[SegmentBatch, SegmentBatch]:
    """(chosen, rejected) from pairs and their labels (1.0 = first preferred)."""
    pick = np.asarray(labels) >= 0.5
    idx = np.arange(len(pick))
    both = SegmentBatch(
        np.concatenate([first.states, second.states]),
        np.concatenate([first.actions, second.actions]),
        np.concatenate([first.rewards, second.rewards]),
        np.concatenate([first.advantages, second.advantages]),
    )
    chosen = np.where(pick, idx, idx + len(pick))
    rejected = np.where(pick, idx + len(pick), idx)
    return both.take(chosen), both.take(rejected)


class GaussianPolicy(nn.Module):
    """pi(a | s) = N(mu(s), diag sigma(s)^2) for a box action; mu = tanh(.) scaled to [low, high].

    Squashing the mean, not the sample, keeps log pi exact for any action in the box, including ones clipped to
    its bounds (which a tanh-squashed sample's log-density puts at -infinity), and the evaluated policy, the
    mean, never leaves the box. log sigma is clamped to [LOG_STD_MIN, LOG_STD_MAX], the usual guard against
    a likelihood that grows without bound as sigma shrinks on a few actions. With `fixed_log_std` sigma is that
    constant and log pi is a scaled negative squared error of the mean, the form of the deterministic actor
    Hejna et al. (2023) train with CPL: the contrastive loss can then move only the mean, not buy likelihood by
    narrowing sigma on the chosen segments and widening it on the rejected ones."""

    def __init__(
        self,
        obs_dim: int,
        low: np.ndarray,
        high: np.ndarray,
        hidden: int = 64,
        fixed_log_std: float | None = None,
    ):
        super().__init__()
        self.fixed_log_std = fixed_log_std
        act_dim = len(low)
        self.trunk = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.mean_head, self.log_std_head = nn.Linear(hidden, act_dim), nn.Linear(hidden, act_dim)
        self.register_buffer("low", torch.as_tensor(low, dtype=torch.float32))
        self.register_buffer("high", torch.as_tensor(high, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [..., act_dim], log std [..., act_dim])."""
        h = self.trunk(obs)
        mean = self.low + (torch.tanh(self.mean_head(h)) + 1) * 0.5 * (self.high - self.low)
        if self.fixed_log_std is not None:
            return mean, torch.full_like(mean, self.fixed_log_std)
        return mean, self.log_std_head(h).clamp(LOG_STD_MIN, LOG_STD_MAX)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """[...]: log pi(a | s), summed over the action's dimensions. obs [..., obs_dim], actions [..., act_dim]."""
        mean, log_std = self(obs)
        return torch.distributions.Normal(mean, log_std.exp()).log_prob(actions).sum(-1)

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """The mean action, the policy the experiments evaluate."""
        return self(torch.as_tensor(np.asarray(obs), dtype=torch.float32))[0].numpy()


def segment_logps(policy: GaussianPolicy, batch: SegmentBatch) -> torch.Tensor:
    """[N, L]: log pi(a_t | s_t) of every step of the segments."""
    obs = torch.as_tensor(batch.states[:, :-1], dtype=torch.float32)
    return policy.log_prob(obs, torch.as_tensor(batch.actions, dtype=torch.float32))


def cpl_batch_loss(
    policy: GaussianPolicy,
    chosen: SegmentBatch,
    rejected: SegmentBatch,
    *,
    alpha: float,
    gamma: float,
    conservative_lambda: float,
) -> LossOutput:
    """The CPL loss of the policy on labelled pairs (Hejna et al. 2023, Eq. 5; lambda < 1 their conservative
    variant, Sec. 4): the policy's per-step log-likelihoods of the pairs' actions, every step real."""
    c, r = segment_logps(policy, chosen), segment_logps(policy, rejected)
    ones = torch.ones_like(c, dtype=torch.bool)
    return cpl(c, ones, r, ones, alpha=alpha, gamma=gamma, conservative_lambda=conservative_lambda)


def bc_pretrain(
    policy: GaussianPolicy, segments: SegmentBatch, *, steps: int, batch_size: int, lr: float, seed: int
):
    """Maximum likelihood of every segment's actions, labelled or not; returns the last loss.

    Hejna et al. (2023, Sec. 4, "Practical considerations") pretrain CPL's policy by behaviour cloning on all the
    offline segments: the contrastive loss then only has to move the likelihood toward preferred behaviour, not
    also find the data's support from a few hundred pairs."""
    rng = np.random.default_rng(seed)
    obs = torch.as_tensor(segments.states[:, :-1].reshape(-1, segments.states.shape[-1]), dtype=torch.float32)
    acts = torch.as_tensor(segments.actions.reshape(len(obs), -1), dtype=torch.float32)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.as_tensor(rng.integers(0, len(obs), size=min(batch_size, len(obs))))
        loss = -policy.log_prob(obs[idx], acts[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def train_cpl(
    policy: GaussianPolicy,
    chosen: SegmentBatch,
    rejected: SegmentBatch,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-4,
    alpha: float = 0.1,
    gamma: float = 1.0,
    conservative_lambda: float = 0.5,
    seed: int = 0,
) -> tuple[GaussianPolicy, list[dict[str, float]]]:
    """A copy of `policy` (pretrained or not) trained on the pairs with `cpl_batch_loss`; minibatches of pairs
    drawn with replacement by a Generator seeded with `seed`. Returns it and a log [{step, loss/cpl,
    reward/accuracy}] every 100 steps and at the end (accuracy: the share of pairs whose chosen score is the
    larger, on the minibatch)."""
    if len(chosen) != len(rejected) or len(chosen) == 0:
        raise ValueError(
            f"CPL needs as many chosen as rejected segments (and some), got {len(chosen)}, {len(rejected)}"
        )
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    policy = copy.deepcopy(policy)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    # A linear decay to 0: the evaluated policy is the last iterate's mean action, whose true return varied by
    # hundreds between nearby settings in our seed-100 runs; ending on small steps keeps the last one near a
    # minimum rather than wherever the final large step left it.
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / steps)
    log = []
    for step in range(1, steps + 1):
        idx = rng.integers(0, len(chosen), size=min(batch_size, len(chosen)))
        out = cpl_batch_loss(
            policy,
            chosen.take(idx),
            rejected.take(idx),
            alpha=alpha,
            gamma=gamma,
            conservative_lambda=conservative_lambda,
        )
        loss = out.loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        if step % 100 == 0 or step == steps:
            accuracy = float(out.metrics["reward/accuracy"].float().mean())
            log.append({"step": step, "loss/cpl": loss.item(), "reward/accuracy": accuracy})
    return policy, log


@torch.no_grad()
def likelihood_accuracy(
    policy: GaussianPolicy, chosen: SegmentBatch, rejected: SegmentBatch, gamma: float = 1.0
) -> float:
    """Share of pairs where the policy's discounted log-likelihood of the chosen segment's actions exceeds the
    rejected one's: under CPL's model (A* = alpha log pi*) that is the pair the policy's implied regret prefers.
    A tie counts 1/2."""
    disc = gamma ** torch.arange(chosen.rewards.shape[1], dtype=torch.float32)
    c = (segment_logps(policy, chosen) * disc).sum(-1)
    r = (segment_logps(policy, rejected) * disc).sum(-1)
    return float(((c > r).float() + 0.5 * (c == r).float()).mean())
