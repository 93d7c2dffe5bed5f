# Multi-stage build: compile in the Rust image, run in a small non-root image.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples ./examples
COPY tests ./tests
COPY benches ./benches
RUN cargo build --release --locked --bin graphcache --example mock-graph

# The mock Graph API, for examples/compose (docker build --target mock-graph).
FROM gcr.io/distroless/cc-debian12:nonroot AS mock-graph
COPY --from=build /src/target/release/examples/mock-graph /usr/local/bin/mock-graph
EXPOSE 8089
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mock-graph"]
CMD ["0.0.0.0:8089"]

# graphcache itself: the default target.

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/graphcache /usr/local/bin/graphcache
COPY config/graphcache.toml /etc/graphcache/graphcache.toml
# Inside a container the listeners must not be loopback-only.
ENV GRAPHCACHE_CONFIG=/etc/graphcache/graphcache.toml \
    GRAPHCACHE_LISTEN=0.0.0.0:8080 \
    GRAPHCACHE_ADMIN_LISTEN=0.0.0.0:9090
EXPOSE 8080 9090
# Numeric, so Kubernetes' runAsNonRoot can verify it (distroless "nonroot").
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/graphcache"]
