"""What the README and our own printouts name exists in the code, checked without a stack.

test_readme.py runs the README's commands against a live demo (minutes); these checks are
the fast half: every grpcurl line (README, `loraplex up`'s banner, the demo's printout) fits
the protos and the service on its port, the configuration table gives each service only its
own flags, and every LORAPLEX_* variable named is one something reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex

import pytest

from services.common import adapter_cli
from services.common.stack import StackConfig, banner
from services.demo import report
from services.demo.clients import Endpoints
from services.demo.config import DemoConfig
from services.demo.customers import CUSTOMERS
from services.demo.setup import Tenant
from services.inference.config import InferenceConfig
from services.registry.config import RegistryConfig
from services.router.config import RouterConfig
from services.trainer.config import TrainerConfig
from tests.conftest import REPO_ROOT
from tests.e2e import grpcurl_calls
from tests.e2e.readme import blocks, commands, split_assignments

README = REPO_ROOT / "README.md"
SERVICES = {"registry": RegistryConfig, "trainer": TrainerConfig, "router": RouterConfig,
            "inference": InferenceConfig}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def flags_of(cls) -> set[str]:
    return {"--" + field.name.replace("_", "-") for field in dataclasses.fields(cls)}


def readme_grpcurl_calls() -> list[list[str]]:
    calls = []
    for block in blocks(README):
        if block.language == "bash":
            for tokens in commands(block):
                _, tokens = split_assignments(tokens)
                if tokens[:1] == ["grpcurl"]:
                    calls.append(tokens[1:])
    return calls


def printed_grpcurl_calls(text: str) -> list[list[str]]:
    return [shlex.split(line.strip())[1:] for line in text.splitlines() if line.strip().startswith("grpcurl -")]


def test_readme_has_grpcurl_lines_for_every_service():
    addresses = {grpcurl_calls.parse(args).address for args in readme_grpcurl_calls()}
    assert addresses == {f"127.0.0.1:{port}" for port in grpcurl_calls.PROCESS_OF_PORT}


@pytest.mark.parametrize("args", readme_grpcurl_calls(), ids=lambda args: " ".join(args)[-70:])
def test_readme_grpcurl_lines_fit_the_protos(args):
    grpcurl_calls.check(args)


def test_loraplex_up_banner_grpcurl_lines_fit_the_protos():
    calls = printed_grpcurl_calls(banner(StackConfig(), ".loraplex/admin_token"))
    assert calls
    for args in calls:
        grpcurl_calls.check(args)


def test_demo_printout_grpcurl_line_fits_the_protos(capsys):
    tenants = [Tenant(customer, f"tnt_{customer.letter}", f"lpx_{customer.letter}") for customer in CUSTOMERS]
    report.connect(Endpoints("127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50050",
                             "http://127.0.0.1:8000/v1", "admin"), tenants)
    (args,) = printed_grpcurl_calls(capsys.readouterr().out)
    assert grpcurl_calls.check(args).endswith("loraplex.router.v1.Router/Generate")


def test_grpcurl_check_catches_a_wrong_method_field_or_port():
    good = ["-plaintext", "-d", '{"tenant": "customer-a"}', "127.0.0.1:50051",
            "loraplex.registry.v1.Registry/ListDeployments"]
    grpcurl_calls.check(good)
    for bad, message in (([*good[:4], "loraplex.registry.v1.Registry/ListDeployment"], "no method"),
                         ([*good[:2], '{"tenant_name": "a"}', *good[3:]], "does not fit"),
                         ([*good[:3], "127.0.0.1:50052", good[4]], "is not served")):
        with pytest.raises(AssertionError, match=message):
            grpcurl_calls.check(bad)


def configuration_table() -> dict[str, list[str]]:
    """The README's "flags you are most likely to set": row name -> flags named in it."""
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]  # \| is a pipe in a cell
        if len(cells) == 2 and cells[0] not in ("service", "---"):
            rows[cells[0]] = FLAG.findall(cells[1])
    return rows


def test_configuration_table_names_only_flags_of_its_service():
    rows = configuration_table()
    assert set(SERVICES) <= set(rows) and "all" in rows
    for row, flags in rows.items():
        owners = SERVICES.values() if row == "all" else [SERVICES.get(row, DemoConfig)]
        for cls in owners:
            missing = [flag for flag in flags if flag not in flags_of(cls)]
            assert not missing, f"README configuration table, row {row!r}: {cls.__name__} has no {missing}"


def adapter_cli_flags() -> set[str]:
    """`loraplex adapter`'s options, its subcommands' included."""
    parser = adapter_cli._parser("loraplex adapter")
    parsers = [parser] + [sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                          for sub in action.choices.values()]
    return {flag for each in parsers for action in each._actions for flag in action.option_strings}


def test_every_flag_the_readme_prose_names_is_a_loraplex_flag():
    # Code blocks are left out: their commands are checked by what they call (test_readme.py).
    prose = re.sub(r"^```.*?^```", "", README.read_text(), flags=re.S | re.M)
    known = set().union(*(flags_of(cls) for cls in (*SERVICES.values(), DemoConfig)), adapter_cli_flags())
    unknown = sorted(set(FLAG.findall(prose)) - known - {"--foo-bar", "--help"})  # the naming rule's example
    assert not unknown, f"README names flags no service has: {unknown}"


def test_every_loraplex_variable_named_is_read_by_a_service_or_by_compose():
    compose = (REPO_ROOT / "compose.yaml").read_text()
    interpolated = set(re.findall(r"\$\{(LORAPLEX_[A-Z0-9_]+)", compose))
    read = {"LORAPLEX_" + flag[2:].replace("-", "_").upper()
            for cls in (*SERVICES.values(), DemoConfig) for flag in flags_of(cls)} | set(adapter_cli.ENVIRONMENT)
    for path in ("README.md", "compose.yaml", "docs/configuration.md", "Dockerfile", "Dockerfile.gpu"):
        named = set(re.findall(r"LORAPLEX_[A-Z0-9_]+", (REPO_ROOT / path).read_text())) - {"LORAPLEX_FOO_BAR"}
        unknown = sorted(named - read - interpolated)
        assert not unknown, f"{path} names {unknown}, which nothing reads"
