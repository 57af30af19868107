"""StartJob: every hyperparameter is checked up front (INVALID_ARGUMENT naming the field, no
job created); unknown objects are NOT_FOUND; a deployment name bound by another tenant is
ALREADY_EXISTS; the same job with the same seed trains the same adapter."""

from __future__ import annotations

import uuid

import grpc
import pytest

from services.common.pb.loraplex.registry.v1 import registry_pb2 as rpb
from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from services.common.rpc import error_info
from tests.registry.client import Client, expect_error
from tests.registry.lora_files import make_peft_adapter
from tests.trainer.harness import finance_chat_lines

BAD = [
    ({"lora": pb.LoraConfig(r=300)}, "lora.r"),  # above the registry's max rank (256)
    ({"lora": pb.LoraConfig(r=8, alpha=-1)}, "lora.alpha"),
    ({"lora": pb.LoraConfig(r=8, alpha=float("nan"))}, "lora.alpha"),
    ({"lora": pb.LoraConfig(r=8, dropout=1.0)}, "lora.dropout"),
    ({"lora": pb.LoraConfig(r=8, target_modules=["q_proj", "lm_head"])}, "lora.target_modules"),
    ({"lora": pb.LoraConfig(r=8, target_modules=["q_proj", "q_proj"])}, "lora.target_modules"),
    ({"epochs": 2}, "training.epochs"),  # and max_steps (the helper's default): exclusive
    ({"max_steps": 0}, "training.max_steps"),
    ({"max_steps": None, "epochs": 0}, "training.epochs"),
    ({"max_steps": None, "epochs": 1e9}, "training.epochs"),
    ({"learning_rate": 0}, "training.learning_rate"),
    ({"learning_rate": -1e-4}, "training.learning_rate"),
    ({"learning_rate": float("inf")}, "training.learning_rate"),
    ({"learning_rate": 5.0}, "training.learning_rate"),
    ({"lr_schedule": 7}, "training.lr_schedule"),
    ({"warmup_steps": 40}, "training.warmup_steps"),  # the job has 40 steps
    ({"batch_size": 100_000}, "training.batch_size"),
    ({"gradient_accumulation_steps": 100_000}, "training.gradient_accumulation_steps"),
    ({"max_seq_len": 4}, "training.max_seq_len"),
    ({"max_seq_len": 100_000}, "training.max_seq_len"),  # beyond the base model's context (512)
    ({"max_seq_len": 16}, "training.max_seq_len"),  # shorter than the dataset's longest example
    ({"eval_fraction": 0.6}, "training.eval_fraction"),
    ({"eval_fraction": -0.1}, "training.eval_fraction"),
    ({"name": "bad name!"}, "output_adapter_name"),
    ({"name": ""}, "output_adapter_name"),
    ({"deployment": "-bad"}, "deployment_name"),
]


@pytest.fixture(scope="module")
def shared(registry_admin, trainer):
    """One tenant and dataset for the refusal tests (they never create jobs)."""
    tenant = registry_admin.CreateTenant(rpb.CreateTenantRequest(name=f"jobs-{uuid.uuid4().hex[:10]}"))
    key = registry_admin.CreateApiKey(rpb.CreateApiKeyRequest(tenant=tenant.id, name="test"))
    client = trainer.client(key.secret)
    return client, client.upload(finance_chat_lines())


@pytest.mark.parametrize(("changes", "field"), BAD, ids=[f"{field}-{i}" for i, (_, field) in enumerate(BAD)])
def test_bad_hyperparameters_are_refused_up_front_naming_the_field(shared, changes, field):
    client, dataset = shared
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, _start, client, dataset.id, **changes)
    assert field in error.details()
    assert error_info(error).metadata["field"] == field
    assert client.call("ListJobs", pb.ListJobsRequest()).jobs == []


def _start(client, dataset_id, **changes):
    """StartJob with the helper's defaults; max_steps=None drops the helper's max_steps."""
    if "max_steps" in changes and changes["max_steps"] is None:
        changes.pop("max_steps")
        request = pb.StartJobRequest(base_model="tiny", dataset_id=dataset_id, output_adapter_name="fin",
                                     lora=pb.LoraConfig(r=8), training=pb.TrainingConfig(learning_rate=1e-2, **changes))
        return client.call("StartJob", request)
    return client.start(dataset_id, **changes)


def test_unknown_dataset_and_base_model_are_not_found(shared):
    client, dataset = shared
    error = expect_error(grpc.StatusCode.NOT_FOUND, client.start, "ds_unknown")
    assert error_info(error).metadata["field"] == "dataset_id"
    request = pb.StartJobRequest(base_model="no-such-base", dataset_id=dataset.id, output_adapter_name="x")
    error = expect_error(grpc.StatusCode.NOT_FOUND, client.call, "StartJob", request)
    assert error_info(error).metadata["field"] == "base_model"


EMPTY_IDS = [
    ("GetDataset", pb.GetDatasetRequest(), "id"),
    ("DeleteDataset", pb.DeleteDatasetRequest(), "id"),
    ("GetJob", pb.GetJobRequest(), "id"),
    ("CancelJob", pb.CancelJobRequest(), "id"),
    ("WatchJob", pb.WatchJobRequest(), "id"),
    ("StartJob", pb.StartJobRequest(base_model="tiny", output_adapter_name="fin", lora=pb.LoraConfig(r=8),
                                    training=pb.TrainingConfig(max_steps=2)), "dataset_id"),
]


@pytest.mark.parametrize(("rpc", "request_", "field"), EMPTY_IDS, ids=[rpc for rpc, _, _ in EMPTY_IDS])
def test_an_empty_id_is_invalid_argument_naming_the_field(shared, admin, rpc, request_, field):
    client, dataset = shared
    operator_request = type(request_)()
    operator_request.CopyFrom(request_)
    if rpc == "StartJob":  # an operator names the tenant, or that is the missing field
        operator_request.tenant = dataset.tenant_id
    for caller, request in ((client, request_), (admin, operator_request)):
        error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, caller.call, rpc, request)
        assert error_info(error).metadata["field"] == field
        assert field in error.details() and "not found" not in error.details()
    assert client.call("ListJobs", pb.ListJobsRequest()).jobs == []


def test_a_dataset_trains_only_the_base_model_whose_tokenizer_checked_it(shared, registry_admin, tiny_model_dir):
    client, dataset = shared
    registry_admin.RegisterBaseModel(rpb.RegisterBaseModelRequest(name="tiny-twin", location=str(tiny_model_dir)))
    request = pb.StartJobRequest(base_model="tiny-twin", dataset_id=dataset.id, output_adapter_name="x")
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, client.call, "StartJob", request)
    assert error_info(error).metadata["field"] == "base_model" and "'tiny'" in error.details()


def test_a_deployment_name_bound_by_another_tenant_is_already_exists(shared, registry, registry_admin, new_tenant,
                                                                    tiny_model_dir, tmp_path):
    client, dataset = shared
    other = new_tenant("owner")
    owner = Client(registry.stub, other.key)
    adapter = owner.upload(make_peft_adapter(tiny_model_dir, tmp_path / "adapter"), name="theirs").adapter
    name = f"taken-{uuid.uuid4().hex[:8]}"
    owner.BindDeployment(rpb.BindDeploymentRequest(name=name, base_model="tiny", adapter_name=adapter.name))
    error = expect_error(grpc.StatusCode.ALREADY_EXISTS, client.start, dataset.id, deployment=name)
    assert "is taken" in error.details() and other.name not in error.details() and other.id not in error.details()
    assert client.call("ListJobs", pb.ListJobsRequest()).jobs == []


def test_a_deployment_name_that_names_a_base_model_is_refused_before_training(shared):
    # The Registry refuses to bind a base model's name; asked only at publication, the job
    # trained in full, published its adapter and then ended FAILED.
    client, dataset = shared
    error = expect_error(grpc.StatusCode.ALREADY_EXISTS, client.start, dataset.id, deployment="tiny")
    info = error_info(error)
    assert (info.reason, info.metadata["field"]) == ("NAME_IS_BASE_MODEL", "deployment_name")
    assert "'tiny' is the name of a base model" in error.details()
    assert client.call("ListJobs", pb.ListJobsRequest()).jobs == []


def test_the_same_job_and_seed_train_the_same_adapter_and_defaults_are_reported(tenant, registry_admin):
    client = tenant.trainer
    dataset = client.upload(finance_chat_lines())
    jobs = [client.start(dataset.id, name=f"seeded-{i}", max_steps=6, seed=7,
                         lora=pb.LoraConfig(r=4, dropout=0.1, target_modules=["v_proj", "q_proj"]))
            for i in range(2)]
    other_seed = client.start(dataset.id, name="seeded-other", max_steps=6, seed=8,
                              lora=pb.LoraConfig(r=4, dropout=0.1, target_modules=["v_proj", "q_proj"]))
    job = jobs[0]
    assert (job.lora.r, job.lora.alpha, list(job.lora.target_modules)) == (4, 8.0, ["q_proj", "v_proj"])
    assert job.training.lr_schedule == pb.LR_SCHEDULE_LINEAR and job.training.max_seq_len == 512
    assert job.training.gradient_accumulation_steps == 1 and not job.training.HasField("epochs")
    done = [client.wait(j.id) for j in (*jobs, other_seed)]
    assert all(j.state == pb.JOB_STATE_SUCCEEDED for j in done), [j.error for j in done]
    shas = [registry_admin.GetAdapter(rpb.GetAdapterRequest(id=j.adapter_id)).sha256 for j in done]
    assert shas[0] == shas[1] != shas[2]
    listed = client.call("ListJobs", pb.ListJobsRequest(states=[pb.JOB_STATE_SUCCEEDED]))
    assert [j.id for j in listed.jobs] == [other_seed.id, jobs[1].id, jobs[0].id]  # newest first
