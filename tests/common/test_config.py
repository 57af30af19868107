"""Config from flags and env: precedence, types, and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.config import parse_config
from services.router.config import RouterConfig
from services.registry.config import RegistryConfig


def test_defaults_env_and_flags_in_that_order_of_precedence():
    assert parse_config(RegistryConfig, [], env={}).port == 50051
    env = {"LORAPLEX_PORT": "6000", "LORAPLEX_DATA_DIR": "/srv/reg", "LORAPLEX_ADMIN_TOKEN": "t"}
    from_env = parse_config(RegistryConfig, [], env=env)
    assert (from_env.port, from_env.data_dir, from_env.admin_token) == (6000, Path("/srv/reg"), "t")
    assert parse_config(RegistryConfig, ["--port", "7000"], env=env).port == 7000


def test_repeatable_flags_and_comma_separated_env():
    assert parse_config(RouterConfig, ["--node", "a:1", "--node", "b:2"], env={}).node == ["a:1", "b:2"]
    assert parse_config(RouterConfig, [], env={"LORAPLEX_NODE": "a:1, b:2"}).node == ["a:1", "b:2"]


def test_config_is_frozen():
    config = parse_config(RegistryConfig, [], env={})
    with pytest.raises(AttributeError):
        config.port = 1


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--port", "99999"], {}, "--port must be in 0..65535"),
        (["--port", "abc"], {}, "invalid int value"),
        (["--log-level", "LOUD"], {}, "--log-level must be"),
        (["--node", "nohostport"], {}, "--node must be host:port"),
        (["--node-slow-polls", "0"], {}, "--node-slow-polls must be >= 1"),
        ([], {"LORAPLEX_GRACE_SECONDS": "soon"}, "LORAPLEX_GRACE_SECONDS='soon' is invalid"),
        (["--no-such-flag"], {}, "unrecognized arguments"),
    ],
)
def test_bad_values_exit_2_naming_the_flag(argv, env, message, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_config(RouterConfig, argv, env=env)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
