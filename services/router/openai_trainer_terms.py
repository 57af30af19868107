"""The Trainer's errors, and idempotency keys, in the terms of the OpenAI API that called it.

The Trainer names its own fields (`dataset_id`, `training.epochs`, `header.base_model`); a
caller of /v1/fine_tuning/jobs sent `training_file` and `hyperparameters.n_epochs`, and the
OpenAI error body's `param` must name what the caller sent, never a field it cannot see. The
Trainer's `reason` becomes the body's `code` (http_api.error_body), so a few reasons are
renamed to the codes OpenAI documents for the same failure.
"""

from __future__ import annotations

import hashlib

from services.common.errors import LoraplexError

#: Trainer reason -> the reason whose lower case is the OpenAI error code.
OPENAI_REASONS = {"INVALID_DATASET_LINES": "INVALID_FILE_FORMAT", "EMPTY_DATASET": "INVALID_FILE_FORMAT",
                  "NOT_UTF8": "INVALID_FILE_FORMAT", "DATASET_TOO_LARGE": "FILE_TOO_LARGE",
                  "DATASET_NOT_FOUND": "FILE_NOT_FOUND", "BAD_HYPERPARAMETER": "INVALID_HYPERPARAMETER",
                  "REQUEST_ID_REUSED": "IDEMPOTENCY_KEY_REUSED"}


def in_openai_terms(error: LoraplexError, params: dict[str, str]) -> LoraplexError:
    """`error` with its field renamed by `params` (message included, where it opens with the
    field) and its reason by OPENAI_REASONS; a field with no OpenAI name is dropped from `param`
    rather than shown as a name the caller never used."""
    field = error.metadata.get("field", "")
    if field:
        renamed = params.get(field, "")
        if renamed and error.message.startswith(f"{field} "):
            error.message = renamed + error.message[len(field):]
        if renamed:
            error.metadata["field"] = renamed
        else:
            del error.metadata["field"]
    error.reason = OPENAI_REASONS.get(error.reason, error.reason)
    return error


def trainer_request_id(idempotency_key: str, kind: str) -> str:
    """The Trainer request_id for an OpenAI call's Idempotency-Key header ("" without one).

    Hashed: the header may hold anything a client chose (spaces, 300 characters), a request_id
    only 1-128 printable ASCII characters. The Trainer keys it per tenant, so the same key
    reused by two tenants means two requests; `kind` keeps a file's key and a job's apart."""
    if not idempotency_key:
        return ""
    return f"openai-{kind}-{hashlib.sha256(idempotency_key.encode()).hexdigest()[:40]}"
