//! The Lua: one script, `checks`, that runs a list of *ops* (one atomic check each) and returns their
//! answers in order. Every op touches the keys of one entity only (one hash tag), so in a Redis Cluster the
//! ops of each entity go in one call to the node that owns it (the calls pipelined); on a standalone server
//! or a Sentinel-watched master, every op of a step goes in one call. Either way a step is one round trip,
//! and one written frame per call (fred flushes each script call). Loaded by EVALSHA, and by EVAL once on a
//! server that answers NOSCRIPT (after a restart or a failover).
//!
//! Times come from the server's clock (`TIME`), so replicas whose clocks differ agree on when a lease or a
//! lock ends.
//!
//! Call: `EVALSHA sha numkeys KEYS... ops ARGS...`, where `ops` (ARGV[1]) names the ops, comma-separated;
//! each takes its fixed number of keys and arguments from the front of what is left.

/// One kind of check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A connection of an address: its rate bucket (GCRA) and a session lease. KEYS: rate, leases. ARGS:
    /// burst (0: off), ms per token, max sessions (0: off), member, ttl ms. Answers 0 (admitted), 1
    /// (rate), 2 (sessions).
    AdmitIp,
    /// An address's lockout: KEYS: lock. Answers the time left in ms (0 or less: none).
    IpLock,
    /// A mailbox's lockout, unless the address is known to it. KEYS: lock, known. ARGS: address digest
    /// ('' for none), known_for ms (0: no sparing). Answers the time left in ms (0: not locked for it).
    Locked,
    /// A session lease. KEYS: leases. ARGS: max, member, ttl ms. Answers 1 (taken) or 0 (full).
    Lease,
    /// Renews (or puts back, after an outage) a lease. KEYS: leases. ARGS: member, ttl ms. Answers 1.
    Renew,
    /// Drops a lease. KEYS: leases. ARGS: member. Answers how many were removed.
    Release,
    /// A failed login of an address or a mailbox. KEYS: failures, lock, known (a mailbox's; for an
    /// address, any key of its own tag, not read). ARGS: lockout_after, lockout_for ms, forget_after ms,
    /// secret digest (''), address digest (''), known_for ms (0). Answers failures, lock left ms, 1 when
    /// this secret was counted lately.
    Failed,
    /// A successful login of a mailbox: its failures forgotten, the address remembered, LOGIN-DELAY and
    /// the session lease. KEYS: failures, lock, known, leases, next login. ARGS: address digest (''),
    /// known_for ms (0: off), max sessions (0: off), member, ttl ms, min interval ms (0: off). Answers 1
    /// (lease taken) | 0 (full) | -1 (no cap), and LOGIN-DELAY left ms.
    LoggedIn,
    /// An address's failures forgotten (a successful login). KEYS: failures, lock. Answers keys removed.
    Forget,
    /// A replica's heartbeat. KEYS: replicas. ARGS: replica id, ttl ms. Answers the live replicas.
    Heartbeat,
}

impl Op {
    /// Its name in the script.
    pub fn name(self) -> &'static str {
        match self {
            Op::AdmitIp => "admit_ip",
            Op::IpLock => "ip_lock",
            Op::Locked => "locked",
            Op::Lease => "lease",
            Op::Renew => "renew",
            Op::Release => "release",
            Op::Failed => "failed",
            Op::LoggedIn => "logged_in",
            Op::Forget => "forget",
            Op::Heartbeat => "heartbeat",
        }
    }

    /// Keys, arguments and answers it takes and gives (the script's table says the same).
    pub fn shape(self) -> (usize, usize, usize) {
        match self {
            Op::AdmitIp => (2, 5, 1),
            Op::IpLock => (1, 0, 1),
            Op::Locked => (2, 2, 1),
            Op::Lease => (1, 3, 1),
            Op::Renew => (1, 2, 1),
            Op::Release => (1, 1, 1),
            Op::Failed => (3, 6, 3),
            Op::LoggedIn => (5, 6, 2),
            Op::Forget => (2, 0, 1),
            Op::Heartbeat => (1, 2, 1),
        }
    }
}

/// The script's text and its SHA-1, as EVALSHA names it.
#[derive(Debug)]
pub struct Script {
    pub lua: &'static str,
    pub sha: String,
}

impl Script {
    /// The `checks` script.
    pub fn checks() -> Self {
        let digest =
            ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, CHECKS.as_bytes());
        let sha = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Self { lua: CHECKS, sha }
    }
}

const CHECKS: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ops = {}

ops.admit_ip = {2, 5, function(k, a)
  local burst, per, max = tonumber(a[1]), tonumber(a[2]), tonumber(a[3])
  if burst > 0 and per > 0 then
    local tat = tonumber(redis.call('GET', k[1]) or '0')
    if tat < now then tat = now end
    local next_tat = tat + per
    if next_tat - now > burst * per then return {1} end
    redis.call('SET', k[1], next_tat, 'PX', next_tat - now)
  end
  if max > 0 then
    redis.call('ZREMRANGEBYSCORE', k[2], '-inf', now)
    if redis.call('ZCARD', k[2]) >= max then return {2} end
    redis.call('ZADD', k[2], now + tonumber(a[5]), a[4])
    redis.call('PEXPIRE', k[2], a[5])
  end
  return {0}
end}

ops.ip_lock = {1, 0, function(k, a)
  return {redis.call('PTTL', k[1])}
end}

ops.locked = {2, 2, function(k, a)
  local left = redis.call('PTTL', k[1])
  if left <= 0 then return {0} end
  if a[1] ~= '' and tonumber(a[2]) > 0 then
    local at = redis.call('ZSCORE', k[2], a[1])
    if at and now - tonumber(at) < tonumber(a[2]) then return {0} end
  end
  return {left}
end}

ops.lease = {1, 3, function(k, a)
  redis.call('ZREMRANGEBYSCORE', k[1], '-inf', now)
  if redis.call('ZCARD', k[1]) >= tonumber(a[1]) then return {0} end
  redis.call('ZADD', k[1], now + tonumber(a[3]), a[2])
  redis.call('PEXPIRE', k[1], a[3])
  return {1}
end}

ops.renew = {1, 2, function(k, a)
  redis.call('ZADD', k[1], now + tonumber(a[2]), a[1])
  redis.call('PEXPIRE', k[1], a[2])
  return {1}
end}

ops.release = {1, 1, function(k, a)
  return {redis.call('ZREM', k[1], a[1])}
end}

ops.failed = {3, 6, function(k, a)
  local after = tonumber(a[1])
  local spared = false
  if a[5] ~= '' and tonumber(a[6]) > 0 then
    local at = redis.call('ZSCORE', k[3], a[5])
    spared = at ~= false and now - tonumber(at) < tonumber(a[6])
  end
  local left = redis.call('PTTL', k[2])
  if left > 0 then
    if spared then left = 0 end
    return {after, left, 0}
  end
  if a[4] ~= '' then
    local seen = redis.call('HGET', k[1], 'pw')
    if seen and string.find(' ' .. seen .. ' ', ' ' .. a[4] .. ' ', 1, true) then
      return {tonumber(redis.call('HGET', k[1], 'n') or '0'), 0, 1}
    end
  end
  local n = redis.call('HINCRBY', k[1], 'n', 1)
  if a[4] ~= '' then
    local list = {a[4]}
    for d in string.gmatch(redis.call('HGET', k[1], 'pw') or '', '%S+') do
      if #list < 4 then table.insert(list, d) end
    end
    redis.call('HSET', k[1], 'pw', table.concat(list, ' '))
  end
  redis.call('PEXPIRE', k[1], a[3])
  if after > 0 and n >= after then
    redis.call('SET', k[2], '1', 'PX', a[2])
    redis.call('DEL', k[1])
    if spared then return {n, 0, 0} end
    return {n, tonumber(a[2]), 0}
  end
  return {n, 0, 0}
end}

ops.logged_in = {5, 6, function(k, a)
  redis.call('DEL', k[1], k[2])
  local known_for = tonumber(a[2])
  if a[1] ~= '' and known_for > 0 then
    redis.call('ZADD', k[3], now, a[1])
    redis.call('ZREMRANGEBYSCORE', k[3], '-inf', now - known_for)
    redis.call('ZREMRANGEBYRANK', k[3], 0, -5)
    redis.call('PEXPIRE', k[3], known_for)
  end
  local max, ttl, min = tonumber(a[3]), tonumber(a[5]), tonumber(a[6])
  if max > 0 then
    redis.call('ZREMRANGEBYSCORE', k[4], '-inf', now)
    if redis.call('ZCARD', k[4]) >= max then return {0, 0} end
  end
  if min > 0 then
    local left = redis.call('PTTL', k[5])
    if left > 0 then return {max > 0 and 1 or -1, left} end
    redis.call('SET', k[5], '1', 'PX', min)
  end
  if max > 0 then
    redis.call('ZADD', k[4], now + ttl, a[4])
    redis.call('PEXPIRE', k[4], ttl)
    return {1, 0}
  end
  return {-1, 0}
end}

ops.forget = {2, 0, function(k, a)
  return {redis.call('DEL', k[1], k[2])}
end}

ops.heartbeat = {1, 2, function(k, a)
  redis.call('ZREMRANGEBYSCORE', k[1], '-inf', now)
  redis.call('ZADD', k[1], now + tonumber(a[2]), a[1])
  redis.call('PEXPIRE', k[1], a[2])
  return {redis.call('ZCARD', k[1])}
end}

local out, ki, ai = {}, 1, 2
for name in string.gmatch(ARGV[1], '[^,]+') do
  local op = ops[name]
  if not op then return redis.error_reply('popgate: unknown op ' .. name) end
  local k, a = {}, {}
  for i = 1, op[1] do k[i] = KEYS[ki]; ki = ki + 1 end
  for i = 1, op[2] do a[i] = ARGV[ai]; ai = ai + 1 end
  for _, v in ipairs(op[3](k, a)) do table.insert(out, v) end
end
return out
";

#[cfg(test)]
mod tests {
    use super::*;

    /// The Rust side's shape of each op is the script's own.
    #[test]
    fn every_op_has_the_shape_the_script_gives_it() {
        for op in [
            Op::AdmitIp,
            Op::IpLock,
            Op::Locked,
            Op::Lease,
            Op::Renew,
            Op::Release,
            Op::Failed,
            Op::LoggedIn,
            Op::Forget,
            Op::Heartbeat,
        ] {
            let (keys, args, answers) = op.shape();
            let head = format!("ops.{} = {{{keys}, {args}, function(k, a)", op.name());
            let at = CHECKS
                .find(&head)
                .unwrap_or_else(|| panic!("no `{head}` in the script"));
            let body = &CHECKS[at..];
            let body = &body[..body.find("end}").unwrap_or(body.len())];
            // Every return of the op gives `answers` values.
            for ret in body.match_indices("return {").map(|(i, _)| &body[i + 8..]) {
                // The values up to the closing brace, counted by their top-level commas.
                let (mut depth, mut values) = (0i32, 1);
                for c in ret.chars() {
                    match c {
                        '(' | '{' => depth += 1,
                        ')' => depth -= 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => values += 1,
                        _ => {}
                    }
                }
                assert_eq!(
                    values,
                    answers,
                    "{}: return {{{}",
                    op.name(),
                    &ret[..20.min(ret.len())]
                );
            }
        }
        assert_eq!(Script::checks().sha.len(), 40);
    }
}
