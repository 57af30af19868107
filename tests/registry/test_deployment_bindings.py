"""Deployments: bind, resolve (latest or pinned), replace, unbind, list, and the delete rules."""

from __future__ import annotations

import grpc
import pytest

from services.common.pb.loraplex.common.v1 import generation_pb2
from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.rpc import error_info
from tests.registry.client import expect_error, unique
from tests.registry.lora_files import variant


@pytest.fixture
def owner(registry_sql):
    return registry_sql.new_tenant("owner")


def bind(client, name, adapter_name, version=0, **kwargs):
    return client.BindDeployment(pb.BindDeploymentRequest(name=name, adapter_name=adapter_name,
                                                          adapter_version=version, **kwargs))


def resolve(client, name, **kwargs):
    return client.ResolveDeployment(pb.ResolveDeploymentRequest(name=name, **kwargs))


def test_latest_follows_new_versions_and_pinned_stays(registry_sql, owner, peft_adapter):
    v1 = owner.upload(variant(peft_adapter, 1), name="fin").adapter
    latest, pinned = unique("base-llm-with-fin"), unique("fin-v1")
    bound = bind(owner, latest, "fin", base_model="tiny")
    assert (bound.tenant_id, bound.base_model, bound.adapter_name, bound.adapter_version) == \
        (owner.tenant_id, "tiny", "fin", 0)
    bind(owner, pinned, "fin", version=1)  # base model taken from the adapter
    resolved = resolve(owner, latest)
    assert resolved.adapter == v1 and resolved.base_model.name == "tiny" and resolved.deployment == bound
    v2 = owner.upload(variant(peft_adapter, 2), name="fin").adapter
    assert resolve(owner, latest).adapter == v2
    assert resolve(owner, pinned).adapter == v1
    # The router resolves with the admin token on behalf of the caller's tenant.
    via_router = resolve(registry_sql.admin, latest, tenant=owner.tenant_id)
    assert via_router.adapter == v2
    other = registry_sql.new_tenant()
    expect_error(grpc.StatusCode.NOT_FOUND, resolve, registry_sql.admin, latest, tenant=other.tenant_id)
    # An operator naming no tenant finds whoever owns a name (names are global): one call, where
    # the trainer checked a job's deployment name by listing every tenant's deployments.
    assert resolve(registry_sql.admin, latest).deployment.tenant_id == owner.tenant_id
    expect_error(grpc.StatusCode.NOT_FOUND, resolve, registry_sql.admin, unique("unbound"))
    expect_error(grpc.StatusCode.NOT_FOUND, resolve, other, latest)  # a tenant key still sees only its own


def test_names_are_unique_and_replace_is_only_for_the_owner(registry_sql, owner, peft_adapter):
    owner.upload(variant(peft_adapter, 3), name="a")
    owner.upload(variant(peft_adapter, 4), name="b")
    name = unique("shared-name")
    first = bind(owner, name, "a")
    error = expect_error(grpc.StatusCode.ALREADY_EXISTS, bind, owner, name, "b")
    assert "pass replace" in error.details()
    rebound = bind(owner, name, "b", replace=True)
    assert rebound.adapter_name == "b" and rebound.created_at == first.created_at
    assert rebound.updated_at.ToDatetime() >= first.updated_at.ToDatetime()
    intruder = registry_sql.new_tenant()
    intruder.upload(variant(peft_adapter, 5), name="a")
    error = expect_error(grpc.StatusCode.ALREADY_EXISTS, bind, intruder, name, "a", replace=True)
    assert error.details() == f"deployment name '{name}' is taken" and owner.tenant_id not in error.details()
    assert resolve(owner, name).adapter.name == "b"


def test_bind_checks_names_adapters_and_base_models(registry_sql, owner, peft_adapter, tiny_model_dir):
    owner.upload(variant(peft_adapter, 6), name="fin")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, bind, owner, "has space", "fin")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, bind, owner, unique("d") + "\n", "fin")  # `$` matches before \n
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, bind, owner, unique("d"), "")
    error = expect_error(grpc.StatusCode.NOT_FOUND, bind, owner, unique("d"), "nope")
    assert error_info(error).metadata["field"] == "adapter_name"
    error = expect_error(grpc.StatusCode.NOT_FOUND, bind, owner, unique("d"), "fin", version=7)
    assert error_info(error).metadata["field"] == "adapter_version"  # was adapter_name, which is right
    error = expect_error(grpc.StatusCode.NOT_FOUND, bind, owner, unique("d"), "nope", version=7)
    assert error_info(error).metadata["field"] == "adapter_name"
    expect_error(grpc.StatusCode.NOT_FOUND, bind, owner, unique("d"), "fin", base_model="nope")
    twin = unique("tiny-twin")
    registry_sql.admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name=twin, location=str(tiny_model_dir)))
    error = expect_error(grpc.StatusCode.FAILED_PRECONDITION, bind, owner, unique("d"), "fin", version=1,
                         base_model=twin)
    assert "trained for base model 'tiny'" in error.details()
    expect_error(grpc.StatusCode.FAILED_PRECONDITION, bind, owner, unique("d"), "fin", base_model=twin)


def test_adapters_in_use_cannot_be_deleted(registry_sql, owner, peft_adapter):
    v1 = owner.upload(variant(peft_adapter, 8), name="used").adapter
    follow = unique("follow")
    bind(owner, follow, "used")
    error = expect_error(grpc.StatusCode.FAILED_PRECONDITION, owner.DeleteAdapter, pb.DeleteAdapterRequest(id=v1.id))
    assert "only version" in error.details() and follow in error.details()
    v2 = owner.upload(variant(peft_adapter, 9), name="used").adapter
    pin = unique("pin")
    bind(owner, pin, "used", version=2)
    error = expect_error(grpc.StatusCode.FAILED_PRECONDITION, owner.DeleteAdapter, pb.DeleteAdapterRequest(id=v2.id))
    assert "pinned" in error.details() and pin in error.details()
    owner.DeleteAdapter(pb.DeleteAdapterRequest(id=v1.id))  # the follower still has v2
    assert resolve(owner, follow).adapter == v2
    owner.UnbindDeployment(pb.UnbindDeploymentRequest(name=pin))
    expect_error(grpc.StatusCode.FAILED_PRECONDITION, owner.DeleteAdapter, pb.DeleteAdapterRequest(id=v2.id))
    owner.UnbindDeployment(pb.UnbindDeploymentRequest(name=follow))
    owner.DeleteAdapter(pb.DeleteAdapterRequest(id=v2.id))


def test_unbind_and_list(registry_sql, owner, peft_adapter):
    owner.upload(variant(peft_adapter, 10), name="x")
    names = sorted(unique(f"list-{i}") for i in range(5))
    for name in reversed(names):
        bind(owner, name, "x")
    seen, token = [], ""
    while True:
        page = owner.ListDeployments(pb.ListDeploymentsRequest(page=generation_pb2.PageRequest(page_size=2,
                                                                                             page_token=token)))
        seen += [d.name for d in page.deployments]
        token = page.next_page_token
        if not token:
            break
    assert seen == names
    owner.UnbindDeployment(pb.UnbindDeploymentRequest(name=names[0]))
    expect_error(grpc.StatusCode.NOT_FOUND, resolve, owner, names[0])
    expect_error(grpc.StatusCode.NOT_FOUND, owner.UnbindDeployment, pb.UnbindDeploymentRequest(name=names[0]))
    listed = registry_sql.admin.ListDeployments(pb.ListDeploymentsRequest(tenant=owner.tenant_name)).deployments
    assert [d.name for d in listed] == names[1:]


def test_deployments_and_base_models_never_share_a_name(registry_sql, owner, peft_adapter, tiny_model_dir):
    """Both are what clients put in `model`: a deployment named like a base model would hide it."""
    owner.upload(variant(peft_adapter, 11), name="fin")
    error = expect_error(grpc.StatusCode.ALREADY_EXISTS, bind, owner, "tiny", "fin")
    assert error_info(error).metadata["field"] == "name" and "base model" in error.details()
    expect_error(grpc.StatusCode.NOT_FOUND, resolve, owner, "tiny")
    assert registry_sql.admin.GetBaseModel(pb.GetBaseModelRequest(name="tiny")).location == str(tiny_model_dir)
    # And the other way round: a name a deployment holds cannot become a base model.
    taken = unique("deployed")
    bind(owner, taken, "fin")
    error = expect_error(grpc.StatusCode.ALREADY_EXISTS, registry_sql.admin.RegisterBaseModel,
                         pb.RegisterBaseModelRequest(name=taken, location=str(tiny_model_dir)))
    assert error_info(error).metadata["field"] == "name" and "deployment" in error.details()
    expect_error(grpc.StatusCode.NOT_FOUND, registry_sql.admin.GetBaseModel, pb.GetBaseModelRequest(name=taken))
    assert resolve(owner, taken).adapter.name == "fin"
