"""Authentication, admin-only RPCs, tenant isolation and API key life cycle (both databases)."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from sqlalchemy import select, update

from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.rpc import error_info
from services.registry.db.models import ApiKey
from tests.registry.client import Client, expect_error, sha256
from tests.registry.backends import InProcessRegistry
from tests.registry.conftest import registry_config

ADMIN_ONLY = [
    ("CreateTenant", pb.CreateTenantRequest(name="x")),
    ("ListTenants", pb.ListTenantsRequest()),
    ("DeleteTenant", pb.DeleteTenantRequest(tenant="x")),
    ("CreateApiKey", pb.CreateApiKeyRequest(tenant="x")),
    ("VerifyApiKey", pb.VerifyApiKeyRequest(secret="x")),
    ("RegisterBaseModel", pb.RegisterBaseModelRequest(name="x", location="/x")),
    ("CollectGarbage", pb.CollectGarbageRequest()),
    ("WatchChanges", pb.WatchChangesRequest()),
]


def test_missing_malformed_or_unknown_tokens_are_unauthenticated(registry_sql):
    stub = registry_sql.stub
    error = expect_error(grpc.StatusCode.UNAUTHENTICATED, stub.ListBaseModels, pb.ListBaseModelsRequest())
    assert "authorization: Bearer" in error.details()
    for metadata in ([("authorization", "Basic abc")], [("authorization", "Bearer ")],
                     [("authorization", "Bearer lpx_not-a-key")], [("authorization", "Bearer test-admin-tokenX")]):
        expect_error(grpc.StatusCode.UNAUTHENTICATED, stub.ListBaseModels, pb.ListBaseModelsRequest(),
                     metadata=metadata)
    expect_error(grpc.StatusCode.UNAUTHENTICATED, stub.UploadAdapter, iter([]))
    expect_error(grpc.StatusCode.UNAUTHENTICATED, stub.DownloadAdapter, pb.DownloadAdapterRequest(id="x"))


@pytest.mark.parametrize(("rpc", "request_message"), ADMIN_ONLY, ids=[rpc for rpc, _ in ADMIN_ONLY])
def test_admin_only_rpcs_refuse_tenant_keys(registry_sql, rpc, request_message):
    tenant = registry_sql.new_tenant()
    error = expect_error(grpc.StatusCode.PERMISSION_DENIED, getattr(tenant, rpc), request_message)
    assert "admin token" in error.details() and error_info(error).reason == "ADMIN_ONLY"


def test_a_tenant_key_sees_only_its_own_tenant(registry_sql, peft_adapter):
    alice, bob = registry_sql.new_tenant("alice"), registry_sql.new_tenant("bob")
    adapter = alice.upload(peft_adapter, name="secret-sauce").adapter
    alice.BindDeployment(pb.BindDeploymentRequest(name=f"{alice.tenant_name}-model", adapter_name="secret-sauce"))
    assert alice.GetTenant(pb.GetTenantRequest()).id == alice.tenant_id
    assert alice.GetTenant(pb.GetTenantRequest(tenant=alice.tenant_name)).id == alice.tenant_id

    missing = expect_error(grpc.StatusCode.NOT_FOUND, bob.GetAdapter, pb.GetAdapterRequest(id="adp_nope")).details()
    stolen = expect_error(grpc.StatusCode.NOT_FOUND, bob.GetAdapter, pb.GetAdapterRequest(id=adapter.id)).details()
    assert stolen.replace(adapter.id, "adp_nope") == missing  # existence is not leaked
    for call, request in [
        (bob.GetTenant, pb.GetTenantRequest(tenant=alice.tenant_id)),
        (bob.GetAdapter, pb.GetAdapterRequest(tenant=alice.tenant_name, name="secret-sauce")),
        (bob.ListAdapters, pb.ListAdaptersRequest(tenant=alice.tenant_id)),
        (bob.DeleteAdapter, pb.DeleteAdapterRequest(id=adapter.id)),
        (bob.ListDeployments, pb.ListDeploymentsRequest(tenant=alice.tenant_name)),
        (bob.ResolveDeployment, pb.ResolveDeploymentRequest(name=f"{alice.tenant_name}-model")),
        (bob.UnbindDeployment, pb.UnbindDeploymentRequest(name=f"{alice.tenant_name}-model")),
        (bob.BindDeployment, pb.BindDeploymentRequest(name="steal", tenant=alice.tenant_id,
                                                       adapter_name="secret-sauce")),
        (bob.ListApiKeys, pb.ListApiKeysRequest(tenant=alice.tenant_id)),
    ]:
        expect_error(grpc.StatusCode.NOT_FOUND, call, request)
    expect_error(grpc.StatusCode.NOT_FOUND, bob.download, adapter.id)
    expect_error(grpc.StatusCode.NOT_FOUND, bob.upload, peft_adapter, name="x", tenant=alice.tenant_name)
    assert not bob.ListAdapters(pb.ListAdaptersRequest()).adapters
    assert alice.download(adapter.id)[1] == peft_adapter.weights
    # Base models are shared by everyone: any authenticated caller may read them.
    assert [m.name for m in bob.ListBaseModels(pb.ListBaseModelsRequest()).base_models][:1] == ["tiny"]


def test_keys_are_shown_once_stored_hashed_verified_and_revoked(registry_sql):
    admin = registry_sql.admin
    tenant = admin.CreateTenant(pb.CreateTenantRequest(name="keyed-" + registry_sql.backend.split("-")[0]))
    created = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant=tenant.name, name="prod-backend"))
    secret, key = created.secret, created.key
    assert secret.startswith("lpx_") and len(secret) >= 40 and key.prefix == secret[:12]
    assert not key.HasField("expires_at") and not key.HasField("revoked_at")
    with registry_sql.ctx.db.read() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.id == key.id))
        assert row.secret_sha256 == sha256(secret.encode())
        assert all(secret not in str(getattr(row, column.name)) for column in ApiKey.__table__.columns)

    verified = admin.VerifyApiKey(pb.VerifyApiKeyRequest(secret=secret))
    assert verified.tenant.id == tenant.id and verified.key.id == key.id
    listed = admin.ListApiKeys(pb.ListApiKeysRequest(tenant=tenant.id)).keys
    assert [k.id for k in listed] == [key.id]
    as_tenant = Client(registry_sql.stub, secret)
    assert as_tenant.ListApiKeys(pb.ListApiKeysRequest()).keys[0].prefix == key.prefix

    revoked = as_tenant.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=key.id))  # a tenant may revoke its own key
    assert revoked.HasField("revoked_at")
    assert admin.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=key.id)).revoked_at == revoked.revoked_at  # idempotent
    expect_error(grpc.StatusCode.UNAUTHENTICATED, admin.VerifyApiKey, pb.VerifyApiKeyRequest(secret=secret))
    expect_error(grpc.StatusCode.UNAUTHENTICATED, as_tenant.GetTenant, pb.GetTenantRequest())
    expect_error(grpc.StatusCode.NOT_FOUND, admin.RevokeApiKey, pb.RevokeApiKeyRequest(key_id="key_nope"))
    expect_error(grpc.StatusCode.NOT_FOUND, admin.CreateApiKey, pb.CreateApiKeyRequest(tenant="no-such-tenant"))


def test_expired_keys_stop_working(registry_sql):
    tenant = registry_sql.new_tenant()
    created = registry_sql.admin.CreateApiKey(pb.CreateApiKeyRequest(tenant=tenant.tenant_id, ttl_seconds=3600))
    assert created.key.expires_at.seconds > created.key.created_at.seconds + 3500
    Client(registry_sql.stub, created.secret).GetTenant(pb.GetTenantRequest())
    with registry_sql.ctx.db.write() as session:  # let an hour pass
        session.execute(update(ApiKey).where(ApiKey.id == created.key.id)
                        .values(expires_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)))
    expect_error(grpc.StatusCode.UNAUTHENTICATED, Client(registry_sql.stub, created.secret).GetTenant,
                 pb.GetTenantRequest())
    expect_error(grpc.StatusCode.UNAUTHENTICATED, registry_sql.admin.VerifyApiKey,
                 pb.VerifyApiKeyRequest(secret=created.secret))


def test_admin_must_name_the_tenant_of_tenant_scoped_calls(registry_sql):
    for call, request in [(registry_sql.admin.ListAdapters, pb.ListAdaptersRequest()),
                          (registry_sql.admin.ListDeployments, pb.ListDeploymentsRequest())]:
        error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, call, request)
        assert "tenant is required with the admin token" in error.details()


EMPTY_IDS = [
    ("RevokeApiKey", pb.RevokeApiKeyRequest(), "key_id"),
    ("GetBaseModel", pb.GetBaseModelRequest(), "name"),
    ("GetAdapter", pb.GetAdapterRequest(), "name"),
    ("DeleteAdapter", pb.DeleteAdapterRequest(), "id"),
    ("DownloadAdapter", pb.DownloadAdapterRequest(), "id"),
    ("BindDeployment", pb.BindDeploymentRequest(adapter_name="x"), "name"),
    ("UnbindDeployment", pb.UnbindDeploymentRequest(), "name"),
    ("ResolveDeployment", pb.ResolveDeploymentRequest(), "name"),
]


@pytest.mark.parametrize(("rpc", "request_message", "field"), EMPTY_IDS, ids=[rpc for rpc, _, _ in EMPTY_IDS])
def test_an_empty_id_or_name_is_invalid_not_unknown(registry_sql, rpc, request_message, field):
    tenant = registry_sql.new_tenant()
    for caller in (tenant, registry_sql.admin):
        error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, getattr(caller, rpc), request_message)
        assert error_info(error).metadata["field"] == field, error.details()


def test_an_upload_without_a_base_model_is_invalid(registry_sql, peft_adapter):
    tenant = registry_sql.new_tenant()
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.upload, peft_adapter, name="x", base_model="")
    assert error_info(error).metadata["field"] == "header.base_model"


def test_without_an_admin_token_no_one_is_admin(tmp_path, request, tiny_model_dir):
    registry = InProcessRegistry(registry_config("sqlite-local", tmp_path, request, admin_token="")).start()
    try:
        for token in ("", "test-admin-token", "anything"):
            metadata = [("authorization", f"Bearer {token}")]
            expect_error(grpc.StatusCode.UNAUTHENTICATED, registry.stub.CreateTenant,
                         pb.CreateTenantRequest(name="x"), metadata=metadata)
    finally:
        registry.stop()
