"""The model commands refuse contradictory or incomplete options before loading anything."""

import pytest
from test_cli import run_cli


@pytest.mark.parametrize(("args", "message"), [
    (["evaluate"], "exactly one of --model MODEL"),
    (["evaluate", "--model", "x", "--predictions", "p.jsonl"], "exactly one of --model MODEL"),
    (["evaluate", "--benchmark", "slake", "--predictions", "p.jsonl"], "--benchmark slake needs --data DIR"),
    (["evaluate", "--benchmark", "mimic", "--data", ".", "--predictions", "p.jsonl"], "expected slake or vqa-rad"),
    (["evaluate", "--data", ".", "--predictions", "p.jsonl"], "add --benchmark slake|vqa-rad"),
    (["evaluate", "--split", "dev", "--predictions", "p.jsonl"], "expected test, val or train"),
    (["predict", ".", "--model", "x", "--task", "caption"], "expected report, vqa or ground"),
    (["predict", ".", "--model", "x", "--task", "vqa"], "--task vqa needs --question"),
    (["predict", ".", "--model", "x", "--lang", "fr"], "expected en or de"),
])
def test_contradictory_options_are_refused_with_the_way_out(tmp_path, args, message):
    result = run_cli(*args, env={"RADGROUND_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 2
    assert message in " ".join(result.stderr.split())
    assert not (tmp_path / "data").exists()  # refused before anything was created


def test_model_commands_have_help():
    for command in (["evaluate"], ["predict"], ["models", "promote"], ["models", "register"], ["models", "list"]):
        result = run_cli(*command, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout, command
