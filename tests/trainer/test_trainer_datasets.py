"""Dataset uploads: both formats, line-by-line validation naming line numbers, nothing stored on
failure, listings and deletion."""

from __future__ import annotations

import json

import grpc
import pytest

from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from services.common.rpc import error_info
from tests.registry.client import expect_error
from tests.trainer.harness import bearer, finance_chat_lines, prompt_completion_lines


def stored_state(trainer) -> tuple[list[str], list[str]]:
    """(dataset blobs, spool files) on the trainer's disk."""
    data_dir = trainer.config.data_dir
    blobs = sorted(str(p) for p in (data_dir / "blobs" / "datasets").rglob("*") if p.is_file())
    spool = sorted(str(p) for p in (data_dir / "spool").glob("*")) if (data_dir / "spool").exists() else []
    return blobs, spool


def test_chat_and_prompt_completion_datasets_are_stored_listed_and_deleted(tenant, trainer):
    client = tenant.trainer
    chat = client.upload(finance_chat_lines(), name="chat")
    completion = client.upload(prompt_completion_lines(), name="pc", fmt=pb.DATASET_FORMAT_PROMPT_COMPLETION)
    assert (chat.format, chat.num_examples, chat.tenant_id) == (pb.DATASET_FORMAT_CHAT, 12, tenant.id)
    assert (completion.format, completion.num_examples) == (pb.DATASET_FORMAT_PROMPT_COMPLETION, 12)
    assert chat.size_bytes > 0 and len(chat.sha256) == 64 and chat.created_at.seconds

    assert client.call("GetDataset", pb.GetDatasetRequest(id=chat.id)) == chat
    listed = client.call("ListDatasets", pb.ListDatasetsRequest())
    assert [d.id for d in listed.datasets] == [completion.id, chat.id]  # newest first
    first = client.call("ListDatasets", pb.ListDatasetsRequest(page={"page_size": 1}))
    second = client.call("ListDatasets", pb.ListDatasetsRequest(page={"page_size": 1,
                                                                      "page_token": first.next_page_token}))
    assert [d.id for d in [*first.datasets, *second.datasets]] == [completion.id, chat.id]
    assert second.next_page_token == ""

    client.call("DeleteDataset", pb.DeleteDatasetRequest(id=chat.id))
    expect_error(grpc.StatusCode.NOT_FOUND, client.call, "GetDataset", pb.GetDatasetRequest(id=chat.id))
    assert [d.id for d in client.call("ListDatasets", pb.ListDatasetsRequest()).datasets] == [completion.id]
    blobs, _ = stored_state(trainer)
    assert not any(chat.id.replace("_", "-") in blob for blob in blobs)
    assert any(completion.id.replace("_", "-") in blob for blob in blobs)


def test_a_bad_dataset_is_refused_naming_every_bad_line_and_nothing_is_stored(tenant, trainer):
    good = finance_chat_lines()
    lines = [
        good[0],
        '{"messages": [{"role": "user", "content": "hi"}',  # 2: truncated JSON
        good[1],
        json.dumps({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}),  # 4
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}),  # 5
        "",  # 6: blank lines are skipped
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),  # 7: nothing to learn
        json.dumps({"prompt": "a", "completion": "b"}),  # 8: another format
        json.dumps({"messages": [{"role": "user", "content": "long " * 400},  # 9: too many tokens
                                 {"role": "assistant", "content": "ok"}]}),
        "[1, 2, 3]",  # 10: not an object
    ]
    body = ("\n".join(lines) + "\n").encode() + b'{"messages": "\xff\xfe"}\n'  # 11: not UTF-8
    before = stored_state(trainer)
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.trainer.upload, body, max_seq_len=256)
    message = error.details()
    assert message.startswith("dataset has 8 invalid lines")
    for number, why in [(2, "not valid JSON"), (4, "messages[0].role must be one of"), (5, "messages[1].content is empty"),
                        (7, "no assistant message"), (8, 'missing "messages"'), (9, "too long"),
                        (10, "expected a JSON object"), (11, "not UTF-8")]:
        assert f"line {number}: {why}" in message, message
    assert "line 1:" not in message and "line 3:" not in message and "line 6:" not in message
    info = error_info(error)
    assert info.reason == "INVALID_DATASET_LINES" and info.metadata["lines"] == "2,4,5,7,8,9,10,11"
    assert stored_state(trainer) == before
    assert tenant.trainer.call("ListDatasets", pb.ListDatasetsRequest()).datasets == []


def test_only_the_first_lines_are_listed_when_many_are_bad(tenant):
    lines = ["not json"] * 25
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.trainer.upload, lines)
    assert "dataset has 25 invalid lines" in error.details() and "and 15 more" in error.details()
    assert "line 10:" in error.details() and "line 11:" not in error.details()


@pytest.mark.parametrize(("body", "header", "field"), [
    (b"", {}, "chunk"),  # no bytes at all
    (b"\n\n  \n", {}, "chunk"),  # only blank lines
    (None, {"name": ""}, "header.name"),
    (None, {"max_seq_len": 100_000}, "header.max_seq_len"),
    (None, {"fmt": pb.DATASET_FORMAT_PROMPT_COMPLETION}, "chunk"),  # chat lines declared prompt/completion
])
def test_bad_uploads_name_the_problem(tenant, body, header, field):
    body = ("\n".join(finance_chat_lines()) + "\n").encode() if body is None else body
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.trainer.upload, body, **header)
    assert error_info(error).metadata["field"] == field, error.details()


def test_unknown_base_model_and_a_missing_header_are_refused(tenant):
    expect_error(grpc.StatusCode.NOT_FOUND, tenant.trainer.upload, finance_chat_lines(), base_model="no-such-model")
    only_chunks = iter([pb.UploadDatasetRequest(chunk=b"{}\n")])
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.trainer.stub.UploadDataset, only_chunks,
                         metadata=bearer(tenant.key), timeout=30)
    assert "first UploadDataset message must be the header" in error.details()
