import base64
import json
import math

from rlhflab.eval.report import SCHEMA, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _inputs():
    policies = {
        "sft": {
            "gold/mean": 0.2,
            "gold/ci95": [0.15, 0.25],
            "kl/ref": 0.0,
            "sample/len_mean": 8.0,
            "examples": [
                {"prompt": "review the film .", "response": "<script>alert(1)</script>", "gold": 0.1}
            ],
        },
        "ppo": {
            "gold/mean": 0.5,
            "gold/ci95": [0.42, 0.58],
            "gold/win_rate": 0.7,
            "kl/ref": 3.2,
            "sample/distinct_2": float("nan"),
            "samples_obj": object(),
        },
    }
    reward_models = {
        "rm": {
            "rm/accuracy": 0.7,
            "rm/gold_accuracy": 0.8,
            "rm/spearman_gold": 0.6,
            "rm/accuracy_by_rating": {
                "significantly_better": {"accuracy": 0.9, "n": 10},
                "better": {"accuracy": 0.7, "n": 12},
                "slightly_better": {"accuracy": 0.6, "n": 9},
                "negligibly_better": {"accuracy": float("nan"), "n": 0},
                "overall": {"accuracy": 0.74, "n": 31},
            },
        }
    }
    curves = {
        "ppo": [
            {"step": s, "reward/mean": 0.1 * s, "gold/mean": 0.3 - 0.01 * s * s, "kl/ref": 0.5 * s}
            for s in range(10)
        ]
    }
    return policies, reward_models, curves


def test_report_files(tmp_path):
    policies, reward_models, curves = _inputs()
    paths = write_report(
        tmp_path,
        task="sentiment",
        policies=policies,
        reward_models=reward_models,
        curves=curves,
        meta={"seed": 0, "minutes": 4.2},
    )
    report = json.loads(paths["json"].read_text())
    assert report["schema"] == SCHEMA and report["task"] == "sentiment"
    assert report["policies"]["ppo"]["sample/distinct_2"] is None  # NaN -> null
    assert "samples_obj" not in report["policies"]["ppo"]
    assert report["reward_models"]["rm"]["rm/accuracy_by_rating"]["negligibly_better"]["accuracy"] is None
    assert len(report["curves"]["ppo"]) == 10
    assert set(report["plots"]) == {"gold_by_policy", "training_curves", "gold_vs_proxy", "rm_accuracy"}
    page = paths["html"].read_text()
    for name, file in report["plots"].items():
        png = (tmp_path / file).read_bytes()
        assert png.startswith(PNG_MAGIC)
        assert base64.b64encode(png).decode() in page  # self-contained
        assert paths[name] == tmp_path / file
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "ppo" in page and "significantly better" in page
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_report_with_nothing_to_plot(tmp_path):
    paths = write_report(tmp_path, policies={"base": {"gold/mean": math.nan}})
    report = json.loads(paths["json"].read_text())
    assert report["plots"] == {"gold_by_policy": "gold_by_policy.png"} or report["plots"] == {}
    assert paths["html"].read_text().startswith("<!DOCTYPE html>")
    empty = write_report(tmp_path / "empty")
    assert json.loads(empty["json"].read_text())["plots"] == {}


def test_curve_keys_choose_the_plotted_metrics():
    from rlhflab.eval.report import _curve_key

    rows = [{"step": 0, "reward/kl_penalty": 0.1, "reward/rm": 1.0, "reward/mean": 0.9, "kl/seq": 2.0}]
    assert _curve_key(rows, "proxy", None) == "reward/mean"
    assert _curve_key(rows, "proxy", {"proxy": "reward/rm"}) == "reward/rm"
    assert _curve_key(rows, "kl", None) == "kl/seq"
    assert _curve_key([{"step": 0, "reward/zeta": 1.0, "reward/alpha": 2.0}], "proxy", None) == "reward/alpha"
    assert _curve_key(rows, "gold", None) is None
