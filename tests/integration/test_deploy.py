"""deploy/kubernetes/: every object validates against the Kubernetes API's schemas
(kubernetes-validate, strict: unknown fields are errors), and the pods the manifests declare,
run as local processes with exactly their command lines, env and probes, train the job."""

from __future__ import annotations

import copy
import secrets

import kubernetes_validate
import pytest

from .deploy import KUBERNETES, LocalCluster, manifests

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# The oldest Kubernetes these manifests are for (backoffLimitPerIndex is beta from 1.29, on by
# default; GA in 1.33) and the newest the validator knows.
VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
ROWS = 456  # examples/breast_cancer/train.csv


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version):
    docs = manifests()
    kinds = sorted(doc["kind"] for _, doc in docs)
    assert kinds == ["ConfigMap", "Deployment", "Job", "Job", "PersistentVolumeClaim", "Service", "Service", "StatefulSet"]
    for path, doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises with the field's path


def test_the_validator_refuses_a_misspelt_field_and_a_wrong_type():
    (deployment,) = [doc for _, doc in manifests() if doc["kind"] == "Deployment"]
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["replica"] = 1
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSeconds"] = "5s"
    for bad in (misspelt, wrong):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, VERSIONS[0], strict=True)


def test_the_job_s_settings_agree_with_the_workloads(tmp_path):
    cluster = LocalCluster(tmp_path, {"psctl-secret": {"secret": "x"}})
    workers = [p for p in cluster.pods if p.workload == "Job/psctl-workers"]
    shards = [p for p in cluster.pods if p.workload == "StatefulSet/psctl-shard"]
    (driver,) = [p for p in cluster.pods if p.workload == "Job/psctl-train"]
    assert int(driver.env["PSCTL_WORKERS"]) == len(workers) and driver.env["PSCTL_LOCAL_WORKERS"] == "0"
    assert int(driver.env["PSCTL_MIN_SHARDS"]) == len(shards)
    assert sorted(p.env["JOB_COMPLETION_INDEX"] for p in workers) == [str(i) for i in range(len(workers))]
    for pod in cluster.pods:
        template = cluster._template(pod)["spec"]
        assert template["enableServiceLinks"] is False, pod.name  # PSCTL_*_PORT=tcp://... would be refused
        assert template["securityContext"]["runAsNonRoot"] is True and "resources" in pod.container, pod.name
    assert (KUBERNETES / "storage.yaml").exists()


def test_the_manifests_pods_train_the_job_as_local_processes(tmp_path):
    cluster = LocalCluster(tmp_path, {"psctl-secret": {"secret": secrets.token_hex(32)}})
    by_workload: dict[str, list] = {}
    for pod in cluster.pods:
        by_workload.setdefault(pod.workload, []).append(pod)
    (coordinator,) = by_workload["Deployment/psctl-coordinator"]
    shards = by_workload["StatefulSet/psctl-shard"]
    workers = by_workload["Job/psctl-workers"]
    (driver,) = by_workload["Job/psctl-train"]
    # As on a cluster, every pod starts at once: the roles wait for the coordinator (and the
    # driver for both shards) by themselves.
    for pod in cluster.pods:
        cluster.start(pod)
    try:
        out, err = driver.proc.communicate(timeout=90)
        assert driver.proc.returncode == 0, err
        assert f"rows trained: {ROWS * int(driver.env['PSCTL_EPOCHS'])}" in out, out
        assert "model written to" in out and (tmp_path / "pvc" / "psctl-shared" / "model.npz").is_file(), out
        for pod in workers:
            w_out, w_err = pod.proc.communicate(timeout=30)
            assert pod.proc.returncode == 0, (pod.name, w_err)
            assert "worker done:" in w_out, w_out
        # The probes, run as the kubelet runs them: all pass on the running cluster.
        probes = [(pod, kind) for pod in [coordinator, *shards] for kind in ("readinessProbe", "livenessProbe")]
        results = cluster.run_probes(probes)
        for (pod, kind), (code, _, err) in zip(probes, results):
            assert code == 0, (pod.name, kind, err)
        assert "2 shards registered" in results[0][1], results[0]
    except BaseException:
        # What every pod said is the only clue to a failure here (a coordinator that never
        # listened, a shard that could not register): pytest shows this with the failure.
        outputs = cluster.stop("Job/psctl-train", "Job/psctl-workers", "StatefulSet/psctl-shard")
        for name, (code, out, err) in outputs.items():
            print(f"--- {name}: exit {code}\n{(out or '')[-2000:]}\n{(err or '')[-4000:]}")
        raise
    outputs = cluster.stop("Job/psctl-train", "Job/psctl-workers", "StatefulSet/psctl-shard")
    for pod in [coordinator, *shards]:
        code, _, err = outputs[pod.name]
        assert code == 0 and "Traceback" not in err, (pod.name, code, err)
