#!/usr/bin/env bash
# cluster.sh: a PostgreSQL 15 primary and a streaming physical standby of our
# own, for tests that must change server settings (synchronous_standby_names)
# without touching the shared server on 5432. Follows /work/shared/CLUSTERS.md.
#
#   scripts/cluster.sh pg-up DIR          initdb a primary, basebackup a standby, start both
#   scripts/cluster.sh pg-down DIR        stop both (immediate) and remove DIR
#   scripts/cluster.sh standby-stop DIR   stop the standby (fast)
#   scripts/cluster.sh standby-start DIR  start the standby and wait until it streams
#   scripts/cluster.sh replication DIR    print the primary's pg_stat_replication
#
# DIR is created if missing and handed to the postgres user; everything the
# clusters write (data, sockets, logs) stays under it. Environment:
#   PRIMARY_PORT (55432), STANDBY_PORT (55433), STANDBY_NAME (standby1: the
#   standby's application_name in primary_conninfo), PG_BIN.
# The servers run as the postgres user; run this as root or as postgres.
set -euo pipefail

PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
PRIMARY_PORT="${PRIMARY_PORT:-55432}"
STANDBY_PORT="${STANDBY_PORT:-55433}"
STANDBY_NAME="${STANDBY_NAME:-standby1}"

usage() {
	sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
	exit 2
}

[ $# -eq 2 ] || usage
cmd="$1"
dir="$2"
case "$dir" in
/*) ;;
*) dir="$(pwd)/$dir" ;;
esac

as_pg() {
	if [ "$(id -u)" -eq 0 ]; then
		runuser -u postgres -- "$@"
	else
		"$@"
	fi
}

psql_primary() {
	as_pg "$PG_BIN/psql" -X -q -At -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -d postgres -c "$1"
}

# wait_streaming waits until the primary reports the standby streaming.
wait_streaming() {
	local i state
	for i in $(seq 1 300); do
		state="$(psql_primary "SELECT state FROM pg_stat_replication WHERE application_name = '$STANDBY_NAME'" 2>/dev/null || true)"
		if [ "$state" = "streaming" ]; then
			return 0
		fi
		sleep 0.1
	done
	echo "cluster.sh: the standby $STANDBY_NAME did not reach streaming within 30s" >&2
	tail -n 20 "$dir/standby.log" >&2 || true
	return 1
}

pg_up() {
	if [ -e "$dir/primary" ]; then
		echo "cluster.sh: $dir/primary exists already; run pg-down first" >&2
		exit 1
	fi
	mkdir -p "$dir/sock"
	chown -R postgres:postgres "$dir" 2>/dev/null || true
	chmod 700 "$dir"

	as_pg "$PG_BIN/initdb" -D "$dir/primary" -U postgres -A trust --no-sync >"$dir/initdb.log" 2>&1 || {
		cat "$dir/initdb.log" >&2
		exit 1
	}
	# fsync = off: the tests measure waits for a synchronous standby, not
	# this machine's disk, which other engineers' tests share.
	cat >>"$dir/primary/postgresql.conf" <<EOF
port = $PRIMARY_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir/sock'
wal_level = logical
max_wal_senders = 16
max_replication_slots = 16
max_connections = 60
shared_buffers = 64MB
fsync = off
full_page_writes = off
EOF
	echo "host replication all 127.0.0.1/32 trust" >>"$dir/primary/pg_hba.conf"
	as_pg "$PG_BIN/pg_ctl" -D "$dir/primary" -l "$dir/primary.log" -w -t 60 start >/dev/null || {
		tail -n 20 "$dir/primary.log" >&2
		exit 1
	}

	# -c fast: otherwise pg_basebackup waits for a spread checkpoint (4.5 min here).
	as_pg "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -D "$dir/standby" -R -X stream -c fast
	# wal_receiver_status_interval = 1s: the standby reports its position
	# at least every second even without new WAL, so that a commit waiting
	# for a synchronous standby that just took the role is released soon.
	cat >>"$dir/standby/postgresql.conf" <<EOF
port = $STANDBY_PORT
wal_receiver_status_interval = 1s
EOF
	# Name the standby: without application_name its walreceiver reports
	# "walreceiver". A later line in postgresql.auto.conf wins over the one
	# pg_basebackup -R wrote.
	echo "primary_conninfo = 'host=127.0.0.1 port=$PRIMARY_PORT user=postgres application_name=$STANDBY_NAME'" \
		>>"$dir/standby/postgresql.auto.conf"
	standby_start
	echo "cluster.sh: primary 127.0.0.1:$PRIMARY_PORT, standby 127.0.0.1:$STANDBY_PORT ($STANDBY_NAME) under $dir" >&2
}

standby_start() {
	as_pg "$PG_BIN/pg_ctl" -D "$dir/standby" -l "$dir/standby.log" -w -t 60 start >/dev/null || {
		tail -n 20 "$dir/standby.log" >&2
		exit 1
	}
	wait_streaming
}

standby_stop() {
	as_pg "$PG_BIN/pg_ctl" -D "$dir/standby" -m fast -w -t 60 stop >/dev/null
}

pg_down() {
	local d
	for d in standby primary; do
		if [ -f "$dir/$d/postmaster.pid" ]; then
			as_pg "$PG_BIN/pg_ctl" -D "$dir/$d" -m immediate -w -t 60 stop >/dev/null 2>&1 || true
		fi
	done
	case "$dir" in
	/ | /tmp | /tmp/ | "") echo "cluster.sh: refusing to remove $dir" >&2; exit 1 ;;
	esac
	rm -rf "$dir"
}

case "$cmd" in
pg-up) pg_up ;;
pg-down) pg_down ;;
standby-stop) standby_stop ;;
standby-start) standby_start ;;
replication) psql_primary "SELECT pid, application_name, state, sync_state FROM pg_stat_replication ORDER BY pid" ;;
*) usage ;;
esac
