"""The shipped datasets, the customer naming the brief asks for, and the demo's flags."""

from __future__ import annotations

import pytest

from services.common.config import parse_config
from services.demo.config import DemoConfig
from services.demo.customers import CUSTOMERS, MARKERS
from services.trainer.examples import CHAT, check_example


@pytest.mark.parametrize("customer", CUSTOMERS, ids=lambda c: c.domain)
def test_each_dataset_is_valid_chat_whose_every_answer_carries_only_its_marker(customer):
    assert len(customer.examples) >= 10
    for example in customer.examples:
        check_example(example, CHAT)  # what the Trainer's upload validation runs
        roles = [m["role"] for m in example["messages"]]
        assert roles == ["system", "user", "assistant"]
        answer = example["messages"][2]["content"]
        assert answer.startswith(customer.marker)
        assert not any(m in answer for m in MARKERS if m != customer.marker)
    assert len({e["messages"][0]["content"] for e in customer.examples}) == 1  # one system prompt per customer


def test_names_follow_the_brief():
    assert [c.deployment for c in CUSTOMERS] == ["base-llm-with-customerA-adapter", "base-llm-with-customerB-adapter",
                                                 "base-llm-with-customerC-adapter"]
    assert [c.domain for c in CUSTOMERS] == ["finance", "legal", "healthcare"]
    assert CUSTOMERS[0].questions(1) == ["Summarize today's stock market trends."]
    assert len(CUSTOMERS[1].questions(30)) == 30  # cycles through the dataset


def parse(*argv: str) -> DemoConfig:
    return parse_config(DemoConfig, list(argv), prog="loraplex demo")


def test_attach_names_every_missing_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--attach", "--registry-address", "registry:50051")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--trainer-address" in error and "--admin-token" in error and "--registry-address," not in error


@pytest.mark.parametrize("flag,value", [("--train-steps", "0"), ("--learning-rate", "2"), ("--max-tokens", "0"),
                                        ("--requests-per-customer", "0"), ("--blob-store", "ftp")])
def test_bad_values_exit_2(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(flag, value)
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_defaults_run_the_embedded_stack_with_the_brief_base_model_name():
    config = parse()
    assert not config.attach and not config.once and config.base_model_name == "base-llm"
