"""Requests and dataset lines at the edges: NUL characters in request text, names with a final
newline, JSON the parser gives up on, text that is no text, reasons too long to travel, and
dataset encodings a real file has (BOM, CRLF, blank lines, no final newline, UTF-16)."""

from __future__ import annotations

import json

import grpc
import pytest

from services.common.errors import InvalidArgument
from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from services.common.rpc import error_info
from services.common.tiny_model import build_tokenizer
from services.trainer.validation import validate_jsonl
from tests.registry.client import expect_error
from tests.trainer.harness import finance_chat_lines, prompt_completion_lines


def _field(error: grpc.RpcError) -> str:
    return error_info(error).metadata["field"]


@pytest.mark.parametrize(("header", "field"), [
    ({"name": "ds\x00"}, "header.name"),
    ({"base_model": "tiny\x00"}, "header.base_model"),
    ({"tenant": "t\x00"}, "header.tenant"),
])
def test_a_nul_in_the_upload_header_is_invalid_argument_and_nothing_is_stored(tenant, header, field):
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.trainer.upload, finance_chat_lines(), **header)
    assert (_field(error), error_info(error).reason) == (field, "NUL_CHARACTER")
    assert tenant.trainer.call("ListDatasets", pb.ListDatasetsRequest()).datasets == []


@pytest.mark.parametrize(("rpc", "request_", "field"), [
    ("GetDataset", pb.GetDatasetRequest(id="ds_\x00"), "id"),
    ("DeleteDataset", pb.DeleteDatasetRequest(id="ds_\x00"), "id"),
    ("ListDatasets", pb.ListDatasetsRequest(page={"page_token": "a\x00"}), "page.page_token"),
    ("GetJob", pb.GetJobRequest(id="job_\x00"), "id"),
    ("CancelJob", pb.CancelJobRequest(id="job_\x00"), "id"),
    ("ListJobs", pb.ListJobsRequest(tenant="\x00"), "tenant"),
    ("StartJob", pb.StartJobRequest(dataset_id="ds_1", output_adapter_name="fin",
                                    lora=pb.LoraConfig(target_modules=["q_proj", "v\x00"])), "lora.target_modules[1]"),
    ("StartJob", pb.StartJobRequest(dataset_id="ds_1", output_adapter_name="fin", request_id="r\x00"), "request_id"),
])
def test_a_nul_in_any_request_string_names_the_field(tenant, rpc, request_, field):
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.trainer.call, rpc, request_)
    assert _field(error) == field, error.details()


def test_a_nul_in_watch_job_names_the_field(tenant):
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.trainer.watch, "job_\x00", timeout=30)
    assert _field(error) == "id"


@pytest.mark.parametrize(("names", "field"), [
    ({"name": "fin\n"}, "output_adapter_name"),
    ({"name": "fin", "deployment": "dep\n"}, "deployment_name"),
])
def test_names_with_a_final_newline_are_refused_before_anything_else(tenant, names, field):
    # Checked before the dataset: the refusal names the name, not the (unknown) dataset.
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.trainer.start, "ds_unknown", **names)
    assert _field(error) == field


def test_json_the_parser_gives_up_on_and_non_text_name_their_lines(tenant):
    good = prompt_completion_lines()
    lines = [good[0],
             '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "completion": "x"}',  # 2: nested too deeply
             '{"prompt": "a", "completion": "b", "n": 1' + "0" * 5000 + "}",  # 3: an integer of 5001 digits
             '{"prompt": "lone \\ud800 surrogate", "completion": "b"}',  # 4: no text
             good[1]]
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.trainer.upload, lines)
    assert error_info(error).metadata["lines"] == "2,3,4", error.details()
    assert "line 2: not valid JSON (nested too deeply)" in error.details()
    assert "line 3: not valid JSON (Exceeds the limit (4300 digits)" in error.details()
    assert "line 4: prompt holds an unpaired surrogate" in error.details()
    assert tenant.trainer.call("ListDatasets", pb.ListDatasetsRequest()).datasets == []


def test_chat_text_that_is_no_text_names_its_line(tenant):
    lines = [*finance_chat_lines()[:2],
             json.dumps({"messages": [{"role": "user", "content": "q \udfff"}, {"role": "assistant", "content": "a"}]})]
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.trainer.upload, lines)
    assert "line 3: messages[0].content holds an unpaired surrogate" in error.details()


def test_long_values_in_bad_lines_do_not_hide_the_reasons(tenant):
    # Content swapped into "role" on many lines: the reasons must still reach the caller.
    swapped = json.dumps({"messages": [{"role": "x" * 20_000, "content": "user"},
                                       {"role": "assistant", "content": "a"}]})
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.trainer.upload, [swapped] * 12)
    assert error_info(error).reason == "INVALID_DATASET_LINES"
    assert "line 1: messages[0].role must be one of system, user, assistant" in error.details()
    assert len(error.details()) < 4000


def test_long_caller_names_in_start_job_refusals_are_cut_short(tenant):
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.trainer.start, "ds_unknown",
                         lora=pb.LoraConfig(target_modules=["y" * 20_000]))
    assert _field(error) == "lora.target_modules" and len(error.details()) < 1000
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.trainer.start, "ds_unknown", name="n" * 20_000)
    assert _field(error) == "output_adapter_name" and len(error.details()) < 1000


def test_an_empty_base_model_in_the_header_is_invalid_argument(tenant):
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.trainer.upload, finance_chat_lines(),
                         base_model="")
    assert (_field(error), error_info(error).reason) == ("header.base_model", "MISSING_FIELD")


def test_bom_crlf_blank_lines_and_no_final_newline_are_accepted(tenant):
    lines = prompt_completion_lines()
    body = "\ufeff" + "\r\n".join(lines[:3]) + "\r\n\r\n  \r\n" + lines[3]  # no final newline
    dataset = tenant.trainer.upload(body.encode())
    assert (dataset.num_examples, dataset.format) == (4, pb.DATASET_FORMAT_PROMPT_COMPLETION)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_a_utf16_or_utf32_file_is_refused_as_such(tenant, encoding):
    # What Windows PowerShell's `>` and Notepad's "Unicode" write: it was refused line by line,
    # the first "not UTF-8" and every other "not valid JSON" though each looks right in an editor.
    body = ("\ufeff" if encoding == "utf-16-be" else "") + "\n".join(prompt_completion_lines()) + "\n"
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tenant.trainer.upload, body.encode(encoding))
    assert (_field(error), error_info(error).reason) == ("chunk", "NOT_UTF8")
    assert "UTF-16 or UTF-32" in error.details() and "save it as UTF-8" in error.details()
    assert "line" not in error.details()
    assert tenant.trainer.call("ListDatasets", pb.ListDatasetsRequest()).datasets == []


def test_a_line_far_too_long_is_refused_without_being_tokenized(tmp_path):
    # Tokenizing takes ~140 bytes per character, in the trainer process: one line of a few
    # hundred MB (within --max-dataset-mb) could exhaust its memory, ending every job on it.
    tokenized: list[int] = []

    class Measured:  # the tiny tokenizer, noting the length of every text it tokenizes
        def __init__(self, tokenizer) -> None:
            self._tokenizer = tokenizer

        def __getattr__(self, name: str):
            return getattr(self._tokenizer, name)

        def __call__(self, text: str, **kwargs):
            tokenized.append(len(text))
            return self._tokenizer(text, **kwargs)

    huge = "the market is up. " * 30_000
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps({"prompt": "Q: up?", "completion": " yes."}),
                               json.dumps({"prompt": "Q: and?", "completion": huge})]) + "\n")
    with pytest.raises(InvalidArgument) as caught:
        validate_jsonl(path, "auto", Measured(build_tokenizer()), 512)
    assert caught.value.metadata["lines"] == "2"
    assert f"too long: {len(huge) + 7} characters" in caught.value.message and "max_seq_len 512" in caught.value.message
    assert tokenized and max(tokenized) < 100  # the short line's texts only


def test_a_chat_template_refusing_a_conversation_names_the_line(tmp_path):
    tokenizer = build_tokenizer()
    # Like many real templates: roles must alternate, enforced with raise_exception.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    twice = {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(twice) + "\n")
    with pytest.raises(InvalidArgument) as caught:
        validate_jsonl(path, "chat", tokenizer, 512)
    assert caught.value.metadata["lines"] == "2"
    assert "chat template refuses it: Conversation roles must alternate" in caught.value.message
