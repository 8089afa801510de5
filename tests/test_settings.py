"""Settings: defaults, environment variables, both command-line spellings, and docs."""

from pathlib import Path

import pytest
from tornado.options import Error

import settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_defaults():
    opts = settings.parse_settings(["chatterd"], {})
    assert (opts.address, opts.port, opts.data_dir) == ("127.0.0.1", 8000, "./var")
    assert opts.ollama_url == "http://localhost:11434"
    assert opts.heartbeat == 15.0


def test_environment_then_command_line():
    env = {"CHATTERD_PORT": "9001", "CHATTERD_OLLAMA_URL": "http://h:1/api", "CHATTERD_XHEADERS": "true"}
    opts = settings.parse_settings(["chatterd"], env)
    assert (opts.port, opts.ollama_url, opts.xheaders) == (9001, "http://h:1/api", True)
    opts = settings.parse_settings(["chatterd", "--port", "9002", "--heartbeat=5"], env)
    assert (opts.port, opts.heartbeat) == (9002, 5.0)


def test_bad_values_are_refused():
    with pytest.raises(Error):
        settings.parse_settings(["chatterd", "--port=eighty"], {})


def test_every_setting_is_documented_in_the_readme():
    text = README.read_text()
    for s in settings.SETTINGS:
        assert f"--{s.name}" in text, f"README does not document --{s.name}"
        assert settings.env_name(s.name) in text, f"README does not name {settings.env_name(s.name)}"
