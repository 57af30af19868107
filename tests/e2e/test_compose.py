"""compose.yaml, Dockerfile and Dockerfile.gpu checked against the code without Docker (no
engine on the development and CI machines): every command our image runs is accepted by the
real flag parser of its service, environment keys, ports, health checks, addresses between
services, volumes and GPU reservations agree with it, and the files the images COPY exist.

The file is read with the defaults of its ${VAR:-default} variables, so the checks do not
depend on the caller's environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import io
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from services.common.config import ENV_PREFIX, parse_config
from services.demo.config import DemoConfig
from services.inference.config import InferenceConfig
from services.registry.config import RegistryConfig
from services.router.config import RouterConfig
from services.trainer.config import TrainerConfig
from tests.conftest import REPO_ROOT

# `python -m <module>` -> the config class its __main__ parses. InferenceConfig only requires
# --base-model to be given (it never opens the folder), so /models/base parses here with no
# model on disk; none of these classes loads anything.
CONFIGS = {
    "services.registry": RegistryConfig,
    "services.trainer": TrainerConfig,
    "services.router": RouterConfig,
    "services.inference": InferenceConfig,
    "services.demo": DemoConfig,
}
HEALTHCHECK_MODULE = "services.common.healthcheck"
# Ports of the third-party services our services dial.
THIRD_PARTY_PORTS = {"minio": 9000, "postgres": 5432}
# Config fields holding host:port of another compose service.
ADDRESS_FIELDS = ("registry_address", "router_address", "trainer_address", "s3_endpoint")
ONE_SHOT_RESTARTS = (None, "no", False)  # unquoted `no` is YAML 1.1 false
SHELL_BUILTINS = {"test", "["}

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}"
                       r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")


# ---------------------------------------------------------------------------------------------
# Reading compose.yaml as Compose would (defaults applied, anchors merged by PyYAML)


def interpolate(text: str) -> str:
    """Compose interpolation with every variable unset: ${V:-d} -> d; a required ${V:?msg}
    gets a stand-in value; $$ -> $. A bare ${V} or $V would silently become "" in Compose (as a
    shell variable meant for the container would, unless written $$V), so it fails."""
    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op = match.group("name") or match.group("bare"), match.group("op")
        if op in (":-", "-"):
            return match.group("arg")
        if op in (":?", "?"):
            return f"test-value-of-{name}"
        raise AssertionError(f"compose.yaml: ${{{name}}} has neither a default (:-) nor an error message (:?)")
    return _VARIABLE.sub(replace, text)


def interpolated(node: Any) -> Any:
    if isinstance(node, str):
        return interpolate(node)
    if isinstance(node, list):
        return [interpolated(item) for item in node]
    if isinstance(node, dict):
        return {key: interpolated(value) for key, value in node.items()}
    return node


@functools.cache
def compose() -> dict:
    raw = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    return interpolated({key: value for key, value in raw.items() if not key.startswith("x-")})


def services() -> dict[str, dict]:
    return compose()["services"]


def ours() -> list[str]:
    """Services built from our Dockerfiles."""
    return sorted(name for name, spec in services().items() if "build" in spec)


def command_of(name: str) -> list[str]:
    command = services()[name].get("command")
    assert command, f"{name}: no command (our image's default command only prints help)"
    return shlex.split(command) if isinstance(command, str) else list(command)


def environment_of(name: str) -> dict[str, str]:
    env = services()[name].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def python_module(name: str) -> tuple[str, list[str]] | None:
    """(module, args) when the command is `python -m module args...`."""
    command = command_of(name)
    if len(command) >= 3 and command[0] in ("python", "python3") and command[1] == "-m":
        return command[2], command[3:]
    return None


def config_services() -> list[str]:
    return [name for name in ours() if python_module(name) and python_module(name)[0] in CONFIGS]


def server_services() -> list[str]:
    """The long-running ones (the demo is a one-shot client: no ports, no health check)."""
    return [name for name in config_services() if not is_one_shot(services()[name])]


@functools.cache
def config_of(name: str):
    """The service's config, built by the real parser from its command and environment."""
    module, args = python_module(name)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse_config(CONFIGS[module], args, env=environment_of(name), prog=f"{name} ({module})")
    except SystemExit:
        error = stderr.getvalue().strip().splitlines()[-1]  # argparse prints usage, then the error
    pytest.fail(f"{name}: {module} rejects its compose command or environment: {error}")


def container_ports(spec: dict) -> set[int]:
    ports = set()
    for entry in spec.get("ports", []):
        target = entry["target"] if isinstance(entry, dict) else str(entry).split("/")[0].rsplit(":", 1)[-1]
        ports.add(int(target))
    return ports


def listening_ports(config) -> set[int]:
    ports = {config.port}
    if getattr(config, "http_port", 0) > 0:
        ports.add(config.http_port)
    if config.metrics_port > 0:
        ports.add(config.metrics_port)
    return ports


def volume_sources(spec: dict) -> list[str]:
    """Named-volume sources of a service's mounts (bind mounts are paths)."""
    names = []
    for entry in spec.get("volumes", []):
        if isinstance(entry, dict):
            if entry.get("type") == "volume" and entry.get("source"):
                names.append(entry["source"])
        elif ":" in entry and not entry.split(":", 1)[0].startswith(("/", ".", "~")):
            names.append(entry.split(":", 1)[0])
    return names


def reserved_devices(spec: dict) -> list[dict]:
    return ((spec.get("deploy") or {}).get("resources") or {}).get("reservations", {}).get("devices") or []


def is_one_shot(spec: dict) -> bool:
    return spec.get("restart") in ONE_SHOT_RESTARTS


# ---------------------------------------------------------------------------------------------
# Commands


def test_compose_file_shape():
    raw = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    assert "version" not in raw, "compose spec v2 files have no version: key"
    assert raw.get("name") == "loraplex"
    for name in ("postgres", "minio", "minio-init", "model-init", "registry", "trainer", "router",
                 "inference-gpu", "inference-cpu"):
        assert name in services(), f"compose.yaml has no {name} service"


@pytest.mark.parametrize("name", config_services())
def test_command_is_accepted_by_the_service_config(name):
    module, _ = python_module(name)
    assert importlib.util.find_spec(module) is not None, f"{name}: module {module} does not exist"
    config_of(name)  # fails naming the service and the parser's message


def test_every_service_of_our_image_runs_something_we_check():
    unchecked = [name for name in ours() if name not in config_services() and command_of(name)[:2] != ["sh", "-c"]]
    assert not unchecked, f"commands neither `python -m services.<name>` nor `sh -c`: {unchecked}"


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a `sh -c` script joined by && / || / ;."""
    commands, current = [], []
    for word in shlex.split(script):
        if word in ("&&", "||", ";"):
            commands.append(current)
            current = []
        else:
            current.append(word)
    commands.append(current)
    return [command[1:] if command[:1] == ["exec"] else command for command in commands if command]


@pytest.mark.parametrize("name", [name for name in ours() if name not in config_services()])
def test_shell_commands_use_existing_cli_subcommands_and_flags(name):
    # `loraplex model tiny` is a plain argparse command, not a config dataclass: run its --help
    # and look for every flag the script passes.
    command = command_of(name)
    assert command[:2] == ["sh", "-c"] and len(command) == 3, f"{name}: expected [sh, -c, SCRIPT], got {command}"
    assert is_one_shot(services()[name]), (
        f"{name}: a long-running service must not run under sh -c (sh, as PID 1, does not pass SIGTERM on)")
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for words in shell_commands(command[2]):
        program, args = words[0], words[1:]
        if program in SHELL_BUILTINS:
            continue
        assert program == "loraplex", f"{name}: runs {program!r}, which the image does not provide"
        assert scripts.get("loraplex") == "services.cli:main"
        subcommand = [arg for arg in args[:2] if re.fullmatch(r"[a-z]+", arg)]
        result = subprocess.run([sys.executable, "-m", "services.cli", *subcommand, "--help"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{name}: `loraplex {' '.join(subcommand)} --help` failed: {result.stderr}"
        for flag in (arg.split("=", 1)[0] for arg in args if arg.startswith("--")):
            assert flag in result.stdout, f"{name}: `loraplex {' '.join(subcommand)}` has no flag {flag}"


@pytest.mark.parametrize("module", sorted(CONFIGS))
def test_service_help_runs(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"python -m {module} --help exited {result.returncode}: {result.stderr}"
    assert "--host" in result.stdout  # every config (the demo's is the stack's) has it


# ---------------------------------------------------------------------------------------------
# Environment, ports, health checks, addresses


@pytest.mark.parametrize("name", ours())
def test_loraplex_environment_keys_are_config_fields(name):
    module = (python_module(name) or ("",))[0]
    fields = {field.name for field in dataclasses.fields(CONFIGS[module])} if module in CONFIGS else set()
    for key in environment_of(name):
        if key.startswith(ENV_PREFIX):
            field = key[len(ENV_PREFIX):].lower()
            assert field in fields, (f"{name}: environment {key} is no --{field.replace('_', '-')} flag "
                                     f"of {module or 'its command'}")


@pytest.mark.parametrize("name", server_services())
def test_published_ports_are_the_ports_the_service_listens_on(name):
    config, spec = config_of(name), services()[name]
    assert container_ports(spec) == listening_ports(config), (
        f"{name}: ports: publishes container ports {sorted(container_ports(spec))} but --port/--http-port/"
        f"--metrics-port are {sorted(listening_ports(config))}")
    assert config.host == "0.0.0.0", f"{name}: --host {config.host} cannot be reached from outside the container"


@pytest.mark.parametrize("name", server_services())
def test_healthcheck_probes_the_service_grpc_port(name):
    config = config_of(name)
    test = services()[name].get("healthcheck", {}).get("test")
    expected = ["CMD", "python", "-m", HEALTHCHECK_MODULE, f"127.0.0.1:{config.port}"]
    assert test == expected, f"{name}: healthcheck test is {test}, expected {expected}"
    assert importlib.util.find_spec(HEALTHCHECK_MODULE) is not None


def test_long_running_services_have_health_checks_and_restart():
    for name, spec in services().items():
        if is_one_shot(spec):
            continue
        assert spec["restart"] == "unless-stopped", f"{name}: restart is {spec['restart']!r}"
        assert spec.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"


@pytest.mark.parametrize("name", config_services())
def test_addresses_name_compose_services_and_their_ports(name):
    config = config_of(name)
    for field in ADDRESS_FIELDS:
        value = getattr(config, field, "")
        if not value or field == "s3_endpoint" and getattr(config, "blob_store", "s3") != "s3":
            continue
        host, _, port = value.rpartition(":")
        assert host in services(), f"{name}: --{field.replace('_', '-')} {value}: no service {host!r}"
        want = config_of(host).port if host in config_services() else THIRD_PARTY_PORTS.get(host)
        assert int(port) == want, f"{name}: --{field.replace('_', '-')} {value}, but {host} listens on {want}"


def stateful_services() -> list[str]:
    """Services with a database and a blob store (registry, trainer)."""
    return [name for name in server_services()
            if "database_url" in {field.name for field in dataclasses.fields(CONFIGS[python_module(name)[0]])}]


@pytest.mark.parametrize("name", stateful_services())
def test_state_lives_in_postgres_and_minio_with_their_credentials(name):
    config, postgres, minio = config_of(name), environment_of("postgres"), environment_of("minio")
    url = make_url(config.database_url)
    assert (url.drivername, url.host, url.port or 5432) == ("postgresql+psycopg", "postgres", 5432), \
        f"{name}: database URL {url!r} is not the postgres service"
    assert (url.username, url.password, url.database) == (
        postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"]), \
        f"{name}: database URL credentials differ from the postgres service's"
    assert config.blob_store == "s3"
    assert (config.s3_access_key, config.s3_secret_key) == (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]), \
        f"{name}: S3 keys differ from minio's root credentials"
    init_script = command_of("minio-init")[-1]
    assert re.search(rf"mc mb --ignore-existing \w+/{re.escape(config.s3_bucket)}\b", init_script), \
        f"{name}: minio-init does not create bucket {config.s3_bucket!r}"


def test_router_has_no_static_nodes_and_nodes_register_with_it():
    assert config_of("router").node == [], "nodes register through the Nodes service; no --node list"
    for name in ("inference-gpu", "inference-cpu"):
        config = config_of(name)
        assert config.router_address == f"router:{config_of('router').port}", f"{name}: does not register"
        # Replicas differ only by hostname: the default advertise address (hostname:port, the
        # node listening on 0.0.0.0) is what the router dials, so no fixed one may be set.
        assert not config.advertise_address, f"{name}: a fixed --advertise-address breaks --scale"
        assert (config.base_model, config.base_model_name) == (Path("/models/base"), "base-llm")
        assert all(str(port).split(":")[-2:-1] in ([], [""]) for port in services()[name].get("ports", [])), \
            f"{name}: a fixed host port breaks --scale"


# ---------------------------------------------------------------------------------------------
# Dependencies, volumes, GPU, profiles


def test_depends_on_targets_exist_with_matching_conditions():
    for name, spec in services().items():
        depends = spec.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {target: {"condition": "service_started"} for target in depends}
        for target, rule in depends.items():
            assert target in services(), f"{name}: depends_on unknown service {target!r}"
            condition, target_spec = rule.get("condition"), services()[target]
            if condition == "service_healthy":
                assert target_spec.get("healthcheck"), f"{name}: waits for {target} healthy, which has no healthcheck"
            elif condition == "service_completed_successfully":
                assert is_one_shot(target_spec), f"{name}: waits for {target} to complete, but it restarts"
            else:
                pytest.fail(f"{name}: depends_on {target} with condition {condition!r}; use healthy/completed")
            # A dependency in a profile that is not enabled would make `up` fail.
            assert set(target_spec.get("profiles", [])) <= set(spec.get("profiles", [])), \
                f"{name}: depends on {target}, which only runs with profiles {target_spec['profiles']}"


def test_named_volumes_are_declared_and_used():
    declared = set(compose().get("volumes") or {})
    used = set()
    for name, spec in services().items():
        for volume in volume_sources(spec):
            assert volume in declared, f"{name}: volume {volume!r} is not declared under volumes:"
            used.add(volume)
    assert declared == used, f"declared but unused volumes: {sorted(declared - used)}"


def test_gpu_reservation_only_on_the_gpu_inference_variant():
    for name in config_services():
        config, spec = config_of(name), services()[name]
        devices = reserved_devices(spec)
        on_gpu = getattr(config, "device", "cpu").startswith("cuda")
        if on_gpu:
            assert any(device.get("driver") == "nvidia" and "gpu" in device.get("capabilities", [])
                       and device.get("count") == 1 for device in devices), \
                f"{name}: --device {config.device} without an nvidia GPU reservation (count 1, capabilities [gpu])"
            assert spec["build"]["dockerfile"] == "Dockerfile.gpu", f"{name}: runs on CUDA from the CPU image"
        else:
            assert not devices, f"{name}: reserves a GPU but runs on the CPU"
    assert config_of("inference-gpu").device.startswith("cuda")
    assert config_of("inference-cpu").device == "cpu"
    assert services()["inference-gpu"]["profiles"] == ["gpu"]
    assert services()["inference-cpu"]["profiles"] == ["cpu"]


# ---------------------------------------------------------------------------------------------
# Images


def build_files() -> set[tuple[Path, str]]:
    """(context, dockerfile) of every `build:` in compose.yaml."""
    files = set()
    for spec in services().values():
        build = spec.get("build")
        if build is not None:
            build = {"context": build} if isinstance(build, str) else build
            files.add((REPO_ROOT / build.get("context", "."), build.get("dockerfile", "Dockerfile")))
    return files


def test_build_references_exist():
    files = build_files()
    assert {dockerfile for _, dockerfile in files} == {"Dockerfile", "Dockerfile.gpu"}
    for context, dockerfile in files:
        assert (context / dockerfile).is_file(), f"build: {context / dockerfile} does not exist"


def copy_sources(dockerfile: Path) -> list[str]:
    """Sources of COPY/ADD lines that copy from the build context (not --from another stage)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    sources = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = words[1:]
        if any(arg.startswith("--from") for arg in args):
            continue
        sources += [arg for arg in args if not arg.startswith("--")][:-1]
    return sources


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_copies_only_existing_paths(dockerfile):
    sources = copy_sources(REPO_ROOT / dockerfile)
    assert sources, f"{dockerfile}: no COPY found"
    for source in sources:
        assert list(REPO_ROOT.glob(source)), f"{dockerfile}: COPY {source} does not exist in the build context"
    text = (REPO_ROOT / dockerfile).read_text()
    assert re.search(r"^USER (?!root)\S+", text, re.M), f"{dockerfile}: runs as root"


def test_demo_attaches_to_this_stack_and_prints_the_published_addresses():
    demo, router, node = config_of("demo"), config_of("router"), config_of("inference-cpu")
    assert demo.attach and demo.once
    assert demo.openai_base_url == f"http://router:{router.http_port}/v1"
    published = {str(port) for port in services()["router"]["ports"]}
    assert f"{router.port}:{router.port}" in published and f"{router.http_port}:{router.http_port}" in published
    assert demo.public_router_address == f"127.0.0.1:{router.port}"
    assert demo.public_openai_base_url == f"http://127.0.0.1:{router.http_port}/v1"
    assert (demo.base_model_name, demo.base_model_location) == (node.base_model_name, str(node.base_model))
