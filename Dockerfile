# syntax=docker/dockerfile:1
# outbox-relay: static binary on distroless, running as nonroot.

FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o /out/outbox-relay ./cmd/outbox-relay

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/outbox-relay /outbox-relay
USER nonroot
# RELAY_METRICS_ADDR default: /metrics, /healthz, /readyz
EXPOSE 9740
ENTRYPOINT ["/outbox-relay"]
CMD ["run"]
