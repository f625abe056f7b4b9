"""Lua scripts that make each job state change one atomic Redis operation.

State changes are one-way: queued -> running -> succeeded | failed | cancelled. A finished job is
never changed again, whatever message arrives late or twice.
"""

from __future__ import annotations

from worker.protocol import JOB_SECONDS_BUCKETS, QUEUE_CHANGED, Channels, Keys

# Cluster counters (see Keys.stats) are updated inside the scripts that make the state change, so
# each job is counted once, exactly when it finishes. Their key names are written into the script
# text (Kiln runs on one Redis, not Redis Cluster).
_OBSERVE_FINISHED = f"""
local function kiln_observe(phase, value)
  if value == nil or value < 0 then return end
  local le = "+Inf"
  for _, bound in ipairs({{{", ".join(f'"{b}"' for b in JOB_SECONDS_BUCKETS)}}}) do
    if value <= tonumber(bound) then le = bound; break end
  end
  redis.call("HINCRBY", "{Keys.stats("job-seconds")}", phase .. ":" .. le, 1)
  redis.call("HINCRBYFLOAT", "{Keys.stats("job-seconds")}", phase .. ":sum", value)
  redis.call("HINCRBY", "{Keys.stats("job-seconds")}", phase .. ":count", 1)
end
local function kiln_count_finished(job, status, finished_at)
  redis.call("HINCRBY", "{Keys.stats("jobs")}", status, 1)
  local created = tonumber(redis.call("HGET", job, "created_at"))
  local started = tonumber(redis.call("HGET", job, "started_at"))
  if created then kiln_observe("total", finished_at - created) end
  if started then
    kiln_observe("run", finished_at - started)
    if created then kiln_observe("queued", started - created) end
  end
end
"""

# KEYS: job, pending, tenant_jobs, tenant_active, sequence, idempotency ("" when none), queue list
# ARGV: job id, tenant queue cap, idempotency ttl, priority score base, created_at, task message,
#       the job hash's field/value pairs as one JSON list of strings (one argument instead of ~40:
#       redis-py packs each argument in Python, on the submit path)
# Returns {job_id, number, created(1|0)}: {existing job id, 0, 0} when the idempotency key was seen,
# {"", -1, 0} when the tenant is over its cap, {"", -2, 0} when the job id is taken. Tells every
# websocket that the queue changed (``Channels.broadcast``), in the same step.
CREATE_JOB = f"""
local idem = KEYS[6]
if idem ~= "" then
  local existing = redis.call("GET", idem)
  if existing then return {{existing, 0, 0}} end
end
if redis.call("EXISTS", KEYS[1]) == 1 then return {{"", -2, 0}} end
local cap = tonumber(ARGV[2])
if cap > 0 and redis.call("SCARD", KEYS[4]) >= cap then
  return {{"", -1, 0}}
end
local number = redis.call("INCR", KEYS[5])
redis.call("HSET", KEYS[1], "number", number, unpack(cjson.decode(ARGV[7])))
redis.call("ZADD", KEYS[2], tonumber(ARGV[4]) * 1e12 + number, ARGV[1])
redis.call("ZADD", KEYS[3], tonumber(ARGV[5]), ARGV[1])
redis.call("SADD", KEYS[4], ARGV[1])
if idem ~= "" then
  redis.call("SET", idem, ARGV[1], "EX", tonumber(ARGV[3]))
end
redis.call("LPUSH", KEYS[7], ARGV[6])
redis.call("PUBLISH", "{Channels.broadcast()}", '{QUEUE_CHANGED}')
return {{ARGV[1], number, 1}}
"""

# KEYS: job, pending, running
# ARGV: worker id, started_at
# Returns the status before the call; "missing" when there is no such job. Queued and running
# (a redelivery after a lost worker) jobs are claimed; finished ones are left alone.
CLAIM_JOB = """
local status = redis.call("HGET", KEYS[1], "status")
if not status then return "missing" end
if status == "queued" or status == "running" then
  if redis.call("HGET", KEYS[1], "cancel_requested") == "true" then return "cancel" end
  redis.call("HSET", KEYS[1], "status", "running", "worker", ARGV[1], "started_at", ARGV[2])
  redis.call("HINCRBY", KEYS[1], "attempts", 1)
  redis.call("ZREM", KEYS[2], redis.call("HGET", KEYS[1], "id"))
  redis.call("SADD", KEYS[3], redis.call("HGET", KEYS[1], "id"))
end
return status
"""

# KEYS: job, pending, running, tenant_active
# ARGV: final status, finished_at, history ttl seconds, then field/value pairs
# Returns 1 when the job was finished by this call, 0 when it had already finished. Tells every
# websocket that the queue changed.
FINISH_JOB = (
    _OBSERVE_FINISHED
    + f"""
local status = redis.call("HGET", KEYS[1], "status")
if not status or status == "succeeded" or status == "failed" or status == "cancelled" then
  return 0
end
local id = redis.call("HGET", KEYS[1], "id")
local fields = {{}}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call("HSET", KEYS[1], "status", ARGV[1], "finished_at", ARGV[2], unpack(fields))
redis.call("ZREM", KEYS[2], id)
redis.call("SREM", KEYS[3], id)
redis.call("SREM", KEYS[4], id)
kiln_count_finished(KEYS[1], ARGV[1], tonumber(ARGV[2]))
local ttl = tonumber(ARGV[3])
if ttl > 0 then redis.call("EXPIRE", KEYS[1], ttl) end
redis.call("PUBLISH", "{Channels.broadcast()}", '{QUEUE_CHANGED}')
return 1
"""
)

# KEYS: job, pending, running
# ARGV: priority score base
# Puts a running job back in the queue (soft shutdown); returns 1 when it did.
REQUEUE_JOB = """
if redis.call("HGET", KEYS[1], "status") ~= "running" then return 0 end
local id = redis.call("HGET", KEYS[1], "id")
local number = tonumber(redis.call("HGET", KEYS[1], "number"))
redis.call("HSET", KEYS[1], "status", "queued")
redis.call("HDEL", KEYS[1], "worker", "started_at", "progress")
redis.call("SREM", KEYS[3], id)
redis.call("ZADD", KEYS[2], tonumber(ARGV[1]) * 1e12 + number, id)
return 1
"""

# KEYS: job, pending, running, tenant_active, webhook outbox
# ARGV: finished_at, history ttl seconds, error JSON, webhook delivery JSON ("" = none)
# Returns "cancelled" (it was queued), "cancelling" (running: the worker is told), or the final status.
# A queued job is finished here, so its webhook is queued here too (no worker will finish it), once
# per job: the ``webhook_queued`` marker is the one worker/webhooks.py ``enqueue`` sets.
CANCEL_JOB = (
    _OBSERVE_FINISHED
    + f"""
local status = redis.call("HGET", KEYS[1], "status")
if not status then return "missing" end
local id = redis.call("HGET", KEYS[1], "id")
if status == "queued" then
  redis.call("HSET", KEYS[1], "status", "cancelled", "finished_at", ARGV[1], "error", ARGV[3],
             "cancel_requested", "true")
  redis.call("ZREM", KEYS[2], id)
  redis.call("SREM", KEYS[4], id)
  kiln_count_finished(KEYS[1], "cancelled", tonumber(ARGV[1]))
  if ARGV[4] ~= "" and redis.call("HSETNX", KEYS[1], "webhook_queued", "1") == 1 then
    redis.call("LPUSH", KEYS[5], ARGV[4])
  end
  local ttl = tonumber(ARGV[2])
  if ttl > 0 then redis.call("EXPIRE", KEYS[1], ttl) end
  redis.call("PUBLISH", "{Channels.broadcast()}", '{QUEUE_CHANGED}')
  return "cancelled"
end
if status == "running" then
  redis.call("HSET", KEYS[1], "cancel_requested", "true")
  redis.call("PUBLISH", "{Channels.broadcast()}", '{QUEUE_CHANGED}')
  return "cancelling"
end
return status
"""
)

# Moves one Celery task message between Redis lists (or within one), atomically: the message is
# removed from the source and pushed to the target in one step, so it is never in two lists nor
# in none (what LMOVE does for the ends of lists, for any message). A message that is no longer in
# the source (a worker took it) is not moved.
# KEYS: source list, target list, job hash
# ARGV: job id; the message ("" = find it in the source by its job id); target queue name;
#       where: "back" (runs last of its priority), "front" (runs first), "after" (runs right after
#       the message of the pivot job, else back); pivot job id
# Returns 1 when moved, 0 when the message was not found.
MOVE_JOB = """
local function job_of(message)
  local ok, decoded = pcall(cjson.decode, message)
  if ok and type(decoded) == "table" and type(decoded.headers) == "table" then
    return decoded.headers.id
  end
  return nil
end
local function find(list, job_id)
  for _, message in ipairs(redis.call("LRANGE", list, 0, -1)) do
    if job_of(message) == job_id then return message end
  end
  return nil
end
local message = ARGV[2]
if message == "" then
  message = find(KEYS[1], ARGV[1])
  if not message then return 0 end
end
if redis.call("LREM", KEYS[1], 1, message) == 0 then return 0 end
local placed = 0
if ARGV[4] == "front" then
  placed = redis.call("RPUSH", KEYS[2], message)
elseif ARGV[4] == "after" then
  local pivot = find(KEYS[2], ARGV[5])
  if pivot then placed = redis.call("LINSERT", KEYS[2], "BEFORE", pivot, message) end
end
if placed <= 0 then redis.call("LPUSH", KEYS[2], message) end
if redis.call("EXISTS", KEYS[3]) == 1 then redis.call("HSET", KEYS[3], "queue", ARGV[3]) end
return 1
"""

# Redelivers a message a dead worker took and never acknowledged: removed from kombu's unacked
# hash and index and pushed to the front of its queue in one step (kombu's own restore does the
# same after the visibility timeout; whichever comes first wins, the other finds nothing).
# KEYS: unacked hash, unacked index, target list   ARGV: delivery tag, message
# Returns 1 when redelivered, 0 when the message was no longer unacknowledged.
REDELIVER_UNACKED = """
if redis.call("HDEL", KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call("ZREM", KEYS[2], ARGV[1])
redis.call("RPUSH", KEYS[3], ARGV[2])
return 1
"""

# KEYS: job   ARGV: progress JSON. Only a running job's progress is updated.
SET_PROGRESS = """
if redis.call("HGET", KEYS[1], "status") ~= "running" then return 0 end
redis.call("HSET", KEYS[1], "progress", ARGV[1])
return 1
"""

# KEYS: rate key   ARGV: capacity, refill per second, now (seconds, float)
# Token bucket; returns {allowed (1|0), seconds until a token is available (string)}.
TAKE_TOKEN = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local bucket = redis.call("HMGET", KEYS[1], "tokens", "at")
local tokens = tonumber(bucket[1]) or capacity
local at = tonumber(bucket[2]) or now
tokens = math.min(capacity, tokens + (now - at) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call("HSET", KEYS[1], "tokens", tostring(tokens), "at", tostring(now))
redis.call("EXPIRE", KEYS[1], math.ceil(capacity / rate) + 1)
return {allowed, tostring(wait)}
"""


def priority_base(priority: int) -> int:
    """Sorted-set score base: more urgent priorities sort first; the sequence number breaks ties."""
    return 9 - priority
