"""What `loraplex demo --once` must see before it exits 0.

- every training job succeeded and published an adapter;
- every answer for a customer's deployment starts with that customer's marker, and (over
  gRPC, where the Router names it) was served by the adapter that customer's job published;
- the base model, asked the same questions, answers with none of the markers;
- a customer asking for another customer's deployment is refused (NOT_FOUND / HTTP 404).
"""

from __future__ import annotations

import dataclasses

from services.demo.customers import MARKERS
from services.demo.text import shorten
from services.demo.traffic import GRPC, Answer
from services.demo.training import Trained


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str = ""


def training_checks(trained: list[Trained]) -> list[Check]:
    return [Check(f"customer {t.dataset.tenant.customer.letter}: training job {t.job.id} succeeded", t.succeeded,
                  t.job.error or f"adapter {t.job.adapter_id} v{t.job.adapter_version}") for t in trained]


def adapter_checks(answers: list[Answer], trained: list[Trained]) -> list[Check]:
    published = {t.dataset.tenant.customer.letter: t.job.adapter_id for t in trained}
    checks = []
    for answer in answers:
        customer = answer.call.tenant.customer
        name = f"customer {customer.letter} via {answer.call.transport}: {answer.call.question!r}"
        if answer.error:
            checks.append(Check(name, False, answer.error))
            continue
        wrong_adapter = answer.call.transport == GRPC and answer.adapter_id != published[customer.letter]
        passed = answer.text.startswith(customer.marker) and not wrong_adapter
        detail = shorten(answer.text)
        if wrong_adapter:
            detail += f" (served by {answer.adapter_id!r}, published {published[customer.letter]!r})"
        checks.append(Check(name, passed, detail))
    return checks


def base_checks(answers: list[Answer]) -> list[Check]:
    return [Check(f"base model (no adapter) for customer {a.call.tenant.customer.letter}: no domain marker",
                  not a.error and not any(marker in a.text for marker in MARKERS), a.error or shorten(a.text))
            for a in answers]


def isolation_checks(answers: list[Answer]) -> list[Check]:
    return [Check(f"customer {a.call.tenant.customer.letter} cannot use {a.call.model} ({a.call.transport})",
                  a.error.startswith(("NOT_FOUND", "HTTP 404")), a.error or f"answered: {shorten(a.text)}")
            for a in answers]
