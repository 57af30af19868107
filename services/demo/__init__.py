"""`loraplex demo`: the brief's whole pipeline for three customers, end to end.

Customer A (finance), B (legal) and C (healthcare) each get a tenant, an API key, a dataset
that ships in `data/`, a Trainer job, a published adapter and a deployment
`base-llm-with-customer<X>-adapter`; then concurrent requests for all three go through the
Router over gRPC and over the OpenAI HTTP API, and each answer is checked for its own
adapter's behaviour. The demo is a client of the four services and nothing more: it uses only
their public gRPC/HTTP APIs, so it runs the same against `loraplex up`'s processes or a
compose stack (`--attach`).
"""
