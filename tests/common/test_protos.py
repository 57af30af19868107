"""The v1 contract: stubs are fresh, every RPC documents itself, every service is served."""

from __future__ import annotations

import re

from services.common import protogen, services
from services.common.pb.loraplex.common.v1 import generation_pb2


def test_committed_stubs_match_the_protos(tmp_path):
    fresh = tmp_path / "pb"
    protogen.generate(fresh)
    committed = protogen.STUB_ROOT
    fresh_files = {p.relative_to(fresh): p.read_text() for p in fresh.rglob("*") if p.is_file()}
    committed_files = {p.relative_to(committed): p.read_text() for p in committed.rglob("*")
                       if p.is_file() and "__pycache__" not in p.parts}
    assert sorted(fresh_files) == sorted(committed_files), "stub files differ: run `make proto`"
    stale = [str(path) for path, text in fresh_files.items() if committed_files[path] != text]
    assert not stale, f"stale stubs (run `make proto`): {stale}"


def test_every_rpc_has_a_comment_naming_its_errors():
    undocumented = []
    for proto in protogen.proto_files():
        lines = proto.read_text().splitlines()
        for number, line in enumerate(lines):
            if re.match(r"\s*rpc\s+\w+", line):
                comment = []
                back = number - 1
                while back >= 0 and lines[back].strip().startswith("//"):
                    comment.append(lines[back])
                    back -= 1
                if not comment:
                    undocumented.append(f"{proto.name}:{number + 1}: {line.strip()}")
    assert not undocumented, "RPCs without a comment:\n" + "\n".join(undocumented)


def test_every_proto_package_is_versioned():
    for proto in protogen.proto_files():
        package = re.search(r"^package\s+([\w.]+);", proto.read_text(), re.MULTILINE).group(1)
        assert package.startswith("loraplex.") and package.endswith(".v1"), proto


def test_the_contract_covers_what_the_other_issues_need():
    rpcs = {service.descriptor.name: {m.name for m in service.descriptor.methods} for service in services.ALL}
    assert {"CreateTenant", "GetTenant", "ListTenants", "DeleteTenant", "CreateApiKey", "RevokeApiKey",
            "VerifyApiKey", "RegisterBaseModel", "GetBaseModel", "ListBaseModels", "UploadAdapter", "GetAdapter",
            "ListAdapters", "DeleteAdapter", "DownloadAdapter", "BindDeployment", "UnbindDeployment",
            "ResolveDeployment", "ListDeployments", "WatchChanges"} <= rpcs["Registry"]
    assert {"UploadDataset", "StartJob", "GetJob", "ListJobs", "CancelJob", "WatchJob"} <= rpcs["Trainer"]
    assert {"Generate", "Complete", "ListModels"} <= rpcs["Router"]
    assert {"RegisterNode", "Heartbeat", "DeregisterNode", "ListNodes"} <= rpcs["Nodes"]
    assert {"Generate", "LoadAdapter", "EvictAdapter", "ListAdapters", "GetStats", "GetInfo"} <= rpcs["Inference"]
    streaming = {(s.descriptor.name, m.name) for s in services.ALL for m in s.descriptor.methods
                 if m.server_streaming or m.client_streaming}
    assert {("Registry", "UploadAdapter"), ("Registry", "DownloadAdapter"), ("Registry", "WatchChanges"),
            ("Trainer", "UploadDataset"), ("Trainer", "WatchJob"), ("Router", "Generate"),
            ("Inference", "Generate")} <= streaming


def test_sampling_parameters_distinguish_unset_from_zero():
    params = generation_pb2.SamplingParams()
    assert not params.HasField("temperature")
    params.temperature = 0.0
    assert params.HasField("temperature")
