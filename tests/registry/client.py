"""A thin test client: calls with a bearer token, chunked uploads, whole downloads."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid

import grpc
import pytest

from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.pb.loraplex.registry.v1 import registry_pb2_grpc
from tests.registry.lora_files import AdapterFiles

CHUNK = 64 * 1024


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@dataclasses.dataclass
class Client:
    stub: registry_pb2_grpc.RegistryStub
    token: str
    tenant_id: str = ""
    tenant_name: str = ""

    def __getattr__(self, rpc: str):
        method = getattr(self.stub, rpc)
        return lambda request, **kwargs: method(request, metadata=bearer(self.token), **{"timeout": 60, **kwargs})

    def upload_bytes(self, data: bytes, *, name: str, archive=pb.ADAPTER_ARCHIVE_ZIP, base_model: str = "tiny",
                     tenant: str = "", files: list[tuple[str, int]] | None = None, chunk: int = CHUNK,
                     **header) -> pb.UploadAdapterResponse:
        head = pb.UploadAdapterHeader(tenant=tenant, name=name, base_model=base_model, archive=archive,
                                      files=[pb.UploadFile(filename=f, size_bytes=s) for f, s in files or []],
                                      **header)

        def messages():
            yield pb.UploadAdapterRequest(header=head)
            for start in range(0, len(data), chunk):
                yield pb.UploadAdapterRequest(chunk=data[start:start + chunk])

        return self.stub.UploadAdapter(messages(), metadata=bearer(self.token), timeout=120)

    def upload(self, files: AdapterFiles, *, name: str, as_files: bool = False, **kwargs) -> pb.UploadAdapterResponse:
        if as_files:
            return self.upload_bytes(files.config + files.weights, name=name, archive=pb.ADAPTER_ARCHIVE_FILES,
                                     files=[("adapter_config.json", len(files.config)),
                                            ("adapter_model.safetensors", len(files.weights))], **kwargs)
        return self.upload_bytes(files.zip(), name=name, **kwargs)

    def download(self, adapter_id: str, chunk_size: int = 0) -> tuple[pb.AdapterManifest, bytes]:
        messages = list(self.stub.DownloadAdapter(pb.DownloadAdapterRequest(id=adapter_id, chunk_size=chunk_size),
                                                  metadata=bearer(self.token), timeout=120))
        assert messages[0].WhichOneof("payload") == "manifest"
        assert all(m.WhichOneof("payload") == "chunk" for m in messages[1:])
        return messages[0].manifest, b"".join(m.chunk for m in messages[1:])


def expect_error(code: grpc.StatusCode, call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "ByteSize"):
            list(result)  # server-streaming: errors arrive while iterating
    assert caught.value.code() == code, f"{caught.value.code()}: {caught.value.details()}"
    return caught.value


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
