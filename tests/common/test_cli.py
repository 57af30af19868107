"""The `loraplex` console command: model building and argument errors."""

from __future__ import annotations

import subprocess
import sys

from transformers import AutoTokenizer

from services.cli import main
from tests.conftest import REPO_ROOT


def test_model_tiny_builds_a_loadable_checkpoint(tmp_path, capsys):
    assert main(["model", "tiny", str(tmp_path / "m"), "--arch", "qwen2", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_unknown_commands_and_bad_arguments_exit_2():
    for argv in (["launch"], ["model", "huge", "x"], ["model", "tiny", "x", "--preset", "giant"]):
        result = subprocess.run([sys.executable, "-m", "services.cli", *argv], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, argv
        assert "usage:" in result.stderr


def test_ctrl_c_before_a_command_takes_over_is_one_line_and_exit_130(monkeypatch, capsys):
    import services.cli

    def interrupted(argv):  # as when Ctrl-C lands while `up` is still importing torch
        raise KeyboardInterrupt

    monkeypatch.setattr(services.cli, "_up_command", interrupted)
    assert main(["up"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
