-- A stand-in for Luup, enough to run L_SockProxy1.lua under lua5.1
-- (tests/vera_plugin.rs): device variables kept in a file, so each run of run.lua
-- is one Luup start of the same device; log lines, call_delay and set_failure
-- recorded for the test to read.
--
--   local stub = dofile("luup.lua")
--   stub.install{ state = path, log = path, device = n, openluup = bool }
--                                            -- sets the global `luup`
--
-- State file: one variable a line, "device<TAB>serviceId<TAB>name<TAB>value",
-- with backslash, tab and newline in the value escaped as \\, \t, \n.

local M = { delays = {}, failures = {}, logs = {} }

local function escape(s)
	return (s:gsub("\\", "\\\\"):gsub("\t", "\\t"):gsub("\n", "\\n"))
end

local function unescape(s)
	return (s:gsub("\\(.)", { ["\\"] = "\\", t = "\t", n = "\n" }))
end

local vars = {}   -- vars[dev][sid][name] = value
local order = {}  -- keys in the order first set, so the file is stable

local function load(path)
	local f = io.open(path, "r")
	if not f then return end
	for line in f:lines() do
		local dev, sid, name, value = line:match("^(%d+)\t([^\t]*)\t([^\t]*)\t(.*)$")
		if dev then
			dev = tonumber(dev)
			vars[dev] = vars[dev] or {}
			vars[dev][sid] = vars[dev][sid] or {}
			vars[dev][sid][name] = unescape(value)
			order[#order + 1] = { dev, sid, name }
		end
	end
	f:close()
end

local function save(path)
	local f = assert(io.open(path .. ".tmp", "w"))
	for _, k in ipairs(order) do
		local v = vars[k[1]][k[2]][k[3]]
		f:write(string.format("%d\t%s\t%s\t%s\n", k[1], k[2], k[3], escape(v)))
	end
	f:close()
	assert(os.rename(path .. ".tmp", path))
end

function M.install(opts)
	load(opts.state)
	local logf = opts.log and assert(io.open(opts.log, "a"))
	luup = {
		variable_get = function(sid, name, dev)
			local d = vars[tonumber(dev)]
			local v = d and d[sid] and d[sid][name]
			return v, v and 0 or nil
		end,
		variable_set = function(sid, name, value, dev)
			dev = tonumber(dev)
			value = tostring(value)
			vars[dev] = vars[dev] or {}
			vars[dev][sid] = vars[dev][sid] or {}
			if vars[dev][sid][name] == nil then order[#order + 1] = { dev, sid, name } end
			vars[dev][sid][name] = value
			save(opts.state)
		end,
		call_delay = function(fname, seconds, data)
			M.delays[#M.delays + 1] = { fname = fname, seconds = seconds, data = data or "" }
		end,
		log = function(msg, level)
			level = level or 50
			M.logs[#M.logs + 1] = { level = level, msg = msg }
			io.stderr:write(string.format("luup.log %02d %s\n", level, msg))
			if logf then
				logf:write(string.format("%d\t%s\n", level, msg))
				logf:flush()
			end
		end,
		set_failure = function(value, dev)
			M.failures[#M.failures + 1] = { value = value, dev = dev }
		end,
		device = opts.device,
		openLuup = opts.openluup and { version = "stand-in" } or nil,
	}
	return M
end

-- Takes the delayed calls queued so far, in the order they would run.
function M.take_delays()
	local d = M.delays
	M.delays = {}
	table.sort(d, function(a, b) return a.seconds < b.seconds end)
	return d
end

return M
