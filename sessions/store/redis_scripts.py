"""The Lua scripts of the Redis store: each runs atomically on the server, so lease checks, ordinals and TTLs
can never interleave with another client's call. Keys are derived from ARGV[1] (the prefix) inside the scripts,
so this layout needs a single Redis (standalone or Sentinel primary), not Redis Cluster.
"""

from __future__ import annotations

NAMES = (
    *("CREATE", "APPEND", "TOUCH", "CLEAR", "DELETE", "UPDATE", "ACQUIRE", "RELEASE", "EXPIRE_IDLE", "COUNT", "LIST"),
    *("MESSAGES", "LEASED_LOAD"),
)

# Shared helpers, prepended to every script. `now` is the caller's wall clock; a lease is live while until > now.
_LIB = """
local prefix = ARGV[1]
local function rec_key(id) return prefix .. 's:' .. id end
local function msg_key(id) return prefix .. 'm:' .. id end
local function owner_key(owner)
  if owner then return prefix .. 'owner:' .. owner end
  return prefix .. 'owner-none'
end
local function leased(rec, now)
  local holder = redis.call('HGET', rec, 'lease_holder')
  if not holder then return false end
  return tonumber(redis.call('HGET', rec, 'lease_until') or '0') > now, holder
end
local function foreign(rec, holder, now)
  local live, by = leased(rec, now)
  return live and by ~= holder
end
-- The session's record key if `holder` may change it now; else nil and why not ('missing' or 'busy'). With
-- `owner`, a session of another owner is 'missing' (checked before the lease: others cannot probe it).
local function writable(id, holder, now, owner)
  local rec = rec_key(id)
  if redis.call('EXISTS', rec) == 0 then return nil, 'missing' end
  if owner and redis.call('HGET', rec, 'owner') ~= owner then return nil, 'missing' end
  if foreign(rec, holder, now) then return nil, 'busy' end
  return rec
end
-- While leased the keys never expire (a turn is running); otherwise they expire idle_ttl after the last activity.
local function refresh(id, now, ttl_ms)
  local rec, msgs = rec_key(id), msg_key(id)
  if leased(rec, now) then
    redis.call('PERSIST', rec); redis.call('PERSIST', msgs)
  else
    redis.call('PEXPIRE', rec, ttl_ms); redis.call('PEXPIRE', msgs, ttl_ms)
  end
end
local function set_active(id, active)
  local rec = rec_key(id)
  redis.call('HSET', rec, 'last_active_at', active)
  redis.call('ZADD', prefix .. 'active', active, id)
  redis.call('ZADD', owner_key(redis.call('HGET', rec, 'owner')), active, id)
end
-- A KV report is the fields kv_tier, kv_tokens, kv_replica and kv_usage of the record; absent = nothing reported.
local KV = {'kv_tier', 'kv_tokens', 'kv_replica', 'kv_usage'}
local function forget_kv(rec) redis.call('HDEL', rec, unpack(KV)) end
-- The KV report's fields that are set, as HGETALL answers them (field, value, ...).
local function kv_fields(rec)
  local out = {}
  for i, value in ipairs(redis.call('HMGET', rec, unpack(KV))) do
    if value then table.insert(out, KV[i]); table.insert(out, value) end
  end
  return out
end
local function remove(id)
  local rec = rec_key(id)
  local owner = redis.call('HGET', rec, 'owner')
  redis.call('DEL', rec, msg_key(id))
  redis.call('ZREM', prefix .. 'active', id)
  redis.call('ZREM', owner_key(owner), id)
end
-- Drop index entries whose session the server expired (TTL); only entries idle before `cutoff` can be such.
local function trim(index, cutoff)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. cutoff)) do
    if redis.call('EXISTS', rec_key(id)) == 0 then redis.call('ZREM', index, id) end
  end
end
"""

# ARGV: prefix, id, now, ttl_ms, owner_flag ('1' set / '0' none), owner, created_at, last_active_at,
# limit ('' none: else 'full' when the store already holds that many sessions), cutoff (as COUNT's), field, value...
CREATE = (
    _LIB
    + """
local id, now, ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local rec = rec_key(id)
if redis.call('EXISTS', rec) == 1 then return 'exists' end
if ARGV[9] ~= '' then
  trim(prefix .. 'active', ARGV[10])
  if redis.call('ZCARD', prefix .. 'active') >= tonumber(ARGV[9]) then return 'full' end
end
redis.call('DEL', msg_key(id))
local fields = {'created_at', ARGV[7], 'last_active_at', ARGV[8]}
if ARGV[5] == '1' then table.insert(fields, 'owner'); table.insert(fields, ARGV[6]) end
for i = 11, #ARGV do table.insert(fields, ARGV[i]) end
redis.call('HSET', rec, unpack(fields))
set_active(id, ARGV[8])
refresh(id, now, ttl)
return 'ok'
"""
)


def _edit(body: str, *, owner_at: int | None = None, answer: str = "'ok'") -> str:
    """A script that changes a session if `holder` may: ARGV = prefix, id, holder ('' = none), now, ttl_ms, ...
    With `owner_at`, ARGV[owner_at] is the owner flag: '1' = only the sessions of the owner that follows, '0' = any.
    `body` runs with id, rec, now and ttl set; the keys' TTL is refreshed after it. Answers `answer`, or 'missing'
    or 'busy'."""
    owner = "nil" if owner_at is None else f"(ARGV[{owner_at}] == '1' and ARGV[{owner_at + 1}] or nil)"
    guard = f"""
local id, holder, now, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local rec, refused = writable(id, holder, now, {owner})
if not rec then return refused end
"""
    return _LIB + guard + body + f"refresh(id, now, ttl)\nreturn {answer}\n"


# ARGV: ..., last_active_at, report ('1' = set the KV report to the next four, '0' = keep it), kv_tier, kv_tokens,
# kv_replica, kv_usage, release ('1' = give holder's lease back), owner_flag ('1' = only for the next, '0' = any),
# owner, message...
APPEND = _edit(
    """
for i = 15, #ARGV do redis.call('RPUSH', msg_key(id), ARGV[i]) end
if ARGV[7] == '1' then
  redis.call('HSET', rec, 'kv_tier', ARGV[8], 'kv_tokens', ARGV[9], 'kv_replica', ARGV[10], 'kv_usage', ARGV[11])
end
if ARGV[12] == '1' and redis.call('HGET', rec, 'lease_holder') == holder then
  redis.call('HDEL', rec, 'lease_holder', 'lease_until')
end
set_active(id, ARGV[6])
""",
    owner_at=13,
)

# ARGV: prefix, id, now, ttl_ms, last_active_at
TOUCH = (
    _LIB
    + """
local id, now, ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('EXISTS', rec_key(id)) == 0 then return 'missing' end
set_active(id, ARGV[5])
refresh(id, now, ttl)
return 'ok'
"""
)

# ARGV: ..., ttl_ms, last_active_at, owner_flag ('1' = only the next one's, '0' = any), owner, the new history id.
# Answers the KV report it reset (kv_fields).
CLEAR = _edit(
    """
local was = kv_fields(rec)
redis.call('DEL', msg_key(id))
forget_kv(rec)
redis.call('HSET', rec, 'history_id', ARGV[9])
set_active(id, ARGV[6])
""",
    owner_at=7,
    answer="was",
)

# ARGV: ..., ttl_ms, owner_flag ('1' = only the next one's, '0' = any), owner. Answers the record's fields as they
# were (refreshing keys that are gone does nothing).
DELETE = _edit(
    """
local was = redis.call('HGETALL', rec)
remove(id)
""",
    owner_at=6,
    answer="was",
)

# ARGV: ..., ttl_ms, prompt_mode ('keep' | 'clear' | 'set'), prompt, metadata ('' = keep), last_active_at, owner_flag,
# owner. Answers {the KV report a new prompt reset (kv_fields; nil if the prompt did not change), the record's fields}.
UPDATE = _edit(
    """
local prompt = redis.call('HGET', rec, 'system_prompt')
local reset = false
if (ARGV[6] == 'clear' and prompt) or (ARGV[6] == 'set' and prompt ~= ARGV[7]) then
  reset = kv_fields(rec)
  forget_kv(rec)
end
if ARGV[6] == 'clear' then redis.call('HDEL', rec, 'system_prompt') end
if ARGV[6] == 'set' then redis.call('HSET', rec, 'system_prompt', ARGV[7]) end
if ARGV[8] ~= '' then redis.call('HSET', rec, 'metadata', ARGV[8]) end
set_active(id, ARGV[9])
""",
    owner_at=10,
    answer="{reset, redis.call('HGETALL', rec)}",
)

# ARGV: ..., until (the lease's end). Leased, the refresh after it makes the keys persist.
ACQUIRE = _edit("""
redis.call('HSET', rec, 'lease_holder', holder, 'lease_until', ARGV[6])
""")

# ARGV: ..., until (the lease's end), owner_flag, owner, start (0 or -window), held history id ('' none), held length.
# ACQUIRE for the caller's session, then its record's fields (as HGETALL) and its messages from start, or past the
# held prefix if the history is still the held one (list positions restart at 0 with the history), in one script: no
# edit lands between them.
LEASED_LOAD = _edit(
    """
redis.call('HSET', rec, 'lease_holder', holder, 'lease_until', ARGV[6])
local start = tonumber(ARGV[9])
if ARGV[10] ~= '' and redis.call('HGET', rec, 'history_id') == ARGV[10] then start = tonumber(ARGV[11]) end
""",
    owner_at=7,
    answer="{redis.call('HGETALL', rec), redis.call('LRANGE', msg_key(id), start, -1)}",
)

# ARGV: prefix, id, holder, now, ttl_ms
RELEASE = (
    _LIB
    + """
local id, holder, now, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local rec = rec_key(id)
if redis.call('HGET', rec, 'lease_holder') ~= holder then return 'ok' end
redis.call('HDEL', rec, 'lease_holder', 'lease_until')
refresh(id, now, ttl)
return 'ok'
"""
)

# ARGV: prefix, before, now. Deletes idle unleased sessions; also reports those the server already expired.
EXPIRE_IDLE = (
    _LIB
    + """
local before, now = ARGV[2], tonumber(ARGV[3])
local expired = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', prefix .. 'active', '-inf', '(' .. before)) do
  local rec = rec_key(id)
  if redis.call('EXISTS', rec) == 0 then
    redis.call('ZREM', prefix .. 'active', id)
    table.insert(expired, id)
  elseif not leased(rec, now) then
    remove(id)
    table.insert(expired, id)
  end
end
return expired
"""
)

# ARGV: prefix, cutoff
COUNT = (
    _LIB
    + """
trim(prefix .. 'active', ARGV[2])
return redis.call('ZCARD', prefix .. 'active')
"""
)

# ARGV: prefix, cutoff, owner_flag ('1': ARGV[4]'s, '0': ownerless, 'all': every owner's), owner, offset, limit.
# Returns id, field count, fields..., per record.
LIST = (
    _LIB
    + """
local index = prefix .. 'owner-none'
if ARGV[3] == '1' then index = owner_key(ARGV[4]) end
if ARGV[3] == 'all' then index = prefix .. 'active' end
trim(index, ARGV[2])
local offset, limit = tonumber(ARGV[5]), tonumber(ARGV[6])
local out = {}
for _, id in ipairs(redis.call('ZREVRANGE', index, offset, offset + limit - 1)) do
  local fields = redis.call('HGETALL', rec_key(id))
  table.insert(out, id)
  table.insert(out, #fields)
  for _, value in ipairs(fields) do table.insert(out, value) end
end
return out
"""
)

# ARGV: prefix, id, start (0 or -window). 0 if the session is missing, else the messages from start.
MESSAGES = (
    _LIB
    + """
local id = ARGV[2]
if redis.call('EXISTS', rec_key(id)) == 0 then return 0 end
return redis.call('LRANGE', msg_key(id), tonumber(ARGV[3]), -1)
"""
)
