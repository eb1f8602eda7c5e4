-- The seed README's proxy-aware connect() sample, exactly as printed, run against
-- sockproxyd with the real LuaSocket.
--
-- usage: lua5.1 readme_connect.lua <proxy port> <device port>
--
-- The sample reads one line after sending CONN: that is the greeting, not "OK CONN", so
-- its handshake fails and it falls back to a direct connection. The script then says
-- HELLO-DIRECT on the socket it got back and prints:
--   LOCALPORT <port of our socket> / REPLY <the device's answer line>

local proxy_port, dev_port = ...

-- The sample hard-codes the proxy at 127.0.0.1:2504; steer that one connect to the
-- test daemon's port without touching the sample's text.
local socket = require "socket"
local tcp_methods = getmetatable(socket.tcp()).__index
local real_connect = tcp_methods.connect
tcp_methods.connect = function(self, host, port)
    if host == "127.0.0.1" and tonumber(port) == 2504 then
        port = tonumber(proxy_port)
    end
    return real_connect(self, host, port)
end

-- ---- begin sample (seed README, "Adapting Plugins/Applications - Details") ----
function connect( ip, port )
    local socket = require "socket"
    local sock = socket.tcp()
    sock:settimeout( 10 )
    -- Try proxy connection first
    if sock:connect( "127.0.0.1", 2504 ) then
        -- Accepted connection, connect proxy to target and go into echo mode
        sock:send( string.format( "CONN %s:%s\n", ip, port ) )
        local ans = sock:receive( "*l" )
        if ans:match( "^OK CONN" ) then
            -- Socket connected to proxy, and proxy is connected to remote in echo mode
            return true, sock
        end
        -- Unhappy handshake; close and get new socket for direct connection
        sock:shutdown("both")
        sock:close()
        sock = socket.tcp()
    end
    -- Connect directly to target
    if sock:connect( ip, port ) then
        return true, sock
    end
    sock:close()
    return nil -- failed to connect
end
-- ---- end sample ----

local ok, sock = connect("127.0.0.1", tonumber(dev_port))
if not ok then
    io.stderr:write("FAIL: connect() returned nil\n")
    os.exit(1)
end
local _, lport = sock:getsockname()
print("LOCALPORT " .. tostring(lport))
sock:settimeout(5)
sock:send("HELLO-DIRECT\n")
local reply, err = sock:receive("*l")
print("REPLY " .. tostring(reply or err))
sock:close()
