#!/usr/bin/env python3
"""Checks the deployment files for the rules of this project that generic linters do not know.

    python deploy/check.py            # from anywhere; exits 1 and lists every violation

Run by server/tests/deploy_files.rs with the test venv (dockerfile-parse and PyYAML, from
server/tests/py/requirements.txt), after hadolint and kubernetes-validate, which check the
files against Docker's and Kubernetes' own rules.

Dockerfiles (deploy/docker/*.Dockerfile):
  - the final stage runs as a non-root user (its last USER, numeric and not 0);
  - ENTRYPOINT, CMD and HEALTHCHECK are in exec (JSON array) form;
  - the server image has a HEALTHCHECK and exposes 8080; both declare their data VOLUME;
  - no image is `latest` or untagged, except the documented default of the worker's base
    (ARG SLEAP_NN_IMAGE, upstream's moving tag);
  - COPY sources exist in the build context (the repository root) and COPY --from names a stage;
  - the builder builds exactly its crate with --release --locked.
Kubernetes (deploy/k8s/**):
  - a kustomization lists only files that exist;
  - a worker requests nvidia.com/gpu, takes SLEAP_RTC_TOKEN from a Secret, lists exactly its
    read-only data mounts in SLEAP_RTC_MOUNTS, and has its work dir on a PersistentVolumeClaim;
  - a server probes /health for readiness and liveness;
  - a server with Redis runs at least 2 replicas, uses the DynamoDB store, reads its JWT key from
    a Secret volume, and has a PodDisruptionBudget;
  - an nginx Ingress speaks HTTP/1.1 to the backend with read/send timeouts of at least an hour.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
# (file, ARG) whose default may be a moving tag: documented in the file and in docs/deploying.md.
LATEST_ALLOWED = {("worker.Dockerfile", "SLEAP_NN_IMAGE")}
# The crate each image builds.
CRATE = {"server.Dockerfile": "sleap-rtc-server", "worker.Dockerfile": "sleap-rtc"}

errors: list[str] = []


def fail(path: Path, msg: str) -> None:
    errors.append(f"{path.relative_to(ROOT)}: {msg}")


def unpinned(image: str) -> bool:
    """`latest`, or no tag and no digest (which means latest)."""
    if "@sha256:" in image:
        return False
    last = image.rsplit("/", 1)[-1]
    return ":" not in last or last.endswith(":latest")


def exec_form(value: str) -> bool:
    try:
        parsed = json.loads(value)
    except ValueError:
        return False
    return isinstance(parsed, list) and all(isinstance(a, str) for a in parsed)


def check_dockerfile(path: Path) -> None:
    df = DockerfileParser(str(path))
    steps = [s for s in df.structure if s["instruction"] != "COMMENT"]
    # Stages: the instructions after each FROM.
    stages: list[list[dict]] = []
    names: set[str] = set()
    defaults: dict[str, str] = {}
    for s in steps:
        if s["instruction"] == "FROM":
            stages.append([])
            words = s["value"].split()
            if len(words) == 3 and words[1].lower() == "as":
                names.add(words[2])
        elif stages:
            stages[-1].append(s)
        elif s["instruction"] == "ARG":
            name, _, default = s["value"].partition("=")
            defaults[name.strip()] = default.strip()
            if default and unpinned(default) and (path.name, name.strip()) not in LATEST_ALLOWED:
                fail(path, f"ARG {name.strip()} defaults to an unpinned image {default!r}")
    if not stages:
        fail(path, "no FROM")
        return
    for image in df.parent_images:
        if image in names or image == "scratch":
            continue
        if unpinned(image) and not any(
            path.name == f and image == defaults.get(a) for f, a in LATEST_ALLOWED
        ):
            fail(path, f"base image {image!r} is `latest` or untagged: pin a version")
    final = stages[-1]

    users = [s["value"].strip() for s in final if s["instruction"] == "USER"]
    if not users:
        fail(path, "the final stage sets no USER (it would run as root)")
    else:
        uid = users[-1].split(":")[0]
        if not uid.isdigit() or int(uid) == 0:
            fail(path, f"the final stage's USER {users[-1]!r} must be a numeric non-root id")

    for s in final:
        ins, value = s["instruction"], s["value"].strip()
        if ins in ("ENTRYPOINT", "CMD") and not exec_form(value):
            fail(path, f"line {s['startline'] + 1}: {ins} must be in exec form (a JSON array)")
        if ins == "HEALTHCHECK" and value.upper() != "NONE":
            cmd = value[value.find("CMD") + 3 :].strip() if "CMD" in value else ""
            if not exec_form(cmd):
                fail(path, f"line {s['startline'] + 1}: HEALTHCHECK CMD must be in exec form")
    if not any(s["instruction"] == "ENTRYPOINT" for s in final):
        fail(path, "the final stage has no ENTRYPOINT")
    if not any(s["instruction"] == "VOLUME" for s in final):
        fail(path, "the final stage declares no VOLUME for its data")
    if path.name == "server.Dockerfile":
        if not any(s["instruction"] == "HEALTHCHECK" for s in final):
            fail(path, "the server image has no HEALTHCHECK")
        if not any(s["instruction"] == "EXPOSE" and "8080" in s["value"].split() for s in final):
            fail(path, "the server image does not EXPOSE 8080")

    for s in steps:
        if s["instruction"] == "COPY":
            words = [w for w in s["value"].split() if not w.startswith("--chown") and not w.startswith("--chmod")]
            if words and words[0].startswith("--from="):
                stage = words[0].split("=", 1)[1]
                if stage not in names:
                    fail(path, f"line {s['startline'] + 1}: COPY --from={stage}: no such stage")
                continue
            for src in words[:-1]:
                if src.startswith("--"):
                    continue
                if not (ROOT / src).exists():
                    fail(path, f"line {s['startline'] + 1}: COPY source {src!r} does not exist in the repository")
    crate = CRATE.get(path.name)
    builds = [s["value"] for s in steps if s["instruction"] == "RUN" and "cargo build" in s["value"]]
    if crate and not any(f"-p {crate} " in b + " " and "--release" in b and "--locked" in b for b in builds):
        fail(path, f"no `cargo build -p {crate} --release --locked` step")


def docs(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]


def pod_spec(doc: dict) -> dict | None:
    if doc.get("kind") in ("Deployment", "StatefulSet", "Job"):
        return ((doc.get("spec") or {}).get("template") or {}).get("spec")
    return None


def env_of(container: dict) -> dict[str, dict]:
    return {e.get("name"): e for e in container.get("env") or []}


def check_worker(path: Path, spec: dict, c: dict) -> None:
    res = c.get("resources") or {}
    if "nvidia.com/gpu" not in (res.get("limits") or {}):
        fail(path, f"worker {c.get('name')!r} has no nvidia.com/gpu limit")
    env = env_of(c)
    token = (env.get("SLEAP_RTC_TOKEN") or {}).get("valueFrom") or {}
    if "secretKeyRef" not in token:
        fail(path, "SLEAP_RTC_TOKEN must come from a Secret (valueFrom.secretKeyRef)")
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    mounts = c.get("volumeMounts") or []
    data = {
        m["mountPath"]
        for m in mounts
        if m.get("readOnly") and "secret" not in volumes.get(m.get("name"), {}) and m.get("mountPath") != "/dev/shm"
    }
    listed = set(filter(None, ((env.get("SLEAP_RTC_MOUNTS") or {}).get("value") or "").split(":")))
    if listed != data:
        fail(path, f"SLEAP_RTC_MOUNTS lists {sorted(listed)} but the read-only data mounts are {sorted(data)}")
    work = (env.get("SLEAP_RTC_WORK_DIR") or {}).get("value")
    if not work:
        fail(path, "SLEAP_RTC_WORK_DIR is not set")
        return
    under = [m for m in mounts if work == m["mountPath"] or work.startswith(m["mountPath"].rstrip("/") + "/")]
    if not under or "persistentVolumeClaim" not in volumes.get(under[-1].get("name"), {}):
        fail(path, f"the work dir {work} is not on a PersistentVolumeClaim")
    elif under[-1].get("readOnly"):
        fail(path, f"the work dir {work} is on a read-only mount")


def check_server(path: Path, doc: dict, spec: dict, c: dict, pdbs: list[dict]) -> None:
    for probe in ("readinessProbe", "livenessProbe"):
        get = (c.get(probe) or {}).get("httpGet") or {}
        if get.get("path") != "/health":
            fail(path, f"server {probe} must GET /health")
    env = env_of(c)
    if "SLEAP_RTC_REDIS_URL" not in env:
        return
    if int((doc.get("spec") or {}).get("replicas") or 1) < 2:
        fail(path, "a server with Redis should run at least 2 replicas")
    if not str((env.get("SLEAP_RTC_STORE") or {}).get("value", "")).startswith("dynamodb://"):
        fail(path, "instances sharing rooms must share the store: SLEAP_RTC_STORE=dynamodb://...")
    key = (env.get("SLEAP_RTC_JWT_KEY_FILE") or {}).get("value") or ""
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    secret_dirs = [
        m["mountPath"] for m in c.get("volumeMounts") or [] if "secret" in volumes.get(m.get("name"), {})
    ]
    if not any(key.startswith(d.rstrip("/") + "/") for d in secret_dirs):
        fail(path, "SLEAP_RTC_JWT_KEY_FILE must be a file of a mounted Secret (one key for all instances)")
    labels = (((doc.get("spec") or {}).get("selector") or {}).get("matchLabels")) or {}
    if not any(((p.get("spec") or {}).get("selector") or {}).get("matchLabels") == labels for p in pdbs):
        fail(path, "no PodDisruptionBudget selects the server instances")


def check_ingress(path: Path, doc: dict) -> None:
    spec = doc.get("spec") or {}
    if spec.get("ingressClassName") != "nginx":
        return
    ann = (doc.get("metadata") or {}).get("annotations") or {}
    if ann.get("nginx.ingress.kubernetes.io/proxy-http-version") != "1.1":
        fail(path, "nginx ingress: proxy-http-version must be \"1.1\" (WebSocket upgrades)")
    for t in ("proxy-read-timeout", "proxy-send-timeout"):
        v = str(ann.get(f"nginx.ingress.kubernetes.io/{t}", "60"))
        if not v.isdigit() or int(v) < 3600:
            fail(path, f"nginx ingress: {t} is {v} s; idle WebSockets need at least 3600")


def check_k8s(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*.yaml") if p.name != "kustomization.yaml")
    loaded: dict[Path, list[dict]] = {}
    for p in files:
        try:
            loaded[p] = docs(p)
        except (OSError, yaml.YAMLError) as e:
            fail(p, f"cannot read: {e}")
    for k in sorted(directory.rglob("kustomization.yaml")):
        try:
            kd = docs(k)
        except (OSError, yaml.YAMLError) as e:
            fail(k, f"cannot read: {e}")
            continue
        for r in (kd[0] if kd else {}).get("resources") or []:
            if not (k.parent / r).exists():
                fail(k, f"lists {r}, which does not exist")
    for p, ds in loaded.items():
        pdbs = [d for q in loaded if q.parent == p.parent for d in loaded[q] if d.get("kind") == "PodDisruptionBudget"]
        for d in ds:
            if d.get("kind") == "Ingress":
                check_ingress(p, d)
            spec = pod_spec(d)
            if not spec:
                continue
            for c in spec.get("containers") or []:
                image = str(c.get("image", ""))
                if "sleap-rtc-worker" in image:
                    check_worker(p, spec, c)
                elif "sleap-rtc-server" in image:
                    check_server(p, d, spec, c, pdbs)
                elif unpinned(image):
                    fail(p, f"image {image!r} is `latest` or untagged")


def main() -> int:
    dockerfiles = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
    if not dockerfiles:
        errors.append("deploy/docker: no *.Dockerfile found")
    for p in dockerfiles:
        check_dockerfile(p)
    check_k8s(DEPLOY / "k8s")
    for e in errors:
        print(e)
    if errors:
        print(f"{len(errors)} problem(s) in the deployment files")
        return 1
    print(f"deploy/check.py: {len(dockerfiles)} Dockerfiles and the manifests under deploy/k8s follow the rules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
