# Production image: gunicorn (via `cds-service serve`), non-root, health-checked.

FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml README.md ./
COPY cds_service ./cds_service
COPY schemas ./schemas
COPY fixtures ./fixtures
RUN pip install . \
    && rm -rf /build \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin cds

USER cds
WORKDIR /home/cds
ENV CDS_HOST=0.0.0.0 \
    CDS_PORT=8080 \
    CDS_DATABASE_URL=sqlite:////home/cds/magnesium-cds.sqlite3
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]

CMD ["cds-service", "serve"]
