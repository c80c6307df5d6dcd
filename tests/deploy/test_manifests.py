"""The generated Kubernetes objects, systemd units and container recipe, checked offline.

- every Kubernetes object validates against the official schemas of every
  bundled Kubernetes version from 1.30 on (``kubernetes-validate``, strict:
  an unknown field fails too), with and without CURVE, with TLS, with
  placement;
- the checks schemas cannot make (pipeline/deploy/checks.py) pass, and each
  of them fails on a deliberately broken variant (a wrong port, a Secret in
  the wrong pod, a wrong DNS name, a policy open to a process that does not
  feed the pod);
- the units pass ``systemd-analyze verify`` with nothing to say (it works
  without systemd running; a unit it has to ignore a line of makes it talk,
  which the test shows too).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import cli  # noqa: E402
from pipeline import topology as topo  # noqa: E402
from pipeline.deploy import checks, containerfile, kubernetes, systemd  # noqa: E402
from pipeline.errors import UsageError  # noqa: E402
from pipeline.security.keys import generate_keys  # noqa: E402
from pipeline.topology import INGRESS, Topology  # noqa: E402
from pipeline.wire import security  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OLDEST_CHECKED = (1, 30)  # the preStop `sleep` action and the gRPC probe are there from 1.30 on


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def residual(tmp_path_factory: pytest.TempPathFactory) -> Topology:
    """The residual test model in two shards (shard1 joins the model input and shard0's output)."""
    import models

    from pipeline.partition.command import partition

    out = tmp_path_factory.mktemp("deploy") / "residual"
    return partition(models.residual(), name="residual", out=out, cuts=["relu_a"], verify=False).topology


def copy_topology(t: Topology, dest: Path, **changes: Any) -> Topology:
    dest.mkdir(parents=True, exist_ok=True)
    for f in [*(s.file for s in t.shards), topo.MODEL_FILE]:
        (dest / f).symlink_to((t.directory / f).resolve())
    t.replace(directory=dest, **changes).write(dest)
    return topo.load(dest)


def curve_copy(t: Topology, dest: Path) -> tuple[Topology, dict[str, bytes]]:
    c = copy_topology(t, dest)
    generate_keys(c, dest / "keys")
    c = topo.load(dest)
    return c, {p: security.secret_path(dest / "keys", p).read_bytes() for p in c.processes_on(None)}


def versions() -> list[str]:
    from kubernetes_validate import utils

    seen = sorted({tuple(map(int, v.split("."))) for v in utils.all_versions()})
    return [".".join(map(str, v)) for v in seen if v[:2] >= OLDEST_CHECKED]


def validate_all(objects: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    for version in versions():
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']} {obj['metadata']['name']} is not valid for Kubernetes {version}: {exc}")


def deployment(objects: list[dict[str, Any]], process: str) -> dict[str, Any]:
    (d,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["labels"][kubernetes.PROCESS_LABEL] == process]
    return d


def container(objects: list[dict[str, Any]], process: str) -> dict[str, Any]:
    return deployment(objects, process)["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


# ---------------------------------------------------------------- schemas
def test_every_object_validates_against_the_official_schemas(residual: Topology, tmp_path: Path) -> None:
    assert len(versions()) >= 5, versions()
    plain = kubernetes.manifests(residual, kubernetes.KubeOptions(namespace="ml"))
    validate_all(plain)
    kinds = [o["kind"] for o in plain]
    assert kinds.count("Deployment") == 3 and kinds.count("Service") == 4 and kinds.count("NetworkPolicy") == 3
    assert kinds.count("ConfigMap") == 1 and kinds.count("Namespace") == 1 and "Secret" not in kinds

    secured, keys = curve_copy(residual, tmp_path / "curve")
    cert, key = b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n", b"-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n"
    options = kubernetes.KubeOptions(tls=True)
    with_curve = kubernetes.manifests(secured, options, curve_keys=keys, tls_pair=(cert, key))
    validate_all(with_curve)
    assert [o["type"] for o in with_curve if o["kind"] == "Secret"].count("Opaque") == 3
    assert [o["type"] for o in with_curve if o["kind"] == "Secret"].count("kubernetes.io/tls") == 1
    assert "Namespace" not in [o["kind"] for o in with_curve]  # the default namespace exists already

    placed = copy_topology(
        residual, tmp_path / "placed",
        shards=tuple(dataclasses.replace(s, host=h) for s, h in zip(residual.shards, ("edge", "cloud"))),
        ingress=dataclasses.replace(residual.ingress, host="edge"),
    )  # fmt: skip
    validate_all(kubernetes.manifests(placed, kubernetes.KubeOptions()))


def test_the_schemas_catch_a_broken_object(residual: Topology) -> None:
    import kubernetes_validate

    d = copy.deepcopy(deployment(kubernetes.manifests(residual, kubernetes.KubeOptions()), "shard0"))
    d["spec"]["template"]["spec"]["containers"][0]["startupprobe"] = {}  # a typo of startupProbe
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(d, versions()[-1], strict=True)


# ------------------------------------------------------- what schemas miss
def test_the_objects_fit_together(residual: Topology, tmp_path: Path) -> None:
    secured, keys = curve_copy(residual, tmp_path / "curve")
    for objects in (
        kubernetes.manifests(residual, kubernetes.KubeOptions(namespace="ml", cluster_domain="corp.example")),
        kubernetes.manifests(secured, kubernetes.KubeOptions(), curve_keys=keys),
    ):
        assert checks.all_problems(objects) == []
    t = checks.pod_topology(objects)
    assert t["shards"][0]["endpoint"] == "tcp://residual-shard0.default.svc.cluster.local:5555"
    assert t["ingress"]["results"] == "tcp://residual-ingress-results.default.svc.cluster.local:5555"
    assert t["ingress"]["grpc"] == "residual-ingress.default.svc.cluster.local:8001"
    assert t["shards"][1]["bind"] == "tcp://0.0.0.0:5555"


def test_the_checks_fail_on_broken_variants(residual: Topology, tmp_path: Path) -> None:
    secured, keys = curve_copy(residual, tmp_path / "curve")
    good = kubernetes.manifests(secured, kubernetes.KubeOptions(), curve_keys=keys)

    def broken(change: Any) -> list[str]:
        objects = copy.deepcopy(good)
        change(objects)
        return checks.all_problems(objects)

    def wrong_target_port(objects: list[dict[str, Any]]) -> None:
        svc = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "residual-shard1")
        svc["spec"]["ports"][0]["targetPort"] = "grpc"

    def swapped_secret(objects: list[dict[str, Any]]) -> None:
        vols = [v for v in deployment(objects, "shard0")["spec"]["template"]["spec"]["volumes"] if "secret" in v]
        vols[0]["secret"]["secretName"] = "residual-shard1-curve-key"

    def wrong_name(objects: list[dict[str, Any]]) -> None:
        cm = next(o for o in objects if o["kind"] == "ConfigMap")
        cm["data"]["topology.yaml"] = cm["data"]["topology.yaml"].replace("residual-shard1.default", "residual-shard-1.default")

    def wrong_port_in_topology(objects: list[dict[str, Any]]) -> None:
        cm = next(o for o in objects if o["kind"] == "ConfigMap")
        cm["data"]["topology.yaml"] = cm["data"]["topology.yaml"].replace("results-results", "x").replace(
            "residual-ingress-results.default.svc.cluster.local:5555", "residual-ingress.default.svc.cluster.local:8001"
        )

    def open_policy(objects: list[dict[str, Any]]) -> None:
        policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "residual-shard0")
        policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]["values"].append("shard1")

    def two_keys(objects: list[dict[str, Any]]) -> None:
        secret = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == "residual-shard0-curve-key")
        secret["data"]["shard1.key_secret"] = "eA=="

    assert any("targetPort 'grpc'" in p for p in broken(wrong_target_port))
    assert any("is mounted into the pod of 'shard0'" in p for p in broken(swapped_secret))
    assert any("no generated Service is named by 'residual-shard-1" in p for p in broken(wrong_name))
    assert any("expected to reach 'ingress' port 5555, it reaches 'ingress' port 8001" in p for p in broken(wrong_port_in_topology))
    assert any("NetworkPolicy of 'shard0'" in p for p in broken(open_policy))
    assert any("expected exactly ['shard0.key_secret']" in p for p in broken(two_keys))


# -------------------------------------------------------------- behaviour
def test_probes_rollout_and_termination(residual: Topology) -> None:
    options = kubernetes.KubeOptions(drain_s=12, prestop_s=4, startup_timeout_s=900)
    objects = kubernetes.manifests(residual, options)
    for process in residual.processes_on(None):
        d = deployment(objects, process)
        assert d["spec"]["replicas"] == 1
        assert d["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
        pod = d["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert c["command"] == ["pipeline"]
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 900
        assert c["lifecycle"]["preStop"] == {"sleep": {"seconds": 4}}
        assert pod["terminationGracePeriodSeconds"] >= 4 + 12 + kubernetes.EXIT_MARGIN_S
        assert d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert c["securityContext"]["runAsNonRoot"] and not c["securityContext"]["allowPrivilegeEscalation"]
    ingress = container(objects, INGRESS)
    assert ingress["args"][ingress["args"].index("--drain") + 1] == "12"
    assert ingress["readinessProbe"]["grpc"] == {"port": 8001, "service": "pipeline.ingress"}
    assert ingress["livenessProbe"]["grpc"] == {"port": 8001, "service": "pipeline.ingress"}
    worker = container(objects, "shard1")
    assert worker["args"] == ["worker", kubernetes.MODEL_DIR, "--shard", "shard1", "--drain-timeout", "12"]
    assert worker["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert worker["livenessProbe"]["httpGet"] == {"path": "/live", "port": "metrics"}
    # TLS: the probes go to the metrics port (the gRPC probe's TLS mode is too new to rely on)
    tls = container(kubernetes.manifests(residual, kubernetes.KubeOptions(tls=True), tls_pair=(b"c", b"k")), INGRESS)
    assert tls["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert "--tls-cert" in tls["args"] and "--tls-key" in tls["args"]


def test_resources_follow_the_plan(residual: Topology) -> None:
    objects = kubernetes.manifests(residual, kubernetes.KubeOptions(cpu_total=2.0))
    shares = {r["shard"]: r["share"] for r in residual.extra["plan"]["shards"]}
    cpu = {p: int(container(objects, p)["resources"]["requests"]["cpu"].rstrip("m")) for p in shares}
    for p, share in shares.items():
        assert cpu[p] == max(kubernetes.MIN_WORKER_CPU_MILLI, round(share * 2000)), (p, share, cpu)
    for p in shares:
        mem = container(objects, p)["resources"]["requests"]["memory"]
        assert int(mem.rstrip("Mi")) >= kubernetes.WORKER_BASE_MIB
        assert "cpu" not in container(objects, p)["resources"]["limits"]


def test_curve_secrets_and_placement(residual: Topology, tmp_path: Path) -> None:
    secured, keys = curve_copy(residual, tmp_path / "curve")
    objects = kubernetes.manifests(secured, kubernetes.KubeOptions(), curve_keys=keys)
    import base64

    for process in secured.processes_on(None):
        (secret,) = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["labels"][kubernetes.PROCESS_LABEL] == process]
        assert base64.b64decode(secret["data"][f"{process}.key_secret"]) == keys[process]
        pod = deployment(objects, process)["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        assert init["command"][:3] == ["install", "-m", "0600"]
        secret_mounts = [m for m in init["volumeMounts"] if m["name"] == "curve-secret"]
        assert secret_mounts == [{"name": "curve-secret", "mountPath": kubernetes.CURVE_SECRET_DIR, "readOnly": True}]
        main = pod["containers"][0]
        assert {"name": "curve-key", "mountPath": kubernetes.KEYS_DIR, "readOnly": True} in main["volumeMounts"]
        assert "curve-secret" not in [m["name"] for m in main["volumeMounts"]]
        assert {"name": security.ENV_KEYS_DIR, "value": kubernetes.KEYS_DIR} in main["env"]
        assert "nodeSelector" not in pod  # no placement in this topology: addresses only
    with pytest.raises(UsageError, match="pipeline keys"):
        kubernetes.manifests(secured, kubernetes.KubeOptions(), curve_keys={INGRESS: keys[INGRESS]})

    placed = copy_topology(
        residual, tmp_path / "placed",
        shards=tuple(dataclasses.replace(s, host=h) for s, h in zip(residual.shards, ("edge", "cloud"))),
        ingress=dataclasses.replace(residual.ingress, host="edge"),
    )  # fmt: skip
    objects = kubernetes.manifests(placed, kubernetes.KubeOptions(host_label="example.com/host"))
    assert deployment(objects, "shard1")["spec"]["template"]["spec"]["nodeSelector"] == {"example.com/host": "cloud"}
    assert deployment(objects, INGRESS)["spec"]["template"]["spec"]["nodeSelector"] == {"example.com/host": "edge"}

    # placed with a cluster file: every process has its host's address, the cluster section names the hosts
    cluster = {"version": 1, "ingress": "edge", "hosts": [{"name": "edge", "address": "198.18.0.1"}, {"name": "cloud", "address": "198.18.0.2"}]}
    by_cluster = copy_topology(
        residual, tmp_path / "cluster",
        shards=tuple(dataclasses.replace(s, host=a) for s, a in zip(residual.shards, ("198.18.0.1", "198.18.0.2"))),
        ingress=dataclasses.replace(residual.ingress, host="198.18.0.1"),
        extra={**residual.extra, "cluster": cluster},
    )  # fmt: skip
    objects = kubernetes.manifests(by_cluster, kubernetes.KubeOptions())
    selectors = {p: deployment(objects, p)["spec"]["template"]["spec"].get("nodeSelector") for p in by_cluster.processes_on(None)}
    assert selectors == {INGRESS: {"keras-pipeline/host": "edge"}, "shard0": {"keras-pipeline/host": "edge"}, "shard1": {"keras-pipeline/host": "cloud"}}
    validate_all(objects)


def test_the_command_writes_a_folder(residual: Topology, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k8s"
    out.mkdir()
    (out / "stale.yaml").write_text("kind: Deployment\n")
    assert cli.main(["deploy", "kubernetes", str(residual.directory), "--image", "reg.example/kp:1", "--out", str(out)]) == 0
    files = sorted(out.glob("*.yaml"))
    assert not (out / "stale.yaml").exists() and len(files) == 11
    objects = [yaml.safe_load(f.read_text()) for f in files]
    assert {container(objects, p)["image"] for p in residual.processes_on(None)} == {"reg.example/kp:1"}
    capsys.readouterr()
    assert cli.main(["deploy", "kubernetes", str(residual.directory)]) == 0
    assert len(list(yaml.safe_load_all(capsys.readouterr().out))) == 11
    assert cli.main(["deploy", "kubernetes", str(residual.directory), "--tls-cert", "x.pem"]) == 2


# ----------------------------------------------------------- containerfile
def test_the_containerfile(residual: Topology, tmp_path: Path) -> None:
    context = tmp_path / "context"
    shutil.copytree(ROOT / "pipeline", context / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, context / f)
    secured, _ = curve_copy(residual, context / "topology" / "residual")
    text = containerfile.render(secured, context, pip=["my-layers==1.0"])
    lines = text.splitlines()
    assert "COPY topology/residual/shard0.keras /opt/keras-pipeline/model/shard0.keras" in lines
    assert "COPY topology/residual/shard1.keras /opt/keras-pipeline/model/shard1.keras" in lines
    assert "RUN pip install my-layers==1.0" in lines
    assert f"USER {kubernetes.RUN_AS}:{kubernetes.RUN_AS}" in lines and 'ENTRYPOINT ["pipeline"]' in lines
    assert "keys" not in "\n".join(ln for ln in lines if ln.startswith("COPY")) and "model.keras" not in text
    # every COPY source exists in the context
    for ln in lines:
        if ln.startswith("COPY "):
            assert (context / ln.split()[1]).exists(), ln
    with pytest.raises(UsageError, match="outside the build context"):
        containerfile.render(secured, tmp_path / "elsewhere")
    assert cli.main(["deploy", "containerfile", str(secured.directory), "--context", str(context)]) == 0
    assert (context / "Containerfile").read_text() == containerfile.render(secured, context)
    assert "**/*.key_secret" in (context / ".dockerignore").read_text()


# ----------------------------------------------------------------- systemd
def analyze(paths: list[Path]) -> tuple[int, str]:
    result = subprocess.run(["systemd-analyze", "verify", *map(str, paths)], capture_output=True, text=True, timeout=60)
    return result.returncode, (result.stdout + result.stderr).strip()


def verify_units(files: dict[str, str], out: Path) -> None:
    """Write the units into ``out`` and require ``systemd-analyze verify`` to pass them silently."""
    out.mkdir()
    for name, body in files.items():
        (out / name).write_text(body)
    code, said = analyze(sorted(out.iterdir()))
    assert code == 0 and said == "", said


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (bin/setup installs systemd)")
def test_systemd_units_verify(residual: Topology, tmp_path: Path) -> None:
    out = tmp_path / "units"
    executable = str(Path(sys.executable).with_name("pipeline"))
    assert Path(executable).exists()  # verify checks that ExecStart's program exists
    secured, _ = curve_copy(residual, tmp_path / "curve")
    assert cli.main([
        "deploy", "systemd", str(secured.directory), "--host", "127.0.0.1", "--out", str(out),
        "--executable", executable, "--keys-dir", "/etc/keras-pipeline/residual/keys", "--drain", "7",
    ]) == 0  # fmt: skip
    units = sorted(out.glob("*.service"))
    assert [u.name for u in units] == [systemd.unit_name(secured, p) for p in ("ingress", "shard0", "shard1")]
    code, said = analyze([*units, out / systemd.target_name(secured)])
    assert code == 0 and said == "", said
    text = units[1].read_text()
    for line in (
        "Restart=on-failure", f"TimeoutStopSec={7 + kubernetes.EXIT_MARGIN_S}", "NoNewPrivileges=yes", "ProtectSystem=strict",
        "User=keras-pipeline", "EnvironmentFile=-/etc/keras-pipeline/residual.env", "KillSignal=SIGTERM",
        f"ExecStart={executable} worker {secured.directory} --shard shard0 --drain-timeout 7",
    ):  # fmt: skip
        assert line in text.splitlines(), line
    assert (out / "residual.env").read_text().splitlines()[-1] == "PIPELINE_KEYS_DIR=/etc/keras-pipeline/residual/keys"
    target = (out / systemd.target_name(secured)).read_text()
    assert f"Wants={' '.join(u.name for u in [units[0], units[1], units[2]])}" in target

    # the check can fail: a line systemd must ignore, and a program that is not there
    bad = tmp_path / "bad.service"
    bad.write_text(text.replace("Restart=on-failure", "Restart=sometimes"))
    code, said = analyze([bad])
    assert "Failed to parse service restart specifier" in said
    bad.write_text(text.replace(executable, "/nonexistent/pipeline"))
    code, said = analyze([bad])
    assert code != 0 and "not executable" in said

    with pytest.raises(UsageError, match="no process of topology 'residual' is placed on host 'elsewhere'"):
        systemd.units(secured, "elsewhere", systemd.UnitOptions(executable=executable, directory=str(secured.directory)))


def test_systemd_units_of_an_ipc_topology_may_write_their_socket_folder(residual: Topology, tmp_path: Path) -> None:
    socks = tmp_path / "socks"
    ipc = copy_topology(
        residual, tmp_path / "ipc",
        shards=tuple(dataclasses.replace(s, endpoint=f"ipc://{socks}/{s.name}", bind=f"ipc://{socks}/{s.name}") for s in residual.shards),
        ingress=dataclasses.replace(residual.ingress, results=f"ipc://{socks}/ingress", bind=f"ipc://{socks}/ingress"),
    )  # fmt: skip
    files = systemd.units(ipc, "127.0.0.1", systemd.UnitOptions(executable="/usr/bin/true", directory=str(ipc.directory)))
    assert all(f"ReadWritePaths={socks}" in text.splitlines() for name, text in files.items() if name.endswith(".service"))


# ------------------------------------------------------ co-located shards
@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Topology:
    """The sequential test model in three shards, each fed by the one before it only."""
    import models

    from pipeline.partition.command import partition

    out = tmp_path_factory.mktemp("deploy") / "chain"
    return partition(models.sequential(), name="chain", out=out, cuts=["s1", "s2"], verify=False).topology


def grouped(t: Topology, dest: Path, processes: tuple[topo.ProcessSpec, ...] | None = None) -> Topology:
    """A copy of ``t`` with its shards grouped (default: all of a host in one process, as ``--colocate`` does)."""
    from pipeline import colocation

    return copy_topology(t, dest, processes=processes if processes is not None else colocation.colocate(t).processes)


def test_colocated_objects_validate_and_fit_together(residual: Topology, chain: Topology, tmp_path: Path) -> None:
    """One Deployment, Service and NetworkPolicy per process; every check passes, with and without CURVE."""
    both = grouped(residual, tmp_path / "residual")  # shard1 is fed by the ingress (TCP) and by shard0 (inproc)
    all3 = grouped(chain, tmp_path / "chain")  # shard1 and shard2 are fed only inside the process
    tail = grouped(chain, tmp_path / "tail", (topo.ProcessSpec("tail", ("shard1", "shard2")),))  # shard0 alone
    for t, processes in ((both, ["ingress", "workers"]), (all3, ["ingress", "workers"]), (tail, ["ingress", "shard0", "tail"])):
        objects = kubernetes.manifests(t, kubernetes.KubeOptions(namespace="ml"))
        validate_all(objects)
        assert checks.all_problems(objects) == []
        kinds = [o["kind"] for o in objects]
        assert [d["metadata"]["labels"][kubernetes.PROCESS_LABEL] for d in objects if d["kind"] == "Deployment"] == processes
        assert kinds.count("Service") == len(processes) + 1 and kinds.count("NetworkPolicy") == len(processes)
        secured, keys = curve_copy(t, tmp_path / f"curve-{t.name}-{len(processes)}-{len(t.processes)}")
        with_curve = kubernetes.manifests(secured, kubernetes.KubeOptions(), curve_keys=keys)
        validate_all(with_curve)
        assert checks.all_problems(with_curve) == []

    # residual, grouped: both shards bind TCP, each on its own port of the one pod, both behind the process's Service
    objects = kubernetes.manifests(both, kubernetes.KubeOptions())
    pt = checks.pod_topology(objects)
    host = "residual-workers.default.svc.cluster.local"
    assert [(s["endpoint"], s["bind"], s["metrics"]) for s in pt["shards"]] == [
        (f"tcp://{host}:5555", "tcp://0.0.0.0:5555", f"{host}:9100"),
        (f"tcp://{host}:5556", "tcp://0.0.0.0:5556", f"{host}:9101"),
    ]
    (svc,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "residual-workers"]
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("pull", 5555), ("metrics", 9100), ("pull-1", 5556), ("metrics-1", 9101)]
    assert pt["processes"] == [{"name": "workers", "shards": ["shard0", "shard1"]}]  # the pods group as the topology says

    # the chain, grouped: only shard0 is reached over TCP; shard1 and shard2 have no Service port
    objects = kubernetes.manifests(all3, kubernetes.KubeOptions())
    (svc,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "chain-workers"]
    assert [p["port"] for p in svc["spec"]["ports"]] == [5555, 9100, 9101, 9102]
    assert [p["containerPort"] for p in container(objects, "workers")["ports"]] == [5555, 9100, 9101, 9102]
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "chain-workers")
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]["values"] == ["ingress"]
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 5555}]
    assert policy["spec"]["ingress"][1]["ports"] == [{"protocol": "TCP", "port": p} for p in (9100, 9101, 9102)]
    ingress_policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "chain-ingress")
    assert ingress_policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]["values"] == ["workers"]

    # tail: shard1 is fed from shard0's pod over TCP (its Service port), shard2 inside the process only
    objects = kubernetes.manifests(tail, kubernetes.KubeOptions())
    assert [p["port"] for p in next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "chain-tail")["spec"]["ports"]] == [5555, 9100, 9101]
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "chain-tail")
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]["values"] == ["shard0"]
    assert container(objects, "shard0")["args"][:4] == ["worker", kubernetes.MODEL_DIR, "--shard", "shard0"]
    assert container(objects, "tail")["args"][:4] == ["worker", kubernetes.MODEL_DIR, "--process", "tail"]


def test_a_process_pod_holds_every_shard(residual: Topology, chain: Topology, tmp_path: Path) -> None:
    """Command, readiness over every shard, every shard's key and no other, memory and grace per process."""
    import base64

    t = grouped(chain, tmp_path / "chain")
    options = kubernetes.KubeOptions(drain_s=12, prestop_s=4)
    objects = kubernetes.manifests(t, options)
    c = container(objects, "workers")
    assert c["args"] == ["worker", kubernetes.MODEL_DIR, "--process", "workers", "--drain-timeout", "12"]
    for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/live")):
        assert c[probe]["exec"]["command"] == ["python3", "-c", kubernetes.ALL_SHARDS_PROBE, path, "9100", "9101", "9102"]
    pod = deployment(objects, "workers")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 4 + 12 + kubernetes.EXIT_MARGIN_S + kubernetes.GROUP_JOIN_MARGIN_S
    weights = sum(t.shard_path(s.name).stat().st_size for s in t.shards) / 2**20
    want = kubernetes.WORKER_BASE_MIB + 2 * kubernetes.GROUP_SHARD_MIB + kubernetes.WEIGHTS_FACTOR * weights
    assert int(c["resources"]["requests"]["memory"].rstrip("Mi")) == int(math.ceil(want / 16) * 16)
    assert c["resources"]["requests"]["cpu"] == "3000m"  # one CPU per shard by default, the three of them here

    # MobileNetV3Large's four shards in one process measured about 0.9 GB resident: the request covers it
    four = kubernetes.WORKER_BASE_MIB + 3 * kubernetes.GROUP_SHARD_MIB + kubernetes.WEIGHTS_FACTOR * 21
    assert 850 <= four <= 1000 and four * kubernetes.MEMORY_LIMIT_FACTOR > 900

    secured, keys = curve_copy(grouped(residual, tmp_path / "residual"), tmp_path / "curve")
    objects = kubernetes.manifests(secured, kubernetes.KubeOptions(), curve_keys=keys)
    (secret,) = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["labels"][kubernetes.PROCESS_LABEL] == "workers"]
    assert sorted(secret["data"]) == ["shard0.key_secret", "shard1.key_secret"]
    assert all(base64.b64decode(secret["data"][f"{s}.key_secret"]) == keys[s] for s in ("shard0", "shard1"))
    (init,) = deployment(objects, "workers")["spec"]["template"]["spec"]["initContainers"]
    assert init["command"] == ["install", "-m", "0600", "-t", kubernetes.KEYS_DIR,
                               f"{kubernetes.CURVE_SECRET_DIR}/shard0.key_secret", f"{kubernetes.CURVE_SECRET_DIR}/shard1.key_secret"]  # fmt: skip
    with pytest.raises(UsageError, match=r"no secret key for \['shard1'\]"):
        kubernetes.manifests(secured, kubernetes.KubeOptions(), curve_keys={k: v for k, v in keys.items() if k != "shard1"})

    # the checks fail on a grouped set gone wrong
    def broken(change: Any) -> list[str]:
        copied = copy.deepcopy(objects)
        change(copied)
        return checks.all_problems(copied)

    def one_key_missing(objs: list[dict[str, Any]]) -> None:
        next(o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == "residual-workers-curve-key")["data"].pop("shard1.key_secret")

    def second_shard_at_first_port(objs: list[dict[str, Any]]) -> None:
        cm = next(o for o in objs if o["kind"] == "ConfigMap")
        cm["data"]["topology.yaml"] = cm["data"]["topology.yaml"].replace("svc.cluster.local:5556", "svc.cluster.local:5555")

    def policy_without_second_port(objs: list[dict[str, Any]]) -> None:
        policy = next(o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "residual-workers")
        policy["spec"]["ingress"][0]["ports"].pop()

    assert any("expected exactly ['shard0.key_secret', 'shard1.key_secret']" in p for p in broken(one_key_missing))
    assert any("shard shard1 endpoint" in p and "expected to reach 'workers' port 5556, it reaches 'workers' port 5555" in p
               for p in broken(second_shard_at_first_port))  # fmt: skip
    assert any("NetworkPolicy of 'workers'" in p for p in broken(policy_without_second_port))

    # an endpoint fed only inside its process must not be reachable through a Service
    objects = kubernetes.manifests(t, kubernetes.KubeOptions())

    def exposed(objs: list[dict[str, Any]]) -> None:
        svc = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "chain-workers")
        svc["spec"]["ports"].append({"name": "pull-1", "port": 5556, "targetPort": 9101, "protocol": "TCP"})

    copied = copy.deepcopy(objects)
    exposed(copied)
    assert any("fed only inside process 'workers'" in p and "expected no Service port" in p for p in checks.all_problems(copied))


def test_the_all_shards_probe_fails_unless_every_shard_is_ready(tmp_path: Path) -> None:
    """The exec probe's script, run against real HTTP servers: 0 only when every port says 2xx."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            code = 200 if self.server.ready else 503  # type: ignore[attr-defined]
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"ok" if code == 200 else b"loading")

        def log_message(self, *args: Any) -> None:
            pass

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for s, th in zip(servers, threads):
        s.ready = True  # type: ignore[attr-defined]
        th.start()
    try:
        ports = [str(s.server_address[1]) for s in servers]

        def probe(*argv: str) -> int:
            return subprocess.run([sys.executable, "-c", kubernetes.ALL_SHARDS_PROBE, *argv], capture_output=True, timeout=30).returncode

        assert probe("/ready", *ports) == 0
        servers[1].ready = False  # type: ignore[attr-defined]
        assert probe("/ready", *ports) != 0
        assert probe("/ready", ports[0]) == 0
        servers[1].ready = True  # type: ignore[attr-defined]
        servers[0].shutdown()
        servers[0].server_close()
        assert probe("/ready", *ports) != 0  # a shard that does not answer at all
    finally:
        for s in servers[1:]:
            s.shutdown()
        for s in servers:
            s.server_close()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (bin/setup installs systemd)")
def test_systemd_one_unit_per_process(chain: Topology, tmp_path: Path) -> None:
    t = grouped(chain, tmp_path / "tail", (topo.ProcessSpec("tail", ("shard1", "shard2")),))
    executable = str(Path(sys.executable).with_name("pipeline"))
    files = systemd.units(t, "127.0.0.1", systemd.UnitOptions(executable=executable, directory=str(t.directory), drain_s=7))
    assert sorted(files) == sorted([*(systemd.unit_name(t, p) for p in ("ingress", "shard0", "tail")), systemd.target_name(t)])
    text = files[systemd.unit_name(t, "tail")].splitlines()
    assert f"ExecStart={executable} worker {t.directory} --process tail --drain-timeout 7" in text
    assert f"TimeoutStopSec={7 + kubernetes.EXIT_MARGIN_S + kubernetes.GROUP_JOIN_MARGIN_S}" in text
    assert f"ExecStart={executable} worker {t.directory} --shard shard0 --drain-timeout 7" in files[systemd.unit_name(t, "shard0")].splitlines()
    verify_units(files, tmp_path / "units")


# ---------------------------------------------------------------- replicas
def with_replicas(t: Topology, dest: Path, shard: str, hosts: tuple[str, ...]) -> Topology:
    """A copy of ``t`` whose ``shard`` has one replica per host of ``hosts`` (replica 0 stays where it is)."""
    t.shard(shard)  # a clear error for an unknown shard
    extra = tuple(
        topo.ReplicaSpec(endpoint=f"tcp://{h}:{6000 + k}", bind=f"tcp://{h}:{6000 + k}", host=h, metrics=f"{h}:{7000 + k}")
        for k, h in enumerate(hosts, start=1)
    )
    shards = tuple(dataclasses.replace(s, extra_replicas=extra) if s.name == shard else s for s in t.shards)
    return copy_topology(t, dest, shards=shards)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (bin/setup installs systemd)")
def test_systemd_a_unit_per_replica_on_its_host(residual: Topology, tmp_path: Path) -> None:
    """Replica k of a shard is a unit of its own on the host its entry names: ``worker --shard S --replica k``."""
    t = with_replicas(residual, tmp_path / "replicated", "shard1", ("127.0.0.2", "127.0.0.1"))
    executable = str(Path(sys.executable).with_name("pipeline"))
    options = systemd.UnitOptions(executable=executable, directory=str(t.directory), drain_s=7)
    here = systemd.units(t, "127.0.0.1", options)
    there = systemd.units(t, "127.0.0.2", options)
    assert sorted(here) == sorted([*(systemd.unit_name(t, p) for p in ("ingress", "shard0", "shard1@0", "shard1@2")), systemd.target_name(t)])
    assert sorted(there) == sorted([systemd.unit_name(t, "shard1@1"), systemd.target_name(t)])
    assert systemd.unit_name(t, "shard1@1") == "keras-pipeline-residual-shard1-r1.service"
    for files, k in ((here, 0), (there, 1), (here, 2)):
        text = files[systemd.unit_name(t, f"shard1@{k}")].splitlines()
        assert f"ExecStart={executable} worker {t.directory} --shard shard1 --replica {k} --drain-timeout 7" in text
        assert f"TimeoutStopSec={7 + kubernetes.EXIT_MARGIN_S}" in text
        assert any(line.startswith("Description=") and f"replica {k} of 3 of shard shard1" in line for line in text)
    assert f"ExecStart={executable} worker {t.directory} --shard shard0 --drain-timeout 7" in here[systemd.unit_name(t, "shard0")].splitlines()
    assert systemd.unit_name(t, "shard1@1") in there[systemd.target_name(t)]
    assert systemd.unit_name(t, "shard1@1") not in here[systemd.target_name(t)]
    for files, name in ((here, "here"), (there, "there")):
        out = tmp_path / name
        out.mkdir()
        for file, body in files.items():
            (out / file).write_text(body)
        code, said = analyze(sorted(out.iterdir()))
        assert code == 0 and said == "", said
    # the command writes them too (no refusal any more); a host with nothing placed is still an error
    assert cli.main(["deploy", "systemd", str(t.directory), "--host", "127.0.0.2", "--out", str(tmp_path / "cli"), "--executable", executable]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").glob("*.service")) == [systemd.unit_name(t, "shard1@1")]
    with pytest.raises(UsageError, match=r"127\.0\.0\.2"):
        systemd.units(t, "127.0.0.9", options)


def test_kubernetes_a_replicated_shard_is_one_deployment_behind_a_headless_service(residual: Topology, tmp_path: Path) -> None:
    """Listed replicas become one Deployment with N replicas, a headless Service, and replicas found by DNS in the
    ConfigMap; each pod reads its address from the downward API. Schemas and the fit checks pass, with CURVE too."""
    t = with_replicas(residual, tmp_path / "replicated", "shard1", ("127.0.0.1", "127.0.0.1"))
    objects = kubernetes.manifests(t, kubernetes.KubeOptions(namespace="ml"))
    validate_all(objects)
    assert checks.all_problems(objects) == []
    kinds = [o["kind"] for o in objects]
    assert kinds.count("Deployment") == 3 and kinds.count("Service") == 4  # one per process, as without replicas
    d = deployment(objects, "shard1")
    assert d["spec"]["replicas"] == 3 and deployment(objects, "shard0")["spec"]["replicas"] == 1
    assert d["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    c = container(objects, "shard1")
    assert {"name": "PIPELINE_REPLICA_ADDRESS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in c["env"]
    assert "PIPELINE_REPLICA_ADDRESS" not in [e["name"] for e in container(objects, "shard0")["env"]]
    assert c["args"] == ["worker", kubernetes.MODEL_DIR, "--shard", "shard1", "--drain-timeout", "10"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}  # per pod, as before
    (svc,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "residual-shard1"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is False
    (plain,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "residual-shard0"]
    assert "clusterIP" not in plain["spec"]
    pt = checks.pod_topology(objects)
    host = "residual-shard1.ml.svc.cluster.local"
    assert pt["shards"][1]["replicas"] == {"count": 3, "discover": "dns"}
    assert pt["shards"][1]["endpoint"] == f"tcp://{host}:5555" and pt["shards"][1]["metrics"] == f"{host}:9100"
    assert "replicas" not in pt["shards"][0]
    parsed = topo.from_dict(pt, directory=Path("."))
    topo.validate(parsed, check_files=False)  # what the pods read is a valid topology
    assert parsed.shard("shard1").discovered == 3
    # the pod template's annotations: every pod is scraped on its own address
    assert d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "9100"

    # a topology already written with replicas found by DNS keeps its count; with CURVE every pod holds the key
    secured, keys = curve_copy(t, tmp_path / "curve")
    with_curve = kubernetes.manifests(secured, kubernetes.KubeOptions(), curve_keys=keys)
    validate_all(with_curve)
    assert checks.all_problems(with_curve) == []
    assert deployment(with_curve, "shard1")["spec"]["replicas"] == 3

    # the command writes it (no refusal any more)
    out = tmp_path / "k8s"
    assert cli.main(["deploy", "kubernetes", str(t.directory), "--out", str(out)]) == 0
    written = [yaml.safe_load(f.read_text()) for f in sorted(out.glob("*.yaml"))]
    assert deployment(written, "shard1")["spec"]["replicas"] == 3

    # the checks fail on a replicated set gone wrong
    def broken(change: Any) -> list[str]:
        copied = copy.deepcopy(objects)
        change(copied)
        return checks.all_problems(copied)

    def one_pod(objs: list[dict[str, Any]]) -> None:
        deployment(objs, "shard1")["spec"]["replicas"] = 1

    def virtual_ip(objs: list[dict[str, Any]]) -> None:
        svc = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "residual-shard1")
        del svc["spec"]["clusterIP"]

    def no_address(objs: list[dict[str, Any]]) -> None:
        env = deployment(objs, "shard1")["spec"]["template"]["spec"]["containers"][0]["env"]
        env[:] = [e for e in env if e["name"] != "PIPELINE_REPLICA_ADDRESS"]

    assert any("expected replicas 3, it has 1" in p for p in broken(one_pod))
    assert any("expected a headless Service" in p for p in broken(virtual_ip))
    assert any("expected PIPELINE_REPLICA_ADDRESS from status.podIP in its env" in p for p in broken(no_address))


# ------------------------------------------------- the ingress in a worker process
def with_ingress(t: Topology, dest: Path, hosts: tuple[str, str] | None = None) -> Topology:
    """A copy of the residual topology whose shards of the ingress's host run in one process with the ingress
    (``colocate(t, ingress=True)``); with ``hosts``, shard0 and the ingress on the first, shard1 on the second."""
    from pipeline import colocation

    if hosts is not None:
        t = copy_topology(
            t, dest.with_name(f"{dest.name}-placed"),
            shards=tuple(dataclasses.replace(s, host=h) for s, h in zip(t.shards, hosts)),
            ingress=dataclasses.replace(t.ingress, host=hosts[0]),
        )  # fmt: skip
    return copy_topology(t, dest, processes=colocation.colocate(t, ingress=True).processes)


def service(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (svc,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == name]
    return svc


def policy(objects: list[dict[str, Any]], process: str) -> dict[str, Any]:
    (p,) = [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["labels"][kubernetes.PROCESS_LABEL] == process]
    return p


def test_kubernetes_the_ingress_in_the_one_process_of_a_host(residual: Topology, tmp_path: Path) -> None:
    """Both shards and the ingress in one process: one Deployment and its Services, the ingress's ports first, its
    options in the env, probes over the ingress and both shards, its key beside theirs, its drain in the grace."""
    import base64

    t = with_ingress(residual, tmp_path / "one")
    assert [(p.name, p.shards, p.ingress) for p in t.processes] == [("workers", ("shard0", "shard1"), True)]
    options = kubernetes.KubeOptions(namespace="ml", drain_s=12, prestop_s=4)
    objects = kubernetes.manifests(t, options)
    validate_all(objects)
    assert checks.all_problems(objects) == []
    assert [(o["kind"], o["metadata"]["name"]) for o in objects if o["kind"] in ("Deployment", "Service", "NetworkPolicy")] == [
        ("Service", "residual-ingress"), ("Service", "residual-workers"), ("Deployment", "residual-workers"), ("NetworkPolicy", "residual-workers"),
    ]  # fmt: skip  (no results Service: every shard sends to the ingress inside the process)
    c = container(objects, "workers")
    assert c["args"] == ["worker", kubernetes.MODEL_DIR, "--process", "workers", "--drain-timeout", "12"]
    assert {"name": "PIPELINE_INGRESS_ADDRESS", "value": "0.0.0.0:8001"} in c["env"]
    assert {"name": "PIPELINE_INGRESS_DRAIN", "value": "12"} in c["env"]
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("grpc", 8001), ("metrics", 9100), ("metrics-1", 9101), ("metrics-2", 9102)]
    for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/live")):
        assert c[probe]["exec"]["command"] == ["python3", "-c", kubernetes.ALL_SHARDS_PROBE, path, "9100", "9101", "9102"]
    pod = deployment(objects, "workers")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 4 + 12 + 12 + kubernetes.EXIT_MARGIN_S + 2 * kubernetes.GROUP_JOIN_MARGIN_S
    assert c["resources"]["requests"]["cpu"] == f"{2000 + kubernetes.INGRESS_CPU_MILLI}m"  # one CPU per shard, and the ingress's
    grouped_alone = container(kubernetes.manifests(grouped(residual, tmp_path / "grouped"), options), "workers")
    assert int(c["resources"]["requests"]["memory"].rstrip("Mi")) == int(grouped_alone["resources"]["requests"]["memory"].rstrip("Mi")) + kubernetes.INGRESS_MEMORY_MIB
    selector = {kubernetes.INSTANCE_LABEL: "residual", kubernetes.PROCESS_LABEL: "workers"}
    ingress_svc = service(objects, "residual-ingress")
    assert ingress_svc["spec"]["selector"] == selector and [p["port"] for p in ingress_svc["spec"]["ports"]] == [8001, 9100]
    assert [p["port"] for p in service(objects, "residual-workers")["spec"]["ports"]] == [9101, 9102]
    rules = policy(objects, "workers")["spec"]["ingress"]
    assert rules == [
        {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
         "ports": [{"protocol": "TCP", "port": p} for p in (9100, 9101, 9102)]},
        {"ports": [{"protocol": "TCP", "port": 8001}]},
    ]  # fmt: skip
    pt = checks.pod_topology(objects)
    assert pt["processes"] == [{"name": "workers", "shards": ["shard0", "shard1"], "ingress": True}]
    assert pt["ingress"]["grpc"] == "residual-ingress.ml.svc.cluster.local:8001"
    assert pt["ingress"]["metrics"] == "residual-ingress.ml.svc.cluster.local:9100"
    assert pt["shards"][1]["metrics"] == "residual-workers.ml.svc.cluster.local:9102"

    # CURVE and TLS: one Secret with the ingress's key and the shards', the TLS Secret in that pod, its files in the env
    secured, keys = curve_copy(t, tmp_path / "curve")
    with_tls = kubernetes.manifests(secured, kubernetes.KubeOptions(tls=True), curve_keys=keys, tls_pair=(b"c", b"k"))
    validate_all(with_tls)
    assert checks.all_problems(with_tls) == []
    (secret,) = [o for o in with_tls if o["kind"] == "Secret" and o["type"] == "Opaque"]
    assert sorted(secret["data"]) == ["ingress.key_secret", "shard0.key_secret", "shard1.key_secret"]
    assert all(base64.b64decode(v) == keys[k.removesuffix(".key_secret")] for k, v in secret["data"].items())
    pod = deployment(with_tls, "workers")["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": "residual-ingress-tls", "defaultMode": 0o440}} in pod["volumes"]
    assert {"name": "PIPELINE_INGRESS_TLS_CERT", "value": f"{kubernetes.TLS_DIR}/tls.crt"} in pod["containers"][0]["env"]
    assert {"name": "PIPELINE_INGRESS_TLS_KEY", "value": f"{kubernetes.TLS_DIR}/tls.key"} in pod["containers"][0]["env"]
    assert [o["kind"] for o in with_tls].count("Deployment") == 1
    front = grouped(with_replicas(residual, tmp_path / "replicated", "shard1", ("127.0.0.1",)), tmp_path / "front",
                    (topo.ProcessSpec("front", ("shard1",), ingress=True),))  # fmt: skip
    with pytest.raises(UsageError, match="shard 'shard1' has replicas but runs in process 'front', which serves the ingress"):
        kubernetes.manifests(front, options)  # one pod cannot be its N replicas

    # the checks see an ingress key left out, and an ingress Service that lost its metrics port
    def no_ingress_key(objs: list[dict[str, Any]]) -> None:
        next(o for o in objs if o["kind"] == "Secret" and o["type"] == "Opaque")["data"].pop("ingress.key_secret")

    def no_ingress_metrics(objs: list[dict[str, Any]]) -> None:
        service(objs, "residual-ingress")["spec"]["ports"].pop()

    for change, said in ((no_ingress_key, "expected exactly ['ingress.key_secret', 'shard0.key_secret', 'shard1.key_secret']"),
                         (no_ingress_metrics, "ingress metrics 'residual-ingress.default.svc.cluster.local:9100'")):  # fmt: skip
        copied = copy.deepcopy(with_tls)
        change(copied)
        assert any(said in p for p in checks.all_problems(copied)), checks.all_problems(copied)


def test_kubernetes_the_ingress_in_a_process_that_shards_elsewhere_send_to(residual: Topology, tmp_path: Path) -> None:
    """shard0 and the ingress in one process on host edge, shard1 in one on cloud: the edge pod binds the results
    port, behind the results Service, open to the cloud pod only; the cloud pod's PULL port open to the edge pod."""
    t = with_ingress(residual, tmp_path / "two", ("edge", "cloud"))
    assert [(p.name, p.ingress) for p in t.processes] == [("workers-edge", True), ("workers-cloud", False)]
    objects = kubernetes.manifests(t, kubernetes.KubeOptions())
    validate_all(objects)
    assert checks.all_problems(objects) == []
    assert [d["metadata"]["name"] for d in objects if d["kind"] == "Deployment"] == ["residual-workers-edge", "residual-workers-cloud"]
    edge = container(objects, "workers-edge")
    assert [(p["name"], p["containerPort"]) for p in edge["ports"]] == [("pull", 5555), ("grpc", 8001), ("metrics", 9100), ("metrics-1", 9101)]
    assert edge["args"][2:4] == ["--process", "workers-edge"]
    assert container(objects, "workers-cloud")["args"][2:4] == ["--process", "workers-cloud"]
    results = service(objects, "residual-ingress-results")
    assert results["spec"]["selector"][kubernetes.PROCESS_LABEL] == "workers-edge" and results["spec"]["publishNotReadyAddresses"] is True
    assert service(objects, "residual-ingress")["spec"]["selector"][kubernetes.PROCESS_LABEL] == "workers-edge"
    assert [p["port"] for p in service(objects, "residual-workers-edge")["spec"]["ports"]] == [9101]  # shard0 is fed inside its process
    senders = {
        process: [(r["from"][0]["podSelector"]["matchExpressions"][0]["values"], [p["port"] for p in r["ports"]])
                  for r in policy(objects, process)["spec"]["ingress"] if "podSelector" in r.get("from", [{}])[0] and "matchExpressions" in r["from"][0]["podSelector"]]
        for process in ("workers-edge", "workers-cloud")
    }  # fmt: skip
    assert senders == {"workers-edge": [(["workers-cloud"], [5555])], "workers-cloud": [(["workers-edge"], [5555])]}
    assert {"ports": [{"protocol": "TCP", "port": 8001}]} in policy(objects, "workers-edge")["spec"]["ingress"]
    assert deployment(objects, "workers-edge")["spec"]["template"]["spec"]["nodeSelector"] == {kubernetes.DEFAULT_HOST_LABEL: "edge"}
    pt = checks.pod_topology(objects)
    assert pt["shards"][1]["endpoint"] == "tcp://residual-workers-cloud.default.svc.cluster.local:5555"
    assert pt["ingress"]["results"] == "tcp://residual-ingress-results.default.svc.cluster.local:5555"

    # the checks fail on a results port closed to the shard elsewhere, or whose Service selects the wrong pod
    def closed(objs: list[dict[str, Any]]) -> None:
        rules = policy(objs, "workers-edge")["spec"]["ingress"]
        rules[:] = [r for r in rules if {"protocol": "TCP", "port": 5555} not in r.get("ports", [])]

    def wrong_pod(objs: list[dict[str, Any]]) -> None:
        service(objs, "residual-ingress-results")["spec"]["selector"][kubernetes.PROCESS_LABEL] = "workers-cloud"

    for change, said in ((closed, "NetworkPolicy of 'workers-edge': expected its PULL port 5555 open to ['workers-cloud'], it admits []"),
                         (wrong_pod, "expected to reach 'workers-edge' port 5555, it reaches 'workers-cloud' port 5555")):  # fmt: skip
        copied = copy.deepcopy(objects)
        change(copied)
        assert any(said in p for p in checks.all_problems(copied)), checks.all_problems(copied)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (bin/setup installs systemd)")
def test_systemd_the_ingress_in_a_worker_process(residual: Topology, tmp_path: Path) -> None:
    """One unit for the process that serves the ingress (no ingress unit), the ingress's drain in its environment."""
    executable = str(Path(sys.executable).with_name("pipeline"))
    t = with_ingress(residual, tmp_path / "one")
    files = systemd.units(t, "127.0.0.1", systemd.UnitOptions(executable=executable, directory=str(t.directory), drain_s=7))
    assert sorted(files) == [systemd.unit_name(t, "workers"), systemd.target_name(t)]
    text = files[systemd.unit_name(t, "workers")].splitlines()
    assert f"ExecStart={executable} worker {t.directory} --process workers --drain-timeout 7" in text
    assert "Environment=PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 HOME=/tmp KERAS_HOME=/tmp/.keras PIPELINE_INGRESS_DRAIN=7" in text
    assert f"TimeoutStopSec={7 + 7 + kubernetes.EXIT_MARGIN_S + 2 * kubernetes.GROUP_JOIN_MARGIN_S}" in text
    assert any(line.startswith("Description=") and "serving the ingress (KServe v2 gRPC) and shards shard0, shard1" in line for line in text)
    verify_units(files, tmp_path / "units")

    # two hosts: the edge unit serves the ingress and shard0 (its ipc results bind writable), cloud's shard1 only
    socks = tmp_path / "socks"
    two = with_ingress(residual, tmp_path / "two", ("edge", "cloud"))
    ipc = copy_topology(two, tmp_path / "ipc", ingress=dataclasses.replace(two.ingress, bind=f"ipc://{socks}/bound/ingress"))
    edge = systemd.units(ipc, "edge", systemd.UnitOptions(executable=executable, directory=str(ipc.directory), drain_s=7))
    assert sorted(edge) == [systemd.unit_name(ipc, "workers-edge"), systemd.target_name(ipc)]
    assert f"ReadWritePaths={socks}/bound" in edge[systemd.unit_name(ipc, "workers-edge")].splitlines()
    cloud = systemd.units(ipc, "cloud", systemd.UnitOptions(executable=executable, directory=str(ipc.directory), drain_s=7))
    text = cloud[systemd.unit_name(ipc, "workers-cloud")].splitlines()
    assert f"ExecStart={executable} worker {ipc.directory} --process workers-cloud --drain-timeout 7" in text
    assert not any("PIPELINE_INGRESS_DRAIN" in line or "ReadWritePaths" in line for line in text)
