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
        curves={
            "ppo": [
                {"step": 0, "gold/mean": 0.1, "kl/ref": 0.0},
                {"step": 5, "gold/mean": 0.3, "kl/ref": 4.0},
            ]
        },
        rollout_curves=curves,
        meta={"seed": 0, "minutes": 4.2},
    )
    report = json.loads(paths["json"].read_text())
    assert report["schema"] == SCHEMA and report["task"] == "sentiment"
    assert report["policies"]["ppo"]["sample/distinct_2"] is None  # NaN -> null
    assert "samples_obj" not in report["policies"]["ppo"]
    assert report["reward_models"]["rm"]["rm/accuracy_by_rating"]["negligibly_better"]["accuracy"] is None
    assert len(report["rollout_curves"]["ppo"]) == 10 and [p["step"] for p in report["curves"]["ppo"]] == [
        0,
        5,
    ]
    assert set(report["plots"]) == {
        "gold_by_policy",
        "gold_vs_kl",
        "training_curves",
        "gold_vs_proxy",
        "rm_accuracy",
    }
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


def _pipeline_like_inputs():
    """What `rlhflab run` passes to write_report: a best_of_16 policy whose KL is the analytic bound, and a
    per-policy "summary" dict in meta."""
    bound = math.log(16) - 15 / 16
    policies = {
        "sft": {"gold/mean": 0.2, "gold/ci95": [0.15, 0.25], "kl/ref": 0.0, "sample/len_mean": 8.0},
        "dpo": {"gold/mean": 0.4, "gold/ci95": [0.35, 0.45], "kl/ref": 0.9, "sample/len_mean": 9.0},
        "best_of_16": {"gold/mean": 0.5, "gold/ci95": [0.45, 0.55], "kl/ref": bound, "sample/len_mean": 9.5},
    }
    summary = {
        n: {
            "gold_reward_mean": m["gold/mean"],
            "gold_reward_ci95": 0.05,
            "win_rate_vs_sft": 0.5,
            "kl_to_sft": m["kl/ref"],
            "mean_length": m["sample/len_mean"],
        }
        for n, m in policies.items()
    }
    return policies, summary, bound


def test_summary_meta_is_a_table_not_a_raw_dict(tmp_path):
    policies, summary, _ = _pipeline_like_inputs()
    page = write_report(tmp_path, policies=policies, meta={"seed": 0, "runtime_s": 95.0, "summary": summary})[
        "html"
    ].read_text()
    assert "{'" not in page and "{&#x27;" not in page and "': " not in page  # no dict repr, escaped or not
    assert "<h3>summary</h3>" in page
    summary_table = page.split("<h3>summary</h3>", 1)[1].split("</table>", 1)[0]
    assert "<th>gold reward mean</th>" in summary_table and "<th>kl to sft</th>" in summary_table
    dpo_row = "<td>dpo</td><td>0.400</td><td>0.050</td><td>0.500</td><td>0.900</td><td>9.000</td>"
    assert dpo_row in summary_table
    # Scalar meta entries keep their key/value rows.
    assert "<tr><th>seed</th><td>0</td></tr>" in page and "<tr><th>runtime_s</th><td>95.000</td></tr>" in page
    # A "summary" entry put into `policies` itself is not a policy row: it gets its own table too.
    paths = write_report(tmp_path / "b", policies={**policies, "summary": summary, "note": "x"})
    page2 = paths["html"].read_text()
    assert "{'" not in page2 and "{&#x27;" not in page2
    policy_table = page2.split("<h2>Policies", 1)[1].split("</table>", 1)[0]
    assert "<td>summary</td>" not in policy_table and "<td>note</td>" not in policy_table
    assert "<h3>summary</h3>" in page2 and "<tr><th>note</th><td>x</td></tr>" in page2
    assert "summary" not in page2.split("<h2>Examples</h2>", 1)[1]
    assert json.loads(paths["json"].read_text())["policies"]["summary"]["dpo"]["kl_to_sft"] == 0.9


def test_best_of_n_kl_is_marked_as_a_bound(tmp_path):
    policies, summary, bound = _pipeline_like_inputs()
    page = write_report(tmp_path, policies=policies, meta={"summary": summary})["html"].read_text()
    policy_table = page.split("<h2>Policies", 1)[1].split("</table>", 1)[0]
    row = policy_table.split("<td>best_of_16</td>", 1)[1].split("</tr>", 1)[0]
    assert f"≤ {bound:.3f} (bound)" in row and "≤ 1.835 (bound)" in row
    # Sampled KL estimates of the other policies are plain numbers.
    dpo_row = policy_table.split("<td>dpo</td>", 1)[1].split("</tr>", 1)[0]
    assert "<td>0.900</td>" in dpo_row and "bound" not in dpo_row
    assert page.count("(bound)") == 2  # the policy table and the summary table's kl_to_sft
    assert "log n − (n − 1)/n" in page  # the note under the table says what the number is
    # A best-of-n entry whose KL is an actual estimate (not the bound) is not marked.
    policies["best_of_16"]["kl/ref"] = 1.2
    plain = write_report(tmp_path / "est", policies=policies)["html"].read_text()
    assert "(bound)" not in plain and "log n − (n − 1)/n" not in plain


def test_smoothed_reward_vs_sqrt_kl_is_a_curve_over_x():
    from rlhflab.eval.report import smooth_by_x

    # KL that wanders back and forth over time, with noisy reward: the time-ordered path zig-zags in x.
    kl = [0.5 * s + (1.5 if s % 2 else -1.5) for s in range(3, 43)]
    x = [math.sqrt(k) for k in kl]
    y = [xi + (0.3 if i % 3 == 0 else -0.15) for i, xi in enumerate(x)]
    assert any(b < a for a, b in zip(x, x[1:]))  # the raw x order is not monotone
    sx, sy = smooth_by_x(x, y)
    assert 2 <= len(sx) <= 12 and len(sx) == len(sy)
    assert all(b > a for a, b in zip(sx, sx[1:]))  # strictly increasing x: one value per x
    assert all(b > a for a, b in zip(sy, sy[1:]))  # the underlying trend (y ~ x) survives the noise
    assert min(x) <= sx[0] and sx[-1] <= max(x)
    # Binned means: 40 points in 4 bins are the means of the 10 smallest x, the next 10, ...
    bx, by = smooth_by_x(x, y, n_bins=4)
    pts = sorted(zip(x, y))
    assert bx == [sum(p[0] for p in pts[10 * i : 10 * i + 10]) / 10 for i in range(4)]
    assert by == [sum(p[1] for p in pts[10 * i : 10 * i + 10]) / 10 for i in range(4)]
    # Ties in x merge into one point; non-finite values are dropped; nothing in, nothing out.
    assert smooth_by_x([1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 4.0, 6.0], n_bins=2) == ([1.0], [3.0])
    assert smooth_by_x([0.0, math.nan, 1.0], [1.0, 5.0, math.inf]) == ([0.0], [1.0])
    assert smooth_by_x([], []) == ([], [])


def test_reward_vs_sqrt_kl_plot_draws_points_and_sorted_smoothed_lines(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.colors import to_hex

    from rlhflab.eval import report as R

    figs = []
    monkeypatch.setattr(R, "figure_png", lambda fig: figs.append(fig) or b"png")
    # KL that goes up and down over time (a zig-zag if joined in time order), two runs.
    rows = [
        {
            "step": s,
            "reward/score": 0.1 * s,
            "gold/mean": 0.2 - 0.01 * s,
            "kl/ref": 0.3 * s + (0.8 if s % 2 else 0.0),
        }
        for s in range(30)
    ]
    other = [{**r, "reward/score": r["reward/score"] + 1} for r in rows]
    assert R.plot_gold_vs_proxy({"ppo": rows, "ppo_kl0": other}) == b"png"
    ax2 = figs[0].axes[1]
    raw = [ln for ln in ax2.get_lines() if ln.get_linestyle() == "None"]
    smooth = [ln for ln in ax2.get_lines() if ln.get_linestyle() != "None"]
    assert len(raw) == 4 and len(smooth) == 4  # proxy and gold for each run
    labels = sorted(ln.get_label() for ln in smooth)
    assert labels == ["ppo gold", "ppo proxy", "ppo_kl0 gold", "ppo_kl0 proxy"]
    assert {ln.get_marker() for ln in raw} == {".", "x"} and all(len(ln.get_xdata()) == 30 for ln in raw)
    for ln in smooth:
        x = list(ln.get_xdata())
        assert 2 <= len(x) < 30 and all(b > a for a, b in zip(x, x[1:]))
        assert ln.get_linestyle() == ("-" if ln.get_label().endswith("proxy") else "--")
    colour = {ln.get_label(): to_hex(ln.get_color()) for ln in smooth}
    assert colour["ppo proxy"] == colour["ppo gold"] != colour["ppo_kl0 proxy"] == colour["ppo_kl0 gold"]
    import matplotlib.pyplot as plt

    plt.close(figs[0])
