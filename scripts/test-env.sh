#!/usr/bin/env bash
# test-env.sh: bring up PostgreSQL (wal_level=logical) and RabbitMQ for the
# integration tests and export where they are:
#   OUTBOX_TEST_DATABASE_URL  admin URL of the server (tests create their own databases)
#   OUTBOX_TEST_AMQP_URL      broker URL
#   OUTBOX_TEST_NATS_URL      NATS server with JetStream (default nats://127.0.0.1:4222)
#
# Where the services come from:
#   - both variables already set: used as they are, nothing is started;
#   - a Docker engine answers: `docker compose up -d --wait postgres rabbitmq`;
#   - otherwise this machine's own services, via scripts/local-services.sh.
# OUTBOX_TEST_SERVICES=docker|local forces one of the last two.
#
# Source it (`. scripts/test-env.sh`, as `make test` does) to get the exports
# in your shell, or execute it and eval what it prints:
#   eval "$(scripts/test-env.sh)"

_outbox_test_env() {
	local root mode pg_port amqp_port
	root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
	export OUTBOX_TEST_NATS_URL="${OUTBOX_TEST_NATS_URL:-nats://127.0.0.1:4222}"

	if [ -n "${OUTBOX_TEST_DATABASE_URL:-}" ] && [ -n "${OUTBOX_TEST_AMQP_URL:-}" ]; then
		echo "test-env: using the given OUTBOX_TEST_DATABASE_URL and OUTBOX_TEST_AMQP_URL" >&2
		return 0
	fi

	mode="${OUTBOX_TEST_SERVICES:-}"
	if [ -z "$mode" ]; then
		if command -v docker >/dev/null 2>&1 && timeout 15 docker info >/dev/null 2>&1; then
			mode=docker
		else
			mode=local
		fi
	fi

	case "$mode" in
	docker)
		echo "test-env: Docker answers: docker compose up -d --wait postgres rabbitmq nats" >&2
		(cd "$root" && docker compose up -d --wait postgres rabbitmq nats) >&2 || {
			echo "test-env: ERROR: docker compose up failed" >&2
			return 1
		}
		# The host ports are configurable in docker-compose.yml: ask compose.
		pg_port="$(cd "$root" && docker compose port postgres 5432 | sed 's/.*://')"
		amqp_port="$(cd "$root" && docker compose port rabbitmq 5672 | sed 's/.*://')"
		export OUTBOX_TEST_DATABASE_URL="${OUTBOX_TEST_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:${pg_port:-5432}/postgres?sslmode=disable}"
		export OUTBOX_TEST_AMQP_URL="${OUTBOX_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:${amqp_port:-5672}/}"
		;;
	local)
		echo "test-env: no Docker engine: configuring this machine's services (scripts/local-services.sh)" >&2
		bash "$root/scripts/local-services.sh" || {
			echo "test-env: ERROR: scripts/local-services.sh failed" >&2
			return 1
		}
		export OUTBOX_TEST_DATABASE_URL="${OUTBOX_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable}"
		export OUTBOX_TEST_AMQP_URL="${OUTBOX_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}"
		;;
	*)
		echo "test-env: ERROR: OUTBOX_TEST_SERVICES must be docker or local, not '$mode'" >&2
		return 1
		;;
	esac
	# What was chosen, for scripts that source this one (scripts/demo.sh).
	export OUTBOX_TEST_SERVICES="$mode"
	echo "test-env: OUTBOX_TEST_DATABASE_URL=$OUTBOX_TEST_DATABASE_URL OUTBOX_TEST_AMQP_URL=$OUTBOX_TEST_AMQP_URL" >&2
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
	# Executed: print the exports for eval.
	set -euo pipefail
	_outbox_test_env
	printf 'export OUTBOX_TEST_DATABASE_URL=%q\nexport OUTBOX_TEST_AMQP_URL=%q\nexport OUTBOX_TEST_NATS_URL=%q\n' \
		"$OUTBOX_TEST_DATABASE_URL" "$OUTBOX_TEST_AMQP_URL" "$OUTBOX_TEST_NATS_URL"
else
	_outbox_test_env
fi
