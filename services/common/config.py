"""Frozen config dataclasses, filled from command-line flags and environment variables.

Every field `foo_bar` of a config class becomes the flag `--foo-bar` and the environment
variable `LORAPLEX_FOO_BAR` (flags win over env, env over defaults). Field metadata `help`
documents it. Only the `__main__` modules call `parse_config`; everything else receives a
finished config object. Invalid values exit with status 2 and a message naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from services.common import tls

T = TypeVar("T")

ENV_PREFIX = "LORAPLEX_"


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its help text (list defaults are copied per instance)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """What every gRPC service process shares."""

    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for all interfaces)")
    port: int = option(0, "gRPC port")
    metrics_port: int = option(0, "Prometheus /metrics HTTP port (0 disables it)")
    grace_seconds: float = option(5.0, "on SIGTERM, how long in-flight RPCs may finish")
    max_message_mb: int = option(64, "largest gRPC message accepted or sent, in MiB")
    log_level: str = option("INFO", "DEBUG, INFO, WARNING or ERROR")
    tls_cert: Path | None = option(None, "PEM certificate (chain) of this service: with --tls-key the gRPC port "
                                         "serves TLS only, and the router's HTTP API HTTPS (/metrics stays plain "
                                         "HTTP); its subjectAltName must name the host callers dial")
    tls_key: Path | None = option(None, "PEM private key of --tls-cert (unencrypted: keep the file readable by "
                                        "the service's user only)")
    tls_client_ca: Path | None = option(None, "PEM CA bundle: every gRPC caller must then present a client "
                                              "certificate it issued (mutual TLS; needs --tls-cert)")

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ValueError(f"--{name.replace('_', '-')} must be in 0..65535, got {value}")
        if self.grace_seconds < 0:
            raise ValueError(f"--grace-seconds must be >= 0, got {self.grace_seconds}")
        if self.max_message_mb < 1:
            raise ValueError(f"--max-message-mb must be >= 1, got {self.max_message_mb}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        tls.server_tls(self.tls_cert, self.tls_key, self.tls_client_ca)  # TlsError (a ValueError) names the flag

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def server_tls(self) -> tls.ServerTls | None:
        """TLS of the gRPC port (and the router's HTTP API); None: clear text."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return tls.ServerTls(self.tls_cert, self.tls_key, self.tls_client_ca)


@dataclasses.dataclass(frozen=True)
class ClientTlsConfig:
    """TLS of the calls a process makes to other loraplex services: mixed into the config of every
    process that makes such calls, ahead of its other base (`class X(ClientTlsConfig, ServerConfig)`),
    so that its fields come after the base's and its checks run after the base's."""

    tls_ca: Path | None = option(None, "PEM CA bundle that verifies the services this process calls; given, "
                                       "those calls use TLS (each server's certificate must name the host "
                                       "dialled, as a DNS or IP subjectAltName)")
    tls_client_cert: Path | None = option(None, "PEM client certificate presented on those calls, for services "
                                                "started with --tls-client-ca (turns TLS on; without --tls-ca "
                                                "servers are verified with the system's CA roots)")
    tls_client_key: Path | None = option(None, "PEM private key of --tls-client-cert (unencrypted)")

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        tls.client_tls(self.tls_ca, self.tls_client_cert, self.tls_client_key)

    @property
    def client_tls(self) -> tls.ClientTls | None:
        """TLS of this process's calls to the others; None: clear text."""
        if self.tls_ca is None and self.tls_client_cert is None:
            return None
        return tls.ClientTls(self.tls_ca, self.tls_client_cert, self.tls_client_key)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _converter(tp: Any, flag: str):
    if tp is bool:
        def to_bool(text: str) -> bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"{flag} expects true/false, got {text!r}")
        return to_bool
    if tp in (int, float, str, Path):
        return tp
    raise TypeError(f"unsupported config field type {tp!r} for {flag}")


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip())
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = flag_name(field.name)
        tp, optional = _unwrap_optional(hints[field.name])
        env = ENV_PREFIX + field.name.upper()
        help_text = f"{field.metadata.get('help', '')} [env {env}]"
        if typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            parser.add_argument(flag, dest=field.name, action="append", type=_converter(item, flag),
                                default=None, help=help_text + " (repeatable; env: comma-separated)")
        elif tp is bool:
            parser.add_argument(flag, dest=field.name, nargs="?", const=True, default=None,
                                type=_converter(bool, flag), help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, default=None, type=_converter(tp, flag),
                                help=help_text + ("" if not optional else " (optional)"))
    return parser


def _from_env(cls: type, env: Mapping[str, str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        raw = env.get(ENV_PREFIX + field.name.upper())
        if raw is None or raw == "":
            continue
        tp, _ = _unwrap_optional(hints[field.name])
        name = ENV_PREFIX + field.name.upper()
        try:
            if typing.get_origin(tp) is list:
                (item,) = typing.get_args(tp)
                values[field.name] = [_converter(item, name)(part.strip()) for part in raw.split(",") if part.strip()]
            else:
                values[field.name] = _converter(tp, name)(raw)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"environment variable {name}={raw!r} is invalid: {exc}")
    return values


def parse_config(cls: type[T], argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                 prog: str | None = None) -> T:
    """Builds `cls` from env then flags; exits 2 with a clear message when a value is bad."""
    parser = build_parser(cls, prog or cls.__name__)
    args = parser.parse_args(argv)
    values = _from_env(cls, os.environ if env is None else env, parser)
    values.update({k: v for k, v in vars(args).items() if v is not None})
    try:
        return cls(**values)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
