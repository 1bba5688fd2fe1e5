"""A task's TES state reads the same whether it is shown (Python) or filtered on (SQL)."""

from __future__ import annotations

from pathlib import Path

from dmi_service_manager.jobs.model import Failure, JobStatus, Kind, StopReason, error_results
from dmi_service_manager.jobs.store import NewJob, Store, TaskFilter
from dmi_service_manager.tes.states import STATES, state_of


def test_every_state_filter_finds_exactly_the_tasks_shown_in_that_state(tmp_path: Path) -> None:
    store = Store(tmp_path / "jobs.db")
    store.migrate()

    def task(name: str) -> int:
        return store.create(NewJob(jobtype="tes", kind=Kind.TES, details={}, timeout=60, task_id=name,
                                   name=name)).id

    task("queued")
    store.claim(task("initializing"), [])
    running = task("running")
    store.claim(running, [])
    store.mark_running(running, container_id="c1", gpu_ids=[], details={})
    timing_out = task("timing-out")
    store.claim(timing_out, [])
    store.mark_running(timing_out, container_id="c2", gpu_ids=[], details={})
    store.request_stop(timing_out, StopReason.TIMEOUT, "too long")
    cancelling = task("canceling")
    store.claim(cancelling, [])
    store.mark_running(cancelling, container_id="c3", gpu_ids=[], details={})
    store.request_stop(cancelling, StopReason.CANCEL, "by someone")
    store.request_stop(task("canceling-while-queued"), StopReason.CANCEL, "by someone")
    store.finish(task("complete"), JobStatus.COMPLETE, {"returncode": 0, "error": ""})
    for failure in Failure:
        store.finish(task(f"ended-{failure.value}"), JobStatus.ERROR, error_results("x"), failure=failure)
    store.finish(task("ended-without-a-kind"), JobStatus.ERROR, error_results("x"))
    store.create(NewJob(jobtype="/api/fake_local", details={}, timeout=60, service="fake", mode="local"))

    everything = store.tasks(TaskFilter(), before=None, limit=1000, minimal=False)
    shown = {job.task_id: state_of(job) for job in everything}
    assert len(shown) == 8 + len(Failure)  # the 4CAT job is not a task
    assert shown["queued"] == "QUEUED" and shown["initializing"] == "INITIALIZING"
    assert shown["running"] == shown["timing-out"] == "RUNNING"
    assert shown["canceling"] == shown["canceling-while-queued"] == "CANCELING"
    assert shown["ended-exit_code"] == shown["ended-oom"] == shown["ended-gpu_oom"] == "EXECUTOR_ERROR"
    assert shown["ended-cancel"] == shown["ended-abandoned"] == "CANCELED"
    assert shown["ended-timeout"] == shown["ended-engine"] == shown["ended-without-a-kind"] == "SYSTEM_ERROR"
    for state in STATES:
        filtered = {job.task_id for job in store.tasks(TaskFilter(state=state), before=None, limit=1000,
                                                        minimal=True)}
        assert filtered == {name for name, seen in shown.items() if seen == state}, state
        minimal = store.tasks(TaskFilter(state=state), before=None, limit=1000, minimal=True)
        assert all(state_of(job) == state for job in minimal), state  # the light rows carry enough
