# dicomflow: `dicomflow serve` (HTTP + DIMSE) or `dicomflow worker` (routes), see docker-compose.yml.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/dicomflow
COPY pyproject.toml README.md ./
COPY dicomflow ./dicomflow
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /var/lib/dicomflow --create-home dicomflow

COPY routes /etc/dicomflow/routes
COPY mappings /etc/dicomflow/mappings
COPY config/settings.example.yaml /etc/dicomflow/settings.example.yaml

USER dicomflow
WORKDIR /var/lib/dicomflow
ENV DICOMFLOW_DATA_DIR=/var/lib/dicomflow
EXPOSE 8080 11112
CMD ["dicomflow", "serve", "--config", "/etc/dicomflow/dicomflow.yaml"]
