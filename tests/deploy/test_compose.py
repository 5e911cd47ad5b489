"""deploy/compose.yaml: valid against the Compose Specification's JSON Schema (vendored, offline),
and wired the way docs/operations.md says (identities, volumes, files it mounts)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

from dispatcher.tools.fleet_file import check_references, load_fleet_file

from .tools import DEPLOY, REPO, require_tool, run

pytestmark = pytest.mark.deploy

COMPOSE = DEPLOY / "compose.yaml"
SCHEMA = DEPLOY / "schemas" / "compose-spec.json"
ENV_EXAMPLE = DEPLOY / "compose.env.example"
IMAGE_SERVICES = ("init", "dispatcher", "worker-m1", "worker-m2", "cli")
WORKERS = {"worker-m1": "m1", "worker-m2": "m2"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())  # resolves the YAML anchors and merge keys
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def errors(validator: jsonschema.protocols.Validator, document: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def test_compose_file_is_valid_against_the_compose_specification(
    validator: jsonschema.protocols.Validator, compose: dict[str, Any]
) -> None:
    assert errors(validator, compose) == []


@pytest.mark.parametrize(
    ("where", "change"),
    [
        ("a misspelt service key", lambda d: d["services"]["redis"].update(restrat="no")),
        ("an unknown condition", lambda d: d["services"]["dispatcher"]["depends_on"]["init"]
         .update(condition="service_done")),
        ("replicas as a list", lambda d: d["services"]["dispatcher"]["deploy"]
         .update(replicas=[2])),
        ("an unknown top-level key", lambda d: d.update(service={})),
    ],
)  # fmt: skip
def test_the_schema_rejects_a_broken_file(
    validator: jsonschema.protocols.Validator, compose: dict[str, Any], where: str, change: Any
) -> None:
    broken = copy.deepcopy(compose)
    change(broken)
    assert errors(validator, broken), f"{where} was accepted"


def referenced_variables() -> dict[str, bool]:
    """Variables compose.yaml interpolates -> whether it requires them (``${VAR:?...}``)."""
    found: dict[str, bool] = {}
    text = COMPOSE.read_text().replace("$$", "")
    for name, operator in re.findall(r"\$\{([A-Z0-9_]+)(:?[?-])?", text):
        found[name] = found.get(name, False) or operator in {":?", "?"}
    return found


def test_every_variable_is_in_the_example_env_file() -> None:
    example = ENV_EXAMPLE.read_text()
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example, re.M))
    required_in_example = set(re.findall(r"^([A-Z][A-Z0-9_]+)=$", example, re.M))
    for name, required in referenced_variables().items():
        assert name in documented, f"{name} is not in {ENV_EXAMPLE.name}"
        if required:
            assert name in required_in_example, f"{name} is required: list it uncommented"


def test_files_it_mounts_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"


def test_two_dispatcher_replicas_with_the_admin_identity(compose: dict[str, Any]) -> None:
    dispatcher = compose["services"]["dispatcher"]
    assert dispatcher["deploy"]["replicas"] == 2
    environment = dispatcher["environment"]
    for variable in (
        "RUNDISPATCH_AMQP_URL",
        "RUNDISPATCH_BROKER_ADMIN_URL",
        "RUNDISPATCH_REDIS_URL",
        "RUNDISPATCH_SECRET_KEYS",
    ):
        assert variable in environment


def test_each_worker_has_only_its_own_machine_identity(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, machine in WORKERS.items():
        worker = services[name]
        assert worker["entrypoint"] == ["rundispatch-worker"]
        command = worker["command"]
        assert command[command.index("--machine-id") + 1] == machine
        environment = worker["environment"]
        # No Redis, no admin credentials, no secret keys: only the machine's own identity.
        assert not [v for v in environment if v != "RUNDISPATCH_SETTINGS_FILE" and (
            v.endswith(("_URL", "_KEYS", "_SECRET")))]  # fmt: skip
        identity = [
            v for v in worker["volumes"] if isinstance(v, dict) and v["source"] == "identities"
        ]
        assert identity == [
            {
                "type": "volume",
                "source": "identities",
                "target": str(PurePosixPath(environment["RUNDISPATCH_SETTINGS_FILE"]).parent),
                "read_only": True,
                "volume": {"subpath": f"machines/{machine}"},
            }
        ]
        metrics_port = command[command.index("--metrics-port") + 1]
        assert environment["RUNDISPATCH_METRICS_PORT"] == metrics_port
        assert worker["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_init_registers_every_worker_machine_with_the_registration_commands(
    compose: dict[str, Any],
) -> None:
    init = compose["services"]["init"]
    assert set(init["environment"]["RUNDISPATCH_COMPOSE_MACHINES"].split()) == set(WORKERS.values())
    script = (DEPLOY / "compose" / "init.sh").read_text()
    assert "rundispatch apply /etc/rundispatch/fleet.yaml" in script
    assert 'rundispatch machines register "${machine}" --json' in script
    assert 'rundispatch submitters register "${submitter}" --acts-for' in script
    # Where init writes a machine's file is where that machine's worker reads it.
    assert 'dir="${identities}/machines/${machine}"' in script
    assert "identities:/var/lib/rundispatch" in init["volumes"]
    syntax = run(require_tool("sh", "a POSIX shell"), "-n", DEPLOY / "compose" / "init.sh")
    assert syntax.returncode == 0, syntax.stderr


def test_the_compose_fleet_is_a_valid_fleet_with_the_worker_machines() -> None:
    fleet = load_fleet_file(DEPLOY / "compose" / "fleet.yaml")
    check_references(fleet, max_group_size=50)
    assert {m.machine_id for m in fleet.machines} == set(WORKERS.values())


def test_services_of_the_image_share_one_build_and_run_read_only(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in IMAGE_SERVICES:
        service = services[name]
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).exists()
    for name, service in services.items():
        image = service["image"]
        assert not image.endswith(":latest") and ":" in image, f"{name}: pin the image tag"


def test_rabbitmq_has_management_prometheus_and_our_files(compose: dict[str, Any]) -> None:
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text()
    assert re.fullmatch(r"\[rabbitmq_management,rabbitmq_prometheus\]\.\n", plugins)
    mounts = compose["services"]["rabbitmq"]["volumes"]
    assert "./rabbitmq/enabled_plugins:/etc/rabbitmq/enabled_plugins:ro" in mounts
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    assert {"vhosts", "users", "permissions", "policies", "queues", "exchanges"} <= set(definitions)
    importer = compose["services"]["rabbitmq-definitions"]
    assert "import /etc/rundispatch/rabbitmq/definitions.json" in importer["command"][0]


def test_redis_runs_our_configuration_with_aof(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert "./redis/redis.conf:/usr/local/etc/redis/redis.conf:ro" in redis["volumes"]
    assert "redis-server /usr/local/etc/redis/redis.conf" in redis["command"][0]
    conf = (DEPLOY / "redis" / "redis.conf").read_text()
    assert re.search(r"^appendonly yes$", conf, re.M)
    assert re.search(r"^maxmemory-policy noeviction$", conf, re.M)


def test_prometheus_and_grafana_load_our_rules_and_dashboards(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    (config_flag,) = [f for f in prometheus["command"] if f.startswith("--config.file=")]
    container_config = PurePosixPath(config_flag.split("=", 1)[1])
    # The container mirrors the repository's layout, so the relative rule path resolves the same.
    mounts = dict(m.split(":")[:2] for m in prometheus["volumes"] if m.startswith("."))
    repo_root_in_container = PurePosixPath("/etc/rundispatch")
    for source, target in mounts.items():
        relative = (DEPLOY / source).resolve().relative_to(REPO)
        assert PurePosixPath(target) == repo_root_in_container / relative.as_posix()
    config = yaml.safe_load((DEPLOY / "prometheus" / "compose.yml").read_text())
    assert container_config == repo_root_in_container / "deploy/prometheus/compose.yml"
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).resolve() == REPO / "dashboards/alerts.rules.yml"
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"rundispatch-dispatcher", "rundispatch-worker", "rabbitmq"} == jobs
    grafana_mounts = services["grafana"]["volumes"]
    for dashboard in ("operators.json", "sre.json"):
        assert (
            f"../dashboards/{dashboard}:/var/lib/grafana/dashboards/rundispatch/{dashboard}:ro"
            in grafana_mounts
        )
    provider = yaml.safe_load(
        (REPO / "dashboards/provisioning/dashboards/rundispatch.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/rundispatch"
    datasource = yaml.safe_load((DEPLOY / "compose" / "grafana-datasource.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return float(match.group(1)) * (60 if match.group(2) == "m" else 1)


def test_stop_grace_periods_outlast_the_drains(compose: dict[str, Any]) -> None:
    from dispatcher.settings import Settings

    # The defaults apply: the file does not set RUNDISPATCH_DRAIN_S or _WORKER_GRACE_S.
    checked = []
    drain = float(Settings.model_fields["drain_s"].default)
    worker_grace = float(Settings.model_fields["worker_grace_s"].default)
    for name, service in compose["services"].items():
        text = json.dumps(service)
        assert "RUNDISPATCH_DRAIN_S" not in text and "RUNDISPATCH_WORKER_GRACE_S" not in text
        if (service.get("command") or [None])[0] != "serve":
            continue
        grace = seconds(service["stop_grace_period"])
        checked.append(name)
        if service.get("entrypoint") == ["rundispatch-worker"]:
            assert grace > worker_grace + drain + 5, name
        else:
            assert grace > drain + 5, name
    assert sorted(checked) == ["dispatcher", "worker-m1", "worker-m2"]
