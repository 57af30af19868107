"""OpenAI's Files and Fine-tuning API end to end, with the official SDK: a real Trainer trains
the tiny model on CPU behind a real Router (Registry and inference nodes from conftest.py),
and the fine-tuned model answers chat through the same Router."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI

from tests.router.conftest import CUSTOMER_A_MODEL
from tests.router.harness import ADMIN_TOKEN, InProcessRouter, router_config
from tests.router.test_openai_api import http
from tests.trainer.harness import InProcessTrainer, finance_chat_lines, trainer_config

TERMINAL = ("succeeded", "failed", "cancelled")
#: Other router tests may register more base models in the session: name the one to check against.
BASE = {"base_model": "tiny"}


def jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def wait_for_job(client: OpenAI, job_id: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in TERMINAL:
        assert time.monotonic() < deadline, f"job {job_id} still {job.status} after {timeout}s"
        time.sleep(0.2)
    return job


@pytest.fixture(scope="module")
def trainer(world, tmp_path_factory) -> Iterator[InProcessTrainer]:
    server = InProcessTrainer(trainer_config(tmp_path_factory.mktemp("ft-trainer"), world.registry.address,
                                             ADMIN_TOKEN)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ft_router(world, nodes, trainer) -> Iterator[InProcessRouter]:
    server = InProcessRouter(router_config([n.address for n in nodes], world.registry.address,
                                           trainer_address=trainer.address, max_upload_mb=1)).start()
    server.wait_feed_live()
    server.wait_healthy(len(nodes))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tenant(world):
    return world.new_tenant("ft")


@pytest.fixture(scope="module")
def client(ft_router, tenant) -> OpenAI:
    return OpenAI(base_url=ft_router.base_url, api_key=tenant.token, max_retries=0)


@pytest.fixture(scope="module")
def trained(client):
    """(file, the job as created, the job once succeeded, its Idempotency-Key): a few steps."""
    uploaded = client.files.create(file=("train.jsonl", jsonl(finance_chat_lines())), purpose="fine-tune",
                                   extra_body=BASE)
    key = str(uuid.uuid4())
    created = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, suffix="support", seed=3,
                                             hyperparameters={"n_epochs": 1, "batch_size": 4,
                                                              "learning_rate_multiplier": 5},
                                             extra_headers={"Idempotency-Key": key})
    return uploaded, created, wait_for_job(client, created.id), key


def test_upload_train_and_chat_with_the_fine_tuned_model(client, tenant, trained):
    uploaded, created, done, _ = trained
    assert uploaded.object == "file" and uploaded.purpose == "fine-tune" and uploaded.status == "processed"
    assert uploaded.filename == "train.jsonl" and uploaded.bytes == len(jsonl(finance_chat_lines()))
    assert created.status in ("queued", "running") and created.fine_tuned_model is None
    assert created.training_file == uploaded.id and created.model == "tiny"
    assert created.hyperparameters.n_epochs == 1 and created.hyperparameters.batch_size == 4
    assert created.hyperparameters.learning_rate_multiplier == 5 and created.seed == 3
    assert done.status == "succeeded", done.error
    name = done.fine_tuned_model
    assert name.startswith(f"ft:tiny:{tenant.tenant_name}:support:") and len(name.rsplit(":", 1)[1]) == 8
    assert done.user_provided_suffix == "support" and done.finished_at >= done.created_at
    answer = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Is cash safe?"}],
                                            max_tokens=8, temperature=0)
    assert answer.model == name and answer.choices[0].message.content and answer.usage.completion_tokens > 0
    assert name in [model.id for model in client.models.list()]


def test_a_retried_create_with_the_same_idempotency_key_is_the_same_job(client, trained):
    uploaded, created, done, key = trained
    args = dict(model="tiny", training_file=uploaded.id, suffix="support", seed=3,
                hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 5})
    again = client.fine_tuning.jobs.create(**args, extra_headers={"Idempotency-Key": key})
    assert again.id == created.id and again.fine_tuned_model == done.fine_tuned_model
    assert [job.id for job in client.fine_tuning.jobs.list()].count(created.id) == 1
    with pytest.raises(openai.ConflictError) as caught:  # the key reused for another job
        client.fine_tuning.jobs.create(**{**args, "seed": 4}, extra_headers={"Idempotency-Key": key})
    assert caught.value.body["param"] == "Idempotency-Key" and caught.value.body["code"] == "idempotency_key_reused"


def test_cancel_list_retrieve_and_events(client, trained):
    uploaded, created, done, _ = trained
    long = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id,
                                          hyperparameters={"n_epochs": 100, "batch_size": 1})
    assert client.fine_tuning.jobs.cancel(long.id).status == "cancelled"
    assert wait_for_job(client, long.id).fine_tuned_model is None
    listed = [job.id for job in client.fine_tuning.jobs.list()]
    assert listed[:2] == [long.id, created.id]  # newest first
    page = client.fine_tuning.jobs.list(limit=1)
    assert [job.id for job in page.data] == [long.id] and page.has_more
    assert [job.id for job in client.fine_tuning.jobs.list(limit=1, after=long.id).data] == [created.id]
    assert client.fine_tuning.jobs.retrieve(created.id).fine_tuned_model == done.fine_tuned_model
    events = client.fine_tuning.jobs.list_events(created.id).data
    messages = [event.message for event in events]
    assert messages[0] == "The job has successfully completed" and messages[-1].startswith("Created fine-tuning job")
    assert any(event.type == "metrics" and event.data["step"] >= 1 for event in events)
    assert client.fine_tuning.jobs.list_events(long.id).data[0].message.startswith("The job was cancelled")
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert uploaded.id in [stored.id for stored in client.files.list()]
    with pytest.raises(openai.BadRequestError):  # as at OpenAI: fine-tune files are not downloadable
        client.files.content(uploaded.id)


def test_another_tenant_sees_none_of_it(ft_router, world, client, trained):
    uploaded, created, _, _ = trained
    other = OpenAI(base_url=ft_router.base_url, api_key=world.new_tenant("ft-other").token, max_retries=0)
    for call in (lambda: other.fine_tuning.jobs.retrieve(created.id), lambda: other.fine_tuning.jobs.cancel(created.id),
                 lambda: other.fine_tuning.jobs.list_events(created.id), lambda: other.files.retrieve(uploaded.id),
                 lambda: other.files.delete(uploaded.id), lambda: other.files.content(uploaded.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError) as caught:  # another tenant's file cannot be trained on either
        other.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id)
    assert caught.value.body["param"] == "training_file"
    assert other.fine_tuning.jobs.list().data == [] and other.files.list().data == []
    assert client.files.retrieve(uploaded.id).id == uploaded.id  # the failed delete left it
    # The router passes the caller's key on to the Trainer, which takes its admin token as an
    # operator's: that token is no tenant key to the router, so it never gets that far.
    status, _, _ = http("GET", f"{ft_router.base_url}/fine_tuning/jobs/{created.id}", token=ADMIN_TOKEN)
    assert status == 401


def test_a_bad_line_is_a_400_naming_it(client):
    lines = finance_chat_lines()[:2] + ["{not json", '{"messages": [{"role": "user", "content": "hi"}]}']
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("bad.jsonl", jsonl(lines)), purpose="fine-tune", extra_body=BASE)
    error = caught.value.body
    assert error["param"] == "file" and error["code"] == "invalid_file_format"
    assert "2 invalid lines" in error["message"] and "line 3: not valid JSON" in error["message"]
    assert "line 4: no assistant message" in error["message"]


def test_the_base_model_a_file_is_checked_against_travels_in_the_form(client):
    with pytest.raises(openai.NotFoundError) as caught:  # the SDK's extra_body reaches the Trainer as a form field
        client.files.create(file=("train.jsonl", jsonl(finance_chat_lines())), purpose="fine-tune",
                            extra_body={"base_model": "no-such-base"})
    assert caught.value.body["param"] == "base_model" and "no-such-base" in caught.value.body["message"]


def test_an_upload_over_max_upload_mb_is_a_413(client):
    line = finance_chat_lines()[0]
    body = jsonl([line] * (2 * 2**20 // len(line)))  # 2 MiB against --max-upload-mb 1
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("big.jsonl", body), purpose="fine-tune", extra_body=BASE)
    assert caught.value.status_code == 413 and "--max-upload-mb" in caught.value.body["message"]


def test_what_cannot_be_trained_is_a_400_naming_it(client, trained):
    uploaded = trained[0]
    cases = {"model": dict(model=CUSTOMER_A_MODEL), "suffix": dict(suffix="has space"),
             "hyperparameters.n_epochs": dict(hyperparameters={"n_epochs": 0}),
             "validation_file": dict(validation_file=uploaded.id), "method.type": dict(method={"type": "dpo"})}
    for param, args in cases.items():
        with pytest.raises(openai.APIStatusError) as caught:
            client.fine_tuning.jobs.create(**{"model": "tiny", "training_file": uploaded.id, **args})
        assert caught.value.body["param"] == param, (param, caught.value.body)
    with pytest.raises(openai.NotFoundError) as caught:  # a deployment of another tenant: unknown here
        client.fine_tuning.jobs.create(model="customerB-model", training_file=uploaded.id)
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:  # the Trainer's range check, in OpenAI's terms
        client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, hyperparameters={"n_epochs": 1000})
    assert caught.value.body["param"] == "hyperparameters.n_epochs"
    assert caught.value.body["message"].startswith("hyperparameters.n_epochs ")


def test_without_a_trainer_every_route_is_a_501(make_router, tenant):
    router = make_router([])  # no --trainer-address
    plain = OpenAI(base_url=router.base_url, api_key=tenant.token, max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        plain.files.create(file=("train.jsonl", jsonl(finance_chat_lines())), purpose="fine-tune")
    assert caught.value.status_code == 501
    assert "fine-tuning is not configured on this router" in caught.value.body["message"]
    for path in ("/files", "/fine_tuning/jobs", "/fine_tuning/jobs/x/events"):
        status, reply, _ = http("GET", router.base_url + path, token=tenant.token)
        assert status == 501 and reply["error"]["code"] == "fine_tuning_not_configured"
    status, _, _ = http("GET", router.base_url + "/fine_tuning/jobs", token="not-a-key")
    assert status == 401  # authentication first, as on every route
