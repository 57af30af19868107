"""`loraplex up` hands its children the database URL, which may hold a password, by
environment: on a command line any local user reads it in `ps` or /proc/PID/cmdline."""

from __future__ import annotations

from services.common.config import parse_config
from services.common.stack import StackConfig, child_commands, child_environment
from services.registry.config import RegistryConfig
from services.trainer.config import TrainerConfig

URL = "postgresql+psycopg://loraplex:pw-0f8e2c@db:5432/loraplex"
CHILD_CONFIGS = {"registry": RegistryConfig, "trainer": TrainerConfig}


def test_the_database_password_stays_off_every_command_line_and_still_reaches_registry_and_trainer(tmp_path):
    config = StackConfig(data_dir=tmp_path, database_url=URL)
    commands = child_commands(config, tmp_path / "model")
    assert not any("pw-0f8e2c" in arg for command in commands.values() for arg in command)
    env = child_environment(config, "admin-token")
    for name, cls in CHILD_CONFIGS.items():
        assert parse_config(cls, commands[name][3:], env=env).database_url == URL  # argv after `python -m module`


def test_without_a_database_url_the_children_use_their_embedded_sqlite(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_DATABASE_URL", URL)  # inherited, but overridden by the stack's own setting
    config = StackConfig(data_dir=tmp_path, database_url="")
    commands, env = child_commands(config, tmp_path / "model"), child_environment(config, "admin-token")
    for name, cls in CHILD_CONFIGS.items():
        assert parse_config(cls, commands[name][3:], env=env).database_url == ""
