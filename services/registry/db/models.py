"""SQLAlchemy 2 models: the Registry's metadata schema.

Decisions recorded here:
- Ids are prefixed random strings (`tnt_…`, `key_…`, `adp_…`): opaque, safe to show, and a
  prefix tells an id from a name (tenant names cannot contain `_`).
- Adapter versions are immutable rows; `(tenant_id, name, version)` is unique so two racing
  uploads can never both become version N, and `(tenant_id, name, base_model, content_digest)`
  is unique so identical re-uploads collapse to one version.
- Weights live in the blob store under their sha256; a row only points at them. Many rows may
  share one blob (identical weights uploaded by two tenants), so deleting a row never deletes
  a blob: garbage collection removes blobs no row references.
- `change_events.sequence` is the change-feed cursor. SQLite's AUTOINCREMENT (never reuses a
  number) and a PostgreSQL identity both give strictly increasing values; see db/session.py for
  why writers take the feed lock so sequence order is also commit order.
- Timestamps are stored and returned as UTC-aware datetimes on both databases.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text,
                        TypeDecorator, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator):
    """A DateTime that is always UTC-aware in Python (SQLite drops the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.timezone.utc) if value is not None else None

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    display_name: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    prefix: Mapped[str] = mapped_column(String(16))
    # sha256 hex of the whole secret; see services/registry/keys.py for why a plain hash.
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class BaseModel(Base):
    __tablename__ = "base_models"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    location: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text, default="")
    # ArchitectureFingerprint as a dict (services/registry/fingerprint.py).
    fingerprint: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name", "version", name="uq_adapters_tenant_name_version"),
        UniqueConstraint("tenant_id", "name", "base_model", "content_digest", name="uq_adapters_identical"),
        Index("ix_adapters_sha256", "sha256"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    version: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(ForeignKey("base_models.name"))
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    use_rslora: Mapped[bool] = mapped_column(Boolean, default=False)
    scaling: Mapped[float] = mapped_column(Float)
    target_modules: Mapped[list] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # sha256 of adapter_model.safetensors: the blob's content address.
    sha256: Mapped[str] = mapped_column(String(64))
    # sha256 over weights + normalized config: what "identical upload" means.
    content_digest: Mapped[str] = mapped_column(String(64))
    config_json: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text, default="")
    labels: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AdapterName(Base):
    """The highest version ever given to a tenant's adapter name. Versions are never reused:
    after v2 is deleted the next upload is v3, so (tenant, name, version) always names the
    same bytes (caches and audit logs may keep it)."""

    __tablename__ = "adapter_names"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    last_version: Mapped[int] = mapped_column(Integer)


class Deployment(Base):
    __tablename__ = "deployments"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    base_model: Mapped[str] = mapped_column(ForeignKey("base_models.name"))
    adapter_name: Mapped[str] = mapped_column(String(63))
    # 0 follows the latest version of adapter_name (for this base model).
    adapter_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ChangeEvent(Base):
    __tablename__ = "change_events"
    __table_args__ = {"sqlite_autoincrement": True}

    sequence: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                          autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    tenant_id: Mapped[str] = mapped_column(String(40), default="")
    subject: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class FeedState(Base):
    """One row: the highest sequence pruned from the feed (cursors below it are OUT_OF_RANGE)."""

    __tablename__ = "feed_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pruned_through: Mapped[int] = mapped_column(BigInteger, default=0)
