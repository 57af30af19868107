"""`loraplex adapter`: bring your own adapter. Upload a PEFT adapter trained anywhere, list a
tenant's adapters, point a deployment at one (a hot swap, when the deployment already serves
another version).

  loraplex adapter upload PATH --name NAME --base-model BASE [--deploy DEPLOYMENT] [--description TEXT]
  loraplex adapter list [--name NAME]
  loraplex adapter deploy DEPLOYMENT ADAPTER [--version N] [--base-model BASE]

PATH is a PEFT `save_pretrained` folder (adapter_config.json + adapter_model.safetensors) or a
zip of one. The Registry checks the adapter against the base model (and refuses, naming why,
what it cannot serve); uploading identical bytes again returns the existing version. `--deploy`
binds the deployment to exactly the version uploaded, replacing what it served: requests move
to the new weights without a restart. Calls go to `--registry` with a tenant API key
(`LORAPLEX_API_KEY`), or with the admin token (`LORAPLEX_ADMIN_TOKEN`) and `--tenant`. Each
command prints the Registry's answer as JSON; an error prints its gRPC status and message
and exits 1. Without torch: this is a small client.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from services.common import tls
from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.pb.loraplex.registry.v1 import registry_pb2_grpc

CHUNK = 1 << 20
FILES = ("adapter_config.json", "adapter_model.safetensors")
#: The environment the commands read (checked against the README by tests/e2e/test_docs_drift.py).
API_KEY, ADMIN_TOKEN, REGISTRY, TLS_CA = ("LORAPLEX_API_KEY", "LORAPLEX_ADMIN_TOKEN", "LORAPLEX_REGISTRY_ADDRESS",
                                          "LORAPLEX_TLS_CA")
ENVIRONMENT = (API_KEY, ADMIN_TOKEN, REGISTRY, TLS_CA)


class UsageError(Exception):
    """A local mistake (a missing file, no credentials): exit 2 with the message."""


def main(argv: list[str], prog: str = "loraplex adapter") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        stub = registry_pb2_grpc.RegistryStub(_channel(args))
        metadata = _credentials(args)
        reply = args.run(stub, metadata, args)
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"{prog}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2))
    return 0


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default=os.environ.get(REGISTRY, "127.0.0.1:50051"),
                        help=f"HOST:PORT of the Registry [env {REGISTRY}]")
    parser.add_argument("--tenant", default="", help="tenant name or id, with the admin token (a tenant key "
                                                     "implies its own)")
    parser.add_argument("--tls-ca", type=Path, default=_env_path(TLS_CA),
                        help=f"PEM CA verifying the Registry: call it over TLS [env {TLS_CA}]")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per call")
    commands = parser.add_subparsers(dest="command", required=True)

    upload = commands.add_parser("upload", help="upload a PEFT adapter folder or zip")
    upload.add_argument("path", type=Path)
    upload.add_argument("--name", required=True, help="adapter name (a new version when it exists)")
    upload.add_argument("--base-model", required=True, help="registered base model it was trained on")
    upload.add_argument("--description", default="")
    upload.add_argument("--deploy", default="", help="also bind this deployment name to the version uploaded")
    upload.add_argument("--override-base-model-check", action="store_true",
                        help="accept a config naming another base model when the shapes match")
    upload.set_defaults(run=_upload)

    listing = commands.add_parser("list", help="the tenant's adapters, newest first")
    listing.add_argument("--name", default="", help="only this adapter's versions")
    listing.set_defaults(run=_list)

    deploy = commands.add_parser("deploy", help="bind (or re-point) a deployment name to an adapter")
    deploy.add_argument("deployment")
    deploy.add_argument("adapter")
    deploy.add_argument("--version", type=int, default=0, help="adapter version (0: always the latest)")
    deploy.add_argument("--base-model", default="", help="the adapter's base model (when names repeat)")
    deploy.set_defaults(run=_deploy)
    return parser


def _env_path(variable: str) -> Path | None:
    return Path(os.environ[variable]) if os.environ.get(variable) else None


def _channel(args) -> grpc.Channel:
    try:
        client_tls = tls.client_tls(args.tls_ca)
    except tls.TlsError as exc:
        raise UsageError(str(exc)) from None
    limit = 64 << 20
    return tls.channel(args.registry, client_tls, [("grpc.max_send_message_length", limit),
                                                   ("grpc.max_receive_message_length", limit)])


def _credentials(args) -> list[tuple[str, str]]:
    key, admin = os.environ.get(API_KEY, ""), os.environ.get(ADMIN_TOKEN, "")
    if key:
        return [("authorization", f"Bearer {key}")]
    if admin and args.tenant:
        return [("authorization", f"Bearer {admin}")]
    if admin:
        raise UsageError("with the admin token, --tenant says whose adapter this is")
    raise UsageError("no credentials: set LORAPLEX_API_KEY to a tenant key (or LORAPLEX_ADMIN_TOKEN and --tenant)")


def _upload(stub, metadata, args) -> dict:
    parts = _archive(args.path)
    digest = hashlib.sha256()
    for _, path in parts:
        with path.open("rb") as source:
            for chunk in iter(lambda: source.read(CHUNK), b""):
                digest.update(chunk)
    header = pb.UploadAdapterHeader(
        tenant=args.tenant, name=args.name, base_model=args.base_model, description=args.description,
        override_base_model_check=args.override_base_model_check, content_sha256=digest.hexdigest(),
        archive=pb.ADAPTER_ARCHIVE_ZIP if parts[0][0] == "" else pb.ADAPTER_ARCHIVE_FILES,
        files=[pb.UploadFile(filename=name, size_bytes=path.stat().st_size) for name, path in parts if name])

    def messages() -> Iterator[pb.UploadAdapterRequest]:
        yield pb.UploadAdapterRequest(header=header)
        for _, path in parts:  # streamed from disk: adapters of a real model are hundreds of MB
            with path.open("rb") as source:
                for chunk in iter(lambda: source.read(CHUNK), b""):
                    yield pb.UploadAdapterRequest(chunk=chunk)

    reply = stub.UploadAdapter(messages(), metadata=metadata, timeout=args.timeout)
    result = MessageToDict(reply, always_print_fields_with_no_presence=True)
    if args.deploy:
        result["deployment"] = MessageToDict(stub.BindDeployment(pb.BindDeploymentRequest(
            name=args.deploy, tenant=args.tenant, base_model=args.base_model, adapter_name=args.name,
            adapter_version=reply.adapter.version, replace=True), metadata=metadata, timeout=args.timeout))
    return result


def _archive(path: Path) -> list[tuple[str, Path]]:
    """[(file name in the upload, file)]: the folder's two files, or [("", zip)]."""
    if path.is_file() and path.suffix == ".zip":
        return [("", path)]
    if not path.is_dir():
        raise UsageError(f"{path}: not a PEFT adapter folder or a .zip of one")
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        hint = " (pickled adapter_model.bin is never loaded: save with safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise UsageError(f"{path}: no {' or '.join(missing)}{hint}")
    return [(name, path / name) for name in FILES]


def _list(stub, metadata, args) -> dict:
    adapters, token = [], ""
    while True:
        reply = stub.ListAdapters(pb.ListAdaptersRequest(tenant=args.tenant, name=args.name,
                                                         page={"page_size": 1000, "page_token": token}),
                                  metadata=metadata, timeout=args.timeout)
        adapters += [MessageToDict(adapter) for adapter in reply.adapters]
        token = reply.next_page_token
        if not token:
            return {"adapters": adapters}


def _deploy(stub, metadata, args) -> dict:
    return MessageToDict(stub.BindDeployment(pb.BindDeploymentRequest(
        name=args.deployment, tenant=args.tenant, base_model=args.base_model, adapter_name=args.adapter,
        adapter_version=args.version, replace=True), metadata=metadata, timeout=args.timeout))
