import subprocess
import sys

from rlhflab.cli import main


def test_version_and_help(capsys):
    assert main(["version"]) == 0
    assert "rlhflab 0.1.0" in capsys.readouterr().out


def test_config_show_prints_documented_yaml(capsys):
    assert main(["config", "show", "sft", "optim.lr=1e-5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 1.0e-05" in out
    assert "# Peak learning rate" in out


def test_user_error_is_one_line_exit_2(capsys):
    assert main(["config", "show", "sft", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config: unknown key 'optim.lrr'; did you mean 'optim.lr'?")
    assert "Traceback" not in err


def test_subprocess_no_traceback_on_bad_config(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("data: {max_length: 8, max_prompt_length: 9}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "rlhflab.cli", "sft", "--config", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "must be smaller than data.max_length" in proc.stderr
    assert "Traceback" not in proc.stderr
