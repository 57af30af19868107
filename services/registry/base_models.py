"""Base models: a name, where the checkpoint lives, and its architecture fingerprint.

The registry reads only the checkpoint's config.json (never the weights) at registration:
from a local folder the registry can see, or from `s3://bucket/prefix/` on the S3 endpoint
the registry is configured with. Registering the same name and location again returns the
existing row; the same name with another location is ALREADY_EXISTS (a base model's shapes
must never change under adapters that were validated against it). So is a name a deployment
already uses: the two share the namespace of `model` (deployments.py says why). Locations
are stored as first given and compared without trailing slashes: "/models/x/" and
"/models/x" (or "s3://b/x/" and "s3://b/x") are the same folder, and _read_config reads the
same config.json for both.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from services.common.errors import AlreadyExists, InvalidArgument, NotFound
from services.registry import feed, paging
from services.registry.auth import Principal, require_admin
from services.registry.blobstore.outage import store_down
from services.registry.context import RegistryContext
from services.registry.db.models import BaseModel, Deployment, utcnow
from services.common.fields import MAX_MODEL_NAME, require
from services.registry.fingerprint import ArchitectureFingerprint, fingerprint_from_config

# Checked with fullmatch: `$` alone also matches before a trailing newline.
BASE_MODEL_NAME = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_MODEL_NAME - 1}}}$")
#: Taken by whoever claims a base model or deployment name, so the two never share one.
MODEL_NAME_LOCK = "model-name"
MAX_CONFIG_BYTES = 1024 * 1024
# Like an adapter's description (uploads.py); a location is a path or URI, never longer in practice.
MAX_DESCRIPTION, MAX_LOCATION = 4096, 1024


def _read_config(ctx: RegistryContext, location: str) -> dict:
    if location.startswith("s3://"):
        bucket, _, prefix = location.removeprefix("s3://").partition("/")
        read_object = getattr(ctx.store, "read_object", None)
        if read_object is None:
            raise InvalidArgument(f"location {location!r} is an S3 URI but this registry uses a local blob store; "
                                  "use a local folder path", reason="BAD_LOCATION", field="location")
        key = f"{prefix.strip('/')}/config.json" if prefix.strip("/") else "config.json"
        # An outage says nothing about the location: UNAVAILABLE, retry once the store is back.
        try:
            with store_down(f"config.json at {location!r} was not read and nothing was registered", field="location"):
                data = read_object(bucket, key, MAX_CONFIG_BYTES)
        except (KeyError, ValueError) as exc:
            raise InvalidArgument(f"location {location!r} has no readable config.json ({exc})",
                                  reason="BAD_LOCATION", field="location") from None
    else:
        path = Path(location)
        if not path.is_absolute():
            raise InvalidArgument(f"location {location!r} must be an absolute folder path or an s3:// URI",
                                  reason="BAD_LOCATION", field="location")
        try:
            with open(path / "config.json", "rb") as source:
                data = source.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise InvalidArgument(f"location {location!r} has no readable config.json ({exc.strerror})",
                                  reason="BAD_LOCATION", field="location") from None
        if len(data) > MAX_CONFIG_BYTES:
            raise InvalidArgument(f"{path / 'config.json'} is larger than {MAX_CONFIG_BYTES} bytes",
                                  reason="BAD_LOCATION", field="location")
    try:
        config = json.loads(data)
    # ValueError covers bad UTF-8, bad JSON and integers of over 4300 digits; RecursionError, absurd nesting.
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"config.json at {location!r} is not valid JSON ({str(exc)[:200]})",
                              reason="BAD_LOCATION", field="location") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"config.json at {location!r} is not a JSON object", reason="BAD_LOCATION",
                              field="location")
    return config


def register_base_model(ctx: RegistryContext, principal: Principal, name: str, location: str,
                        description: str) -> BaseModel:
    require_admin(principal, "RegisterBaseModel")
    if not BASE_MODEL_NAME.fullmatch(name):
        raise InvalidArgument(f"base model name {name!r} must be 1-128 characters of [A-Za-z0-9._-]",
                              reason="BAD_NAME", field="name", actual=name)
    if not location:
        raise InvalidArgument("location is required (a checkpoint folder path or s3:// URI)", field="location")
    if len(location) > MAX_LOCATION:
        raise InvalidArgument(f"location is longer than {MAX_LOCATION} characters", field="location")
    if len(description) > MAX_DESCRIPTION:
        raise InvalidArgument(f"description is longer than {MAX_DESCRIPTION} characters", field="description")
    taken = AlreadyExists(f"base model '{name}' is already registered with another location",
                          reason="BASE_MODEL_EXISTS", field="name")
    with ctx.db.read() as session:
        existing = session.get(BaseModel, name)
    if existing is not None:
        if not same_location(existing.location, location):
            raise taken
        return existing
    fingerprint = fingerprint_from_config(_read_config(ctx, location))
    try:
        with ctx.db.write() as session:
            ctx.db.lock(session, MODEL_NAME_LOCK, name)
            if session.get(BaseModel, name) is not None:
                raise taken
            if session.get(Deployment, name) is not None:  # whoever owns it: only admins register
                raise AlreadyExists(f"'{name}' is already the name of a deployment; a base model needs a name of "
                                    "its own", reason="NAME_IS_DEPLOYMENT", field="name")
            model = BaseModel(name=name, location=location, description=description,
                              fingerprint=fingerprint.to_dict(), created_at=utcnow())
            session.add(model)
            feed.record(ctx, session, feed.BASE_MODEL_REGISTERED, "", name)
    except IntegrityError:  # registered concurrently
        raise taken from None
    return model


def same_location(stored: str, given: str) -> bool:
    """Trailing slashes name the same folder or prefix; rows keep the location as first given."""
    return stored.rstrip("/") == given.rstrip("/")


def load_base_model(session, name: str, field: str = "base_model") -> BaseModel:
    model = session.get(BaseModel, require(name, field))
    if model is None:
        raise NotFound(f"base model '{name}' not found", reason="BASE_MODEL_NOT_FOUND", field=field)
    return model


def fingerprint_of(model: BaseModel) -> ArchitectureFingerprint:
    return ArchitectureFingerprint.from_dict(model.fingerprint)


def get_base_model(ctx: RegistryContext, principal: Principal, name: str) -> BaseModel:
    with ctx.db.read() as session:
        return load_base_model(session, name, field="name")


def list_base_models(ctx: RegistryContext, principal: Principal, page: paging.Page) -> tuple[list[BaseModel], str]:
    with ctx.db.read() as session:
        query = select(BaseModel).order_by(BaseModel.name).limit(page.size + 1)
        if page.after:
            query = query.where(BaseModel.name > page.after[0])
        rows = list(session.scalars(query))
    return paging.split(rows, page, lambda model: [model.name])
