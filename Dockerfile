# uspeedo-receipts: one image for every service (migrate, worker, beat, exporter, simulate).
FROM python:3.11-slim

# Logs reach `docker logs` at once; no .pyc files or pip version check at build time.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Celery warns when a worker runs as root, and nothing here needs root at run time.
RUN useradd --create-home --uid 10001 receipts

# Only what the build needs: setuptools maps migrations/ into worker.migrations at install.
# alembic.ini stays for running `alembic` by hand (`cd /opt/receipts && alembic current`).
WORKDIR /opt/receipts
COPY pyproject.toml README.md alembic.ini ./
COPY worker/ worker/
COPY migrations/ migrations/
# A regular (non-editable) install, so the code runs from site-packages; drop the build leftovers.
RUN pip install --no-cache-dir . && rm -rf build *.egg-info

# Not the source folder: `celery -A worker.celery` puts the working directory on sys.path,
# and a writable home is where the default SQLite file would go.
USER receipts
WORKDIR /home/receipts

ENTRYPOINT ["receipts"]
CMD ["worker"]
