# CPU image for every loraplex service (the command picks the service; see compose.yaml).
# A GPU variant swaps the base image for an NVIDIA CUDA runtime and installs the CUDA torch
# wheel; it arrives with the end-to-end issue (#7).
FROM python:3.11-slim
WORKDIR /app
RUN pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY services ./services
COPY protos ./protos
RUN pip install --no-cache-dir .
EXPOSE 50050 50051 50052 50053
