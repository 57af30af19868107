"""Prefix caching as a caller of a real node sees it: shared only within a cache scope (a hit
would tell one tenant what another sent), never across an adapter's replaced bytes, counted
in GetStats and in each request's usage, and gone with --prefix-caching off."""

from __future__ import annotations

import shutil

import pytest

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.common.pb.loraplex.inference.v1 import inference_pb2 as pb
from tests.inference.test_adapter_admission import adapter_root  # noqa: F401
from tests.inference.test_servicer import collect, greedy, serve_and_run

PROMPT = list(range(10, 50))  # 40 tokens: two of the node's 16-token blocks can be read back
SHARED = 32


async def generate(stub, scope: str, adapter_id: str = "") -> tuple[list[int], int]:
    """Tokens and usage.cached_prompt_tokens of one greedy request."""
    replies = await collect(stub.Generate(pb.GenerateRequest(
        token_ids=gen.TokenIds(ids=PROMPT), cache_scope=scope, adapter=pb.AdapterRef(adapter_id=adapter_id),
        sampling=greedy(max_tokens=4, ignore_eos=True))))
    return [t for r in replies for t in r.delta.token_ids], replies[-1].delta.usage.cached_prompt_tokens


def scopes_in_turn(tiny_model_dir, adapter_root, **config):  # noqa: F811
    async def body(stub, app):
        results = [await generate(stub, scope) for scope in ("tenant-a", "tenant-b", "tenant-a", "")]
        return results, await stub.GetStats(pb.GetStatsRequest())

    return serve_and_run(tiny_model_dir, adapter_root, body, **config)


def test_a_prefix_is_read_back_only_within_its_scope(tiny_model_dir, adapter_root):  # noqa: F811
    results, stats = scopes_in_turn(tiny_model_dir, adapter_root)
    assert [cached for _, cached in results] == [0, 0, SHARED, 0]
    assert len({tuple(tokens) for tokens, _ in results}) == 1
    assert (stats.prompt_tokens_cached, stats.prompt_tokens_computed) == (SHARED, 4 * len(PROMPT) - SHARED)
    assert stats.prefix_cache_hit_rate == pytest.approx(SHARED / (4 * len(PROMPT)))
    assert stats.kv_blocks_used == 0 and stats.kv_blocks_cached > 0


def test_prefix_caching_off_computes_every_prompt_token(tiny_model_dir, adapter_root):  # noqa: F811
    results, stats = scopes_in_turn(tiny_model_dir, adapter_root, prefix_caching=False)
    assert [cached for _, cached in results] == [0, 0, 0, 0]
    assert (stats.prompt_tokens_cached, stats.prompt_tokens_computed) == (0, 4 * len(PROMPT))
    assert stats.prefix_cache_hit_rate == 0 and stats.kv_blocks_cached == 0


def test_an_adapter_replaced_under_its_id_never_reads_the_old_bytes_kv(tiny_model_dir, adapter_root):  # noqa: F811
    """Requests naming no digest run with whichever bytes are resident; once fin's folder holds
    legal's weights and fin is reloaded, fin's requests compute afresh and give legal's tokens."""
    async def body(stub, app):
        before = [await generate(stub, "t", "fin") for _ in range(2)]
        shutil.rmtree(adapter_root / "fin")
        shutil.copytree(adapter_root / "legal", adapter_root / "fin")
        await stub.EvictAdapter(pb.EvictAdapterRequest(adapter_id="fin", all_tiers=True))
        await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="fin"))  # resident again, with the new bytes
        after = [await generate(stub, "t", "fin") for _ in range(2)]
        return before, after, await generate(stub, "t", "legal")

    before, after, legal = serve_and_run(tiny_model_dir, adapter_root, body)
    assert [cached for _, cached in before + after] == [0, SHARED, 0, SHARED]
    assert after[0][0] == after[1][0] == legal[0] != before[0][0]
    assert legal[1] == 0  # another adapter id: its own prefixes
