"""One tenant's long queue cannot hold the trainer's devices: tenants take turns, each
tenant's own jobs keep their order."""

from __future__ import annotations

import datetime as dt

from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from services.trainer.records import QUEUED, RUNNING, DatasetRecord, JobRecord
from tests.trainer.harness import finance_chat_lines
from tests.trainer.test_trainer_backends import postgres, store  # noqa: F401 - fixtures

START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _queue(store, tenant: str, jobs: int, first_second: int) -> list[str]:
    store.insert_dataset(DatasetRecord(f"ds_{tenant}", tenant, "d", "chat", "tiny", 512, 10, 3, 100, "0" * 64,
                                       f"datasets/{tenant}.jsonl", START))
    ids = [f"job_{tenant}_{i}" for i in range(jobs)]
    for i, job_id in enumerate(ids):
        store.insert_job(JobRecord(job_id, tenant, QUEUED, "tiny", f"ds_{tenant}", {"r": 4}, {"seed": 0}, "out", "",
                                   10, START + dt.timedelta(seconds=first_second + i)))
    return ids


def _finish(store, job_id: str) -> None:
    store.transition(job_id, [RUNNING], state="succeeded")


def test_tenants_take_turns_and_each_keeps_its_own_order(store):
    a = _queue(store, "tnt_a", 4, 0)  # queued first, and four of them
    b = _queue(store, "tnt_b", 2, 10)
    c = _queue(store, "tnt_c", 1, 20)
    started = []
    for _ in range(7):  # one device: each job runs to its end before the next is claimed
        job = store.claim_next()
        started.append(job.id)
        _finish(store, job.id)
    assert store.claim_next() is None
    assert started == [a[0], b[0], c[0], a[1], b[1], a[2], a[3]]


def test_with_several_devices_a_tenant_with_nothing_running_goes_first(store):
    a = _queue(store, "tnt_a", 3, 0)
    b = _queue(store, "tnt_b", 1, 10)
    assert [store.claim_next().id, store.claim_next().id] == [a[0], b[0]]
    _finish(store, b[0])
    # b has nothing left; a's jobs keep their order.
    assert [store.claim_next().id, store.claim_next().id, store.claim_next()] == [a[1], a[2], None]


def _started(client, job_id: str) -> tuple[int, int]:
    job = client.wait(job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    return job.started_at.seconds, job.started_at.nanos


def test_a_tenant_queueing_after_another_tenants_backlog_runs_next(new_tenant):
    """The trainer under test has one device: greedy's first job is claimed at once, and the
    other tenant's job, queued after greedy's backlog, is the next to start."""
    greedy, other = new_tenant("greedy"), new_tenant("other")
    greedy_data = greedy.trainer.upload(finance_chat_lines()).id
    other_data = other.trainer.upload(finance_chat_lines("OTHER:")).id
    jobs = [greedy.trainer.start(greedy_data, name=f"g{i}", max_steps=1).id for i in range(3)]
    late = other.trainer.start(other_data, name="o0", max_steps=1).id
    order = sorted([(_started(greedy.trainer, job_id), job_id) for job_id in jobs]
                   + [(_started(other.trainer, late), late)])
    assert [job_id for _, job_id in order] == [jobs[0], late, jobs[1], jobs[2]]
