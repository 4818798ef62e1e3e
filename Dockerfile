# Builds ingest, worker, api and mono-sim in release mode and ships them on a small Debian image, run by an
# unprivileged user. Dependencies are compiled in a layer of their own (cargo-chef), so changing the
# code does not rebuild them.

FROM lukemathwalker/cargo-chef:latest-rust-1-bookworm AS chef
WORKDIR /app

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
# The dependency layer: cached until Cargo.toml or Cargo.lock change.
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin ingest --bin worker --bin api --bin mono-sim

FROM debian:bookworm-slim AS runtime
# ca-certificates for TLS to Mono (and amqps/postgres TLS); curl for the compose health checks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin monohook
COPY --from=builder /app/target/release/ingest /app/target/release/worker /app/target/release/api \
     /app/target/release/mono-sim /usr/local/bin/
USER monohook
# JSON logs for a log collector; each binary is chosen by the command (see docker-compose.yml).
ENV LOG_FORMAT=json
CMD ["ingest"]
