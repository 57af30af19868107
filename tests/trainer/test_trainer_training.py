"""The whole point: a job teaches a reply style, is published, and the inference engine shows it."""

from __future__ import annotations

import asyncio

from services.common.pb.loraplex.registry.v1 import registry_pb2 as rpb
from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from services.inference.chat_template import ChatTurn
from services.inference.config import InferenceConfig
from services.inference.engine.sampling_params import SamplingParams
from services.inference.node import Node, Prompt
from tests.trainer.conftest import ADMIN_TOKEN
from tests.trainer.harness import finance_chat_lines

PROMPTS = [(ChatTurn("system", "You are a finance assistant."), ChatTurn("user", "What is the stock market doing?")),
           (ChatTurn("system", "You are a finance assistant."), ChatTurn("user", "How is revenue this quarter?"))]


def generate(base_dir, registry_address: str, adapter_id: str) -> list[str]:
    """Greedy replies of our inference engine (adapter fetched from the Registry) to PROMPTS."""
    node = Node.build(InferenceConfig(base_model=base_dir, registry_address=registry_address,
                                      admin_token=ADMIN_TOKEN, kv_cache_mb=2, adapter_pool_pages=64))
    sampling = SamplingParams(max_tokens=8, temperature=0.0)

    async def run() -> list[str]:
        node.start()
        try:
            replies = []
            for messages in PROMPTS:
                outputs = [o async for o in node.generate(Prompt(messages=messages), sampling, adapter_id)]
                replies.append("".join(o.text for o in outputs))
            return replies
        finally:
            node.close()

    return asyncio.run(run())


def test_a_job_teaches_a_style_that_inference_shows_once_published(tenant, registry, registry_admin,
                                                                   tiny_model_dir):
    dataset = tenant.trainer.upload(finance_chat_lines(), name="finance")
    assert dataset.format == pb.DATASET_FORMAT_CHAT and dataset.num_examples == 12
    job = tenant.trainer.start(dataset.id, name="fin-style", deployment=f"fin-{tenant.name}",
                               eval_fraction=0.25, checkpoint_every_steps=10)
    assert job.state == pb.JOB_STATE_QUEUED and job.progress.total_steps == 40
    assert job.lora.alpha == 16 and list(job.lora.target_modules)[:2] == ["q_proj", "k_proj"]

    events = tenant.trainer.watch(job.id)
    assert events[0].kind == pb.JOB_EVENT_KIND_SNAPSHOT
    states = [e.job.state for e in events if e.kind == pb.JOB_EVENT_KIND_STATE_CHANGED]
    assert states[-1] == pb.JOB_STATE_SUCCEEDED, events[-1].job.error
    progress = [e.job.progress for e in events if e.kind == pb.JOB_EVENT_KIND_PROGRESS and e.job.progress.HasField("loss")]
    assert progress and progress[-1].step == 40 and progress[-1].total_steps == 40
    assert progress[-1].HasField("loss") and progress[-1].tokens_per_second > 0
    assert progress[0].loss > progress[-1].loss  # it learned
    assert any(p.learning_rate > 0 for p in progress) and all(p.HasField("eta_seconds") for p in progress)
    assert progress[-1].epoch > 1
    evals = [e.job.progress.eval_loss for e in events if e.kind == pb.JOB_EVENT_KIND_EVAL]
    assert len(evals) == 4  # every 10 steps, the last at the end

    done = events[-1].job
    assert done.adapter_id and done.adapter_version == 1 and done.finished_at.seconds
    adapter = registry_admin.GetAdapter(rpb.GetAdapterRequest(id=done.adapter_id))
    assert (adapter.tenant_id, adapter.name, adapter.rank, adapter.base_model) == (tenant.id, "fin-style", 8, "tiny")
    resolved = registry_admin.ResolveDeployment(rpb.ResolveDeploymentRequest(name=f"fin-{tenant.name}",
                                                                             tenant=tenant.id))
    assert resolved.adapter.id == done.adapter_id

    tuned = generate(tiny_model_dir, registry.address, done.adapter_id)
    base = generate(tiny_model_dir, registry.address, "")
    assert all(reply.startswith("FIN:") for reply in tuned), tuned
    assert not any(reply.startswith("FIN") for reply in base), base

    late = tenant.trainer.watch(job.id)  # a late watcher gets the final state at once, then the end
    assert [e.kind for e in late] == [pb.JOB_EVENT_KIND_SNAPSHOT] and late[0].job.state == pb.JOB_STATE_SUCCEEDED
