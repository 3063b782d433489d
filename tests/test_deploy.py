"""Structural and security checks of the deployment files under deploy/.

Nothing here needs Docker, Kubernetes or the network: the files are parsed and
the facts that a deployment depends on are asserted (shared /store on every Ray
pod, Ray version agreement between image and manifests, MLflow on PostgreSQL,
pinned torch, telemetry off), and so is the lock-down: Ray token auth on every
cluster and the RayJob submitter, a NetworkPolicy in front of the Ray head,
MLflow behind its basic-auth app, Compose on 127.0.0.1 only, no literal
credentials anywhere under deploy/, and every referenced Secret documented.
The MLflow start script's pure parts (settings, URIs, the auth config) are
exercised directly; it imports nothing outside the standard library at load.
"""

from __future__ import annotations

import configparser
import importlib.util
import re
import shlex
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
MLFLOW = DEPLOY / "mlflow"

STORE_CLAIM = "ddray-store"
STORE_MOUNT = "/store"
MLFLOW_URI = "http://mlflow:5000"

ALL_YAML = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
K8S_YAML = [p for p in ALL_YAML if p.name != "docker-compose.yml"]
ALL_FILES = sorted(p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
START_SCRIPT = MLFLOW / "start-server.py"
START_COMMAND = "ddray-mlflow-server"  # START_SCRIPT as installed in the MLflow image

# Ray head ports that must not be open: GCS, dashboard / Jobs API, Ray client, metrics.
HEAD_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}
CLIENT_PORTS = (8265, 10001)


def load_all(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    return docs


def load_one(path: Path) -> dict:
    docs = load_all(path)
    assert len(docs) == 1, f"{path}: expected one document, got {len(docs)}"
    return docs[0]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


def dockerfile_args(path: Path) -> dict[str, str]:
    args = {}
    for instr, rest in dockerfile_instructions(path):
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip().strip('"')
    return args


def dockerfile_env(path: Path) -> dict[str, str]:
    env = {}
    for instr, rest in dockerfile_instructions(path):
        if instr == "ENV":
            for tok in shlex.split(rest):
                k, _, v = tok.partition("=")
                env[k] = v
    return env


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.match(r"\d+(?:\.\d+)*", v).group(0).split("."))


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(label, RayCluster spec) for the RayCluster and the RayJob's cluster."""
    rc = load_one(KUBERAY / "raycluster.yaml")
    rj = load_one(KUBERAY / "rayjob.yaml")
    return [("RayCluster", rc["spec"]), ("RayJob", rj["spec"]["rayClusterSpec"])]


def ray_groups() -> list[tuple[str, dict]]:
    groups = []
    for label, spec in ray_cluster_specs():
        groups.append((f"{label}/head", spec["headGroupSpec"]))
        for g in spec["workerGroupSpecs"]:
            groups.append((f"{label}/{g['groupName']}", g))
    return groups


def compose() -> dict:
    return load_one(MLFLOW / "docker-compose.yml")


def option_value(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def load_start_script():
    spec = importlib.util.spec_from_file_location("ddray_mlflow_start_server", START_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in K8S_YAML for d in load_all(p)]


def docs_of_kind(kind: str) -> list[dict]:
    return [d for _, d in k8s_docs() if d.get("kind") == kind]


def env_map(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_ref(entry: dict | None) -> tuple[str, str] | None:
    """(Secret name, key) when an env entry comes from a secretKeyRef, else None."""
    ref = ((entry or {}).get("valueFrom") or {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref else None


def ray_pod_labels(template: dict, node_type: str, group: str, cluster: str | None) -> dict[str, str]:
    """The labels KubeRay gives a Ray pod: its own (labelPod in ray-operator/controllers/ray/
    common/pod.go), then the template's, except the three it does not let a template override.
    A RayJob's cluster name is generated, so the caller passes cluster=None for it."""
    labels = {
        "ray.io/is-ray-node": "yes",
        "ray.io/node-type": node_type,
        "ray.io/group": group,
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
    }
    if cluster:
        labels["ray.io/cluster"] = cluster
    fixed = {"ray.io/node-type", "ray.io/group", "ray.io/cluster"}
    labels.update({k: v for k, v in (template.get("metadata", {}).get("labels") or {}).items() if k not in fixed})
    return labels


def ray_cluster_pods(which: str) -> dict[str, dict[str, str]]:
    """{group label: pod labels} for the head ("head") and each worker group of a cluster spec."""
    spec = dict(ray_cluster_specs())[which]
    cluster = load_one(KUBERAY / "raycluster.yaml")["metadata"]["name"] if which == "RayCluster" else None
    pods = {"head": ray_pod_labels(spec["headGroupSpec"]["template"], "head", "headgroup", cluster)}
    for g in spec["workerGroupSpecs"]:
        pods[g["groupName"]] = ray_pod_labels(g["template"], "worker", g["groupName"], cluster)
    return pods


def selector_matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def selector_is_empty(selector: dict | None) -> bool:
    return not (selector or {}).get("matchLabels") and not (selector or {}).get("matchExpressions")


def rule_admits_port(rule: dict, port: int, named: dict[str, int]) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True  # a rule without ports admits every port
    for p in ports:
        value = p.get("port")
        if value is None:
            return True
        value = named.get(value, value) if isinstance(value, str) else value
        if value == port or (p.get("endPort") and value <= port <= p["endPort"]):
            return True
    return False


def peer_admits_same_namespace_pod(peer: dict, labels: dict[str, str]) -> bool:
    """Whether a NetworkPolicy peer admits a pod with these labels in the policy's namespace."""
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer and not selector_is_empty(peer["namespaceSelector"]):
        return False  # needs a namespace label we cannot see here; not the pods of the cluster
    return selector_matches(peer.get("podSelector"), labels)


def head_policies(which: str) -> list[dict]:
    head = ray_cluster_pods(which)["head"]
    return [
        np
        for np in docs_of_kind("NetworkPolicy")
        if "Ingress" in np["spec"].get("policyTypes", ["Ingress"]) and selector_matches(np["spec"]["podSelector"], head)
    ]


def head_container(which: str) -> dict:
    spec = dict(ray_cluster_specs())[which]
    (c,) = [c for c in spec["headGroupSpec"]["template"]["spec"]["containers"] if c["name"] == "ray-head"]
    return c


def token_auth_via_operator(spec: dict) -> bool:
    return (spec.get("authOptions") or {}).get("mode") == "token"


def token_auth_in_env(container: dict) -> bool:
    env = env_map(container)
    return (env.get("RAY_AUTH_MODE") or {}).get("value") == "token" and secret_ref(env.get("RAY_AUTH_TOKEN")) is not None


def documented_secrets() -> dict[str, set[str]]:
    """{Secret name: keys} created by a `kubectl create secret generic` command in deploy/."""
    out: dict[str, set[str]] = {}
    for path in ALL_FILES:
        if path.suffix not in (".md", ".yaml", ".yml"):
            continue
        text = re.sub(r"\\\n\s*(#\s*)?", " ", path.read_text())  # join continued lines
        for m in re.finditer(r"kubectl create secret generic\s+([a-z0-9.-]+)([^\n]*)", text):
            out.setdefault(m.group(1), set()).update(re.findall(r"--from-literal=([A-Za-z0-9_.-]+)=", m.group(2)))
    return out


# Literal credentials. A key that names a secret, followed by ':' or '=' and a value that is
# not a reference ($VAR, ${VAR}, $(command)), a placeholder (<...>, ***, ...) or empty.
SECRET_WORD = r"(?:password|passwd|secret|token|api[_-]?key|credentials?)"
SECRET_KEY_RE = re.compile(rf"(?<![\w.-])([\w.-]*{SECRET_WORD}[\w.-]*)\s*[:=]\s*(\S*)", re.I)
# Keys that name or locate a secret instead of holding one.
NOT_A_SECRET_KEY = re.compile(r"(?:ref|name|path|file|dir|mode|type|len|length|url)$", re.I)
# A boolean is never a credential (automountServiceAccountToken: false).
ALLOWED_VALUE = re.compile(r"""^(?:$|#|["']?\$|["']?<|\*{3}|\.{3}|""|''|null$|~$|true$|false$|\|$|>$)""")
DEFAULTED_VAR_RE = re.compile(rf"\$\{{([\w]*{SECRET_WORD}[\w]*):?-([^}}]*)\}}", re.I)
URI_PASSWORD_RE = re.compile(r"""://[^\s/:@'"{}]+:([^\s@/'"]+)@""")
BEARER_RE = re.compile(r"Bearer\s+([^\s'\"]+)")
PY_LITERAL_RE = re.compile(rf"""(?<![\w.])([\w]*{SECRET_WORD}[\w]*)\s*[:=]\s*[rbuf]?(["'])([^"']+)\2""", re.I)


def literal_secrets(text: str, python: bool = False) -> list[str]:
    """Lines of text that hold a literal credential (see SECRET_KEY_RE)."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in DEFAULTED_VAR_RE.finditer(line):
            if m.group(2).strip():
                found.append(f"{n}: default value for {m.group(1)}: {line.strip()}")
        for m in BEARER_RE.finditer(line):
            if not re.match(r"^(\$|\*{3}|<)", m.group(1)):
                found.append(f"{n}: literal bearer token: {line.strip()}")
        for m in URI_PASSWORD_RE.finditer(line):
            if not re.match(r"^(\$|\*{3}|<)", m.group(1)):
                found.append(f"{n}: password in a URI: {line.strip()}")
        if python:
            for m in PY_LITERAL_RE.finditer(line):
                if not NOT_A_SECRET_KEY.search(m.group(1)) and not ALLOWED_VALUE.match(m.group(3)):
                    found.append(f"{n}: {m.group(1)} = {m.group(3)!r}")
            continue
        # ${...} and $(...) are references: check them above, then hide them from the key scan.
        plain = re.sub(r"\$\{[^}]*\}|\$\([^)]*\)", "$REF", line)
        for m in SECRET_KEY_RE.finditer(plain):
            key, value = m.group(1), m.group(2)
            if NOT_A_SECRET_KEY.search(key) or ALLOWED_VALUE.match(value):
                continue
            found.append(f"{n}: {key} = {value}")
    return found


def structural_secrets(path: Path) -> list[str]:
    """Literal values where the YAML structure says a secret goes."""
    found = []
    secretish = re.compile(SECRET_WORD, re.I)
    if path.name == "docker-compose.yml":
        for name, svc in compose()["services"].items():
            env = svc.get("environment") or {}
            items = env.items() if isinstance(env, dict) else (e.partition("=")[::2] for e in env)
            for k, v in items:
                if secretish.search(k) and not NOT_A_SECRET_KEY.search(k):
                    v = str(v or "")
                    if not re.fullmatch(r"\$\{\w+(:\?[^}]*|:?-)?\}", v):
                        found.append(f"compose {name}: {k} = {v}")
        return found
    for d in load_all(path):
        if d.get("kind") == "Secret":
            for field in ("data", "stringData"):
                for k, v in (d.get(field) or {}).items():
                    if v not in (None, ""):
                        found.append(f"Secret {d['metadata']['name']}: {field}.{k} has a value")

        def walk(node):
            if isinstance(node, dict):
                if isinstance(node.get("name"), str) and "value" in node and secretish.search(node["name"]):
                    if not NOT_A_SECRET_KEY.search(node["name"]) and str(node["value"] or "").strip():
                        found.append(f"{d['kind']} {d['metadata']['name']}: env {node['name']} has a literal value")
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(d)
    return found


# --- every YAML file -----------------------------------------------------


def test_deploy_has_yaml_files():
    names = {p.relative_to(DEPLOY).as_posix() for p in ALL_YAML}
    assert {
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/store-pvc.yaml",
        "mlflow/docker-compose.yml",
        "mlflow/k8s.yaml",
    } <= names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path):
    docs = load_all(path)
    if path.name == "docker-compose.yml":
        return
    for d in docs:  # Kubernetes objects
        assert d.get("apiVersion") and d.get("kind"), f"{path}: object without apiVersion/kind"
        assert d.get("metadata", {}).get("name"), f"{path}: {d['kind']} without a name"


# --- KubeRay -------------------------------------------------------------


def test_raycluster_shape():
    rc = load_one(KUBERAY / "raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["kind"] == "RayCluster"
    spec = rc["spec"]
    assert "headGroupSpec" in spec
    assert isinstance(spec["workerGroupSpecs"], list) and spec["workerGroupSpecs"]
    # Autoscaling is opt-in.
    assert spec.get("enableInTreeAutoscaling", False) is False


@pytest.mark.parametrize("which", ["RayCluster", "RayJob"])
def test_ray_version_matches_image(which):
    spec = dict(ray_cluster_specs())[which]
    assert str(spec["rayVersion"]).startswith("2.60")
    assert dockerfile_args(DEPLOY / "Dockerfile")["RAY_VERSION"] == spec["rayVersion"]


def test_raycluster_has_cpu_and_gpu_groups():
    spec = load_one(KUBERAY / "raycluster.yaml")["spec"]
    by_gpu = {}
    for g in spec["workerGroupSpecs"]:
        (container,) = [c for c in g["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
        gpus = int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
        by_gpu.setdefault(gpus > 0, []).append((g, gpus))
    assert by_gpu.get(False), "no CPU-only worker group"
    assert by_gpu.get(True), "no GPU worker group"
    for g, gpus in by_gpu[True]:
        assert gpus == 1
        assert g["rayStartParams"].get("num-gpus") == "1"  # the Ray GPU resource
        assert g["replicas"] >= 1


@pytest.mark.parametrize("label,group", ray_groups(), ids=[label for label, _ in ray_groups()])
def test_every_ray_pod_mounts_the_store(label, group):
    pod = group["template"]["spec"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod.get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    store_volumes = {name for name, claim in claims.items() if claim == STORE_CLAIM}
    assert store_volumes, f"{label}: no volume from PVC {STORE_CLAIM}"
    for c in pod["containers"]:
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert mounts.get(STORE_MOUNT) in store_volumes, f"{label}/{c['name']}: {STORE_CLAIM} not at {STORE_MOUNT}"


@pytest.mark.parametrize("label,group", ray_groups(), ids=[label for label, _ in ray_groups()])
def test_every_ray_container_is_configured(label, group):
    # KubeRay's rayStartParams is map[string]string: a bare number is rejected.
    assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), label
    for c in group["template"]["spec"]["containers"]:
        assert c["image"].startswith("ddray:"), f"{label}: image {c['image']}"
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env.get("MLFLOW_TRACKING_URI") == MLFLOW_URI, label
        res = c["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res[kind]), f"{label}: {kind} lacks cpu/memory"


def test_store_pvc_is_rwx():
    pvc = load_one(KUBERAY / "store-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["metadata"]["name"] == STORE_CLAIM
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"]


def test_rayjob_runs_a_study():
    rj = load_one(KUBERAY / "rayjob.yaml")
    assert rj["apiVersion"] == "ray.io/v1"
    assert rj["kind"] == "RayJob"
    spec = rj["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["ddray", "study", "submit"]
    assert option_value(argv, "--store") == STORE_MOUNT
    assert "--json" in argv
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert "headGroupSpec" in cluster and cluster["workerGroupSpecs"]

    # The spec it runs is baked into the image: /app/configs/<name> <- configs/<name>.
    spec_path = argv[3]
    assert spec_path.startswith("/app/configs/")
    assert (ROOT / "configs" / spec_path.removeprefix("/app/configs/")).is_file()
    copies = [rest.split() for instr, rest in dockerfile_instructions(DEPLOY / "Dockerfile") if instr == "COPY"]
    assert ["configs/", "/app/configs/"] in copies


# --- MLflow --------------------------------------------------------------


def test_compose_services():
    c = compose()
    services = c["services"]
    assert {"postgres", "mlflow"} <= set(services)

    pg = services["postgres"]
    assert pg["image"].split(":")[1].startswith("16")
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    pg_volumes = [v.split(":")[0] for v in pg["volumes"]]
    assert any(v in c.get("volumes", {}) for v in pg_volumes), "postgres data is not on a named volume"
    # The password comes from the environment / deploy/mlflow/.env, with no default:
    # compose stops with the message after :? while it is unset or empty.
    assert pg["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert "ports" not in pg, "PostgreSQL must not be published"

    ml = services["mlflow"]
    assert ml["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert ml["build"]["context"] == "."
    assert (MLFLOW / ml["build"].get("dockerfile", "Dockerfile")).is_file()
    env = ml["environment"]
    # The start script builds postgresql+psycopg2://...@<POSTGRES_HOST>:5432/<POSTGRES_DB>.
    assert env["POSTGRES_HOST"] in services and services[env["POSTGRES_HOST"]] is pg
    for k in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert env[k] == pg["environment"][k], k
    for k in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[k].startswith("${" + k + ":?"), f"{k} must be required (no default)"
    argv = ml["command"]
    assert argv[0] == START_COMMAND
    assert "--backend-store-uri" not in argv, "the URI (with the password) belongs in the environment"
    assert option_value(argv, "--artifacts-destination") == "/mlartifacts"
    assert "--serve-artifacts" in argv
    assert option_value(argv, "--host") == "0.0.0.0"  # the container's interface; published on 127.0.0.1
    assert option_value(argv, "--port") == "5000"


def test_mlflow_k8s():
    docs = load_all(MLFLOW / "k8s.yaml")
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    assert {"StatefulSet", "Service", "Deployment", "PersistentVolumeClaim", "NetworkPolicy"} <= set(by_kind)
    assert "Secret" not in by_kind, "Secrets are created with kubectl (deploy/README.md), not committed"

    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    # The Ray pods' MLFLOW_TRACKING_URI is http://mlflow:5000.
    assert [p["port"] for p in services["mlflow"]["spec"]["ports"]] == [5000]

    (sts,) = by_kind["StatefulSet"]
    assert sts["spec"]["serviceName"] in services
    (pg,) = sts["spec"]["template"]["spec"]["containers"]
    assert pg["image"].split(":")[1].startswith("16")

    secrets = documented_secrets()
    (dep,) = by_kind["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (ml,) = pod["containers"]
    for c in (pg, ml):
        assert {e["secretRef"]["name"] for e in c.get("envFrom", [])} <= set(secrets)
    # PostgreSQL and the MLflow server read the same Secret.
    assert {e["secretRef"]["name"] for e in pg["envFrom"]} <= {e["secretRef"]["name"] for e in ml["envFrom"]}
    argv = ml["command"]
    assert argv[0] == START_COMMAND
    host = env_map(ml)["POSTGRES_HOST"]["value"]
    assert host in services, f"backend host {host} is not a Service here"
    assert services[host]["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert option_value(argv, "--port") == "5000"

    pvcs = {p["metadata"]["name"] for p in by_kind["PersistentVolumeClaim"]}
    art_claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert art_claims and art_claims <= pvcs
    assert any(m["mountPath"] == option_value(argv, "--artifacts-destination") for m in ml["volumeMounts"])


def test_mlflow_image_pins_the_project_mlflow():
    path = MLFLOW / "Dockerfile"
    args = dockerfile_args(path)
    assert args["MLFLOW_VERSION"].startswith("3.17.")
    instrs = dockerfile_instructions(path)
    runs = " ".join(rest for instr, rest in instrs if instr == "RUN")
    assert '"mlflow[auth]==${MLFLOW_VERSION}"' in runs  # the basic-auth app
    assert "psycopg2-binary" in runs
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"mlflow==3.17.*"' in pyproject
    assert dockerfile_args(DEPLOY / "Dockerfile")["MLFLOW_VERSION"] == args["MLFLOW_VERSION"]
    # The start script is installed under the name the manifests run.
    copies = [rest.split() for instr, rest in instrs if instr == "COPY"]
    assert [START_SCRIPT.name, f"/usr/local/bin/{START_COMMAND}"] in copies
    assert START_SCRIPT.read_text().startswith("#!/usr/bin/env python3")
    users = [rest for instr, rest in instrs if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (cmd,) = [rest for instr, rest in instrs if instr == "CMD"]
    cmd = yaml.safe_load(cmd)
    assert cmd[0] == START_COMMAND and option_value(cmd, "--app-name") == "basic-auth"


def test_mlflow_credentials_stay_out_of_git_and_the_image():
    ignored = (MLFLOW / ".gitignore").read_text().split()
    assert ".env" in ignored
    patterns = [p for p in (MLFLOW / ".dockerignore").read_text().split() if not p.startswith("#")]
    assert ".env" in patterns or (patterns[0] == "*" and "!.env" not in patterns)
    assert f"!{START_SCRIPT.name}" in patterns or patterns[0] != "*"


def test_env_example_lists_every_compose_variable_without_values():
    text = (MLFLOW / ".env.example").read_text()
    example = dict(
        line.split("=", 1) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    )
    raw = (MLFLOW / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{(\w+)", raw))
    required = set(re.findall(r"\$\{(\w+):\?", raw))
    assert required >= {"POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    assert used - {"MLFLOW_ALLOWED_HOSTS"} <= set(example), "variables missing from .env.example"
    for k, v in example.items():
        if re.search(SECRET_WORD, k, re.I):
            assert v == "", f".env.example must not hold a value for {k}"
    for k in required:
        assert example[k] == "", f"{k} is required: .env.example must leave it empty"


# --- the MLflow start script -----------------------------------------------


START_ENV = {
    "POSTGRES_USER": "mlflow",
    "POSTGRES_PASSWORD": "p@ss:w/rd%20+&x",  # test-only value, never deployed
    "POSTGRES_DB": "mlflow",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-pass-for-tests",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-for-tests",
}


def test_start_script_names_every_missing_variable():
    mod = load_start_script()
    with pytest.raises(mod.ConfigError) as e:
        mod.read_settings({})
    for name in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "MLFLOW_AUTH_ADMIN_PASSWORD",
                 "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert name in str(e.value)
    with pytest.raises(mod.ConfigError, match="at least 12"):
        mod.read_settings({**START_ENV, "MLFLOW_AUTH_ADMIN_PASSWORD": "short"})
    with pytest.raises(mod.ConfigError, match="both"):
        mod.read_settings({**START_ENV, "MLFLOW_CLIENT_USERNAME": "ddray"})


def test_start_script_always_runs_basic_auth():
    mod = load_start_script()
    assert mod.server_args(["--host", "0.0.0.0"])[:2] == ["--app-name", "basic-auth"]
    assert mod.server_args(["--app-name", "basic-auth", "--port", "5000"]) == ["--app-name", "basic-auth", "--port", "5000"]
    with pytest.raises(mod.ConfigError):
        mod.server_args(["--app-name", "something-else"])


def test_start_script_auth_config_round_trips():
    mod = load_start_script()
    s = mod.read_settings({**START_ENV, "POSTGRES_HOST": "db.internal"})
    ini = mod.render_auth_config(s)
    assert "admin_password" not in ini and START_ENV["MLFLOW_AUTH_ADMIN_PASSWORD"] not in ini
    # MLflow reads the file with a plain ConfigParser (BasicInterpolation): '%' must survive it.
    cp = configparser.ConfigParser()
    cp.read_string(ini)
    section = cp["mlflow"]
    assert section["default_permission"] == "READ"
    assert section["admin_username"] == "admin"
    assert section["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    uri = urlsplit(section["database_uri"])
    assert uri.scheme == "postgresql+psycopg2"
    assert (uri.hostname, uri.port, uri.path) == ("db.internal", 5432, "/mlflow_auth")
    assert unquote(uri.password) == START_ENV["POSTGRES_PASSWORD"]
    tracking = urlsplit(mod.postgres_uri(s, s["pg_db"]))
    assert tracking.path == "/mlflow" and unquote(tracking.password) == START_ENV["POSTGRES_PASSWORD"]
    masked = mod.render_auth_config(s, mask=True)
    assert "p%40ss" not in masked and ":***@" in masked


def test_start_script_writes_a_private_config(tmp_path):
    mod = load_start_script()
    path = tmp_path / "cfg" / "basic_auth.ini"
    mod.write_private(path, "[mlflow]\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_start_script_check_config_masks_passwords(monkeypatch, capsys):
    mod = load_start_script()
    for k, v in START_ENV.items():
        monkeypatch.setenv(k, v)
    assert mod.main(["--check-config", "--host", "0.0.0.0", "--port", "5000"]) == 0
    out = capsys.readouterr().out
    assert "mlflow server --app-name basic-auth --host 0.0.0.0 --port 5000" in out
    for v in START_ENV.values():
        if v != "mlflow":
            assert v not in out and v.replace("@", "%40") not in out
    monkeypatch.delenv("POSTGRES_PASSWORD")
    assert mod.main(["--check-config"]) == 2
    assert "POSTGRES_PASSWORD" in capsys.readouterr().err


# --- lock-down -------------------------------------------------------------


@pytest.mark.parametrize("which", ["RayCluster", "RayJob"])
def test_token_auth_on_every_ray_cluster(which):
    spec = dict(ray_cluster_specs())[which]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    if token_auth_via_operator(spec):
        assert version_tuple(spec["rayVersion"]) >= (2, 52), "token auth needs Ray >= 2.52"
        for c in containers:
            # KubeRay 1.5.x appends its own RAY_AUTH_* entries: duplicates make the winner unpredictable.
            assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env_map(c)), f"{which}/{c['name']}"
    else:
        # The fallback for operators older than 1.5.1: every Ray container gets the token itself.
        for c in containers:
            assert token_auth_in_env(c), f"{which}/{c['name']}: no RAY_AUTH_MODE=token + RAY_AUTH_TOKEN secretKeyRef"
    for c in containers:
        assert (env_map(c).get("RAY_AUTH_MODE") or {}).get("value", "token") == "token"


def test_rayjob_submitter_authenticates():
    rj = load_one(KUBERAY / "rayjob.yaml")["spec"]
    mode = rj.get("submissionMode", "K8sJobMode")
    # In these modes the operator gives the submitter the token when authOptions is on.
    assert mode in ("K8sJobMode", "SidecarMode", "HTTPMode")
    template = rj.get("submitterPodTemplate")
    if not token_auth_via_operator(rj["rayClusterSpec"]):
        assert template, "without authOptions the submitter needs a template carrying the token"
    if template:
        (c,) = template["spec"]["containers"][:1]
        if not token_auth_via_operator(rj["rayClusterSpec"]):
            assert token_auth_in_env(c)
        assert template["spec"].get("restartPolicy") in ("Never", "OnFailure")
        # The submitter reaches the head's Jobs API through the NetworkPolicy.
        labels = template.get("metadata", {}).get("labels", {})
        assert any(
            any(peer_admits_same_namespace_pod(peer, labels) for peer in r.get("from", []))
            and rule_admits_port(r, HEAD_PORTS["dashboard"], {})
            for np in head_policies("RayJob")
            for r in np["spec"].get("ingress", [])
        ), "the submitter is not admitted to the head's port 8265"


@pytest.mark.parametrize("which", ["RayCluster", "RayJob"])
def test_head_networkpolicy(which):
    policies = head_policies(which)
    assert policies, f"no NetworkPolicy selects the {which} head pods"
    pods = ray_cluster_pods(which)
    named = {p["name"]: p["containerPort"] for p in head_container(which).get("ports", [])}
    assert {named.get(n) for n in HEAD_PORTS} == set(HEAD_PORTS.values()), "head container ports"
    rules = [r for np in policies for r in np["spec"].get("ingress", [])]
    for r in rules:
        assert r.get("from"), "an ingress rule without 'from' admits everyone"
    # The GCS is for the cluster's own pods: every peer admitting 6379 is a same-namespace pod selector
    # that matches Ray pods of this cluster; the workers must be admitted.
    for r in rules:
        if rule_admits_port(r, HEAD_PORTS["gcs"], named):
            for peer in r["from"]:
                assert "ipBlock" not in peer and selector_is_empty(peer.get("namespaceSelector")) and "namespaceSelector" not in peer
                assert not selector_is_empty(peer.get("podSelector"))
                assert any(selector_matches(peer["podSelector"], labels) for labels in pods.values())
    for group, labels in pods.items():
        if group != "head":
            assert any(
                rule_admits_port(r, HEAD_PORTS["gcs"], named)
                and any(peer_admits_same_namespace_pod(p, labels) for p in r["from"])
                for r in rules
            ), f"{which}: workers of group {group} cannot reach the GCS"
    # Clients: an explicitly labelled selector admitted to the Jobs API and the Ray client port.
    for port in CLIENT_PORTS:
        client_rules = [
            r for r in rules
            if rule_admits_port(r, port, named) and any(
                "ddray.io/ray-client" in ((p.get("podSelector") or {}).get("matchLabels") or {})
                or "ddray.io/ray-client" in ((p.get("namespaceSelector") or {}).get("matchLabels") or {})
                for p in r["from"]
            )
        ]
        assert client_rules, f"no labelled client selector for port {port}"


def test_no_networkpolicy_admits_everyone():
    policies = docs_of_kind("NetworkPolicy")
    assert policies
    for np in policies:
        name = np["metadata"]["name"]
        assert not selector_is_empty(np["spec"]["podSelector"]), f"{name} selects every pod"
        for r in np["spec"].get("ingress", []):
            assert r.get("from"), f"{name}: a rule without 'from' admits every source"
            for peer in r["from"]:
                cidr = (peer.get("ipBlock") or {}).get("cidr")
                assert cidr not in ("0.0.0.0/0", "::/0"), f"{name}: open ipBlock"
                if "ipBlock" not in peer:
                    assert not (
                        selector_is_empty(peer.get("podSelector")) and selector_is_empty(peer.get("namespaceSelector"))
                    ), f"{name}: a peer that matches every pod"


def test_mlflow_runs_behind_basic_auth():
    commands = {"compose": compose()["services"]["mlflow"]["command"]}
    for d in docs_of_kind("Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            if c["image"].startswith("ddray-mlflow"):
                commands[f"k8s/{c['name']}"] = c["command"]
    assert len(commands) == 2
    for where, argv in commands.items():
        assert argv[0] == START_COMMAND, where
        assert option_value(argv, "--app-name") == "basic-auth", where
    script = START_SCRIPT.read_text()
    assert 'APP_NAME = "basic-auth"' in script and '"mlflow", "server"' in script


def test_compose_publishes_on_loopback_only():
    for name, svc in compose()["services"].items():
        assert svc.get("network_mode") != "host", name
        for port in svc.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published on every interface"


def test_no_service_exposed_outside_the_cluster():
    for d in docs_of_kind("Service"):
        assert d["spec"].get("type", "ClusterIP") == "ClusterIP", d["metadata"]["name"]
    for label, spec in ray_cluster_specs():
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", label
    templates = [g["template"] for _, g in ray_groups()]
    templates += [d["spec"]["template"] for k in ("Deployment", "StatefulSet") for d in docs_of_kind(k)]
    templates.append(load_one(KUBERAY / "rayjob.yaml")["spec"].get("submitterPodTemplate") or {"spec": {}})
    for t in templates:
        assert not t["spec"].get("hostNetwork")
        for c in t["spec"].get("containers", []):
            assert not any("hostPort" in p for p in c.get("ports", [])), c["name"]


def test_nothing_listens_on_all_interfaces_without_auth():
    # The Ray dashboard / Jobs API on 0.0.0.0 (which the head Service needs) only with token auth.
    for label, spec in ray_cluster_specs():
        host = spec["headGroupSpec"].get("rayStartParams", {}).get("dashboard-host", "0.0.0.0")  # KubeRay default
        if host != "127.0.0.1":
            head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
            assert token_auth_via_operator(spec) or token_auth_in_env(head), f"{label}: open dashboard on {host}"
    # MLflow on 0.0.0.0 only behind basic-auth (checked for both commands in test_mlflow_runs_behind_basic_auth).
    for argv in [compose()["services"]["mlflow"]["command"]] + [
        c["command"] for d in docs_of_kind("Deployment") for c in d["spec"]["template"]["spec"]["containers"]
        if c["image"].startswith("ddray-mlflow")
    ]:
        if option_value(argv, "--host") != "127.0.0.1":
            assert option_value(argv, "--app-name") == "basic-auth"


@pytest.mark.parametrize("label,group", ray_groups(), ids=[label for label, _ in ray_groups()])
def test_ray_pods_log_in_to_mlflow_from_a_secret(label, group):
    (server,) = [c for d in docs_of_kind("Deployment") for c in d["spec"]["template"]["spec"]["containers"]
                 if c["image"].startswith("ddray-mlflow")]
    server_env = env_map(server)
    for c in group["template"]["spec"]["containers"]:
        env = env_map(c)
        user, password = secret_ref(env.get("MLFLOW_TRACKING_USERNAME")), secret_ref(env.get("MLFLOW_TRACKING_PASSWORD"))
        assert user and password, f"{label}/{c['name']}: MLflow credentials must come from a secretKeyRef"
        # The same account the server creates at start.
        assert user == secret_ref(server_env["MLFLOW_CLIENT_USERNAME"])
        assert password == secret_ref(server_env["MLFLOW_CLIENT_PASSWORD"])


def test_referenced_secrets_are_documented():
    documented = documented_secrets()
    readme = (DEPLOY / "README.md").read_text()
    referenced: dict[str, set[str]] = {}

    def walk(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                referenced.setdefault(node["secretKeyRef"]["name"], set()).add(node["secretKeyRef"]["key"])
            if "secretRef" in node:
                referenced.setdefault(node["secretRef"]["name"], set())
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for _, d in k8s_docs():
        walk(d)
        name = ((d.get("spec") or {}).get("authOptions") or {}).get("secretName")
        if name:
            referenced.setdefault(name, {"auth_token"})
    assert referenced, "no Secret referenced at all"
    for name, keys in referenced.items():
        assert name in documented, f"Secret {name} is used but no `kubectl create secret generic {name}` is documented"
        assert keys <= documented[name], f"Secret {name}: keys {keys - documented[name]} are not created"
        assert name in readme
    # envFrom Secrets: the keys the containers need are the ones created.
    assert documented["mlflow-postgres"] >= {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}
    assert documented["mlflow-server"] >= {"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    # The operator-made Ray token Secret is named after the RayCluster; the README says how to read it.
    name = load_one(KUBERAY / "raycluster.yaml")["metadata"]["name"]
    assert f"kubectl get secret {name} -o jsonpath='{{.data.auth_token}}'" in readme


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_no_literal_credentials(path):
    text = path.read_text()
    found = literal_secrets(text, python=path.suffix == ".py")
    if path.suffix in (".yaml", ".yml"):
        found += structural_secrets(path)
    assert not found, f"{path.relative_to(ROOT)} holds literal credentials:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "text",
    [
        "POSTGRES_PASSWORD: change-me-dev-only",
        "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:-mlflow-dev-only}",
        "- postgresql+psycopg2://mlflow:hunter2@postgres:5432/mlflow",
        "password: hunter2",
        "export RAY_AUTH_TOKEN=abc123",
        "--from-literal=POSTGRES_PASSWORD=s3cret",
        "MLFLOW_FLASK_SERVER_SECRET_KEY=my-secret-key",
        "admin_password = password1234",
        "curl -H 'Authorization: Bearer abc123'",
    ],
)
def test_credential_scan_catches_literals(text):
    assert literal_secrets(text)


@pytest.mark.parametrize(
    "text",
    [
        "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it in deploy/mlflow/.env}",
        "MLFLOW_CLIENT_PASSWORD: ${MLFLOW_CLIENT_PASSWORD:-}",
        "POSTGRES_PASSWORD=",
        '--from-literal=POSTGRES_PASSWORD="$(openssl rand -hex 24)"',
        "export RAY_AUTH_TOKEN=$(kubectl get secret ddray -o jsonpath='{.data.auth_token}' | base64 -d)",
        "secretName: ddray-ray-token",
        "RAY_AUTH_MODE=token",
        'curl -H "Authorization: Bearer $RAY_AUTH_TOKEN" http://localhost:8265/api/jobs/',
        "automountServiceAccountToken: false",
    ],
)
def test_credential_scan_allows_references(text):
    assert not literal_secrets(text)


def test_credential_scan_checks_yaml_structure(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {auth_token: x}\n---\n"
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
        "spec: {containers: [{name: c, env: [{name: MLFLOW_TRACKING_PASSWORD, value: x}]}]}\n"
    )
    assert len(structural_secrets(bad)) == 2
    assert literal_secrets("    python -c 'x'\nsecret = 'hunter2'", python=True)


# --- the ddray image -----------------------------------------------------


def test_dockerfile():
    path = DEPLOY / "Dockerfile"
    instrs = dockerfile_instructions(path)
    froms = [rest for instr, rest in instrs if instr == "FROM"]
    assert froms == ["python:3.11-slim"]

    env = dockerfile_env(path)
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"

    args = dockerfile_args(path)
    assert version_tuple(args["TORCH_VERSION"]) <= (2, 14, 1)
    assert version_tuple(args["TORCHVISION_VERSION"]) <= (0, 29, 1)
    assert args["TORCH_INDEX"].endswith("/whl/cpu")
    runs = " ".join(rest for instr, rest in instrs if instr == "RUN")
    assert '--index-url "${TORCH_INDEX}"' in runs
    assert '"torch==${TORCH_VERSION}"' in runs
    assert "pip install --constraint" in runs  # the project install keeps that torch

    users = [rest for instr, rest in instrs if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [rest for instr, rest in instrs if instr == "WORKDIR"][-1] == "/app"


def test_dockerignore():
    patterns = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (".venv", "ddray-store", "mlflow.db", "data"):
        assert needed in patterns
    assert any("__pycache__" in p for p in patterns)
    # distill_core/data/ is source: only the top-level data/ may be ignored.
    assert not any(p.endswith("/data") or p.startswith("**/data") for p in patterns)
    for source in ("cli", "orchestrator", "distill_core", "configs", "pyproject.toml", "README.md"):
        assert source not in patterns


def test_readme_says_what_was_not_tested():
    text = (DEPLOY / "README.md").read_text()
    assert "Not tested here" in text
    assert "helm install kuberay-operator kuberay/kuberay-operator" in text


def test_readme_explains_the_locked_down_access():
    text = (DEPLOY / "README.md").read_text()
    # A workstation reaches the head through a port-forward, with the token.
    assert "kubectl port-forward svc/ddray-head-svc" in text
    assert "export RAY_AUTH_MODE=token" in text and "export RAY_AUTH_TOKEN=" in text
    # The fallback for operators without authOptions is documented, with the token from a Secret.
    assert "### Older KubeRay operators" in text
    fallback = text[text.index("### Older KubeRay operators"):]
    (snippet,) = re.findall(r"```yaml\n(.*?)```", fallback, re.S)[:1]
    entries = {e["name"]: e for e in yaml.safe_load(snippet)}
    assert entries["RAY_AUTH_MODE"]["value"] == "token"
    name, key = secret_ref(entries["RAY_AUTH_TOKEN"])
    assert key == "auth_token" and name in documented_secrets()
    assert "submitter" in fallback


# --- hardening: pod security and network policies ----------------------------

NAMESPACE_NAME = "kubernetes.io/metadata.name"  # set by Kubernetes on every namespace; nobody can fake it
# The uid each image runs as: deploy/Dockerfile and deploy/mlflow/Dockerfile create uid 1000, and the
# official postgres image's postgres user is 999.
IMAGE_UIDS = {"ddray": 1000, "ddray-mlflow": 1000, "postgres": 999}
# Pod templates in deploy/: RayCluster head + 2 groups, RayJob submitter + head + 2 groups,
# the PostgreSQL StatefulSet and the MLflow Deployment.
EXPECTED_POD_SPECS = 9
PRIVATE_RANGES = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"}


def pod_specs(node, where: str = "") -> list[tuple[str, dict]]:
    """Every pod spec inside a parsed document: any dict with a `containers` list, wherever it sits."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            found.append((where, node))
        for key, value in node.items():
            found += pod_specs(value, f"{where}.{key}" if where else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += pod_specs(value, f"{where}[{i}]")
    return found


def all_pod_specs() -> list[tuple[str, dict]]:
    return [
        (f"{p.relative_to(DEPLOY).as_posix()}:{d['kind']}/{d['metadata']['name']}:{where}", spec)
        for p, d in k8s_docs()
        for where, spec in pod_specs(d)
    ]


def image_uid(image: str) -> int | None:
    return IMAGE_UIDS.get(image.rsplit("/", 1)[-1].split(":")[0])


def pod_hardening_problems(spec: dict) -> list[str]:
    """What a pod spec lacks of the hardening in deploy/README.md ("Hardening"); empty when none."""
    problems = []
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken is not false")
    pod_sc = spec.get("securityContext") or {}
    if (pod_sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append("pod seccompProfile is not RuntimeDefault")
    if pod_sc.get("runAsNonRoot") is not True:
        problems.append("pod runAsNonRoot is not true")
    claims = {v["name"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
    local = {v["name"] for v in spec.get("volumes", [])}
    containers = [*spec.get("initContainers", []), *spec["containers"]]
    if not containers:
        problems.append("no containers")
    for c in containers:
        name, sc = c.get("name"), c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if caps.get("drop") != ["ALL"] or caps.get("add"):
            problems.append(f"{name}: capabilities are not drop [ALL] with nothing added")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        uid = sc.get("runAsUser")
        if not isinstance(uid, int) or uid == 0 or uid != image_uid(c.get("image", "")):
            problems.append(f"{name}: runAsUser {uid!r} is not the uid of {c.get('image')} (IMAGE_UIDS)")
        # A volume the container writes (a PVC, or a StatefulSet claim template, which is not in
        # `volumes`) needs fsGroup to be the container's group.
        group = sc.get("runAsGroup", pod_sc.get("runAsGroup", uid))
        for m in c.get("volumeMounts", []):
            persistent = m["name"] in claims or m["name"] not in local
            if persistent and not m.get("readOnly") and pod_sc.get("fsGroup") != group:
                problems.append(f"{name}: writes volume {m['name']} but fsGroup is {pod_sc.get('fsGroup')!r}, not {group}")
    return problems


def test_every_pod_spec_is_found():
    found = all_pod_specs()
    assert len(found) >= EXPECTED_POD_SPECS, [where for where, _ in found]
    kinds = {where.split(":")[1].split("/")[0] for where, _ in found}
    assert kinds == {"RayCluster", "RayJob", "StatefulSet", "Deployment"}
    assert any("submitterPodTemplate" in where for where, _ in found)


@pytest.mark.parametrize("where,spec", all_pod_specs(), ids=[where for where, _ in all_pod_specs()])
def test_every_pod_is_hardened(where, spec):
    problems = pod_hardening_problems(spec)
    assert not problems, f"{where}:\n" + "\n".join(problems)


def test_pod_hardening_check_catches_gaps():
    good = {
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "x"}}],
        "containers": [{
            "name": "c", "image": "registry.example.org/ddray:latest",
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000},
            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        }],
    }
    assert pod_hardening_problems(good) == []
    container = good["containers"][0]
    for change in (
        lambda s: s.pop("automountServiceAccountToken"),
        lambda s: s["securityContext"].pop("seccompProfile"),
        lambda s: s["securityContext"].pop("fsGroup"),
        lambda s: s["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
        lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
        lambda s: s["containers"][0]["securityContext"].update(runAsUser=999),
        lambda s: s["containers"][0]["securityContext"].pop("runAsNonRoot"),
        lambda s: s.update(initContainers=[{"name": "init", "image": "ddray:latest"}]),
    ):
        spec = yaml.safe_load(yaml.safe_dump(good))
        change(spec)
        assert pod_hardening_problems(spec), spec
    assert container["securityContext"]["runAsUser"] == 1000  # the copies were changed, not `good`


def test_image_uids_match_the_dockerfiles():
    for dockerfile, image in ((DEPLOY / "Dockerfile", "ddray"), (MLFLOW / "Dockerfile", "ddray-mlflow")):
        users = [rest for instr, rest in dockerfile_instructions(dockerfile) if instr == "USER"]
        assert int(users[-1].split(":")[0]) == IMAGE_UIDS[image], dockerfile
    uids = {m.group(1) for m in re.finditer(r"useradd --uid (\d+)", (DEPLOY / "Dockerfile").read_text())}
    assert uids == {str(IMAGE_UIDS["ddray"])}


def test_compose_services_are_hardened():
    images = {"postgres": 999, "mlflow": IMAGE_UIDS["ddray-mlflow"]}
    for name, svc in compose()["services"].items():
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        assert svc.get("cap_drop") == ["ALL"] and not svc.get("cap_add"), name
        assert svc.get("read_only") is True, name
        assert "/tmp" in svc.get("tmpfs", []), name
        assert not svc.get("privileged"), name
        # Without `user`, the image's USER applies (checked in test_image_uids_match_the_dockerfiles).
        user = str(svc.get("user", images[name])).split(":")[0]
        assert user not in ("0", "root") and int(user) == images[name], name


def peer_problems(peer: dict) -> list[str]:
    """A NetworkPolicy peer that could match pods of other namespaces than the one it names."""
    if "ipBlock" in peer:
        return []
    if "namespaceSelector" not in peer:
        return []  # a bare podSelector: the policy's own namespace only
    ns = peer["namespaceSelector"] or {}
    labels = ns.get("matchLabels") or {}
    if ns.get("matchExpressions") or list(labels) != [NAMESPACE_NAME] or not labels[NAMESPACE_NAME]:
        return [f"namespaceSelector {ns} does not name one namespace by {NAMESPACE_NAME}"]
    if selector_is_empty(peer.get("podSelector")):
        return [f"every pod of namespace {labels[NAMESPACE_NAME]}: give the peer a podSelector"]
    return []


def policy_peers(np: dict) -> list[dict]:
    spec = np["spec"]
    return [p for r in spec.get("ingress") or [] for p in r.get("from") or []] + \
        [p for r in spec.get("egress") or [] for p in r.get("to") or []]


def test_every_networkpolicy_covers_both_directions_and_names_namespaces():
    policies = docs_of_kind("NetworkPolicy")
    assert len(policies) >= 5, [np["metadata"]["name"] for np in policies]
    for np in policies:
        name = np["metadata"]["name"]
        assert sorted(np["spec"].get("policyTypes", [])) == ["Egress", "Ingress"], name
        for peer in policy_peers(np):
            assert not peer_problems(peer), f"{name}: {peer_problems(peer)}"
        for r in np["spec"].get("egress") or []:
            assert r.get("to"), f"{name}: an egress rule without 'to' reaches everything"
            for peer in r["to"]:
                block = peer.get("ipBlock")
                if block and block["cidr"] in ("0.0.0.0/0", "::/0"):
                    assert PRIVATE_RANGES <= set(block.get("except", [])), f"{name}: open egress reaches the cluster"
                    assert [p.get("port") for p in r.get("ports", [])] == [443], f"{name}: open egress beyond HTTPS"


@pytest.mark.parametrize(
    "peer",
    [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "x"}}},
        {"namespaceSelector": {"matchLabels": {"ddray.io/ray-client": "true"}}},
        {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME: "monitoring"}}},
        {"namespaceSelector": {"matchExpressions": [{"key": NAMESPACE_NAME, "operator": "Exists"}]},
         "podSelector": {"matchLabels": {"app": "x"}}},
    ],
)
def test_peer_check_catches_other_namespaces(peer):
    assert peer_problems(peer)


def test_named_namespaces_are_documented():
    readme = (DEPLOY / "README.md").read_text()
    assert "## Hardening" in readme
    names = {p["namespaceSelector"]["matchLabels"][NAMESPACE_NAME]
             for np in docs_of_kind("NetworkPolicy") for p in policy_peers(np) if "namespaceSelector" in p}
    assert names >= {"kube-system", "kuberay-system"}
    for ns in names:
        assert f"`{ns}`" in readme, f"namespace {ns} of the NetworkPolicies is not in deploy/README.md"


def rule_admits(rule: dict, port: int, protocol: str = "TCP") -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("protocol", "TCP") == protocol and p.get("port") in (None, port) for p in ports)


def peer_matches(peer: dict, labels: dict[str, str], namespace: str | None) -> bool:
    """Whether a peer matches a pod with `labels` in `namespace` (None: the policy's own)."""
    if "ipBlock" in peer:
        return False
    ns = (peer.get("namespaceSelector") or {}).get("matchLabels")
    if (ns or {}).get(NAMESPACE_NAME) != namespace:
        return False
    return selector_matches(peer.get("podSelector"), labels)


def egress_reaches(source: dict[str, str], target: dict[str, str] | None, port: int, protocol: str = "TCP",
                   namespace: str | None = None, policies: list[dict] | None = None) -> bool:
    """Whether the policies let a pod with labels `source` connect to `target` (None: a public ipBlock)."""
    policies = docs_of_kind("NetworkPolicy") if policies is None else policies
    rules = [r for np in policies if "Egress" in np["spec"].get("policyTypes", [])
             and selector_matches(np["spec"]["podSelector"], source) for r in np["spec"].get("egress") or []]
    assert rules or target is None, f"no egress rule for {source}"
    for r in rules:
        if not rule_admits(r, port, protocol):
            continue
        for peer in r["to"]:
            if target is None and "ipBlock" in peer:
                return True
            if target is not None and peer_matches(peer, target, namespace):
                return True
    return False


def template_labels(kind: str) -> dict[str, str]:
    (d,) = docs_of_kind(kind)
    return d["spec"]["template"]["metadata"]["labels"]


DNS_POD = {"k8s-app": "kube-dns"}


def test_every_pod_is_selected_for_ingress_and_egress():
    rj = load_one(KUBERAY / "rayjob.yaml")["spec"]
    pods = {f"{which}/{g}": labels for which in ("RayCluster", "RayJob") for g, labels in ray_cluster_pods(which).items()}
    pods["submitter"] = rj["submitterPodTemplate"]["metadata"]["labels"]
    pods["mlflow"], pods["postgres"] = template_labels("Deployment"), template_labels("StatefulSet")
    nps = docs_of_kind("NetworkPolicy")
    for name, labels in pods.items():
        for direction in ("Ingress", "Egress"):
            assert any(direction in np["spec"]["policyTypes"] and selector_matches(np["spec"]["podSelector"], labels)
                       for np in nps), f"{name}: no {direction} policy"


@pytest.mark.parametrize("which", ["RayCluster", "RayJob"])
def test_ray_pods_egress(which):
    pods = ray_cluster_pods(which)
    mlflow, postgres = template_labels("Deployment"), template_labels("StatefulSet")
    nps = docs_of_kind("NetworkPolicy")
    for group, labels in pods.items():
        for other in pods.values():
            for port in (HEAD_PORTS["gcs"], 45000):  # the GCS and a worker port (not fixed)
                assert egress_reaches(labels, other, port, policies=nps), f"{group}: cannot reach {other} on {port}"
        assert egress_reaches(labels, mlflow, 5000, policies=nps), f"{group}: cannot reach MLflow"
        assert not egress_reaches(labels, postgres, 5432, policies=nps), f"{group}: reaches PostgreSQL"
        for protocol in ("UDP", "TCP"):
            assert egress_reaches(labels, DNS_POD, 53, protocol, "kube-system", nps), f"{group}: no DNS over {protocol}"
        assert egress_reaches(labels, None, 443, policies=nps), f"{group}: cannot reach an object store over HTTPS"
        assert not egress_reaches(labels, None, 80, policies=nps), f"{group}: plain HTTP out"


def test_submitter_reaches_only_the_head_jobs_api():
    labels = load_one(KUBERAY / "rayjob.yaml")["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    pods = ray_cluster_pods("RayJob")
    assert egress_reaches(labels, pods["head"], HEAD_PORTS["dashboard"])
    assert not egress_reaches(labels, pods["head"], HEAD_PORTS["gcs"])
    assert not egress_reaches(labels, pods["cpu"], HEAD_PORTS["dashboard"])
    assert egress_reaches(labels, DNS_POD, 53, "UDP", "kube-system")


def test_mlflow_and_postgres_egress():
    mlflow, postgres = template_labels("Deployment"), template_labels("StatefulSet")
    assert egress_reaches(mlflow, postgres, 5432)
    assert egress_reaches(mlflow, DNS_POD, 53, "UDP", "kube-system")
    assert not egress_reaches(mlflow, ray_cluster_pods("RayCluster")["head"], HEAD_PORTS["dashboard"])
    # PostgreSQL: DNS and nothing else.
    assert egress_reaches(postgres, DNS_POD, 53, "UDP", "kube-system")
    assert not egress_reaches(postgres, mlflow, 5000)
    assert not egress_reaches(postgres, None, 443)
    rules = [r for np in docs_of_kind("NetworkPolicy") if selector_matches(np["spec"]["podSelector"], postgres)
             for r in np["spec"].get("egress") or []]
    assert rules and all({p["port"] for p in r["ports"]} == {53} for r in rules)
