-- Drives the client printed in docs/PROTOCOL.md ("A minimal client, with a fallback"),
-- which tests/lua.rs puts in front of this file with PROXY_PORT set to the test's port.
--
-- usage: lua5.1 <the client + this file> <echo device port>
--
-- Prints PROXIED <true|false>, GOT <the echoed line>, then STATE closed once the
-- device has ended the stream after our own shutdown("send").

local dev_port = ...
local sock, proxied = connect("127.0.0.1", tonumber(dev_port),
    "42/urn:example-com:serviceId:Example1/HandleReceive")
if not sock then
    io.stderr:write("FAIL: connect() returned nil, " .. tostring(proxied) .. "\n")
    os.exit(1)
end
print("PROXIED " .. tostring(proxied))

sock:send("PING\n")
-- drain() as a notification or a poll would call it, until the echo is complete.
local got, state = "", "timeout"
local deadline = socket.gettime() + 10
while not got:find("\n") and state ~= "closed" and socket.gettime() < deadline do
    local data
    data, state = drain(sock)
    got = got .. data
    socket.sleep(0.02)
end
print("GOT " .. (got:gsub("\n", "")))

-- Our end of the stream: the echo device answers with its own, which drain() reports.
sock:shutdown("send")
while state ~= "closed" and socket.gettime() < deadline do
    local _
    _, state = drain(sock)
    socket.sleep(0.02)
end
print("STATE " .. tostring(state))
sock:close()
