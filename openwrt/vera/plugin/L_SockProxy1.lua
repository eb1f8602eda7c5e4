-- L_SockProxy1.lua: the SockProxy plugin for Vera and openLuup, for sockproxyd (the
-- Rust socket proxy that replaces toggledbits' Lua sockproxyd on port 2504).
--
-- On Vera, at every Luup start, it installs or upgrades the daemon uploaded beside it
-- (sockproxyd-mipsel, or sockproxyd-mipsel.lzo once Vera has compressed it) as the boot
-- service /etc/init.d/sockproxyd, started before LuaUPnP; an install of the original
-- Lua proxy is replaced in place, and nothing is rebooted: only the service restarts.
-- Whether the upload is new is decided by its content (md5sum of the unpacked file
-- against the installed one), not by its version line: a rebuild of the same version
-- is installed, the same file again is not. A first install writes a settings file
-- that listens on loopback only; an existing one is never touched.
-- Whatever goes wrong, the proxy that ran before keeps running and `Message` says why,
-- in the daemon's own words where it said something (its log, or on procd firmware
-- its stderr, which procd passes to the system log).
-- On openLuup the plugin installs nothing (the host's init system runs the daemon).
-- Everywhere it checks every 5 minutes that the proxy greets on its port; on Vera it
-- restarts the service once when it does not.
--
-- Device and service identity are the original plugin's, so an existing SockProxy
-- device upgrades in place. Lua 5.1 and LuaSocket, as on Vera; no other modules.
--
-- State variables (service urn:toggledbits-com:serviceId:SockProxy1):
--   Status         1 the proxy greeted at the last check, 0 it did not
--   Message        one line for people: what the plugin saw or did last
--   Version        protocol version from the greeting ("1")
--   Build          the daemon's build, from its answer to BILD (empty if it has none)
--   ConfigVersion  what the installer last installed: the daemon's --version line and
--                  the init script's revision (not a number, so the original plugin,
--                  if it is put back, reinstalls its own files)

local PLUGIN_NAME = "SockProxy1"
local PLUGIN_VERSION = "2.0"
local MYSID = "urn:toggledbits-com:serviceId:SockProxy1"

-- The revision of the init scripts below; bump it when either changes, so installed
-- systems get the new one.
local INIT_REVISION = 2
-- Seconds between health checks (as the original), and before the first one.
local CHECK_INTERVAL = 300
local FIRST_CHECK = 15
-- Seconds from a restart to the check that tells whether it helped.
local RECHECK_DELAY = 15
-- A log bigger than this (in RAM, under /tmp) is moved aside at the next check.
local LOG_MAX = 256 * 1024

local socket = require "socket"

-- Every path and command the installer uses, in one place. Before this file is loaded,
-- a global SOCKPROXY_ENV table may change any of them by name (tests point them at a
-- scratch directory and stand-ins); its `root` is put in front of every path marked
-- rooted that it does not name itself.
local DEFAULTS = {
	root = "",
	plugin_dir = "/etc/cmh-ludl",         -- rooted: where Vera keeps uploaded files
	upload = "sockproxyd-mipsel",         -- the uploaded daemon, maybe with ".lzo"
	bin = "/usr/bin/sockproxyd",          -- rooted: where the daemon is installed
	initd = "/etc/init.d/sockproxyd",     -- rooted
	rcd = "/etc/rc.d",                    -- rooted: S/K links, as rc.common's enable
	procd = "/sbin/procd",                -- rooted: present = procd-style script
	conf = "/etc/sockproxyd.conf",        -- rooted: daemon settings, passed as -c
	logfile = "/tmp/sockproxyd.log",      -- rooted: in RAM; the flash is small
	pidfile = "/var/run/sockproxyd.pid",  -- rooted
	tmp = "/tmp",                         -- rooted: scratch (unpacked upload, output)
	proc = "/proc",                       -- who holds the port, when stop did not free it
	arch_ref = "/bin/sh",                 -- a program of this box's architecture
	lzo = "pluto-lzo",                    -- `lzo d IN OUT` expands Vera's .lzo files
	md5sum = "md5sum",                    -- `md5sum FILE` (busybox has it)
	logread = "logread",                  -- the system log, where procd puts stderr
	runner = "",                          -- prefix for running the daemon (an emulator)
	rc = "",                              -- prefix for running the init script
	host = "127.0.0.1",                   -- where the health check connects...
	port = false,                         -- ...false: [host] port= of conf, else 2504;
	                                      --    a number also goes in a first conf file
	start_timeout = 15,                   -- seconds for a started daemon to greet
	stop_timeout = 15,                    -- seconds for a stopped one to free the port
	check_timeout = 10,                   -- seconds for the greeting at a health check
}
local ROOTED = {
	plugin_dir = true, bin = true, initd = true, rcd = true, procd = true,
	conf = true, logfile = true, pidfile = true, tmp = true,
}

local env = {}
do
	local over = type(SOCKPROXY_ENV) == "table" and SOCKPROXY_ENV or {}
	local root = over.root or DEFAULTS.root
	for k, v in pairs(DEFAULTS) do
		if over[k] ~= nil then
			env[k] = over[k]
		elseif ROOTED[k] then
			env[k] = root .. v
		else
			env[k] = v
		end
	end
end

local pluginDevice
local lastDown          -- why the proxy was down at the last failed check
local restartMark       -- daemonMark() before the health check's restart
local installNote       -- why the last install or upgrade did not happen, if it did not

local function isOpenLuup()
	return luup.openLuup ~= nil and luup.openLuup ~= false
end

local function log(level, fmt, ...)
	luup.log(PLUGIN_NAME .. ": " .. string.format(fmt, ...), level)
end

local function getVar(name)
	local v = luup.variable_get(MYSID, name, pluginDevice)
	return v
end

local function setVar(name, value)
	value = tostring(value == nil and "" or value)
	if getVar(name) ~= value then
		luup.variable_set(MYSID, name, value, pluginDevice)
	end
end

-- ---------------------------------------------------------------------------------------
-- Files and commands

-- A word the shell passes on unchanged.
local function q(s)
	return "'" .. (tostring(s):gsub("'", "'\\''")) .. "'"
end

local function readFile(path)
	local f = io.open(path, "rb")
	if not f then return nil end
	local s = f:read("*a")
	f:close()
	return s
end

local function writeFile(path, text)
	local f, err = io.open(path, "wb")
	if not f then return nil, err end
	local ok, werr = f:write(text)
	local cok, cerr = f:close()
	if not ok then return nil, werr end
	if not cok then return nil, cerr end
	return true
end

local function exists(path)
	local f = io.open(path, "rb")
	if f then f:close() return true end
	return false
end

local function basename(path)
	return (path:match("([^/]+)$")) or path
end

local function dirname(path)
	return (path:match("^(.*)/[^/]*$")) or "."
end

local function firstLine(s)
	return (tostring(s or ""):match("^%s*([^\r\n]*)")) or ""
end

-- Runs a shell command with its output in a file, not a pipe (a daemon it starts
-- in the background must not hold our end open). Returns success and the output.
local outSeq = 0
local function run(cmd)
	outSeq = outSeq + 1
	local out = string.format("%s/sockproxy-plugin.%d.out", env.tmp, outSeq)
	local rc = os.execute("( " .. cmd .. " ) </dev/null >" .. q(out) .. " 2>&1")
	local text = readFile(out) or ""
	os.remove(out)
	return rc == 0 or rc == true, (text:gsub("%s+$", ""))
end

-- Runs the init script with one action (start, stop, restart, rotate).
local function service(action)
	local prefix = env.rc ~= "" and (env.rc .. " ") or ""
	local ok, out = run(prefix .. q(env.initd) .. " " .. action)
	log(ok and 50 or 2, "%s %s: %s", env.initd, action, ok and "ok" or "failed")
	if out ~= "" then log(50, "%s %s said: %s", env.initd, action, out) end
	return ok, out
end

-- What the daemon says goes to its log file, except what it says before the file is
-- open (a bad setting), which goes to stderr: into the log file under the plain script,
-- into the system log under procd ("... daemon.err sockproxyd[pid]: <line>").
local function syslogLines()
	local ok, out = run(env.logread)
	local lines = {}
	if not ok then return lines end
	for line in out:gmatch("[^\n]+") do
		local said = line:match("sockproxyd%[%d+%]: (.*)$")
		if said then lines[#lines + 1] = line end
	end
	return lines
end

-- Where the daemon's words stand before a start: the log file's size and the
-- system log's sockproxyd lines, so that only what comes after is quoted.
local function daemonMark()
	local f = io.open(env.logfile, "rb")
	local size = 0
	if f then
		size = f:seek("end") or 0
		f:close()
	end
	local seen = {}
	for _, line in ipairs(syslogLines()) do seen[line] = true end
	return { size = size, seen = seen }
end

-- The daemon's last words since `mark` ("; the daemon said: ..."), or "". A line from
-- stderr (the system log) comes first: it is the one that says why it exited.
local function daemonSaid(mark)
	mark = mark or { size = 0, seen = {} }
	local said
	for _, line in ipairs(syslogLines()) do
		if not mark.seen[line] then said = line:match("sockproxyd%[%d+%]: (.*)$") end
	end
	if not said then
		local f = io.open(env.logfile, "rb")
		if f then
			local size = f:seek("end") or 0
			-- A log moved aside since the mark starts again from its beginning.
			f:seek("set", size >= mark.size and mark.size or 0)
			local text = f:read("*a") or ""
			f:close()
			for line in text:gmatch("[^\n]+") do said = line end
		end
	end
	if not said or said:match("^%s*$") then return "" end
	return "; the daemon said: " .. said:sub(1, 200)
end

-- ---------------------------------------------------------------------------------------
-- The daemon's endpoint and the health probe

-- The address and port the daemon listens on: [host] ip= and port= from its
-- configuration file, read as the daemon reads them.
local function endpoint()
	local ip, port
	local section
	for line in (readFile(env.conf) or ""):gmatch("[^\r\n]+") do
		line = line:match("^%s*(.-)%s*$")
		if line:sub(1, 1) == "[" then
			section = (line:match("^%[%s*(.-)%s*%]") or ""):lower()
		elseif section == "host" and line:sub(1, 1) ~= ";" then
			local k, v = line:match("^([^=]-)%s*=%s*(.*)$")
			k = k and k:lower()
			if k == "port" then port = tonumber(v) end
			if k == "ip" then ip = v end
		end
	end
	local host = env.host
	if ip and ip:match("^%d+%.%d+%.%d+%.%d+$") and ip ~= "0.0.0.0" then host = ip end
	return host, tonumber(env.port) or port or 2504
end

-- Connects, reads the greeting, asks for the build (BILD), hangs up. Returns
-- { version, build } or nil and the reason.
local function probe(timeout)
	local host, port = endpoint()
	local sock = socket.tcp()
	sock:settimeout(timeout)
	local ok, err = sock:connect(host, port)
	if not ok then
		sock:close()
		return nil, string.format("cannot connect to %s:%d (%s)", host, port, tostring(err))
	end
	local line, rerr = sock:receive("*l")
	if not line then
		sock:close()
		return nil, string.format("no greeting from %s:%d (%s)", host, port, tostring(rerr))
	end
	local version = line:match("^OK TOGGLEDBITS%-SOCKPROXY (%d+)")
	if not version then
		sock:close()
		return nil, string.format("%s:%d is not a socket proxy (it said %q)", host, port,
			line:sub(1, 60))
	end
	local build
	if sock:send("BILD\n") then
		local reply = sock:receive("*l")
		build = reply and reply:match("^OK (%S+)")
	end
	sock:close()
	return { version = version, build = build }
end

local function sleep(seconds)
	socket.sleep(seconds)
end

-- Probes until the proxy greets, for up to `timeout` seconds.
local function waitUp(timeout)
	local deadline = socket.gettime() + timeout
	local info, why
	repeat
		info, why = probe(2)
		if info then return info end
		sleep(0.25)
	until socket.gettime() >= deadline
	return nil, why
end

-- Whether nothing accepts connections on the port any more, within `timeout` seconds.
local function waitFree(timeout)
	local host, port = endpoint()
	local deadline = socket.gettime() + timeout
	repeat
		local sock = socket.tcp()
		sock:settimeout(1)
		local ok = sock:connect(host, port)
		sock:close()
		if not ok then return true end
		sleep(0.25)
	until socket.gettime() >= deadline
	return false
end

-- The processes listening on TCP `port`, as { pid = command line }: the socket's inode
-- from /proc/net/tcp{,6}, then the process holding it among /proc/<pid>/fd.
local function portHolders(port)
	local inodes, any = {}, false
	for _, name in ipairs({ "/net/tcp", "/net/tcp6" }) do
		for line in (readFile(env.proc .. name) or ""):gmatch("[^\n]+") do
			-- sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
			local lport, st, inode = line:match(
				"^%s*%d+:%s+%x+:(%x+)%s+%x+:%x+%s+(%x+)%s+%S+%s+%S+%s+%S+%s+%d+%s+%d+%s+(%d+)")
			if lport and tonumber(lport, 16) == port and st == "0A" then
				inodes[inode] = true
				any = true
			end
		end
	end
	local holders = {}
	if not any then return holders end
	local _, out = run("ls -l " .. q(env.proc) .. "/[0-9]*/fd 2>/dev/null")
	local pid
	for line in out:gmatch("[^\n]+") do
		local dir = line:match("/(%d+)/fd:$")
		if dir then
			pid = dir
		else
			local inode = line:match("socket:%[(%d+)%]")
			if pid and inode and inodes[inode] then
				local cmd = (readFile(env.proc .. "/" .. pid .. "/cmdline") or ""):gsub("%z", " ")
				holders[pid] = cmd
			end
		end
	end
	return holders
end

-- ---------------------------------------------------------------------------------------
-- The daemon binary

local MACHINES = { [3] = "x86", [8] = "MIPS", [20] = "PowerPC", [40] = "ARM",
	[62] = "x86-64", [183] = "AArch64" }

-- "script" for a #! file, a table for an ELF file, nil for anything else.
local function programKind(path)
	local f = io.open(path, "rb")
	if not f then return nil end
	local h = f:read(20) or ""
	f:close()
	if h:sub(1, 2) == "#!" then return "script" end
	if #h < 20 or h:sub(1, 4) ~= "\127ELF" then return nil end
	local class, data, lo, hi = h:byte(5), h:byte(6), h:byte(19), h:byte(20)
	return {
		class = class,
		data = data,
		machine = data == 2 and (lo * 256 + hi) or (hi * 256 + lo),
	}
end

local function archName(a)
	return string.format("%s %s %s", MACHINES[a.machine] or ("machine " .. a.machine),
		a.class == 2 and "64-bit" or "32-bit", a.data == 2 and "big-endian" or "little-endian")
end

-- The `--version` line of the daemon at `path` ("sockproxyd 0.1.0 (build 26331)"), or
-- nil and why it cannot run here. A file that is not a program of this box's kind is
-- never run: the shell would try to read it as a script.
local function daemonVersion(path)
	local kind = programKind(path)
	if kind == nil then
		return nil, "it is not a program (no ELF header)"
	end
	if kind ~= "script" and env.runner == "" then
		local here = programKind(env.arch_ref)
		if type(here) == "table" and (here.machine ~= kind.machine or here.data ~= kind.data
				or here.class ~= kind.class) then
			return nil, string.format("it is built for %s and this controller is %s",
				archName(kind), archName(here))
		end
	end
	local prefix = env.runner ~= "" and (env.runner .. " ") or ""
	local ok, out = run(prefix .. q(path) .. " --version")
	local version = firstLine(out):match("^(sockproxyd%s+%S.*)$")
	if not ok or not version then
		return nil, "it does not run here" .. (out ~= "" and (": " .. firstLine(out):sub(1, 120)) or "")
	end
	return version
end

-- The uploaded daemon: its path and whether Vera compressed it.
local function findUpload()
	local plain = env.plugin_dir .. "/" .. env.upload
	if exists(plain) then return plain, false end
	if exists(plain .. ".lzo") then return plain .. ".lzo", true end
	return nil
end

-- A runnable copy of the upload in the scratch directory.
local function unpackUpload(src, packed)
	local stage = env.tmp .. "/sockproxyd.upload"
	os.remove(stage)
	local ok, out
	if packed then
		ok, out = run(q(env.lzo) .. " d " .. q(src) .. " " .. q(stage))
	else
		ok, out = run("cp " .. q(src) .. " " .. q(stage))
	end
	if ok then ok, out = run("chmod 755 " .. q(stage)) end
	if not ok or not exists(stage) then
		os.remove(stage)
		return nil, out ~= "" and firstLine(out) or "no output file"
	end
	return stage
end

-- The md5 sum of the file at `path`, or nil if md5sum cannot tell.
local function fileSum(path)
	local ok, out = run(env.md5sum .. " " .. q(path))
	local sum = ok and firstLine(out):match("^(%x+)%s")
	return sum and sum:lower() or nil
end

-- Whether the files `a` and `b` hold the same bytes: by md5 sum, or where md5sum
-- does not run, by reading both. Also returns `b`'s sum when known.
local function sameContent(a, b)
	local sa, sb = fileSum(a), fileSum(b)
	if sa and sb then return sa == sb, sb end
	local x, y = readFile(a), readFile(b)
	return x ~= nil and x == y, sb
end

-- ---------------------------------------------------------------------------------------
-- The init scripts. @NAME@ is replaced by the shell-quoted value; the result is compared
-- with what is installed, so it holds nothing that changes from one start to the next.

local PROCD_SCRIPT = [==[#!/bin/sh /etc/rc.common
# shellcheck shell=sh
# shellcheck disable=SC2034 # START, STOP, USE_PROCD and EXTRA_* are read by /etc/rc.common
#
# sockproxyd as a procd service on Vera. Written by the SockProxy plugin
# (L_SockProxy1.lua), which writes it again at each Luup start if it differs:
# put settings in CONFIG (read by the daemon at start), not here.
# procd restarts the daemon if it dies; the plugin checks it every 5 minutes.
# Commands: start, stop, restart, enable, disable, rotate (log to .old, reopened).
# sockproxyd-plugin-init @REVISION@

# Before LuaUPnP, so plugins find the proxy on their first connect.
START=@START@
STOP=@STOP@
USE_PROCD=1

PROG=@PROG@
CONFIG=@CONFIG@
LOGFILE=@LOGFILE@
PIDFILE=@PIDFILE@
LOG_MAX_KB=256

EXTRA_COMMANDS="rotate"
EXTRA_HELP="	rotate	Move the log to LOGFILE.old and reopen it"

start_service() {
	mkdir -p "${LOGFILE%/*}" "${PIDFILE%/*}"
	sp_size=$(wc -c 2>/dev/null <"$LOGFILE") || sp_size=0
	[ "${sp_size:-0}" -le $((LOG_MAX_KB * 1024)) ] || mv -f "$LOGFILE" "$LOGFILE.old"
	procd_open_instance
	if [ -f "$CONFIG" ]; then
		procd_set_param command "$PROG" -c "$CONFIG" -L "$LOGFILE"
	else
		procd_set_param command "$PROG" -L "$LOGFILE"
	fi
	# Up to 5 restarts 5 s apart, counted afresh after an hour up: a bad
	# setting (the daemon exits at once) does not loop forever.
	procd_set_param respawn 3600 5 5
	procd_set_param pidfile "$PIDFILE"
	# What it says before its log is open (why a setting is bad) goes to
	# stderr: into the system log (logread), where the plugin looks for it.
	procd_set_param stderr 1
	# At stop it closes every connection and sends the final notifications
	# (each bounded by 5 s) before it exits: wait that long before SIGKILL.
	procd_set_param term_timeout 10
	procd_close_instance
}

rotate() {
	sp_pid=
	read -r sp_pid 2>/dev/null <"$PIDFILE"
	case "$sp_pid" in
	'' | *[!0-9]*)
		echo "sockproxyd is not running"
		return 1
		;;
	esac
	mv -f "$LOGFILE" "$LOGFILE.old" && kill -HUP "$sp_pid"
}
]==]

local PLAIN_SCRIPT = [==[#!/bin/sh /etc/rc.common
# shellcheck shell=sh
# shellcheck disable=SC2034 # START, STOP and EXTRA_* are read by /etc/rc.common
#
# sockproxyd as a boot service on Vera firmware without procd. Written by the
# SockProxy plugin (L_SockProxy1.lua), which writes it again at each Luup start
# if it differs: put settings in CONFIG (read by the daemon at start), not here.
# No respawn here: the plugin checks the proxy every 5 minutes and restarts it.
# Commands: start, stop, restart, enable, disable, status, rotate (log to .old,
# reopened).
# sockproxyd-plugin-init @REVISION@

# Before LuaUPnP, so plugins find the proxy on their first connect.
START=@START@
STOP=@STOP@

PROG=@PROG@
CONFIG=@CONFIG@
LOGFILE=@LOGFILE@
PIDFILE=@PIDFILE@
LOG_MAX_KB=256

EXTRA_COMMANDS="status rotate"
EXTRA_HELP="	status	Tell whether sockproxyd is running
	rotate	Move the log to LOGFILE.old and reopen it"

# Prints the daemon's pid: the pid file names a live process running PROG.
sp_pid() {
	[ -r "$PIDFILE" ] || return 1
	sp_p=
	read -r sp_p <"$PIDFILE" || [ -n "$sp_p" ] || return 1
	case "$sp_p" in
	'' | *[!0-9]*) return 1 ;;
	esac
	sp_stat=$(cat "/proc/$sp_p/stat" 2>/dev/null) || return 1
	sp_state=${sp_stat##*[)]}
	sp_state=${sp_state# }
	case "$sp_state" in
	Z* | X* | '') return 1 ;;
	esac
	case "$(tr '\0' ' ' 2>/dev/null <"/proc/$sp_p/cmdline")" in
	*"${PROG##*/}"*) echo "$sp_p" ;;
	*) return 1 ;;
	esac
}

# Closes every descriptor above 2. When the plugin starts the service, the
# caller is LuaUPnP: the daemon would hold its sockets (port 3480 among them)
# for life and keep a restarted LuaUPnP from listening. Busybox ash closes
# any descriptor; a shell that takes one digit only (dash) closes 3 to 9.
sp_close_fds() {
	sp_multi=
	(eval 'exec 19>&-') 2>/dev/null && sp_multi=1
	for sp_fd in /proc/self/fd/*; do
		sp_fd=${sp_fd##*/}
		case "$sp_fd" in
		'' | *[!0-9]* | 0 | 1 | 2) continue ;;
		esac
		[ "$sp_fd" -le 9 ] || [ -n "$sp_multi" ] || continue
		eval "exec $sp_fd>&-"
	done
}

start() {
	if sp_p=$(sp_pid); then
		echo "sockproxyd is already running (pid $sp_p)"
		return 0
	fi
	rm -f "$PIDFILE"
	if [ ! -x "$PROG" ]; then
		echo "sockproxyd: $PROG is not an executable file" >&2
		return 1
	fi
	mkdir -p "${LOGFILE%/*}" "${PIDFILE%/*}"
	sp_size=$(wc -c 2>/dev/null <"$LOGFILE") || sp_size=0
	[ "${sp_size:-0}" -le $((LOG_MAX_KB * 1024)) ] || mv -f "$LOGFILE" "$LOGFILE.old"
	set -- "$PROG"
	[ -f "$CONFIG" ] && set -- "$@" -c "$CONFIG"
	set -- "$@" -L "$LOGFILE"
	# The daemon stays in the foreground; its stderr holds what it says
	# before its log is open (a bad configuration file).
	(
		sp_close_fds
		exec "$@" </dev/null >>"$LOGFILE" 2>&1
	) &
	echo $! >"$PIDFILE"
	# A bad setting makes it exit at once: give that a moment to show.
	sleep 1
	if ! sp_p=$(sp_pid); then
		rm -f "$PIDFILE"
		echo "sockproxyd failed to start: $(tail -n 1 "$LOGFILE" 2>/dev/null)" >&2
		return 1
	fi
	echo "sockproxyd started (pid $sp_p)"
}

stop() {
	if ! sp_p=$(sp_pid); then
		rm -f "$PIDFILE"
		echo "sockproxyd is not running"
		return 0
	fi
	kill -TERM "$sp_p" || return 1
	# It closes every connection and sends the final notifications that are
	# due (each bounded by 5 s), then exits.
	sp_n=0
	while sp_pid >/dev/null; do
		if [ "$sp_n" -ge 15 ]; then
			echo "sockproxyd (pid $sp_p) still running after 15 s; killing it" >&2
			kill -KILL "$sp_p" 2>/dev/null
			sleep 1
			break
		fi
		sleep 1
		sp_n=$((sp_n + 1))
	done
	rm -f "$PIDFILE"
	echo "sockproxyd stopped"
}

status() {
	if sp_p=$(sp_pid); then
		echo "sockproxyd is running (pid $sp_p)"
		return 0
	fi
	echo "sockproxyd is not running"
	return 3
}

rotate() {
	sp_p=$(sp_pid) || {
		echo "sockproxyd is not running"
		return 1
	}
	mv -f "$LOGFILE" "$LOGFILE.old" && kill -HUP "$sp_p"
}
]==]

local SCRIPT_MARK = "sockproxyd-plugin-init "
-- Stop late at shutdown, before the network: final notifications go to Luup.
local STOP_AT = "85"

-- The start number: 45, after the network (S20) and before LuaUPnP; lower if an rc.d
-- link that starts Luup (cmh, luup, luvit in its name) comes at 45 or before.
local function startNumber(listing)
	local lowest
	for name in listing:gmatch("[^\n]+") do
		local n, what = name:match("^S(%d+)(.*)$")
		local w = (what or ""):lower()
		if n and w ~= "sockproxyd" and (w:find("cmh", 1, true) or w:find("luup", 1, true)
				or w:find("luvit", 1, true)) then
			n = tonumber(n)
			if not lowest or n < lowest then lowest = n end
		end
	end
	local start = 45
	if lowest and lowest <= start then start = math.max(lowest - 1, 1) end
	return string.format("%02d", start)
end

local function initScript(procd, start)
	local values = {
		REVISION = tostring(INIT_REVISION),
		START = start,
		STOP = STOP_AT,
		PROG = q(env.bin),
		CONFIG = q(env.conf),
		LOGFILE = q(env.logfile),
		PIDFILE = q(env.pidfile),
	}
	return ((procd and PROCD_SCRIPT or PLAIN_SCRIPT):gsub("@(%u+)@", values))
end

-- rc.d entries of the service, sorted, and the directory's whole listing.
local function rcLinks()
	local _, listing = run("ls -1 " .. q(env.rcd))
	local links = {}
	for name in listing:gmatch("[^\n]+") do
		if name:match("^[SK]%d+sockproxyd$") then links[#links + 1] = name end
	end
	table.sort(links)
	return links, listing
end

local function sameList(a, b)
	if #a ~= #b then return false end
	for i = 1, #a do
		if a[i] ~= b[i] then return false end
	end
	return true
end

-- Makes the rc.d links `names` point at the init script, as rc.common's enable does.
local function link(names)
	local target = env.initd
	if dirname(env.initd) == dirname(env.rcd) .. "/init.d" then
		target = "../init.d/" .. basename(env.initd)
	end
	local cmd = "mkdir -p " .. q(env.rcd)
	for _, name in ipairs(names) do
		cmd = cmd .. " && ln -sf " .. q(target) .. " " .. q(env.rcd .. "/" .. name)
	end
	return run(cmd)
end

local function unlink(names)
	for _, name in ipairs(names) do os.remove(env.rcd .. "/" .. name) end
end

local function configVersion(version)
	return string.format("%s; init %d", version, INIT_REVISION)
end

-- The settings file a first install writes: loopback only, since every plugin on the
-- controller connects to 127.0.0.1:2504 and the protocol has no authentication.
local function firstSettings()
	local port = tonumber(env.port)
	return table.concat({
		"; sockproxyd settings (INI), written by the SockProxy plugin at its first install.",
		"; The plugin never rewrites this file: edit it, then restart the proxy",
		"; (/etc/init.d/sockproxyd restart). Every key is described in the sockproxyd",
		"; sources: README.md \"Configuration file\" and \"Security\".",
		"",
		"[host]",
		"; Loopback only: the plugins on this controller reach the proxy at",
		"; 127.0.0.1:2504, and nothing on the network can use it to connect anywhere.",
		"; To serve other machines too (an openLuup elsewhere), listen on every",
		"; interface and name the machines allowed, for example:",
		";   ip=*",
		";   allow=127.0.0.1 192.168.1.10",
		"ip=127.0.0.1",
		port and ("port=" .. port) or ";port=2504",
		"",
	}, "\n")
end

-- ---------------------------------------------------------------------------------------
-- Install and upgrade

-- Stops whatever serves the port now (the original Lua proxy, or ours) and disables it.
-- Returns true once the port is free, or nil and why.
local function stopCurrent(hadScript, oldLinks)
	if hadScript then service("stop") end
	unlink(oldLinks)
	if waitFree(env.stop_timeout) then return true end
	-- Something else started it (by hand, or a script that lost track of it).
	local _, port = endpoint()
	local others = {}
	for pid, cmd in pairs(portHolders(port)) do
		if cmd:find("sockproxyd", 1, true) then
			log(2, "stopping pid %s, still on port %d: %s", pid, port, cmd)
			run("kill -TERM " .. pid)
		else
			others[#others + 1] = string.format("pid %s (%s)", pid, cmd)
		end
	end
	if #others == 0 and waitFree(5) then return true end
	for pid, cmd in pairs(portHolders(port)) do
		if cmd:find("sockproxyd", 1, true) then run("kill -KILL " .. pid) end
	end
	if waitFree(2) then return true end
	return nil, string.format("port %d is still in use%s", port,
		#others > 0 and (" by " .. table.concat(others, ", ")) or "")
end

-- Installs the uploaded daemon and its init script where they differ from what is
-- installed, and restarts the service if anything changed. Returns a message and true,
-- or nil and why nothing changed (the running proxy then is the one that ran before).
local function install()
	run("mkdir -p " .. q(env.tmp))
	os.remove(env.bin .. ".new")
	os.remove(env.initd .. ".new")

	local hadBin = exists(env.bin)
	local installed = hadBin and daemonVersion(env.bin) or nil
	local src, packed = findUpload()
	local version, stage
	if src then
		local err
		stage, err = unpackUpload(src, packed)
		if not stage then
			return nil, string.format("cannot unpack %s (%s)", src, err)
		end
		version, err = daemonVersion(stage)
		if not version then
			os.remove(stage)
			return nil, string.format("%s: %s", basename(src), err)
		end
	elseif installed then
		version = installed
	else
		return nil, string.format("no daemon to install: upload %s with the plugin files",
			env.upload)
	end

	local oldLinks, listing = rcLinks()
	local start = startNumber(listing)
	local procd = exists(env.procd)
	local want = initScript(procd, start)
	local old = readFile(env.initd)
	local wantLinks = { "K" .. STOP_AT .. "sockproxyd", "S" .. start .. "sockproxyd" }
	table.sort(wantLinks)
	-- The content decides, not the version line: a rebuild keeps its version.
	local newBinary, sum = false, nil
	if stage then
		local same
		same, sum = sameContent(env.bin, stage)
		newBinary = not (hadBin and same)
	end
	local writeConf = not hadBin and not exists(env.conf)
	if not newBinary and not writeConf and old == want and sameList(oldLinks, wantLinks) then
		if stage then os.remove(stage) end
		setVar("ConfigVersion", configVersion(version))
		log(50, "installation is up to date: %s", version)
		return "up to date: " .. version
	end

	-- Everything new is written beside the old first: a full flash fails here, before
	-- the running proxy is touched.
	local what = {}
	if newBinary then
		local ok, out = run("cp " .. q(stage) .. " " .. q(env.bin .. ".new") .. " && chmod 755 "
			.. q(env.bin .. ".new"))
		os.remove(stage)
		if not ok then
			os.remove(env.bin .. ".new")
			return nil, string.format("cannot write %s.new (%s); is the flash full? (df -h /)",
				env.bin, firstLine(out))
		end
		local short = sum and (" (md5 " .. sum:sub(1, 8) .. ")") or ""
		if installed == version then
			what[#what + 1] = "installed a rebuild of " .. version .. short
		elseif installed then
			what[#what + 1] = "upgraded " .. installed .. " to " .. version .. short
		else
			what[#what + 1] = "installed " .. version .. short
		end
	elseif stage then
		os.remove(stage)
	end
	local newScript = old ~= want
	if newScript then
		local ok, err = writeFile(env.initd .. ".new", want)
		if ok then ok, err = run("chmod 755 " .. q(env.initd .. ".new")) end
		if not ok then
			os.remove(env.bin .. ".new")
			os.remove(env.initd .. ".new")
			return nil, string.format("cannot write %s.new (%s)", env.initd, tostring(err))
		end
		what[#what + 1] = (old == nil and "wrote " or "rewrote ") .. env.initd
			.. (procd and " (procd)" or "") .. ", START=" .. start
		if old and not old:find(SCRIPT_MARK, 1, true) then
			what[#what + 1] = old:find("sockproxyd%.lua") and "replaced the original Lua proxy"
				or "replaced the previous proxy's service"
		end
	end
	if writeConf then
		what[#what + 1] = "wrote " .. env.conf .. " (listens on loopback only)"
	end
	if #what == 0 then what[1] = "enabled " .. env.initd .. ", START=" .. start end
	log(50, "%s", table.concat(what, "; "))

	-- The switch: stop the old, put the new in place, start it. On any failure, put
	-- back what was moved and start the old again.
	local placedBin, placedScript, placedConf = false, false, false
	local function rollback(why)
		log(1, "install failed: %s; putting the previous installation back", why)
		service("stop")
		unlink(wantLinks)
		if placedBin then
			if hadBin then
				os.rename(env.bin .. ".old", env.bin)
			else
				os.remove(env.bin)
			end
		end
		os.remove(env.bin .. ".new")
		os.remove(env.initd .. ".new")
		if placedScript then
			if old then
				writeFile(env.initd, old)
				run("chmod 755 " .. q(env.initd))
			else
				os.remove(env.initd)
			end
		end
		if placedConf then os.remove(env.conf) end
		link(oldLinks)
		local back
		if old then
			service("start")
			back = waitUp(env.start_timeout)
		end
		return nil, why .. (back and "; the previous proxy runs again" or
			(old and "; the previous proxy did not start again either" or ""))
	end

	local freed, why = stopCurrent(old ~= nil, oldLinks)
	if not freed then
		return rollback("cannot stop the running proxy: " .. why)
	end
	if newBinary then
		if hadBin then os.rename(env.bin, env.bin .. ".old") end
		placedBin = true
		local rok, rerr = os.rename(env.bin .. ".new", env.bin)
		if not rok then return rollback("cannot move the daemon into place: " .. tostring(rerr)) end
	end
	if newScript then
		placedScript = true
		local rok, rerr = os.rename(env.initd .. ".new", env.initd)
		if not rok then
			return rollback("cannot move the init script into place: " .. tostring(rerr))
		end
	end
	if writeConf then
		placedConf = true
		local wok, werr = writeFile(env.conf, firstSettings())
		if not wok then
			return rollback("cannot write " .. env.conf .. ": " .. tostring(werr))
		end
	end
	local lok, lout = link(wantLinks)
	if not lok then return rollback("cannot enable the service: " .. firstLine(lout)) end
	local mark = daemonMark()
	local sok, sout = service("start")
	local info, down = waitUp(env.start_timeout)
	if not info then
		return rollback(string.format("the new daemon did not start (%s)%s%s", down,
			(not sok and sout ~= "") and ("; start said: " .. firstLine(sout)) or "",
			daemonSaid(mark)))
	end
	os.remove(env.bin .. ".old")
	setVar("ConfigVersion", configVersion(version))
	setVar("Version", info.version)
	if info.build then setVar("Build", info.build) end
	local msg = table.concat(what, "; ") .. "; started"
	log(50, "%s", msg)
	return msg
end

-- ---------------------------------------------------------------------------------------
-- Health check

local function withNote(msg)
	return installNote and (msg .. "; " .. installNote) or msg
end

local function rotateLogIfBig()
	if isOpenLuup() then return end
	local f = io.open(env.logfile, "rb")
	if not f then return end
	local size = f:seek("end") or 0
	f:close()
	if size > LOG_MAX and (readFile(env.initd) or ""):find(SCRIPT_MARK, 1, true) then
		service("rotate")
	end
end

-- Called by luup.call_delay: every CHECK_INTERVAL seconds with "", and RECHECK_DELAY
-- seconds after a restart with "recheck".
function proxy_check(data)
	pluginDevice = pluginDevice or luup.device
	local recheck = data == "recheck"
	if not recheck then luup.call_delay("proxy_check", CHECK_INTERVAL, "") end
	local info, why = probe(env.check_timeout)
	if info then
		if getVar("Status") ~= "1" then log(50, "the proxy is up (protocol %s)", info.version) end
		setVar("Status", 1)
		setVar("Version", info.version)
		setVar("Build", info.build or "")
		local msg = "Up; protocol " .. info.version .. (info.build and (", build " .. info.build) or "")
		if recheck and lastDown then msg = msg .. "; restarted after: " .. lastDown end
		setVar("Message", withNote(msg))
		luup.set_failure(0, pluginDevice)
		lastDown = nil
		rotateLogIfBig()
		return
	end
	log(1, "health check: the proxy is down: %s", why)
	setVar("Status", 0)
	luup.set_failure(1, pluginDevice)
	if recheck then
		setVar("Message", withNote("Down after a restart: " .. why .. daemonSaid(restartMark)))
		return
	end
	lastDown = why
	if isOpenLuup() or not exists(env.initd) then
		setVar("Message", withNote("Down: " .. why))
		return
	end
	restartMark = daemonMark()
	local ok = service("restart")
	setVar("Message", withNote(string.format("Down: %s; %s, checking again in %d s", why,
		ok and "restarted the service" or "tried to restart the service", RECHECK_DELAY)))
	luup.call_delay("proxy_check", RECHECK_DELAY, "recheck")
end

-- The HandleReceive action (S_SockProxy1.xml): a notification target that accepts and
-- ignores, for trying the proxy by hand (NTFY=<this device>/<its serviceId>/HandleReceive).
function sockproxy_handle_receive(dev, settings)
	log(50, "HandleReceive, Pid %s", tostring(settings and settings.Pid))
	return true
end

function startup(dev)
	pluginDevice = tonumber(dev) or luup.device
	log(50, "starting version %s on device %s%s", PLUGIN_VERSION, tostring(dev),
		isOpenLuup() and " (openLuup)" or "")
	setVar("Status", 0)
	installNote = nil
	local ok, msg = true, "Waiting for the first health check"
	if isOpenLuup() then
		msg = msg .. " (openLuup: the host starts the daemon)"
	else
		setVar("Message", "Checking the installation...")
		local done, why = install()
		if done then
			msg = done:sub(1, 1):upper() .. done:sub(2) .. "; first health check in "
				.. FIRST_CHECK .. " s"
		else
			ok = false
			installNote = "not installed: " .. why
			msg = "Not installed: " .. why
			log(1, "%s", msg)
		end
	end
	setVar("Message", msg)
	luup.call_delay("proxy_check", FIRST_CHECK, "")
	if not ok then
		luup.set_failure(1, dev)
		return false, "Install failed: see Message", PLUGIN_NAME
	end
	luup.set_failure(0, dev)
	return true, "", PLUGIN_NAME
end
