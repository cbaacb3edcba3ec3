#!/usr/bin/env bash
# demo.sh: outbox-relay end to end, in one command (`make demo`).
#
#   1. services, chosen as for the tests (scripts/test-env.sh): docker
#      compose when Docker answers, else this machine's own
#      (scripts/local-services.sh);
#   2. database outbox_demo (created if missing), bin/outbox-relay and
#      bin/demo built, `outbox-relay migrate`;
#   3. the consumer, the relay and the producer run together and their output
#      is shown interleaved for DEMO_SECONDS;
#   4. the producer stops, the relay catches up and is stopped with SIGTERM
#      (it drains and exits 0), the consumer stops, `outbox-relay status`.
#
# Environment:
#   DEMO_SECONDS    how long to run (default 20; 0 = until Ctrl-C)
#   DEMO_RATE       events per second the producer writes (default 5)
#   DEMO_KEEP_SLOT  1 keeps the replication slot outbox_demo afterwards; by
#                   default it is dropped, because a forgotten slot makes
#                   PostgreSQL keep WAL forever
#   DEMO_SERVICES   docker|local forces where the services come from;
#                   "none" uses DEMO_ADMIN_URL / DEMO_AMQP_URL as they are
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="/usr/local/go/bin:$PATH"

DEMO_SECONDS="${DEMO_SECONDS:-20}"
DEMO_RATE="${DEMO_RATE:-5}"
DEMO_KEEP_SLOT="${DEMO_KEEP_SLOT:-0}"
DB=outbox_demo
SLOT=outbox_demo

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { printf 'demo: ERROR: %s\n' "$*" >&2; exit 1; }

case "$DEMO_SECONDS" in '' | *[!0-9]*) die "DEMO_SECONDS must be a whole number of seconds (0 = until Ctrl-C)" ;; esac

# --- services -----------------------------------------------------------------

case "${DEMO_SERVICES:-}" in
none)
	[ -n "${DEMO_ADMIN_URL:-}" ] && [ -n "${DEMO_AMQP_URL:-}" ] || die "DEMO_SERVICES=none needs DEMO_ADMIN_URL and DEMO_AMQP_URL"
	mode=none
	ADMIN_URL="$DEMO_ADMIN_URL"
	AMQP_URL="$DEMO_AMQP_URL"
	;;
'' | docker | local)
	# The same choice the tests make: Docker when it answers, else this
	# machine's services, configured by scripts/local-services.sh.
	say "services: scripts/test-env.sh"
	OUTBOX_TEST_SERVICES="${DEMO_SERVICES:-}"
	OUTBOX_TEST_DATABASE_URL="${DEMO_ADMIN_URL:-}"
	OUTBOX_TEST_AMQP_URL="${DEMO_AMQP_URL:-}"
	# shellcheck source=test-env.sh
	. scripts/test-env.sh || die "scripts/test-env.sh could not bring up the services"
	mode="${OUTBOX_TEST_SERVICES:-none}"
	ADMIN_URL="$OUTBOX_TEST_DATABASE_URL"
	AMQP_URL="$OUTBOX_TEST_AMQP_URL"
	;;
*) die "DEMO_SERVICES must be docker, local or none, not '$DEMO_SERVICES'" ;;
esac
# The demo database: the admin URL with its path replaced.
DB_URL="$(printf '%s' "$ADMIN_URL" | sed -E "s#^([a-z]+://[^/]*)/[^?]*#\1/$DB#")"

# psql against a database of the server: the host's psql, else the container's.
pg() {
	local url="$1"
	shift
	if command -v psql >/dev/null 2>&1; then
		psql -X -Atq -v ON_ERROR_STOP=1 "$url" "$@"
	elif [ "$mode" = docker ]; then
		local db="${url##*/}"
		docker compose exec -T postgres psql -X -Atq -v ON_ERROR_STOP=1 -U postgres -d "${db%%\?*}" "$@"
	else
		die "psql not found"
	fi
}

if [ "$(pg "$ADMIN_URL" -c "SELECT count(*) FROM pg_database WHERE datname = '$DB'")" = 0 ]; then
	say "creating database $DB"
	pg "$ADMIN_URL" -c "CREATE DATABASE $DB" || die "CREATE DATABASE $DB failed"
fi

# --- build and migrate --------------------------------------------------------

say "building bin/outbox-relay and bin/demo"
mkdir -p bin
go build -o bin/outbox-relay ./cmd/outbox-relay
go build -o bin/demo ./cmd/demo

export RELAY_DATABASE_URL="$DB_URL"
export RELAY_AMQP_URL="$AMQP_URL"
export RELAY_SLOT="$SLOT"
export RELAY_LOG_FORMAT=console
export RELAY_METRICS_ADDR="${RELAY_METRICS_ADDR:-127.0.0.1:9740}"
unset RELAY_EXCHANGE RELAY_TABLE RELAY_PUBLICATION

say "outbox-relay migrate"
bin/outbox-relay migrate

# --- run ----------------------------------------------------------------------

LOGS="$(mktemp -d)"
consumer_pid="" relay_pid="" producer_pid="" ticker_pid="" relay_started=""

slot_exists() { [ "$(pg "$DB_URL" -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '$SLOT'")" != 0 ]; }

drop_slot() {
	if [ "$DEMO_KEEP_SLOT" = 1 ]; then
		echo "Keeping replication slot $SLOT (DEMO_KEEP_SLOT=1): the next demo resumes from it."
		echo "It keeps WAL on the server until it is dropped; drop it with:"
		echo "  psql '$DB_URL' -c \"SELECT pg_drop_replication_slot('$SLOT')\""
		return 0
	fi
	if slot_exists; then
		pg "$DB_URL" -c "SELECT pg_drop_replication_slot('$SLOT')" >/dev/null &&
			echo "Dropped replication slot $SLOT: a forgotten slot makes PostgreSQL keep WAL forever" \
				"(DEMO_KEEP_SLOT=1 keeps it)."
	fi
}

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	local left=""
	for pid in $producer_pid $relay_pid $consumer_pid $ticker_pid; do
		if kill -0 "$pid" 2>/dev/null; then
			left=1
			kill -TERM "$pid" 2>/dev/null || true
		fi
	done
	if [ -n "$left" ]; then
		sleep 2
		for pid in $producer_pid $relay_pid $consumer_pid $ticker_pid; do
			kill -KILL "$pid" 2>/dev/null || true
		done
	fi
	# Aborted after the relay may have created the slot: do not leave it
	# holding WAL. (A relay just killed leaves it active for a moment.)
	if [ "$rc" != 0 ] && [ -n "$relay_started" ]; then
		echo "demo: aborted (exit $rc)"
		sleep 1
		(drop_slot) || true
	fi
	rm -rf "$LOGS"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Each program in its own process group (job control), so a Ctrl-C at the
# terminal reaches only this script, which then stops them in order. The
# prefixing sed/tee ignore INT/TERM and end when their program does.
set -m
prefixed() { # name: prefix stdin's lines and keep a copy in $LOGS/name.log
	trap '' INT TERM
	tee -a "$LOGS/$1.log" | sed -u "s/^/$(printf '%-8s|' "$1") /"
}

say "running for $([ "$DEMO_SECONDS" = 0 ] && echo 'until Ctrl-C' || echo "${DEMO_SECONDS}s"): consumer, relay (slot $SLOT), producer (${DEMO_RATE} events/s)"
bin/demo consume > >(prefixed consume) 2>&1 &
consumer_pid=$!
for _ in $(seq 1 100); do
	grep -q 'waiting for messages' "$LOGS/consume.log" 2>/dev/null && break
	kill -0 "$consumer_pid" 2>/dev/null || die "the consumer exited (is RabbitMQ at ${AMQP_URL/:guest@/:***@} reachable?)"
	sleep 0.1
done
relay_started=1
bin/outbox-relay run > >(prefixed relay) 2>&1 &
relay_pid=$!
bin/demo produce -rate "$DEMO_RATE" > >(prefixed produce) 2>&1 &
producer_pid=$!

interrupted=0
trap 'interrupted=1' INT
if [ "$DEMO_SECONDS" = 0 ]; then
	sleep infinity &
else
	sleep "$DEMO_SECONDS" &
fi
ticker_pid=$!
wait "$ticker_pid" || true
kill "$ticker_pid" 2>/dev/null || true
trap 'exit 130' INT
[ "$interrupted" = 1 ] && echo && echo "demo: Ctrl-C: stopping in order (Ctrl-C again to abort)"

# --- stop in order: producer, relay (after it caught up), consumer -------------

say "stopping the producer"
kill -TERM "$producer_pid" 2>/dev/null || true
wait "$producer_pid" || die "the producer failed"
producer_pid=""

say "waiting for the relay to publish what is left"
kill -0 "$relay_pid" 2>/dev/null || die "the relay exited early (see its output above)"
for _ in $(seq 1 100); do
	[ "$(pg "$DB_URL" -c 'SELECT count(*) FROM outbox_events WHERE published_at IS NULL')" = 0 ] && break
	sleep 0.1
done

say "stopping the relay (SIGTERM: it drains in-flight events, acknowledges, exits 0)"
kill -TERM "$relay_pid"
relay_rc=0
wait "$relay_pid" || relay_rc=$?
relay_pid=""
echo "relay exit code: $relay_rc"

sleep 0.5 # the last confirmed messages reach the consumer
kill -TERM "$consumer_pid" 2>/dev/null || true
wait "$consumer_pid" || die "the consumer failed"
consumer_pid=""
sleep 0.2 # let the prefixers flush

say "outbox-relay status"
status_rc=0
bin/outbox-relay status || status_rc=$?

say "summary"
produced="$(sed -nE 's/.*stopped after ([0-9]+) event.*/\1/p' "$LOGS/produce.log" | tail -n1)"
consumed="$(sed -nE 's/.*stopped after ([0-9]+) message.*/\1/p' "$LOGS/consume.log" | tail -n1)"
unique="$(grep -oE 'message_id=[0-9a-f-]+' "$LOGS/consume.log" | sort -u | wc -l)"
unpublished="$(pg "$DB_URL" -c 'SELECT count(*) FROM outbox_events WHERE published_at IS NULL')"
echo "produced ${produced:-?} events; consumed ${consumed:-?} messages (${unique} distinct ids); unpublished rows: $unpublished"
drop_slot
ok=1
[ "$relay_rc" = 0 ] || { echo "demo: FAIL: the relay exited $relay_rc"; ok=0; }
[ -n "$produced" ] && [ "$produced" -gt 0 ] || { echo "demo: FAIL: nothing was produced"; ok=0; }
[ "${consumed:-x}" = "${produced:-y}" ] || echo "demo: note: consumed != produced (events from an earlier demo, or still in flight)"
[ "$unpublished" = 0 ] || { echo "demo: FAIL: $unpublished rows still unpublished"; ok=0; }
[ "$status_rc" = 0 ] || { echo "demo: FAIL: outbox-relay status exited $status_rc"; ok=0; }
[ "$ok" = 1 ] || exit 1
echo "demo: OK: every committed event went through the slot to RabbitMQ and was marked published"
