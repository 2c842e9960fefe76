//! The Lua scripts: each check that must be atomic is one script, run with EVALSHA (and EVAL once when a
//! server answers NOSCRIPT, after a restart or a failover). Every script touches the keys of one entity
//! only (one hash tag), so it runs in one Redis Cluster slot. Times come from the server's clock
//! (`TIME`), so replicas whose clocks differ still agree on when a lease or a lock ends.

/// A script's text and its SHA-1, as EVALSHA names it.
#[derive(Debug)]
pub struct Script {
    pub name: &'static str,
    pub lua: &'static str,
    pub sha: String,
}

impl Script {
    fn new(name: &'static str, lua: &'static str) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, lua.as_bytes());
        let sha = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Self { name, lua, sha }
    }
}

/// The server's time in milliseconds, as the first lines of every script that needs it.
#[cfg(test)]
const NOW: &str =
    "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n";

/// Every script, loaded once per process.
#[derive(Debug)]
pub struct Scripts {
    /// Accepting a connection: the address's rate bucket (GCRA) and a session lease.
    /// KEYS: rate, leases. ARGV: burst (0: off), ms per token, max sessions (0: off), member, ttl ms.
    /// Returns 0 (admitted), 1 (rate), 2 (sessions).
    pub admit_ip: Script,
    /// A session lease. KEYS: leases. ARGV: max, member, ttl ms. Returns 1 (taken) or 0 (full).
    pub lease: Script,
    /// Renews (or puts back, after an outage) a lease. KEYS: leases. ARGV: member, ttl ms.
    pub renew: Script,
    /// A mailbox's lock, unless the address is known to it. KEYS: lock, known. ARGV: address digest (''
    /// for none), known_for ms (0: no sparing). Returns the time left in ms (0: not locked for this
    /// address).
    pub locked: Script,
    /// A failed login of an address or a mailbox. KEYS: failures, lock[, known]. ARGV: lockout_after,
    /// lockout_for ms, forget_after ms, secret digest (''), address digest (''), known_for ms (0).
    /// Returns {failures, lock left ms, 1 when this secret was counted lately}.
    pub failed: Script,
    /// A successful login of a mailbox: its failures forgotten, the address remembered, LOGIN-DELAY and
    /// the session lease. KEYS: failures, lock, known, leases, next login. ARGV: address digest (''),
    /// known_for ms (0: off), max sessions (0: off), member, ttl ms, min interval ms (0: off).
    /// Returns {1 lease taken | 0 full | -1 no cap, LOGIN-DELAY left ms}.
    pub logged_in: Script,
    /// A replica's heartbeat. KEYS: replicas. ARGV: replica id, ttl ms. Returns the live replicas.
    pub heartbeat: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            admit_ip: Script::new("admit_ip", ADMIT_IP),
            lease: Script::new("lease", LEASE),
            renew: Script::new("renew", RENEW),
            locked: Script::new("locked", LOCKED),
            failed: Script::new("failed", FAILED),
            logged_in: Script::new("logged_in", LOGGED_IN),
            heartbeat: Script::new("heartbeat", HEARTBEAT),
        }
    }
}

const ADMIT_IP: &str = concat!(
    "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n",
    r"
local burst, per, max = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if burst > 0 and per > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  if tat < now then tat = now end
  local next_tat = tat + per
  if next_tat - now > burst * per then return 1 end
  redis.call('SET', KEYS[1], next_tat, 'PX', next_tat - now)
end
if max > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max then return 2 end
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
return 0
"
);

const LEASE: &str = concat!(
    "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n",
    r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"
);

const RENEW: &str = concat!(
    "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n",
    r"
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"
);

const LOCKED: &str = concat!(
    "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n",
    r"
local left = redis.call('PTTL', KEYS[1])
if left <= 0 then return 0 end
if ARGV[1] ~= '' and tonumber(ARGV[2]) > 0 then
  local at = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if at and now - tonumber(at) < tonumber(ARGV[2]) then return 0 end
end
return left
"
);

const FAILED: &str = concat!(
    "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n",
    r"
local after = tonumber(ARGV[1])
local spared = false
if KEYS[3] and ARGV[5] ~= '' and tonumber(ARGV[6]) > 0 then
  local at = redis.call('ZSCORE', KEYS[3], ARGV[5])
  spared = at ~= false and now - tonumber(at) < tonumber(ARGV[6])
end
local left = redis.call('PTTL', KEYS[2])
if left > 0 then
  if spared then left = 0 end
  return {after, left, 0}
end
if ARGV[4] ~= '' then
  local seen = redis.call('HGET', KEYS[1], 'pw')
  if seen and string.find(' ' .. seen .. ' ', ' ' .. ARGV[4] .. ' ', 1, true) then
    return {tonumber(redis.call('HGET', KEYS[1], 'n') or '0'), 0, 1}
  end
end
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
if ARGV[4] ~= '' then
  local list = {ARGV[4]}
  for d in string.gmatch(redis.call('HGET', KEYS[1], 'pw') or '', '%S+') do
    if #list < 4 then table.insert(list, d) end
  end
  redis.call('HSET', KEYS[1], 'pw', table.concat(list, ' '))
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if after > 0 and n >= after then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
  redis.call('DEL', KEYS[1])
  if spared then return {n, 0, 0} end
  return {n, tonumber(ARGV[2]), 0}
end
return {n, 0, 0}
"
);

const LOGGED_IN: &str = concat!(
    "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n",
    r"
redis.call('DEL', KEYS[1], KEYS[2])
local known_for = tonumber(ARGV[2])
if ARGV[1] ~= '' and known_for > 0 then
  redis.call('ZADD', KEYS[3], now, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - known_for)
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -5)
  redis.call('PEXPIRE', KEYS[3], known_for)
end
local max, ttl, min = tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[6])
if max > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if redis.call('ZCARD', KEYS[4]) >= max then return {0, 0} end
end
if min > 0 then
  local left = redis.call('PTTL', KEYS[5])
  if left > 0 then return {max > 0 and 1 or -1, left} end
  redis.call('SET', KEYS[5], '1', 'PX', min)
end
if max > 0 then
  redis.call('ZADD', KEYS[4], now + ttl, ARGV[4])
  redis.call('PEXPIRE', KEYS[4], ttl)
  return {1, 0}
end
return {-1, 0}
"
);

const HEARTBEAT: &str = concat!(
    "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n",
    r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_script_starts_from_the_servers_clock_and_has_a_distinct_sha() {
        let s = Scripts::new();
        let all = [
            &s.admit_ip,
            &s.lease,
            &s.renew,
            &s.locked,
            &s.failed,
            &s.logged_in,
            &s.heartbeat,
        ];
        for script in all {
            assert!(script.lua.starts_with(NOW), "{}", script.name);
            assert_eq!(script.sha.len(), 40);
        }
        let mut shas: Vec<&str> = all.iter().map(|s| s.sha.as_str()).collect();
        shas.sort_unstable();
        shas.dedup();
        assert_eq!(shas.len(), all.len());
    }
}
