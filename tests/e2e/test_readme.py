"""Every command in the README works: run against a live demo stack, or checked statically.

Run blocks execute as written, with the defaults a reader sees (ports 50050..50053 and 8000,
`.loraplex/demo`) mapped to the test stack's free ports and state folder, and with the two
values the demo prints per run (OPENAI_BASE_URL, OPENAI_API_KEY) in the environment. Static
blocks are checked command by command with the real parsers (make -n, the config classes,
compose.yaml), because they need Docker, a GPU or a real checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.common import adapter_cli
from services.common.config import build_parser
from services.common.config_docs import render
from services.common.stack import StackConfig
from services.demo.config import DemoConfig
from services.inference.config import InferenceConfig
from services.registry.config import RegistryConfig
from services.router.config import RouterConfig
from services.trainer.config import TrainerConfig
from tests.conftest import REPO_ROOT
from tests.e2e import grpcurl_calls
from tests.e2e.demo_process import shell_env
from tests.e2e.readme import CODE_LANGUAGES, Block, blocks, commands, split_assignments

README = REPO_ROOT / "README.md"
CONFIGS = {"services.registry": RegistryConfig, "services.trainer": TrainerConfig, "services.router": RouterConfig,
           "services.inference": InferenceConfig, "services.demo": DemoConfig}
MAKE_ARGS = {"DEMO_ARGS": DemoConfig, "UP_ARGS": StackConfig}
COMPOSE_SUBCOMMANDS = {"up", "run", "ps", "down", "logs", "config", "port"}
DEFAULT_ADDRESSES = {"router": "127.0.0.1:50050", "registry": "127.0.0.1:50051", "trainer": "127.0.0.1:50052",
                     "inference": "127.0.0.1:50053", "router-http": "127.0.0.1:8000"}
PER_RUN_VALUES = ("OPENAI_BASE_URL", "OPENAI_API_KEY")  # printed by the demo, different every run
# What the run blocks must print between them: each customer-A answer as trained, the new tenant,
# the model the OpenAI fine-tuning example trains and its answer (after GetStats has counted 3).
EXPECTED_OUTPUT = ["Market brief: stocks closed higher", "Market brief: a dividend is", "Market brief: an index fund",
                   "Market brief: bonds lock in", "Market brief: revenue grew", '"name": "customer-d"',
                   "base-llm-with-customerA-adapter", '"resident_adapters": 3', "loraplex.router.v1.Router",
                   "succeeded ft:base-llm:customer-a:support:", "Support: under Billing"]

ALL = blocks(README)
RUN = [block for block in ALL if block.mode == "run"]
STATIC = [block for block in ALL if block.mode == "static"]


def test_every_code_block_says_how_it_is_exercised():
    unmarked = [str(block) for block in ALL if block.language in CODE_LANGUAGES and not block.mode]
    assert not unmarked, f"bash/python blocks without a readme-test marker: {unmarked}"
    assert all(block.reason for block in STATIC), "a static block must say why it is not run"
    assert all(block.language in CODE_LANGUAGES for block in RUN + STATIC)
    assert len(RUN) >= 5 and len(STATIC) >= 4


def test_quickstart_is_exactly_the_two_commands():
    quickstart = ALL[0]
    assert [tokens for tokens in commands(quickstart)] == [["make", "demo"], ["make", "test"]]


# ------------------------------------------------------------------------------------------
# Run blocks, against the serving demo


def localize(text: str, serving_demo) -> str:
    for service, default in DEFAULT_ADDRESSES.items():
        text = text.replace(default, serving_demo.address(service))
    return text.replace(".loraplex/demo/", f"{serving_demo.state}/")


def run_block(block: Block, serving_demo, tmp_path: Path, env: dict[str, str]) -> str:
    text = localize(block.text, serving_demo)
    if block.language == "bash":
        lines = []
        for line in text.splitlines():
            if line.startswith("export ") and line.split("=", 1)[0].removeprefix("export ") in PER_RUN_VALUES:
                continue  # the test sets what the reader pastes from the demo's output
            lines.append(line)
        command = ["bash", "-c", "set -euo pipefail\n" + "\n".join(lines)]
    else:
        script = tmp_path / f"readme_{block.line}.py"
        script.write_text(text)
        command = [sys.executable, str(script)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
                            env={**env, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, f"{block} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_run_blocks_work_against_the_demo_stack(serving_demo, tmp_path):
    env = {**shell_env(), **{name: serving_demo.process.value(name) for name in PER_RUN_VALUES}}
    exported = [line.split("=", 1)[0].removeprefix("export ") for block in RUN for line in block.text.splitlines()
                if line.startswith("export ")]
    assert set(PER_RUN_VALUES) <= set(exported), "the README must show how to set the demo's two values"
    output = "".join(run_block(block, serving_demo, tmp_path, env) for block in RUN)
    missing = [text for text in EXPECTED_OUTPUT if text not in output]
    assert not missing, f"README commands did not print {missing}:\n{output}"


# ------------------------------------------------------------------------------------------
# Static blocks


def parse_flags(cls, args: list[str], what: str) -> None:
    """The flags and value types, as the real parser reads them (paths need not exist here)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            build_parser(cls, prog=what).parse_args(args)
    except SystemExit:
        pytest.fail(f"{what}: {stderr.getvalue().strip().splitlines()[-1]}")


def check_make(args: list[str]) -> None:
    env, rest = {}, []
    for arg in args:
        name, sep, value = arg.partition("=")
        (env.__setitem__(name, value) if sep else rest.append(arg))
    result = subprocess.run(["make", "-n", *rest, *args[len(rest):]], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"make -n {' '.join(args)}: {result.stderr}"
    for name, value in env.items():
        assert name in MAKE_ARGS, f"make {' '.join(args)}: the Makefile reads no {name}"
        parse_flags(MAKE_ARGS[name], value.split(), f"make {' '.join(rest)} {name}")


def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())


def check_docker(env: dict[str, str], args: list[str]) -> None:
    services = compose()["services"]
    assert args[:1] == ["compose"] and args[1] in COMPOSE_SUBCOMMANDS, f"docker {' '.join(args)}"
    known_profiles = {profile for spec in services.values() for profile in spec.get("profiles", [])}
    active = set(filter(None, env.get("COMPOSE_PROFILES", "").split(",")))
    assert active <= known_profiles, f"profiles {active - known_profiles} are not in compose.yaml"
    rest = args[2:]
    if args[1] == "run":
        service = next(arg for arg in rest if not arg.startswith("-"))
        assert service in services, f"docker compose run {service}: no such service"
    for arg in rest:
        if "=" in arg and not arg.startswith("-"):  # --scale NAME=N
            name = arg.split("=", 1)[0]
            assert name in services, f"--scale {arg}: no such service"
            assert set(services[name].get("profiles", [])) <= active, f"{name} is not in the active profiles"


def check_python(args: list[str], tmp_path: Path) -> None:
    if args[0] == "-m" and args[1] in CONFIGS:
        parse_flags(CONFIGS[args[1]], args[2:], f"python -m {args[1]}")
    elif args[:2] == ["-m", "services.common.config_docs"]:
        assert (REPO_ROOT / args[2]).read_text() == render(), f"{args[2]} is stale: run the README's command"
    else:  # a script or module with its own argparse: its --help must list every flag used
        program = args[:2] if args[0] == "-m" else args[:1]
        result = subprocess.run([sys.executable, *program, "--help"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, f"python {' '.join(program)} --help: {result.stderr}"
        for flag in (arg for arg in args[len(program):] if arg.startswith("--")):
            assert flag in result.stdout, f"python {' '.join(program)}: no flag {flag}"


def check_loraplex(args: list[str], tmp_path: Path) -> None:
    if args[:2] == ["model", "tiny"]:  # cheap: really build it, into a temporary folder
        result = subprocess.run([sys.executable, "-m", "services.cli", "model", "tiny", str(tmp_path / "m"),
                                 *args[3:]], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and (tmp_path / "m" / "config.json").is_file(), result.stderr
    elif args[0] == "adapter":  # its own argparse: the command line must parse (it exits 2 if not)
        adapter_cli._parser("loraplex adapter").parse_args(args[1:])
    else:
        parse_flags({"demo": DemoConfig, "up": StackConfig}[args[0]], args[1:], f"loraplex {args[0]}")


@pytest.mark.parametrize("block", STATIC, ids=str)
def test_static_commands_are_accepted_by_what_they_call(block, tmp_path):
    for tokens in commands(block):
        env, tokens = split_assignments(tokens)
        program, args = tokens[0], tokens[1:]
        if program == "make":
            check_make(args)
        elif program == "docker":
            check_docker(env, args)
        elif program == "export":  # e.g. a generated token: it must work in a shell
            result = subprocess.run(["bash", "-c", f"set -e; {' '.join(tokens)}"], capture_output=True, text=True)
            assert result.returncode == 0, result.stderr
        elif program.endswith("bin/python"):
            check_python(args, tmp_path)
        elif program.endswith("bin/loraplex"):
            check_loraplex(args, tmp_path)
        elif program == "grpcurl":  # e.g. against the compose stack: the method and JSON fit the protos
            grpcurl_calls.check(args)
        else:
            pytest.fail(f"{block}: no static check for {program!r}; add one or make the block a run block")


def test_configuration_reference_is_current():
    assert (REPO_ROOT / "docs" / "configuration.md").read_text() == render(), \
        "docs/configuration.md is stale: .venv/bin/python -m services.common.config_docs docs/configuration.md"
