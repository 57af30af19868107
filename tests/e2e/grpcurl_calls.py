"""grpcurl command lines checked against the protos, without a server.

A grpcurl line in the docs or in what our commands print names a port, a method and a JSON
request. Each must hold without running anything: the method exists in the service that
listens on that port by default, and the JSON parses into the method's request message (a
misspelt field is an error in grpcurl too, so a renamed proto field breaks the line).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import re

from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2  # noqa: F401 - registers grpc.health.v1 in the pool

import services.common.pb
from services.inference.config import InferenceConfig
from services.registry.config import RegistryConfig
from services.router.config import RouterConfig
from services.trainer.config import TrainerConfig

# grpcurl's options that take a value (the rest are switches); an option not in either set
# fails the check, so a new one is looked at before a line using it is trusted.
VALUE_OPTIONS = {"-d", "-H", "-rpc-header", "-reflect-header", "-max-time", "-connect-timeout", "-authority",
                 "-format", "-user-agent", "-max-msg-sz", "-keepalive-time", "-servername"}
SWITCHES = {"-plaintext", "-v", "-vv", "-emit-defaults", "-format-error", "-allow-unknown-fields"}
EVERY_SERVER = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
# The process behind each default port serves the protos of its own package (loraplex.<name>.v1).
DEFAULT_PORTS = {cls: next(f.default for f in dataclasses.fields(cls) if f.name == "port")
                 for cls in (RegistryConfig, TrainerConfig, RouterConfig, InferenceConfig)}
PROCESS_OF_PORT = {port: cls.__module__.split(".")[1] for cls, port in DEFAULT_PORTS.items()}


def proto_files() -> list:
    """Every generated loraplex proto file (imported, so its types are in the default pool)."""
    return [importlib.import_module(module.name).DESCRIPTOR
            for module in pkgutil.walk_packages(services.common.pb.__path__, "services.common.pb.")
            if module.name.endswith("_pb2")]


@dataclasses.dataclass
class Call:
    address: str
    verb: str  # "list", "describe" or "invoke"
    target: str  # service, symbol or Service/Method ("" = everything)
    data: str
    headers: list[str]


def parse(args: list[str]) -> Call:
    """`args` are the words after `grpcurl`."""
    options, positional, index = {}, [], 0
    while index < len(args):
        word = args[index]
        name, has_value, value = word.partition("=")
        if name in VALUE_OPTIONS:
            if not has_value:
                index += 1
                value = args[index]
            options.setdefault(name, []).append(value)
        elif word.startswith("-"):
            assert name in SWITCHES, f"grpcurl option {word} is not one this check knows"
        else:
            positional.append(word)
        index += 1
    address, *rest = positional
    verb = rest[0] if rest and rest[0] in ("list", "describe") else "invoke"
    target = (rest[1] if len(rest) > 1 else "") if verb != "invoke" else rest[0]
    return Call(address, verb, target, options.get("-d", [""])[-1], options.get("-H", []))


def served_at(address: str) -> set[str]:
    port = int(address.rsplit(":", 1)[1])
    assert port in PROCESS_OF_PORT, f"{address}: no loraplex service listens on port {port} by default"
    package = f"loraplex.{PROCESS_OF_PORT[port]}.v1."
    names = {service.full_name for file in proto_files() for service in file.services_by_name.values()}
    return {name for name in names if name.startswith(package)} | EVERY_SERVER


def check(args: list[str]) -> str:
    """Fails naming what is wrong; returns the checked call as text for messages."""
    call = parse(args)
    services = served_at(call.address)
    text = f"grpcurl {call.verb} {call.address} {call.target}".strip()
    if call.verb == "list":
        assert not call.target or call.target in services, f"{text}: not served there ({sorted(services)})"
        return text
    if call.verb == "describe":
        assert not call.target or any(call.target == s or call.target.startswith(s + ".") for s in services), \
            f"{text}: not served there ({sorted(services)})"
        return text
    service, _, method = call.target.rpartition("/")
    assert service in services, f"{text}: {service or call.target!r} is not served at {call.address}"
    descriptor = descriptor_pool.Default().FindServiceByName(service).methods_by_name.get(method)
    assert descriptor is not None, f"{text}: {service} has no method {method!r}"
    request = message_factory.GetMessageClass(descriptor.input_type)()
    if call.data:
        json.loads(call.data)  # plain JSON first: a quoting mistake reads better this way
        try:
            json_format.Parse(call.data, request)
        except json_format.ParseError as exc:
            raise AssertionError(f"{text}: -d does not fit {descriptor.input_type.full_name}: {exc}") from None
    for header in call.headers:
        assert re.fullmatch(r"authorization: Bearer \S+", header), f"{text}: header {header!r}"
    return text
