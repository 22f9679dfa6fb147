"""`rlhflab experiment online-vs-offline`: the verdict rule, matched-KL interpolation and the result files."""

from __future__ import annotations

import json
import time

import pytest

from rlhflab.cli import main
from rlhflab.experiments import online_vs_offline as E
from rlhflab.experiments.result import write_result

TINY = [
    "data.n_sft=64",
    "data.n_pairs=16",
    "data.n_prompts=16",
    "data.n_heldout=16",
    "eval.prompts=4",
    "eval.samples=2",
    "sft.model.name_or_path=lab:sentiment:tiny",
    "sft.optim.max_steps=2",
    "dpo.optim.max_steps=2",
    "dpo.optim.batch_size=8",
    "online_dpo.algo.iterations=2",
    "online_dpo.algo.prompts_per_step=4",
    "iterative_dpo.algo.rounds=2",
    "iterative_dpo.algo.prompts_per_round=4",
    "iterative_dpo.optim.batch_size=2",
]


def test_gold_at_kl_interpolates_where_the_curve_first_reaches_the_kl():
    curve = [
        {"step": 0, "kl/ref": 0.0, "gold/mean": 0.1},
        {"step": 5, "kl/ref": 2.0, "gold/mean": 0.5},
        {"step": 10, "kl/ref": 6.0, "gold/mean": 0.3},
        {"step": 15, "kl/ref": 4.0, "gold/mean": 0.9},
    ]
    # KL 1 lies halfway between the first two snapshots: 0.1 + (0.5 - 0.1) * 1/2 = 0.3.
    assert E.gold_at_kl(curve, 1.0) == pytest.approx(0.3)
    # KL 5 is first reached between steps 5 and 10: 0.5 + (0.3 - 0.5) * (5 - 2)/(6 - 2) = 0.35 (the later
    # crossing on the way back, 6 -> 4, is not used).
    assert E.gold_at_kl(curve, 5.0) == pytest.approx(0.35)
    assert E.gold_at_kl(curve, 0.0) == pytest.approx(0.1)
    assert E.gold_at_kl(curve, 7.0) is None and E.gold_at_kl([], 1.0) is None


def _report(golds: dict[str, tuple[float, float]], kl: float = 1.0) -> dict:
    policies = {
        m: {
            "gold_reward_mean": g,
            "gold_reward_ci95": ci,
            "kl_to_sft": kl,
            "win_rate_vs_sft": 0.5,
            "label_queries": 100,
        }
        for m, (g, ci) in golds.items()
    }
    curve = [{"step": 0, "kl/ref": 0.0, "gold/mean": 0.0}, {"step": 1, "kl/ref": 2.0, "gold/mean": 0.4}]
    dpo_curve = [{"step": 0, "kl/ref": 0.0, "gold/mean": 0.0}, {"step": 1, "kl/ref": 1.0, "gold/mean": 0.3}]
    curves = {m: curve for m in golds if m not in ("sft", "dpo")}
    return {"policies": policies, "curves": {**curves, "dpo": dpo_curve}}


def _rows(per_seed: list[dict[str, tuple[float, float]]]) -> list[dict]:
    rows = [r for s, golds in enumerate(per_seed) for r in E.seed_rows(s, _report(golds))]
    return rows + E.summary_rows(rows)


def test_seed_rows_and_the_verdict_rule():
    base = {"sft": (0.1, 0.05), "dpo": (0.4, 0.05)}
    both_beat = {**base, "online_dpo": (0.6, 0.05), "iterative_dpo": (0.55, 0.05)}
    rows = _rows([both_beat, both_beat])
    online = next(r for r in rows if r["method"] == "online_dpo" and r["seed"] == 0)
    assert online["gold_minus_dpo"] == pytest.approx(0.2) and online["beats_dpo"] is True
    # Matched KL: DPO's curve ends at KL 1.0, halfway up the online curve (0 -> 0.4 at KL 2): gold 0.2; DPO's
    # own entry is its curve's end.
    assert online["curve_gold_at_dpo_kl"] == pytest.approx(0.2) and online["sft_gold"] == 0.1
    dpo = next(r for r in rows if r["method"] == "dpo" and r["seed"] == 0)
    assert dpo["curve_gold_at_dpo_kl"] == pytest.approx(0.3)
    summary = next(r for r in rows if r["method"] == "iterative_dpo" and r["seed"] == "mean")
    assert summary["gold"] == pytest.approx(0.55) and summary["beats_dpo"] == "2/2"
    assert E.decide(rows) == "reproduced"
    # Intervals overlap (0.47 - 0.05 < 0.4 + 0.05) on one seed for one method: partly.
    close = {**both_beat, "iterative_dpo": (0.47, 0.05)}
    assert E.decide(_rows([both_beat, close])) == "partly reproduced"
    # Ahead on the mean but never beyond the intervals: not reproduced.
    ahead = {**base, "online_dpo": (0.45, 0.05), "iterative_dpo": (0.44, 0.05)}
    assert E.decide(_rows([ahead, ahead])) == "not reproduced"
    # Beats DPO on one seed but behind on the mean over seeds, and the other method always behind.
    behind = {**base, "online_dpo": (0.1, 0.05), "iterative_dpo": (0.3, 0.05)}
    once = {**base, "online_dpo": (0.6, 0.05), "iterative_dpo": (0.3, 0.05)}
    assert E.decide(_rows([once, behind])) == "not reproduced"
    findings = E.findings(_rows([both_beat, once]))
    assert (
        findings[1].startswith("online_dpo: gold 0.600") and "beats offline DPO on 2/2 seeds" in findings[1]
    )


def test_write_result_files(tmp_path):
    paths = write_result(
        tmp_path / "out",
        experiment="x",
        claim="c",
        source="s",
        verdict="not reproduced",
        rule="r",
        findings=["f <1>"],
        table=[{"method": "dpo", "gold": float("nan")}, {"method": "a", "extra": 1}],
        images={"plot": b"\x89PNG", "empty": None},
        runtime_s=1.5,
        seeds=[0],
        command="rlhflab experiment x",
    )
    result = json.loads(paths["json"].read_text())
    assert result["verdict"] == "not reproduced" and result["plots"] == {"plot": "plot.png"}
    assert result["table"][0]["gold"] is None and result["schema"] == "rlhflab.experiment/1"
    assert (tmp_path / "out" / "plot.png").read_bytes() == b"\x89PNG"
    page = paths["html"].read_text()
    assert "f &lt;1&gt;" in page and "<th>extra</th>" in page and "data:image/png;base64," in page
    with pytest.raises(ValueError, match="verdict"):
        write_result(tmp_path / "o2", **{**_args(), "verdict": "yes"})


def _args() -> dict:
    keys = ("experiment", "claim", "source", "rule", "command")
    return {k: k for k in keys} | {"findings": [], "table": [], "images": {}, "runtime_s": 0.0, "seeds": []}


def test_experiment_runs_end_to_end_and_resumes(tmp_path, tiny_lab_cache, capsys):
    out = tmp_path / "exp"
    argv = ["experiment", "online-vs-offline", *TINY, "--output-dir", str(out), "--seeds", "5"]
    t0 = time.time()
    assert main(argv) == 0
    elapsed = time.time() - t0
    result = json.loads((out / "result.json").read_text())
    # The experiment's own wall time: part of this call's, most of it (the training runs).
    assert 0.5 * elapsed < result["runtime_s"] <= elapsed
    assert result["experiment"] == "online-vs-offline" and result["seeds"] == [5]
    assert result["verdict"] in ("reproduced", "partly reproduced", "not reproduced")
    assert result["verdict"] == E.decide(result["table"])
    assert set(result["plots"]) == {"gold_vs_kl", "gold_by_seed"}
    report = json.loads((out / "seed-5" / "report.json").read_text())
    assert set(report["policies"]) == {"sft", "dpo", "online_dpo", "iterative_dpo"}
    rows = {r["method"]: r for r in result["table"] if r["seed"] == 5}
    for method, row in rows.items():
        assert row["gold"] == report["policies"][method]["gold_reward_mean"]
        assert row["label_queries"] == report["policies"][method]["label_queries"] > 0
    assert "report:" in capsys.readouterr().out
    # A second launch refuses to clobber it; --resume reads the finished seed back without training.
    assert main(argv) == 2
    stamp = (out / "seed-5" / "report.json").stat().st_mtime_ns
    assert main([*argv, "--resume"]) == 0
    assert (out / "seed-5" / "report.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "result.json").read_text())["table"] == result["table"]
