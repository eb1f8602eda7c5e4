-- Plays the original Lua sockproxyd for tests/vera_plugin.rs (it stands where the
-- original plugin unpacked sockproxyd.lua): greets on the command port like it,
-- answers no command, and runs until killed. Listens on loopback only.
--
--   lua5.1 sockproxyd.lua -p <port> [-L logfile]
local socket = require "socket"
local port, logfile
local i = 1
while arg[i] do
	if arg[i] == "-p" then port = tonumber(arg[i + 1]) end
	if arg[i] == "-L" then logfile = arg[i + 1] end
	i = i + 2
end
assert(port, "usage: sockproxyd.lua -p <port> [-L logfile]")
local server = assert(socket.bind("127.0.0.1", port))
if logfile then
	local f = io.open(logfile, "a")
	if f then
		f:write("old lua proxy listening on port " .. port .. "\n")
		f:close()
	end
end
local n = 0
while true do
	local c = server:accept()
	if c then
		n = n + 1
		c:send(string.format("OK TOGGLEDBITS-SOCKPROXY 1 lua%d\n", n))
		c:settimeout(1)
		local line = c:receive("*l")
		if line then c:send("ERR INVALID COMMAND\n") end
		c:close()
	end
end
