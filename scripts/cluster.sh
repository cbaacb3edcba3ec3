#!/usr/bin/env bash
# cluster.sh: the test topology beyond one machine, on this machine, never
# touching the default services on 5672 and 5432. Follows
# /work/shared/CLUSTERS.md and docs/clusters.md.
#
#   scripts/cluster.sh up                 a 3-node RabbitMQ cluster (AMQP 5681-5683) and a
#                                         PostgreSQL 15 primary (5441) with a synchronous standby (5442)
#   scripts/cluster.sh down               stop all of it and remove its directories
#   scripts/cluster.sh status             what runs, and each node's role
#   scripts/cluster.sh rabbit-stop N      stop RabbitMQ node N (1-3) cleanly
#   scripts/cluster.sh rabbit-kill N      kill -9 RabbitMQ node N
#   scripts/cluster.sh rabbit-start N     start node N again and wait until it runs
#   scripts/cluster.sh rabbit-leader Q    print the number (1-3) of the node that holds
#                                         quorum queue Q's leader, asking the first node that answers
#   scripts/cluster.sh pg-up DIR          initdb a primary, basebackup a standby, start both
#   scripts/cluster.sh pg-down DIR        stop both (immediate) and remove DIR
#   scripts/cluster.sh standby-stop DIR   stop the standby (fast)
#   scripts/cluster.sh standby-start DIR  start the standby and wait until it streams
#   scripts/cluster.sh replication DIR    print the primary's pg_stat_replication
#   scripts/cluster.sh pg-crash DIR       stop whichever node is primary with -m immediate
#   scripts/cluster.sh pg-promote DIR     promote the running standby; clear its
#                                         synchronous_standby_names, as failover managers do
#   scripts/cluster.sh pg-rejoin DIR      rebuild the stopped node as a synchronous standby
#                                         of the current primary (fresh pg_basebackup)
#
# up and down are idempotent. They keep everything under CLUSTER_DIR
# (/tmp/outbox-relay-clusters); the PostgreSQL pair is DIR=$CLUSTER_DIR/pg.
# Other commands take DIR, created if missing and handed to the postgres
# user; everything those clusters write (data, sockets, logs) stays under it.
# Environment: PRIMARY_PORT (55432), STANDBY_PORT (55433), for the commands
# that take DIR; PRIMARY_PORT_UP (5441), STANDBY_PORT_UP (5442), for up;
# STANDBY_NAME (standby1: the standby's application_name in
# primary_conninfo); SYNC (non-empty: pg-up names the standby in the
# primary's synchronous_standby_names, as up always does); PG_BIN;
# RABBIT_PORTS ("5681 5682 5683"); CLUSTER_DIR.
# The servers run as the postgres and rabbitmq users; run this as root.
set -euo pipefail

PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
PRIMARY_PORT="${PRIMARY_PORT:-55432}"
STANDBY_PORT="${STANDBY_PORT:-55433}"
STANDBY_NAME="${STANDBY_NAME:-standby1}"

CLUSTER_DIR="${CLUSTER_DIR:-/tmp/outbox-relay-clusters}"
RABBIT_PORTS="${RABBIT_PORTS:-5681 5682 5683}"
SYNC="${SYNC:-}"

usage() {
	sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//' >&2
	exit 2
}

[ $# -ge 1 ] && [ $# -le 2 ] || usage
cmd="$1"
dir="${2:-}"
case "$dir" in
/* | "") ;;
*) dir="$(pwd)/$dir" ;;
esac

as_pg() {
	if [ "$(id -u)" -eq 0 ]; then
		runuser -u postgres -- "$@"
	else
		"$@"
	fi
}

psql_port() {
	as_pg "$PG_BIN/psql" -X -q -At -h 127.0.0.1 -p "$1" -U postgres -d postgres -c "$2"
}

psql_primary() {
	psql_port "$PRIMARY_PORT" "$1"
}

# The pair's two nodes keep the directory names of their first roles,
# primary and standby; NODE.port and NODE.name (its application_name as a
# standby) record the rest, so that the roles can swap.
node_port() { cat "$dir/$1.port"; }
node_name() { cat "$dir/$1.name"; }
other_node() { if [ "$1" = primary ]; then echo standby; else echo primary; fi; }

node_running() {
	[ -f "$dir/$1/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$dir/$1" status >/dev/null 2>&1
}

in_recovery() { psql_port "$(node_port "$1")" "SELECT pg_is_in_recovery()" 2>/dev/null; }

# current_primary prints the running node that is not in recovery.
current_primary() {
	local n
	for n in primary standby; do
		if node_running "$n" && [ "$(in_recovery "$n")" = f ]; then
			echo "$n"
			return 0
		fi
	done
	return 1
}

# wait_streaming PRIMARY_PORT NAME LOG waits until the primary reports the
# standby NAME streaming.
wait_streaming() {
	local i state
	for i in $(seq 1 300); do
		state="$(psql_port "$1" "SELECT state FROM pg_stat_replication WHERE application_name = '$2'" 2>/dev/null || true)"
		if [ "$state" = "streaming" ]; then
			return 0
		fi
		sleep 0.1
	done
	echo "cluster.sh: the standby $2 did not reach streaming within 30s" >&2
	tail -n 20 "$3" >&2 || true
	return 1
}

# make_standby NODE FROM_PORT: a fresh basebackup of the primary on
# FROM_PORT into NODE's directory, configured as a standby named NODE.name
# on NODE.port.
make_standby() {
	local node="$1" from="$2"
	rm -rf "${dir:?}/$node"
	# -c fast: otherwise pg_basebackup waits for a spread checkpoint (4.5 min here).
	as_pg "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$from" -U postgres -D "$dir/$node" -R -X stream -c fast
	# wal_receiver_status_interval = 1s: the standby reports its position
	# at least every second even without new WAL, so that a commit waiting
	# for a synchronous standby that just took the role is released soon.
	# The copied postgresql.conf names the primary's port; a later line wins.
	printf 'port = %s\nwal_receiver_status_interval = 1s\n' "$(node_port "$node")" >>"$dir/$node/postgresql.conf"
	# Name the standby: without application_name its walreceiver reports
	# "walreceiver". A later line in postgresql.auto.conf wins over the one
	# pg_basebackup -R wrote.
	echo "primary_conninfo = 'host=127.0.0.1 port=$from user=postgres application_name=$(node_name "$node")'" \
		>>"$dir/$node/postgresql.auto.conf"
}

start_node() {
	as_pg "$PG_BIN/pg_ctl" -D "$dir/$1" -l "$dir/$1.log" -w -t 60 start >/dev/null || {
		tail -n 20 "$dir/$1.log" >&2
		exit 1
	}
}

# set_sync NAME: the primary waits for the standby NAME at every commit.
set_sync() {
	local port
	port="$(node_port "$(current_primary)")"
	psql_port "$port" "ALTER SYSTEM SET synchronous_standby_names = '$1'" >/dev/null
	psql_port "$port" "SELECT pg_reload_conf()" >/dev/null
}

pg_up() {
	if [ -e "$dir/primary" ]; then
		echo "cluster.sh: $dir/primary exists already; run pg-down first" >&2
		exit 1
	fi
	mkdir -p "$dir/sock"
	echo "$PRIMARY_PORT" >"$dir/primary.port"
	echo "primary1" >"$dir/primary.name"
	echo "$STANDBY_PORT" >"$dir/standby.port"
	echo "$STANDBY_NAME" >"$dir/standby.name"
	if [ -n "$SYNC" ]; then echo on >"$dir/sync"; fi
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
	start_node primary
	make_standby standby "$PRIMARY_PORT"
	standby_start
	if [ -n "$SYNC" ]; then
		set_sync "$STANDBY_NAME"
	fi
	echo "cluster.sh: primary 127.0.0.1:$PRIMARY_PORT, standby 127.0.0.1:$STANDBY_PORT ($STANDBY_NAME${SYNC:+, synchronous}) under $dir" >&2
}

standby_start() {
	start_node standby
	wait_streaming "$PRIMARY_PORT" "$STANDBY_NAME" "$dir/standby.log"
}

standby_stop() {
	as_pg "$PG_BIN/pg_ctl" -D "$dir/standby" -m fast -w -t 60 stop >/dev/null
}

pg_crash() {
	local p
	p="$(current_primary)" || { echo "cluster.sh: no primary runs under $dir" >&2; exit 1; }
	as_pg "$PG_BIN/pg_ctl" -D "$dir/$p" -m immediate -w -t 60 stop >/dev/null
	echo "cluster.sh: primary $p (127.0.0.1:$(node_port "$p")) stopped with -m immediate" >&2
}

pg_promote() {
	local n port
	for n in primary standby; do
		if node_running "$n" && [ "$(in_recovery "$n")" = t ]; then
			port="$(node_port "$n")"
			as_pg "$PG_BIN/pg_ctl" -D "$dir/$n" -w -t 60 promote >/dev/null
			# Until a standby is attached again, a synchronous_standby_names
			# copied from the old primary would make every commit wait.
			psql_port "$port" "ALTER SYSTEM RESET synchronous_standby_names" >/dev/null
			psql_port "$port" "SELECT pg_reload_conf()" >/dev/null
			echo "cluster.sh: $n (127.0.0.1:$port) promoted" >&2
			return 0
		fi
	done
	echo "cluster.sh: no running standby under $dir to promote" >&2
	exit 1
}

pg_rejoin() {
	local p n
	p="$(current_primary)" || { echo "cluster.sh: no primary runs under $dir" >&2; exit 1; }
	n="$(other_node "$p")"
	if node_running "$n"; then
		echo "cluster.sh: $n runs already; stop it first" >&2
		exit 1
	fi
	make_standby "$n" "$(node_port "$p")"
	start_node "$n"
	wait_streaming "$(node_port "$p")" "$(node_name "$n")" "$dir/$n.log"
	if [ -f "$dir/sync" ]; then
		set_sync "$(node_name "$n")"
	fi
	echo "cluster.sh: $n (127.0.0.1:$(node_port "$n")) streams from $p (127.0.0.1:$(node_port "$p"))" >&2
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

pg_status() {
	local n state
	for n in primary standby; do
		[ -f "$dir/$n.port" ] || continue
		if ! node_running "$n"; then
			state="stopped"
		elif [ "$(in_recovery "$n")" = t ]; then
			state="standby ($(node_name "$n"))"
		else
			state="primary (synchronous_standby_names = '$(psql_port "$(node_port "$n")" "SHOW synchronous_standby_names")')"
		fi
		echo "postgresql 127.0.0.1:$(node_port "$n"): $state"
	done
}

# --- RabbitMQ: nodes hare1..3@localhost beside the default node ---

rabbit_port() {
	local ports
	read -r -a ports <<<"$RABBIT_PORTS"
	echo "${ports[$(($1 - 1))]}"
}

# rabbit N CMD...: CMD as the rabbitmq user (HOME shares the default node's
# Erlang cookie) in node N's environment.
rabbit() {
	local n="$1" port rdir
	shift
	port="$(rabbit_port "$n")"
	rdir="$CLUSTER_DIR/rabbit/hare$n"
	runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq \
		RABBITMQ_NODENAME="hare$n@localhost" \
		RABBITMQ_NODE_PORT="$port" \
		RABBITMQ_DIST_PORT="$((port + 20000))" \
		RABBITMQ_CONFIG_FILE="$rdir/rabbitmq.conf" \
		RABBITMQ_CONF_ENV_FILE="$rdir/rabbitmq-env.conf" \
		RABBITMQ_ENABLED_PLUGINS_FILE="$rdir/enabled_plugins" \
		RABBITMQ_MNESIA_BASE="$rdir/mnesia" \
		RABBITMQ_LOG_BASE="$rdir/log" \
		RABBITMQ_PID_FILE="$rdir/pid" \
		"$@"
}

ctl() {
	local n="$1"
	shift
	rabbit "$n" rabbitmqctl -q -n "hare$n@localhost" "$@"
}

rabbit_answers() { ctl "$1" await_startup --timeout 5 >/dev/null 2>&1; }

rabbit_start() {
	local n="$1" i
	if [ -f "$CLUSTER_DIR/rabbit/hare$n/pid" ] && kill -0 "$(cat "$CLUSTER_DIR/rabbit/hare$n/pid")" 2>/dev/null &&
		rabbit_answers "$n"; then
		return 0
	fi
	rabbit "$n" rabbitmq-server -detached >/dev/null 2>&1
	# -detached returns before the node answers.
	for i in $(seq 1 60); do
		if rabbit_answers "$n"; then
			return 0
		fi
		sleep 0.5
	done
	echo "cluster.sh: RabbitMQ node hare$n did not start; its log:" >&2
	tail -n 30 "$CLUSTER_DIR/rabbit/hare$n/log/"*.log >&2 2>/dev/null || true
	exit 1
}

rabbit_init() {
	local n="$1" rdir
	rdir="$CLUSTER_DIR/rabbit/hare$n"
	mkdir -p "$rdir/mnesia" "$rdir/log"
	# Without a listener line the node would take 5672, the default node's.
	printf 'listeners.tcp.local = 127.0.0.1:%s\n' "$(rabbit_port "$n")" >"$rdir/rabbitmq.conf"
	# An env file of our own: the system one names the default node.
	printf '%s\n' 'ERL_EPMD_ADDRESS=127.0.0.1' \
		'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"' >"$rdir/rabbitmq-env.conf"
	echo '[].' >"$rdir/enabled_plugins"
	chown -R rabbitmq:rabbitmq "$CLUSTER_DIR/rabbit"
}

# rabbit_member N: hare1 lists node N among the cluster's nodes.
rabbit_member() {
	ctl 1 cluster_status --formatter json 2>/dev/null | grep -q "\"hare$1@localhost\""
}

rabbit_up() {
	local n
	mkdir -p "$CLUSTER_DIR/rabbit"
	for n in 1 2 3; do
		[ -f "$CLUSTER_DIR/rabbit/hare$n/rabbitmq.conf" ] || rabbit_init "$n"
		rabbit_start "$n"
	done
	for n in 2 3; do
		if rabbit_member "$n"; then
			continue
		fi
		ctl "$n" stop_app
		ctl "$n" reset
		ctl "$n" join_cluster hare1@localhost
		ctl "$n" start_app
	done
	echo "cluster.sh: RabbitMQ cluster hare1..3@localhost on AMQP ports $RABBIT_PORTS" >&2
}

rabbit_stop() { ctl "$1" stop >/dev/null 2>&1 || true; }

rabbit_kill() {
	local pid
	pid="$(cat "$CLUSTER_DIR/rabbit/hare$1/pid" 2>/dev/null || true)"
	if [ -z "$pid" ]; then
		echo "cluster.sh: no pid file for hare$1" >&2
		exit 1
	fi
	kill -9 "$pid" 2>/dev/null || true
	while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
	echo "cluster.sh: hare$1 (pid $pid) killed" >&2
}

rabbit_down() {
	local n pid
	for n in 1 2 3; do
		[ -d "$CLUSTER_DIR/rabbit/hare$n" ] || continue
		pid="$(cat "$CLUSTER_DIR/rabbit/hare$n/pid" 2>/dev/null || true)"
		if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
			rabbit_stop "$n"
			if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
		fi
	done
	rm -rf "$CLUSTER_DIR/rabbit"
}

rabbit_leader() {
	local n leader
	for n in 1 2 3; do
		[ -d "$CLUSTER_DIR/rabbit/hare$n" ] || continue
		if leader="$(ctl "$n" list_queues --no-table-headers name leader 2>/dev/null | awk -v q="$1" '$1 == q { print $2 }')" &&
			[ -n "$leader" ]; then
			leader="${leader#hare}"
			echo "${leader%%@*}"
			return 0
		fi
	done
	echo "cluster.sh: no node answers with a leader for queue $1" >&2
	exit 1
}

rabbit_status() {
	local n state
	for n in 1 2 3; do
		state=stopped
		if [ -d "$CLUSTER_DIR/rabbit/hare$n" ] && rabbit_answers "$n"; then state=running; fi
		echo "rabbitmq hare$n@localhost 127.0.0.1:$(rabbit_port "$n"): $state"
	done
}

# --- the whole topology ---

up() {
	mkdir -p "$CLUSTER_DIR"
	chmod 755 "$CLUSTER_DIR"
	rabbit_up
	dir="$CLUSTER_DIR/pg"
	PRIMARY_PORT="${PRIMARY_PORT_UP:-5441}"
	STANDBY_PORT="${STANDBY_PORT_UP:-5442}"
	if [ -d "$dir/primary" ] && current_primary >/dev/null; then
		echo "cluster.sh: the PostgreSQL pair under $dir runs already" >&2
	else
		if [ -e "$dir" ]; then pg_down; fi
		SYNC=on
		pg_up
	fi
}

down() {
	rabbit_down
	dir="$CLUSTER_DIR/pg"
	if [ -e "$dir" ]; then pg_down; fi
	rm -rf "$CLUSTER_DIR"
}

status() {
	rabbit_status
	dir="$CLUSTER_DIR/pg"
	pg_status
}

need_dir() { [ -n "$dir" ] || usage; }

# need_node: the argument is a RabbitMQ node number, 1 to 3.
need_node() {
	dir="${dir##*/}"
	case "$dir" in 1 | 2 | 3) ;; *) usage ;; esac
}

case "$cmd" in
up) up ;;
down) down ;;
status) status ;;
rabbit-stop) need_node; rabbit_stop "$dir" ;;
rabbit-kill) need_node; rabbit_kill "$dir" ;;
rabbit-start) need_node; rabbit_start "$dir" ;;
rabbit-leader) [ -n "${2:-}" ] || usage; rabbit_leader "$2" ;;
pg-up) need_dir; pg_up ;;
pg-down) need_dir; pg_down ;;
standby-stop) need_dir; standby_stop ;;
standby-start) need_dir; standby_start ;;
replication) need_dir; psql_primary "SELECT pid, application_name, state, sync_state FROM pg_stat_replication ORDER BY pid" ;;
pg-crash) need_dir; pg_crash ;;
pg-promote) need_dir; pg_promote ;;
pg-rejoin) need_dir; pg_rejoin ;;
pg-status) need_dir; pg_status ;;
*) usage ;;
esac
