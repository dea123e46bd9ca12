"""prefect.yaml, checked offline against Prefect's own models (no server), and the retrain policy."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, TypeAdapter

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = ROOT / "prefect.yaml"
EXPECTED = {"rebuild-nightly", "watch-drops", "rebuild-on-drop", "retrain", "retention"}


def _fields(model: type[BaseModel]) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items()} | set(model.model_fields)


def yaml_problems(doc: dict[str, Any]) -> list[str]:
    """Every key Prefect would silently drop (its models ignore extra keys), every bad cron or trigger,
    every entrypoint that does not load or whose parameters the flow rejects."""
    from prefect.cli.deploy._models import (
        ConcurrencyLimitSpec,
        DeploymentConfig,
        PrefectYamlModel,
        RawScheduleConfig,
        WorkPoolConfig,
    )
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.events import DeploymentTriggerTypes
    from prefect.flows import load_flow_from_entrypoint

    problems = []
    top = _fields(PrefectYamlModel) | {"definitions"}  # definitions: the conventional home of YAML anchors
    problems += [f"top-level key {key!r} is not a prefect.yaml key" for key in doc if key not in top]
    try:
        PrefectYamlModel.model_validate(doc)
    except ValueError as exc:
        problems.append(f"Prefect's own model rejects the file: {exc}")
    triggers = TypeAdapter(DeploymentTriggerTypes)
    for deployment in doc.get("deployments", []):
        name = deployment.get("name", "?")
        where = f"deployment {name}"
        problems += [f"{where}: key {k!r} is unknown" for k in deployment if k not in _fields(DeploymentConfig)]
        pool = deployment.get("work_pool") or {}
        problems += [f"{where}: work_pool key {k!r} is unknown" for k in pool if k not in _fields(WorkPoolConfig)]
        limit = deployment.get("concurrency_limit")
        if isinstance(limit, dict):
            problems += [f"{where}: concurrency_limit key {k!r} is unknown" for k in limit
                         if k not in _fields(ConcurrencyLimitSpec)]
        for schedule in deployment.get("schedules") or []:
            problems += [f"{where}: schedule key {k!r} is unknown" for k in schedule
                         if k not in _fields(RawScheduleConfig)]
            try:
                RawScheduleConfig.model_validate(schedule)
                if "cron" in schedule:
                    CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
            except ValueError as exc:
                problems.append(f"{where}: schedule {schedule}: {exc}")
        for trigger in deployment.get("triggers") or []:
            try:
                triggers.validate_python(trigger)
            except ValueError as exc:
                problems.append(f"{where}: trigger {trigger.get('name')}: {exc}")
        try:
            flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
            flow.validate_parameters(deployment.get("parameters") or {})
        except Exception as exc:  # noqa: BLE001 - any failure to load or validate is the finding
            problems.append(f"{where}: entrypoint {deployment.get('entrypoint')}: {type(exc).__name__}: {exc}")
    return problems


@pytest.fixture(scope="module")
def prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))


def test_prefect_yaml_is_valid_and_has_the_five_deployments(prefect_yaml):
    assert yaml_problems(prefect_yaml) == []
    deployments = {d["name"]: d for d in prefect_yaml["deployments"]}
    assert set(deployments) == EXPECTED
    for d in deployments.values():
        assert d["entrypoint"].startswith("flows/deployments.py:")
        assert d["work_pool"]["name"] == "radground-process"
    nightly = deployments["rebuild-nightly"]
    assert nightly["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert nightly["schedules"][0]["timezone"]
    on_drop = deployments["rebuild-on-drop"]["triggers"][0]
    assert on_drop["expect"] == ["radground.drop.landed"]
    assert on_drop["parameters"] == {"drops": ["{{ event.payload.uri }}"]}
    assert on_drop["threshold"] == 1 and on_drop["posture"] == "Reactive"
    assert deployments["retrain"]["triggers"][0]["expect"] == ["radground.retrain.requested"]
    assert deployments["retention"]["schedules"][0]["cron"].split()[-1] == "0"  # weekly, on Sundays


EP = "entrypoint flows/deployments.py:"


@pytest.mark.parametrize("doctor, expected", [
    (lambda d: d["deployments"][2].update(paramters=d["deployments"][2].pop("parameters")),
     "deployment rebuild-on-drop: key 'paramters' is unknown"),
    (lambda d: d["deployments"][0]["work_pool"].update(job_varibles={}), "work_pool key 'job_varibles' is unknown"),
    (lambda d: d["deployments"][0]["schedules"][0].update(timezon="UTC"), "schedule key 'timezon' is unknown"),
    (lambda d: d["deployments"][0]["schedules"][0].update(cron="61 2 * * *"), "deployment rebuild-nightly: schedule"),
    (lambda d: d["deployments"][2]["triggers"][0].update(posture="Sometimes"), "trigger rebuild-on-drop-landed"),
    (lambda d: d["deployments"][2].update(parameters={"drop": ["x"]}), EP + "rebuild_on_drop"),
    (lambda d: d["deployments"][4].update(parameters={"dry_run": "perhaps"}), EP + "retention"),
    (lambda d: d["deployments"][1].update(entrypoint="flows/deployments.py:watch_drop"),
     "deployment watch-drops: entrypoint"),
    (lambda d: d.update(deploymnets=[]), "top-level key 'deploymnets'"),
])
def test_a_doctored_copy_is_caught(prefect_yaml, doctor, expected):
    doc = copy.deepcopy(prefect_yaml)
    doctor(doc)
    problems = yaml_problems(doc)
    assert any(expected in p for p in problems), problems


def test_prefect_itself_drops_a_misspelt_key_silently(prefect_yaml):
    """Why the whitelist: Prefect's model accepts 'paramters' and loses it."""
    from prefect.cli.deploy._models import PrefectYamlModel

    doc = copy.deepcopy(prefect_yaml)
    doc["deployments"][2]["paramters"] = doc["deployments"][2].pop("parameters")
    parsed = PrefectYamlModel.model_validate(doc)
    assert parsed.deployments[2].parameters == {}


# ------------------------------------------------------------------------------- retrain policy

@pytest.fixture
def policy(monkeypatch, tmp_path, clean_env):
    from flows import deployments
    from models.data import DataError
    from radground.settings import load_settings

    versions = {"a" * 64: ({"p1", "p2"}, "h1")}
    champion: dict[str, str | None] = {"digest": "a" * 64}

    def lookup(settings, digest):
        if digest not in versions:
            raise DataError(f"version {digest[:16]}: not here")
        return versions[digest]

    monkeypatch.setattr(deployments, "champion_digest", lambda settings: champion["digest"])
    monkeypatch.setattr(deployments, "_patients", lambda s, d: lookup(s, d)[0])
    monkeypatch.setattr(deployments, "_settings_hash", lambda s, d: lookup(s, d)[1])
    settings = load_settings(data_dir=tmp_path, retrain={"min_new_patients": 2})
    return deployments, settings, versions, champion


def test_retrain_due_counts_new_patients_and_changed_settings(policy):
    deployments, settings, versions, champion = policy
    versions["b" * 64] = ({"p1", "p2", "p3"}, "h1")
    assert deployments.retrain_due(settings, "b" * 64) == (
        False, f"1 new patient(s) since the champion's version {'a' * 16}, fewer than 2")
    versions["c" * 64] = ({"p1", "p3", "p4"}, "h1")  # p2 forgotten does not count; p3, p4 do
    due, reason = deployments.retrain_due(settings, "c" * 64)
    assert due and reason.startswith("2 new patient(s)")
    versions["d" * 64] = ({"p1", "p2"}, "h2")
    assert deployments.retrain_due(settings, "d" * 64) == (
        True, f"stage settings changed since the champion's version {'a' * 16}")
    assert deployments.retrain_due(settings, "a" * 64)[0] is False
    champion["digest"] = None
    assert deployments.retrain_due(settings, "b" * 64) == (True, "no champion model yet")
    champion["digest"] = "e" * 64  # retired, not here
    assert deployments.retrain_due(settings, "b" * 64)[0] is True
    for _, reason in [deployments.retrain_due(settings, d * 64) for d in "bcd"]:
        assert "p1" not in reason and "p3" not in reason


def test_the_retrain_event_carries_only_the_digest():
    from radground.events import RETRAIN_REQUESTED, retrain_requested

    event = retrain_requested("f" * 64)
    assert event["event"] == RETRAIN_REQUESTED and event["payload"] == {"version": "f" * 64}
    assert event["resource"] == {"prefect.resource.id": "radground.version." + "f" * 16}


def _version(settings, patients: dict[str, str], settings_hash: str, i: int) -> str:
    """A real version folder (tasks/version.write_version) under versions/, as publish leaves it."""
    from tasks.version import write_version
    from tasks.version_stage import versions_root
    from tests.tasks.test_version import images_table

    building = versions_root(settings) / f".building-{i}"
    manifest = write_version({"images": [images_table(2, patient=next(iter(patients)), seed=i)]}, out_dir=building,
                             parent=None, drops=["drop-A"], settings_hash=settings_hash, quarantine_counts={},
                             splits=patients)
    building.rename(versions_root(settings) / manifest.digest[:16])
    return manifest.digest


def test_retrain_due_reads_patients_and_settings_hash_from_the_version_folders(monkeypatch, tmp_path, clean_env):
    from flows import deployments
    from radground.settings import load_settings

    settings = load_settings(data_dir=tmp_path, retrain={"min_new_patients": 2})
    base = _version(settings, {"P1": "train", "P2": "val"}, "h" * 64, 1)
    one_more = _version(settings, {"P1": "train", "P2": "val", "P3": "test"}, "h" * 64, 2)
    two_more = _version(settings, {"P1": "train", "P2": "val", "P3": "test", "P4": "train"}, "h" * 64, 3)
    other_settings = _version(settings, {"P1": "train", "P2": "val"}, "g" * 64, 4)
    monkeypatch.setattr(deployments, "champion_digest", lambda s: base)
    assert deployments.retrain_due(settings, one_more)[0] is False
    assert deployments.retrain_due(settings, two_more) == (
        True, f"2 new patient(s) since the champion's version {base[:16]} (retrain.min_new_patients 2)")
    assert deployments.retrain_due(settings, other_settings)[1].startswith("stage settings changed")


def test_a_rebuild_asks_for_a_retrain_when_due_and_not_again_for_an_unchanged_version(monkeypatch):
    import logging
    from types import SimpleNamespace

    from flows import deployments

    sent = []
    monkeypatch.setattr(deployments.events, "emit", lambda events: sent.extend(events))
    monkeypatch.setattr(deployments, "retrain_due", lambda settings, digest: (True, "no champion model yet"))
    log = logging.getLogger("test")
    built = [SimpleNamespace(version={"digest": "a" * 64, "unchanged": False})]
    assert deployments._after_rebuild(None, built, log)["retrain"] is True
    assert sent == [{"event": "radground.retrain.requested", "resource": {"prefect.resource.id":
                     "radground.version." + "a" * 16}, "payload": {"version": "a" * 64}}]
    again = [SimpleNamespace(version={"digest": "a" * 64, "unchanged": True})]
    assert deployments._after_rebuild(None, again, log) == {"version": "a" * 64, "drops": 1, "retrain": False,
                                                           "reason": "version unchanged"}
    assert len(sent) == 1
