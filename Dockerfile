# CPU image for every loraplex service; the command picks the service (see compose.yaml).
# Dockerfile.gpu is the same app on the CUDA build of torch.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the CPU index: PyPI's Linux wheel is the CUDA build, gigabytes this image
# never uses. `pip install /src` below then finds its torch requirement already met.
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

# Installed from a scratch folder that is then deleted, so containers run the installed package
# (package data included) rather than a source tree. The committed gRPC stubs are part of
# services/, so protos/ is not needed at run time.
COPY pyproject.toml README.md /src/
COPY services /src/services
RUN pip install /src && rm -rf /src

# Run as a fixed non-root uid. /data and /models/base are where compose mounts named volumes;
# creating them here, owned by that user, makes Docker give new volumes the same owner.
RUN useradd --create-home --uid 10001 loraplex \
    && mkdir -p /data /models/base \
    && chown loraplex:loraplex /data /models/base
USER loraplex
WORKDIR /home/loraplex

# gRPC: router, registry, trainer, inference; the router's OpenAI HTTP API; /metrics.
EXPOSE 50050 50051 50052 50053 8000 9400 9401 9402 9403
# Each compose service gives its own command (`python -m services.<name> ...`).
CMD ["loraplex", "--help"]
