"""Provisioning: the base model, one tenant + API key per customer, their datasets.

Safe to run again against the same stack: an existing tenant or base model is reused, a new
API key is issued each run (secrets are shown only when created), datasets are uploaded again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grpc

from services.common.pb.loraplex.registry.v1 import registry_pb2 as rpb
from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as tpb
from services.demo.clients import Channels
from services.demo.customers import Customer

CHUNK = 256 * 1024


@dataclasses.dataclass(frozen=True)
class Tenant:
    customer: Customer
    tenant_id: str
    api_key: str


@dataclasses.dataclass(frozen=True)
class Dataset:
    tenant: Tenant
    dataset_id: str
    num_examples: int


def register_base_model(channels: Channels, name: str, location: str) -> rpb.BaseModel:
    """Same name and location again returns the existing row (the Registry is idempotent)."""
    registry = channels.registry(channels.endpoints.admin_token)
    return registry.RegisterBaseModel(rpb.RegisterBaseModelRequest(
        name=name, location=location, description="base model of the loraplex demo"))


def create_tenant(channels: Channels, customer: Customer) -> Tenant:
    registry = channels.registry(channels.endpoints.admin_token)
    try:
        tenant = registry.CreateTenant(rpb.CreateTenantRequest(name=customer.tenant,
                                                               display_name=customer.display_name))
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        tenant = registry.GetTenant(rpb.GetTenantRequest(tenant=customer.tenant))
    key = registry.CreateApiKey(rpb.CreateApiKeyRequest(tenant=tenant.id, name="demo"))
    return Tenant(customer, tenant.id, key.secret)


def _upload_messages(header: tpb.UploadDatasetHeader, body: bytes) -> Iterator[tpb.UploadDatasetRequest]:
    yield tpb.UploadDatasetRequest(header=header)
    for start in range(0, len(body), CHUNK):
        yield tpb.UploadDatasetRequest(chunk=body[start:start + CHUNK])


def upload_dataset(channels: Channels, tenant: Tenant, base_model: str) -> Dataset:
    """Uploaded with the tenant's own key: the Trainer scopes it to that tenant."""
    header = tpb.UploadDatasetHeader(name=f"{tenant.customer.domain}-demo", base_model=base_model,
                                     format=tpb.DATASET_FORMAT_CHAT)
    body = tenant.customer.dataset_path.read_bytes()
    trainer = channels.trainer(tenant.api_key)
    dataset = trainer.UploadDataset(_upload_messages(header, body))
    return Dataset(tenant, dataset.id, dataset.num_examples)
