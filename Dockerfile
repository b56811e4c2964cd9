# Worker / CLI image for docker-compose.yml. torch from PyPI is the CUDA build on linux x86_64,
# so the same image serves GPU workers (with the nvidia runtime) and CPU ingest workers.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ATLAS_HOME=/data/atlas

WORKDIR /app

# dependencies first (cached layer), then the code; editable so schema/ resolves from /app
COPY pyproject.toml README.md ./
RUN mkdir -p atlas workers && touch atlas/__init__.py workers/__init__.py \
    && pip install . && pip uninstall -y circuit-atlas
COPY atlas ./atlas
COPY workers ./workers
COPY schema ./schema
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 1000 atlas \
    && mkdir -p /data/atlas /data/artifacts && chown -R atlas /data

USER atlas
ENTRYPOINT ["atlas"]
CMD ["worker", "--queues", "attribute", "--gpu", "0"]
