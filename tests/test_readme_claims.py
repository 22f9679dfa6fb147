"""The README's claims about `rlhflab run`, checked on two seeds (slow: two full default runs, ~6 minutes).

    make test-all      # or: .venv/bin/python -m pytest -m slow tests/test_readme_claims.py

Claims: PPO and DPO beat SFT's gold reward beyond the 95% intervals (the intervals do not overlap); PPO
without a KL penalty drives the learned reward up while its gold reward ends below SFT's (reward hacking);
PPO with its KL penalty does not lose its gold over its last iterations.
"""

from __future__ import annotations

import json

import pytest

from rlhflab.pipeline import run_pipeline


def _beats(policies: dict, name: str, other: str = "sft") -> bool:
    p, o = policies[name], policies[other]
    return p["gold_reward_mean"] - p["gold_reward_ci95"] > o["gold_reward_mean"] + o["gold_reward_ci95"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_the_readme_claims_hold(seed, tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RLHFLAB_CACHE", str(tmp_path_factory.getbasetemp() / "rlhflab-cache-default"))
    run_pipeline(output_dir=str(tmp_path / "run"), seed=seed)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    policies = report["policies"]
    assert _beats(policies, "ppo"), policies
    assert _beats(policies, "dpo"), policies
    hacked = report["rollout_curves"]["ppo_kl0"]
    first, last = hacked[:10], hacked[-10:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "reward/score") > mean(first, "reward/score")  # the proxy goes up ...
    assert policies["ppo_kl0"]["gold_reward_mean"] < policies["sft"]["gold_reward_mean"]  # ... gold falls
    # PPO with its KL penalty (kl_coef 0.2) holds its gold to the end: its rollouts' last 10-iteration mean is
    # within 0.05 of its best, and above its first (at kl_coef 0.05 it fell 0.1-0.3 from a peak at 30-70).
    ppo = report["rollout_curves"]["ppo"]
    windows = [mean(ppo[a : a + 10], "gold/mean") for a in range(0, len(ppo), 10)]
    assert windows[-1] >= max(windows) - 0.05 and windows[-1] > windows[0] + 0.1, windows
    # Held-out curves from snapshots for every trained policy, starting at SFT (KL 0).
    assert set(report["curves"]) == {"ppo", "ppo_kl0", "dpo"}
    assert all(c[0]["step"] == 0 and c[0]["kl/ref"] == 0.0 and len(c) >= 5 for c in report["curves"].values())
