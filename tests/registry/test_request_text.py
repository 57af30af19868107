"""Request strings holding a NUL character are INVALID_ARGUMENT naming the field, on both
databases alike, and write nothing. PostgreSQL text cannot hold U+0000, so such a display
name, description or even a looked-up id used to end as INTERNAL there while SQLite stored
it; a base model location with one was INTERNAL on both."""

from __future__ import annotations

import grpc
import pytest

from services.common.pb.loraplex.common.v1 import generation_pb2
from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.rpc import error_info
from tests.registry.client import expect_error, unique

NUL = "a\x00b"

# name -> (caller: "admin" | "tenant", rpc, request builder(tenant client), field named)
CASES = {
    "tenant_display_name": ("admin", "CreateTenant", lambda t: pb.CreateTenantRequest(name=unique("n"),
                                                                                     display_name=NUL),
                            "display_name"),
    "get_tenant": ("admin", "GetTenant", lambda t: pb.GetTenantRequest(tenant=NUL), "tenant"),
    "key_name": ("admin", "CreateApiKey", lambda t: pb.CreateApiKeyRequest(tenant=t.tenant_id, name=NUL), "name"),
    "revoke_key": ("tenant", "RevokeApiKey", lambda t: pb.RevokeApiKeyRequest(key_id="key_" + NUL), "key_id"),
    "base_model_location": ("admin", "RegisterBaseModel",
                            lambda t: pb.RegisterBaseModelRequest(name=unique("m"), location="/models/" + NUL),
                            "location"),
    "base_model_description": ("admin", "RegisterBaseModel",
                               lambda t: pb.RegisterBaseModelRequest(name=unique("m"), location="/x", description=NUL),
                               "description"),
    "get_adapter_id": ("tenant", "GetAdapter", lambda t: pb.GetAdapterRequest(id="adp_" + NUL), "id"),
    "list_adapters_name": ("tenant", "ListAdapters", lambda t: pb.ListAdaptersRequest(name=NUL), "name"),
    "page_token": ("admin", "ListTenants",
                   lambda t: pb.ListTenantsRequest(page=generation_pb2.PageRequest(page_token=NUL)),
                   "page.page_token"),
    "resolve_name": ("tenant", "ResolveDeployment", lambda t: pb.ResolveDeploymentRequest(name=NUL), "name"),
    "bind_adapter_name": ("tenant", "BindDeployment",
                          lambda t: pb.BindDeploymentRequest(name=unique("d"), adapter_name=NUL), "adapter_name"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_nul_in_a_request_string_is_invalid_argument(registry_sql, case):
    caller, rpc, build, field = CASES[case]
    tenant = registry_sql.new_tenant()
    client = registry_sql.admin if caller == "admin" else tenant
    before = registry_sql.counts()
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, getattr(client, rpc), build(tenant))
    info = error_info(error)
    assert info.reason == "NUL_CHARACTER" and info.metadata["field"] == field
    assert field in error.details()
    assert registry_sql.counts() == before


@pytest.mark.parametrize("header, field", [({"description": NUL}, "header.description"),
                                           ({"labels": {"team": NUL}}, "header.labels['team']"),
                                           ({"name": NUL}, "header.name")])
def test_nul_in_an_upload_header_is_invalid_argument(registry_sql, peft_adapter, header, field):
    tenant = registry_sql.new_tenant()
    before = registry_sql.counts()
    kwargs = {"name": "fin", **header}
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.upload_bytes, peft_adapter.zip(), **kwargs)
    assert error_info(error).metadata["field"] == field
    assert registry_sql.counts() == before
