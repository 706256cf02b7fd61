# One compiled sparse model served on a CPU box: `sparsedeploy serve` in a small, offline, non-root image.
#
#   docker build --build-arg DEPLOYMENT=runs/serve_smollm2/deployment -t sparsedeploy-serve .
#   docker run --rm -p 127.0.0.1:8000:8000 sparsedeploy-serve [--engine onnxruntime] [--cores 2]
#
# The install steps live in scripts/install-runtime.sh, which tests/test_container.py also runs into a
# fresh virtualenv; the test lints this file too (hadolint + the project's own rules).

FROM python:3.11.14-slim-bookworm AS build
# The CPU-only torch wheel (PyPI's default linux torch pulls in CUDA libraries).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY scripts/install-runtime.sh ./scripts/install-runtime.sh
COPY sparsedeploy ./sparsedeploy
RUN TORCH_INDEX="${TORCH_INDEX}" sh scripts/install-runtime.sh /opt/venv /src

FROM python:3.11.14-slim-bookworm AS runtime
# The deployment folder to serve (from `sparsedeploy export ... --out DIR`), relative to the build context.
ARG DEPLOYMENT=runs/serve_smollm2/deployment
ENV PATH=/opt/venv/bin:$PATH \
    NM_DISABLE_ANALYTICS=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache
RUN groupadd --system --gid 10001 sparsedeploy \
    && useradd --system --uid 10001 --gid sparsedeploy --home-dir /home/sparsedeploy --create-home sparsedeploy
COPY --from=build /opt/venv /opt/venv
COPY ${DEPLOYMENT} /srv/deployment
USER 10001:10001
WORKDIR /home/sparsedeploy
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]
# Inside the container the server must listen on every interface; publish the port on the host's
# loopback (-p 127.0.0.1:8000:8000) unless it should be reachable from the network.
ENTRYPOINT ["sparsedeploy", "serve", "/srv/deployment", "--host", "0.0.0.0", "--port", "8000"]
