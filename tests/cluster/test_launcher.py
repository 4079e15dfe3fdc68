"""run_training_job against fake Kubernetes APIs: get-or-create, terminal states, timeout, cancellation."""

from __future__ import annotations

import io
import os
import signal

import pytest

from sdtune.cluster import TrainingJobFailed, TrainingJobTimeout, run_training_job
from sdtune.cluster.jobs import JobSpec, job_name, render_pytorchjob, render_trainjob


class ApiError(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class FakeCustom:
    """Stores custom objects; ``script`` maps a name to the condition types it reports on successive gets."""

    def __init__(self):
        self.objects: dict[str, dict] = {}
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.script: dict[str, list[str]] = {}
        self.race = False

    def _cond(self, name):
        steps = self.script.get(name) or []
        kind = steps.pop(0) if len(steps) > 1 else (steps[0] if steps else None)
        obj = self.objects[name]
        obj["status"] = (
            {"conditions": [{"type": kind, "status": "True", "message": f"{kind} msg"}]} if kind else {}
        )
        return obj

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        if name not in self.objects:
            raise ApiError(404)
        return self._cond(name)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        name = body["metadata"]["name"]
        if self.race:  # another launcher created it between our get and create
            self.objects[name] = dict(body)
            raise ApiError(409)
        self.created.append(name)
        self.objects[name] = dict(body)
        return self._cond(name)

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        self.objects[name]["metadata"].update(body["metadata"])
        return self.objects[name]

    def delete_namespaced_custom_object(
        self, group, version, namespace, plural, name, propagation_policy=None
    ):
        self.deleted.append(name)
        self.objects.pop(name, None)


class FakeCore:
    def __init__(self, exit_code=None, log=b"step 1 loss 0.1\n"):
        self.exit_code, self.log = exit_code, log

    def list_namespaced_pod(self, namespace, label_selector):
        status = {"phase": "Running", "container_statuses": []}
        if self.exit_code is not None:
            status["container_statuses"] = [{"state": {"terminated": {"exit_code": self.exit_code}}}]
        return {"items": [{"metadata": {"name": "master-0"}, "status": status}]}

    def read_namespaced_pod_log(self, name, namespace, follow, _preload_content):
        log = self.log

        class Resp:
            def stream(self):
                yield log

        return Resp()


def _build(kind="trainjob"):
    def build(attempt):
        spec = JobSpec(
            name=job_name("run-1", attempt),
            namespace="ns",
            image="img",
            args=["x.py"],
            run_id="run-1",
            attempt=attempt,
        )
        return render_trainjob(spec) if kind == "trainjob" else render_pytorchjob(spec)

    return build


def _run(custom, core, kind="trainjob", timeout_s=100.0, **kw):
    out = io.StringIO()
    clock = iter(range(0, 10_000, 10))
    result = run_training_job(
        _build(kind),
        custom_api=custom,
        core_api=core,
        timeout_s=timeout_s,
        poll_s=0.01,
        out=out,
        clock=lambda: next(clock),
        sleep=kw.pop("sleep", lambda s: None),
        **kw,
    )
    return result, out.getvalue()


def test_creates_waits_and_streams_logs():
    custom = FakeCustom()
    name = job_name("run-1", 0)
    custom.script[name] = [None, None, "Complete"]
    result, out = _run(custom, FakeCore())
    assert custom.created == [name] and result["metadata"]["name"] == name
    assert "step 1 loss 0.1" in out and "succeeded" in out


def test_pytorchjob_succeeded_condition_counts_as_success():
    custom = FakeCustom()
    custom.script[job_name("run-1", 0)] = [None, "Succeeded"]
    _run(custom, FakeCore(), kind="pytorchjob")


def test_retried_task_attaches_instead_of_duplicating():
    custom = FakeCustom()
    name = job_name("run-1", 0)
    custom.objects[name] = render_trainjob(JobSpec(name=name, namespace="ns", image="img", args=[]))
    custom.script[name] = [None, "Complete"]
    _, out = _run(custom, FakeCore())
    assert custom.created == [] and "attaching" in out


def test_failed_earlier_attempt_starts_the_next_one():
    custom = FakeCustom()
    first, second = job_name("run-1", 0), job_name("run-1", 1)
    custom.objects[first] = {"metadata": {"name": first, "namespace": "ns"}, "kind": "TrainJob"}
    custom.script[first] = ["Failed"]
    custom.script[second] = ["Complete"]
    _run(custom, FakeCore(exit_code=1))
    assert custom.created == [second]


def test_non_retryable_exit_code_is_not_retried():
    custom = FakeCustom()
    first = job_name("run-1", 0)
    custom.objects[first] = {"metadata": {"name": first, "namespace": "ns"}, "kind": "TrainJob"}
    custom.script[first] = ["Failed"]
    with pytest.raises(TrainingJobFailed, match="non-retryable exit code 2"):
        _run(custom, FakeCore(exit_code=2))
    assert custom.created == []


def test_failed_job_raises_with_exit_code():
    custom = FakeCustom()
    custom.script[job_name("run-1", 0)] = [None, "Failed"]
    with pytest.raises(TrainingJobFailed, match=r"master exit code 137"):
        _run(custom, FakeCore(exit_code=137))


def test_timeout_deletes_the_job():
    custom = FakeCustom()
    name = job_name("run-1", 0)
    with pytest.raises(TrainingJobTimeout):
        _run(custom, FakeCore(), timeout_s=50)
    assert custom.deleted == [name]


def test_create_race_attaches_to_the_winner():
    custom = FakeCustom()
    custom.race = True
    custom.script[job_name("run-1", 0)] = ["Complete"]
    result, _ = _run(custom, FakeCore())
    assert result["metadata"]["name"] == job_name("run-1", 0)


def test_sigterm_deletes_the_job():
    custom = FakeCustom()
    name = job_name("run-1", 0)

    def cancelled(_seconds):  # the pipeline run is terminated while we wait
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        _run(custom, FakeCore(), handle_signals=True, sleep=cancelled)
    assert exc.value.code == 128 + signal.SIGTERM
    assert custom.deleted == [name]
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_job_is_owned_by_every_launcher_pod_that_waits_for_it():
    """Created owned by the first launcher pod; a retried launcher (new pod) adds itself, so the job is
    garbage-collected only after the last launcher pod is gone, with or without a cleanup handler."""
    first_pod, second_pod = ("launcher-a", "uid-a"), ("launcher-b", "uid-b")
    custom = FakeCustom()
    name = job_name("run-1", 0)

    def build(attempt):
        spec = JobSpec(name=job_name("run-1", attempt), namespace="ns", image="img", args=[], owner=first_pod)
        return render_trainjob(spec)

    for pod in (first_pod, second_pod):  # the task, then its retry in a new pod
        custom.script[name] = [None, "Complete"]
        run_training_job(
            build,
            custom_api=custom,
            core_api=FakeCore(),
            timeout_s=100,
            poll_s=0.01,
            out=io.StringIO(),
            sleep=lambda s: None,
            owner=pod,
        )
        refs = custom.objects[name]["metadata"]["ownerReferences"]
        assert refs[-1]["uid"] == pod[1] and refs[-1]["kind"] == "Pod"
    assert [r["uid"] for r in refs] == ["uid-a", "uid-b"] and custom.created == [name]
    assert all(r["blockOwnerDeletion"] is False for r in refs)  # needs no rights on the pods
