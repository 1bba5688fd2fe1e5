-- wrk: one 1 KiB file per request, as a multipart form like 4CAT's send_files. Every name is new,
-- as in a real dataset (threads and runs get their own prefixes).
local boundary = "----dsmbench"
local payload = string.rep("x", 1024)
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  prefix = tostring(os.time()) .. "_" .. tostring(tid or 0) .. "_" .. tostring(math.random(1, 1000000000))
  counter = 0
end
function request()
  counter = counter + 1
  local body = "--" .. boundary .. "\r\n" ..
    "Content-Disposition: form-data; name=\"folder_name\"\r\n\r\nwrk\r\n" ..
    "--" .. boundary .. "\r\n" ..
    "Content-Disposition: form-data; name=\"4cat_uploads\"; filename=\"f" .. prefix .. "_" .. counter .. ".txt\"\r\n" ..
    "Content-Type: text/plain\r\n\r\n" .. payload .. "\r\n" ..
    "--" .. boundary .. "--\r\n"
  return wrk.format("POST", wrk.path, {["Content-Type"] = "multipart/form-data; boundary=" .. boundary}, body)
end
