"""What `Connect with:` prints must work when pasted into a new shell. `make demo` runs from
.venv, which holds grpcurl and the OpenAI SDK; a new shell has neither on its PATH, so the
printout says how to get them there (the compose demo runs outside any venv: no such line)."""

from __future__ import annotations

import sys

from services.demo import report
from services.demo.clients import Endpoints
from services.demo.customers import CUSTOMERS
from services.demo.setup import Tenant

TENANTS = [Tenant(customer, f"tnt_{customer.letter}", f"lpx_{customer.letter}") for customer in CUSTOMERS]
ENDPOINTS = Endpoints("127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50050", "http://127.0.0.1:8000/v1", "admin")


def printed(capsys) -> list[str]:
    report.connect(ENDPOINTS, TENANTS)
    return capsys.readouterr().out.splitlines()


def test_from_a_venv_it_says_which_activate_script_puts_grpcurl_and_the_sdk_on_path(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / ".venv"))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    lines = printed(capsys)
    hint = next(line for line in lines if "activate" in line)
    assert "`. .venv/bin/activate`" in hint  # relative to where the user ran make
    assert lines.index(hint) < lines.index("grpcurl (customer A over gRPC):")
    # Scripts grep these two; tests paste the line below each heading.
    assert lines[:2] == ["OPENAI_BASE_URL=http://127.0.0.1:8000/v1", "OPENAI_API_KEY=lpx_A"]
    assert lines[lines.index("grpcurl (customer A over gRPC):") + 1].lstrip().startswith("grpcurl -plaintext")


def test_outside_a_venv_there_is_no_such_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)
    assert not any("activate" in line for line in printed(capsys))
