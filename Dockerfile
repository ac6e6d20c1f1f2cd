# abqueue GPU worker: the official vLLM image (CUDA, PyTorch, vLLM) plus abqueue, running `abq worker`.
#   docker build -t abqueue-worker .
#   docker run --gpus all -v /models:/models:ro -v $PWD/experiment.yaml:/etc/abqueue/experiment.yaml:ro \
#     -e ABQ_BOOTSTRAP_SERVERS=kafka:9092 -p 9400:9400 abqueue-worker \
#     --config /etc/abqueue/experiment.yaml --variant candidate --model /models/my-model
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

# The base image's own entrypoint starts vLLM's OpenAI server; this image runs the queue worker instead.
WORKDIR /opt/abqueue
COPY pyproject.toml README.md ./
COPY schemas/ schemas/
COPY producers/ producers/
COPY workers/ workers/
COPY abqueue/ abqueue/
# vLLM and torch come from the base image; only abqueue's own small dependencies are added (and the
# gateway's FastAPI and uvicorn, which the base image has already: `--entrypoint abq IMAGE gateway ...`).
RUN python3 -m pip install --no-cache-dir "/opt/abqueue[gateway]" \
    && useradd --create-home --uid 10001 --user-group abq \
    && mkdir -p /etc/abqueue \
    && chown abq:abq /etc/abqueue

# Non-root; HOME holds vLLM's and Hugging Face's caches (mount a volume there to keep compiled kernels).
USER 10001
ENV HOME=/home/abq \
    PYTHONUNBUFFERED=1 \
    ABQ_LOG_LEVEL=INFO

# /metrics, /healthz and /readyz
EXPOSE 9400
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9400/healthz', timeout=4)"]

ENTRYPOINT ["abq", "worker", "--metrics-port", "9400"]
CMD ["--config", "/etc/abqueue/experiment.yaml", "--variant", "@control"]
