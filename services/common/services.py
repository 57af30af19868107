"""The generated gRPC services of loraplex, one handle each (descriptor, base, add function)."""

from __future__ import annotations

from services.common.pb.loraplex.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common.pb.loraplex.registry.v1 import registry_pb2, registry_pb2_grpc
from services.common.pb.loraplex.router.v1 import nodes_pb2, nodes_pb2_grpc, router_pb2, router_pb2_grpc
from services.common.pb.loraplex.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.placeholder import GrpcService

REGISTRY = GrpcService(registry_pb2.DESCRIPTOR.services_by_name["Registry"],
                       registry_pb2_grpc.RegistryServicer, registry_pb2_grpc.add_RegistryServicer_to_server)
TRAINER = GrpcService(trainer_pb2.DESCRIPTOR.services_by_name["Trainer"],
                      trainer_pb2_grpc.TrainerServicer, trainer_pb2_grpc.add_TrainerServicer_to_server)
ROUTER = GrpcService(router_pb2.DESCRIPTOR.services_by_name["Router"],
                     router_pb2_grpc.RouterServicer, router_pb2_grpc.add_RouterServicer_to_server)
NODES = GrpcService(nodes_pb2.DESCRIPTOR.services_by_name["Nodes"],
                    nodes_pb2_grpc.NodesServicer, nodes_pb2_grpc.add_NodesServicer_to_server)
INFERENCE = GrpcService(inference_pb2.DESCRIPTOR.services_by_name["Inference"],
                        inference_pb2_grpc.InferenceServicer, inference_pb2_grpc.add_InferenceServicer_to_server)

ALL = (REGISTRY, TRAINER, ROUTER, NODES, INFERENCE)
