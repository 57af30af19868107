"""Auth and tenant isolation: API keys are verified by the Registry; another tenant's datasets
and jobs are NOT_FOUND (never PERMISSION_DENIED: existence is not leaked); operators see all."""

from __future__ import annotations

import grpc
import pytest

from services.common.pb.loraplex.registry.v1 import registry_pb2 as rpb
from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from services.common.rpc import error_info
from tests.registry.client import expect_error
from tests.trainer.harness import finance_chat_lines


@pytest.fixture(scope="module")
def owned(registry_admin, trainer):
    """Tenant A with a dataset and a finished job; tenant B with nothing."""
    import uuid

    tenants = []
    for prefix in ("alice", "bob"):
        tenant = registry_admin.CreateTenant(rpb.CreateTenantRequest(name=f"{prefix}-{uuid.uuid4().hex[:8]}"))
        key = registry_admin.CreateApiKey(rpb.CreateApiKeyRequest(tenant=tenant.id, name="test"))
        tenants.append((tenant, key.secret, trainer.client(key.secret)))
    (alice, _, alice_client), (bob, bob_key, bob_client) = tenants
    dataset = alice_client.upload(finance_chat_lines())
    job = alice_client.wait(alice_client.start(dataset.id, max_steps=2).id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    return {"alice": alice, "bob": bob, "bob_key": bob_key, "alice_client": alice_client, "bob_client": bob_client,
            "dataset": dataset, "job": job}


def test_another_tenants_datasets_and_jobs_are_not_found(owned):
    bob, dataset, job = owned["bob_client"], owned["dataset"], owned["job"]
    for rpc, request in [("GetDataset", pb.GetDatasetRequest(id=dataset.id)),
                         ("DeleteDataset", pb.DeleteDatasetRequest(id=dataset.id)),
                         ("GetJob", pb.GetJobRequest(id=job.id)),
                         ("CancelJob", pb.CancelJobRequest(id=job.id))]:
        error = expect_error(grpc.StatusCode.NOT_FOUND, bob.call, rpc, request)
        assert owned["alice"].name not in error.details()
    expect_error(grpc.StatusCode.NOT_FOUND, bob.watch, job.id)
    expect_error(grpc.StatusCode.NOT_FOUND, bob.start, dataset.id)  # cannot train on it either
    assert bob.call("ListDatasets", pb.ListDatasetsRequest()).datasets == []
    assert bob.call("ListJobs", pb.ListJobsRequest()).jobs == []
    # Naming the other tenant explicitly does not help.
    alice = owned["alice"]
    for ref in (alice.id, alice.name):
        expect_error(grpc.StatusCode.NOT_FOUND, bob.call, "ListDatasets", pb.ListDatasetsRequest(tenant=ref))
        expect_error(grpc.StatusCode.NOT_FOUND, bob.call, "ListJobs", pb.ListJobsRequest(tenant=ref))
        expect_error(grpc.StatusCode.NOT_FOUND, bob.upload, finance_chat_lines(), tenant=ref)
        expect_error(grpc.StatusCode.NOT_FOUND, bob.start, dataset.id, tenant=ref)
    # The owner still sees everything, by empty or own tenant reference.
    mine = owned["alice_client"]
    assert mine.call("GetDataset", pb.GetDatasetRequest(id=dataset.id)).id == dataset.id
    assert [d.id for d in mine.call("ListDatasets", pb.ListDatasetsRequest(tenant=alice.name)).datasets] == [dataset.id]
    assert [j.id for j in mine.call("ListJobs", pb.ListJobsRequest(tenant=alice.id)).jobs] == [job.id]


def test_operators_see_every_tenant_and_must_name_one_to_create(owned, admin):
    dataset, job, alice = owned["dataset"], owned["job"], owned["alice"]
    assert admin.call("GetJob", pb.GetJobRequest(id=job.id)).tenant_id == alice.id
    listed = admin.call("ListDatasets", pb.ListDatasetsRequest(tenant=alice.name))
    assert [d.id for d in listed.datasets] == [dataset.id]
    everyone = admin.call("ListJobs", pb.ListJobsRequest(page={"page_size": 1000}))
    assert job.id in {j.id for j in everyone.jobs}
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, admin.upload, finance_chat_lines())
    assert error_info(error).metadata["field"] == "header.tenant"
    expect_error(grpc.StatusCode.NOT_FOUND, admin.upload, finance_chat_lines(), tenant="no-such-tenant")
    on_behalf = admin.upload(finance_chat_lines(), tenant=owned["bob"].name)
    assert on_behalf.tenant_id == owned["bob"].id
    assert [d.id for d in owned["bob_client"].call("ListDatasets", pb.ListDatasetsRequest()).datasets] == \
        [on_behalf.id]


def test_missing_bad_and_revoked_credentials_are_unauthenticated(owned, trainer, registry_admin):
    stub, request = trainer.stub, pb.ListJobsRequest()
    expect_error(grpc.StatusCode.UNAUTHENTICATED, stub.ListJobs, request, timeout=30)
    expect_error(grpc.StatusCode.UNAUTHENTICATED, stub.ListJobs, request, metadata=[("authorization", "Basic x")],
                 timeout=30)
    expect_error(grpc.StatusCode.UNAUTHENTICATED, trainer.client("lpx_not-a-key").call, "ListJobs", request)
    expect_error(grpc.StatusCode.UNAUTHENTICATED, trainer.client("lpx_not-a-key").watch, owned["job"].id)

    bob = owned["bob"]
    extra = registry_admin.CreateApiKey(rpb.CreateApiKeyRequest(tenant=bob.id, name="to-revoke"))
    client = trainer.client(extra.secret)
    client.call("ListJobs", request)
    registry_admin.RevokeApiKey(rpb.RevokeApiKeyRequest(key_id=extra.key.id))
    expect_error(grpc.StatusCode.UNAUTHENTICATED, client.call, "ListJobs", request)  # cache is off in tests
