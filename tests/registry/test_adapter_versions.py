"""Adapter upload, download, versions, idempotency, listing and deletion on every backend pair."""

from __future__ import annotations

import json
import math

import grpc
import numpy as np
import pytest
from safetensors.numpy import save as save_tensors

from services.common.pb.loraplex.common.v1 import generation_pb2
from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.pb.loraplex.registry.v1 import registry_pb2_grpc
from tests.registry.client import expect_error, sha256, unique
from tests.registry.conftest import start_registry
from tests.registry.lora_files import ALL_MODULES, make_peft_adapter, make_zip, to_bf16, variant


def test_upload_zip_then_download_returns_the_exact_weights(registry, tenant, peft_adapter):
    before = registry.counts()
    response = tenant.upload(peft_adapter, name="fin", description="finance", labels={"team": "a"})
    adapter = response.adapter
    assert response.created and adapter.version == 1 and adapter.id.startswith("adp_")
    assert adapter.tenant_id == tenant.tenant_id and adapter.base_model == "tiny"
    assert (adapter.rank, adapter.alpha, adapter.scaling, adapter.use_rslora) == (4, 8.0, 2.0, False)
    assert list(adapter.target_modules) == ALL_MODULES
    assert adapter.size_bytes == len(peft_adapter.weights) and adapter.sha256 == sha256(peft_adapter.weights)
    assert adapter.description == "finance" and dict(adapter.labels) == {"team": "a"}
    after = registry.counts()
    assert (after["adapters"], after["blobs"], after["change_events"]) == \
        (before["adapters"] + 1, before["blobs"] + 1, before["change_events"] + 1)
    assert after["spool"] == 0

    manifest, weights = tenant.download(adapter.id, chunk_size=4096)
    assert weights == peft_adapter.weights
    assert manifest.sha256 == sha256(weights) and manifest.size_bytes == len(weights)
    assert manifest.adapter == adapter
    assert json.loads(manifest.config_json) == peft_adapter.config_dict


def test_download_chunks_follow_the_requested_size(registry, tenant, peft_adapter):
    adapter = tenant.upload(peft_adapter, name="chunks").adapter
    messages = list(tenant.stub.DownloadAdapter(pb.DownloadAdapterRequest(id=adapter.id, chunk_size=5000),
                                                metadata=[("authorization", f"Bearer {tenant.token}")]))
    sizes = [len(m.chunk) for m in messages[1:]]
    assert max(sizes) <= 5000 and sum(sizes) == len(peft_adapter.weights) and len(sizes) > 3


def test_the_largest_chunk_fits_a_default_grpc_client(registry, tenant, tiny_model_dir, tmp_path):
    """chunk_size at its documented maximum must not produce messages a stock client refuses
    (gRPC's default receive limit is 4 MiB; grpcurl's too)."""
    config = {**json.loads((tiny_model_dir / "config.json").read_text()), "hidden_size": 1024,
              "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    base = unique("wide")
    registry.admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name=base, location=str(tmp_path)))
    rng = np.random.default_rng(0)
    tensors = {}
    for module in ("q_proj", "k_proj", "v_proj"):  # 2 MiB each at r=256: 6 MiB of weights
        prefix = f"base_model.model.model.layers.0.self_attn.{module}"
        tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((256, 1024), dtype=np.float32) * 0.01
        tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((1024, 256), dtype=np.float32) * 0.01
    weights = save_tensors(tensors)
    lora = {"peft_type": "LORA", "r": 256, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj"]}
    archive = make_zip({"adapter_config.json": json.dumps(lora).encode(), "adapter_model.safetensors": weights})
    adapter = tenant.upload_bytes(archive, name="wide", base_model=base).adapter
    with grpc.insecure_channel(registry.address) as channel:  # default options: 4 MiB receive limit
        messages = list(registry_pb2_grpc.RegistryStub(channel).DownloadAdapter(
            pb.DownloadAdapterRequest(id=adapter.id, chunk_size=4 * 1024 * 1024),
            metadata=[("authorization", f"Bearer {tenant.token}")], timeout=120))
    assert b"".join(m.chunk for m in messages[1:]) == weights


def test_files_archive_and_folder_zip_are_accepted_and_identical(registry, tenant, peft_adapter):
    first = tenant.upload(peft_adapter, name="same", as_files=True)
    assert first.created
    # save_pretrained's folder zipped as is (README.md included, one folder level): same content.
    again = tenant.upload_bytes(peft_adapter.zip(extra={"customerA/README.md": b"# card"}, folder="customerA/"),
                                name="same")
    assert not again.created and again.adapter == first.adapter


def test_reupload_is_idempotent_and_new_weights_make_a_new_version(registry, tenant, peft_adapter):
    first = tenant.upload(peft_adapter, name="v").adapter
    blobs = registry.counts()["blobs"]
    repeat = tenant.upload(peft_adapter, name="v")
    assert not repeat.created and repeat.adapter == first
    assert registry.counts()["blobs"] == blobs
    second = tenant.upload(variant(peft_adapter, 1), name="v").adapter
    assert second.version == 2 and second.sha256 != first.sha256
    # Same weights, other config (alpha): a different adapter, sharing the weights blob.
    third = tenant.upload(peft_adapter.with_config(lora_alpha=16), name="v").adapter
    assert third.version == 3 and third.sha256 == first.sha256 and third.scaling == 4.0
    assert registry.counts()["blobs"] == blobs + 1

    latest = tenant.GetAdapter(pb.GetAdapterRequest(name="v"))
    assert latest.version == 3
    assert tenant.GetAdapter(pb.GetAdapterRequest(name="v", version=1)) == first
    assert tenant.GetAdapter(pb.GetAdapterRequest(id=second.id)) == second
    expect_error(grpc.StatusCode.NOT_FOUND, tenant.GetAdapter, pb.GetAdapterRequest(name="v", version=9))


def test_identical_weights_of_two_tenants_share_one_blob(registry, peft_adapter):
    a, b = registry.new_tenant(), registry.new_tenant()
    first = a.upload(variant(peft_adapter, 77), name="shared").adapter
    blobs = registry.counts()["blobs"]
    second = b.upload(variant(peft_adapter, 77), name="shared").adapter
    assert second.id != first.id and second.tenant_id == b.tenant_id and second.sha256 == first.sha256
    assert registry.counts()["blobs"] == blobs


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_half_precision_adapters_are_accepted(registry, tenant, peft_adapter, kind):
    files = to_bf16(peft_adapter) if kind == "bf16" else \
        peft_adapter.mutate(lambda t: t.update({k: v.astype(np.float16) for k, v in t.items()}))
    adapter = tenant.upload(files, name=kind).adapter
    assert tenant.download(adapter.id)[1] == files.weights


def test_rslora_subset_of_modules_and_base_override(registry, tenant, tiny_model_dir, tmp_path):
    files = make_peft_adapter(tiny_model_dir, tmp_path / "a", r=8, alpha=16, modules=["v_proj", "q_proj"],
                              use_rslora=True)
    adapter = tenant.upload(files, name="rs").adapter
    assert list(adapter.target_modules) == ["q_proj", "v_proj"] and adapter.use_rslora
    assert math.isclose(adapter.scaling, 16 / math.sqrt(8), rel_tol=1e-6)
    renamed = files.with_config(base_model_name_or_path="somewhere/else")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.upload, renamed, name="rs2")
    assert tenant.upload(renamed, name="rs2", override_base_model_check=True).created
    # A checkpoint folder elsewhere with the same last path part is the same model.
    moved = files.with_config(base_model_name_or_path=f"/mnt/models/{tiny_model_dir.name}")
    assert tenant.upload(moved, name="rs3").created


def test_unknown_base_model_or_tenant_is_not_found(registry, tenant, peft_adapter):
    before = registry.counts()
    expect_error(grpc.StatusCode.NOT_FOUND, tenant.upload, peft_adapter, name="x", base_model="nope")
    expect_error(grpc.StatusCode.NOT_FOUND, registry.admin.upload, peft_adapter, name="x", tenant="no-such-tenant")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, registry.admin.upload, peft_adapter, name="x")  # tenant required
    assert registry.admin.upload(peft_adapter, name="by-admin", tenant=tenant.tenant_name).created
    assert registry.counts()["adapters"] == before["adapters"] + 1


def test_listing_is_ordered_paged_filtered_and_latest_only(registry, tenant, peft_adapter):
    seed = 100
    for name, versions in (("beta", 3), ("alpha", 2), ("gamma", 1)):
        for _ in range(versions):
            seed += 1
            tenant.upload(variant(peft_adapter, seed), name=name)
    seen, token = [], ""
    while True:
        page = tenant.ListAdapters(pb.ListAdaptersRequest(page=generation_pb2.PageRequest(page_size=2,
                                                                                          page_token=token)))
        assert len(page.adapters) <= 2
        seen += [(a.name, a.version) for a in page.adapters]
        token = page.next_page_token
        if not token:
            break
    assert seen == [("alpha", 2), ("alpha", 1), ("beta", 3), ("beta", 2), ("beta", 1), ("gamma", 1)]
    latest = tenant.ListAdapters(pb.ListAdaptersRequest(latest_only=True)).adapters
    assert [(a.name, a.version) for a in latest] == [("alpha", 2), ("beta", 3), ("gamma", 1)]
    only_beta = tenant.ListAdapters(pb.ListAdaptersRequest(name="beta")).adapters
    assert [a.version for a in only_beta] == [3, 2, 1]
    assert not tenant.ListAdapters(pb.ListAdaptersRequest(base_model="other")).adapters
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.ListAdapters,
                 pb.ListAdaptersRequest(page=generation_pb2.PageRequest(page_token="garbage")))


def test_delete_removes_the_version_and_emits_an_event(registry, tenant, peft_adapter):
    adapter = tenant.upload(variant(peft_adapter, 5), name="gone").adapter
    events = registry.counts()["change_events"]
    tenant.DeleteAdapter(pb.DeleteAdapterRequest(id=adapter.id))
    expect_error(grpc.StatusCode.NOT_FOUND, tenant.GetAdapter, pb.GetAdapterRequest(id=adapter.id))
    expect_error(grpc.StatusCode.NOT_FOUND, tenant.download, adapter.id)
    expect_error(grpc.StatusCode.NOT_FOUND, tenant.DeleteAdapter, pb.DeleteAdapterRequest(id=adapter.id))
    assert registry.counts()["change_events"] == events + 1


def test_a_deleted_version_number_is_never_given_again(registry, tenant, peft_adapter):
    tenant.upload(variant(peft_adapter, 11), name="fin")
    v2 = tenant.upload(variant(peft_adapter, 12), name="fin").adapter
    tenant.DeleteAdapter(pb.DeleteAdapterRequest(id=v2.id))
    v3 = tenant.upload(variant(peft_adapter, 13), name="fin").adapter
    assert v3.version == 3
    expect_error(grpc.StatusCode.NOT_FOUND, tenant.GetAdapter, pb.GetAdapterRequest(name="fin", version=2))
    again = tenant.upload(variant(peft_adapter, 12), name="fin")  # v2's weights: a new version, not v2 back
    assert again.created and again.adapter.version == 4


def test_uploads_above_the_size_limit_stop_early(tmp_path, request, tiny_model_dir, peft_adapter):
    registry = start_registry("sqlite-local", tmp_path, request, tiny_model_dir, max_upload_mb=1)
    try:
        tenant = registry.new_tenant()
        big = make_zip({"adapter_config.json": peft_adapter.config,
                        "adapter_model.safetensors": np.random.default_rng(0).bytes(3 << 20)})
        error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.upload_bytes, big, name=unique("big"))
        assert "larger than the 1048576-byte limit" in error.details()
        assert registry.counts()["spool"] == 0 and registry.counts()["blobs"] == 0
    finally:
        registry.stop()
