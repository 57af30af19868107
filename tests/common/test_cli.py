"""The `loraplex` console command: model building and argument errors."""

from __future__ import annotations

import subprocess
import sys

import yaml
from transformers import AutoTokenizer

from services.cli import main
from services.common.config import build_parser
from services.inference.config import InferenceConfig
from services.registry.config import RegistryConfig
from services.router.config import RouterConfig
from services.trainer.config import TrainerConfig
from tests.conftest import REPO_ROOT

CONFIGS = {"registry": RegistryConfig, "trainer": TrainerConfig, "router": RouterConfig,
           "inference": InferenceConfig}


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


def test_compose_commands_use_flags_the_services_accept():
    compose = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        command = service["command"]
        assert command[:3] == ["python", "-m", f"services.{name}"]
        parser = build_parser(CONFIGS[name], prog=name)
        parser.parse_args(command[3:])  # exits (fails the test) on an unknown flag
        for variable in service.get("environment", {}):
            flag = "--" + variable.removeprefix("LORAPLEX_").lower().replace("_", "-")
            assert flag in parser.format_help(), f"{name}: {variable} maps to no flag"
