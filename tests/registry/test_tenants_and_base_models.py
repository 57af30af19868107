"""Tenants (create, get, list, delete with cascade) and base models (register, fingerprint)."""

from __future__ import annotations

import io
import json

import grpc
import pytest

from services.common.pb.loraplex.common.v1 import generation_pb2
from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.rpc import error_info
from services.common.tiny_model import build_model_folder
from tests.registry.backends import MotoS3
from tests.registry.client import expect_error, unique
from tests.registry.conftest import start_registry


@pytest.mark.parametrize("name", ["", "Acme", "1acme", "acme_corp", "a" * 64, "acme corp", "acme\n", "a" * 63 + "\n"])
def test_tenant_names_are_checked(registry_sql, name):
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, registry_sql.admin.CreateTenant,
                         pb.CreateTenantRequest(name=name))
    assert "1-63 characters of [a-z0-9-]" in error.details()


def test_tenants_are_created_once_found_by_id_or_name_and_listed_by_name(registry_sql):
    admin, prefix = registry_sql.admin, unique("ls")
    created = [admin.CreateTenant(pb.CreateTenantRequest(name=f"{prefix}-{suffix}", display_name=suffix.upper()))
               for suffix in ("c", "a", "b")]
    assert created[0].id.startswith("tnt_") and created[0].display_name == "C"
    expect_error(grpc.StatusCode.ALREADY_EXISTS, admin.CreateTenant, pb.CreateTenantRequest(name=f"{prefix}-a"))
    assert admin.GetTenant(pb.GetTenantRequest(tenant=created[1].id)) == created[1]
    assert admin.GetTenant(pb.GetTenantRequest(tenant=f"{prefix}-a")) == created[1]
    expect_error(grpc.StatusCode.NOT_FOUND, admin.GetTenant, pb.GetTenantRequest(tenant="nobody"))
    names, token = [], ""
    while True:
        page = admin.ListTenants(pb.ListTenantsRequest(page=generation_pb2.PageRequest(page_size=2, page_token=token)))
        names += [t.name for t in page.tenants]
        token = page.next_page_token
        if not token:
            break
    assert names == sorted(names) and [n for n in names if n.startswith(prefix)] == [f"{prefix}-{s}" for s in "abc"]


def test_deleting_a_tenant_needs_force_while_it_has_deployments_and_removes_everything(registry_sql, peft_adapter):
    admin, tenant = registry_sql.admin, registry_sql.new_tenant()
    adapter = tenant.upload(peft_adapter, name="fin").adapter
    tenant.BindDeployment(pb.BindDeploymentRequest(name=unique("dep"), adapter_name="fin"))
    error = expect_error(grpc.StatusCode.FAILED_PRECONDITION, admin.DeleteTenant,
                         pb.DeleteTenantRequest(tenant=tenant.tenant_name))
    assert "still owns 1 deployment" in error.details()
    watch = admin.WatchChanges(pb.WatchChangesRequest(after_sequence=-1), timeout=30)
    assert next(watch).is_position_marker
    blobs = registry_sql.counts()["blobs"]
    admin.DeleteTenant(pb.DeleteTenantRequest(tenant=tenant.tenant_id, force=True))
    kinds = [next(watch).kind for _ in range(4)]
    watch.cancel()
    assert kinds == [pb.CHANGE_KIND_DEPLOYMENT_UNBOUND, pb.CHANGE_KIND_ADAPTER_DELETED,
                     pb.CHANGE_KIND_API_KEY_REVOKED, pb.CHANGE_KIND_TENANT_DELETED]
    expect_error(grpc.StatusCode.UNAUTHENTICATED, tenant.GetTenant, pb.GetTenantRequest())
    expect_error(grpc.StatusCode.NOT_FOUND, admin.GetAdapter, pb.GetAdapterRequest(id=adapter.id))
    expect_error(grpc.StatusCode.NOT_FOUND, admin.GetTenant, pb.GetTenantRequest(tenant=tenant.tenant_id))
    assert registry_sql.counts()["blobs"] == blobs  # weights wait for garbage collection
    expect_error(grpc.StatusCode.NOT_FOUND, admin.DeleteTenant, pb.DeleteTenantRequest(tenant=tenant.tenant_id))


def test_base_model_fingerprint_comes_from_config_json(registry_sql, tiny_model_dir):
    model = registry_sql.admin.GetBaseModel(pb.GetBaseModelRequest(name="tiny"))
    fp = model.fingerprint
    assert (fp.model_type, fp.num_layers, fp.hidden_size, fp.vocab_size) == ("llama", 2, 64, 512)
    assert (fp.num_attention_heads, fp.num_key_value_heads, fp.head_dim, fp.intermediate_size,
            fp.max_position_embeddings) == (4, 2, 16, 128, 512)
    shapes = {m.module: (m.in_features, m.out_features) for m in fp.modules}
    assert shapes == {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
                      "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    assert len(fp.digest) == 64 and model.location == str(tiny_model_dir)


def test_base_model_registration_rules(registry_sql, tiny_model_dir, tmp_path):
    admin = registry_sql.admin
    again = admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name="tiny", location=str(tiny_model_dir)))
    assert again == admin.GetBaseModel(pb.GetBaseModelRequest(name="tiny"))
    expect_error(grpc.StatusCode.ALREADY_EXISTS, admin.RegisterBaseModel,
                 pb.RegisterBaseModelRequest(name="tiny", location=str(tmp_path)))
    copy = admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name=unique("copy"), location=str(tiny_model_dir)))
    assert copy.fingerprint.digest == again.fingerprint.digest
    qwen = build_model_folder(tmp_path / "qwen3", arch="qwen3")
    other = admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name=unique("qwen3"), location=str(qwen)))
    assert other.fingerprint.model_type == "qwen3" and other.fingerprint.digest != again.fingerprint.digest
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    for location, message in [(str(tmp_path / "empty"), "no readable config.json"),
                              ("relative/path", "absolute folder path"),
                              (str(tmp_path / "gpt2"), "model_type 'gpt2' is not supported"),
                              ("s3://bucket/model/", "S3 URI")]:
        if registry_sql.ctx.store.kind == "s3" and location.startswith("s3://"):
            continue
        error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, admin.RegisterBaseModel,
                             pb.RegisterBaseModelRequest(name=unique("bad"), location=location))
        assert message in error.details()
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, admin.RegisterBaseModel,
                 pb.RegisterBaseModelRequest(name="bad name", location=str(tiny_model_dir)))
    expect_error(grpc.StatusCode.NOT_FOUND, admin.GetBaseModel, pb.GetBaseModelRequest(name="nope"))


@pytest.mark.parametrize("field, value, message", [
    ("max_position_embeddings", 10**10, "must be a positive integer of at most 4294967295"),  # above uint32
    ("head_dim", 2**31, "at most 4294967295"),  # q_proj: 4 heads x 2^31 features
    ("hidden_size", "1" * 5000, "not valid JSON"),  # an integer literal of 5000 digits
    ("hidden_size", "[" * 100_000 + "]" * 100_000, "not valid JSON"),
])
def test_a_config_json_the_api_cannot_carry_is_refused_at_registration(registry_sql, tiny_model_dir, tmp_path,
                                                                       field, value, message):
    """Such a base model used to be stored, then made every GetBaseModel and ListBaseModels INTERNAL."""
    config = json.loads((tiny_model_dir / "config.json").read_text())
    text = json.dumps({**config, field: "@@"}).replace('"@@"', value if isinstance(value, str) else str(value))
    (tmp_path / "config.json").write_text(text)
    admin, name = registry_sql.admin, unique("huge")
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, admin.RegisterBaseModel,
                         pb.RegisterBaseModelRequest(name=name, location=str(tmp_path)))
    assert message in error.details()
    expect_error(grpc.StatusCode.NOT_FOUND, admin.GetBaseModel, pb.GetBaseModelRequest(name=name))
    assert "tiny" in [model.name for model in admin.ListBaseModels(pb.ListBaseModelsRequest(
        page=generation_pb2.PageRequest(page_size=1000))).base_models]


def test_a_location_with_or_without_a_trailing_slash_is_the_same_base_model(registry_sql, tiny_model_dir):
    """Used to be ALREADY_EXISTS "another location". The row keeps the location as first given."""
    admin, name = registry_sql.admin, unique("slash")
    first = admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name=name, location=f"{tiny_model_dir}/"))
    again = admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name=name, location=str(tiny_model_dir)))
    assert again == first and first.location == f"{tiny_model_dir}/"
    tiny = admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name="tiny", location=f"{tiny_model_dir}//"))
    assert tiny.location == str(tiny_model_dir)
    expect_error(grpc.StatusCode.ALREADY_EXISTS, admin.RegisterBaseModel,
                 pb.RegisterBaseModelRequest(name=name, location=f"{tiny_model_dir}/x"))


@pytest.mark.parametrize("field, size", [("description", 4096), ("location", 1024)])
def test_base_model_description_and_location_have_a_length_limit(registry_sql, tiny_model_dir, field, size):
    admin, location = registry_sql.admin, str(tiny_model_dir)
    longest = {"description": "d" * size, "location": location + "/" * (size - len(location))}[field]
    fits = {"location": location, field: longest}
    model = admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name=unique("long"), **fits))
    assert getattr(model, field) == longest
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, admin.RegisterBaseModel, pb.RegisterBaseModelRequest(
        name=unique("long"), **{**fits, field: longest + "/"}))
    assert f"longer than {size} characters" in error.details() and error_info(error).metadata["field"] == field


def test_base_model_names_are_checked_to_the_end(registry_sql, tiny_model_dir):
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, registry_sql.admin.RegisterBaseModel,
                         pb.RegisterBaseModelRequest(name="tiny-2\n", location=str(tiny_model_dir)))
    assert "must be 1-128 characters" in error.details()


def test_base_model_in_s3_is_read_from_the_bucket(tmp_path, request, tiny_model_dir):
    registry = start_registry("sqlite-s3", tmp_path, request, tiny_model_dir)
    try:
        client = registry.ctx.store.client
        bucket = unique("models")
        client.make_bucket(bucket)
        config = (tiny_model_dir / "config.json").read_bytes()
        client.put_object(bucket, "tiny/config.json", io.BytesIO(config), len(config))
        model = registry.admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name="s3-tiny",
                                                                             location=f"s3://{bucket}/tiny/"))
        local = registry.admin.GetBaseModel(pb.GetBaseModelRequest(name="tiny"))
        assert model.fingerprint.digest == local.fingerprint.digest
        error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, registry.admin.RegisterBaseModel,
                             pb.RegisterBaseModelRequest(name="s3-missing", location=f"s3://{bucket}/missing/"))
        assert "no readable config.json" in error.details()
        same = registry.admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name="s3-tiny",
                                                                            location=f"s3://{bucket}/tiny"))
        assert same == model
    finally:
        registry.stop()


def test_base_model_in_s3_while_the_endpoint_is_down_is_unavailable(tmp_path, request, tiny_model_dir):
    """Used to be INTERNAL. The store says nothing about the location, so the caller may retry."""
    moto = MotoS3(tmp_path / "moto.log").start()
    registry = start_registry("sqlite-s3", tmp_path / "registry", request, tiny_model_dir, s3_endpoint=moto.endpoint)
    try:
        moto.stop()
        error = expect_error(grpc.StatusCode.UNAVAILABLE, registry.admin.RegisterBaseModel,
                             pb.RegisterBaseModelRequest(name="s3-down", location="s3://models/tiny/"))
        assert "the blob store is down" in error.details() and moto.endpoint in error.details()
        assert error_info(error).reason == "BLOB_STORE_UNAVAILABLE"
        expect_error(grpc.StatusCode.NOT_FOUND, registry.admin.GetBaseModel, pb.GetBaseModelRequest(name="s3-down"))
    finally:
        registry.stop()
        moto.stop()
