"""The Files and Fine-tuning API's pure parts: multipart parsing (of what the real SDK sends),
training-file checks, create body -> StartJob, Trainer job -> OpenAI objects and events,
Trainer errors in OpenAI's terms. No servers: the end-to-end test is test_openai_fine_tuning.py."""

from __future__ import annotations

import asyncio
import json
import struct

import httpx2
import pytest
from openai import OpenAI

from services.common.errors import InvalidArgument, NotFound
from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from services.router.auth import Caller
from services.router.http_api import error_body
from services.router.multipart import Form, FormFile, parse_form
from services.router.openai_files import FilesApi, StoredFile, check_training_file, read_upload
from services.router.openai_fine_tuning import (BASE_LEARNING_RATE, FineTuningApi, TrainerJob, fine_tuned_model_name,
                                                job_object, job_spec)
from services.router.openai_fine_tuning_api import not_configured
from services.router.openai_fine_tuning_events import job_events
from services.router.openai_trainer_terms import in_openai_terms, trainer_request_id
from services.router.trainer_client import start_job_request, trainer_job

CALLER = Caller("tnt_1", "acme", "key_1")
CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
PROMPT = json.dumps({"prompt": "Q: 1+1?", "completion": " 2"})


def sdk_upload(**kwargs) -> tuple[str, bytes]:
    """(Content-Type, body) of the real SDK's files.create, captured before it leaves the client."""
    seen = {}

    def capture(request):
        seen.update(content_type=request.headers["content-type"], body=request.read())
        return httpx2.Response(200, json={"id": "ds_1", "object": "file", "bytes": 1, "created_at": 0,
                                          "filename": "f", "purpose": "fine-tune", "status": "processed"})

    client = OpenAI(base_url="http://router/v1", api_key="k", http_client=httpx2.Client(
        transport=httpx2.MockTransport(capture)))
    client.files.create(**kwargs)
    return seen["content_type"], seen["body"]


def multipart(*parts: tuple[str, bytes], boundary: str = "b0und", close: bool = True) -> tuple[str, bytes]:
    body = b"".join(f"--{boundary}\r\n{headers}\r\n\r\n".encode() + content + b"\r\n" for headers, content in parts)
    return f"multipart/form-data; boundary={boundary}", body + (f"--{boundary}--\r\n".encode() if close else b"")


# --- multipart ---

def test_the_sdks_upload_parses_to_its_fields_and_exact_file_bytes():
    content = "\r\n".join([CHAT, PROMPT, '{"prompt": "é", "completion": "ü"}']).encode() + b"\n\n"
    content_type, body = sdk_upload(file=("train.jsonl", content), purpose="fine-tune",
                                    extra_body={"base_model": "tiny"})
    form = parse_form(content_type, body)
    assert form.fields == {"purpose": "fine-tune", "base_model": "tiny"}
    assert form.files == {"file": FormFile("train.jsonl", content)}


def test_rfc2231_file_names_and_empty_fields():
    form = parse_form(*multipart(("Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''tr%C3%A4in.jsonl",
                                  b"x"), ('Content-Disposition: form-data; name="purpose"', b"")))
    assert form.files["file"].filename == "träin.jsonl" and form.fields["purpose"] == ""


@pytest.mark.parametrize("content_type, body, words", [
    ("application/json", b"{}", "expected a multipart/form-data body"),
    ("multipart/form-data", b"--x--", "no boundary"),
    (*multipart(('Content-Disposition: form-data; name="purpose"', b"fine-tune"), close=False), "cut short"),
    (*multipart(('Content-Disposition: form-data; name="a"', b"1"), ('Content-Disposition: form-data; name="a"', b"2")),
     "given twice"),
    (*multipart(('Content-Disposition: form-data; name="a"', b"\xff")), "not UTF-8"),
    (*multipart(("Content-Disposition: attachment", b"x")), "Content-Disposition: form-data"),
    (*multipart(("Content-Disposition: form-data", b"x")), "no name"),
])
def test_malformed_forms_are_a_400_naming_the_body(content_type, body, words):
    with pytest.raises(InvalidArgument) as caught:
        parse_form(content_type, body)
    assert words in caught.value.message and caught.value.metadata["field"] == "body"


# --- the training file ---

def test_chat_and_prompt_completion_files_pass_and_count_their_examples():
    assert check_training_file(f"\ufeff{CHAT}\n\n{CHAT}\r\n".encode()) == 2  # a BOM, a blank line, CRLF
    assert check_training_file(f"{PROMPT}\n{PROMPT}".encode()) == 2


def test_bad_lines_are_named_with_their_numbers_and_reasons():
    lines = [CHAT, "", "{oops", json.dumps({"messages": [{"role": "user", "content": "hi"}]}), PROMPT,
             json.dumps({"messages": [{"role": "bot", "content": "x"}]})]
    with pytest.raises(InvalidArgument) as caught:
        check_training_file("\n".join(lines).encode())
    message = caught.value.message
    assert message.startswith("the training file has 4 invalid lines: line 3: not valid JSON")
    assert "line 4: no assistant message" in message and "line 6: messages[0].role must be one of" in message
    assert 'line 5: missing "messages" (this dataset is in chat format)' in message  # the first line decided
    assert caught.value.metadata["field"] == "file" and caught.value.reason == "INVALID_FILE_FORMAT"


def test_past_ten_bad_lines_the_rest_are_counted():
    with pytest.raises(InvalidArgument) as caught:
        check_training_file(b"x\n" * 25)
    assert "line 10: not valid JSON" in caught.value.message and "line 11" not in caught.value.message
    assert caught.value.message.count("; and 15 more")


@pytest.mark.parametrize("content, words", [(b"", "no examples"), (b"\n \n", "no examples"),
                                            ("\ufeff{}".encode("utf-16"), "UTF-16"),
                                            (b'{"prompt": "\xff", "completion": "x"}', "line 1: not UTF-8")])
def test_empty_and_non_utf8_files_are_refused(content, words):
    with pytest.raises(InvalidArgument) as caught:
        check_training_file(content)
    assert words in caught.value.message


def form(purpose: str = "fine-tune", **fields: str) -> Form:
    return Form({"purpose": purpose, **fields}, {"file": FormFile("t.jsonl", CHAT.encode())})


def test_an_upload_is_checked_against_the_named_or_the_only_base_model():
    assert read_upload(form(), ["tiny"], "").base_model == "tiny"
    assert read_upload(form(base_model="big"), ["tiny", "big"], "").base_model == "big"
    for bases, reason in ((["a", "b"], "BASE_MODEL_REQUIRED"), ([], "NO_BASE_MODEL")):
        with pytest.raises(InvalidArgument) as caught:
            read_upload(form(), bases, "")
        assert caught.value.reason == reason and caught.value.metadata["field"] == "base_model"


@pytest.mark.parametrize("upload, param", [(form("assistants"), "purpose"), (form(""), "purpose"),
                                           (Form({"purpose": "fine-tune"}, {}), "file"),
                                           (form(user="x"), "user")])
def test_upload_forms_missing_or_extra_fields_name_them(upload, param):
    with pytest.raises(InvalidArgument) as caught:
        read_upload(upload, ["tiny"], "")
    assert caught.value.metadata["field"] == param


def test_idempotency_keys_become_trainer_request_ids():
    first = read_upload(form(), ["tiny"], "my key with spaces and more " * 10).request_id
    assert first == read_upload(form(), ["tiny"], "my key with spaces and more " * 10).request_id
    assert len(first) <= 128 and " " not in first and first != trainer_request_id("my key", "file")
    assert trainer_request_id("k", "file") != trainer_request_id("k", "job") and trainer_request_id("", "job") == ""


# --- create body -> StartJob ---

def spec(idempotency_key: str = "", **body):
    return job_spec({"model": "tiny", "training_file": "ds_1", **body}, CALLER, "tiny", idempotency_key)


def test_hyperparameters_map_to_the_trainers_settings():
    plain = spec(hyperparameters={"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5}, seed=9)
    assert (plain.epochs, plain.batch_size, plain.learning_rate, plain.seed) == (2, 8, 0.5 * BASE_LEARNING_RATE, 9)
    method = spec(method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 8,
                                                                                   "learning_rate_multiplier": 0.5}}},
                  seed=9)
    assert dataclasses_equal_but_names(plain, method)
    auto = spec(hyperparameters={"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"})
    assert (auto.epochs, auto.batch_size, auto.learning_rate) == (None, 0, None)  # the Trainer's defaults


def dataclasses_equal_but_names(a, b) -> bool:
    names = ("output_adapter_name", "deployment_name")  # random tags without an Idempotency-Key
    return all(getattr(a, f) == getattr(b, f) for f in a.__dataclass_fields__ if f not in names)


@pytest.mark.parametrize("body, param", [
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": 1.5}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": True}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": float("nan")}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate_multiplier": "high"}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"n_epochs": 10**400}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 2**32}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": 1e300}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"beta": 1}}, "hyperparameters.beta"),
    ({"hyperparameters": [1]}, "hyperparameters"),
    ({"hyperparameters": {}, "method": {"type": "supervised", "supervised": {"hyperparameters": {}}}},
     "hyperparameters"),
    ({"method": {"type": "dpo"}}, "method.type"), ({"method": "supervised"}, "method.type"),
    ({"suffix": "a:b"}, "suffix"), ({"suffix": "x" * 65}, "suffix"), ({"suffix": 7}, "suffix"),
    ({"seed": -1}, "seed"), ({"seed": "1"}, "seed"), ({"validation_file": "ds_2"}, "validation_file"),
    ({"integrations": [{"type": "wandb"}]}, "integrations"), ({"metadata": {"k": "v"}}, "metadata"),
    ({"training_file": None}, "training_file"), ({"temperature": 1}, "temperature"),
])
def test_what_a_job_cannot_honour_is_a_400_naming_it(body, param):
    with pytest.raises(InvalidArgument) as caught:
        spec(**body)
    assert caught.value.metadata["field"] == param


def test_nulls_and_empty_lists_mean_unset():
    assert spec(suffix=None, seed=None, validation_file=None, integrations=[], metadata=None, hyperparameters=None)
    assert spec("k", suffix="").deployment_name == spec("k").deployment_name


def test_the_fine_tuned_model_name_is_openais_shape_and_fits_a_model_name():
    named = spec("key-1", suffix="support")
    assert named.deployment_name.startswith("ft:tiny:acme:support:") and len(named.deployment_name) == 29
    assert named.output_adapter_name == "ft-support-" + named.deployment_name[-8:]
    assert spec("key-1", suffix="support") == named  # a retry asks for the very same job
    assert spec("key-2", suffix="support").deployment_name != named.deployment_name
    assert spec(suffix="support").deployment_name != spec(suffix="support").deployment_name  # random tags
    assert spec("k").deployment_name.startswith("ft:tiny:acme::")
    long_base = fine_tuned_model_name("b" * 128, "t" * 20, "s" * 64, "abcd1234")  # the base gives way first
    assert len(long_base) == 128 and long_base.endswith(":" + "t" * 20 + ":" + "s" * 64 + ":abcd1234")
    longest = fine_tuned_model_name("b" * 128, "t" * 63, "s" * 64, "abcd1234")  # then the tenant
    assert len(longest) == 128 and longest.startswith("ft:b:t") and longest.endswith(":" + "s" * 64 + ":abcd1234")


def test_start_job_request_carries_only_what_was_set():
    request = start_job_request(spec("key", hyperparameters={"n_epochs": 2}))
    assert request.training.HasField("epochs") and not request.training.HasField("learning_rate")
    assert request.request_id == trainer_request_id("key", "job") and request.deployment_name.startswith("ft:")


# --- Trainer job -> OpenAI job and events ---

def job(state: str = "succeeded", **changes) -> TrainerJob:
    settings = dict(id="job_1", tenant_id="tnt_1", state=state, base_model="tiny", dataset_id="ds_1",
                    deployment_name="ft:tiny:acme:support:0123abcd", epochs=3.0, max_steps=None,
                    learning_rate=struct.unpack("f", struct.pack("f", 0.7 * BASE_LEARNING_RATE))[0], batch_size=4,
                    seed=0, step=6, total_steps=6, loss=1.25, created_at=100.0, started_at=101.0, finished_at=110.0)
    return TrainerJob(**{**settings, **changes})


@pytest.mark.parametrize("state", ["queued", "running", "succeeded", "failed", "cancelled"])
def test_job_states_map_to_openai_statuses(state):
    shown = job_object(job(state, error="boom" if state == "failed" else ""))
    assert shown["status"] == state and shown["object"] == "fine_tuning.job"
    assert shown["fine_tuned_model"] == ("ft:tiny:acme:support:0123abcd" if state == "succeeded" else None)
    assert shown["error"] == ({"code": "training_failed", "message": "boom", "param": None} if state == "failed"
                              else None)


def test_job_objects_show_the_hyperparameters_as_written():
    shown = job_object(job())
    assert shown["hyperparameters"] == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 0.7}
    assert shown["method"]["supervised"]["hyperparameters"] == shown["hyperparameters"]
    assert (shown["created_at"], shown["finished_at"], shown["user_provided_suffix"]) == (100, 110, "support")
    assert job_object(job(epochs=None, deployment_name="mine"))["hyperparameters"]["n_epochs"] == "auto"
    assert job_object(job(deployment_name="mine"))["user_provided_suffix"] is None
    running = job_object(job("running", eta_seconds=30.0, finished_at=None))
    assert running["estimated_finish"] >= 130 and running["finished_at"] is None


def test_events_are_newest_first_with_stable_ids():
    events = job_events(job(), now=200.0)
    assert [e["id"] for e in events] == ["ftevent-job_1-succeeded", "ftevent-job_1-model", "ftevent-job_1-step-6",
                                         "ftevent-job_1-started", "ftevent-job_1-created"]
    assert events[1]["message"] == "New fine-tuned model created: ft:tiny:acme:support:0123abcd"
    assert events[2]["type"] == "metrics" and events[2]["data"]["train_loss"] == 1.25
    queued = job_events(job("queued", started_at=None, finished_at=None, step=0, waiting_for=""), now=200.0)
    assert [e["id"] for e in queued] == ["ftevent-job_1-created"]
    failed = job_events(job("failed", error="out of memory"), now=200.0)[0]
    assert failed["level"] == "error" and failed["message"] == "The job failed: out of memory"
    waiting = job_events(job("running", finished_at=None, waiting_for="registry down"), now=200.0)[0]
    assert waiting["level"] == "warn" and waiting["created_at"] == 200


def test_trainer_jobs_convert_from_protobuf():
    message = pb.Job(id="job_1", tenant_id="t", state=pb.JOB_STATE_RUNNING, base_model="tiny", dataset_id="ds",
                     training=pb.TrainingConfig(epochs=2, learning_rate=1e-4, batch_size=4),
                     progress=pb.JobProgress(step=3, total_steps=9, loss=0.5), created_at={"seconds": 5},
                     started_at={"seconds": 6})
    converted = trainer_job(message)
    assert (converted.state, converted.epochs, converted.max_steps, converted.step, converted.loss) == \
           ("running", 2.0, None, 3, 0.5)
    assert (converted.created_at, converted.started_at, converted.finished_at, converted.eta_seconds) == \
           (5.0, 6.0, None, None)


# --- errors and listings ---

def test_trainer_errors_are_worded_with_the_callers_params():
    error = in_openai_terms(InvalidArgument("training.epochs must be in (0, 100], got 1000", reason="BAD_HYPERPARAMETER",
                                            field="training.epochs"), {"training.epochs": "hyperparameters.n_epochs"})
    assert error.message == "hyperparameters.n_epochs must be in (0, 100], got 1000"
    status, body = error_body(error)
    assert status == 400 and body["error"]["param"] == "hyperparameters.n_epochs"
    assert body["error"]["code"] == "invalid_hyperparameter"
    hidden = in_openai_terms(NotFound("x", field="lora.r"), {})
    assert "field" not in hidden.metadata  # never a param the caller could not have sent


def test_not_configured_is_a_501():
    status, body = error_body(not_configured())
    assert status == 501 and body["error"]["code"] == "fine_tuning_not_configured"


class ListingTrainer:
    def __init__(self, count: int) -> None:
        self.ids = [f"id_{i}" for i in range(count, 0, -1)]  # newest first, as the Trainer lists

    async def list_jobs(self, authorization):
        for i in self.ids:
            yield job(id=i)

    async def list_datasets(self, authorization):
        for i in self.ids:
            yield StoredFile(i, "f.jsonl", 1, 0.0)


def test_job_listings_page_with_after_and_limit():
    jobs = FineTuningApi(ListingTrainer(5), resolve=None)
    first = asyncio.run(jobs.list("auth", 2, ""))
    assert [j["id"] for j in first["data"]] == ["id_5", "id_4"] and first["has_more"]
    last = asyncio.run(jobs.list("auth", 2, "id_2"))
    assert [j["id"] for j in last["data"]] == ["id_1"] and not last["has_more"]
    assert asyncio.run(jobs.list("auth", 2, "unknown"))["data"] == []


def test_file_listings_page_in_either_order():
    files = FilesApi(ListingTrainer(3), base_models=None)
    ascending = asyncio.run(files.list("auth", 2, "", ascending=True))
    assert [f["id"] for f in ascending["data"]] == ["id_1", "id_2"] and ascending["has_more"]
    assert (ascending["first_id"], ascending["last_id"]) == ("id_1", "id_2")
    assert [f["id"] for f in asyncio.run(files.list("auth", 5, "id_3", ascending=False))["data"]] == ["id_2", "id_1"]
