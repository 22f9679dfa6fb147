"""Experiments: one module per claim of the literature, run on the lab as a user would run the methods.

`rlhflab experiment NAME` trains what the claim compares, over several seeds, and writes DIR/result.json
({experiment, claim, source, verdict, rule, table, plots, runtime_s, seeds, command}) and DIR/report.html.
The verdict comes from a rule written in the module, fixed before any run: "not reproduced", with the
numbers, is an honest result.
"""

# Experiment name -> (module with `run(seeds, output_dir, ...)` and CLAIM, one-line help). Importing this
# package imports no experiment, so `rlhflab --help` answers at once.
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "online-vs-offline": (
        "rlhflab.experiments.online_vs_offline",
        "offline DPO vs online DPO vs iterative DPO at the same label budget (Guo et al. 2024; Xu et al. 2023)",
    ),
    "rlaif": (
        "rlhflab.experiments.rlaif",
        "an LM judge's labels vs simulated human labels for the reward model, PPO and DPO (Lee et al. 2023); "
        "needs --judge DIR",
    ),
    "sparrow": (
        "rlhflab.experiments.sparrow",
        "best-of-N re-ranked by rule classifiers vs by the preference RM alone, on the harm task "
        "(Glaese et al. 2022)",
    ),
    "llama2-safety": (
        "rlhflab.experiments.llama2_safety",
        "a safety reward head with Llama 2's gate vs one reward model on the same labels, PPO on the harm "
        "task (Touvron et al. 2023)",
    ),
    "alpacafarm": (
        "rlhflab.experiments.alpacafarm",
        "AlpacaFarm's table: SFT, Binary FeedME, reward conditioning, Quark, expert iteration, best-of-n, PPO, "
        "DPO and more, by win rate against a fixed reference (Dubois et al. 2023)",
    ),
    "annotator-noise": (
        "rlhflab.experiments.annotator_noise",
        "PPO against RMs from noiseless and 25%-noisy annotators: does only the noisy one over-optimize "
        "(Dubois et al. 2023)",
    ),
    "best-of-n-kl": (
        "rlhflab.experiments.best_of_n_kl",
        "the KL of best-of-n to its base policy, measured, against the formula log n - (n-1)/n (Stiennon et al. "
        "2020; Beirami et al. 2024)",
    ),
    "overoptimization-laws": (
        "rlhflab.experiments.overoptimization_laws",
        "gold and proxy reward against sqrt(KL) for best-of-n and PPO, with reward models of three sizes, and "
        "the fitted functional forms (Gao et al. 2022)",
    ),
    "margin": (
        "rlhflab.experiments.margin",
        "reward models with no, small and large Llama 2 margins: accuracy by rating bucket (Touvron et al. 2023)",
    ),
    "rm-init": (
        "rlhflab.experiments.rm_init",
        "a reward model initialized from the SFT model vs from the base model vs from scratch (Ouyang et al. "
        "2022; Touvron et al. 2023)",
    ),
    "rm-ensembles": (
        "rlhflab.experiments.rm_ensembles",
        "reward-model ensembles (mean, worst case, uncertainty-weighted) against over-optimization with 25% "
        "label noise (Coste et al. 2024)",
    ),
    "prm-vs-orm": (
        "rlhflab.experiments.prm_vs_orm",
        "process vs outcome reward models vs majority voting for selecting arithmetic solutions (Lightman et al. "
        "2023; Uesato et al. 2022)",
    ),
    "length": (
        "rlhflab.experiments.length",
        "how much of PPO's, DPO's and best-of-n's gold gain is length, with annotators who prefer longer answers "
        "and without (Singhal et al. 2023; Dubois et al. 2024)",
    ),
    "mode-collapse": (
        "rlhflab.experiments.mode_collapse",
        "diversity (distinct-n, entropy, self-BLEU) and calibration (ECE of the answer probabilities on arith) "
        "before and after PPO, DPO, best-of-n and GRPO (Kirk et al. 2024; OpenAI 2023; Kadavath et al. 2022)",
    ),
    "pluralism": (
        "rlhflab.experiments.pluralism",
        "two annotator groups with different gold: one Bradley-Terry RM vs a distributional RM vs a group-"
        "conditioned RM; each group's gold under best-of-n (Siththaranjan et al. 2023; Chakraborty et al. 2024)",
    ),
    "trex": (
        "rlhflab.experiments.trex",
        "T-REX on Pendulum: a reward from ranked PPO checkpoints' demonstrations, PPO on it vs the best "
        "demonstration's true return (Brown et al. 2019)",
    ),
    "christiano": (
        "rlhflab.experiments.christiano",
        "Christiano et al. on Pendulum: PPO on a reward learned from segment preferences while it trains, by label "
        "budget, disagreement vs random queries, vs PPO on the true reward (Christiano et al. 2017)",
    ),
    "drex": (
        "rlhflab.experiments.drex",
        "D-REX on Pendulum: rankings from a behaviour-cloned policy with injected noise, T-REX and PPO on them "
        "vs the demonstrations' true return (Brown et al. 2019)",
    ),
    "cpl-control": (
        "rlhflab.experiments.cpl_control",
        "CPL on Pendulum: a policy from regret-based segment preferences with no reward and no RL vs a reward "
        "model + PPO on the same labelled pairs (Hejna et al. 2023)",
    ),
}
