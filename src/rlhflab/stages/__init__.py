"""Training stages: one readable loop per method."""

# Stage name -> (module with `train(cfg, *, resume, overwrite)`, one-line help). The command line and the pipeline read it;
# importing this package imports no stage (so `rlhflab --help` answers at once).
STAGES: dict[str, tuple[str, str]] = {
    "sft": ("rlhflab.stages.sft", "supervised fine-tuning on demonstrations (prompt masked out of the loss)"),
    "rm": (
        "rlhflab.stages.reward",
        "reward model from pairwise comparisons (with margins) or K-wise rankings",
    ),
    "pm": (
        "rlhflab.stages.preference_model",
        "general preference model: P(first preferred) from the prompt and both responses, no score per response",
    ),
    "ppo": ("rlhflab.stages.ppo", "PPO against reward model(s) with a KL penalty to a frozen reference"),
    "rloo": (
        "rlhflab.stages.critic_free",
        "RLOO / REINFORCE / ReMax: k samples per prompt, a baseline from the others, no critic",
    ),
    "grpo": (
        "rlhflab.stages.critic_free",
        "GRPO (and Dr. GRPO, DAPO options): group-normalized advantages, no critic",
    ),
    "dpo": (
        "rlhflab.stages.dpo",
        "DPO and its family (IPO, hinge, cDPO, robust, KTO, BCO, ORPO, SimPO, CPL) from preferences",
    ),
    "online-dpo": (
        "rlhflab.stages.online_dpo",
        "online DPO / IPO: pairs sampled from the current policy, judged by a reward, a preference model or the "
        "lab's annotators",
    ),
    "iterative-dpo": (
        "rlhflab.stages.iterative_dpo",
        "iterative DPO / sDPO / DNO: rounds of offline DPO on the current policy's labelled pairs (or data stages)",
    ),
    "rs": (
        "rlhflab.stages.rejection_sampling",
        "rejection-sampling fine-tuning / expert iteration / ReST: sample K, keep what the reward ranks best, SFT",
    ),
    "quark": (
        "rlhflab.stages.quark",
        "Quark / reward conditioning: a growing scored pool, one control token per reward quantile, conditional NLL",
    ),
}

# The stages (and the `best-of-n` command, each process sampling its share of the prompts) that run data-parallel
# across the processes `accelerate launch` / `torchrun` start (`rlhflab.stages.parallel`); any other command
# refuses to start in more than one process. rs and iterative-dpo share out each round's sampling (and
# iterative-dpo its feedback) by prompts and run their fine-tunings as data-parallel SFT / DPO runs; redteam
# shares out each call's test cases in whole batches and trains its RL red LM as a data-parallel RLOO run.
DATA_PARALLEL_STAGES = (
    "sft", "rm", "dpo", "ppo", "rloo", "grpo", "online-dpo", "best-of-n", "rs", "iterative-dpo", "pm", "quark",
    "cai", "run", "redteam",
)  # fmt: skip
# The stages that also run with the model sharded by FSDP (`rlhflab.stages.sharding`; the on-policy ones'
# processes decode in step, transformers' `synced_gpus`) and under DeepSpeed's ZeRO (`rlhflab.stages.deepspeed_zero`).
FSDP_STAGES = ("sft", "rm", "dpo", "ppo", "rloo", "grpo", "online-dpo", "pm")
DEEPSPEED_STAGES = ("sft", "rm", "dpo", "ppo", "rloo", "grpo", "online-dpo")
