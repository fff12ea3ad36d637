"""The command-line frame: help with examples, exit codes, one-line errors, YAML options."""

from __future__ import annotations

import pytest

from todi.cli import COMMANDS, main


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main([]) == 2  # no command is a usage error


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["distil"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'distil'" in err and "hint:" in err and "distill" in err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_with_an_example(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: todi {name}" in out and "example:" in out and "--config" in out


def test_missing_yaml_config_is_a_usage_error(tmp_path, capsys):
    assert main(["demo", "--config", str(tmp_path / "none.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("todi demo: error: config file") and "does not exist" in err[0]
    assert err[1].startswith("hint:") and "Traceback" not in "\n".join(err)


def test_unknown_yaml_option_names_the_file_and_key(tmp_path, capsys):
    config = tmp_path / "demo.yaml"
    config.write_text("out: somewhere\nquik: true\n")
    assert main(["demo", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "quik" in err
    assert not (tmp_path / "somewhere").exists()


def test_bad_option_value_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--seed", "not-a-number"])
    assert exit_info.value.code == 2
