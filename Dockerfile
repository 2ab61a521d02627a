# tunefit production image: slim Python, non-root, migrations then uvicorn on start.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/tunefit

# Dependencies first (cached layer), from pyproject.toml only.
COPY pyproject.toml README.md ./
COPY app/__init__.py app/__init__.py
RUN pip install --upgrade pip && pip install .  && pip uninstall -y tunefit

# The application, seed data, templates, static files and migrations.
COPY app ./app
COPY migrations ./migrations
COPY data ./data
COPY templates ./templates
COPY static ./static
# Editable (-e): the app finds migrations/, data/, templates/ and static/ beside its package
# (paths relative to app/), so its code must run from /srv/tunefit/app, not from site-packages.
# gcc only for this step: it builds the C allocator replay (app/core/_replay.c, 20-50x faster than
# the Python fallback), then leaves the image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-deps -e . \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /srv/tunefit tunefit \
    && mkdir -p /srv/tunefit/var && chown -R tunefit /srv/tunefit/var

USER tunefit

# Configuration comes only from TUNEFIT_ variables; the default SQLite file lives in a writable folder.
ENV TUNEFIT_DATABASE_URL=sqlite:////srv/tunefit/var/tunefit.sqlite3 \
    HOST=0.0.0.0 \
    PORT=8000

EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT','8000'), timeout=4)" || exit 1

# `tunefit serve` migrates to head under a database lock, loads the seed catalog if empty, then serves.
CMD ["sh", "-c", "exec tunefit serve --host \"$HOST\" --port \"$PORT\""]
