-- bench/run.py's wrk script: bounds a run in count as well as in time.
-- `wrk ... -s bench/wrk_bounded.lua URL -- LIMIT`: each thread stops after LIMIT requests
-- (0 = no limit). The request itself is the one wrk builds from the command line
-- (method, path, -H headers such as `Connection: close`), formatted once per thread.
local limit = 0
local sent = 0
local req

function init(args)
  limit = tonumber(args[1]) or 0
  req = wrk.format()
end

function request()
  sent = sent + 1
  if limit > 0 and sent > limit then
    wrk.thread:stop()
  end
  return req
end
