"""Builders and checks shared by the tests, written once.

Test modules import this file relatively (`from ..helpers import ...` in tests/<dir>/, `from .helpers import ...`
in tests/): pyproject.toml runs pytest with `--import-mode=importlib`, which names each test module after its
path from the rootdir (`tests.stages.test_sft`), so `tests.helpers` resolves from a fresh clone, from any
working directory, with no `pythonpath` setting and no `__init__.py`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from rlhflab.config import load_config
from rlhflab.core.checkpoint import latest_checkpoint
from rlhflab.core.metrics_log import read_metrics
from rlhflab.models.tiny import tiny_causal_lm

# ---- tiny models ---------------------------------------------------------------------------------------------

TINY_LM = {"hidden_size": 32, "num_layers": 2, "num_heads": 2}  # the size of every fixture's tiny causal LM


def tiny_lm(tokenizer, *, seed: int = 0, arch: str = "llama"):
    """The tests' tiny causal LM (hidden 32, 2 layers, 2 heads); seed 0 is the `tiny_model` fixture's."""
    return tiny_causal_lm(tokenizer, arch=arch, **TINY_LM, seed=seed)


def save_model_dir(model, tokenizer, out: Path) -> Path:
    """`model` and `tokenizer` saved as one plain HF directory `out`, as a stage reads model.name_or_path."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def perturb_(module: nn.Module, scale: float, seed: int) -> nn.Module:
    """Add `scale` x seeded Gaussian noise to every parameter, in place (a reference != the policy)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def tiny_reward_model(arch: str, kv_heads: int, vocab: int):
    """A 2-head RewardModel on a tiny seeded HF backbone (hidden 32, 2 layers, 4 attention heads): "llama",
    "qwen2" or "mistral" with `kv_heads` key/value heads (grouped-query when < 4), or "gpt2" (absolute
    positions, no dropout)."""
    import transformers

    from rlhflab.models.reward_model import RewardModel

    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        backbone = transformers.GPT2Model(config)
    else:
        config_cls, model_cls = {
            "llama": ("LlamaConfig", "LlamaModel"),
            "qwen2": ("Qwen2Config", "Qwen2Model"),
            "mistral": ("MistralConfig", "MistralModel"),
        }[arch]
        extra = {"sliding_window": None} if arch == "mistral" else {}
        config = getattr(transformers, config_cls)(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
            intermediate_size=48,
            max_position_embeddings=64,
            **extra,
        )
        backbone = getattr(transformers, model_cls)(config)
    return RewardModel(backbone.train(), 2)


# ---- tiny data -----------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# A learnable toy: four prompts about a cat, answered happily (SFT) or happy-over-sad (preferences).
CAT_PROMPTS = ["the cat sat on the mat", "what is the cat", "i like the cat", "why is the cat sad"]
CAT_PAIRS = [
    {"prompt": p, "chosen": "the cat is very happy .", "rejected": "the cat is very sad ."}
    for p in CAT_PROMPTS
]

# Short prompts for on-policy stages (PPO); the first eight are the classic PPO test set.
PPO_PROMPTS = [
    "the cat",
    "the dog",
    "i say",
    "what is",
    "how was the film",
    "the day was",
    "we like",
    "you hate",
    "hello",
    "why is the cat sad",
    "i love this",
    "the movie is",
    "that was a",
    "how is it",
    "yes",
    "the mat",
]


# ---- stage configs -------------------------------------------------------------------------------------------

# On CPU, no progress bar, no TensorBoard, a metrics row every step.
QUIET = ("model.device=cpu", "logging.progress=false", "logging.tensorboard=false", "logging.log_every=1")
# The text stages (sft, rm, dpo) on the tiny data: short rows, batches of 8, a fast learning rate.
SHORT_TEXT = ("data.max_length=32", "data.max_prompt_length=16", "optim.batch_size=8", "optim.lr=1e-2")


def stage_config(stage: str, model_dir, *overrides: str, data=None, out=None):
    """`load_config(stage)` for `model_dir` run QUIET, reading `data` and writing to `out` when given, then
    `overrides` (a key given twice takes its last value, so an override can change a QUIET or SHORT_TEXT one)."""
    return load_config(
        stage,
        None,
        [
            f"model.name_or_path={model_dir}",
            *([f"data.train_path={data}"] if data else []),
            *([f"logging.output_dir={out}"] if out else []),
            *QUIET,
            *overrides,
        ],
    )


# ---- checks on runs ------------------------------------------------------------------------------------------


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """The same keys and bit-for-bit equal tensors."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def causal_lm_state(final_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(final_dir).state_dict()


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def assert_stopped_with_checkpoint_intact(run_dir: Path, step: int) -> None:
    """A run stopped by a non-finite value: its latest checkpoint is step `step`, holding finite weights
    only, and no final model was written."""
    ckpt = latest_checkpoint(run_dir)
    assert ckpt.name == checkpoint_name(step)
    state = torch.load(ckpt / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (run_dir / "final").exists()


def poison_from_call(
    monkeypatch, module: ModuleType, name: str, n: int, *, when: Callable[[], bool] = lambda: True
):
    """`module.name` returns its output times NaN from its `n`-th call on, counting only the calls made while
    `when()` holds (the others pass through untouched): a loss that turns non-finite mid-run."""
    real = getattr(module, name)
    calls = 0

    def poisoned(*args, **kwargs):
        nonlocal calls
        out = real(*args, **kwargs)
        if not when():
            return out
        calls += 1
        return out * float("nan") if calls >= n else out

    monkeypatch.setattr(module, name, poisoned)


def _deterministic(rows: list[dict]) -> list[dict]:
    """Metrics rows without what depends on the wall clock ("time" and the perf/ throughput keys)."""
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in rows]


def assert_resume_matches(
    run: Callable[[Path, bool], Path],
    root: Path,
    *,
    crash_in: tuple[ModuleType, str],
    crash_on_call: int,
    checkpoint_step: int,
    final_state: Callable[[Path], dict[str, torch.Tensor]] = causal_lm_state,
) -> None:
    """The exact-resume check of every stage: an interrupted run continued with --resume ends bit for bit
    where an uninterrupted one does.

    `run(out_dir, resume)` trains one run into `out_dir` (with resume=True: continues the run there) and
    returns its final model directory. Run "a" goes uninterrupted. Run "b" is stopped by a KeyboardInterrupt
    (Ctrl-C) raised on the `crash_on_call`-th call of `getattr(*crash_in)`; its latest checkpoint must be
    step `checkpoint_step`; then run "b" is resumed. The final states (`final_state(final_dir)`) are equal
    tensor for tensor, and so are the logged metrics but for the wall clock: run "b" logged, up to the
    checkpoint, exactly run "a"'s rows, and after resuming exactly run "a"'s rows after the checkpoint.
    """
    module, name = crash_in
    real = getattr(module, name)
    calls = 0

    def crash(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == crash_on_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    ref_final = run(root / "a", False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, name, crash)
        with pytest.raises(KeyboardInterrupt):
            run(root / "b", False)
    assert calls == crash_on_call
    assert latest_checkpoint(root / "b").name == checkpoint_name(checkpoint_step)
    resumed_final = run(root / "b", True)

    assert_same_tensors(final_state(ref_final), final_state(resumed_final))
    a_rows = _deterministic(read_metrics(root / "a" / "metrics.jsonl"))
    b_rows = _deterministic(read_metrics(root / "b" / "metrics.jsonl"))
    before = [r for r in a_rows if r["step"] <= checkpoint_step]
    after = [r for r in a_rows if r["step"] > checkpoint_step]
    assert before and after
    assert b_rows[: len(before)] == before
    assert b_rows[-len(after) :] == after


# ---- a tiny model shaped like a real instruct model ------------------------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def smollm_like_dir(out: Path, corpus: list[str], *, vocab_size: int = 400, seed: int = 0) -> Path:
    """A random LlamaForCausalLM shaped like SmolLM2-135M-Instruct (grouped-query attention, tied embeddings, a
    byte-level BPE tokenizer trained on `corpus`, ChatML with a default system prompt, EOS <|im_end|>), tiny
    (hidden 32, 2 layers): what `rlhflab run --model DIR` gets from `rlhflab import-gguf`, in seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return save_model_dir(LlamaForCausalLM(config), tokenizer, out)
