"""The node's prefix cache through the router: a tenant's repeated prompt is read from the cache
(OpenAI's usage.prompt_tokens_details.cached_tokens says how much), and another tenant sending
the very same prompt computes it afresh: the router scopes the cache by tenant, as a hit would
otherwise tell one tenant what another has sent (its time to first token, its usage)."""

from __future__ import annotations

from openai import OpenAI

PROMPT = " ".join(["the quarterly report on regional bank lending and deposit growth"] * 6)


def cached_tokens(client: OpenAI) -> int:
    answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    assert answer.usage.prompt_tokens > 32  # at least two full KV blocks: something to cache
    return answer.usage.prompt_tokens_details.cached_tokens


def test_a_tenants_repeated_prompt_hits_the_cache_and_another_tenants_does_not(router, world):
    a = OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0)
    b = OpenAI(base_url=router.base_url, api_key=world.b.token, max_retries=0)
    first = cached_tokens(a)
    assert cached_tokens(a) > first  # the same tenant's repeat reads its own blocks
    assert cached_tokens(b) == 0  # the same prompt, another tenant: nothing shared
    assert cached_tokens(b) > 0
