"""Quota bookkeeping with a fake clock: concurrency, tokens per minute, overrides, hints."""

from __future__ import annotations

import pytest

from services.common.errors import ResourceExhausted
from services.router.config import QuotaOverride
from services.router.quotas import Limits, QuotaManager


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_concurrency_limit_refuses_with_a_hint_and_frees_on_release():
    quotas = QuotaManager(Limits(max_concurrent=2))
    first, second = quotas.admit("t1", "acme"), quotas.admit("t1", "acme")
    with pytest.raises(ResourceExhausted) as refused:
        quotas.admit("t1", "acme")
    assert refused.value.reason == "CONCURRENCY_QUOTA" and refused.value.retry_after_s > 0
    assert "acme" in refused.value.message and "in flight" in refused.value.message
    quotas.admit("t2", "other").release()  # tenants do not share a limit
    first.release()
    first.release()  # idempotent: a double release must not free a second slot
    quotas.admit("t1", "acme")
    with pytest.raises(ResourceExhausted):
        quotas.admit("t1", "acme")
    second.release()


def test_requests_admitted_together_take_all_their_places_or_none():
    """OpenAI's n choices: taken one at a time, two n = 2 requests against a limit of 2 could each
    hold one place when they ask for the second, and both be refused."""
    quotas = QuotaManager(Limits(max_concurrent=3))
    single = quotas.admit("t1", "acme")
    with pytest.raises(ResourceExhausted) as refused:
        quotas.admit_together("t1", "acme", 3)
    assert quotas.in_flight("t1") == 1  # nothing taken by the refusal
    assert "asks for 3 choices" in refused.value.message and refused.value.reason == "CONCURRENCY_QUOTA"
    pair = quotas.admit_together("t1", "acme", 2)
    assert quotas.in_flight("t1") == 3 and len(pair) == 2
    for lease in (single, *pair):
        lease.release()
    assert quotas.in_flight("t1") == 0
    with pytest.raises(ResourceExhausted) as never:
        quotas.admit_together("t1", "acme", 4)  # beyond the limit even when idle: says so
    assert "ask for at most 3" in never.value.message and quotas.in_flight("t1") == 0


def test_tokens_per_minute_bucket_charges_use_and_says_when_to_retry():
    clock = Clock()
    quotas = QuotaManager(Limits(tokens_per_minute=600), clock=clock)  # 10 tokens per second
    lease = quotas.admit("t1", "acme")
    lease.charge(650)  # the bucket goes 50 below zero: the request was already running
    lease.release()
    with pytest.raises(ResourceExhausted) as refused:
        quotas.admit("t1", "acme")
    assert refused.value.reason == "TOKENS_PER_MINUTE_QUOTA"
    assert refused.value.retry_after_s == pytest.approx(5.1)  # (50 + 1) tokens at 10 per second
    clock.now += 5.2
    quotas.admit("t1", "acme").release()
    clock.now += 3600  # refills to one minute's worth, never more
    lease = quotas.admit("t1", "acme")
    lease.charge(600)
    with pytest.raises(ResourceExhausted):
        quotas.admit("t1", "acme")


def test_overrides_by_tenant_id_or_name_beat_the_default():
    quotas = QuotaManager(Limits(max_concurrent=1),
                          [("tnt_big", Limits(max_concurrent=3)), ("small", Limits(tokens_per_minute=60))])
    for _ in range(3):
        quotas.admit("tnt_big", "big")
    assert quotas.in_flight("tnt_big") == 3
    lease = quotas.admit("tnt_small", "small")  # no concurrency limit in its override
    quotas.admit("tnt_small", "small")
    lease.charge(61)
    with pytest.raises(ResourceExhausted):
        quotas.admit("tnt_small", "small")


def test_unlimited_by_default_and_override_flag_parsing():
    quotas = QuotaManager(Limits())
    leases = [quotas.admit("t", "t") for _ in range(1000)]
    for lease in leases:
        lease.charge(10**6)
    quotas.admit("t", "t")
    assert QuotaOverride.parse("acme:4:1000") == QuotaOverride("acme", 4, 1000)
    for bad in ("acme:4", "acme:x:1", ":1:1"):
        with pytest.raises(ValueError, match="--tenant-quota"):
            QuotaOverride.parse(bad)
