"""Typed configuration: one dataclass per stage, built from nested sections.

A stage config is resolved in three layers, later ones winning:

    dataclass defaults  <-  YAML file (--config FILE)  <-  dotted overrides (optim.lr=1e-5)

Every field is documented where it is declared. Validation happens in `__post_init__`, so an impossible
config fails when it is built, before a model is loaded, with a message that says what to do. Unknown
keys are rejected with the closest known key suggested: a typo that silently falls back to a default is
the most expensive kind of bug in a long training run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhflab.errors import ConfigError
from rlhflab.losses.preference import PREFERENCE_LOSS_TABLE

# --------------------------------------------------------------------------------------------------------
# Sections shared by the stages
# --------------------------------------------------------------------------------------------------------


@dataclass
class LoraSection:
    enabled: bool = False
    """Train LoRA adapters (PEFT) instead of all weights."""
    r: int = 8
    """Rank of the adapters."""
    alpha: float = 16.0
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt (a YAML list; on the command line NAME,NAME), or [all-linear] for every linear
    layer but the output head."""
    merge: bool = False
    """Write the final model and snapshots as the full model with the adapters folded in (a plain HF directory)
    instead of the adapter alone (PEFT format: adapter_config.json + adapter_model.safetensors, a few MB, whose
    base_model_name_or_path is model.name_or_path; `rlhflab` commands and peft's PeftModel.from_pretrained load
    it). `--merge` on the command line."""

    def __post_init__(self):
        _require(self.r >= 1, "model.lora.r", f"must be >= 1, got {self.r}")
        _require(
            bool(self.target_modules)
            and ("all-linear" not in self.target_modules or self.target_modules == ["all-linear"]),
            "model.lora.target_modules",
            f"must be module names or [all-linear] alone, got {self.target_modules}",
        )
        _require(0.0 <= self.dropout < 1.0, "model.lora.dropout", f"must be in [0, 1), got {self.dropout}")
        _require(
            self.enabled or not self.merge,
            "model.lora.merge",
            "folds LoRA adapters into the model, but model.lora.enabled is false; drop it or enable LoRA",
        )


@dataclass
class ModelSection:
    name_or_path: str = "lab:sentiment"
    """A local HF model directory, or 'lab:TASK' for the built-in lab task's pretrained base model."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Weights dtype. float32 on CPU; bfloat16 is the usual choice on recent GPUs."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda', or 'cuda:N'."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    autocast: Literal["none", "bf16"] = "none"
    """Mixed precision: 'bf16' runs every forward pass of training (policy, reference, reward and value
    models) under torch.autocast(bfloat16) while weights, gradients and optimizer state stay float32
    (model.dtype must be float32). The usual recipe on GPUs with bf16 units (A100, H100); on CPUs without
    them it is slower than float32."""
    lora: LoraSection = field(default_factory=LoraSection)

    def __post_init__(self):
        _require(
            self.autocast == "none" or self.dtype == "float32",
            "model.autocast",
            f"'{self.autocast}' keeps float32 master weights and needs model.dtype=float32, got "
            f"model.dtype={self.dtype}; set model.dtype=float32, or model.autocast=none to train in {self.dtype}",
        )


@dataclass
class DataSection:
    train_path: str = ""
    """Training data: a .jsonl/.json/.csv/.parquet file or a saved HF datasets directory. Empty: the
    stage's built-in lab data (made on the fly for the lab task of model.name_or_path)."""
    eval_path: str = ""
    """Optional held-out data in the same format."""
    split: str = ""
    """Split name when the path is a DatasetDict directory (e.g. 'train')."""
    max_length: int = 128
    """Maximum tokens of prompt + response; longer examples are truncated (end of prompt kept,
    start of response kept)."""
    max_prompt_length: int = 64
    """Maximum prompt tokens; must be below max_length so some response survives truncation."""
    skip_bad_records: bool = False
    """Skip malformed records (their count is reported) instead of stopping at the first one."""
    eval_fraction: float = 0.0
    """When no eval_path is given, hold out this fraction of the training records for evaluation."""
    columns: dict[str, str] = field(default_factory=dict)
    """Our field -> your column, for data whose columns have other names: data.columns.prompt=question. It also
    picks a column of another kind of record: `rlhflab sft data.columns.completion=chosen` on a pairs file
    fine-tunes on the preferred responses (Binary FeedME, Dubois et al. 2023)."""

    def __post_init__(self):
        _require(self.max_length >= 2, "data.max_length", f"must be >= 2, got {self.max_length}")
        _require(
            self.max_prompt_length >= 1,
            "data.max_prompt_length",
            f"must be >= 1, got {self.max_prompt_length}",
        )
        _require(
            self.max_prompt_length < self.max_length,
            "data.max_prompt_length",
            f"({self.max_prompt_length}) must be smaller than data.max_length ({self.max_length}), "
            "otherwise no response token survives truncation; raise data.max_length or lower "
            "data.max_prompt_length",
        )
        _require(
            0.0 <= self.eval_fraction < 1.0,
            "data.eval_fraction",
            f"must be in [0, 1), got {self.eval_fraction}",
        )


@dataclass
class SFTDataSection(DataSection):
    packing: bool = False
    """Pack several examples into one row without padding (block-causal attention keeps them apart)."""


@dataclass
class PromptDataSection:
    """Prompts for on-policy methods: the policy writes the responses."""

    train_path: str = ""
    """Prompt records: a .jsonl/.json/.csv/.parquet file or a saved HF datasets directory. Empty: the lab
    task's prompts (made on the fly for the lab task of model.name_or_path)."""
    split: str = ""
    """Split name when the path is a DatasetDict directory (e.g. 'train')."""
    max_prompt_length: int = 64
    """Maximum prompt tokens; a longer prompt keeps its last tokens (the end, where the request is), as the
    data layer truncates training prompts."""
    skip_bad_records: bool = False
    """Skip malformed records (their count is reported) instead of stopping at the first one."""

    def __post_init__(self):
        _require(
            self.max_prompt_length >= 1,
            "data.max_prompt_length",
            f"must be >= 1, got {self.max_prompt_length}",
        )


@dataclass
class AdamWSection:
    """The optimizer (AdamW) and its learning-rate schedule."""

    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr."""
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def __post_init__(self):
        _require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(self.max_grad_norm >= 0, "optim.max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        _require(all(0 <= b < 1 for b in self.betas), "optim.betas", f"must be in [0, 1), got {self.betas}")


@dataclass
class OptimSection(AdamWSection):
    """AdamW plus how the data is cut into optimizer steps."""

    batch_size: int = 16
    """Examples per optimizer step (across gradient accumulation)."""
    micro_batch_size: int = 0
    """Examples per forward/backward pass; 0 means the whole batch. Must divide batch_size."""
    epochs: int = 1
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 means run for `epochs`."""

    def __post_init__(self):
        super().__post_init__()
        _require(self.batch_size >= 1, "optim.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(
            self.micro_batch_size >= 0, "optim.micro_batch_size", f"must be >= 0, got {self.micro_batch_size}"
        )
        if self.micro_batch_size:
            _require(
                self.batch_size % self.micro_batch_size == 0,
                "optim.micro_batch_size",
                f"({self.micro_batch_size}) must divide optim.batch_size ({self.batch_size}); "
                f"try {_divisor_hint(self.batch_size, self.micro_batch_size)}",
            )
        _require(self.epochs >= 1, "optim.epochs", f"must be >= 1, got {self.epochs}")
        _require(self.max_steps >= 0, "optim.max_steps", f"must be >= 0, got {self.max_steps}")

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size if self.micro_batch_size else 1


@dataclass
class LoggingSection:
    output_dir: str = ""
    """Run directory (config, metrics.jsonl, TensorBoard, checkpoints, final model). Empty: runs/STAGE-TIME."""
    log_every: int = 10
    """Log metrics every N optimizer steps (PPO: iterations)."""
    save_every: int = 0
    """Write a resumable checkpoint every N optimizer steps; 0 means only at the end."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep on disk."""
    snapshot_every: int = 0
    """Save the trained model (as RUN/final is saved) to RUN/snapshots/step-N every N optimizer steps (PPO and
    the other on-policy methods: iterations); 0 means none. Snapshots are what a curve over training is drawn
    from afterwards (e.g. the lab's gold reward and KL at each one) without the training loop seeing it."""
    tensorboard: bool = True
    """Write TensorBoard event files (when the tensorboard package is installed)."""
    wandb: bool = False
    """Log to Weights & Biases (needs the wandb package and a login)."""
    wandb_project: str = "rlhflab"
    """W&B project name."""
    progress: bool = True
    """Show a live progress bar with ETA."""

    def __post_init__(self):
        _require(self.log_every >= 1, "logging.log_every", f"must be >= 1, got {self.log_every}")
        _require(
            self.snapshot_every >= 0, "logging.snapshot_every", f"must be >= 0, got {self.snapshot_every}"
        )
        _require(
            self.keep_checkpoints >= 1,
            "logging.keep_checkpoints",
            f"must be >= 1, got {self.keep_checkpoints}",
        )


@dataclass
class EvalLoggingSection(LoggingSection):
    eval_every: int = 0
    """Evaluate on the held-out data every N optimizer steps; 0 means only at the end."""

    def __post_init__(self):
        super().__post_init__()
        _require(self.eval_every >= 0, "logging.eval_every", f"must be >= 0, got {self.eval_every}")


# --------------------------------------------------------------------------------------------------------
# Algorithm sections, one per stage
# --------------------------------------------------------------------------------------------------------


@dataclass
class SFTAlgo:
    loss_reduction: Literal["token_mean", "sequence_sum"] = "token_mean"
    """Average the NLL over all response tokens of a batch, or sum per sequence then average."""


@dataclass
class HeadSpec:
    """One reward head: its name and the data file it trains on."""

    name: str = "reward"
    """The head's name (no ':', '/' or spaces), e.g. helpfulness."""
    data: str = ""
    """Its data file; empty: data.train_path."""

    def __post_init__(self):
        _require(
            bool(self.name) and not any(c in self.name for c in ":/ "),
            "algo.heads",
            f"has a bad head name {self.name!r}; names have no ':', '/' or spaces",
        )

    @staticmethod
    def from_short(item: str) -> dict[str, str]:
        """'NAME' or 'NAME=DATA_FILE', the command line's form of one head."""
        name, _, data = (part.strip() for part in item.partition("="))
        return {"name": name, "data": data}


@dataclass
class RewardAlgo:
    loss: Literal["bradley_terry", "plackett_luce", "all_pairs", "binary", "step", "distributional"] = (
        "bradley_terry"
    )
    """Pairwise Bradley-Terry on pairwise data (with optional margins); or, on K-wise rankings, Plackett-Luce
    or InstructGPT's mean over all K-choose-2 pairs. Tied responses: all_pairs skips tied pairs; Plackett-Luce
    sums the likelihood over every order of the tied responses. binary: a classifier of single responses on
    unpaired data (prompt, completion, label), e.g. Sparrow's rule-violation models, one head per rule, or an
    outcome reward model (label = the final answer is right). step: a process reward model (Lightman et al.
    2023), a classifier of each step read at the step's last token, on stepwise data (prompt, completions = the
    steps, labels = one bool per step; TRL's stepwise-supervision format); see data.step_separator.
    distributional: on pairwise data, a mean and a log-variance per response (two heads, 'mean' and 'log_var'),
    P(chosen preferred) = Phi((mu_c - mu_r) / sqrt(sigma_c^2 + sigma_r^2)) (Siththaranjan et al. 2023's
    mean-and-variance DPL): the variance is where annotators disagree; scoring gives the mean, or mean - k std."""
    margin: Literal["none", "data", "small", "large"] = "none"
    """Llama 2 margin m in -log sigmoid(r_c - r_r - m): none; the record's numeric `margin` (0 where absent);
    or the small/large table (Table 27) applied to the record's `rating`. bradley_terry only."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped (conservative BT); bradley_terry and all_pairs."""
    heads: list[HeadSpec] = field(default_factory=list)
    """Reward heads on one backbone, each {name, data} (on the command line NAME=DATA_FILE,NAME), e.g.
    helpfulness=help.jsonl,safety=safe.jsonl (Llama 2's two reward models as two heads). A record trains
    the head its file belongs to; a head without a file trains on data.train_path (eval: data.eval_path or
    data.eval_fraction); a head with a file holds out data.eval_fraction of it. Empty: one head 'reward'."""
    center_rewards_coef: float = 0.0
    """Penalty coef * (2 x mean reward of an example's responses)^2, for a pair coef * (r_c + r_r)^2, keeping
    rewards centred near 0 (Eisenstein et al. 2023; the same scale as TRL's center_rewards_coefficient)."""
    normalization_samples: int = 1024
    """After training, score up to this many training responses and store their per-head mean/std in the
    model, so reward sources can whiten rewards (Llama 2); 0 skips it. With algo.loss=step: the mean/std of each
    solution-level score (the product and the minimum of its step probabilities), stored beside the model."""
    share_prompt: bool = True
    """Run each example's prompt once for all its responses: one row prompt, response 1, ..., response K,
    where each response attends only to the prompt and itself (same rewards up to float rounding, fewer
    tokens). Used when the model's attention takes a 4-D mask (sdpa, eager) and every response extends the
    tokenized prompt; other batches get one row per response. false: always one row per response (the 4-D
    mask holds B x T^2 entries and rules out flash attention kernels, so very long rows may prefer it)."""

    def __post_init__(self):
        _require(
            0.0 <= self.label_smoothing < 0.5,
            "algo.label_smoothing",
            f"must be in [0, 0.5), got {self.label_smoothing}",
        )
        _require(
            self.margin == "none" or self.loss == "bradley_terry",
            "algo.margin",
            f"'{self.margin}' needs algo.loss=bradley_terry (K-wise and binary losses have no margin), got "
            f"algo.loss={self.loss}; set algo.margin=none",
        )
        _require(
            self.label_smoothing == 0 or self.loss != "binary",
            "algo.label_smoothing",
            "is for preference losses; algo.loss=binary reads each label as given: set it to 0",
        )
        _require(
            self.label_smoothing == 0 or self.loss != "step",
            "algo.label_smoothing",
            "is for preference losses; algo.loss=step reads each step's label as given: set it to 0",
        )
        _require(
            self.center_rewards_coef == 0 or self.loss != "step",
            "algo.center_rewards_coef",
            "centres a response's reward; algo.loss=step scores every step and has no such term: set it to 0",
        )
        _require(
            self.label_smoothing == 0 or self.loss != "distributional",
            "algo.label_smoothing",
            "is not defined for algo.loss=distributional (its variance already models split labels); set it to 0",
        )
        _require(
            not self.heads or self.loss != "distributional",
            "algo.heads",
            "is set but algo.loss=distributional has its own two heads (mean, log_var) on data.train_path; drop it",
        )
        _require(
            self.label_smoothing == 0 or self.loss != "plackett_luce",
            "algo.label_smoothing",
            "is not defined for algo.loss=plackett_luce; use bradley_terry or all_pairs, or set it to 0",
        )
        _require(
            self.center_rewards_coef >= 0,
            "algo.center_rewards_coef",
            f"must be >= 0, got {self.center_rewards_coef}",
        )
        _require(
            self.normalization_samples >= 0,
            "algo.normalization_samples",
            f"must be >= 0, got {self.normalization_samples}",
        )
        names = [h.name for h in self.heads]
        for name in names:
            _require(names.count(name) == 1, "algo.heads", f"names head {name!r} twice")

    def head_specs(self) -> list[HeadSpec]:
        """The heads to train: `heads`, or one head 'reward' on data.train_path."""
        return self.heads or [HeadSpec()]


@dataclass
class PMDataSection(DataSection):
    """Pairwise preferences (prompt, chosen, rejected), the reward model's data; the model reads both responses."""

    max_length: int = 192
    """Maximum tokens of prompt + both responses + their two EOS separators: the prompt keeps its end (up to
    data.max_prompt_length), each response its start, and both get the same share of what the prompt leaves."""

    def __post_init__(self):
        super().__post_init__()
        _require(
            self.max_length - self.max_prompt_length >= 4,
            "data.max_length",
            f"({self.max_length}) must leave at least 4 tokens after data.max_prompt_length "
            f"({self.max_prompt_length}): each of the two responses needs a token and its EOS separator; "
            "raise data.max_length or lower data.max_prompt_length",
        )


@dataclass
class PMAlgo:
    """A general preference model (Munos et al. 2023; Jiang et al. 2023, PairRM): P(first preferred | prompt)
    from the prompt and both responses, antisymmetric by construction (`rlhflab.losses.general_preference`)."""

    label_smoothing: float = 0.0
    """Probability that a preference label is flipped: each pair's target is 1 - label_smoothing (conservative
    training against label noise, as for a reward model)."""

    def __post_init__(self):
        _require(
            0.0 <= self.label_smoothing < 0.5,
            "algo.label_smoothing",
            f"must be in [0, 0.5), got {self.label_smoothing}",
        )


@dataclass
class PreferenceLossSection:
    """A preference loss of `PREFERENCE_LOSS_TABLE` and its hyperparameters, with their checks: what the
    offline (dpo) and online (online-dpo) stages share."""

    loss: str = "dpo"
    """Preference loss by name, one of `rlhflab.losses.preference.PREFERENCE_LOSS_TABLE` (docs/losses.md lists
    each with its data, reference and hyperparameters): with a reference policy, on pairwise data: dpo, cdpo,
    robust_dpo, ipo, hinge (SLiC); kto and bco on unpaired data (prompt, completion, label); orpo, simpo, cpl
    on pairwise data without a reference model. A hyperparameter the loss does not take must keep its
    default."""
    beta: float = 0.1
    """dpo, cdpo, robust_dpo, ipo, hinge, kto, bco: strength of the implicit KL constraint to the reference
    policy (DPO paper 0.1). bco also shifts its rewards by their running mean, kept across steps and
    checkpoints (no setting)."""
    label_smoothing: float = 0.0
    """dpo, cdpo, robust_dpo, simpo: assumed probability that a preference label is flipped, in [0, 0.5);
    cdpo and robust_dpo need it > 0."""
    average_logps: bool = False
    """dpo, cdpo, robust_dpo, ipo, hinge: use each response's per-token mean log-prob instead of its sum (how
    TRL runs IPO; the beta that works grows by about the response length)."""
    orpo_lambda: float = 0.1
    """orpo: lambda, the weight of the odds-ratio term added to the chosen NLL (paper 0.1)."""
    simpo_beta: float = 2.0
    """simpo: the scale of the length-normalized reward (paper 2.0-2.5)."""
    simpo_gamma: float = 0.5
    """simpo: the target margin gamma (absolute, after the beta scaling; the paper tunes gamma/beta near 0.5)."""
    kto_desirable_weight: float = 1.0
    """kto: lambda_D, the weight of desirable examples."""
    kto_undesirable_weight: float = 1.0
    """kto: lambda_U, the weight of undesirable examples. The KTO paper keeps lambda_D n_D / (lambda_U n_U)
    in [1, 4/3], n = the example counts: raise the weight of the rarer kind."""
    cpl_alpha: float = 0.1
    """cpl: alpha, the temperature of the segment score."""
    cpl_gamma: float = 1.0
    """cpl: discount over the response tokens (the steps of a segment), in (0, 1]."""
    cpl_lambda: float = 1.0
    """cpl: conservative weight on the rejected segment's score, in (0, 1]; 1 is the plain CPL loss."""

    def __post_init__(self):
        if self.loss not in PREFERENCE_LOSS_TABLE:
            close = (
                [_TRL_LOSS_NAMES[self.loss]]
                if self.loss in _TRL_LOSS_NAMES
                else difflib.get_close_matches(self.loss, list(PREFERENCE_LOSS_TABLE), n=1)
            )
            raise ConfigError(
                f"config: 'algo.loss' must be one of {', '.join(PREFERENCE_LOSS_TABLE)}, got "
                f"{self.loss!r}" + (f"; did you mean {close[0]!r}?" if close else "")
            )
        row = PREFERENCE_LOSS_TABLE[self.loss]
        # A hyperparameter acts or is refused: one the loss does not take must stay at its default.
        used = set(row.params) | ({"average_logps"} if row.average else set())
        defaults = type(self).__dataclass_fields__
        for key in _LOSS_HYPERPARAMETERS:
            if key not in used and getattr(self, key) != defaults[key].default:
                takers = [
                    n
                    for n, r in PREFERENCE_LOSS_TABLE.items()
                    if key in r.params or (key == "average_logps" and r.average)
                ]
                raise ConfigError(
                    f"config: algo.{key} is not used by algo.loss={self.loss} (it is used by "
                    f"{', '.join(takers)}); remove it or keep its default "
                    f"{defaults[key].default!r}"
                )
        for key in (
            "beta",
            "orpo_lambda",
            "simpo_beta",
            "cpl_alpha",
            "kto_desirable_weight",
            "kto_undesirable_weight",
        ):
            _require(getattr(self, key) > 0, f"algo.{key}", f"must be > 0, got {getattr(self, key)}")
        _require(
            0.0 <= self.label_smoothing < 0.5,
            "algo.label_smoothing",
            f"must be in [0, 0.5), got {self.label_smoothing}",
        )
        _require(
            self.loss not in ("cdpo", "robust_dpo") or self.label_smoothing > 0,
            "algo.label_smoothing",
            f"is 0, which makes algo.loss={self.loss} plain DPO; set the assumed label-flip rate "
            "(e.g. algo.label_smoothing=0.1) or use algo.loss=dpo",
        )
        _require(self.simpo_gamma >= 0, "algo.simpo_gamma", f"must be >= 0, got {self.simpo_gamma}")
        for key in ("cpl_gamma", "cpl_lambda"):
            _require(
                0 < getattr(self, key) <= 1, f"algo.{key}", f"must be in (0, 1], got {getattr(self, key)}"
            )


@dataclass
class DPOAlgo(PreferenceLossSection):
    precompute_ref_logps: bool = True
    """Compute the reference log-probs of all data once before training and cache them in the run
    directory (reused by --resume), so no reference model stays in memory; false keeps the reference
    model loaded and runs it every step. Reference-free losses (orpo, simpo, cpl) never load one."""


# TRL's loss_type names of our losses, so a TRL user's habit gets the right suggestion.
_TRL_LOSS_NAMES = {"sigmoid": "dpo", "robust": "robust_dpo", "slic": "hinge"}
# The DPO stage's settings that belong to particular losses (`PreferenceLoss.params`, plus average_logps).
_LOSS_HYPERPARAMETERS = (
    "beta",
    "label_smoothing",
    "average_logps",
    "orpo_lambda",
    "simpo_beta",
    "simpo_gamma",
    "kto_desirable_weight",
    "kto_undesirable_weight",
    "cpl_alpha",
    "cpl_gamma",
    "cpl_lambda",
)


def _check_engine(engine: str, key: str = "config: sampling.engine") -> None:
    """sampling.engine=vllm is refused with the first thing missing: a CUDA GPU, the vllm package, then one
    process (the colocated engine samples for one training process; data-parallel runs use the HF engine).
    `key`: how the message names the setting (`rlhflab best-of-n --engine`)."""
    if engine != "vllm":
        return
    import importlib.util
    import os

    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"{key}=vllm needs a CUDA GPU (vLLM does not sample on CPU) and none is visible; use {key.split()[-1]}=hf"
        )
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            f"{key}=vllm needs the vllm package: pip install 'rlhflab[vllm]'; or use {key.split()[-1]}=hf"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"{key}=vllm runs one vLLM engine beside one training process; this run has "
            f"{os.environ['WORLD_SIZE']} processes (WORLD_SIZE): launch one process, or use {key.split()[-1]}=hf"
        )


def _hf_engine_only(sampling: SamplingSection, stage: str) -> None:
    """Refuse sampling.engine=vllm in a stage whose sampling has no vLLM path (it would sample with HF)."""
    _require(
        sampling.engine == "hf",
        "sampling.engine",
        f"is vllm, but {stage} samples with the HF engine only (vLLM samples for ppo, rloo, grpo and "
        "online-dpo); use sampling.engine=hf",
    )


# SamplingSection's vLLM settings, so a value set with sampling.engine=hf is refused.
_VLLM_DEFAULTS = {"vllm_gpu_memory_utilization": 0.3, "vllm_sleep": True}


@dataclass
class SamplingSection:
    max_new_tokens: int = 24
    """Longest response sampled."""
    temperature: float = 1.0
    """Softmax temperature; 1.0 samples the policy as it is (what PPO's maths assumes)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables."""
    engine: Literal["hf", "vllm"] = "hf"
    """The rollout engine: hf, transformers' generate on the training model (KV-cached, batched; every
    device); vllm, vLLM colocated with training on the same GPU (`rlhflab.rollout.vllm_engine`: a CUDA GPU,
    `pip install 'rlhflab[vllm]'`, one process; ppo, rloo, grpo, online-dpo), the policy's weights (or its LoRA
    adapter) pushed to it before each sampling."""
    vllm_gpu_memory_utilization: float = _VLLM_DEFAULTS["vllm_gpu_memory_utilization"]
    """engine=vllm: the fraction of the GPU's memory vLLM takes for its weights and KV cache, in (0, 1]; the
    training models, gradients and optimizer state need the rest."""
    vllm_sleep: bool = _VLLM_DEFAULTS["vllm_sleep"]
    """engine=vllm: put vLLM to sleep between samplings (its weights offloaded to CPU memory, its KV cache
    freed), so training gets that GPU memory back; false keeps it resident (faster, more memory)."""

    def __post_init__(self):
        _check_engine(self.engine)
        _require(
            self.max_new_tokens >= 1, "sampling.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}"
        )
        _require(self.temperature > 0, "sampling.temperature", f"must be > 0, got {self.temperature}")
        _require(self.top_k >= 0, "sampling.top_k", f"must be >= 0, got {self.top_k}")
        _require(0 < self.top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        u = self.vllm_gpu_memory_utilization
        _require(0 < u <= 1, "sampling.vllm_gpu_memory_utilization", f"must be in (0, 1], got {u}")
        for name, default in _VLLM_DEFAULTS.items():
            _require(
                self.engine == "vllm" or getattr(self, name) == default,
                f"sampling.{name}",
                "is set but sampling.engine=hf does not use it; remove it or set sampling.engine=vllm",
            )
        # vLLM returns log-probs either raw (log softmax(logits), before temperature) or processed (after
        # temperature AND top-k / top-p); the trainer needs log softmax(logits / T) before the truncation, which
        # one of the two gives unless both a temperature and a truncation are set.
        _require(
            self.engine == "hf" or self.temperature == 1.0 or (self.top_k == 0 and self.top_p == 1.0),
            "sampling.engine",
            "is vllm, which cannot report the log-probs of softmax(logits / temperature) before top-k / top-p when both "
            "a temperature other than 1 and top_k / top_p are set; drop one of them, or use sampling.engine=hf",
        )


# algo.uwo_coef's default, so a value set with another reward_combine than ensemble_uwo is refused.
_UWO_COEF_DEFAULT = 0.5


@dataclass
class RewardSourcesSection:
    """The reward source(s) an on-policy method optimizes (PPO, RLOO, GRPO): shared fields and checks."""

    reward_model: list[str] = field(default_factory=list)
    """Reward sources (`rlhflab.rewards.load_reward` specs): reward model directories (runs/rm/final, with
    options such as runs/rm/final:head=safety) and rules (rule:length); several are combined by
    reward_combine. On the command line: SPEC,SPEC (a spec holding ',' needs the YAML list form)."""
    reward_weights: list[float] = field(default_factory=list)
    """weighted_sum: one weight per reward source; empty means all 1."""
    reward_combine: Literal[
        "weighted_sum", "llama2_gate", "ensemble_mean", "ensemble_min", "ensemble_uwo"
    ] = "weighted_sum"
    """How several reward sources combine: weighted_sum (reward_weights); or llama2_gate, exactly two sources
    (helpfulness, safety; e.g. 'RM:head=helpfulness,RM:head=safety'): R = WHITEN(LOGIT(R_s if the prompt is
    flagged or sigmoid(R_s) < safety_threshold else R_h)), Llama 2 Sec. 3.2.3; or an ensemble of two or more
    reward models (Coste et al. 2024): ensemble_mean, their mean; ensemble_min, the worst case (WCO);
    ensemble_uwo, the mean minus uwo_coef x their variance (UWO). Give ensemble members on one scale, e.g.
    'RM1:normalize=true,RM2:normalize=true' (a Bradley-Terry reward's offset is arbitrary)."""
    uwo_coef: float = _UWO_COEF_DEFAULT
    """ensemble_uwo: lambda, the weight of the variance over the members subtracted from their mean (>= 0; 0 is
    ensemble_mean)."""
    safety_threshold: float = 0.15
    """llama2_gate: below this sigmoid(safety score), the safety reward scores the response (Llama 2: 0.15)."""
    unsafe_prompt_pattern: str = ""
    """llama2_gate: a regular expression; prompts it matches (case-insensitive) are flagged as risky (Llama 2's
    IS_SAFETY) and always scored by the safety reward. Empty: only the threshold gates."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of responses cut off without EOS (0 disables)."""

    def __post_init__(self):
        _require(
            0 < self.safety_threshold < 1,
            "algo.safety_threshold",
            f"must be in (0, 1) (a probability), got {self.safety_threshold}",
        )
        _require(
            not self.reward_weights or len(self.reward_weights) == len(self.reward_model),
            "algo.reward_weights",
            f"has {len(self.reward_weights)} weights for {len(self.reward_model)} reward sources; give one per "
            "source in algo.reward_model",
        )
        _require(
            self.reward_combine == "weighted_sum" or not self.reward_weights,
            "algo.reward_weights",
            f"apply to algo.reward_combine=weighted_sum only, not {self.reward_combine}; leave them empty",
        )
        _require(
            self.reward_combine != "llama2_gate" or len(self.reward_model) in (0, 2),
            "algo.reward_model",
            f"must name exactly two sources (helpfulness, safety) for algo.reward_combine=llama2_gate, got "
            f"{len(self.reward_model)}",
        )
        ensemble = self.reward_combine.startswith("ensemble_")
        _require(
            not ensemble or len(self.reward_model) != 1,
            "algo.reward_model",
            f"names one source, but algo.reward_combine={self.reward_combine} aggregates an ensemble; name two or "
            "more reward models (SPEC,SPEC,...) or use reward_combine=weighted_sum",
        )
        _require(
            math.isfinite(self.uwo_coef) and self.uwo_coef >= 0,
            "algo.uwo_coef",
            f"must be a finite number >= 0, got {self.uwo_coef}",
        )
        _require(
            self.reward_combine == "ensemble_uwo" or self.uwo_coef == _UWO_COEF_DEFAULT,
            "algo.uwo_coef",
            f"applies to algo.reward_combine=ensemble_uwo only, not {self.reward_combine}; set that or leave "
            "uwo_coef out",
        )
        _require(
            self.reward_combine == "llama2_gate" or not self.unsafe_prompt_pattern,
            "algo.unsafe_prompt_pattern",
            "applies to algo.reward_combine=llama2_gate only; set that or leave the pattern empty",
        )
        try:
            re.compile(self.unsafe_prompt_pattern)
        except re.error as e:
            raise ConfigError(
                f"config: algo.unsafe_prompt_pattern {self.unsafe_prompt_pattern!r} is not a valid "
                f"regular expression ({e})"
            ) from None


@dataclass
class PPOAlgo(RewardSourcesSection):
    rollout_batch_size: int = 64
    """Prompts sampled per PPO iteration."""
    iterations: int = 100
    """PPO iterations (sample, score, optimize)."""
    ppo_epochs: int = 4
    """Optimization passes over each rollout batch."""
    minibatch_size: int = 16
    """Rollouts per PPO gradient step; must divide rollout_batch_size."""
    kl_coef: float = 0.05
    """Initial beta of the per-token KL penalty to the reference policy."""
    adaptive_kl: bool = False
    """Adapt beta toward target_kl (Ziegler et al. 2019)."""
    target_kl: float = 6.0
    """Target sequence KL (nats) for the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator used in the reward."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip_eps: float = 0.2
    """PPO ratio clip."""
    value_clip_eps: float = 0.2
    """Value clip; 0 disables."""
    value_coef: float = 0.1
    """Weight of the value loss (shared-backbone critic)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""
    whiten_advantages: bool = True
    """Normalize advantages per batch."""
    separate_critic: bool = False
    """A separate value network instead of a value head on the policy."""
    tis_cap: float = 0.0
    """Truncated importance sampling (Yao et al. 2025): weight each token's advantage by min(pi_trainer /
    pi_sampler, tis_cap), the sampler's and the trainer's log-probs of the sampled tokens; 0 = off. It corrects
    a sampler that is not the trainer (another engine, other precision); with the HF engine in float32 the
    weights are 1 up to rounding (the log's kl/sampler_mismatch_* say how far they are)."""

    def __post_init__(self):
        super().__post_init__()
        _require(self.tis_cap >= 0, "algo.tis_cap", f"must be >= 0 (0 turns it off), got {self.tis_cap}")
        _require(self.rollout_batch_size >= 1, "algo.rollout_batch_size", "must be >= 1")
        _require(self.minibatch_size >= 1, "algo.minibatch_size", "must be >= 1")
        _require(
            self.rollout_batch_size % self.minibatch_size == 0,
            "algo.minibatch_size",
            f"({self.minibatch_size}) must divide algo.rollout_batch_size ({self.rollout_batch_size}); "
            f"try {_divisor_hint(self.rollout_batch_size, self.minibatch_size)}",
        )
        _require(self.kl_coef >= 0, "algo.kl_coef", f"must be >= 0, got {self.kl_coef}")
        _require(0 < self.gamma <= 1, "algo.gamma", f"must be in (0, 1], got {self.gamma}")
        _require(0 <= self.lam <= 1, "algo.lam", f"must be in [0, 1], got {self.lam}")
        _require(self.clip_eps > 0, "algo.clip_eps", f"must be > 0, got {self.clip_eps}")
        _require(self.target_kl > 0, "algo.target_kl", f"must be > 0, got {self.target_kl}")


@dataclass
class CriticFreeAlgo(RewardSourcesSection):
    """What RLOO and GRPO share: k samples per prompt, a baseline from the group instead of a critic, PPO's
    clipped update, and a KL term to the reference."""

    prompts_per_iteration: int = 16
    """Prompts sampled per iteration; each gets num_generations responses."""
    num_generations: int = 4
    """Responses sampled per prompt (the group whose scores make the baseline); >= 2."""
    iterations: int = 100
    """Iterations (sample, score, optimize)."""
    ppo_epochs: int = 1
    """Optimization passes over each batch of responses. With 1 epoch and one minibatch the update is plain
    REINFORCE with the group baseline (the ratio is exactly 1, so the clip never acts)."""
    minibatch_size: int = 0
    """Responses per gradient step; must divide prompts_per_iteration x num_generations. 0: all of them."""
    clip_eps: float = 0.2
    """PPO ratio clip, lower side (1 - clip_eps)."""
    clip_eps_high: float = 0.0
    """Upper side of the clip (1 + clip_eps_high); 0 means clip_eps. DAPO's clip-higher uses 0.28."""
    kl_coef: float = 0.05
    """beta of the KL term to the reference; 0 drops the term (and the reference forward)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator (Schulman 2020). In the reward, k1 gives an unbiased gradient of the KL; in the
    loss, k2 does and k3 (GRPO's choice) does not (docs/losses.md, the KL table)."""
    kl_placement: Literal["reward", "loss"] = "reward"
    """reward: the sequence's summed KL estimate times beta is subtracted from its score before the baseline
    (RLOO, Ahmadian et al. 2024); loss: beta times the KL estimate is added to the loss (GRPO)."""
    loss_aggregation: Literal["sequence_mean", "token_mean", "sequence_sum", "constant"] = "sequence_mean"
    """How token losses make the batch loss: sequence_mean (each response weighs the same; GRPO), token_mean
    (every token weighs the same; DAPO), sequence_sum (log-prob of the whole response; REINFORCE/RLOO),
    constant (each response's sum over sampling.max_new_tokens; Dr. GRPO, Liu et al. 2025)."""
    dynamic_sampling: bool = False
    """Leave out of the loss the groups whose k scores are all equal (no learning signal), as DAPO does
    (Yu et al. 2025); their count is logged."""

    def __post_init__(self):
        super().__post_init__()
        _require(self.prompts_per_iteration >= 1, "algo.prompts_per_iteration", "must be >= 1")
        _require(
            self.num_generations >= 2,
            "algo.num_generations",
            f"must be >= 2 (the baseline comes from the other samples of the prompt), got {self.num_generations}",
        )
        _require(self.iterations >= 1, "algo.iterations", f"must be >= 1, got {self.iterations}")
        _require(self.ppo_epochs >= 1, "algo.ppo_epochs", f"must be >= 1, got {self.ppo_epochs}")
        _require(self.minibatch_size >= 0, "algo.minibatch_size", f"must be >= 0, got {self.minibatch_size}")
        n = self.prompts_per_iteration * self.num_generations
        _require(
            not self.minibatch_size or n % self.minibatch_size == 0,
            "algo.minibatch_size",
            f"({self.minibatch_size}) must divide algo.prompts_per_iteration x algo.num_generations ({n}); "
            f"try {_divisor_hint(n, self.minibatch_size or 1)}",
        )
        _require(self.clip_eps > 0, "algo.clip_eps", f"must be > 0, got {self.clip_eps}")
        _require(self.clip_eps_high >= 0, "algo.clip_eps_high", f"must be >= 0, got {self.clip_eps_high}")
        _require(self.kl_coef >= 0, "algo.kl_coef", f"must be >= 0, got {self.kl_coef}")

    @property
    def rollouts_per_iteration(self) -> int:
        return self.prompts_per_iteration * self.num_generations


@dataclass
class RLOOAlgo(CriticFreeAlgo):
    """REINFORCE with a baseline that needs no critic (Ahmadian et al. 2024, "Back to Basics")."""

    baseline: Literal["leave_one_out", "batch_mean", "greedy"] = "leave_one_out"
    """leave_one_out: the mean score of the prompt's other k-1 samples (RLOO, Kool et al. 2019); batch_mean:
    the mean score of the whole batch (REINFORCE with a baseline, Williams 1992); greedy: the score of the
    greedy response to the prompt, one extra greedy sample per prompt (ReMax, Li et al. 2023)."""
    loss_aggregation: Literal["sequence_mean", "token_mean", "sequence_sum", "constant"] = "sequence_sum"


@dataclass
class GRPOAlgo(CriticFreeAlgo):
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath) with the known fixes as options."""

    scale_rewards: bool = True
    """Divide each group's centred scores by the group's std (GRPO); false keeps them only centred (Dr. GRPO,
    Liu et al. 2025), which does not up-weight prompts whose samples all score about the same."""
    kl_coef: float = 0.04
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_placement: Literal["reward", "loss"] = "loss"


@dataclass
class LabAnnotatorsSection:
    """The lab's simulated annotators as a feedback source (algo.feedback=lab): `rlhflab.lab.annotators`'
    model of an annotator, judging by the lab task's hidden gold reward. The defaults are the ones that
    label the lab's own preference data."""

    temperature: float = 0.1
    """Bradley-Terry temperature in gold units: P(first) = sigmoid(perceived gap / temperature); 0 always
    picks the higher perceived gold."""
    noise: float = 0.0
    """Probability that a label is flipped (the annotator answers at random with twice this probability);
    in [0, 0.5], 0.5 is a coin flip."""
    n_annotators: int = 1
    """Size of the pool; each pair is judged by one annotator drawn at random."""
    length_bias: float = 0.0
    """The pool's shared length bias, in gold units per 10 words added to the gold they perceive: > 0 prefers
    longer answers whatever their gold (verbosity bias)."""
    bias_spread: float = 0.0
    """Std of each annotator's own length bias around length_bias, in gold units per 10 words (disagreement
    between them)."""
    tie_margin: float = 0.0
    """Perceived gold gaps below this are ties (label 0.5: the pair is dropped, unless keep_ties)."""
    keep_ties: bool = False
    """Answer a tie with a random order instead of 0.5 (Llama 2's "negligibly better / unsure")."""

    def __post_init__(self):
        _require(
            self.temperature >= 0, "algo.annotators.temperature", f"must be >= 0, got {self.temperature}"
        )
        _require(
            0 <= self.noise <= 0.5,
            "algo.annotators.noise",
            f"must be in [0, 0.5] (0.5 = coin flip), got {self.noise}",
        )
        _require(
            self.n_annotators >= 1, "algo.annotators.n_annotators", f"must be >= 1, got {self.n_annotators}"
        )
        _require(
            math.isfinite(self.length_bias),
            "algo.annotators.length_bias",
            f"must be a finite number, got {self.length_bias}",
        )
        _require(
            self.bias_spread >= 0, "algo.annotators.bias_spread", f"must be >= 0, got {self.bias_spread}"
        )
        _require(self.tie_margin >= 0, "algo.annotators.tie_margin", f"must be >= 0, got {self.tie_margin}")


@dataclass
class PairFeedbackSection(RewardSourcesSection):
    """Who judges pairs of the policy's own samples (online-dpo, iterative-dpo): a reward, a general preference
    model or the lab's annotators, with their checks. The reward-source keys name the reward that answers when
    feedback=reward."""

    feedback: Literal["reward", "lab", "preference_model", "human", "judge"] = "reward"
    """Who judges the pairs. reward: the reward source(s) of algo.reward_model, by feedback_mode; lab: the
    simulated annotators of the model's lab task (algo.annotators; the command line builds them, in Python
    pass `feedback=` to the stage's `train`); preference_model: the general preference model of
    algo.preference_model (from `rlhflab pm`), by feedback_mode; human: people, in the labelling app's project
    algo.label_project of the database algo.label_db (`rlhflab label serve`), waiting up to
    algo.feedback_timeout seconds per batch; judge: the causal LM of algo.judge_model asked which response is
    better, in both orders (`rlhflab judge`), by feedback_mode (RLAIF)."""
    feedback_mode: Literal["argmax", "bradley_terry"] = "argmax"
    """feedback=reward: argmax prefers the higher score (equal scores are a tie, dropped); bradley_terry
    draws the label with P(first) = sigmoid(score_first - score_second). feedback=preference_model: argmax
    prefers the side with P(first) above or below 1/2 (within 1e-6 of 1/2: a tie); bradley_terry draws the
    label with the model's own P(first)."""
    preference_model: str = ""
    """feedback=preference_model: the general preference model's directory (`rlhflab pm`'s RUN/final, or RUN)."""
    judge_model: str = ""
    """feedback=judge: a local HF causal LM directory (an instruct model reads the question best)."""
    label_db: str = ""
    """feedback=human: the labelling app's database URL (sqlite:///labels.db, postgresql://...)."""
    label_project: str = ""
    """feedback=human: the project whose annotators label the pairs (`rlhflab label add-project`)."""
    label_overlap: int = 1
    """feedback=human: annotators per pair; the label is their majority (a split vote is a tie)."""
    feedback_timeout: float = 60.0
    """Seconds to wait for a source that answers later (human labellers) before its unanswered pairs are
    dropped; sources that answer at once never wait."""
    annotators: LabAnnotatorsSection = field(default_factory=LabAnnotatorsSection)
    """feedback=lab: how the simulated annotators behave."""

    def __post_init__(self):
        RewardSourcesSection.__post_init__(self)
        _require(
            self.feedback_timeout >= 0, "algo.feedback_timeout", f"must be >= 0, got {self.feedback_timeout}"
        )
        _require(
            self.missing_eos_penalty == 0,
            "algo.missing_eos_penalty",
            "is not used by online-dpo or iterative-dpo (the feedback compares the two responses' texts); "
            "leave it 0",
        )
        _require(self.label_overlap >= 1, "algo.label_overlap", f"must be >= 1, got {self.label_overlap}")
        human = (self.label_db, self.label_project, self.label_overlap) != ("", "", 1)
        if self.feedback == "human":
            for key in ("label_db", "label_project"):
                _require(bool(getattr(self, key)), f"algo.{key}", "is required with algo.feedback=human")
        else:
            _require(
                not human,
                "algo.label_db",
                f"and the other label_* keys apply to algo.feedback=human, not {self.feedback}; remove them",
            )
        if self.feedback != "reward":  # a key acts or is refused: the reward keys judge nothing here
            who = {
                "lab": "the lab's simulated annotators",
                "preference_model": "a general preference model",
                "human": "people in the labelling app",
                "judge": "an LM judge",
            }
            for f in dataclasses.fields(RewardSourcesSection):
                _require(
                    getattr(self, f.name) == _field_default(f),
                    f"algo.{f.name}",
                    f"is set but algo.feedback={self.feedback} asks {who[self.feedback]}, not a reward; remove "
                    "it or use algo.feedback=reward",
                )
        if self.feedback in ("lab", "human"):
            _require(
                self.feedback_mode == "argmax",
                "algo.feedback_mode",
                "applies to algo.feedback=reward or preference_model; the lab's annotators are set in "
                "algo.annotators, and people answer as they do",
            )
        else:
            _require(
                self.annotators == LabAnnotatorsSection(),
                "algo.annotators",
                "applies to algo.feedback=lab only; set algo.feedback=lab or leave the annotators' defaults",
            )
        _require(
            (self.feedback == "judge") == bool(self.judge_model),
            "algo.judge_model",
            "is required with algo.feedback=judge"
            if self.feedback == "judge"
            else f"is set but algo.feedback={self.feedback} asks no judge; set algo.feedback=judge or remove it",
        )
        _require(
            self.feedback == "preference_model" or not self.preference_model,
            "algo.preference_model",
            f"is set but algo.feedback={self.feedback} does not ask a preference model; set "
            "algo.feedback=preference_model or remove it",
        )


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _require_paired_loss(loss: str, stage: str) -> None:
    paired = [n for n, r in PREFERENCE_LOSS_TABLE.items() if r.data == "pairwise"]
    _require(
        PREFERENCE_LOSS_TABLE[loss].data == "pairwise",
        "algo.loss",
        f"is {loss}, a loss of unpaired (prompt, completion, label) data; {stage} compares two "
        f"samples of each prompt and takes a paired loss: {', '.join(paired)}",
    )


@dataclass
class OnlineDPOAlgo(PairFeedbackSection, PreferenceLossSection):
    """Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"): each step
    samples two responses per prompt from the current policy, asks a feedback source which is better and
    takes one step of a paired preference loss on the answered pairs."""

    prompts_per_step: int = 16
    """Prompts per step; each gets two responses from the current policy, one pair to judge."""
    iterations: int = 100
    """Steps (sample, ask, one optimizer step)."""
    micro_batch_size: int = 0
    """Pairs per forward/backward pass (gradient accumulation within the step); 0: all of the step's pairs."""

    def __post_init__(self):
        PreferenceLossSection.__post_init__(self)
        PairFeedbackSection.__post_init__(self)
        _require_paired_loss(self.loss, "online-dpo")
        _require(
            self.prompts_per_step >= 1, "algo.prompts_per_step", f"must be >= 1, got {self.prompts_per_step}"
        )
        _require(self.iterations >= 1, "algo.iterations", f"must be >= 1, got {self.iterations}")
        _require(
            self.micro_batch_size >= 0, "algo.micro_batch_size", f"must be >= 0, got {self.micro_batch_size}"
        )


@dataclass
class IterativeDPOAlgo(PairFeedbackSection, PreferenceLossSection):
    """Iterative DPO: rounds of sampling pairs from the current policy, labelling them and an offline DPO
    run on the round's pairs (Xu et al. 2023, "Some things are more CRINGE than others"; Llama 3); sDPO
    (Kim et al. 2024): one offline pairs file in stages, each against the previous stage's model; or DNO
    (Rosset et al. 2024, "Direct Nash Optimization", Algorithm 2): K samples per prompt, a tournament of the
    feedback source, the best against the worst by win rate."""

    mode: Literal["iterative", "sdpo", "dno"] = "iterative"
    """iterative: each round samples algo.prompts_per_round pairs from the current policy and asks the
    feedback source (data.train_path: prompts); sdpo: data.pairs_path is split into algo.rounds stages in file
    order (order it easy to hard, as sDPO does), no sampling and no feedback; dno: each round samples
    algo.samples_per_prompt responses per prompt, asks the feedback source about every pair of them and trains
    on (highest, lowest win rate) pairs whose win-rate margin is at least algo.min_win_rate_margin."""
    rounds: int = 3
    """Rounds (sDPO: stages); each ends with a saved model, the unit of --resume."""
    prompts_per_round: int = 64
    """mode=iterative and dno: prompts per round; each gets two responses (dno: algo.samples_per_prompt) from
    the round's starting policy."""
    reference: Literal["round_start", "initial"] = "round_start"
    """The DPO reference of each round: round_start, the round's starting policy (Xu et al. 2023, Llama 3;
    sDPO's previous stage; DNO's pi_t); initial, model.name_or_path every round (not with mode=sdpo or dno)."""
    samples_per_prompt: int = 2
    """mode=dno: K, the responses sampled per prompt; the feedback source is asked about all K(K-1)/2 pairs of
    them (the label budget grows with K^2). >= 2; the DNO paper samples 5."""
    min_win_rate_margin: float = 0.0
    """mode=dno: keep a prompt's (best, worst) pair only when the best response's win rate exceeds the worst's by
    at least this much (DNO's large-margin filter), in [0, 1); 0 keeps every pair with a positive margin."""

    def __post_init__(self):
        PreferenceLossSection.__post_init__(self)
        PairFeedbackSection.__post_init__(self)
        _require_paired_loss(self.loss, "iterative-dpo")
        _require(self.rounds >= 1, "algo.rounds", f"must be >= 1, got {self.rounds}")
        _require(
            self.prompts_per_round >= 1,
            "algo.prompts_per_round",
            f"must be >= 1, got {self.prompts_per_round}",
        )
        _require(
            PREFERENCE_LOSS_TABLE[self.loss].reference or self.reference == "round_start",
            "algo.reference",
            f"is set but algo.loss={self.loss} uses no reference model; leave it round_start",
        )
        self._check_dno()
        if self.mode == "sdpo":  # a key acts or is refused: sDPO samples nothing and asks no one
            _require(
                self.reference == "round_start",
                "algo.reference",
                "is initial, but sDPO's reference is the previous stage's model (round_start); use "
                "algo.mode=iterative for a fixed reference",
            )
            own = {f.name for f in dataclasses.fields(PairFeedbackSection)} | {"prompts_per_round"}
            for f in dataclasses.fields(self):
                if f.name in own:
                    _require(
                        getattr(self, f.name) == _field_default(f),
                        f"algo.{f.name}",
                        "is set but algo.mode=sdpo trains on data.pairs_path (no sampling, no feedback); "
                        "remove it or use algo.mode=iterative",
                    )

    def _check_dno(self) -> None:
        if self.mode != "dno":  # a key acts or is refused
            for key in ("samples_per_prompt", "min_win_rate_margin"):
                _require(
                    getattr(self, key) == type(self).__dataclass_fields__[key].default,
                    f"algo.{key}",
                    f"is set but applies to algo.mode=dno only (this run is algo.mode={self.mode}); remove it "
                    "or set algo.mode=dno",
                )
            return
        _require(
            self.samples_per_prompt >= 2,
            "algo.samples_per_prompt",
            f"must be >= 2 (a tournament needs two responses per prompt), got {self.samples_per_prompt}",
        )
        _require(
            0.0 <= self.min_win_rate_margin < 1.0,
            "algo.min_win_rate_margin",
            f"must be in [0, 1) (win rates lie in [0, 1]), got {self.min_win_rate_margin}",
        )
        _require(
            self.reference == "round_start",
            "algo.reference",
            "is initial, but DNO's reference is the round's starting policy (Rosset et al. 2024, Algorithm 2); "
            "leave it round_start or use algo.mode=iterative",
        )


@dataclass
class RejectionSamplingAlgo(RewardSourcesSection):
    """Sample, filter by a reward, fine-tune (`rlhflab rs`): rejection-sampling fine-tuning (Llama 2, Touvron et
    al. 2023, Sec. 3.2.3; expert iteration is one round, AlpacaFarm, Dubois et al. 2023) or ReST (Gulcehre et
    al. 2023, Algorithm 1: Grow steps, each followed by Improve steps at rising reward thresholds)."""

    mode: Literal["rejection_sampling", "rest"] = "rejection_sampling"
    """rejection_sampling: algo.rounds rounds, each fine-tuning on the best of algo.samples_per_prompt samples per
    prompt; rest: algo.grow_steps Grow steps, each followed by one Improve step per threshold of algo.thresholds."""
    samples_per_prompt: int = 4
    """K, the responses sampled per prompt (each round; rest: each Grow step), all scored by the reward."""
    prompts_per_round: int = 0
    """Prompts per round (rest: per Grow step), in a seeded order that cycles through data.train_path; 0: every
    prompt every round (Llama 2)."""
    rounds: int = 3
    """mode=rejection_sampling: rounds (sample, keep the best, fine-tune); 1 is expert iteration."""
    pool: bool = False
    """mode=rejection_sampling: keep, per prompt, the best sample of all rounds so far instead of this round's
    (Llama 2 from RLHF V4 on: top samples of all prior iterations)."""
    finetune_from: Literal["round_start", "initial"] = "round_start"
    """mode=rejection_sampling: the weights each round's fine-tuning starts from: round_start, the model that
    sampled the round (the previous round's model); initial, model.name_or_path every round (ReST-EM, Singh et al.
    2023; use it with pool=true so later rounds keep the earlier rounds' data)."""
    grow_steps: int = 1
    """mode=rest: G, Grow steps (sample and score from the current policy), each followed by its Improve steps."""
    thresholds: list[float] = field(default_factory=list)
    """mode=rest: tau_1 < tau_2 < ..., one Improve step each; an Improve step fine-tunes (from the previous
    one's model) on the Grow set's samples whose reward is >= its threshold."""
    threshold_kind: Literal["reward", "quantile"] = "reward"
    """mode=rest: reward, thresholds in the reward's own units (ReST's, on its [0, 1]-scaled rewards); quantile,
    each threshold is the q-quantile of the Grow set's rewards, q in [0, 1) (0.75 keeps the top quarter)."""
    eval_prompts: int = 32
    """After each fine-tuning (and once for the initial model), one sample on each of the first N prompts of
    data.train_path (all of them when the file holds fewer), at one seed for the whole run, scored by the reward:
    reward/eval_mean, the model's own reward on a fixed set. Its reward calls are not counted in reward/queries.
    0 disables."""

    def __post_init__(self):
        super().__post_init__()
        _require(
            self.samples_per_prompt >= 1,
            "algo.samples_per_prompt",
            f"must be >= 1 (responses sampled per prompt), got {self.samples_per_prompt}",
        )
        _require(
            self.prompts_per_round >= 0,
            "algo.prompts_per_round",
            f"must be >= 0 (0: every prompt), got {self.prompts_per_round}",
        )
        _require(self.eval_prompts >= 0, "algo.eval_prompts", f"must be >= 0, got {self.eval_prompts}")
        own = {
            "rejection_sampling": ("rounds", "pool", "finetune_from"),
            "rest": ("grow_steps", "thresholds", "threshold_kind"),
        }
        other = "rest" if self.mode == "rejection_sampling" else "rejection_sampling"
        for key in own[other]:  # a key acts or is refused
            _require(
                getattr(self, key) == _field_default(type(self).__dataclass_fields__[key]),
                f"algo.{key}",
                f"is set but applies to algo.mode={other} only (this run is algo.mode={self.mode}); remove it "
                f"or set algo.mode={other}",
            )
        if self.mode == "rejection_sampling":
            _require(self.rounds >= 1, "algo.rounds", f"must be >= 1, got {self.rounds}")
            return
        _require(self.grow_steps >= 1, "algo.grow_steps", f"must be >= 1, got {self.grow_steps}")
        _require(
            bool(self.thresholds),
            "algo.thresholds",
            "is empty but algo.mode=rest runs one Improve step per threshold; give rising thresholds, e.g. "
            "algo.thresholds=0.5,0.75,0.9 with algo.threshold_kind=quantile",
        )
        _require(
            all(a < b for a, b in zip(self.thresholds, self.thresholds[1:])),
            "algo.thresholds",
            f"must rise strictly (tau_1 < tau_2 < ...; ReST's Improve steps filter ever harder), got "
            f"{self.thresholds}",
        )
        _require(
            self.threshold_kind == "reward" or all(0 <= q < 1 for q in self.thresholds),
            "algo.thresholds",
            f"are quantiles with algo.threshold_kind=quantile and must lie in [0, 1), got {self.thresholds}",
        )


# --------------------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------------------


@dataclass
class SFTConfig:
    """Supervised fine-tuning on demonstrations (prompt masked out of the loss)."""

    seed: int = 0
    """Seeds Python, NumPy and torch, and the data order."""
    model: ModelSection = field(default_factory=ModelSection)
    data: SFTDataSection = field(default_factory=SFTDataSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=3e-4, batch_size=16, epochs=2))
    logging: EvalLoggingSection = field(default_factory=EvalLoggingSection)
    algo: SFTAlgo = field(default_factory=SFTAlgo)


@dataclass
class RewardDataSection(DataSection):
    step_separator: str = "\n"
    """algo.loss=step only: the text after each step (TRL's step_separator). Training reads each step's verdict at
    the last token of step + separator; scoring a new response splits it at this text into its steps, so it
    must be how the policy separates steps (e.g. ' , ' for the lab's arith task)."""


@dataclass
class RewardConfig:
    """Reward model training from pairwise comparisons, K-wise rankings, labelled responses or labelled steps."""

    seed: int = 0
    """Seeds Python, NumPy and torch, and the data order."""
    model: ModelSection = field(default_factory=ModelSection)
    data: RewardDataSection = field(default_factory=RewardDataSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-4, batch_size=16, epochs=1))
    logging: EvalLoggingSection = field(default_factory=EvalLoggingSection)
    algo: RewardAlgo = field(default_factory=RewardAlgo)

    def __post_init__(self):
        _require(
            not (self.data.train_path and all(h.data for h in self.algo.head_specs())),
            "data.train_path",
            "is set but every head in algo.heads names its own data file, so it would be ignored; leave it "
            "empty or drop a head's file",
        )
        _require(
            self.data.step_separator == "\n" or self.algo.loss == "step",
            "data.step_separator",
            f"is read only by algo.loss=step (a process reward model), got algo.loss={self.algo.loss}; drop it",
        )
        _require(
            bool(self.data.step_separator) or self.algo.loss != "step",
            "data.step_separator",
            "is empty: scoring splits a response into its steps at this text, so it needs some; use e.g. '\\n' "
            "or ' , '",
        )


@dataclass
class PMConfig:
    """A general (pairwise) preference model from pairwise comparisons: no score per response."""

    seed: int = 0
    """Seeds Python, NumPy and torch, and the data order."""
    model: ModelSection = field(default_factory=ModelSection)
    data: PMDataSection = field(default_factory=PMDataSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-4, batch_size=16, epochs=1))
    logging: EvalLoggingSection = field(default_factory=EvalLoggingSection)
    algo: PMAlgo = field(default_factory=PMAlgo)

    def __post_init__(self):
        _require(
            not self.model.lora.enabled or self.model.lora.merge,
            "model.lora.merge",
            "must be true with LoRA for a preference model: its settings live in the merged model's config.json; "
            "set model.lora.merge=true",
        )


@dataclass
class DPOConfig:
    """Direct preference optimization and its family, from pairwise preferences."""

    seed: int = 0
    """Seeds Python, NumPy and torch, and the data order."""
    model: ModelSection = field(default_factory=ModelSection)
    ref_model: str = ""
    """Reference policy directory; empty means the initial policy (model.name_or_path)."""
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=5e-5, batch_size=16, epochs=1))
    logging: EvalLoggingSection = field(default_factory=EvalLoggingSection)
    algo: DPOAlgo = field(default_factory=DPOAlgo)

    def __post_init__(self):
        if not PREFERENCE_LOSS_TABLE[self.algo.loss].reference:  # a key acts or is refused
            _require(
                not self.ref_model,
                "ref_model",
                f"is set but algo.loss={self.algo.loss} uses no reference model; leave it empty",
            )
            _require(
                self.algo.precompute_ref_logps,
                "algo.precompute_ref_logps",
                f"is false but algo.loss={self.algo.loss} uses no reference model; leave it true",
            )


@dataclass
class OnPolicyConfig:
    """The sections every on-policy stage has (PPO, RLOO, GRPO); each subclass sets its algo section."""

    seed: int = 0
    """Seeds Python, NumPy and torch, and the data order."""
    model: ModelSection = field(default_factory=ModelSection)
    ref_model: str = ""
    """Reference policy directory; empty means the initial policy (model.name_or_path)."""
    data: PromptDataSection = field(default_factory=PromptDataSection)
    optim: AdamWSection = field(default_factory=lambda: AdamWSection(lr=1e-5))
    logging: LoggingSection = field(default_factory=LoggingSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)


@dataclass
class PPOConfig(OnPolicyConfig):
    """PPO against one or more reward models with a KL penalty to a frozen reference (InstructGPT)."""

    algo: PPOAlgo = field(default_factory=PPOAlgo)


@dataclass
class RLOOConfig(OnPolicyConfig):
    """REINFORCE leave-one-out (or another critic-free baseline) against reward sources, KL to a reference."""

    algo: RLOOAlgo = field(default_factory=RLOOAlgo)


@dataclass
class GRPOConfig(OnPolicyConfig):
    """Group relative policy optimization against reward sources, KL to a reference."""

    algo: GRPOAlgo = field(default_factory=GRPOAlgo)


@dataclass
class OnlineDPOConfig:
    """Online DPO / IPO: pairs sampled from the current policy, judged by a feedback source, a paired
    preference loss against a reference."""

    seed: int = 0
    """Seeds Python, NumPy and torch, the prompt order, the sampling and the feedback source."""
    model: ModelSection = field(default_factory=ModelSection)
    ref_model: str = ""
    """Reference policy directory; empty means the initial policy (model.name_or_path)."""
    data: PromptDataSection = field(default_factory=PromptDataSection)
    optim: AdamWSection = field(default_factory=lambda: AdamWSection(lr=5e-5))
    logging: LoggingSection = field(default_factory=LoggingSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    algo: OnlineDPOAlgo = field(default_factory=OnlineDPOAlgo)

    def __post_init__(self):
        _require(
            PREFERENCE_LOSS_TABLE[self.algo.loss].reference or not self.ref_model,
            "ref_model",
            f"is set but algo.loss={self.algo.loss} uses no reference model; leave it empty",
        )


@dataclass
class IterativeDataSection(PromptDataSection):
    """Prompts (mode=iterative, dno) or preference pairs (mode=sdpo), and the lengths of the DPO rounds."""

    pairs_path: str = ""
    """mode=sdpo: the preference pairs (prompt, chosen, rejected) split into the rounds. Empty with a lab
    model: the lab task's pairs."""
    max_length: int = 128
    """Maximum tokens of prompt + response in the DPO rounds."""

    def __post_init__(self):
        super().__post_init__()
        _require(
            self.max_prompt_length < self.max_length,
            "data.max_prompt_length",
            f"({self.max_prompt_length}) must be smaller than data.max_length ({self.max_length})",
        )


@dataclass
class IterativeDPOConfig:
    """Iterative DPO / sDPO / DNO: rounds of offline DPO (`rlhflab dpo`), each from the previous round's model."""

    seed: int = 0
    """Seeds Python, NumPy and torch, the prompt order, the sampling, the feedback source and each DPO round."""
    model: ModelSection = field(default_factory=ModelSection)
    data: IterativeDataSection = field(default_factory=IterativeDataSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=5e-5, batch_size=16, epochs=1))
    """Each round's DPO run (its epochs over the round's pairs, batch size, learning rate and schedule)."""
    logging: LoggingSection = field(default_factory=lambda: LoggingSection(snapshot_every=1))
    """snapshot_every counts rounds; checkpoints are the rounds' models (save_every stays 0)."""
    sampling: SamplingSection = field(default_factory=SamplingSection)
    algo: IterativeDPOAlgo = field(default_factory=IterativeDPOAlgo)

    def __post_init__(self):
        _hf_engine_only(self.sampling, "iterative-dpo")
        _require(
            self.logging.save_every == 0 and self.logging.keep_checkpoints == 2,
            "logging.save_every",
            "is not used by iterative-dpo: --resume restarts at the first round without a saved model "
            "(RUN/round-R/dpo/final); leave logging.save_every and logging.keep_checkpoints at their defaults",
        )
        sdpo = self.algo.mode == "sdpo"
        _require(
            not (sdpo and self.data.train_path),
            "data.train_path",
            "is set but algo.mode=sdpo reads its pairs from data.pairs_path; move the file there",
        )
        _require(
            sdpo or not self.data.pairs_path,
            "data.pairs_path",
            f"is set but algo.mode={self.algo.mode} samples its pairs from prompts (data.train_path); remove it "
            "or use algo.mode=sdpo",
        )
        _require(
            not sdpo or self.sampling == SamplingSection(),
            "sampling",
            "is set but algo.mode=sdpo samples nothing; leave the sampling section at its defaults",
        )


@dataclass
class RSDataSection(PromptDataSection):
    """Prompts the policy answers, and the length of the fine-tuning rows made from its kept answers."""

    max_length: int = 128
    """Maximum tokens of prompt + response in each fine-tuning (SFT) run."""

    def __post_init__(self):
        super().__post_init__()
        _require(
            self.max_prompt_length < self.max_length,
            "data.max_prompt_length",
            f"({self.max_prompt_length}) must be smaller than data.max_length ({self.max_length})",
        )


@dataclass
class RejectionSamplingConfig:
    """Rejection-sampling fine-tuning / expert iteration / ReST: rounds of sampling from the current policy,
    keeping what the reward ranks best, and SFT (`rlhflab sft`) on the kept samples."""

    seed: int = 0
    """Seeds Python, NumPy and torch, the prompt order, the sampling and each fine-tuning run."""
    model: ModelSection = field(default_factory=ModelSection)
    data: RSDataSection = field(default_factory=RSDataSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-4, batch_size=16, epochs=1))
    """Each fine-tuning run (an SFT run: its epochs over the kept samples, batch size, learning rate)."""
    logging: LoggingSection = field(default_factory=lambda: LoggingSection(snapshot_every=1))
    """snapshot_every counts fine-tuning runs (rounds; rest: Improve steps); save_every stays 0."""
    sampling: SamplingSection = field(default_factory=SamplingSection)
    algo: RejectionSamplingAlgo = field(default_factory=RejectionSamplingAlgo)

    def __post_init__(self):
        _hf_engine_only(self.sampling, "rs")
        _require(
            self.logging.save_every == 0 and self.logging.keep_checkpoints == 2,
            "logging.save_every",
            "is not used by rs: --resume restarts at the first fine-tuning without a saved model "
            "(RUN/round-R/sft/final); leave logging.save_every and logging.keep_checkpoints at their defaults",
        )


# --------------------------------------------------------------------------------------------------------
# Quark and reward conditioning (`rlhflab quark`): a reward-sorted pool, one control token per quantile
# --------------------------------------------------------------------------------------------------------


@dataclass
class QuarkAlgo(RewardSourcesSection):
    """Quark (Lu et al. 2022, "Quark: Controllable Text Generation with Reinforced Unlearning"): each iteration
    adds samples of the current policy, conditioned on the best reward token, to a pool scored by the reward;
    sorts the whole pool into n_quantiles reward quantiles, each with its own control token in front of the
    prompt; and trains on (token + prompt, response) with the NLL + kl_coef KL(policy || initial model) -
    entropy_coef entropy. n_quantiles=2, iterations=1, kl_coef=0, entropy_coef=0 is AlpacaFarm's binary reward
    conditioning (Dubois et al. 2023): a good / bad token split at the median of the initial model's samples."""

    n_quantiles: int = 5
    """K, the reward quantiles (and new control tokens); the top one is the token to sample with. 5 is the
    Quark code's default; 2 is AlpacaFarm's good / bad reward conditioning."""
    iterations: int = 4
    """Iterations of sample -> quantize -> train. The first samples the initial model without a token (or reads
    algo.init_data_path); later ones sample the policy conditioned on the best token."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt each iteration, all scored by the reward and added to the pool."""
    prompts_per_iteration: int = 0
    """Prompts sampled per iteration, in a seeded order that cycles through data.train_path; 0: every prompt every
    iteration."""
    pool_init: Literal["samples", "data"] = "samples"
    """What starts the pool: samples, the initial model's responses to the first iteration's prompts (Quark);
    data, the demonstrations of algo.init_data_path, scored by the reward."""
    init_data_path: str = ""
    """pool_init=data: an SFT data file (prompt + completion records, any format of `rlhflab.data`) whose
    completions, scored by the reward, are the first pool."""
    kl_coef: float = 0.05
    """beta: weight of the per-token KL(policy || initial model) over the initial model's vocabulary, the
    initial model seeing the prompt without a token (0: no reference model is loaded). Quark code's default."""
    entropy_coef: float = 0.06
    """alpha: weight of the policy's per-token entropy, subtracted from the loss. Quark code's default."""
    eval_prompts: int = 32
    """After each iteration (and once for the initial model), one sample on each of the first N prompts of
    data.train_path, conditioned on the best token, at one seed for the whole run, scored by the reward:
    reward/eval_mean. Its reward calls are not counted in reward/queries. 0 disables."""

    def __post_init__(self):
        super().__post_init__()
        _require(
            self.n_quantiles >= 2,
            "algo.n_quantiles",
            f"must be >= 2 (one token per reward quantile; a single one conditions on nothing, that is "
            f"`rlhflab sft`), got {self.n_quantiles}",
        )
        _require(self.iterations >= 1, "algo.iterations", f"must be >= 1, got {self.iterations}")
        _require(
            self.samples_per_prompt >= 1,
            "algo.samples_per_prompt",
            f"must be >= 1 (responses sampled per prompt), got {self.samples_per_prompt}",
        )
        _require(
            self.prompts_per_iteration >= 0,
            "algo.prompts_per_iteration",
            f"must be >= 0 (0: every prompt), got {self.prompts_per_iteration}",
        )
        _require(self.kl_coef >= 0, "algo.kl_coef", f"must be >= 0 (0 turns the KL off), got {self.kl_coef}")
        _require(
            self.entropy_coef >= 0,
            "algo.entropy_coef",
            f"must be >= 0 (0 turns the entropy bonus off), got {self.entropy_coef}",
        )
        _require(self.eval_prompts >= 0, "algo.eval_prompts", f"must be >= 0, got {self.eval_prompts}")
        _require(
            self.pool_init == "samples" or bool(self.init_data_path),
            "algo.init_data_path",
            "is empty but algo.pool_init=data starts the pool from it; give an SFT data file (prompt, "
            "completion) or set algo.pool_init=samples",
        )
        _require(
            self.pool_init == "data" or not self.init_data_path,
            "algo.init_data_path",
            "is set but algo.pool_init=samples starts the pool from the initial model's samples; set "
            "algo.pool_init=data or remove it",
        )


@dataclass
class QuarkOptimSection(AdamWSection):
    """AdamW over the whole run (one optimizer and schedule across iterations), and the steps of each
    iteration."""

    batch_size: int = 16
    """Pool examples per optimizer step (across gradient accumulation)."""
    micro_batch_size: int = 0
    """Examples per forward/backward pass; 0 means the whole batch. Must divide batch_size."""
    steps_per_iteration: int = 0
    """Optimizer steps each iteration trains, on batches of the whole pool in a seeded order that reshuffles at
    each pass over it; 0: optim.epochs passes over the pool as it stands (it grows, so later iterations train
    longer)."""
    epochs: int = 1
    """steps_per_iteration=0: passes over the pool in each iteration."""

    def __post_init__(self):
        super().__post_init__()
        _require(self.batch_size >= 1, "optim.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(
            self.micro_batch_size >= 0, "optim.micro_batch_size", f"must be >= 0, got {self.micro_batch_size}"
        )
        if self.micro_batch_size:
            _require(
                self.batch_size % self.micro_batch_size == 0,
                "optim.micro_batch_size",
                f"({self.micro_batch_size}) must divide optim.batch_size ({self.batch_size}); "
                f"try {_divisor_hint(self.batch_size, self.micro_batch_size)}",
            )
        _require(
            self.steps_per_iteration >= 0,
            "optim.steps_per_iteration",
            f"must be >= 0 (0: optim.epochs passes over the pool), got {self.steps_per_iteration}",
        )
        _require(self.epochs >= 1, "optim.epochs", f"must be >= 1, got {self.epochs}")
        _require(
            self.steps_per_iteration == 0 or self.epochs == 1,
            "optim.epochs",
            f"is set but optim.steps_per_iteration={self.steps_per_iteration} fixes the steps of each "
            "iteration; remove optim.epochs or set optim.steps_per_iteration=0",
        )


@dataclass
class QuarkConfig:
    """Quark / reward conditioning: a growing pool of scored samples, sorted into reward quantiles that become
    control tokens in front of the prompt, and a conditional LM loss with KL and entropy terms."""

    seed: int = 0
    """Seeds Python, NumPy and torch, the new token embeddings, the prompt and batch orders and the sampling."""
    model: ModelSection = field(default_factory=ModelSection)
    data: RSDataSection = field(default_factory=RSDataSection)
    """data.max_prompt_length counts the control token: a prompt keeps its last max_prompt_length - 1 tokens."""
    optim: QuarkOptimSection = field(default_factory=lambda: QuarkOptimSection(lr=1e-4))
    logging: LoggingSection = field(default_factory=LoggingSection)
    """snapshot_every counts iterations (RUN/snapshots/step-N, N the optimizer step); save_every counts
    optimizer steps, and every iteration ends with a checkpoint whatever it says."""
    sampling: SamplingSection = field(default_factory=SamplingSection)
    algo: QuarkAlgo = field(default_factory=QuarkAlgo)

    def __post_init__(self):
        _hf_engine_only(self.sampling, "quark")
        _require(
            not self.model.lora.enabled,
            "model.lora.enabled",
            "is not supported by quark: the new control tokens' embeddings must train and LoRA freezes the "
            "embeddings; set model.lora.enabled=false",
        )
        _require(
            self.data.max_prompt_length >= 2,
            "data.max_prompt_length",
            f"must be >= 2 for quark (the control token takes one position), got {self.data.max_prompt_length}",
        )


# --------------------------------------------------------------------------------------------------------
# Constitutional AI (`rlhflab cai sl|rl`): runs that write their own data, then call other stages
# --------------------------------------------------------------------------------------------------------


@dataclass
class CAILoggingSection:
    """Where a Constitutional AI run goes. The stages it calls (sft; rm, ppo) log as their own sections say."""

    output_dir: str = ""
    """Run directory: config.yaml, metrics.jsonl, the data the run writes (revisions.jsonl and sft.jsonl; pairs.jsonl)
    and one subdirectory per stage it calls (RUN/sft; RUN/rm and RUN/ppo). Empty: runs/cai-sl-TIME (cai-rl)."""
    progress: bool = True
    """Show a live progress bar with ETA while sampling, critiquing, revising and judging."""


@dataclass
class CAISLAlgo:
    """SL-CAI's critique -> revision loop (Bai et al. 2022, "Constitutional AI", Sec. 3.1)."""

    revisions: int = 1
    """Critique-revision rounds per response, each critiquing the previous round's revision under a principle
    drawn afresh (the paper chains several revisions per response)."""
    max_prompts: int = 0
    """Use only the first N prompts of data.train_path; 0: all of them."""
    critique_max_new_tokens: int = 32
    """Longest critique sampled."""
    revision_max_new_tokens: int = 0
    """Longest revision sampled; 0: sampling.max_new_tokens (a revision replaces a response)."""
    critic_temperature: float = 1.0
    """Softmax temperature of the critiques and revisions (sampling.temperature is the responses'; top_k and
    top_p apply to both). Below 1 a revision keeps more of what the critique does not object to."""
    batch_size: int = 64
    """Sequences per generation call (responses, critiques, revisions)."""

    def __post_init__(self):
        _require(self.revisions >= 1, "algo.revisions", f"must be >= 1, got {self.revisions}")
        _require(
            self.critic_temperature > 0,
            "algo.critic_temperature",
            f"must be > 0, got {self.critic_temperature}",
        )
        _require(self.max_prompts >= 0, "algo.max_prompts", f"must be >= 0 (0: all), got {self.max_prompts}")
        _require(
            self.critique_max_new_tokens >= 1,
            "algo.critique_max_new_tokens",
            f"must be >= 1, got {self.critique_max_new_tokens}",
        )
        _require(
            self.revision_max_new_tokens >= 0,
            "algo.revision_max_new_tokens",
            f"must be >= 0 (0: sampling.max_new_tokens), got {self.revision_max_new_tokens}",
        )
        _require(self.batch_size >= 1, "algo.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class CAIRLAlgo:
    """RL-CAI's AI feedback (Bai et al. 2022, Sec. 4.1): two samples per prompt, compared under a principle."""

    max_prompts: int = 0
    """Label pairs for only the first N prompts of data.train_path; 0: all of them (PPO still samples from
    every prompt of the file)."""
    batch_size: int = 64
    """Sequences per generation call, and comparison questions per forward pass of the feedback model."""

    def __post_init__(self):
        _require(self.max_prompts >= 0, "algo.max_prompts", f"must be >= 0 (0: all), got {self.max_prompts}")
        _require(self.batch_size >= 1, "algo.batch_size", f"must be >= 1, got {self.batch_size}")


def _set_by_cai(cfg: Any, section: str, keys: dict[str, str]) -> None:
    """Refuse the keys of `cfg`'s nested stage config `section` that the CAI run sets itself (a key acts or is
    refused): `keys` maps each dotted key to where the run takes its value from."""
    fresh = _field_default(next(f for f in dataclasses.fields(cfg) if f.name == section))
    for dotted, source in keys.items():
        value, default = getattr(cfg, section), fresh
        for part in dotted.split("."):
            value, default = getattr(value, part), getattr(default, part)
        _require(value == default, f"{section}.{dotted}", f"is set by the CAI run ({source}); remove it")


def _stage_model_default() -> ModelSection:
    # Empty: the CAI run names the model (the policy, unless the section's own doc says otherwise).
    return ModelSection(name_or_path="")


@dataclass
class CAISLConfig:
    """SL-CAI (Bai et al. 2022, Sec. 3): the policy answers prompts, critiques and revises its answers under
    principles drawn at random from a constitution, and is fine-tuned (the `sft` stage) on the final revisions."""

    seed: int = 0
    """Seeds the sampling, the principle drawn for each critique and the SFT run."""
    model: ModelSection = field(default_factory=ModelSection)
    """The policy (a helpful model) whose responses are revised; also the critic unless critic_model is set."""
    critic_model: str = ""
    """The model that writes the critiques and revisions: a local HF causal LM directory (or lab:TASK on the
    command line). Empty: the policy itself, as in the paper."""
    principles: str = ""
    """The constitution: a YAML principles file (templates, answers, principles), e.g. configs/constitution.yaml."""
    data: PromptDataSection = field(default_factory=PromptDataSection)
    """The prompts (data.max_prompt_length cuts the prompts the policy answers, not the critique questions)."""
    sampling: SamplingSection = field(default_factory=SamplingSection)
    """How responses, critiques and revisions are sampled (max_new_tokens: the responses'; the algo section
    sets the critiques' and revisions' lengths)."""
    algo: CAISLAlgo = field(default_factory=CAISLAlgo)
    logging: CAILoggingSection = field(default_factory=CAILoggingSection)
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(model=_stage_model_default()))
    """The SFT run on (prompt, final revision) pairs, in RUN/sft (`rlhflab config show sft` documents its keys).
    sft.model.name_or_path is the model fine-tuned: empty, the policy; the paper fine-tunes the pretrained LM
    (its directory, or lab:TASK). The run sets sft.seed, sft.data.train_path and sft.logging.output_dir."""

    def __post_init__(self):
        _hf_engine_only(self.sampling, "cai-sl")
        _set_by_cai(
            self,
            "sft",
            {"seed": "seed", "data.train_path": "RUN/sft.jsonl", "logging.output_dir": "RUN/sft"},
        )


@dataclass
class CAIRLConfig:
    """RL-CAI (Bai et al. 2022, Sec. 4): a feedback model says which of two policy samples is better under a
    principle drawn at random; a reward model (`rm`) learns those AI labels and PPO (`ppo`) optimizes against it."""

    seed: int = 0
    """Seeds the sampling, the principle drawn for each pair and the RM and PPO runs."""
    model: ModelSection = field(default_factory=ModelSection)
    """The policy (the SL-CAI model in the paper): it writes the pairs and is where PPO starts."""
    feedback_model: str = ""
    """The model asked which response is better (a local HF causal LM directory, or lab:TASK on the command
    line). Empty: the policy. The paper asks a pretrained LM."""
    helpful_pairs: str = ""
    """Pairwise data labelled for helpfulness by people (prompt, chosen, rejected), mixed into the reward model's
    data with the AI's harmlessness labels (RUN/rm_pairs.jsonl), as the paper's preference model learns
    helpfulness from human and harmlessness from AI feedback (Sec. 4.1). Empty: the AI labels alone."""
    principles: str = ""
    """The constitution: a YAML principles file (templates, answers, principles), e.g. configs/constitution.yaml."""
    data: PromptDataSection = field(default_factory=PromptDataSection)
    """The prompts: the pairs are sampled from them, and PPO trains on them."""
    sampling: SamplingSection = field(default_factory=SamplingSection)
    """How the two responses per prompt are sampled."""
    algo: CAIRLAlgo = field(default_factory=CAIRLAlgo)
    logging: CAILoggingSection = field(default_factory=CAILoggingSection)
    rm: RewardConfig = field(default_factory=lambda: RewardConfig(model=_stage_model_default()))
    """The reward model on the AI-labelled pairs, in RUN/rm (`rlhflab config show rm`). rm.model.name_or_path:
    where it starts; empty, the policy. The run sets rm.seed, rm.data.train_path and rm.logging.output_dir."""
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(model=_stage_model_default()))
    """PPO from the policy against the reward model, in RUN/ppo (`rlhflab config show ppo`). The run sets
    ppo.seed, ppo.model.name_or_path (the policy), ppo.data.train_path (data.train_path), ppo.algo.reward_model
    (RUN/rm/final) and ppo.logging.output_dir."""

    def __post_init__(self):
        _hf_engine_only(self.sampling, "cai-rl's response sampling (its ppo section may use vllm)")
        _set_by_cai(
            self,
            "rm",
            {
                "seed": "seed",
                "data.train_path": "RUN/pairs.jsonl, or RUN/rm_pairs.jsonl with helpful_pairs",
                "logging.output_dir": "RUN/rm",
                "algo.heads": "one head on RUN/pairs.jsonl",
            },
        )
        _require(
            self.rm.algo.loss == "bradley_terry" and self.rm.algo.margin == "none",
            "rm.algo.loss",
            f"must be bradley_terry with rm.algo.margin=none (the AI labels are pairs without margins), got "
            f"{self.rm.algo.loss} with margin {self.rm.algo.margin}",
        )
        _set_by_cai(
            self,
            "ppo",
            {
                "seed": "seed",
                "model.name_or_path": "model.name_or_path",
                "data.train_path": "data.train_path",
                "algo.reward_model": "RUN/rm/final",
                "logging.output_dir": "RUN/ppo",
            },
        )


# The one explicit table of stages; the CLI and `config show` read it.
STAGE_CONFIGS: dict[str, type] = {
    "sft": SFTConfig,
    "rm": RewardConfig,
    "pm": PMConfig,
    "dpo": DPOConfig,
    "ppo": PPOConfig,
    "rloo": RLOOConfig,
    "grpo": GRPOConfig,
    "online-dpo": OnlineDPOConfig,
    "iterative-dpo": IterativeDPOConfig,
    "rs": RejectionSamplingConfig,
    "quark": QuarkConfig,
    "cai-sl": CAISLConfig,
    "cai-rl": CAIRLConfig,
}


# --------------------------------------------------------------------------------------------------------
# Building, overriding, printing
# --------------------------------------------------------------------------------------------------------


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config: {key} {message}")


def _divisor_hint(total: int, near: int) -> str:
    divisors = [d for d in range(1, total + 1) if total % d == 0]
    best = min(divisors, key=lambda d: abs(d - near))
    return f"{best} (divisors of {total}: {', '.join(map(str, divisors))})"


def build_config(cls: type, data: dict[str, Any] | None, *, where: str = "") -> Any:
    """Build dataclass `cls` from a (nested) dict, checking every key and type.

    Raises:
        ConfigError: unknown key (with the closest known key), wrong type, or a failed validation.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{where}{key}"
        if key not in known:
            raise ConfigError(f"config: unknown key '{dotted}'{_suggest(key, known, where)}")
        f = known[key]
        if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
            # A partial section keeps the stage's own defaults (SFT's lr is not DPO's lr) for the keys
            # it does not mention.
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                value = deep_merge(config_to_dict(default), value)
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _suggest(key: str, known: dict[str, Any], where: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{where}{close[0]}'?"
    return f"; known keys here: {', '.join(where + k for k in known)}"


def _coerce(tp: Any, value: Any, dotted: str) -> Any:
    """Check `value` against the annotation `tp`, converting the few safe cases (int -> float, '1e-5')."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config: '{dotted}' is a section; give it as a mapping of keys, got {value!r}")
        return build_config(tp, value, where=f"{dotted}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, dotted)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"config: '{dotted}' must be one of {choices}, got {value!r}{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config: '{dotted}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{dotted}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(
                f"config: '{dotted}' must be a mapping (e.g. {dotted}.KEY=VALUE), got {value!r}"
            )
        return {_coerce(args[0], k, dotted): _coerce(args[1], v, f"{dotted}.{k}") for k, v in value.items()}
    if origin is list:
        if isinstance(value, str):  # the command line's short form: ITEM,ITEM (parsed here, once)
            items = [s.strip() for s in value.split(",") if s.strip()]
            value = [args[0].from_short(s) for s in items] if hasattr(args[0], "from_short") else items
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # one number on the command line (reward_weights=1)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config: '{dotted}' must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"config: '{dotted}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config: '{dotted}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # PyYAML reads "1e-5" (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(f"config: '{dotted}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config: '{dotted}' must be a string, got {value!r}")
    if tp is Any:
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {dotted}")  # a bug in rlhflab, not user input


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["optim.lr=1e-5", "data.max_length=256"] into a nested dict (values parsed as YAML scalars)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config: override '{item}' must look like key=value, e.g. optim.lr=1e-5")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"config: override '{item}' has an empty key part")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config: override '{item}' conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: file '{p}' does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config: '{p}' is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config: '{p}' must hold a mapping of sections at top level, got {type(data).__name__}"
        )
    return data


def load_config(stage: str, config_file: str | Path | None = None, overrides: list[str] | None = None):
    """Resolve the config of `stage`: defaults <- YAML file <- dotted overrides."""
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"config: unknown stage '{stage}'; known stages: {', '.join(STAGE_CONFIGS)}")
    data: dict[str, Any] = read_yaml(config_file) if config_file else {}
    if "stage" in data:
        declared = data.pop("stage")
        if declared != stage:
            raise ConfigError(f"config: '{config_file}' is for stage '{declared}', not '{stage}'")
    data = deep_merge(data, parse_overrides(overrides or []))
    return build_config(STAGE_CONFIGS[stage], data)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict (tuples as lists) that `build_config` accepts back."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def config_to_yaml(cfg: Any, *, comments: bool = True) -> str:
    """YAML text of a config, each field preceded by its documentation when `comments` is set."""
    lines: list[str] = []
    _emit(cfg, lines, indent=0, comments=comments)
    return "\n".join(lines) + "\n"


def _emit(obj: Any, lines: list[str], indent: int, comments: bool) -> None:
    docs = field_docs(type(obj)) if comments else {}
    pad = "  " * indent
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if comments and f.name in docs:
            for doc_line in docs[f.name].splitlines():
                lines.append(f"{pad}# {doc_line.strip()}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            _emit(value, lines, indent + 1, comments)
        else:
            plain = value
            if isinstance(value, (list, tuple)):
                plain = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
            dumped = yaml.safe_dump(plain, default_flow_style=True, width=1000).strip()
            if dumped.endswith("\n..."):
                dumped = dumped[: -len("\n...")]
            dumped = dumped.removesuffix("...").strip()
            lines.append(f"{pad}{f.name}: {dumped}")


def field_docs(cls: type) -> dict[str, str]:
    """Field documentation: the string literal that follows each field in the class body."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # a subclass's docs win
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs
