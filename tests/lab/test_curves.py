"""Gold curves from snapshots (`rlhflab.lab.curves`): each point is the snapshot's own gold evaluation."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhflab.lab.curves import gold_curve, snapshot_steps
from rlhflab.lab.evaluate import evaluate_policy, sample_policy
from rlhflab.lab.tasks import get_task
from rlhflab.models.loading import save_model
from rlhflab.models.tiny import tiny_causal_lm
from rlhflab.stages.common import snapshot_dir


def test_gold_curve_evaluates_each_snapshot_in_step_order(sentiment_base_dir, tmp_path):
    task = get_task("sentiment")
    base = AutoModelForCausalLM.from_pretrained(sentiment_base_dir)
    tokenizer = AutoTokenizer.from_pretrained(sentiment_base_dir)
    random = tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=3)
    # Out of order on purpose, plus a half-written directory (no config.json) that must be skipped.
    save_model(random, tokenizer, snapshot_dir(tmp_path, 20))
    save_model(base, tokenizer, snapshot_dir(tmp_path, 5))
    snapshot_dir(tmp_path, 30).mkdir(parents=True)
    assert [s for s, _ in snapshot_steps(tmp_path)] == [5, 20]

    prompts = task.heldout_prompts(12, seed=0)
    ref_samples = sample_policy(base, tokenizer, task, prompts, n_samples=2, seed=1)
    start = {"gold/mean": 0.25, "kl/ref": 0.0, "other": 1.0}
    curve = gold_curve(
        task,
        tmp_path,
        ref_model=base,
        tokenizer=tokenizer,
        prompts=prompts,
        ref_samples=ref_samples,
        start=start,
    )
    assert [p["step"] for p in curve] == [0, 5, 20]
    assert curve[0] == {"step": 0, "gold/mean": 0.25, "kl/ref": 0.0}
    # Step 5 is the reference itself: KL exactly 0; step 20 a random model: far away and worse by gold.
    assert curve[1]["kl/ref"] == 0.0 and curve[2]["kl/ref"] > 5.0
    assert curve[2]["gold/mean"] < curve[1]["gold/mean"]
    # Each point is the snapshot's own evaluation, with the same prompts, samples and seed.
    direct = evaluate_policy(
        random, tokenizer, task, prompts=prompts, n_samples=2, ref_model=base, ref_samples=ref_samples
    )
    assert curve[2]["gold/mean"] == pytest.approx(direct["gold/mean"])
    assert curve[2]["gold/win_rate"] == pytest.approx(direct["gold/win_rate"])
    assert curve[2]["kl/ref"] == pytest.approx(direct["kl/ref"], rel=1e-4)
