-- A Luup plugin using sockproxyd, played with the real LuaSocket.
--
-- usage: lua5.1 plugin.lua <proxy port> <luup port> <device port> <device number> <out file>
--
-- The script is both sides of Luup: the plugin, which connects through the proxy and
-- reads its socket only when notified, and the Luup HTTP endpoint (the daemon was started
-- with -N http://127.0.0.1:<luup port>), which accepts each notification GET, answers
-- 200 and runs the plugin's receive handler. It stops at "closed", closes its socket, then
-- waits a second for a further notification (none must come: the end was announced), writes every byte it read to <out file> and prints a summary:
--   GREETING <id> / CONN <pid> / NOTIFY <request line> ... / NOTIFICATIONS <n> /
--   FINAL or NOFINAL / BYTES <n>
-- Any protocol surprise ends it with "FAIL: ..." on stderr and exit status 1.

local socket = require "socket"

local proxy_port, luup_port, dev_port, dev_num, out_file = ...
local SERVICE = "urn:example-com:serviceId:Example1"
local ACTION = "HandleReceive"

local function fail(msg)
    io.stderr:write("FAIL: ", msg, "\n")
    os.exit(1)
end

local function unescape(s)
    return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- Luup's side first, so no notification can find the port closed.
local luup = assert(socket.bind("127.0.0.1", tonumber(luup_port)))

-- The plugin's connect(), proxy path.
local sock = socket.tcp()
sock:settimeout(5)
local ok, err = sock:connect("127.0.0.1", tonumber(proxy_port))
if not ok then fail("connect to the proxy: " .. tostring(err)) end
local greeting, gerr = sock:receive("*l")
if not greeting or not greeting:match("^OK TOGGLEDBITS%-SOCKPROXY") then
    fail("greeting: " .. tostring(greeting or gerr))
end
local gid = greeting:match("^OK TOGGLEDBITS%-SOCKPROXY 1 (%x+)$")
if not gid then fail("greeting has no id: " .. greeting) end
print("GREETING " .. gid)

sock:send(string.format("CONN 127.0.0.1:%s NTFY=%s/%s/%s RTIM=600000 PACE=1\n",
    dev_port, dev_num, SERVICE, ACTION))
local ans, aerr = sock:receive("*l")
if not ans or not ans:match("^OK CONN") then fail("CONN answered " .. tostring(ans or aerr)) end
local pid = ans:match("^OK CONN (%S+)$")
if pid ~= gid then fail("OK CONN pid " .. tostring(pid) .. " is not the greeting id " .. gid) end
print("CONN " .. pid)

-- The plugin's HandleReceive action: read one byte at a time until it would block.
local received = {}
local closed = false
local function handle_receive()
    sock:settimeout(0)
    while true do
        local b, rerr = sock:receive(1)
        if b then
            received[#received + 1] = b
        elseif rerr == "closed" then
            closed = true
            return
        elseif rerr == "timeout" then
            return
        else
            fail("receive: " .. tostring(rerr))
        end
    end
end

-- Luup: accept one notification, check it, answer it. Returns its request line or nil.
local expected = string.format(
    "GET /data_request?id=action&output_format=json&DeviceNum=%s&serviceId=%s&action=%s&Pid=%s ",
    dev_num, SERVICE, ACTION, pid)
local function serve_one(timeout)
    luup:settimeout(timeout)
    local c = luup:accept()
    if not c then return nil end
    c:settimeout(5)
    local line, lerr = c:receive("*l")
    if not line then fail("notification without a request line: " .. tostring(lerr)) end
    local ua, conn
    while true do
        local h = c:receive("*l")
        if not h or h == "" then break end
        local k, v = h:match("^([^:]+):%s*(.-)%s*$")
        if k and k:lower() == "user-agent" then ua = v end
        if k and k:lower() == "connection" then conn = v:lower() end
    end
    c:send("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    c:close()
    if unescape(line):sub(1, #expected) ~= expected then
        fail("notification " .. line .. " does not match " .. expected)
    end
    if ua ~= "sockproxyd-1" then fail("User-Agent " .. tostring(ua)) end
    if conn ~= "close" then fail("Connection " .. tostring(conn)) end
    print("NOTIFY " .. line)
    return line
end

local notifications = 0
local deadline = socket.gettime() + 30
while not closed do
    if socket.gettime() > deadline then
        fail("no 'closed' within 30 s; " .. #received .. " bytes read, " .. notifications .. " notifications")
    end
    if serve_one(0.2) then
        notifications = notifications + 1
        handle_receive()
    end
end
print("NOTIFICATIONS " .. notifications)
sock:close()

-- The end of the stream was notified and the plugin has closed its socket: the daemon
-- sends no further ("final") notification for a connection the plugin has forgotten.
print(serve_one(1) and "FINAL" or "NOFINAL")

local data = table.concat(received)
local f = assert(io.open(out_file, "wb"))
f:write(data)
f:close()
print("BYTES " .. #data)
