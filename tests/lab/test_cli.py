import json

import pytest

from rlhflab.cli import build_parser
from rlhflab.errors import UserError


def _run(argv):
    # The handlers themselves (not `main`), so a user error shows up as the exception it raises.
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_lab_list(capsys):
    assert _run(["lab", "list"]) == 0
    out = capsys.readouterr().out
    assert "sentiment (default)" in out and "arith" in out
    assert "harm: an assistant asked for household tips" in out


def test_lab_data(tmp_path, capsys):
    out_dir = tmp_path / "data"
    code = _run(
        [
            "lab",
            "data",
            "sentiment",
            "--out",
            str(out_dir),
            "--n-sft",
            "20",
            "--n-pairs",
            "60",
            "--n-prompts",
            "10",
            "--n-heldout",
            "8",
            "--n-rankings",
            "5",
            "--temperature",
            "0.2",
            "--noise",
            "0.1",
            "--n-annotators",
            "3",
            "--bias-spread",
            "0.2",
            "--rating-thresholds",
            "0.1,0.2,0.4",
            "--margin",
            "none",
            "--seed",
            "2",
        ]
    )
    assert code == 0
    manifest = json.loads((out_dir / "lab_data.json").read_text())
    assert manifest["annotators"]["noise"] == 0.1 and len(manifest["annotators"]["biases"]) == 3
    assert manifest["annotators"]["rating_thresholds"] == [0.1, 0.2, 0.4]
    rows = [json.loads(line) for line in (out_dir / "pairs.jsonl").read_text().splitlines()]
    assert rows and all("margin" not in r and "rating" in r for r in rows)
    rankings = [json.loads(line) for line in (out_dir / "rankings.jsonl").read_text().splitlines()]
    assert len(rankings) == manifest["counts"]["rankings"] and 0 < len(rankings) <= 5
    assert all(len(set(r["responses"])) == 4 for r in rankings)  # --k defaults to 4 distinct responses
    assert "annotators agree with gold" in capsys.readouterr().out


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="known tasks"):
        _run(["lab", "data", "chess", "--out", str(tmp_path)])
    with pytest.raises(UserError, match="noise"):
        _run(["lab", "data", "sentiment", "--out", str(tmp_path), "--noise", "0.7"])
    with pytest.raises(UserError, match="config.json"):
        _run(["eval", "--policy", str(tmp_path / "nothing"), "--task", "sentiment"])
    with pytest.raises(SystemExit):
        _run(["lab", "data", "sentiment", "--out", str(tmp_path), "--rating-thresholds", "0.1,0.2"])


def test_lab_base_and_eval(lab_cache, sentiment_base_dir, tmp_path, capsys):
    assert _run(["lab", "base", "sentiment", "--budget", "tiny", "--cache-dir", str(lab_cache)]) == 0
    assert str(sentiment_base_dir) in capsys.readouterr().out
    code = _run(
        [
            "eval",
            "--policy",
            str(sentiment_base_dir),
            "--ref",
            str(sentiment_base_dir),
            "--task",
            "sentiment",
            "--n-prompts",
            "8",
            "--n-samples",
            "2",
            "--out",
            str(tmp_path / "report"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "gold/mean" in out and "kl/ref" in out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    (metrics,) = report["policies"].values()
    assert metrics["kl/ref"] == 0.0
    # The HTML table shows the same numbers as report.json.
    html = (tmp_path / "report" / "report.html").read_text()
    assert (
        f"<td>{metrics['gold/mean']:.3f}</td>" in html
        and f"<td>{metrics['sample/len_mean']:.3f}</td>" in html
    )


def test_lab_data_harm_files(tmp_path, capsys):
    out_dir = tmp_path / "harm"
    args = [
        "lab",
        "data",
        "harm",
        "--out",
        str(out_dir),
        "--n-sft",
        "10",
        "--n-pairs",
        "10",
        "--n-prompts",
        "5",
    ]
    args += ["--n-heldout", "5", "--n-helpful-pairs", "12", "--n-safety-pairs", "9", "--n-rule-labels", "7"]
    assert _run(args) == 0
    counts = json.loads((out_dir / "lab_data.json").read_text())["counts"]
    assert counts["rules_insult"] == counts["rules_secret"] == counts["rules_danger"] == 7
    assert 0 < counts["helpful_pairs"] <= 12 and 0 < counts["safety_pairs"] <= 9
    out = capsys.readouterr().out
    assert f"safety_pairs: {out_dir / 'safety_pairs.jsonl'}" in out
    assert all(
        json.loads(line)["safety"] for line in (out_dir / "safety_pairs.jsonl").read_text().splitlines()
    )


def test_eval_samples_a_quark_model_behind_its_token(sentiment_base_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhflab.stages import quark as qk

    model = AutoModelForCausalLM.from_pretrained(sentiment_base_dir)
    tokenizer = AutoTokenizer.from_pretrained(sentiment_base_dir)
    tokens = qk.add_control_tokens(model, tokenizer, 2, seed=0)
    saved = qk.save_quark_model(model, tokenizer, tokens, tmp_path / "quark")
    argv = ["eval", "--policy", str(saved), "--ref", str(sentiment_base_dir), "--task", "sentiment"]
    assert _run([*argv, "--n-prompts", "4", "--n-samples", "1"]) == 0  # its larger vocabulary is no error
    assert f"sampled behind its best token (id {tokens.best_id})" in capsys.readouterr().out
