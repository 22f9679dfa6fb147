import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhflab.errors import ConfigError
from rlhflab.eval.metrics import mean_ci95, spearman
from rlhflab.lab.evaluate import (
    evaluate_policy,
    evaluate_reward_model,
    heldout_pairs,
    response_logps,
    sample_policy,
    score_responses,
)
from rlhflab.lab.gold import gold_scores
from rlhflab.lab.tasks import get_task, prompt_text
from rlhflab.models.tiny import tiny_causal_lm
from rlhflab.rollout import SamplingSettings, generate


@pytest.fixture(scope="module")
def base(sentiment_base_dir):
    return (
        AutoModelForCausalLM.from_pretrained(sentiment_base_dir),
        AutoTokenizer.from_pretrained(sentiment_base_dir),
    )


def test_expected_order_untrained_base_demonstrator(base):
    task = get_task("sentiment")
    model, tokenizer = base
    untrained = tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=0)
    prompts = task.heldout_prompts(48, seed=0)
    m_untrained = evaluate_policy(untrained, tokenizer, task, prompts=prompts, n_samples=4)
    m_base = evaluate_policy(model, tokenizer, task, prompts=prompts, n_samples=4)
    demos = score_responses(task, prompts, [task.demonstrations(prompts, seed=s) for s in range(4)])
    demo_mean, demo_lo, _ = mean_ci95(demos.gold.mean(axis=1))
    assert m_untrained["gold/ci95"][1] < m_base["gold/ci95"][0]
    assert m_base["gold/ci95"][1] < demo_lo
    assert m_untrained["gold/fluency"] < 0.3 < 0.8 < m_base["gold/fluency"]
    assert set(m_base) >= {
        "gold/mean",
        "gold/ci95",
        "sample/len_mean",
        "sample/distinct_1",
        "sample/distinct_2",
        "sample/unigram_entropy",
        "sample/policy_entropy",
        "sample/eos_rate",
        "examples",
    }
    assert m_base["eval/n_prompts"] == 48 and len(m_base["examples"]) == 6


def test_kl_and_win_rate_against_a_reference(base):
    task = get_task("sentiment")
    model, tokenizer = base
    same = evaluate_policy(model, tokenizer, task, n_prompts=16, n_samples=4, ref_model=model)
    assert same["kl/ref"] == 0.0 and 0.3 < same["gold/win_rate"] < 0.7
    other = tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=3)
    far = evaluate_policy(model, tokenizer, task, n_prompts=16, n_samples=4, ref_model=other)
    assert far["kl/ref_ci95"][0] > 5.0  # the pretrained model is far from a random one
    assert far["gold/win_rate"] > 0.7 and far["gold/ref_mean"] < far["gold/mean"]
    # Every prompt has 4 samples on both sides: the mean paired gain is the difference of the overall means.
    assert far["gold/gain"] == pytest.approx(far["gold/mean"] - far["gold/ref_mean"])
    assert far["gold/gain_ci95"][0] > 0.0
    lo, hi = same["gold/gain_ci95"]
    assert lo < same["gold/gain"] < hi


def test_kl_estimate_matches_exact_kl_for_one_token():
    # With one response token, the sampled estimate averages log p - log q over draws from p,
    # whose expectation is the exact KL(p || q) of the first-token distributions.
    task = get_task("sentiment")
    tokenizer = task.build_tokenizer()
    p_model = tiny_causal_lm(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=1)
    q_model = tiny_causal_lm(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=2)
    with torch.no_grad():  # sharpen p so that the KL is sizeable
        p_model.lm_head.weight.mul_(40.0)
    prompt = "review the film ."
    m = evaluate_policy(
        p_model,
        tokenizer,
        task,
        prompts=[prompt] * 200,
        n_samples=10,
        ref_model=q_model,
        settings=SamplingSettings(max_new_tokens=1),
    )
    from rlhflab.rollout.generate import encode_prompts

    ids = torch.tensor([encode_prompts(tokenizer, [[{"role": "user", "content": prompt}]])[0]])
    with torch.no_grad():
        logp = torch.log_softmax(p_model(input_ids=ids).logits[0, -1], -1)
        logq = torch.log_softmax(q_model(input_ids=ids).logits[0, -1], -1)
    exact = float((logp.exp() * (logp - logq)).sum())
    assert exact > 0.3
    assert m["kl/ref_ci95"][0] - 0.05 < exact < m["kl/ref_ci95"][1] + 0.05


def test_response_logps_agree_with_unpadded_forward(base):
    model, tokenizer = base
    prompts = [
        [{"role": "user", "content": p}] for p in ("review the film .", "what did you think of the hotel ?")
    ]
    out = generate(model, tokenizer, prompts * 3, SamplingSettings(max_new_tokens=12), seed=0)
    logps, entropy = response_logps(model, out, batch_size=4)
    for i in range(len(out)):
        prompt = out.prompt_ids[i][out.prompt_mask[i]]
        resp = out.response_ids[i][out.response_mask[i]]
        ids = torch.cat([prompt, resp])[None]
        with torch.no_grad():
            full = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1], -1)
        expected = full.gather(-1, resp[:, None]).squeeze(-1)
        assert torch.allclose(logps[i][out.response_mask[i]], expected, atol=1e-4)
        assert (logps[i][~out.response_mask[i]] == 0).all() and (entropy[i][~out.response_mask[i]] == 0).all()


def test_reference_samples_must_share_prompts(base):
    model, tokenizer = base
    task = get_task("sentiment")
    ref = sample_policy(model, tokenizer, task, task.heldout_prompts(4, seed=1), n_samples=2)
    with pytest.raises(ConfigError, match="same"):
        evaluate_policy(
            model, tokenizer, task, prompts=task.heldout_prompts(4, seed=2), n_samples=2, ref_samples=ref
        )
    m = evaluate_policy(
        model, tokenizer, task, prompts=ref.prompts, n_samples=2, ref_samples=ref, return_samples=True
    )
    samples = m["samples_obj"]
    for p, responses, gold in zip(ref.prompts, samples.responses, samples.gold.tolist()):
        assert gold == gold_scores(task, [p, p], responses).tolist()
    # By hand: each prompt's 2 x 2 (sample, reference sample) pairs, ties 1/2, averaged per prompt, then over prompts.
    per_prompt = [
        sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in g for b in r) / 4
        for g, r in zip(samples.gold.tolist(), ref.gold.tolist())
    ]
    assert m["gold/win_rate"] == pytest.approx(sum(per_prompt) / 4)
    assert m["gold/ref_mean"] == pytest.approx(float(np.mean(ref.gold)))


def _gold_scorer(task):
    return lambda prompts, responses: gold_scores(task, [prompt_text(p) for p in prompts], responses)


def test_reward_model_evaluation_with_known_scorers():
    task = get_task("sentiment")
    pairs = heldout_pairs(task, 600, seed=0)
    assert all(isinstance(p["prompt"], list) for p in pairs)
    perfect = evaluate_reward_model(_gold_scorer(task), task, pairs=pairs)
    assert perfect["rm/gold_accuracy"] == 1.0 and perfect["rm/spearman_gold"] == pytest.approx(1.0)
    # Agreement with annotator labels equals how often the annotators agree with gold.
    assert perfect["rm/accuracy"] == pytest.approx(perfect["rm/label_gold_agreement"], abs=0.01)
    table = perfect["rm/accuracy_by_rating"]
    assert list(table)[:4] == ["significantly_better", "better", "slightly_better", "negligibly_better"]
    assert table["significantly_better"]["accuracy"] > table["negligibly_better"]["accuracy"]
    inverted = evaluate_reward_model(lambda p, r: -_gold_scorer(task)(p, r), task, pairs=pairs)
    assert inverted["rm/gold_accuracy"] == 0.0 and inverted["rm/spearman_gold"] == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    noise = evaluate_reward_model(lambda p, r: rng.normal(size=len(r)), task, pairs=pairs)
    assert abs(noise["rm/accuracy"] - 0.5) < 0.08 and abs(noise["rm/spearman_gold"]) < 0.1


def test_a_learned_reward_scores_reward_model_evaluation(base):
    from rlhflab.models.reward_model import RewardModel
    from rlhflab.rewards import LearnedReward

    model, tokenizer = base
    rm = RewardModel.from_causal_lm(
        tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=5)
    )
    reward = LearnedReward(rm, tokenizer, batch_size=3)

    def score(prompts, responses):
        return reward.score(prompts, responses).numpy()

    task = get_task("sentiment")
    metrics = evaluate_reward_model(score, task, n_pairs=40, seed=1)
    # By hand on the same held-out pairs: chosen and rejected scored apart, ties 1/2; gold from the task.
    pairs = heldout_pairs(task, 40, seed=1)
    prompts, chosen, rejected = ([p[k] for p in pairs] for k in ("prompt", "chosen", "rejected"))
    sc, sr = score(prompts, chosen), score(prompts, rejected)
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(sc.tolist(), sr.tolist())]
    assert metrics["rm/n_pairs"] == len(pairs) and metrics["rm/accuracy"] == pytest.approx(
        sum(wins) / len(wins)
    )
    gold = gold_scores(task, [prompt_text(p) for p in prompts] * 2, chosen + rejected)
    assert metrics["rm/spearman_gold"] == pytest.approx(spearman(np.concatenate([sc, sr]), gold))
    a = score(
        [[{"role": "user", "content": "review the film ."}]] * 2, ["the plot was good .", "it was bad ."]
    )
    b = score([[{"role": "user", "content": "review the film ."}]], ["the plot was good ."])
    assert a.shape == (2,) and a[0] == pytest.approx(b[0], abs=1e-5)  # padding does not change a score


def test_a_control_token_policy_is_sampled_behind_its_token_and_its_kl_read_without_it(base, tmp_path):
    """A Quark model (new control tokens; here fresh ones, untrained): sampled behind its best token with every
    control token blocked; the reference, which has no such tokens, scores the same responses behind the plain
    prompts, and the KL is the difference of the two log-probs, worked out here by hand."""
    import copy

    from rlhflab.lab.evaluate import Conditioning, conditioning_of
    from rlhflab.models.loading import load_inference_lm, load_tokenizer
    from rlhflab.rollout.generate import encode_prompts
    from rlhflab.stages import quark as qk

    task = get_task("sentiment")
    ref, ref_tokenizer = base
    model, tokenizer = copy.deepcopy(ref), copy.deepcopy(ref_tokenizer)
    tokens = qk.add_control_tokens(model, tokenizer, 3, seed=0)
    with torch.no_grad():  # the policy moved from the reference (noise on every weight), so the KL is not ~0
        g = torch.Generator().manual_seed(0)
        for w in model.parameters():
            w.add_(0.3 * w.std() * torch.randn(w.shape, generator=g) if w.numel() > 1 else 0.0)
    saved = qk.save_quark_model(model, tokenizer, tokens, tmp_path / "quark")
    assert conditioning_of(tmp_path / "nothing-here") is None
    cond = conditioning_of(saved)
    assert cond == Conditioning(tokens.best_id, tuple(tokens.ids))
    policy, policy_tokenizer = load_inference_lm(saved), load_tokenizer(saved)
    prompts = task.heldout_prompts(6, seed=0)
    m = evaluate_policy(policy, policy_tokenizer, task, prompts=prompts, n_samples=2, ref_model=ref,
                        conditioning=cond, return_samples=True, seed=3)  # fmt: skip
    rollout = m["samples_obj"].rollout
    assert all(cond.token_id in rollout.prompt_ids[i].tolist() for i in range(len(rollout)))
    assert not torch.isin(rollout.response_ids[rollout.response_mask], torch.tensor(tokens.ids)).any()
    # By hand, one row at a time without padding: the policy reads its prompt (token included) with the control
    # tokens banned, the reference reads the plain chat prompt; the KL is the mean of the summed differences.
    seq_kl = []
    for i in range(len(rollout)):
        response = rollout.response_ids[i][rollout.response_mask[i]].tolist()
        conditioned = rollout.prompt_ids[i][rollout.prompt_mask[i]].tolist()
        plain = encode_prompts(ref_tokenizer, [[{"role": "user", "content": prompts[i // 2]}]])[0]
        assert conditioned == [*plain[:1], cond.token_id, *plain[1:]] or conditioned == [
            cond.token_id,
            *plain,
        ]
        with torch.no_grad():
            p_logits = policy(torch.tensor([conditioned + response])).logits[0, len(conditioned) - 1 : -1]
            p_logits[:, list(tokens.ids)] = float("-inf")
            r_logits = ref(torch.tensor([plain + response])).logits[0, len(plain) - 1 : -1]
        picked = torch.tensor(response)[:, None]
        p_lp = p_logits.log_softmax(-1).gather(1, picked).sum()
        seq_kl.append(float(p_lp - r_logits.log_softmax(-1).gather(1, picked).sum()))
    assert m["kl/ref"] == pytest.approx(sum(seq_kl) / len(seq_kl), abs=1e-4) and abs(m["kl/ref"]) > 0.01
    # Without its conditioning the policy's larger vocabulary is refused for a KL to the reference.
    with pytest.raises(ConfigError, match="vocabularies"):
        evaluate_policy(policy, policy_tokenizer, task, prompts=prompts, n_samples=1, ref_model=ref)
