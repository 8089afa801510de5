"""Settings: defaults, the environment under the command line, both spellings of an option,
clear errors, the generated --help and docs/configuration.md."""

from pathlib import Path
import re

import pytest

import settings

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"


def test_defaults():
    config = settings.parse([], {})
    assert (config.address, config.port, config.data_dir) == ("127.0.0.1", 8000, "./var")
    assert config.ollama_url == "http://localhost:11434"
    assert (config.heartbeat, config.xheaders, config.import_course) == (15.0, False, False)
    assert config == settings.defaults()


def test_environment_then_command_line():
    env = {"CHATTERD_PORT": "9001", "CHATTERD_OLLAMA_URL": "http://h:1/api", "CHATTERD_XHEADERS": "true"}
    config = settings.parse([], env)
    assert (config.port, config.ollama_url, config.xheaders) == (9001, "http://h:1/api", True)
    config = settings.parse(["--port", "9002", "--heartbeat=5", "--xheaders=false"], env)
    assert (config.port, config.heartbeat, config.xheaders) == (9002, 5.0, False)
    assert config.ollama_url == "http://h:1/api"  # not on the command line: the environment's
    assert settings.parse(["--db_pool_size=3", "--event-loop", "asyncio"], {}).db_pool_size == 3


def test_actions_are_command_line_only():
    assert settings.parse([], {"CHATTERD_IMPORT_COURSE": "true"}).import_course is False
    assert settings.parse(["--import-course"], {}).import_course is True


@pytest.mark.parametrize("args, env, message", [
    (["--port=eighty"], {}, "--port must be a whole number, not 'eighty'"),
    ([], {"CHATTERD_PORT": "eighty"}, "CHATTERD_PORT must be a whole number, not 'eighty'"),
    (["--heartbeat", "soon"], {}, "--heartbeat must be a number, not 'soon'"),
    (["--xheaders=maybe"], {}, "--xheaders must be true or false, not 'maybe'"),
    (["--event-loop=trio"], {}, "--event-loop must be uvloop or asyncio, not 'trio'"),
    (["--prot=8001"], {}, "no setting named --prot (did you mean --port?)"),
    (["--port"], {}, "--port needs a value"),
    (["--xheaders", "true"], {}, "unexpected argument 'true'"),
])
def test_bad_values_are_refused_naming_the_option_or_variable(args, env, message):
    with pytest.raises(settings.Error) as caught:
        settings.parse(args, env)
    assert message in str(caught.value)


def test_defaults_for_tests_and_benches():
    config = settings.defaults(turn_lease=0.5, idle_timeout=1)
    assert (config.turn_lease, config.idle_timeout, config.turn_wait) == (0.5, 1, 30.0)
    assert config.replace(turn_wait=2.0).turn_wait == 2.0 and config.turn_wait == 30.0
    with pytest.raises(TypeError, match="did you mean turn_lease"):
        settings.defaults(turn_leas=0.5)
    with pytest.raises(TypeError, match="'port' is integer"):
        settings.defaults(port="8000")
    with pytest.raises(AttributeError, match="read-only"):
        config.port = 1  # type: ignore[misc]
    with pytest.raises(AttributeError, match="no setting named nonesuch"):
        config.nonesuch


def test_help_lists_every_setting(monkeypatch, capsys):
    import chatterd

    monkeypatch.setattr("sys.argv", ["chatterd.py", "--port=1", "--help"])
    chatterd.run()  # prints the help and returns, serving nothing
    text = capsys.readouterr().out
    assert text == settings.help_text()
    for s in settings.SETTINGS:
        assert f"{s.option}" in text and f"${s.env}" in text
    assert "--import-course" in text and "$CHATTERD_IMPORT_COURSE" not in text


def test_the_committed_configuration_doc_is_generated_from_settings():
    expected = settings.markdown()
    assert DOC.exists() and DOC.read_text() == expected, \
        f"docs/configuration.md is out of date with settings.py: run `{settings.DOC_COMMAND}`"
    for s in settings.SETTINGS:
        assert f"| `{s.option}` | `{s.env}` |" in expected


def test_every_setting_is_read_by_the_code():
    """A declared setting nothing reads would be a promise the code does not keep."""
    sources = "\n".join(p.read_text() for p in ROOT.rglob("*.py")
                        if not {"tests", "bench", ".venv"} & set(p.relative_to(ROOT).parts)
                        and p.name != "settings.py")
    for s in settings.SETTINGS + settings.ACTIONS:
        assert re.search(rf"\bconfig\.{s.attr}\b", sources), f"nothing reads config.{s.attr}"
