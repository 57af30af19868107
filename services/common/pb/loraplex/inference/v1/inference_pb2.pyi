import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from services.common.pb.loraplex.common.v1 import generation_pb2 as _generation_pb2
from services.common.pb.loraplex.common.v1 import model_pb2 as _model_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_TIER_UNSPECIFIED: _ClassVar[AdapterTier]
    ADAPTER_TIER_LOADING: _ClassVar[AdapterTier]
    ADAPTER_TIER_DEVICE: _ClassVar[AdapterTier]
    ADAPTER_TIER_HOST: _ClassVar[AdapterTier]
    ADAPTER_TIER_DISK: _ClassVar[AdapterTier]
ADAPTER_TIER_UNSPECIFIED: AdapterTier
ADAPTER_TIER_LOADING: AdapterTier
ADAPTER_TIER_DEVICE: AdapterTier
ADAPTER_TIER_HOST: AdapterTier
ADAPTER_TIER_DISK: AdapterTier

class AdapterRef(_message.Message):
    __slots__ = ("adapter_id", "sha256", "tenant_id")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    sha256: str
    tenant_id: str
    def __init__(self, adapter_id: _Optional[str] = ..., sha256: _Optional[str] = ..., tenant_id: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "adapter", "prompt", "messages", "token_ids", "sampling", "cache_scope")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CACHE_SCOPE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    adapter: AdapterRef
    prompt: str
    messages: _generation_pb2.ChatMessages
    token_ids: _generation_pb2.TokenIds
    sampling: _generation_pb2.SamplingParams
    cache_scope: str
    def __init__(self, request_id: _Optional[str] = ..., adapter: _Optional[_Union[AdapterRef, _Mapping]] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Union[_generation_pb2.ChatMessages, _Mapping]] = ..., token_ids: _Optional[_Union[_generation_pb2.TokenIds, _Mapping]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., cache_scope: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("delta",)
    DELTA_FIELD_NUMBER: _ClassVar[int]
    delta: _generation_pb2.GenerationDelta
    def __init__(self, delta: _Optional[_Union[_generation_pb2.GenerationDelta, _Mapping]] = ...) -> None: ...

class AdapterSlot(_message.Message):
    __slots__ = ("adapter_id", "sha256", "tier", "rank", "pages", "pinned", "active_requests", "last_used", "load_ms", "target_modules")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    sha256: str
    tier: AdapterTier
    rank: int
    pages: int
    pinned: bool
    active_requests: int
    last_used: _timestamp_pb2.Timestamp
    load_ms: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, adapter_id: _Optional[str] = ..., sha256: _Optional[str] = ..., tier: _Optional[_Union[AdapterTier, str]] = ..., rank: _Optional[int] = ..., pages: _Optional[int] = ..., pinned: _Optional[bool] = ..., active_requests: _Optional[int] = ..., last_used: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., load_ms: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "pin", "host_only", "sha256")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    HOST_ONLY_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    pin: bool
    host_only: bool
    sha256: str
    def __init__(self, adapter_id: _Optional[str] = ..., pin: _Optional[bool] = ..., host_only: _Optional[bool] = ..., sha256: _Optional[str] = ...) -> None: ...

class EvictAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "all_tiers", "unpin")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    ALL_TIERS_FIELD_NUMBER: _ClassVar[int]
    UNPIN_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    all_tiers: bool
    unpin: bool
    def __init__(self, adapter_id: _Optional[str] = ..., all_tiers: _Optional[bool] = ..., unpin: _Optional[bool] = ...) -> None: ...

class EvictAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PoolUsage(_message.Message):
    __slots__ = ("pages_total", "pages_used", "pages_free", "host_bytes_used", "host_bytes_total")
    PAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAGES_USED_FIELD_NUMBER: _ClassVar[int]
    PAGES_FREE_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    pages_total: int
    pages_used: int
    pages_free: int
    host_bytes_used: int
    host_bytes_total: int
    def __init__(self, pages_total: _Optional[int] = ..., pages_used: _Optional[int] = ..., pages_free: _Optional[int] = ..., host_bytes_used: _Optional[int] = ..., host_bytes_total: _Optional[int] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "pool")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterSlot]
    pool: PoolUsage
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterSlot, _Mapping]]] = ..., pool: _Optional[_Union[PoolUsage, _Mapping]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Stats(_message.Message):
    __slots__ = ("running_requests", "waiting_requests", "kv_blocks_used", "kv_blocks_total", "resident_adapters", "pool", "adapter_hits", "adapter_misses", "adapter_loads", "adapter_evictions", "adapter_load_ms_mean", "adapter_load_ms_p99", "requests_finished", "prompt_tokens_total", "generated_tokens_total", "preemptions", "generation_tokens_per_second", "resident_adapter_ids", "graph_steps", "eager_steps", "prompt_tokens_cached", "prompt_tokens_computed", "prefix_cache_hit_rate", "kv_blocks_cached", "adapter_fetches")
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_HITS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_MISSES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_LOADS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_LOAD_MS_MEAN_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_LOAD_MS_P99_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FINISHED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_ADAPTER_IDS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_STEPS_FIELD_NUMBER: _ClassVar[int]
    EAGER_STEPS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_CACHED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FETCHES_FIELD_NUMBER: _ClassVar[int]
    running_requests: int
    waiting_requests: int
    kv_blocks_used: int
    kv_blocks_total: int
    resident_adapters: int
    pool: PoolUsage
    adapter_hits: int
    adapter_misses: int
    adapter_loads: int
    adapter_evictions: int
    adapter_load_ms_mean: float
    adapter_load_ms_p99: float
    requests_finished: int
    prompt_tokens_total: int
    generated_tokens_total: int
    preemptions: int
    generation_tokens_per_second: float
    resident_adapter_ids: _containers.RepeatedScalarFieldContainer[str]
    graph_steps: int
    eager_steps: int
    prompt_tokens_cached: int
    prompt_tokens_computed: int
    prefix_cache_hit_rate: float
    kv_blocks_cached: int
    adapter_fetches: int
    def __init__(self, running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., resident_adapters: _Optional[int] = ..., pool: _Optional[_Union[PoolUsage, _Mapping]] = ..., adapter_hits: _Optional[int] = ..., adapter_misses: _Optional[int] = ..., adapter_loads: _Optional[int] = ..., adapter_evictions: _Optional[int] = ..., adapter_load_ms_mean: _Optional[float] = ..., adapter_load_ms_p99: _Optional[float] = ..., requests_finished: _Optional[int] = ..., prompt_tokens_total: _Optional[int] = ..., generated_tokens_total: _Optional[int] = ..., preemptions: _Optional[int] = ..., generation_tokens_per_second: _Optional[float] = ..., resident_adapter_ids: _Optional[_Iterable[str]] = ..., graph_steps: _Optional[int] = ..., eager_steps: _Optional[int] = ..., prompt_tokens_cached: _Optional[int] = ..., prompt_tokens_computed: _Optional[int] = ..., prefix_cache_hit_rate: _Optional[float] = ..., kv_blocks_cached: _Optional[int] = ..., adapter_fetches: _Optional[int] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("node_id", "base_model", "fingerprint", "dtype", "device", "max_context", "kv_block_size", "max_batch_tokens", "adapter_pool_pages", "max_adapter_rank", "version", "kernels", "cuda_graphs", "prefill_lora", "decode_lora")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_POOL_PAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTER_RANK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KERNELS_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_LORA_FIELD_NUMBER: _ClassVar[int]
    DECODE_LORA_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    base_model: str
    fingerprint: _model_pb2.ArchitectureFingerprint
    dtype: str
    device: str
    max_context: int
    kv_block_size: int
    max_batch_tokens: int
    adapter_pool_pages: int
    max_adapter_rank: int
    version: str
    kernels: str
    cuda_graphs: str
    prefill_lora: str
    decode_lora: str
    def __init__(self, node_id: _Optional[str] = ..., base_model: _Optional[str] = ..., fingerprint: _Optional[_Union[_model_pb2.ArchitectureFingerprint, _Mapping]] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., max_context: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., adapter_pool_pages: _Optional[int] = ..., max_adapter_rank: _Optional[int] = ..., version: _Optional[str] = ..., kernels: _Optional[str] = ..., cuda_graphs: _Optional[str] = ..., prefill_lora: _Optional[str] = ..., decode_lora: _Optional[str] = ...) -> None: ...
