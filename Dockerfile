# anna's container image: `docker build -t anna --build-arg ANNA_GIT_COMMIT=$(git rev-parse --short=12 HEAD) .`
# The binary is built with the `dist` profile (no debug info, stripped) and runs as a
# non-root user on a slim Debian.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# No .git in the build context: the commit comes in as a build argument (anna --version).
ARG ANNA_GIT_COMMIT=unknown
ENV ANNA_GIT_COMMIT=${ANNA_GIT_COMMIT}
COPY . .
RUN cargo build --locked --profile dist --bin anna && cp target/dist/anna /usr/local/bin/anna

FROM debian:bookworm-slim
# curl: the health checks of the compose file; ca-certificates: SMTP, Resend, webhooks over TLS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/anna --create-home anna \
    && install -d -o anna -g anna /var/lib/anna/data
COPY --from=build /usr/local/bin/anna /usr/local/bin/anna
USER anna
WORKDIR /var/lib/anna
# The embedded shape keeps its SQLite file here; mount a volume to keep it.
ENV HOST=0.0.0.0 PORT=3000 DATABASE_URL=sqlite:/var/lib/anna/data/anna.db
VOLUME ["/var/lib/anna/data"]
EXPOSE 3000 9100
# Health checks belong to the deployment: the API answers /readyz on PORT, every process
# answers /healthz on METRICS_PORT (see deploy/compose.yaml).
ENTRYPOINT ["/usr/local/bin/anna"]
CMD ["serve"]
