"""An ensemble of per-state reward nets fitted to segment preferences, and the queries it is least sure of.

Christiano et al. (2017, "Deep Reinforcement Learning from Human Preferences", NeurIPS) model a labeller's choice
between two segments as Bradley-Terry over their predicted returns (Sec. 2.2.3, Eq. 1):

    P[sigma_1 > sigma_2] = exp(sum_t r(s^1_t)) / (exp(sum_t r(s^1_t)) + exp(sum_t r(s^2_t)))

fitted by cross-entropy to the labels (soft: 0.5 for "equally good"). They fit an ensemble, each member on a
bootstrap resample of the labelled pairs, with L2 regularization; the reward the agent sees is the mean of the
members' independently normalized outputs (Sec. 2.2.3), and the members' disagreement on a pair's preference
picks the pairs worth asking about (Sec. 2.2.4).

The reward is r(s'), the state a step reaches, not r(s, a): the wrapper and the T-REX nets of this package score
states, and Pendulum's true reward depends on the action only through a 0.001 u^2 term, so an action input would
mostly give the net a way to fit the labeller's noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rlhflab.control.reward_model import StateRewardNet
from rlhflab.control.segments import Segment
from rlhflab.control.wrappers import reward_stats
from rlhflab.errors import ConfigError
from rlhflab.losses.general_preference import general_preference

QUERY_METHODS = ("disagreement", "random")


class RewardEnsemble:
    """K StateRewardNets. `member_returns` / `preference_probs` read the raw outputs (what the preference loss
    fits); calling the ensemble on an observation gives the mean of the members' standardized rewards."""

    def __init__(self, obs_dim: int, members: int = 3, hidden: int = 64, seed: int = 0):
        if members < 1:
            raise ConfigError(f"a reward ensemble needs at least one member, got {members}")
        torch.manual_seed(seed)
        self.members = [StateRewardNet(obs_dim, hidden) for _ in range(members)]
        self.stats = [(0.0, 1.0)] * members
        self._stacked: tuple | None = None

    @torch.no_grad()
    def member_rewards(self, states: np.ndarray) -> np.ndarray:
        """[K, ...]: each member's raw reward of states [..., obs_dim]."""
        x = torch.as_tensor(np.asarray(states), dtype=torch.float32)
        return torch.stack([m(x) for m in self.members]).double().numpy()

    def member_returns(self, observations: np.ndarray) -> np.ndarray:
        """[K, N]: each member's predicted return (sum of raw rewards) of N segments' states [N, L, obs_dim]."""
        return self.member_rewards(observations).sum(-1)

    def preference_probs(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """[K, N]: each member's P[first > second] (Eq. 1) for pairs of segment states [N, L, obs_dim]."""
        diff = self.member_returns(first) - self.member_returns(second)
        return 1.0 / (1.0 + np.exp(-np.clip(diff, -50.0, 50.0)))

    def normalize(self, states: np.ndarray) -> None:
        """Each member's (mean, std) over `states` [M, obs_dim] (recent ones: Christiano et al. App. A keep the
        reward at zero mean and a constant standard deviation, so PPO's scale does not drift as it is refit)."""
        raw = self.member_rewards(states)
        self.stats = [reward_stats(r) for r in raw]
        self._stacked = None

    def score(self, states: np.ndarray) -> np.ndarray:
        """[...]: the ensemble reward of states [..., obs_dim], the mean of the members' standardized rewards."""
        raw = self.member_rewards(states)
        z = [(r - m) / s for r, (m, s) in zip(raw, self.stats)]
        return np.mean(z, axis=0)

    def __call__(self, obs: np.ndarray) -> float:
        """`score` of one observation [obs_dim]. The environment wrapper calls this at every step, so the members
        run as one batched MLP (a loop over K small nets costs several times more, in per-call overhead)."""
        if not all(isinstance(m, StateRewardNet) for m in self.members):
            return float(self.score(obs))
        if self._stacked is None:
            layers = [[m.net[i] for m in self.members] for i in (0, 2, 4)]
            weights = [torch.stack([lin.weight.detach().T for lin in group]) for group in layers]
            biases = [torch.stack([lin.bias.detach() for lin in group])[:, None, :] for group in layers]
            mean, std = (torch.tensor([st[i] for st in self.stats], dtype=torch.float32) for i in (0, 1))
            self._stacked = (weights, biases, mean, std)
        weights, biases, mean, std = self._stacked
        with torch.inference_mode():
            x = (
                torch.as_tensor(np.asarray(obs, dtype=np.float32))
                .reshape(1, 1, -1)
                .expand(len(self.members), 1, -1)
            )
            h = torch.relu(torch.baddbmm(biases[0], x, weights[0]))
            h = torch.relu(torch.baddbmm(biases[1], h, weights[1]))
            r = torch.baddbmm(biases[2], h, weights[2]).reshape(-1)
            return float(((r - mean) / std).mean())

    def fit(
        self,
        first: np.ndarray,
        second: np.ndarray,
        labels: np.ndarray,
        *,
        steps: int,
        rng: np.random.Generator,
        batch_size: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        label_smoothing: float = 0.05,
    ) -> list[dict[str, float]]:
        """`steps` Adam steps per member, warm-started, on its own bootstrap resample of the N labelled pairs.

        first, second: [N, L, obs_dim]; labels: [N] in [0, 1] (1 = first preferred, 0.5 = equal). The loss is the
        soft Bradley-Terry cross-entropy of Eq. 1 (`general_preference` with g(a, b) = R(a): the antisymmetric
        logit is then R(first) - R(second)). Christiano et al. assume a 10% chance that the labeller answers at
        random; label smoothing (default 0.05) plays that part here: it bounds how hard one answer can push, so
        the random answers cannot drive the returns apart without limit. Weight decay is their L2 penalty.
        Returns [{member, loss, accuracy}] measured on the member's resample after its last step.
        """
        if not (first.shape == second.shape and first.ndim == 3 and len(labels) == len(first) > 0):
            raise ValueError(
                f"fit needs first, second [N, L, obs_dim] and N labels, got {first.shape}, {second.shape}, "
                f"{len(labels)}"
            )
        f, s, y = (torch.as_tensor(np.asarray(a), dtype=torch.float32) for a in (first, second, labels))
        self._stacked = None
        log = []
        for k, net in enumerate(self.members):
            boot = torch.as_tensor(rng.integers(0, len(y), size=len(y)))  # Sec. 2.2.3: a bootstrap per member
            opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
            for _ in range(steps):
                idx = boot[torch.as_tensor(rng.integers(0, len(boot), size=min(batch_size, len(boot))))]
                out = general_preference(net(f[idx]).sum(-1), net(s[idx]).sum(-1), y[idx], label_smoothing)
                opt.zero_grad()
                out.loss.mean().backward()
                opt.step()
            with torch.no_grad():
                out = general_preference(net(f[boot]).sum(-1), net(s[boot]).sum(-1), y[boot], label_smoothing)
            log.append(
                {
                    "member": k,
                    "loss": float(out.loss.mean()),
                    "accuracy": float(np.nanmean(out.metrics["reward/accuracy"].numpy())),
                }
            )
        return log


def stack_pairs(queries: Sequence[tuple[Segment, Segment]]) -> tuple[np.ndarray, np.ndarray]:
    """(first states [N, L, obs_dim], second states [N, L, obs_dim]) of equal-length segment pairs, float32."""
    first = np.stack([a.observations for a, _ in queries]).astype(np.float32)
    second = np.stack([b.observations for _, b in queries]).astype(np.float32)
    return first, second


def disagreement(ensemble: RewardEnsemble, queries: Sequence[tuple[Segment, Segment]]) -> np.ndarray:
    """[N]: the variance across members of P[first > second], the uncertainty Christiano et al. query by."""
    return ensemble.preference_probs(*stack_pairs(queries)).var(axis=0)


def select_queries(
    ensemble: RewardEnsemble,
    segments: Sequence[Segment],
    n: int,
    method: str,
    rng: np.random.Generator,
    candidates: int = 10,
) -> list[tuple[Segment, Segment]]:
    """`n` pairs of distinct segments to ask about.

    "random": n pairs drawn uniformly. "disagreement": n * `candidates` pairs drawn uniformly, the n with the
    highest variance across members of the predicted preference kept (Christiano et al. Sec. 2.2.4; they note it
    is a crude proxy for the value of a label, and in some of their tasks it did worse than random pairs).
    """
    if method not in QUERY_METHODS:
        raise ConfigError(f"unknown query method '{method}'; choose one of {', '.join(QUERY_METHODS)}")
    if len(segments) < 2:
        raise ValueError(f"queries need at least two segments, got {len(segments)}")
    if n <= 0:
        return []
    pool = n if method == "random" else n * max(1, candidates)
    pairs = []
    for _ in range(pool):
        i, j = rng.choice(len(segments), size=2, replace=False)
        pairs.append((segments[int(i)], segments[int(j)]))
    if method == "random":
        return pairs
    order = np.argsort(-disagreement(ensemble, pairs), kind="stable")
    return [pairs[int(k)] for k in order[:n]]
