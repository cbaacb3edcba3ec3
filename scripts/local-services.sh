#!/usr/bin/env bash
# local-services.sh: make THIS machine's own PostgreSQL, RabbitMQ and NATS ready for
# outbox-relay and its integration tests (no Docker involved).
#
# Idempotent and non-destructive: it never drops data. It may
#   - install postgresql / rabbitmq-server with apt-get when they are missing,
#   - write conf.d/95-outbox-relay.conf (wal_level=logical and enough slots and
#     walsenders) and restart PostgreSQL when a setting is too low,
#   - add loopback `trust` lines to pg_hba.conf and reload,
#   - start PostgreSQL and RabbitMQ when they are not running,
#   - install nats-server with apt-get when it is missing and start it with
#     JetStream (-js, store in /var/lib/nats-server) when nothing answers on
#     NATS_PORT.
#
# Environment: PGPORT (default 5432), AMQP_PORT (default 5672), NATS_PORT
# (default 4222),
# OUTBOX_RABBITMQ_MANAGEMENT=1 also enables the management plugin (slow, off
# by default).
set -euo pipefail

PGPORT="${PGPORT:-5432}"
AMQP_PORT="${AMQP_PORT:-5672}"
NATS_PORT="${NATS_PORT:-4222}"
WANT_SLOTS=64
WANT_SENDERS=64
CONF_NAME="95-outbox-relay.conf"
HBA_MARK="# outbox-relay: loopback access for local tests (scripts/local-services.sh)"

log() { printf 'local-services: %s\n' "$*" >&2; }
die() { printf 'local-services: ERROR: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
	command -v sudo >/dev/null 2>&1 || die "not root and sudo is missing; run as root"
	SUDO="sudo"
fi

# --- packages ---------------------------------------------------------------

have_pg_server() { compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; }

pkgs=()
if ! command -v psql >/dev/null 2>&1 || ! command -v pg_ctlcluster >/dev/null 2>&1 || ! have_pg_server; then
	pkgs+=(postgresql)
fi
if ! command -v rabbitmq-server >/dev/null 2>&1 || ! command -v rabbitmqctl >/dev/null 2>&1; then
	pkgs+=(rabbitmq-server)
fi
if [ "${#pkgs[@]}" -gt 0 ]; then
	command -v apt-get >/dev/null 2>&1 || die "missing ${pkgs[*]} and apt-get is not available; install them by hand"
	log "installing ${pkgs[*]} with apt-get"
	$SUDO apt-get update -qq || die "apt-get update failed"
	$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null ||
		die "apt-get install ${pkgs[*]} failed"
fi

# --- PostgreSQL ---------------------------------------------------------------

# The cluster on $PGPORT, else the newest one.
cluster_line="$(pg_lsclusters -h 2>/dev/null | awk -v p="$PGPORT" '$3 == p' | head -n1)"
if [ -z "$cluster_line" ]; then
	cluster_line="$(pg_lsclusters -h 2>/dev/null | sort -V | tail -n1)"
fi
if [ -z "$cluster_line" ]; then
	ver="$(find /usr/lib/postgresql -maxdepth 1 -mindepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n1)"
	[ -n "$ver" ] || die "no PostgreSQL server found under /usr/lib/postgresql"
	log "no PostgreSQL cluster: creating $ver/main on port $PGPORT"
	$SUDO pg_createcluster --port "$PGPORT" "$ver" main >/dev/null || die "pg_createcluster $ver main failed"
	cluster_line="$(pg_lsclusters -h | awk -v p="$PGPORT" '$3 == p' | head -n1)"
fi
read -r PGVER PGCLUSTER cport _ <<<"$cluster_line"
[ "$cport" = "$PGPORT" ] || die "PostgreSQL cluster $PGVER/$PGCLUSTER listens on $cport, not $PGPORT; set PGPORT=$cport"
CONF_DIR="/etc/postgresql/$PGVER/$PGCLUSTER"
[ -d "$CONF_DIR" ] || die "PostgreSQL config dir $CONF_DIR not found"
log "PostgreSQL $PGVER/$PGCLUSTER on port $PGPORT ($CONF_DIR)"

pgctl() { $SUDO pg_ctlcluster --skip-systemctl-redirect "$PGVER" "$PGCLUSTER" "$@"; }
pg_online() { pg_lsclusters -h | awk -v v="$PGVER" -v c="$PGCLUSTER" '$1 == v && $2 == c {print $4}' | grep -q online; }

# psql as the postgres OS user over the socket (peer auth works even before
# the loopback trust lines exist).
pg_sql() {
	if [ "$(id -u)" -eq 0 ]; then
		runuser -u postgres -- psql -X -Atq -v ON_ERROR_STOP=1 -p "$PGPORT" -d postgres -c "$1"
	else
		sudo -u postgres psql -X -Atq -v ON_ERROR_STOP=1 -p "$PGPORT" -d postgres -c "$1"
	fi
}

wait_pg() {
	for _ in $(seq 1 60); do
		pg_isready -q -h 127.0.0.1 -p "$PGPORT" && return 0
		sleep 1
	done
	die "PostgreSQL does not answer on 127.0.0.1:$PGPORT (see /var/log/postgresql/postgresql-$PGVER-$PGCLUSTER.log)"
}

if ! pg_online; then
	log "starting PostgreSQL"
	pgctl start || die "pg_ctlcluster $PGVER $PGCLUSTER start failed"
fi
wait_pg

# Settings that need a restart: write only those that are too low now (or that
# our file already carries, so a rewrite never loses one).
conf_file="$CONF_DIR/conf.d/$CONF_NAME"
wal_level="$(pg_sql 'SHOW wal_level')"
slots="$(pg_sql 'SHOW max_replication_slots')"
senders="$(pg_sql 'SHOW max_wal_senders')"
in_file() { [ -f "$conf_file" ] && grep -Eq "^[[:space:]]*$1[[:space:]]*=" "$conf_file"; }
settings=()
need_restart=0
if [ "$wal_level" != logical ]; then need_restart=1; fi
if [ "$slots" -lt "$WANT_SLOTS" ]; then need_restart=1; fi
if [ "$senders" -lt "$WANT_SENDERS" ]; then need_restart=1; fi
if [ "$need_restart" -eq 1 ]; then
	if [ "$wal_level" != logical ] || in_file wal_level; then settings+=("wal_level = logical"); fi
	if [ "$slots" -lt "$WANT_SLOTS" ] || in_file max_replication_slots; then settings+=("max_replication_slots = $WANT_SLOTS"); fi
	if [ "$senders" -lt "$WANT_SENDERS" ] || in_file max_wal_senders; then settings+=("max_wal_senders = $WANT_SENDERS"); fi
	log "wal_level=$wal_level max_replication_slots=$slots max_wal_senders=$senders: writing $conf_file"
	if grep -Eq "^[[:space:]]*include_dir[[:space:]]*=[[:space:]]*'conf.d'" "$CONF_DIR/postgresql.conf"; then
		$SUDO mkdir -p "$CONF_DIR/conf.d"
		{
			echo "# Written by outbox-relay scripts/local-services.sh: logical decoding for the relay."
			printf '%s\n' "${settings[@]}"
		} | $SUDO tee "$conf_file" >/dev/null
	else
		log "postgresql.conf has no include_dir 'conf.d': using ALTER SYSTEM instead"
		for s in "${settings[@]}"; do
			pg_sql "ALTER SYSTEM SET ${s%% =*} = '${s##*= }'" >/dev/null
		done
	fi
	log "restarting PostgreSQL"
	pgctl restart || die "pg_ctlcluster $PGVER $PGCLUSTER restart failed"
	wait_pg
	wal_level="$(pg_sql 'SHOW wal_level')"
	[ "$wal_level" = logical ] ||
		die "wal_level is still '$wal_level' after restart; look for an override: SELECT sourcefile, setting FROM pg_settings WHERE name = 'wal_level'"
fi
log "wal_level=logical max_replication_slots=$(pg_sql 'SHOW max_replication_slots') max_wal_senders=$(pg_sql 'SHOW max_wal_senders')"

# pg_hba.conf: passwordless loopback access for user postgres (tests use
# postgres://postgres@127.0.0.1) and replication lines. Lines are matched
# first-to-last, so ours go at the top.
hba="$(pg_sql 'SHOW hba_file')"
[ -f "$hba" ] || die "pg_hba.conf not found at $hba"
hba_has() { $SUDO grep -Eq "^[[:space:]]*host[[:space:]]+$1[[:space:]]+all[[:space:]]+$2[[:space:]]+trust" "$hba"; }
add=()
if ! psql -X -Atq -w -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -c 'SELECT 1' >/dev/null 2>&1; then
	add+=("host all all 127.0.0.1/32 trust" "host all all ::1/128 trust")
fi
hba_has replication '127\.0\.0\.1/32' || add+=("host replication all 127.0.0.1/32 trust")
hba_has replication '::1/128' || add+=("host replication all ::1/128 trust")
if [ "${#add[@]}" -gt 0 ]; then
	log "adding to $hba: ${add[*]}"
	[ -f "$hba.outbox-relay.bak" ] || $SUDO cp -p "$hba" "$hba.outbox-relay.bak"
	tmp="$(mktemp)"
	{
		echo "$HBA_MARK"
		printf '%s\n' "${add[@]}"
		$SUDO cat "$hba"
	} >"$tmp"
	# cat into the file keeps its owner and mode.
	$SUDO tee "$hba" <"$tmp" >/dev/null
	rm -f "$tmp"
	pg_sql 'SELECT pg_reload_conf()' >/dev/null
	bad="$(pg_sql 'SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL')"
	[ "$bad" = 0 ] || die "$hba has errors after the edit (backup: $hba.outbox-relay.bak)"
fi
psql -X -Atq -w -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -c 'SELECT 1' >/dev/null ||
	die "cannot connect as postgres@127.0.0.1:$PGPORT without a password"
log "PostgreSQL ready: postgres://postgres@127.0.0.1:$PGPORT/postgres"

# --- NATS (JetStream) -----------------------------------------------------------

nats_up() { (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null; }
if ! nats_up; then
	nats_bin=/usr/sbin/nats-server
	[ -x "$nats_bin" ] || nats_bin="$(command -v nats-server || true)"
	if [ -z "$nats_bin" ]; then
		command -v apt-get >/dev/null 2>&1 || die "nats-server is missing and apt-get is not available; install it by hand"
		log "installing nats-server with apt-get"
		$SUDO apt-get update -qq || die "apt-get update failed"
		$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nats-server >/dev/null ||
			die "apt-get install nats-server failed"
		nats_bin=/usr/sbin/nats-server
		[ -x "$nats_bin" ] || nats_bin="$(command -v nats-server)" || die "nats-server not found after installing it"
	fi
	log "starting nats-server with JetStream on 127.0.0.1:$NATS_PORT"
	$SUDO mkdir -p /var/lib/nats-server
	$SUDO start-stop-daemon --start --oknodo --background --exec "$nats_bin" -- \
		-a 127.0.0.1 -p "$NATS_PORT" -js -sd /var/lib/nats-server -l /var/log/nats-server.log ||
		die "starting nats-server failed"
	for _ in $(seq 1 30); do
		nats_up && break
		sleep 1
	done
	nats_up || die "NATS does not answer on 127.0.0.1:$NATS_PORT (see /var/log/nats-server.log)"
fi
log "NATS ready: nats://127.0.0.1:$NATS_PORT"

# --- RabbitMQ ---------------------------------------------------------------

if ! $SUDO rabbitmqctl -q status >/dev/null 2>&1; then
	log "starting RabbitMQ"
	$SUDO rabbitmq-server -detached || die "rabbitmq-server -detached failed"
	$SUDO rabbitmqctl -q await_startup --timeout 120 >/dev/null ||
		die "RabbitMQ did not start (see /var/log/rabbitmq/)"
fi
if [ "${OUTBOX_RABBITMQ_MANAGEMENT:-0}" = 1 ]; then
	log "enabling rabbitmq_management"
	$SUDO rabbitmq-plugins -q enable rabbitmq_management >/dev/null || die "enabling rabbitmq_management failed"
fi
for _ in $(seq 1 60); do
	if (exec 3<>"/dev/tcp/127.0.0.1/$AMQP_PORT") 2>/dev/null; then
		log "RabbitMQ ready: amqp://guest:guest@127.0.0.1:$AMQP_PORT/"
		exit 0
	fi
	sleep 1
done
die "RabbitMQ does not answer on 127.0.0.1:$AMQP_PORT"
