# Production image: gunicorn (via `cds-service serve`), non-root, health-checked.

# Build stage: the full image has the C compiler that compiles the hot path (hatch_build.py).
FROM python:3.11-bookworm AS build
WORKDIR /build
COPY pyproject.toml README.md hatch_build.py ./
COPY cds_service ./cds_service
COPY schemas ./schemas
COPY fixtures ./fixtures
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /wheels
# The image is refused unless the compiled context layer is in it and imports (native.py).
RUN pip install /wheels/*.whl \
    && rm -rf /wheels \
    && python -c "import cds_service.native as n, cds_service.context.builder as b; \
assert n.compiled and b.__file__.endswith('.so'), n.status" \
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
