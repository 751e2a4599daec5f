"""Read deploy/kubernetes/ and deploy/Dockerfile as Kubernetes would, and turn every pod they
declare into a local process: the image's ENTRYPOINT plus the container's command and args,
its env (values, $(VAR) references, fieldRef, secretKeyRef, configMapKeyRef, envFrom) and
its exec probes, exactly as written, with only the network and the file system mapped.

The mapping is what a cluster supplies and one machine does not:
- DNS: a Service's name, a StatefulSet pod's ``NAME-i.SERVICE`` name and a pod's own
  127.0.0.1 become 127.0.0.1, and each pod's containerPorts become free local ports
  (a HOST:PORT reaching a Service goes to the selected pod's mapped targetPort);
- volumes: a mountPath becomes a folder of the test's (one per PersistentVolumeClaim,
  shared by every pod that mounts it; one per pod for an emptyDir), and the image's
  WORKDIR is this repository (the Dockerfile copies it there).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..conftest import REPO

DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
WORKLOADS = ("Deployment", "StatefulSet", "Job")


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every object in deploy/kubernetes/*.yaml, with its file."""
    out = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        out += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return out


def image() -> tuple[list[str], str]:
    """The Dockerfile's ENTRYPOINT (exec form) and WORKDIR."""
    entrypoint, workdir = None, "/"
    for line in DOCKERFILE.read_text().splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif word == "WORKDIR":
            workdir = rest.strip()
    assert entrypoint, "deploy/Dockerfile has no ENTRYPOINT in exec form"
    return entrypoint, workdir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Pod:
    """One pod of a workload, as a process to run."""

    workload: str  # e.g. StatefulSet/psctl-shard
    name: str  # the pod's name (a StatefulSet's NAME-i)
    labels: dict[str, str]
    container: dict[str, Any]
    ports: dict[int | str, int] = field(default_factory=dict)  # containerPort (number and name) -> local port
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    def probe(self, kind: str) -> list[str] | None:
        probe = self.container.get(kind)
        return None if probe is None else probe["exec"]["command"]


class LocalCluster:
    """The manifests' pods as local processes (see the module's docstring for what is mapped)."""

    def __init__(self, folder: Path, secrets: dict[str, dict[str, str]]):
        self.folder = folder
        self.secrets = secrets
        self.docs = [doc for _, doc in manifests()]
        self.entrypoint, self.workdir = image()
        self.config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in self.docs if d["kind"] == "ConfigMap"}
        self.services = {d["metadata"]["name"]: d for d in self.docs if d["kind"] == "Service"}
        self.pods = [pod for d in self.docs if d["kind"] in WORKLOADS for pod in self._pods(d)]
        for pod in self.pods:
            pod.ports = {}
            for port in pod.container.get("ports", []):
                local = free_port()
                pod.ports[port["containerPort"]] = local
                if "name" in port:
                    pod.ports[port["name"]] = local
        for pod in self.pods:
            pod.env = self._env(pod)
            pod.argv = self._argv(pod)

    def _pods(self, workload: dict[str, Any]) -> list[Pod]:
        name, spec = workload["metadata"]["name"], workload["spec"]
        template = spec["template"]
        (container,) = template["spec"]["containers"]  # one container a pod
        labels = template["metadata"].get("labels", {})
        if workload["kind"] == "Job":
            count = spec.get("completions", 1)
            # A psctl job needs all its workers at once: pods run one after another would wait forever.
            assert spec.get("parallelism", 1) >= count, f"Job {name} runs {spec.get('parallelism', 1)} of its {count} pods at once"
            indexed = spec.get("completionMode") == "Indexed"
            return [Pod(f"Job/{name}", f"{name}-{i}", labels, container, env={"JOB_COMPLETION_INDEX": str(i)} if indexed else {})
                    for i in range(count)]  # fmt: skip
        return [Pod(f"{workload['kind']}/{name}", f"{name}-{i}", labels, container) for i in range(spec.get("replicas", 1))]

    # -- the mapping ---------------------------------------------------------------------
    def _service_pods(self, service: str) -> list[Pod]:
        selector = self.services[service]["spec"]["selector"]
        return [p for p in self.pods if all(p.labels.get(k) == v for k, v in selector.items())]

    def _service_port(self, service: str, port: int, pod: Pod) -> int:
        (entry,) = [p for p in self.services[service]["spec"]["ports"] if p["port"] == port]
        target = entry.get("targetPort", port)
        assert target in pod.ports, f"Service {service} sends port {port} to {target!r}, which pod {pod.name} does not declare"
        return pod.ports[target]

    def address(self, host: str, port: int, pod: Pod) -> str:
        """A HOST:PORT as seen from ``pod``, on loopback."""
        if host in ("127.0.0.1", "localhost"):
            return f"127.0.0.1:{pod.ports[port]}"
        if host in self.services:
            (target,) = self._service_pods(host) or [None]
            assert target is not None, f"Service {host} selects no pod"
            return f"127.0.0.1:{self._service_port(host, port, target)}"
        name, _, service = host.partition(".")
        target = next((p for p in self._service_pods(service) if p.name == name), None) if service in self.services else None
        assert target is not None, f"{pod.name} dials {host}:{port}, which names no Service or pod of the manifests"
        return f"127.0.0.1:{self._service_port(service, port, target)}"

    def local(self, value: str, pod: Pod) -> str:
        """``value`` with the cluster's names, ports and paths replaced by this machine's."""
        if value.isdigit() and int(value) in pod.ports:
            return str(pod.ports[int(value)])
        value = re.sub(r"([A-Za-z0-9.-]+):(\d+)", lambda m: self.address(m.group(1), int(m.group(2)), pod), value)
        if value == f"{pod.name}.{value.partition('.')[2]}" and value.partition(".")[2] in self.services:
            return "127.0.0.1"  # a pod's own DNS name (what it advertises)
        for mount, folder in self._mounts(pod).items():
            if value == mount or value.startswith(mount + "/"):
                return str(folder) + value[len(mount):]
        if value == self.workdir or value.startswith(self.workdir.rstrip("/") + "/"):
            return str(REPO) + value[len(self.workdir.rstrip("/")):]
        return value

    def _mounts(self, pod: Pod) -> dict[str, Path]:
        volumes = {}
        template_volumes = {v["name"]: v for v in self._template(pod)["spec"].get("volumes", [])}
        for mount in pod.container.get("volumeMounts", []):
            volume = template_volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                folder = self.folder / "pvc" / volume["persistentVolumeClaim"]["claimName"]
            else:
                assert "emptyDir" in volume, f"volume {mount['name']} of {pod.name}: only PVCs and emptyDirs are mapped"
                folder = self.folder / "emptydir" / pod.name / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            volumes[mount["mountPath"]] = folder
        return volumes

    def _template(self, pod: Pod) -> dict[str, Any]:
        kind, name = pod.workload.split("/")
        return next(d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name)["spec"]["template"]

    # -- a pod's process ------------------------------------------------------------------
    def _env(self, pod: Pod) -> dict[str, str]:
        """The container's variables as the kubelet sets them: envFrom first, then env in order,
        each $(VAR) expanded from the variables before it."""
        env = dict(pod.env)  # JOB_COMPLETION_INDEX, as the Job controller sets it
        for source in pod.container.get("envFrom", []):
            env.update(self.config_maps[source["configMapRef"]["name"]])
        for var in pod.container.get("env", []):
            if "value" in var:
                env[var["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
                continue
            ref = var["valueFrom"]
            if "fieldRef" in ref:
                assert ref["fieldRef"]["fieldPath"] == "metadata.name", ref
                env[var["name"]] = pod.name
            elif "secretKeyRef" in ref:
                env[var["name"]] = self.secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
            else:
                env[var["name"]] = self.config_maps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
        return {k: self.local(v, pod) for k, v in env.items()}

    def command(self, words: list[str]) -> list[str]:
        """A container's command line: ``psctl`` is this repository's, run by this Python."""
        return [sys.executable, "-m", "psctl", *words[1:]] if words and words[0] == "psctl" else list(words)

    def _argv(self, pod: Pod) -> list[str]:
        words = pod.container.get("command", self.entrypoint) + pod.container.get("args", [])
        # The container's words are mapped, then psctl is swapped for this Python: mapped after,
        # the interpreter's own path would be taken for a mount when it lies under one (/tmp).
        return self.command([self.local(w, pod) for w in words])

    def process_env(self, pod: Pod) -> dict[str, str]:
        """Only what the container would have, plus what runs this repository's psctl here."""
        tmp = self._mounts(pod).get("/tmp")
        base = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "HOME": str(self.folder)}
        return {**base, **({"TMPDIR": str(tmp)} if tmp else {}), **pod.env}

    def start(self, pod: Pod) -> None:
        pod.proc = subprocess.Popen(pod.argv, env=self.process_env(pod), cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def run_probes(self, probes: list[tuple[Pod, str]], timeout_s: float = 60) -> list[tuple[int, str, str]]:
        """Exec each (pod, readinessProbe or livenessProbe) at once, as the kubelet would; (code, stdout, stderr) each."""
        procs = []
        for pod, kind in probes:
            words = pod.probe(kind)
            assert words is not None, f"{pod.name} has no {kind}"
            argv = self.command([self.local(w, pod) for w in words])
            procs.append(subprocess.Popen(argv, env=self.process_env(pod), cwd=REPO,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=timeout_s)
            results.append((proc.returncode, out, err))
        return results

    def stop(self, *order: str, timeout_s: float = 20) -> dict[str, tuple[int | None, str, str]]:
        """SIGTERM the processes still running, as the kubelet does, workload by workload in
        ``order`` (the rest last), and collect each one's output. (A shard whose coordinator
        stopped first is already exiting; a SIGTERM then would kill it outright.)"""
        rank = {w: i for i, w in enumerate(order)}
        groups: dict[int, list[Pod]] = {}
        for pod in self.pods:
            groups.setdefault(rank.get(pod.workload, len(order)), []).append(pod)
        outputs = {}
        for _, pods in sorted(groups.items()):
            for pod in pods:
                if pod.proc is not None and pod.proc.poll() is None:
                    pod.proc.terminate()
            for pod in pods:
                if pod.proc is None:
                    continue
                try:
                    out, err = pod.proc.communicate(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    pod.proc.kill()
                    out, err = pod.proc.communicate(timeout=10)
                outputs[pod.name] = (pod.proc.returncode, out, err)
        return outputs
