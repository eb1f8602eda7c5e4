#!/bin/sh
### BEGIN INIT INFO
# Provides:          sockproxyd
# Required-Start:    $network $remote_fs
# Required-Stop:     $network $remote_fs
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# X-Start-Before:    openluup
# Short-Description: socket proxy for Vera/openLuup plugins
# Description:       sockproxyd passes data between Luup plugins and their
#                    devices and tells the plugin when data is waiting. Start
#                    it before openLuup so plugins find it on their first try.
### END INIT INFO
#
# SysV/LSB init script for sockproxyd on openLuup hosts (Debian, Raspbian,
# Ubuntu). POSIX sh. Install as /etc/init.d/sockproxyd, then
# `update-rc.d sockproxyd defaults` (see README.md, "Installing").
#
# Actions: start, stop, restart, reload (SIGHUP: the daemon re-reads its
# configuration and keeps its connections; one that does not parse changes
# nothing and is told in the log; 7 if not running), force-reload (reload if
# running, else start), status (LSB codes: 0 running, 1 dead with a pid file
# left, 3 not running), reopen-log (SIGHUP too, for logrotate's postrotate).
#
# Settings: the environment, then /etc/default/sockproxyd (or the file named
# by SOCKPROXYD_DEFAULTS), which wins; unset ones get these defaults:
#   DAEMON=/usr/local/bin/sockproxyd   the binary
#   CONFIG=/etc/sockproxyd.conf        INI file, passed as -c only if it exists
#   PIDFILE=/var/run/sockproxyd.pid
#   LOGFILE=/var/log/sockproxyd.log    passed as -L after -c (so it beats the
#                                      file's log=); the daemon's stderr goes
#                                      there too (a bad config is only told there)
#   DAEMON_OPTS=                       more options, after -L (e.g. "-D")
#   RUNNER=                            command prefix, e.g. qemu-mipsel-static
#   START_TIMEOUT=10, STOP_TIMEOUT=15  seconds to wait for ready / for exit
#   START_STOP_DAEMON=auto             "no": background with nohup instead

PATH=/sbin:/usr/sbin:/bin:/usr/bin${PATH:+:$PATH}
NAME=sockproxyd

DEFAULTS=${SOCKPROXYD_DEFAULTS:-/etc/default/$NAME}
if [ -r "$DEFAULTS" ]; then
	# shellcheck disable=SC1090 # the defaults file is the administrator's
	. "$DEFAULTS"
fi
: "${DAEMON:=/usr/local/bin/$NAME}"
: "${CONFIG=/etc/$NAME.conf}"
: "${PIDFILE:=/var/run/$NAME.pid}"
: "${LOGFILE:=/var/log/$NAME.log}"
: "${DAEMON_OPTS=}"
: "${RUNNER=}"
: "${START_TIMEOUT:=10}"
: "${STOP_TIMEOUT:=15}"
: "${START_STOP_DAEMON:=auto}"

# start-stop-daemon starts the daemon in /, so make relative paths absolute
# (a DAEMON without a slash is looked up in PATH and stays as it is).
abs() {
	case "$1" in
	/* | '') echo "$1" ;;
	*) echo "$PWD/$1" ;;
	esac
}
case "$DAEMON" in */*) DAEMON=$(abs "$DAEMON") ;; esac
CONFIG=$(abs "$CONFIG")
PIDFILE=$(abs "$PIDFILE")
LOGFILE=$(abs "$LOGFILE")

# Polling step: tenths of a second where sleep takes fractions (coreutils,
# most busybox builds), whole seconds elsewhere.
if sleep 0.1 2>/dev/null; then
	TICK=0.1 TICKS_PER_SEC=10
else
	TICK=1 TICKS_PER_SEC=1
fi

# The pid in PIDFILE, if it is a number.
read_pid() {
	[ -r "$PIDFILE" ] || return 1
	pid=
	read -r pid <"$PIDFILE" || [ -n "$pid" ] || return 1
	case "$pid" in
	'' | *[!0-9]*) return 1 ;;
	esac
	echo "$pid"
}

# Whether process $1 is alive and is our daemon. Where /proc is mounted: not
# a zombie that nobody reaped, and its command line names the binary (a pid
# reused by another program does not count; an empty command line is a
# process between fork and exec, such as ours just after start).
is_ours() {
	if [ ! -d /proc/self ]; then
		kill -0 "$1" 2>/dev/null
		return
	fi
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	state=${stat##*[)]}
	state=${state# }
	case "$state" in
	Z* | X* | x* | '') return 1 ;;
	esac
	cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline")
	case "$cmdline" in
	'' | *"${DAEMON##*/}"*) return 0 ;;
	esac
	return 1
}

# Lines in LOGFILE saying the command port is open.
ready_lines() {
	n=$(grep -c 'listening on .* (commands)' "$LOGFILE" 2>/dev/null)
	echo "${n:-0}"
}

last_log_line() {
	[ -s "$LOGFILE" ] && tail -n 1 "$LOGFILE"
}

do_start() {
	if pid=$(read_pid) && is_ours "$pid"; then
		echo "$NAME is already running (pid $pid)"
		return 0
	fi
	rm -f "$PIDFILE"
	if [ -z "$RUNNER" ] && [ ! -x "$DAEMON" ]; then
		echo "$NAME: $DAEMON is not an executable file" >&2
		return 5
	fi
	mkdir -p "${LOGFILE%/*}" "${PIDFILE%/*}" 2>/dev/null # both absolute now
	if ! : >>"$LOGFILE"; then
		echo "$NAME: cannot write to log file $LOGFILE" >&2
		return 1
	fi

	# -c first so that -L and DAEMON_OPTS override the file (options apply
	# left to right).
	set -- "$DAEMON"
	if [ -n "$CONFIG" ] && [ -e "$CONFIG" ]; then
		set -- "$@" -c "$CONFIG"
	fi
	set -- "$@" -L "$LOGFILE"
	set -f
	# shellcheck disable=SC2086 # RUNNER and DAEMON_OPTS are word lists
	set -- $RUNNER "$@" $DAEMON_OPTS
	set +f

	before=$(ready_lines)
	echo "$(date '+%Y-%m-%d %H:%M:%S') init: starting: $*" >>"$LOGFILE"
	# The daemon stays in the foreground, so we background it. `exec` keeps
	# its pid the one recorded; its stderr carries the errors it can report
	# before its log is open (a bad configuration file).
	if [ "$START_STOP_DAEMON" != no ] && command -v start-stop-daemon >/dev/null 2>&1; then
		# shellcheck disable=SC2016 # the inner sh expands $1 and $@
		start-stop-daemon --start --quiet --background --make-pidfile \
			--pidfile "$PIDFILE" --startas /bin/sh -- \
			-c 'log=$1; shift; exec "$@" </dev/null >>"$log" 2>&1' \
			"$NAME" "$LOGFILE" "$@"
	else
		nohup "$@" </dev/null >>"$LOGFILE" 2>&1 &
		echo $! >"$PIDFILE"
	fi

	# Ready when a new "listening on ... (commands)" line is logged; failed if
	# the process is gone first (bad configuration, port in use). If the log
	# goes elsewhere (a -L in DAEMON_OPTS), alive after START_TIMEOUT is ok.
	ticks=0
	limit=$((START_TIMEOUT * TICKS_PER_SEC))
	while :; do
		# start-stop-daemon may still be writing the pid file.
		if ! pid=$(read_pid) && [ "$ticks" -lt "$TICKS_PER_SEC" ]; then
			sleep "$TICK"
			ticks=$((ticks + 1))
			continue
		fi
		if [ -z "$pid" ] || ! is_ours "$pid"; then
			# Just forked: until the child has exec'd the daemon, its command
			# line is the shell's. Give it a second before calling it failed.
			if [ -n "$pid" ] && [ "$ticks" -lt "$TICKS_PER_SEC" ] && kill -0 "$pid" 2>/dev/null; then
				sleep "$TICK"
				ticks=$((ticks + 1))
				continue
			fi
			rm -f "$PIDFILE"
			echo "$NAME failed to start; the last line of $LOGFILE:" >&2
			last_log_line >&2
			return 1
		fi
		[ "$(ready_lines)" -gt "$before" ] && break
		if [ "$ticks" -ge "$limit" ]; then
			echo "$NAME started (pid $pid) but logged no 'listening on' line in $LOGFILE within ${START_TIMEOUT}s"
			return 0
		fi
		sleep "$TICK"
		ticks=$((ticks + 1))
	done
	echo "$NAME started (pid $pid)"
}

do_stop() {
	if ! pid=$(read_pid); then
		rm -f "$PIDFILE"
		echo "$NAME is not running"
		return 0
	fi
	if ! is_ours "$pid"; then
		rm -f "$PIDFILE"
		echo "$NAME is not running (removed stale pid file $PIDFILE)"
		return 0
	fi
	if ! kill -TERM "$pid"; then
		echo "$NAME: cannot signal pid $pid" >&2
		return 1
	fi
	# SIGTERM: the daemon closes every connection and sends the final
	# notifications that are due (each gives up after 5 s), then exits 0.
	ticks=0
	limit=$((STOP_TIMEOUT * TICKS_PER_SEC))
	while is_ours "$pid"; do
		if [ "$ticks" -ge "$limit" ]; then
			echo "$NAME (pid $pid) still running after ${STOP_TIMEOUT}s; sending SIGKILL" >&2
			kill -KILL "$pid" 2>/dev/null
			sleep 1
			if is_ours "$pid"; then
				echo "$NAME (pid $pid) survived SIGKILL" >&2
				return 1
			fi
			break
		fi
		sleep "$TICK"
		ticks=$((ticks + 1))
	done
	rm -f "$PIDFILE"
	echo "$NAME stopped"
}

do_status() {
	if ! pid=$(read_pid); then
		echo "$NAME is not running"
		return 3
	fi
	if is_ours "$pid"; then
		echo "$NAME is running (pid $pid)"
		return 0
	fi
	echo "$NAME is not running, but $PIDFILE remains (pid $pid)"
	return 1
}

do_reopen_log() {
	if pid=$(read_pid) && is_ours "$pid"; then
		kill -HUP "$pid" && echo "$NAME reopens $LOGFILE"
		return
	fi
	echo "$NAME is not running"
	return 7
}

# SIGHUP: the daemon reads its command line again (the -c file anew) and
# applies it without dropping connections; the outcome is one line in
# $LOGFILE ("configuration reloaded" or "not reloaded, ...: why").
do_reload() {
	if pid=$(read_pid) && is_ours "$pid"; then
		kill -HUP "$pid" && echo "$NAME reloads $CONFIG (the outcome is logged in $LOGFILE)"
		return
	fi
	echo "$NAME is not running"
	return 7
}

case "$1" in
start) do_start ;;
stop) do_stop ;;
restart)
	do_stop || exit 1
	do_start
	;;
reload) do_reload ;;
force-reload)
	if pid=$(read_pid) && is_ours "$pid"; then
		do_reload
	else
		do_start
	fi
	;;
status) do_status ;;
reopen-log) do_reopen_log ;;
*)
	echo "Usage: $0 {start|stop|restart|force-reload|reload|status|reopen-log}" >&2
	exit 2
	;;
esac
