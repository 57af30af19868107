"""An HTTP client that hangs up at an unlucky moment leaves nothing running on the router: no
node call, no quota lease, no registration for revocations. The moments are reached exactly by
calling the router's ASGI app as uvicorn does, with a `receive` that tells when the client has
gone (uvicorn's answers `http.disconnect` at once once the connection is closed); the router,
its Registry and the node are real."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from services.router.http_api import build_app
from tests.router.harness import HeldNode
from tests.router.test_revocation_ends_streams import assert_all_released

HI = [{"role": "user", "content": "Summarize today's stock market trends."}]


def call_app(router, body: dict, token: str, connected: Callable[[], Awaitable[None]],
             more_body: bool = False) -> list[dict]:
    """POSTs `body` to /v1/chat/completions on the router's loop. The first receive is the body
    (said to be followed by more with `more_body`); the second returns `http.disconnect` once
    `connected()` returns; the client is gone from then on. Returns what the app sent."""
    app = build_app(router.app.core)
    data = json.dumps(body).encode()
    received, sent = 0, []

    async def receive() -> dict:
        nonlocal received
        received += 1
        if received == 1:
            return {"type": "http.request", "body": data, "more_body": more_body}
        if received == 2:
            await connected()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"authorization", f"Bearer {token}".encode()), (b"content-type", b"application/json"),
                         (b"content-length", str(len(data)).encode())]}
    asyncio.run_coroutine_threadsafe(app(scope, receive, send), router.loop).result(30)
    return sent


def test_a_client_gone_while_its_n_choices_wait_for_first_tokens_leaves_nothing_running(make_router, world):
    node = HeldNode(tokens_before_hold=0)  # no first token until finish: the choices wait
    router = make_router([node.address])
    node.serve(router)
    try:
        router.wait_healthy(1)

        async def gone_once_both_wait() -> None:  # unless_disconnected's watcher is the 2nd receive
            while node.started < 2:
                await asyncio.sleep(0.01)

        sent = call_app(router, {"model": "tiny", "messages": HI, "stream": True, "n": 2}, world.a.token,
                        gone_once_both_wait)
        assert sent[0]["status"] == 499
        assert_all_released(router, node, world.a.tenant_id, cancelled=2)
    finally:
        node.stop()


def test_a_client_gone_as_its_n_stream_starts_leaves_nothing_running(held_node, world):
    """The choices have their first tokens; the client is gone when the response starts
    (Starlette's own disconnect watcher, the 3rd receive, hears it at once)."""
    router, node = held_node()

    async def there() -> None:
        await asyncio.Event().wait()

    call_app(router, {"model": "tiny", "messages": HI, "stream": True, "n": 2}, world.a.token, there)
    assert_all_released(router, node, world.a.tenant_id, cancelled=2)


def test_a_client_gone_while_sending_its_body_is_no_internal_error(held_node, world, caplog):
    """A hang-up is the client's doing: it used to be logged as an internal error with a traceback."""
    router, _ = held_node()
    async def gone() -> None:
        pass

    sent = call_app(router, {"model": "tiny", "messages": HI}, world.a.token, gone, more_body=True)
    assert sent[0]["status"] == 499
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
