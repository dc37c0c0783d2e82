# The Sluice server image: `sluice serve` by default; the same binary is the CLI.
# Builds offline from the committed .sqlx/ query data (no database needed).
#   docker build -t sluice .

FROM node:20-bookworm-slim AS web
WORKDIR /src/web
COPY web/package.json web/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY openapi/ /src/openapi/
COPY web/ ./
RUN npm run build

FROM rust:1.95-bookworm AS build
WORKDIR /src
ENV SQLX_OFFLINE=true CARGO_TERM_COLOR=never
COPY . .
# The dashboard is compiled into the binary (rust-embed of web/dist).
COPY --from=web /src/web/dist web/dist
RUN test -d .sqlx || { echo "error: .sqlx/ is missing: run scripts/prepare-sqlx and commit it" >&2; exit 1; }
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sluice-server \
    && install -m 0755 target/release/sluice /usr/local/bin/sluice

FROM debian:12-slim
# ca-certificates for TLS registries; curl for the health check.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/sluice --create-home sluice
COPY --from=build /usr/local/bin/sluice /usr/local/bin/sluice
USER sluice
WORKDIR /var/lib/sluice
ENV SLUICE_LISTEN=0.0.0.0:8080 \
    SLUICE_DATA_DIR=/var/lib/sluice
VOLUME ["/var/lib/sluice"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["sluice"]
CMD ["serve"]
