"""`loraplex adapter` (services/common/adapter_cli.py) against a real Registry: a PEFT folder and
a zip uploaded with a tenant key, a new version deployed in place of the old (a hot swap), the
admin token with --tenant, and the errors a user meets: no credentials, a folder that is no
adapter, a pickled adapter, an adapter the Registry refuses, a revoked key."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest

from services.cli import main
from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from tests.registry.conftest import ADMIN_TOKEN, LiveRegistry, registry_config
from tests.registry.lora_files import make_peft_adapter


@pytest.fixture(scope="module")
def registry(request, tmp_path_factory, tiny_model_dir):
    server = LiveRegistry(registry_config("sqlite-local", tmp_path_factory.mktemp("registry"), request)).start()
    server.admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name="tiny", location=str(tiny_model_dir)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(tiny_model_dir, root / "v1", seed=1)
    make_peft_adapter(tiny_model_dir, root / "v2", seed=2)
    return root


def run(capsys, monkeypatch, registry, *argv, key: str = "", admin: bool = False) -> tuple[int, dict | str]:
    monkeypatch.delenv("LORAPLEX_API_KEY", raising=False)
    monkeypatch.delenv("LORAPLEX_ADMIN_TOKEN", raising=False)
    if key:
        monkeypatch.setenv("LORAPLEX_API_KEY", key)
    if admin:
        monkeypatch.setenv("LORAPLEX_ADMIN_TOKEN", ADMIN_TOKEN)
    code = main(["adapter", "--registry", registry.address, *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else err


def test_upload_a_folder_then_a_new_version_deployed_in_its_place(registry, adapters, capsys, monkeypatch):
    tenant = registry.new_tenant("cli")
    code, first = run(capsys, monkeypatch, registry, "upload", str(adapters / "v1"), "--name", "support",
                      "--base-model", "tiny", "--deploy", "support-bot", key=tenant.token)
    assert code == 0 and first["created"] and first["adapter"]["version"] == 1
    assert first["deployment"]["name"] == "support-bot" and first["deployment"]["adapterVersion"] == 1
    code, again = run(capsys, monkeypatch, registry, "upload", str(adapters / "v1"), "--name", "support",
                      "--base-model", "tiny", key=tenant.token)
    assert code == 0 and not again["created"] and again["adapter"]["id"] == first["adapter"]["id"]  # same bytes
    code, second = run(capsys, monkeypatch, registry, "upload", str(adapters / "v2"), "--name", "support",
                       "--base-model", "tiny", "--deploy", "support-bot", key=tenant.token)
    assert code == 0 and second["adapter"]["version"] == 2 and second["deployment"]["adapterVersion"] == 2
    served = tenant.ResolveDeployment(pb.ResolveDeploymentRequest(name="support-bot"))
    assert served.adapter.id == second["adapter"]["id"]  # the deployment now serves the new weights
    code, listed = run(capsys, monkeypatch, registry, "list", "--name", "support", key=tenant.token)
    assert [a["version"] for a in listed["adapters"]] == [2, 1]
    code, back = run(capsys, monkeypatch, registry, "deploy", "support-bot", "support", "--version", "1",
                     key=tenant.token)
    assert code == 0 and back["adapterVersion"] == 1  # rolled back


def test_a_zip_and_the_admin_token_with_a_tenant(registry, adapters, tmp_path, capsys, monkeypatch):
    tenant = registry.new_tenant("cli")
    archive = tmp_path / "customerA.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            out.write(adapters / "v1" / name, name)
    code, uploaded = run(capsys, monkeypatch, registry, "--tenant", tenant.tenant_name, "upload", str(archive),
                         "--name", "finance", "--base-model", "tiny", admin=True)
    assert code == 0 and uploaded["adapter"]["tenantId"] == tenant.tenant_id
    code, message = run(capsys, monkeypatch, registry, "upload", str(archive), "--name", "finance",
                        "--base-model", "tiny", admin=True)
    assert code == 2 and "--tenant says whose adapter" in message


def test_what_a_user_gets_wrong_is_said_plainly(registry, adapters, tmp_path, capsys, monkeypatch):
    tenant = registry.new_tenant("cli")
    code, message = run(capsys, monkeypatch, registry, "list")
    assert code == 2 and "no credentials" in message
    pickled = tmp_path / "pickled"
    shutil.copytree(adapters / "v1", pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    code, message = run(capsys, monkeypatch, registry, "upload", str(pickled), "--name", "x", "--base-model", "tiny",
                        key=tenant.token)
    assert code == 2 and "no adapter_model.safetensors" in message and "never loaded" in message
    code, message = run(capsys, monkeypatch, registry, "upload", str(adapters / "v1"), "--name", "x",
                        "--base-model", "no-such-model", key=tenant.token)
    assert code == 1 and message.startswith("loraplex adapter: NOT_FOUND:") and "no-such-model" in message
    code, message = run(capsys, monkeypatch, registry, "list", key="lpx_not_a_key")
    assert code == 1 and "UNAUTHENTICATED" in message
    assert registry.counts()["spool"] == 0  # nothing half-written


def test_a_name_the_registry_refuses_leaves_nothing(registry, adapters, capsys, monkeypatch):
    tenant = registry.new_tenant("cli")
    code, message = run(capsys, monkeypatch, registry, "upload", str(adapters / "v1"), "--name", "bad name!",
                        "--base-model", "tiny", key=tenant.token)
    assert code == 1 and "INVALID_ARGUMENT" in message
    assert not list(tenant.ListAdapters(pb.ListAdaptersRequest()).adapters)
