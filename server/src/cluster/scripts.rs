//! The Lua scripts that make every cluster state change one atomic step in Redis: check,
//! write, and publish to every instance's inbox.

/// Checks, writes and broadcasts a new peer; refuses a taken peer id or a full room/server.
const CLAIM: &str = r"
local P, me, room, peer, owner, pkey = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local maxp, maxr, blob, expiry = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9], ARGV[10]
if redis.call('SISMEMBER', P .. ':instances', me) == 0 then return 'GONE' end
local rk = P .. ':room:' .. room
local cur = redis.call('HGET', rk, peer)
if cur then
  local bar = string.find(cur, '|', 1, true)
  if not bar or string.sub(cur, bar + 1) ~= pkey then return 'TAKEN' end
  local colon = string.find(cur, ':', 1, true)
  if colon then redis.call('SREM', P .. ':owned:' .. string.sub(cur, 1, colon - 1), room .. '\n' .. peer) end
else
  if redis.call('HLEN', rk) >= maxp then return 'ROOM_FULL' end
  if redis.call('SISMEMBER', P .. ':rooms', room) == 0 and redis.call('SCARD', P .. ':rooms') >= maxr then
    return 'SERVER_FULL'
  end
end
redis.call('HSET', rk, peer, owner .. '|' .. pkey)
redis.call('HSET', P .. ':data:' .. room, peer, blob)
redis.call('SADD', P .. ':rooms', room)
redis.call('SADD', P .. ':owned:' .. me, room .. '\n' .. peer)
-- The room's expiry as the store said at this registration: the freshest value.
if expiry == '' then redis.call('HDEL', P .. ':expiry', room) else redis.call('HSET', P .. ':expiry', room, expiry) end
for _, i in ipairs(redis.call('SMEMBERS', P .. ':instances')) do redis.call('PUBLISH', P .. ':inbox:' .. i, blob) end
return 'OK'
";

/// Stores a peer's new metadata and broadcasts it, if `owner` still owns the peer.
const UPDATE: &str = r"
local P, room, peer, owner, blob = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local cur = redis.call('HGET', P .. ':room:' .. room, peer)
if not cur or string.sub(cur, 1, #owner + 1) ~= owner .. '|' then return 0 end
redis.call('HSET', P .. ':data:' .. room, peer, blob)
for _, i in ipairs(redis.call('SMEMBERS', P .. ':instances')) do redis.call('PUBLISH', P .. ':inbox:' .. i, blob) end
return 1
";

/// Removes a peer and broadcasts `PeerDown`, if `owner` still owns it.
const RELEASE: &str = r"
local P, me, room, peer, owner, blob = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local rk = P .. ':room:' .. room
local cur = redis.call('HGET', rk, peer)
if not cur or string.sub(cur, 1, #owner + 1) ~= owner .. '|' then return 0 end
redis.call('HDEL', rk, peer)
redis.call('HDEL', P .. ':data:' .. room, peer)
redis.call('SREM', P .. ':owned:' .. me, room .. '\n' .. peer)
if redis.call('HLEN', rk) == 0 then
  redis.call('SREM', P .. ':rooms', room)
  redis.call('HDEL', P .. ':expiry', room)
end
for _, i in ipairs(redis.call('SMEMBERS', P .. ':instances')) do redis.call('PUBLISH', P .. ':inbox:' .. i, blob) end
return 1
";

/// A live room's expiry changed (PATCH): kept for instances that join later, and broadcast.
const EXPIRY: &str = r"
local P, room, expiry, blob = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('SISMEMBER', P .. ':rooms', room) == 1 then
  if expiry == '' then redis.call('HDEL', P .. ':expiry', room) else redis.call('HSET', P .. ':expiry', room, expiry) end
end
for _, i in ipairs(redis.call('SMEMBERS', P .. ':instances')) do redis.call('PUBLISH', P .. ':inbox:' .. i, blob) end
return 1
";

const BROADCAST: &str = r"
for _, i in ipairs(redis.call('SMEMBERS', ARGV[1] .. ':instances')) do
  redis.call('PUBLISH', ARGV[1] .. ':inbox:' .. i, ARGV[2])
end
return 1
";

/// Enters the cluster and returns every registered peer and every live room's expiry,
/// atomically: changes after this are published to the new instance's inbox (already
/// subscribed), changes before are in the result.
const JOIN: &str = r"
local P, me, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
redis.call('SADD', P .. ':instances', me)
redis.call('SET', P .. ':lease:' .. me, '1', 'PX', lease)
local out = {}
for _, room in ipairs(redis.call('SMEMBERS', P .. ':rooms')) do
  for _, v in ipairs(redis.call('HVALS', P .. ':data:' .. room)) do out[#out + 1] = v end
end
return {out, redis.call('HGETALL', P .. ':expiry')}
";

/// 0 when this instance was reaped meanwhile (it must rejoin under a new id).
const RENEW: &str = r"
if redis.call('SISMEMBER', ARGV[1] .. ':instances', ARGV[2]) == 0 then return 0 end
redis.call('SET', ARGV[1] .. ':lease:' .. ARGV[2], '1', 'PX', tonumber(ARGV[3]))
return 1
";

/// Instances whose lease expired.
const DEAD: &str = r"
local out = {}
for _, i in ipairs(redis.call('SMEMBERS', ARGV[1] .. ':instances')) do
  if redis.call('EXISTS', ARGV[1] .. ':lease:' .. i) == 0 then out[#out + 1] = i end
end
return out
";

/// Removes an instance and its peers and broadcasts `InstanceDown` (unless its lease came back;
/// `force` for an instance leaving on its own).
const REAP: &str = r"
local P, dead, blob, force = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if force ~= '1' and redis.call('EXISTS', P .. ':lease:' .. dead) == 1 then return 0 end
if redis.call('SISMEMBER', P .. ':instances', dead) == 0 then return 0 end
local prefix = dead .. ':'
for _, m in ipairs(redis.call('SMEMBERS', P .. ':owned:' .. dead)) do
  local nl = string.find(m, '\n', 1, true)
  if nl then
    local room, peer = string.sub(m, 1, nl - 1), string.sub(m, nl + 1)
    local rk = P .. ':room:' .. room
    local cur = redis.call('HGET', rk, peer)
    if cur and string.sub(cur, 1, #prefix) == prefix then
      redis.call('HDEL', rk, peer)
      redis.call('HDEL', P .. ':data:' .. room, peer)
      if redis.call('HLEN', rk) == 0 then
        redis.call('SREM', P .. ':rooms', room)
        redis.call('HDEL', P .. ':expiry', room)
      end
    end
  end
end
redis.call('DEL', P .. ':owned:' .. dead, P .. ':lease:' .. dead)
redis.call('SREM', P .. ':instances', dead)
for _, i in ipairs(redis.call('SMEMBERS', P .. ':instances')) do redis.call('PUBLISH', P .. ':inbox:' .. i, blob) end
return 1
";

/// A token bucket shared by every instance (per-IP limits of the unauthenticated auth calls).
/// Redis's clock, so instances with skewed clocks agree.
const RATE: &str = r"
local k, rate, burst = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if rate <= 0 then rate = burst / 86400 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local v = redis.call('HMGET', k, 'tokens', 'at')
local tokens, at = tonumber(v[1]), tonumber(v[2])
if not tokens or not at then tokens, at = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local ok = 0
if tokens >= 1 then tokens = tokens - 1; ok = 1 end
redis.call('HSET', k, 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', k, math.ceil(burst / rate * 1000) + 1000)
return ok
";

/// The Lua scripts, each loaded once per connection to Redis and then called by its SHA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Script {
    Claim,
    Update,
    Release,
    Expiry,
    Broadcast,
    Join,
    Renew,
    Dead,
    Reap,
    Rate,
}

impl Script {
    /// Every script, in the order of their SHAs in `Link::shas`.
    pub(super) const ALL: [Script; 10] = [
        Script::Claim,
        Script::Update,
        Script::Release,
        Script::Expiry,
        Script::Broadcast,
        Script::Join,
        Script::Renew,
        Script::Dead,
        Script::Reap,
        Script::Rate,
    ];

    pub(super) fn source(self) -> &'static str {
        match self {
            Script::Claim => CLAIM,
            Script::Update => UPDATE,
            Script::Release => RELEASE,
            Script::Expiry => EXPIRY,
            Script::Broadcast => BROADCAST,
            Script::Join => JOIN,
            Script::Renew => RENEW,
            Script::Dead => DEAD,
            Script::Reap => REAP,
            Script::Rate => RATE,
        }
    }
}
