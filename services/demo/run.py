"""The demo's course: stack, provisioning, training, traffic, checks, then serving.

Exit status: 0 when every check passed (with --once; otherwise after Ctrl-C), 1 when a check
failed or a step could not be done, naming it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator

import grpc

from services.common.stack import ChildDied, Stack, admin_token_of, base_model_folder
from services.demo import checks, report
from services.demo.clients import Channels, Endpoints
from services.demo.config import DemoConfig
from services.demo.customers import CUSTOMERS
from services.demo.nodes import node_stats, wait_for_node
from services.demo.setup import create_tenant, register_base_model, upload_dataset
from services.demo.text import shorten
from services.demo.traffic import adapter_calls, base_calls, foreign_calls, run_concurrently
from services.demo.training import TrainingPlan, train_all

STEPS = 6


class StopRequested(Exception):
    pass


@contextlib.contextmanager
def running_stack(config: DemoConfig) -> Iterator[tuple[Endpoints, str, Stack | None]]:
    """Endpoints, the base model folder as the Trainer sees it, and our Stack (None with --attach)."""
    if config.attach:
        yield (Endpoints(config.registry_address, config.trainer_address, config.router_address,
                         config.openai_base_url, config.admin_token, config.public_router_address,
                         config.public_openai_base_url, config.client_tls), config.base_model_location, None)
        return
    stack = Stack(config)
    try:
        stack.start()
        stack.wait_serving()
        host, scheme = config.host, "http" if config.tls_cert is None else "https"
        endpoints = Endpoints(f"{host}:{config.registry_port}", f"{host}:{config.trainer_port}",
                              f"{host}:{config.router_port}", f"{scheme}://{host}:{config.router_http_port}/v1",
                              admin_token_of(config), client_tls=config.client_tls)
        yield endpoints, str(base_model_folder(config).resolve()), stack
    finally:
        stack.stop()


def pipeline(config: DemoConfig, channels: Channels, base_location: str) -> tuple[bool, list]:
    report.step(2, STEPS, f"Provisioning: base model {config.base_model_name!r}, a tenant + API key and a dataset "
                          "per customer")
    registered = register_base_model(channels, config.base_model_name, base_location)
    print(f"  base model {registered.name} at {registered.location}")
    tenants = [create_tenant(channels, customer) for customer in CUSTOMERS]
    datasets = [upload_dataset(channels, tenant, config.base_model_name) for tenant in tenants]
    for dataset in datasets:
        customer = dataset.tenant.customer
        print(f"  {customer.display_name}: tenant {customer.tenant} ({dataset.tenant.tenant_id}), "
              f"dataset {customer.dataset_path.name} with {dataset.num_examples} examples ({dataset.dataset_id})")

    report.step(3, STEPS, f"Training one LoRA adapter per customer (rank {config.lora_rank}, "
                          f"{config.train_steps} steps each)")
    plan = TrainingPlan(config.base_model_name, config.train_steps, config.learning_rate, config.lora_rank,
                        watch_timeout=config.timeout)
    trained = train_all(channels, datasets, plan)
    results = checks.training_checks(trained)
    if not all(check.passed for check in results):
        return report.checks(results), tenants

    report.step(4, STEPS, "Published to the Registry and deployed")
    for t in trained:
        print(f"  {t.job.deployment_name} -> adapter {t.job.output_adapter_name} v{t.job.adapter_version} "
              f"({t.job.adapter_id}), tenant {t.dataset.tenant.customer.tenant} only")

    report.step(5, STEPS, "Concurrent requests for all three customers through the Router (gRPC + OpenAI HTTP)")
    nodes = wait_for_node(channels, config.base_model_name, config.timeout)
    print(f"  {len(nodes)} inference node(s) serving {config.base_model_name}: "
          f"{', '.join(node.address for node in nodes)}")
    traffic = run_concurrently(channels, adapter_calls(tenants, config.requests_per_customer), config.max_tokens)
    report.answers(traffic)
    bare = run_concurrently(channels, base_calls(tenants, config.base_model_name), config.max_tokens)
    foreign = run_concurrently(channels, foreign_calls(tenants), config.max_tokens)
    print(f"  the base model alone ({config.base_model_name}), same question: "
          f"{bare.answers[0].error or shorten(bare.answers[0].text, 100)}")

    report.step(6, STEPS, "Adapter pool and checks")
    report.pools(node_stats(channels), trained)
    results += (checks.adapter_checks(traffic.answers, trained) + checks.base_checks(bare.answers)
                + checks.isolation_checks(foreign.answers))
    return report.checks(results), tenants


def serve(stack: Stack | None) -> None:
    """Until Ctrl-C / SIGTERM; a service of our own stack dying ends it too."""
    def request_stop(signum, frame):  # noqa: ARG001 - signal handler signature
        raise StopRequested

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    with contextlib.suppress(StopRequested):
        while True:
            if stack is not None and (dead := stack.dead_child()) is not None:
                raise ChildDied(*dead, stack.logs)
            time.sleep(0.5)
    print("stopping ...", flush=True)


def run_demo(config: DemoConfig) -> int:
    # SIGTERM (kill, systemd, `timeout`) ends the demo the way Ctrl-C does, through the
    # KeyboardInterrupt path below, which stops our services: its default action killed this
    # process alone and left the four services running, each in its own session.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    report.step(1, STEPS, "Attaching to the running services" if config.attach else
                f"Starting registry, trainer, inference and router (state in {config.data_dir})")
    try:
        with running_stack(config) as (endpoints, base_location, stack):
            print(f"  router {endpoints.router}, OpenAI API {endpoints.openai_base_url}", flush=True)
            channels = Channels(endpoints)
            try:
                passed, tenants = pipeline(config, channels, base_location)
                if passed and (config.attach or not config.once):  # keys that still work after we return
                    print("\nConnect with:\n")
                    report.connect(endpoints, tenants)
                if not passed or config.once:
                    print(f"\ndemo {'passed' if passed else 'FAILED'}", flush=True)
                    return 0 if passed else 1
                print("\nCtrl-C stops the demo and its services.", flush=True)
                serve(stack)
                return 0
            finally:
                channels.close()
    except KeyboardInterrupt:  # Ctrl-C before serving began: the services are stopped on the way out
        print("\ninterrupted; services stopped", file=sys.stderr, flush=True)
        return 130
    except grpc.RpcError as exc:
        print(f"demo failed: a service answered {exc.code().name}: {exc.details()}", file=sys.stderr, flush=True)
    except (ChildDied, TimeoutError, OSError, ValueError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr, flush=True)
    return 1
