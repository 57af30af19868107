"""OpenAI's Files API for fine-tuning, backed by the Trainer's datasets.

    POST   /v1/files                 upload (multipart: `file`, `purpose` "fine-tune")
    GET    /v1/files                 the caller's files, newest first (or `order=asc`)
    GET    /v1/files/{id}            one of them
    DELETE /v1/files/{id}            delete it (400 while a queued or running job uses it)
    GET    /v1/files/{id}/content    400, as at OpenAI: fine-tune files are not downloadable

A file is a Trainer dataset, with the dataset's id as the file id, so gRPC and HTTP callers
see one object. Calls go to the Trainer with the caller's own API key: the Trainer scopes
them to its tenant, so another tenant's file is a 404 there exactly like an unknown id.

Decisions:
- The Trainer checks each line's token length with a base model's tokenizer at upload, and
  OpenAI's upload names no model. The file is checked against the `base_model` form field (a
  loraplex extension, `extra_body={"base_model": ...}` in the SDK) or, without it, the one base
  model the Registry serves; with several and none named it is a 400 naming `base_model`. A job
  on another base model is refused by the Trainer (400 naming `model`): upload the file again.
- Before anything is sent, the lines are checked here with the Trainer's own rules for JSONL
  chat and prompt/completion examples (services/trainer/examples.py), so a malformed file is
  a 400 naming its lines at once; the Trainer then checks what needs the tokenizer.
- An `Idempotency-Key` header makes an upload safe to retry (the Trainer's request_id).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from services.common.errors import InvalidArgument, LoraplexError, NotFound
from services.router.auth import Caller
from services.router.multipart import Form, parse_form
from services.router.openai_trainer_terms import in_openai_terms, trainer_request_id
from services.trainer.examples import BadExample, check_example, detect_format
from services.trainer.validation import MAX_REPORTED, WIDE_BOMS, parse_json_lines

PURPOSE = "fine-tune"
MAX_FILENAME = 255  # the Trainer's limit on a dataset name
#: Trainer field -> the upload's name for it.
UPLOAD_PARAMS = {"header.base_model": "base_model", "chunk": "file", "header.name": "file",
                 "header.request_id": "Idempotency-Key"}


@dataclasses.dataclass(frozen=True)
class StoredFile:
    """A Trainer dataset, as the Files API shows it."""

    id: str
    filename: str
    size_bytes: int
    created_at: float  # unix seconds


@dataclasses.dataclass(frozen=True)
class DatasetUpload:
    filename: str
    base_model: str
    content: bytes
    request_id: str = ""


class DatasetStore(Protocol):
    """The Trainer's datasets, called with the caller's `authorization` header (NotFound for
    an unknown or another tenant's id)."""

    async def upload_dataset(self, authorization: str, upload: DatasetUpload) -> StoredFile: ...

    async def get_dataset(self, authorization: str, dataset_id: str) -> StoredFile: ...

    def list_datasets(self, authorization: str) -> AsyncIterator[StoredFile]: ...

    async def delete_dataset(self, authorization: str, dataset_id: str) -> None: ...


def file_object(stored: StoredFile) -> dict:
    # "processed": the Trainer stores a dataset only once every line passed its checks.
    return {"id": stored.id, "object": "file", "bytes": stored.size_bytes, "created_at": int(stored.created_at),
            "filename": stored.filename, "purpose": PURPOSE, "status": "processed", "expires_at": None,
            "status_details": None}


def no_such_file(file_id: str) -> NotFound:
    return NotFound(f"No such File object: {file_id[:200]}", reason="FILE_NOT_FOUND", field="file_id")


def check_training_file(content: bytes) -> int:
    """The number of examples; InvalidArgument naming the bad lines (at most MAX_REPORTED of
    them, with reasons, and how many there are) as the Trainer words them. Token lengths and
    the chat template are the Trainer's to check: they need the base model's tokenizer."""
    if content.startswith(WIDE_BOMS):
        raise _bad_file("the file is UTF-16 or UTF-32 text (it starts with that byte order mark); JSONL must be "
                        "UTF-8: save it as UTF-8")
    problems: list[str] = []
    total_bad = count = 0
    fmt = ""
    for number, parsed in parse_json_lines(io.BytesIO(content)):
        try:
            if isinstance(parsed, BadExample):
                raise parsed
            fmt = fmt or detect_format(parsed)  # the first line that parses decides, as at the Trainer
            check_example(parsed, fmt)
            count += 1
        except BadExample as exc:
            total_bad += 1
            if len(problems) < MAX_REPORTED:
                problems.append(f"line {number}: {exc}")
    if total_bad:
        more = f"; and {total_bad - len(problems)} more" if total_bad > len(problems) else ""
        noun = "line" if total_bad == 1 else "lines"
        raise _bad_file(f"the training file has {total_bad} invalid {noun}: {'; '.join(problems)}{more}. Each line "
                        'must be a JSON object: {"messages": [{"role": "system"|"user"|"assistant", "content": '
                        '"..."}]} or {"prompt": "...", "completion": "..."}')
    if count == 0:
        raise _bad_file("the training file has no examples (it is empty, or every line is blank)")
    return count


def _bad_file(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason="INVALID_FILE_FORMAT", field="file")


def _text_field(form: Form, name: str) -> str:
    value = form.fields.get(name, "")
    if name in form.files:
        raise InvalidArgument(f"'{name}' must be a plain form field, not a file", field=name)
    return value


def read_upload(form: Form, base_models: list[str], idempotency_key: str) -> DatasetUpload:
    """What to send the Trainer for an upload form (blocking: it reads every line)."""
    purpose = _text_field(form, "purpose")
    if purpose != PURPOSE:
        raise InvalidArgument(f"purpose must be '{PURPOSE}': this router stores files for fine-tuning only, got "
                              f"{purpose[:80]!r}" if purpose else f"purpose is required ('{PURPOSE}')",
                              field="purpose")
    upload = form.files.get("file")
    if upload is None:
        raise InvalidArgument("file is required: the JSONL training file, as a multipart file part", field="file")
    filename = upload.filename or "file.jsonl"
    if len(filename) > MAX_FILENAME or "\x00" in filename:
        raise InvalidArgument(f"the file name must be 1-{MAX_FILENAME} characters without NUL", field="file")
    base_model = _text_field(form, "base_model") or _only_base_model(base_models)
    unknown = sorted((set(form.fields) | set(form.files)) - {"purpose", "file", "base_model"})
    if unknown:
        raise InvalidArgument(f"unrecognized form field: {', '.join(name[:80] for name in unknown)}", field=unknown[0])
    check_training_file(upload.content)
    return DatasetUpload(filename, base_model, upload.content, trainer_request_id(idempotency_key, "file"))


def _only_base_model(base_models: list[str]) -> str:
    if len(base_models) == 1:
        return base_models[0]
    if not base_models:
        raise InvalidArgument("no base model is registered, so there is nothing to check the file against yet",
                              reason="NO_BASE_MODEL", field="base_model")
    raise InvalidArgument(f"this router serves {len(base_models)} base models ({', '.join(base_models[:10])}); name "
                          "the one the file is for in the form field base_model (the SDK: extra_body={'base_model': "
                          "...})", reason="BASE_MODEL_REQUIRED", field="base_model")


class FilesApi:
    """The Files API's calls, each on behalf of a verified caller (`authorization` is the
    header it authenticated with, passed on to the Trainer)."""

    def __init__(self, trainer: DatasetStore, base_models: Callable[[Caller], Awaitable[list[str]]]) -> None:
        self.trainer, self.base_models = trainer, base_models

    async def create(self, caller: Caller, authorization: str, content_type: str, body: bytes,
                     idempotency_key: str) -> dict:
        base_models = await self.base_models(caller)

        def read() -> DatasetUpload:
            return read_upload(parse_form(content_type, body), base_models, idempotency_key)

        # Parsing and checking a file of many MiB takes seconds: off the loop that streams tokens.
        upload = await asyncio.to_thread(read)
        try:
            return file_object(await self.trainer.upload_dataset(authorization, upload))
        except LoraplexError as exc:
            raise in_openai_terms(exc, UPLOAD_PARAMS) from None

    async def retrieve(self, authorization: str, file_id: str) -> dict:
        return file_object(await self._get(authorization, file_id))

    async def list(self, authorization: str, limit: int, after: str, ascending: bool) -> dict:
        files = [stored async for stored in self.trainer.list_datasets(authorization)]  # newest first
        if ascending:
            files.reverse()
        if after:
            ids = [stored.id for stored in files]
            files = files[ids.index(after) + 1:] if after in ids else []
        page = files[:limit]
        return {"object": "list", "data": [file_object(stored) for stored in page], "has_more": len(files) > limit,
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}

    async def delete(self, authorization: str, file_id: str) -> dict:
        await self._get(authorization, file_id)
        try:
            await self.trainer.delete_dataset(authorization, file_id)
        except NotFound:
            raise no_such_file(file_id) from None
        except LoraplexError as exc:  # in use by a queued or running job
            raise in_openai_terms(exc, {"id": "file_id"}) from None
        return {"id": file_id, "object": "file", "deleted": True}

    async def content(self, authorization: str, file_id: str) -> bytes:
        """Never returns: as at OpenAI, a fine-tune file cannot be downloaded (and the Trainer has
        no call that would read it back). Another tenant's file is a 404 first, like any unknown id."""
        await self._get(authorization, file_id)
        raise InvalidArgument(f"Not allowed to download files of purpose: {PURPOSE}", reason="DOWNLOAD_NOT_ALLOWED",
                              field="file_id")

    async def _get(self, authorization: str, file_id: str) -> StoredFile:
        try:
            return await self.trainer.get_dataset(authorization, file_id)
        except NotFound:
            raise no_such_file(file_id) from None
