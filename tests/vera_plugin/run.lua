-- Runs L_SockProxy1.lua as Luup would, for tests/vera_plugin.rs:
--
--   lua5.1 run.lua <dir> <step>...
--
-- <dir>/test.lua returns { plugin = path, device = n, openluup = bool, env = {...} };
-- env becomes SOCKPROXY_ENV (the plugin's paths, commands and port). Device variables
-- live in <dir>/luup-state, Luup log lines in <dir>/luup-log. Steps, in order:
--   startup  calls startup(device), prints "STARTUP <ok> <message>"
--   check    calls proxy_check("") as the 5-minute timer does
--   soon     runs the calls luup.call_delay queued so far for within a minute (the
--            first check after a start, the check after a restart), in time order
--   sleep=N  lets N seconds pass (a restarted daemon gets to say why it failed)
-- Then prints one "DELAY <seconds> <function> <data>" line per call still queued and
-- one "FAILURE <value>" line per luup.set_failure call.

local dir = assert(arg[1], "usage: run.lua <dir> <step>...")
local here = arg[0]:match("^(.*)/[^/]*$") or "."
local stub = dofile(here .. "/luup.lua")
local cfg = dofile(dir .. "/test.lua")

stub.install{ state = dir .. "/luup-state", log = dir .. "/luup-log", device = cfg.device,
	openluup = cfg.openluup }
SOCKPROXY_ENV = cfg.env
dofile(cfg.plugin)

for i = 2, #arg do
	local step = arg[i]
	if step == "startup" then
		local ok, msg = startup(cfg.device)
		print(string.format("STARTUP %s %s", tostring(ok), tostring(msg)))
	elseif step == "check" then
		proxy_check("")
	elseif step == "soon" then
		local later = {}
		for _, d in ipairs(stub.take_delays()) do
			if d.seconds <= 60 then
				print(string.format("RUN %d %s %s", d.seconds, d.fname, d.data))
				_G[d.fname](d.data)
			else
				later[#later + 1] = d
			end
		end
		for _, d in ipairs(later) do table.insert(stub.delays, 1, d) end
	elseif step:match("^sleep=%d+$") then
		-- Real time passing, as it does on a Vera before a delayed call runs.
		os.execute("sleep " .. step:match("%d+"))
	else
		error("unknown step " .. step)
	end
end

for _, d in ipairs(stub.delays) do
	print(string.format("DELAY %d %s %s", d.seconds, d.fname, d.data))
end
for _, f in ipairs(stub.failures) do
	print(string.format("FAILURE %s", tostring(f.value)))
end
