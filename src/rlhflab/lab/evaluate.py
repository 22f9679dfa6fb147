"""Evaluate a policy or a reward model on a lab task, judged by the task's hidden gold reward.

evaluate_policy -> dict of metrics (namespaced keys):
    gold/mean, gold/ci95 [lo, hi]    gold reward of N samples on each held-out prompt; the interval is a
                                     t-interval over per-prompt means (see `rlhflab.eval.metrics`)
    gold/<term>                      mean of each gold term (sentiment, fluency, repetition, ... / outcome,
                                     process): which part of gold moved
    gold/<term>/risky, /benign       tasks whose gold flags risky prompts (harm): helpfulness, harm and
                                     refusals on each kind of prompt (harm rate on risky prompts, false
                                     refusals and helpfulness on benign ones), each with ..._ci95
    gold/win_rate, gold/win_rate_ci95  vs reference samples on the same prompts, by gold, ties = 1/2
    gold/gain, gold/gain_ci95        gold minus the reference samples' gold, paired by prompt (the interval
                                     of the differences: prompt difficulty cancels out)
    kl/ref, kl/ref_ci95              sampled sequence KL(policy || ref): mean over samples of
                                     sum over response tokens of (log pi(y_t) - log ref(y_t)); unbiased
                                     when sampling at temperature 1 without top-k/top-p (the default)
    sample/len_mean, sample/len_std  response length in tokens (EOS excluded)
    sample/eos_rate                  share of responses that ended with EOS (not cut at max_new_tokens)
    sample/distinct_1, sample/distinct_2, sample/unigram_entropy   diversity over all samples (mode collapse)
    sample/policy_entropy            mean per-token entropy (nats) of the policy at the sampled positions
    examples                         a few (prompt, response, gold) for people to read
evaluate_reward_model -> dict:
    rm/accuracy, rm/accuracy_by_rating  agreement with the annotators' labels, overall and per Llama 2
                                     rating (the layout of Llama 2's Table 28)
    rm/gold_accuracy                 agreement with the gold order (pairs with equal gold left out)
    rm/spearman_gold                 rank correlation of proxy and gold over all responses

A stage may call `evaluate_policy` every few steps to log gold/* curves next to its proxy reward (the
over-optimization plot); it must never feed those numbers back into training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rlhflab.errors import ConfigError
from rlhflab.eval import metrics as M
from rlhflab.lab.annotators import AnnotatorPool
from rlhflab.lab.gold import gold_components
from rlhflab.lab.tasks import LabTask, chat_prompt, get_task, prompt_text
from rlhflab.losses.logprobs import entropy_from_logits, gather_logprobs
from rlhflab.models.control_tokens import Conditioning, condition_prompts
from rlhflab.models.control_tokens import conditioning_of as conditioning_of
from rlhflab.rollout.generate import Rollout, SamplingSettings, encode_prompts, generate

ScoreFn = Callable[[Sequence, Sequence[str]], Sequence[float]]


@dataclass
class PolicySamples:
    """N samples on each of P prompts. prompts: task prompts (text); responses [P][N]; gold [P, N];
    components {term: [P, N]}; rollout: the generation (rows prompt-major: row p*N + j)."""

    prompts: list[str]
    responses: list[list[str]]
    gold: np.ndarray
    components: dict[str, np.ndarray]
    rollout: Rollout | None = None


def sample_policy(
    model,
    tokenizer,
    task: str | LabTask,
    prompts: Sequence[str],
    *,
    n_samples: int = 4,
    settings: SamplingSettings | None = None,
    seed: int = 0,
    batch_size: int = 64,
    conditioning: Conditioning | None = None,
) -> PolicySamples:
    """Sample `n_samples` responses per task prompt (chat-formatted, as lab data is); score them by gold.
    `conditioning`: a control-token policy's prompts carry its token (the responses are scored against the plain
    prompts: the gold never sees the token)."""
    task = get_task(task)
    if n_samples < 1 or not prompts:
        raise ConfigError("sample_policy needs at least one prompt and n_samples >= 1")
    settings = settings or SamplingSettings(max_new_tokens=task.max_new_tokens)
    chats = [chat_prompt(p) for p in prompts for _ in range(n_samples)]
    chats, settings = condition_prompts(conditioning, tokenizer, chats, settings)
    rollout = generate(model, tokenizer, chats, settings, batch_size=batch_size, seed=seed)
    return score_responses(
        task,
        list(prompts),
        [rollout.texts[i * n_samples : (i + 1) * n_samples] for i in range(len(prompts))],
        rollout=rollout,
    )


def score_responses(
    task: str | LabTask, prompts: list[str], responses: list[list[str]], rollout: Rollout | None = None
) -> PolicySamples:
    """Gold-score given responses ([P][N] texts for P task prompts) into a `PolicySamples`."""
    task = get_task(task)
    comps = [[gold_components(task, p, r) for r in rs] for p, rs in zip(prompts, responses)]
    keys = list(comps[0][0]) if comps and comps[0] else ["gold"]
    arrays = {k: np.array([[c[k] for c in row] for row in comps], dtype=np.float64) for k in keys}
    return PolicySamples(list(prompts), [list(r) for r in responses], arrays.pop("gold"), arrays, rollout)


@torch.no_grad()
def response_logps(
    model, rollout: Rollout, batch_size: int = 64, blocked_ids: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs [B, R] of the sampled response tokens under `model` (0 where masked), and the
    model's predictive entropy [B, R] at those positions. `blocked_ids`: tokens the sampler never draws
    (`SamplingSettings.suppress_token_ids`): the distribution scored is the one sampled, renormalized without them."""
    device = next(model.parameters()).device
    start = rollout.response_start
    logps, ents = [], []
    for s in range(0, len(rollout), batch_size):
        ids = rollout.input_ids[s : s + batch_size].to(device)
        mask = rollout.attention_mask[s : s + batch_size].to(device)
        pos = rollout.position_ids[s : s + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, start - 1 : -1].float()
        if blocked_ids:  # the lowest float, not -inf: softmax gives them 0 and the entropy stays finite
            logits[..., list(blocked_ids)] = torch.finfo(logits.dtype).min
        labels = ids[:, start:]
        real = rollout.response_mask[s : s + batch_size].to(device)
        logps.append(gather_logprobs(logits, labels).masked_fill(~real, 0.0).cpu())
        ents.append(entropy_from_logits(logits).masked_fill(~real, 0.0).cpu())
    return torch.cat(logps), torch.cat(ents)


def _interval(values: np.ndarray) -> tuple[float, list[float]]:
    mean, lo, hi = M.mean_ci95(values)
    return mean, [lo, hi]


SPLIT_TERMS = ("helpfulness", "harm", "refused")


def gold_term_metrics(samples: PolicySamples) -> dict:
    """gold/mean with its interval, gold/std, each term's mean, and for tasks that flag risky prompts the
    split terms on risky and benign prompts with t-intervals over prompts."""
    out: dict = {}
    out["gold/mean"], out["gold/ci95"] = _interval(samples.gold.mean(axis=1))
    out["gold/std"] = float(samples.gold.std())
    for name, values in samples.components.items():
        out[f"gold/{name}"] = float(values.mean())
    risky = samples.components.get("risky_prompt")
    if risky is None:
        return out
    risky_rows = risky[:, 0] > 0.5
    for kind, rows in (("risky", risky_rows), ("benign", ~risky_rows)):
        for name in SPLIT_TERMS:
            if rows.any() and name in samples.components:
                key = f"gold/{name}/{kind}"
                out[key], out[f"{key}_ci95"] = _interval(samples.components[name][rows].mean(axis=1))
    return out


def sample_metrics(samples: PolicySamples) -> dict:
    r = samples.rollout
    out: dict = {}
    if r is None:
        seqs = [t.split() for rs in samples.responses for t in rs]
        lengths = np.array([len(s) for s in seqs], dtype=np.float64)
    else:
        seqs = [row[m].tolist() for row, m in zip(r.response_ids.cpu(), r.response_mask.cpu())]
        eos = r.ended_with_eos.cpu().numpy()
        lengths = r.response_lengths.cpu().numpy().astype(np.float64) - eos  # EOS is not content
        seqs = [s[:-1] if e else s for s, e in zip(seqs, eos)]
        out["sample/eos_rate"] = float(eos.mean())
    out.update(
        {
            "sample/len_mean": float(lengths.mean()),
            "sample/len_std": float(lengths.std()),
            "sample/distinct_1": M.distinct_n(seqs, 1),
            "sample/distinct_2": M.distinct_n(seqs, 2),
            "sample/unigram_entropy": M.unigram_entropy(seqs),
        }
    )
    return out


def _reference_view(
    rollout: Rollout, tokenizer, conditioning: Conditioning | None, prompts: list[str], n_samples: int
) -> Rollout:
    """The rollout (`n_samples` rows per task prompt) as the reference reads it: a conditioned policy's responses
    behind the plain chat prompts."""
    if conditioning is None:
        return rollout
    plain = encode_prompts(tokenizer, [chat_prompt(p) for p in prompts for _ in range(n_samples)])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return rollout.with_prompts(plain, pad)


def _check_reference_vocab(ref_model, model, ref_rollout: Rollout, conditioning: Conditioning | None) -> None:
    n_ref = ref_model.get_input_embeddings().num_embeddings
    if conditioning is None and n_ref != model.get_input_embeddings().num_embeddings:
        raise ConfigError("ref_model and the policy have different vocabularies; the KL needs one tokenizer")
    used = ref_rollout.input_ids[ref_rollout.attention_mask.bool()]
    if used.numel() and int(used.max()) >= n_ref:
        raise ConfigError(
            f"the reference model has {n_ref} token embeddings but the samples it must score hold token id "
            f"{int(used.max())}; measure the KL to a model with the policy's tokenizer (before its control tokens)"
        )


def _versus_reference(samples: PolicySamples, ref_samples: PolicySamples, prompts: list[str]) -> dict:
    """Win rate and paired gold gain against reference samples on the same prompts, and their mean gold."""
    if ref_samples.prompts != prompts:
        raise ConfigError("ref_samples were drawn on other prompts; sample the reference on the same ones")
    out = {}
    per_prompt = M.win_rate_all_pairs(samples.gold, ref_samples.gold)
    out["gold/win_rate"], out["gold/win_rate_ci95"] = _interval(per_prompt)
    out["gold/gain"], out["gold/gain_ci95"] = _interval(M.paired_gain(samples.gold, ref_samples.gold))
    out["gold/ref_mean"] = float(ref_samples.gold.mean())
    return out


def evaluate_policy(
    model,
    tokenizer,
    task: str | LabTask,
    *,
    n_prompts: int = 64,
    n_samples: int = 4,
    prompts: Sequence[str] | None = None,
    ref_model=None,
    ref_samples: PolicySamples | None = None,
    settings: SamplingSettings | None = None,
    seed: int = 0,
    batch_size: int = 64,
    n_examples: int = 6,
    return_samples: bool = False,
    conditioning: Conditioning | None = None,
) -> dict:
    """Gold-judged metrics of a policy on the task's held-out prompts (see the module docstring).

    prompts: task prompts to use instead of `task.heldout_prompts(n_prompts, seed)`.
    ref_model: reference LM (same tokenizer) for the KL estimate, and for the win rate when
        `ref_samples` is not given (it is then sampled on the same prompts).
    ref_samples: reference samples on the same prompts (e.g. `sample_policy` of the SFT model, reused
        across policies), for the win rate.
    return_samples: also return the `PolicySamples` under key "samples_obj" (not JSON-serializable).
    conditioning: sample a control-token policy (`conditioning_of(model_dir)`; `tokenizer` must be the policy's,
        which has the tokens); the reference scores its responses behind the plain prompts.
    """
    task = get_task(task)
    prompts = list(prompts) if prompts is not None else task.heldout_prompts(n_prompts, seed=seed)
    samples = sample_policy(
        model,
        tokenizer,
        task,
        prompts,
        n_samples=n_samples,
        settings=settings,
        seed=seed,
        batch_size=batch_size,
        conditioning=conditioning,
    )
    out: dict = {"eval/n_prompts": len(prompts), "eval/n_samples": n_samples}
    out.update(gold_term_metrics(samples))
    out.update(sample_metrics(samples))
    blocked = conditioning.blocked_ids if conditioning is not None else ()
    policy_logps, entropy = response_logps(model, samples.rollout, batch_size, blocked)
    mask = samples.rollout.response_mask.cpu()
    out["sample/policy_entropy"] = float(entropy[mask].mean()) if mask.any() else math.nan
    if ref_model is not None:
        ref_rollout = _reference_view(samples.rollout, tokenizer, conditioning, prompts, n_samples)
        _check_reference_vocab(ref_model, model, ref_rollout, conditioning)
        # The reference scoring its own samples: the KL is 0 without a second pass over them.
        ref_logps = (
            policy_logps if ref_model is model else response_logps(ref_model, ref_rollout, batch_size)[0]
        )
        seq_kl = (policy_logps - ref_logps).sum(-1).numpy().reshape(len(prompts), n_samples)
        out["kl/ref"], out["kl/ref_ci95"] = _interval(seq_kl.mean(axis=1))
        if ref_samples is None:
            ref_samples = sample_policy(
                ref_model,
                tokenizer,
                task,
                prompts,
                n_samples=n_samples,
                settings=settings,
                seed=seed + 1,
                batch_size=batch_size,
            )
    if ref_samples is not None:
        out.update(_versus_reference(samples, ref_samples, prompts))
    out["examples"] = [
        {"prompt": prompts[i], "response": samples.responses[i][0], "gold": float(samples.gold[i, 0])}
        for i in range(min(n_examples, len(prompts)))
    ]
    if return_samples:
        out["samples_obj"] = samples
    return out


def heldout_pairs(
    task: str | LabTask, n_pairs: int = 512, *, annotator_settings=None, seed: int = 0
) -> list[dict]:
    """Annotated held-out pairs (demonstrator responses on held-out prompts), chat-formatted like lab data."""
    task = get_task(task)
    prompts = task.heldout_prompts(n_pairs, seed=seed + 17)
    a = task.demonstrations(prompts, seed=seed * 1000 + 501)
    b = task.demonstrations(prompts, seed=seed * 1000 + 502)
    keep = [i for i in range(len(prompts)) if a[i] != b[i]]
    pool = AnnotatorPool(task, annotator_settings, seed=seed + 23)
    labels = pool.compare([prompts[i] for i in keep], [a[i] for i in keep], [b[i] for i in keep])
    rows = []
    for i, lab in zip(keep, labels):
        if lab.a_preferred is None:
            continue
        chosen, rejected = (a[i], b[i]) if lab.a_preferred else (b[i], a[i])
        rows.append(
            {"prompt": chat_prompt(prompts[i]), "chosen": chosen, "rejected": rejected, "rating": lab.rating}
        )
    return rows


def evaluate_reward_model(
    score_fn: ScoreFn,
    task: str | LabTask,
    *,
    pairs: Sequence[dict] | None = None,
    n_pairs: int = 512,
    annotator_settings=None,
    seed: int = 0,
) -> dict:
    """Pairwise accuracy of a scorer (overall, by Llama 2 rating, vs gold) and its rank correlation with gold.

    pairs: rows {"prompt", "chosen", "rejected", "rating"?} (prompt as text or chat messages); default:
    `heldout_pairs(task, n_pairs)`. score_fn(prompts, responses) -> one proxy score per response.
    """
    from rlhflab.data.records import LLAMA2_RATINGS

    task = get_task(task)
    pairs = (
        list(pairs)
        if pairs is not None
        else heldout_pairs(task, n_pairs, annotator_settings=annotator_settings, seed=seed)
    )
    if not pairs:
        raise ConfigError("evaluate_reward_model got no pairs")
    prompts = [row["prompt"] for row in pairs]
    chosen, rejected = [row["chosen"] for row in pairs], [row["rejected"] for row in pairs]
    scores = np.asarray(score_fn(prompts + prompts, chosen + rejected), dtype=np.float64)
    sc, sr = scores[: len(pairs)], scores[len(pairs) :]
    texts = [prompt_text(p) for p in prompts]
    gc = np.array([gold_components(task, p, r)["gold"] for p, r in zip(texts, chosen)])
    gr = np.array([gold_components(task, p, r)["gold"] for p, r in zip(texts, rejected)])
    ratings = [row.get("rating") or "unrated" for row in pairs]
    by_rating = M.accuracy_by_bucket(sc, sr, ratings, order=LLAMA2_RATINGS)
    decided = gc != gr
    gold_first_c = np.where(gc > gr, sc, sr)[decided]
    gold_first_r = np.where(gc > gr, sr, sc)[decided]
    return {
        "rm/n_pairs": len(pairs),
        "rm/accuracy": by_rating["overall"]["accuracy"],
        "rm/accuracy_by_rating": by_rating,
        "rm/gold_accuracy": M.pairwise_accuracy(gold_first_c, gold_first_r),
        "rm/spearman_gold": M.spearman(scores, np.concatenate([gc, gr])),
        "rm/label_gold_agreement": float(np.mean((gc > gr)[decided])) if decided.any() else math.nan,
    }
