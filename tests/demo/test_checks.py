"""The demo's verdicts can fail: each check is shown a wrong answer and must say FAIL."""

from __future__ import annotations

from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as tpb
from services.demo.checks import adapter_checks, base_checks, isolation_checks, training_checks
from services.demo.customers import CUSTOMERS
from services.demo.setup import Dataset, Tenant
from services.demo.traffic import GRPC, HTTP, Answer, Call, adapter_calls, base_calls, foreign_calls
from services.demo.training import Trained

TENANTS = [Tenant(customer, f"tnt_{customer.letter}", f"lpx_{customer.letter}") for customer in CUSTOMERS]
A, B, C = TENANTS


def trained(tenant: Tenant, state=tpb.JOB_STATE_SUCCEEDED, error: str = "") -> Trained:
    job = tpb.Job(id=f"job_{tenant.customer.letter}", state=state, error=error,
                  adapter_id=f"adp_{tenant.customer.letter}", adapter_version=1)
    return Trained(Dataset(tenant, f"ds_{tenant.customer.letter}", 14), job)


TRAINED = [trained(tenant) for tenant in TENANTS]


def answer(tenant: Tenant, text: str, transport: str = GRPC, adapter_id: str | None = None, error: str = "",
           model: str | None = None) -> Answer:
    call = Call(tenant, model or tenant.customer.deployment, "What?", transport)
    served = f"adp_{tenant.customer.letter}" if adapter_id is None else adapter_id
    return Answer(call, text, 10, served if transport == GRPC else "", error)


def verdicts(checks) -> list[bool]:
    return [check.passed for check in checks]


def test_answers_pass_only_with_their_own_marker_and_adapter():
    good = [answer(A, "Market brief: up."), answer(B, "Legal brief: yes.", HTTP), answer(C, "Care brief: rest.")]
    assert verdicts(adapter_checks(good, TRAINED)) == [True, True, True]
    wrong = [answer(A, "Legal brief: up."),  # another customer's behaviour
             answer(A, "market brief: up."),  # not the marker
             answer(A, "Market brief: up.", adapter_id="adp_B"),  # served by B's adapter
             answer(A, "", error="UNAVAILABLE: no node"),
             answer(B, " Legal brief: late marker", HTTP)]
    checks = adapter_checks(wrong, TRAINED)
    assert verdicts(checks) == [False] * 5
    assert "served by 'adp_B'" in checks[2].detail and checks[3].detail == "UNAVAILABLE: no node"


def test_training_fails_on_any_unsuccessful_job():
    jobs = [TRAINED[0], trained(B, tpb.JOB_STATE_FAILED, "out of memory"), trained(C, tpb.JOB_STATE_CANCELLED)]
    checks = training_checks(jobs)
    assert verdicts(checks) == [True, False, False] and checks[1].detail == "out of memory"


def test_base_model_must_show_no_domain_marker():
    answers = [answer(A, "\x13 pays are", model="base-llm"), answer(B, "text then Care brief: x", model="base-llm"),
               answer(C, "", error="NOT_FOUND: no base", model="base-llm")]
    assert verdicts(base_checks(answers)) == [True, False, False]


def test_isolation_passes_only_when_refused():
    answers = [answer(A, "", error="NOT_FOUND: model not found", model=B.customer.deployment),
               answer(A, "", HTTP, error="HTTP 404: not found", model=B.customer.deployment),
               answer(A, "Legal brief: leaked", model=B.customer.deployment),
               answer(A, "", error="UNAVAILABLE: down", model=B.customer.deployment)]
    assert verdicts(isolation_checks(answers)) == [True, True, False, False]


def test_calls_cover_every_customer_both_transports_and_foreign_deployments():
    calls = adapter_calls(TENANTS, 4)
    assert len(calls) == 12 and {c.transport for c in calls} == {GRPC, HTTP}
    assert all(c.model == c.tenant.customer.deployment for c in calls)
    assert [c.model for c in base_calls(TENANTS, "base-llm")] == ["base-llm"] * 3
    foreign = foreign_calls(TENANTS)
    assert len(foreign) == 6 and all(c.model != c.tenant.customer.deployment for c in foreign)
    assert {c.model for c in foreign} == {t.customer.deployment for t in TENANTS}
