"""A bug behind the OpenAI API: an OpenAI-shaped 500 that names the request (x-request-id) in
the answer and in the log line holding the traceback, so a caller's report finds it."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request

from services.router.http_api import build_app
from services.router.http_server import HttpServer


class BrokenCore:
    async def authenticate(self, authorization):
        raise RuntimeError("a bug in the router")


def _post(port: int) -> urllib.error.HTTPError:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                     data=json.dumps({"model": "m", "messages": []}).encode(),
                                     headers={"content-type": "application/json", "x-client-request-id": "trace-7"})
    try:
        urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as error:
        return error
    raise AssertionError("expected an error status")


def test_an_internal_error_is_a_500_naming_the_request(caplog):
    async def main():
        server = HttpServer(build_app(BrokenCore()), "127.0.0.1", 0, 1.0)
        await server.start()
        try:
            return await asyncio.to_thread(_post, server.port)
        finally:
            await server.stop()

    with caplog.at_level(logging.ERROR, logger="loraplex.router.http"):
        error = asyncio.run(main())
    body = json.loads(error.read())
    assert error.code == 500 and body["error"]["type"] == "server_error"
    assert "a bug in the router" not in body["error"]["message"]  # the details stay in the log
    assert error.headers["x-request-id"] == "trace-7"  # was missing
    assert any("trace-7" in record.getMessage() and record.exc_info for record in caplog.records)
