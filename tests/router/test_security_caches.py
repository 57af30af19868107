"""One tenant cannot grow the shared router's memory with model names of its choosing: the
resolution cache is bounded, and a name no deployment or base model could have is refused
without a Registry call, a cache entry or an echo of the whole name."""

from __future__ import annotations

import json

import grpc
import pytest

from services.common.pb.loraplex.router.v1 import router_pb2 as pb
from services.registry.base_models import BASE_MODEL_NAME
from services.registry.deployments import DEPLOYMENT_NAME
from services.router.resolution import MAX_MODEL_NAME
from tests.router.conftest import CUSTOMER_A_MODEL
from tests.router.harness import bearer
from tests.router.test_openai_api import http


def _complete(router, token: str, model: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        router.stub.Complete(pb.GenerateRequest(model=model, prompt="hi"), metadata=bearer(token), timeout=60)
    return caught.value


def test_the_longest_name_the_registry_accepts_is_the_routers_bound():
    for pattern in (DEPLOYMENT_NAME, BASE_MODEL_NAME):
        assert pattern.fullmatch("m" * MAX_MODEL_NAME) and not pattern.fullmatch("m" * (MAX_MODEL_NAME + 1))


def test_unknown_model_names_cannot_grow_the_resolution_cache_without_bound(world, make_router):
    router = make_router([])  # no node: a name that resolves then fails placement (UNAVAILABLE)
    targets = router.run(lambda: router.app.core.resolver.targets)
    router.run(lambda: setattr(targets, "max_entries", 20))
    for i in range(60):
        assert _complete(router, world.a.token, f"no-such-model-{i}").code() == grpc.StatusCode.NOT_FOUND
    assert 0 < router.run(lambda: len(targets)) <= 20
    # Evicting answers never changes them: the tenant's deployment still resolves, the names still do not.
    assert _complete(router, world.a.token, CUSTOMER_A_MODEL).code() == grpc.StatusCode.UNAVAILABLE
    assert _complete(router, world.a.token, "no-such-model-0").code() == grpc.StatusCode.NOT_FOUND


def test_a_name_longer_than_any_model_name_is_not_found_without_being_cached_or_echoed(world, make_router):
    router = make_router([])
    targets = router.run(lambda: router.app.core.resolver.targets)
    huge = "m" * 1_000_000
    error = _complete(router, world.a.token, huge)
    assert error.code() == grpc.StatusCode.NOT_FOUND and len(error.details()) < 1024
    assert f"longer than {MAX_MODEL_NAME} characters" in error.details()
    body = json.dumps({"model": huge, "prompt": "hi", "max_tokens": 1}).encode()
    status, reply, _ = http("POST", f"{router.base_url}/completions", body, world.a.token)
    assert status == 404 and reply["error"]["code"] == "model_not_found" and len(reply["error"]["message"]) < 1024
    assert router.run(lambda: [key for key in targets._entries if len(key[1]) > MAX_MODEL_NAME]) == []
