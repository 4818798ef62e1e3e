# Builds ingest, worker, api and mono-sim in release mode and ships them on a small Debian image, run by an
# unprivileged user. Dependencies are compiled in a layer of their own (cargo-chef), so changing the
# code does not rebuild them.

# Pinned: the Rust release of rust-toolchain.toml, and cargo-chef at a fixed version, so that an
# image built next year is built the way CI built this one.
FROM rust:1.95.0-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /app

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
# The dependency layer: cached until Cargo.toml or Cargo.lock change.
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
# The build context leaves .git out, so `--version` learns the revision from this argument:
# `docker build --build-arg VERGEN_GIT_SHA=$(git rev-parse --short HEAD) .`
ARG VERGEN_GIT_SHA
RUN cargo build --release --locked --bin ingest --bin worker --bin api --bin mono-sim
# Man pages, generated from the same clap definitions as `--help`.
RUN for bin in ingest worker api; do target/release/$bin man --out-dir /app/man/man1; done

# Deliberately the moving Debian 12 tag: the runtime takes Debian's security updates on rebuild.
FROM debian:bookworm-slim AS runtime
# curl for the compose health checks, and ca-certificates for curl. The binaries never read the
# system store: they trust the webpki roots built in (Mono, amqps, Postgres TLS), plus AMQP_CA_FILE
# for a broker's private CA and `sslrootcert` in DATABASE_URL for a database's.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin monohook
COPY --from=builder /app/target/release/ingest /app/target/release/worker /app/target/release/api \
     /app/target/release/mono-sim /usr/local/bin/
COPY --from=builder /app/man/man1 /usr/local/share/man/man1/
USER monohook
# JSON logs for a log collector; each binary is chosen by the command (see docker-compose.yml).
ENV LOG_FORMAT=json
CMD ["ingest"]
