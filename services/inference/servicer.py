"""Inference gRPC servicer: protobuf in -> Node call -> protobuf out. No logic of its own."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from services.common.auth import require_admin
from services.common.errors import InvalidArgument, Unavailable
from services.common.pb.loraplex.common.v1 import generation_pb2, model_pb2
from services.common.pb.loraplex.inference.v1 import inference_pb2, inference_pb2_grpc
from services.inference.chat_template import ChatTurn, ToolCall
from services.inference.engine.llm_engine import RequestOutput
from services.inference.engine.sampling_params import ANY_JSON_OBJECT, SamplingParams
from services.inference.engine.sequence import FinishReason
from services.inference.node import Node, Prompt
from services.inference.pool_admin import PoolAdmin
from services.common.reasoning_text import ReasoningTokens
from services.inference.reasoning_format import reasoning_start as reasoning_start_of
from services.inference.token_bytes import TokenBytes, special_token_ids

FINISH = {FinishReason.STOP: generation_pb2.FINISH_REASON_STOP, FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH}


def prompt_from(request: inference_pb2.GenerateRequest) -> Prompt:
    """Views of the request's fields, not copies: copying 30 million token ids or 8 million
    chat turns (a 64 MB request) here held the event loop, and every stream, for seconds,
    before the node could refuse them by their count (Node.encode, off the loop)."""
    kind = request.WhichOneof("input")
    if kind == "prompt":
        return Prompt(text=request.prompt)
    if kind == "messages":
        return Prompt(messages=_Turns(request.messages.messages), tools_json=request.messages.tools_json,
                      template_kwargs_json=request.messages.template_kwargs_json)
    if kind == "token_ids":
        return Prompt(token_ids=request.token_ids.ids)
    raise InvalidArgument("set one of prompt, messages or token_ids", field="input")


class _Turns(Sequence):
    """ChatMessages as the ChatTurns Prompt holds, read one by one on demand."""

    def __init__(self, messages) -> None:
        self._messages = messages

    def __len__(self) -> int:
        return len(self._messages)

    def __getitem__(self, index: int) -> ChatTurn:
        message = self._messages[index]
        return ChatTurn(message.role, message.content, tuple(ToolCall(call.id, call.name, call.arguments)
                                                             for call in message.tool_calls), message.tool_call_id)


def sampling_from(params: generation_pb2.SamplingParams) -> SamplingParams:
    def optional(name):
        return getattr(params, name) if params.HasField(name) else None

    return SamplingParams.from_request(
        max_tokens=optional("max_tokens"), temperature=optional("temperature"), top_p=optional("top_p"),
        top_k=optional("top_k"), seed=optional("seed"), stop=tuple(params.stop), logprobs=params.logprobs,
        top_logprobs=params.top_logprobs, ignore_eos=params.ignore_eos, until_context_full=params.until_context_full,
        presence_penalty=optional("presence_penalty"), frequency_penalty=optional("frequency_penalty"),
        repetition_penalty=optional("repetition_penalty"), logit_bias=params.logit_bias,
        json_schema=_json_schema(params.structured_output))


def _json_schema(structured: generation_pb2.StructuredOutput) -> str | None:
    """The schema the output must match (json_object: any object); None for free text."""
    kind = structured.WhichOneof("kind")
    if kind == "json_schema":
        return structured.json_schema
    return ANY_JSON_OBJECT if kind == "json_object" and structured.json_object else None


def delta_from(output: RequestOutput, tokenizer, token_bytes: TokenBytes,
               special: frozenset[int]) -> generation_pb2.GenerationDelta:
    """`special`: the ids the text leaves out, marked so the router's text offsets skip them."""
    delta = generation_pb2.GenerationDelta(text=output.text, token_ids=output.token_ids)
    for sampled in output.logprobs:
        entry = delta.logprobs.add(token_id=sampled.token_id, token=tokenizer.decode([sampled.token_id]),
                                   logprob=sampled.logprob or 0.0, token_bytes=token_bytes(sampled.token_id),
                                   special=sampled.token_id in special)
        for token_id, logprob in sampled.top:
            entry.top.add(token_id=token_id, token=tokenizer.decode([token_id]), logprob=logprob,
                          token_bytes=token_bytes(token_id))
    if output.finish_reason is not None:
        delta.finish_reason = FINISH.get(output.finish_reason, generation_pb2.FINISH_REASON_UNSPECIFIED)
        delta.matched_stop = output.matched_stop or ""
        delta.usage.prompt_tokens = output.prompt_tokens
        delta.usage.completion_tokens = output.completion_tokens
        delta.usage.total_tokens = output.prompt_tokens + output.completion_tokens
        delta.usage.cached_prompt_tokens = output.cached_prompt_tokens
    return delta


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """Registered before the model has loaded; answers UNAVAILABLE until `ready`.

    Every RPC needs the admin token when the node has one: the node runs any tenant's adapter
    by id and pins or evicts adapters, so a caller reaching it directly would otherwise bypass
    the Router's tenant checks and quotas."""

    def __init__(self, admin_token: str = "") -> None:
        self._admin_token = admin_token
        self._node: Node | None = None
        self._admin: PoolAdmin | None = None
        self._token_bytes: TokenBytes | None = None
        self._special: frozenset[int] = frozenset()

    def ready(self, node: Node, admin: PoolAdmin) -> None:
        self._node, self._admin = node, admin
        self._token_bytes = TokenBytes(node.tokenizer)
        self._special = special_token_ids(node.tokenizer)  # once: the tokenizer's lists are rebuilt per call

    def _authorize(self, context) -> None:
        require_admin(self._admin_token, context, "inference node")

    @property
    def node(self) -> Node:
        if self._node is None:
            raise Unavailable("the inference node is still loading its model; retry shortly")
        return self._node

    @property
    def admin(self) -> PoolAdmin:
        self.node  # noqa: B018 - raises while loading
        return self._admin

    async def Generate(self, request, context):
        self._authorize(context)
        chat = request.WhichOneof("input") == "messages"
        reasoning_start = ""
        thinking = None  # ReasoningTokens, once the prompt says the model thinks

        def on_prompt(token_ids: list[int]) -> None:
            nonlocal reasoning_start, thinking
            if chat and self.node.reasoning_format:
                reasoning_start = reasoning_start_of(self.node.tokenizer, token_ids)
                thinking = ReasoningTokens(reasoning_start)

        outputs = self.node.generate(prompt_from(request), sampling_from(request.sampling),
                                     request.adapter.adapter_id, request.adapter.sha256, request.request_id,
                                     request.cache_scope, on_prompt)
        first = True
        async for output in outputs:
            delta = delta_from(output, self.node.tokenizer, self._token_bytes, self._special)
            if thinking is not None:
                thinking.feed(delta.text, len(delta.token_ids))
                if delta.HasField("usage"):
                    delta.usage.reasoning_tokens = thinking.count
            if first:
                delta.prompt_tokens, first = output.prompt_tokens, False
                delta.reasoning_start = reasoning_start
                if chat and request.messages.tools_json:
                    delta.tool_call_format = self.node.tool_call_format
            yield inference_pb2.GenerateResponse(delta=delta)

    async def LoadAdapter(self, request, context):
        self._authorize(context)
        return _slot(await self.admin.load(request.adapter_id, request.pin, host_only=request.host_only,
                                           sha256=request.sha256))

    async def EvictAdapter(self, request, context):
        self._authorize(context)
        await self.admin.evict(request.adapter_id, all_tiers=request.all_tiers, unpin=request.unpin)
        return inference_pb2.EvictAdapterResponse()

    async def ListAdapters(self, request, context):
        self._authorize(context)
        slots, usage = await self.admin.snapshot()
        return inference_pb2.ListAdaptersResponse(adapters=[_slot(s) for s in slots], pool=_usage(usage))

    async def GetStats(self, request, context):
        self._authorize(context)
        stats = await self.admin.stats()
        return inference_pb2.Stats(pool=_usage(stats.pool), **{k: v for k, v in vars(stats).items() if k != "pool"})

    async def GetInfo(self, request, context):
        self._authorize(context)
        info = vars(self.admin.info())
        fingerprint = info.pop("fingerprint")
        return inference_pb2.ModelInfo(fingerprint=model_pb2.ArchitectureFingerprint(
            **{k: v for k, v in fingerprint.to_dict().items() if k != "modules"},
            modules=[model_pb2.ModuleShape(**vars(m)) for m in fingerprint.modules]), **info)


def _slot(slot) -> inference_pb2.AdapterSlot:
    last_used = Timestamp()
    last_used.FromNanoseconds(int(slot.last_used * 1e9))
    return inference_pb2.AdapterSlot(
        adapter_id=slot.adapter_id, sha256=slot.sha256, tier=inference_pb2.AdapterTier.Value(f"ADAPTER_TIER_{slot.tier}"),
        rank=slot.rank, pages=slot.pages, pinned=slot.pinned, active_requests=slot.active_requests,
        last_used=last_used, load_ms=slot.load_ms, target_modules=sorted(slot.target_modules))


def _usage(usage) -> inference_pb2.PoolUsage:
    return inference_pb2.PoolUsage(**vars(usage))
