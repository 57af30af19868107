"""Page tokens continue only the query they came from: same listing, same filters, same caller
scope. Anything else is INVALID_ARGUMENT naming page.page_token, never a silently wrong page."""

from __future__ import annotations

import base64

import grpc
import pytest

from services.common.errors import InvalidArgument
from services.common.pb.loraplex.common.v1 import generation_pb2
from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.rpc import error_info
from services.registry import paging
from tests.registry.client import expect_error, unique
from tests.registry.lora_files import variant


def page(size: int = 0, token: str = "") -> generation_pb2.PageRequest:
    return generation_pb2.PageRequest(page_size=size, page_token=token)


def refused(call, request) -> None:
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, call, request)
    info = error_info(error)
    assert info.reason == "BAD_PAGE_TOKEN" and info.metadata["field"] == "page.page_token"


@pytest.fixture(scope="module")
def lister(registry_sql, peft_adapter):
    """A tenant with two adapter names of two versions each, and one deployment per name."""
    client = registry_sql.new_tenant("pager")
    for seed, name in enumerate(("up1", "up1", "up2", "up2")):
        client.upload(variant(peft_adapter, 300 + seed), name=name)
    for name in ("up1", "up2"):
        client.BindDeployment(pb.BindDeploymentRequest(name=unique(f"{client.tenant_name}-{name}"), adapter_name=name))
    return client


def test_a_token_is_refused_with_other_filters(lister):
    first = lister.ListAdapters(pb.ListAdaptersRequest(page=page(1)))
    assert first.next_page_token
    for changed in (pb.ListAdaptersRequest(name="up2"), pb.ListAdaptersRequest(base_model="tiny"),
                    pb.ListAdaptersRequest(latest_only=True)):
        changed.page.CopyFrom(page(1, first.next_page_token))
        refused(lister.ListAdapters, changed)
    # The same query continues, whatever the page size.
    rest = lister.ListAdapters(pb.ListAdaptersRequest(page=page(10, first.next_page_token)))
    assert [(a.name, a.version) for a in rest.adapters] == [("up1", 1), ("up2", 2), ("up2", 1)]


def test_a_token_is_refused_for_another_caller(registry_sql, lister):
    token = lister.ListAdapters(pb.ListAdaptersRequest(page=page(1))).next_page_token
    other = registry_sql.new_tenant("other")
    refused(other.ListAdapters, pb.ListAdaptersRequest(page=page(1, token)))
    # The admin asking for the same tenant is another caller scope too.
    refused(registry_sql.admin.ListAdapters, pb.ListAdaptersRequest(tenant=lister.tenant_id, page=page(1, token)))
    admin_token = registry_sql.admin.ListDeployments(pb.ListDeploymentsRequest(tenant=lister.tenant_id,
                                                                               page=page(1))).next_page_token
    assert admin_token
    refused(registry_sql.admin.ListDeployments, pb.ListDeploymentsRequest(tenant=other.tenant_id,
                                                                          page=page(1, admin_token)))
    refused(lister.ListDeployments, pb.ListDeploymentsRequest(page=page(1, admin_token)))
    same = registry_sql.admin.ListDeployments(pb.ListDeploymentsRequest(tenant=lister.tenant_id,
                                                                        page=page(1, admin_token)))
    assert len(same.deployments) == 1 and same.deployments[0].adapter_name == "up2"


def test_a_token_is_refused_by_another_listing(registry_sql, lister):
    token = lister.ListDeployments(pb.ListDeploymentsRequest(page=page(1))).next_page_token
    refused(lister.ListAdapters, pb.ListAdaptersRequest(page=page(1, token)))
    refused(lister.ListApiKeys, pb.ListApiKeysRequest(page=page(1, token)))
    refused(lister.ListBaseModels, pb.ListBaseModelsRequest(page=page(1, token)))
    refused(lister.ListAdapters, pb.ListAdaptersRequest(page=page(1, "garbage")))


def test_page_size_zero_means_fifty(registry_sql):
    admin = registry_sql.admin
    for _ in range(paging.DEFAULT_PAGE_SIZE + 1):
        admin.CreateTenant(pb.CreateTenantRequest(name=unique("many")))
    first = admin.ListTenants(pb.ListTenantsRequest())
    assert len(first.tenants) == 50 and first.next_page_token
    assert len(admin.ListTenants(pb.ListTenantsRequest(page=page(51))).tenants) == 51


def test_tokens_without_a_query_keep_working_for_other_listings():
    """The Trainer's listings call page_request without a query: their tokens still round-trip."""
    rows, token = paging.split(list(range(5)), paging.page_request("trainer_jobs", 2), lambda n: [n])
    assert rows == [0, 1] and paging.page_request("trainer_jobs", 2, token).after == [1]
    with pytest.raises(InvalidArgument):
        paging.page_request("trainer_jobs", 2, token, tenant="tnt_a")
    with pytest.raises(InvalidArgument):
        paging.page_request("trainer_datasets", 2, token)
    # Filters are one query whatever order they are given in.
    _, bound = paging.split([1, 2], paging.page_request("x", 1, tenant="a", name="b"), lambda n: [n])
    assert paging.page_request("x", 1, bound, name="b", tenant="a").after == [1]


def test_a_garbled_token_is_invalid_argument_not_internal(registry_sql):
    """Deep JSON nesting made the decoder raise RecursionError, which ended as INTERNAL."""
    deep = base64.urlsafe_b64encode(b"[" * 100_000 + b"]" * 100_000).decode()
    refused(registry_sql.admin.ListTenants, pb.ListTenantsRequest(page=page(1, deep)))
