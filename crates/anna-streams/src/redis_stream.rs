//! [`Stream`] on Redis Streams, for Redis 7.0 and newer (Debian 12 ships 7.0.15, so nothing
//! newer is used: no XADD idempotency, no XACKDEL, no KEEPREF/DELREF/ACKED).
//!
//! Connections:
//! - every non-blocking command goes through one [`ConnectionManager`] (multiplexed,
//!   reconnects by itself after the connection drops);
//! - blocking reads (`XREADGROUP`/`XREAD` with `BLOCK`) never do: Redis serves one blocking
//!   command per connection, so everything queued behind it on a shared connection would stall,
//!   and the manager's response timeout would cut the block short. They run on dedicated
//!   connections without a response timeout, kept in a small idle pool (one per concurrent
//!   blocking reader). A connection that fails is dropped together with the idle pool, since a
//!   restart or a network cut kills them all, and the call is retried once on a fresh one: a
//!   Redis restart costs a reader at most one error, and its next call reconnects.
//!
//! `append_batch` pipelines its `XADD`s, a thousand per round trip.
//!
//! Commands whose connection dropped are retried once. For `XADD` this can append the entry
//! twice if the first attempt reached Redis before the connection died; delivery is
//! at-least-once anyway and consumers deduplicate by event id.
//!
//! Trimming (`append` with `max_len`): `XADD` itself never trims, because `MAXLEN` would drop
//! entries that a lagging group has not read or acknowledged. A Lua script computes the oldest
//! id any group still needs (the oldest pending id and the first undelivered id of every group)
//! and trims with `XTRIM MINID ~` to whichever comes first: that id or the entry that leaves
//! `max_len` entries. It runs at most once per [`TRIM_EVERY_APPENDS`] appends or every
//! [`TRIM_INTERVAL`] per stream and process, after the append: on every append it would cost a
//! script run per entry at 10k+/s, while this bound keeps the overshoot small. `~` trims whole
//! radix-tree nodes only (up to 100 entries), so the length settles somewhat above `max_len`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, Cmd, FromRedisValue, RedisError, Script, Value};

use crate::trim_clock::TrimClocks;
use crate::{BatchAppendError, Delivery, Entry, Fields, GroupInfo, PendingSummary, Stream, StreamError};

/// Response timeout of the shared connection. The 500 ms default is tight for a busy server
/// with `appendfsync always`; blocking reads do not use this connection.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How much longer than its `BLOCK` a blocking read may take before its connection is
/// considered dead (a silent network cut would otherwise hang the reader forever).
const BLOCK_GRACE: Duration = Duration::from_secs(5);
/// Idle dedicated connections kept for blocking readers; more concurrent readers open more.
const MAX_IDLE_BLOCKING: usize = 32;
pub use crate::trim_clock::{TRIM_EVERY_APPENDS, TRIM_INTERVAL};
/// Most entries one trim run looks at (and removes), so a long-lagging group that catches up
/// does not make one script block Redis; the next runs continue.
const TRIM_BATCH: u64 = 10_000;
/// Entries per pipeline in `append_batch`.
const BATCH_PIPELINE: usize = 1000;
/// Rounds of `XAUTOCLAIM` (each scans at most 10 × COUNT pending entries) per `claim_idle`.
const CLAIM_ROUNDS: u32 = 16;

/// Claims idle entries and reports their real delivery counts in one atomic step.
///
/// `XAUTOCLAIM` scans the pending list from `0-0`, in rounds until enough entries are claimed
/// or the cursor wraps. Its reply has no delivery counts, so `XPENDING` is asked per claimed
/// id. Entries deleted while pending (trimmed by someone else) are acknowledged so they leave
/// the pending list: Redis 7 already drops them and lists them in the third reply element,
/// Redis 6.2 returned them as entries without fields.
const CLAIM_SCRIPT: &str = r"
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local min_idle, wanted = ARGV[3], tonumber(ARGV[4])
local rounds = tonumber(ARGV[5])
local cursor, claimed, deleted = '0-0', {}, 0
local function ack(ids)
  for i = 1, #ids, 100 do
    redis.call('XACK', stream, group, unpack(ids, i, math.min(i + 99, #ids)))
  end
  deleted = deleted + #ids
end
for _ = 1, rounds do
  local reply = redis.call('XAUTOCLAIM', stream, group, consumer, min_idle, cursor, 'COUNT', wanted - #claimed)
  cursor = reply[1]
  local gone = {}
  for _, entry in ipairs(reply[2]) do
    if type(entry) == 'table' then
      if entry[2] then claimed[#claimed + 1] = entry else gone[#gone + 1] = entry[1] end
    end
  end
  if type(reply[3]) == 'table' then
    for _, id in ipairs(reply[3]) do gone[#gone + 1] = id end
  end
  ack(gone)
  if cursor == '0-0' or #claimed >= wanted then break end
end
local out = {}
for i, entry in ipairs(claimed) do
  local info = redis.call('XPENDING', stream, group, entry[1], entry[1], 1)
  local count = 0
  if info[1] then count = info[1][4] end
  out[i] = {entry[1], entry[2], count}
end
return {out, deleted}
";

/// Trims towards `max_len` entries without dropping anything a group still needs; returns
/// how many entries were removed. Atomic, so a group created or advanced meanwhile cannot be
/// overtaken. Ids are compared numerically (`ms-seq`); the milliseconds fit a Lua number
/// exactly.
const TRIM_SCRIPT: &str = r"
local stream, max_len, batch = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local len = redis.call('XLEN', stream)
if len <= max_len then return 0 end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  if ams ~= bms then return ams < bms end
  return aseq < bseq
end
-- A stream nobody reads yet keeps everything: a group created later starts at the beginning.
local groups = redis.call('XINFO', 'GROUPS', stream)
if #groups == 0 then return 0 end
local safe = nil
local function keep_from(id)
  if id and (safe == nil or less(id, safe)) then safe = id end
end
for _, group in ipairs(groups) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  if info['pending'] > 0 then
    keep_from(redis.call('XPENDING', stream, info['name'])[2])
  end
  local unread = redis.call('XRANGE', stream, '(' .. info['last-delivered-id'], '+', 'COUNT', 1)[1]
  if unread then keep_from(unread[1]) end
end
local upper = '+'
if safe then upper = '(' .. safe end
local limit = math.min(len - max_len + 1, batch)
local below = redis.call('XRANGE', stream, '-', upper, 'COUNT', limit)
if #below == 0 then return 0 end
local minid = safe
if #below == limit then minid = below[limit][1] end
if not minid then return 0 end
return redis.call('XTRIM', stream, 'MINID', '~', minid)
";

/// Resets the idle time of the given entries that are pending for ARGV[2] in group ARGV[1]:
/// `XCLAIM … 0 … JUSTID` would also take entries of other consumers and does not bump the
/// delivery count, so ownership is checked first, atomically.
const TOUCH_SCRIPT: &str = r#"
local touched = 0
for i = 3, #ARGV do
    local id = ARGV[i]
    local entry = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    if #entry == 1 and entry[1][2] == ARGV[2] then
        redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
        touched = touched + 1
    end
end
return touched
"#;

/// The Redis Streams implementation of [`Stream`]. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct RedisStream {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    manager: ConnectionManager,
    blocking: Mutex<Vec<MultiplexedConnection>>,
    trim_clocks: TrimClocks,
    claim_script: Script,
    trim_script: Script,
    touch_script: Script,
}

impl std::fmt::Debug for RedisStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStream").field("server", &self.inner.client.get_connection_info().addr()).finish()
    }
}

impl RedisStream {
    /// Connects to a `redis://…` URL; fails when the server cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, StreamError> {
        use redis::IntoConnectionInfo;
        // TCP_NODELAY: without it a command larger than one TCP segment (a relay's batch of
        // appends) waits for the server's delayed ACK — 40 ms on Linux — before its last part
        // leaves.
        let info = url.into_connection_info()?;
        let tcp = info.tcp_settings().clone().set_nodelay(true);
        let client = Client::open(info.set_tcp_settings(tcp))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT));
        let manager = client.get_connection_manager_with_config(config).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                manager,
                blocking: Mutex::new(Vec::new()),
                trim_clocks: TrimClocks::default(),
                claim_script: Script::new(CLAIM_SCRIPT),
                trim_script: Script::new(TRIM_SCRIPT),
                touch_script: Script::new(TOUCH_SCRIPT),
            }),
        })
    }

    /// A command on the shared connection, retried once if the connection dropped (the
    /// manager has started reconnecting by then, and the retry waits for it).
    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, RedisError> {
        let mut conn = self.inner.manager.clone();
        match cmd.query_async(&mut conn).await {
            Err(e) if is_disconnect(&e) => cmd.query_async(&mut conn).await,
            other => other,
        }
    }

    async fn query_pipeline<T: FromRedisValue>(&self, pipeline: &redis::Pipeline) -> Result<T, RedisError> {
        let mut conn = self.inner.manager.clone();
        match pipeline.query_async(&mut conn).await {
            Err(e) if is_disconnect(&e) => pipeline.query_async(&mut conn).await,
            other => other,
        }
    }

    async fn invoke<T: FromRedisValue>(&self, invocation: &redis::ScriptInvocation<'_>) -> Result<T, RedisError> {
        let mut conn = self.inner.manager.clone();
        match invocation.invoke_async(&mut conn).await {
            Err(e) if is_disconnect(&e) => invocation.invoke_async(&mut conn).await,
            other => other,
        }
    }

    /// A read that may block: `Duration::ZERO` goes to the shared connection, anything else to
    /// a dedicated one (see the module docs).
    async fn read(&self, cmd: &Cmd, block: Duration) -> Result<Value, RedisError> {
        if block.is_zero() {
            return self.query(cmd).await;
        }
        let mut retried = false;
        loop {
            let mut conn = self.blocking_connection().await?;
            match tokio::time::timeout(block + BLOCK_GRACE, cmd.query_async::<Value>(&mut conn)).await {
                Ok(Ok(value)) => {
                    self.release_blocking(conn);
                    return Ok(value);
                }
                Ok(Err(e)) if is_disconnect(&e) => {
                    // The idle ones went through the same restart or cut as this one.
                    lock(&self.inner.blocking).clear();
                    if retried {
                        return Err(e);
                    }
                    retried = true;
                }
                Ok(Err(e)) => {
                    self.release_blocking(conn);
                    return Err(e);
                }
                // The connection is dropped here: it may still be blocked server-side.
                Err(_) => {
                    return Err(RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "blocking stream read got no reply long after its BLOCK expired",
                    )));
                }
            }
        }
    }

    async fn blocking_connection(&self) -> Result<MultiplexedConnection, RedisError> {
        if let Some(conn) = lock(&self.inner.blocking).pop() {
            return Ok(conn);
        }
        let config =
            AsyncConnectionConfig::new().set_connection_timeout(Some(CONNECT_TIMEOUT)).set_response_timeout(None);
        self.inner.client.get_multiplexed_async_connection_with_config(&config).await
    }

    fn release_blocking(&self, conn: MultiplexedConnection) {
        let mut idle = lock(&self.inner.blocking);
        if idle.len() < MAX_IDLE_BLOCKING {
            idle.push(conn);
        }
    }

    async fn maybe_trim(&self, stream: &str, max_len: Option<u64>, appended: usize) {
        let Some(max_len) = max_len else {
            return;
        };
        if !self.inner.trim_clocks.due(stream, appended) {
            return;
        }
        // The entries are in: failing the append now would only make the caller add them again.
        if let Err(e) = self.trim(stream, max_len).await {
            tracing::warn!(stream, error = %e, "could not trim the stream; the next check retries");
        }
    }

    async fn trim(&self, stream: &str, max_len: u64) -> Result<u64, RedisError> {
        let mut invocation = self.inner.trim_script.key(stream);
        invocation.arg(max_len).arg(TRIM_BATCH);
        self.invoke(&invocation).await
    }

    /// Counts entries after `last_delivered` when Redis cannot tell the lag itself.
    async fn count_after(&self, stream: &str, last_delivered: &str) -> Result<u64, StreamError> {
        const PAGE: usize = 1000;
        let mut start = format!("({last_delivered}");
        let mut count = 0u64;
        loop {
            let page: Value =
                self.query(redis::cmd("XRANGE").arg(stream).arg(&start).arg("+").arg("COUNT").arg(PAGE)).await?;
            let entries = parse_entries(page)?;
            count += entries.len() as u64;
            match entries.last() {
                Some(last) if entries.len() == PAGE => start = format!("({}", last.id),
                _ => return Ok(count),
            }
        }
    }
}

#[async_trait]
impl Stream for RedisStream {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> Result<(), StreamError> {
        let _: String = self.query(&redis::cmd("PING")).await?;
        Ok(())
    }

    async fn append(&self, stream: &str, fields: &Fields, max_len: Option<u64>) -> Result<String, StreamError> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream).arg("*");
        for (field, value) in fields {
            cmd.arg(field).arg(value);
        }
        let id: String = self.query(&cmd).await?;
        self.maybe_trim(stream, max_len, 1).await;
        Ok(id)
    }

    /// Pipelined, `BATCH_PIPELINE` entries per round trip. A failed pipeline reports none
    /// of its entries (some may have been appended); earlier pipelines' entries are reported.
    async fn append_batch(
        &self,
        stream: &str,
        entries: &[Fields],
        max_len: Option<u64>,
    ) -> Result<Vec<String>, BatchAppendError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(position) = entries.iter().position(Fields::is_empty) {
            let error = protocol(format!("entry {position} of the batch has no fields (Redis needs at least one)"));
            return Err(BatchAppendError { appended: Vec::new(), error });
        }
        let mut appended = Vec::with_capacity(entries.len());
        for chunk in entries.chunks(BATCH_PIPELINE) {
            let mut pipeline = redis::pipe();
            for fields in chunk {
                let cmd = pipeline.cmd("XADD").arg(stream).arg("*");
                for (field, value) in fields {
                    cmd.arg(field).arg(value);
                }
            }
            match self.query_pipeline::<Vec<String>>(&pipeline).await {
                Ok(ids) if ids.len() == chunk.len() => appended.extend(ids),
                Ok(ids) => {
                    let error = protocol(format!("{} ids for a pipeline of {} XADD", ids.len(), chunk.len()));
                    return Err(BatchAppendError { appended, error });
                }
                Err(e) => return Err(BatchAppendError { appended, error: e.into() }),
            }
        }
        self.maybe_trim(stream, max_len, entries.len()).await;
        Ok(appended)
    }

    async fn create_group(&self, stream: &str, group: &str) -> Result<(), StreamError> {
        let cmd = redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(group).arg("0").arg("MKSTREAM").to_owned();
        match self.query::<Value>(&cmd).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Delivery>, StreamError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(group).arg(consumer).arg("COUNT").arg(count);
        if !block.is_zero() {
            cmd.arg("BLOCK").arg(block_millis(block));
        }
        cmd.arg("STREAMS").arg(stream).arg(">");
        let reply = self.read(&cmd, block).await.map_err(|e| group_error(e, stream, group))?;
        // `>` only hands out entries never delivered to the group before.
        Ok(parse_read_reply(reply)?.into_iter().map(|entry| Delivery { entry, delivery_count: 1 }).collect())
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<u64, StreamError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let cmd = redis::cmd("XACK").arg(stream).arg(group).arg(ids).to_owned();
        Ok(self.query(&cmd).await?)
    }

    async fn touch(&self, stream: &str, group: &str, consumer: &str, ids: &[String]) -> Result<u64, StreamError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut invocation = self.inner.touch_script.key(stream);
        invocation.arg(group).arg(consumer).arg(ids);
        let touched: u64 = self.invoke(&invocation).await.map_err(|e| group_error(e, stream, group))?;
        Ok(touched)
    }

    async fn delete(&self, stream: &str, ids: &[String]) -> Result<u64, StreamError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let cmd = redis::cmd("XDEL").arg(stream).arg(ids).to_owned();
        Ok(self.query(&cmd).await?)
    }

    async fn claim_idle(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Delivery>, StreamError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let min_idle_ms = u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX);
        let mut invocation = self.inner.claim_script.key(stream);
        invocation.arg(group).arg(consumer).arg(min_idle_ms).arg(count).arg(CLAIM_ROUNDS);
        let reply: Value = self.invoke(&invocation).await.map_err(|e| group_error(e, stream, group))?;
        let (claimed, deleted) = parse_claim_reply(reply)?;
        if deleted > 0 {
            tracing::warn!(
                stream,
                group,
                deleted,
                "pending entries were deleted from the stream before being acknowledged; they are lost to this group"
            );
        }
        Ok(claimed)
    }

    async fn pending(&self, stream: &str, group: &str) -> Result<PendingSummary, StreamError> {
        let cmd = redis::cmd("XPENDING").arg(stream).arg(group).to_owned();
        let reply: Value = self.query(&cmd).await.map_err(|e| group_error(e, stream, group))?;
        parse_pending_summary(reply)
    }

    async fn read_after(
        &self,
        stream: &str,
        after: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, StreamError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(count);
        if !block.is_zero() {
            cmd.arg("BLOCK").arg(block_millis(block));
        }
        cmd.arg("STREAMS").arg(stream).arg(after);
        let reply = self.read(&cmd, block).await?;
        parse_read_reply(reply)
    }

    async fn last_id(&self, stream: &str) -> Result<Option<String>, StreamError> {
        let cmd = redis::cmd("XREVRANGE").arg(stream).arg("+").arg("-").arg("COUNT").arg(1).to_owned();
        let reply: Value = self.query(&cmd).await?;
        Ok(parse_entries(reply)?.into_iter().next().map(|entry| entry.id))
    }

    async fn len(&self, stream: &str) -> Result<u64, StreamError> {
        Ok(self.query(redis::cmd("XLEN").arg(stream)).await?)
    }

    async fn groups(&self, stream: &str) -> Result<Vec<GroupInfo>, StreamError> {
        let cmd = redis::cmd("XINFO").arg("GROUPS").arg(stream).to_owned();
        let reply: Value = match self.query(&cmd).await {
            Ok(reply) => reply,
            Err(e) if e.detail().is_some_and(|detail| detail.contains("no such key")) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut groups = Vec::new();
        for raw in into_array(reply)? {
            let mut fields = into_pairs(raw)?;
            let name = take_string(&mut fields, "name")?;
            let pending = take_u64(&mut fields, "pending")?.unwrap_or(0);
            let last_delivered_id = take_string(&mut fields, "last-delivered-id")?;
            // Nil when Redis cannot compute it (after XDEL in the undelivered range, or for a
            // group set to an arbitrary id).
            let lag = match take_u64(&mut fields, "lag")? {
                Some(lag) => lag,
                None => self.count_after(stream, &last_delivered_id).await?,
            };
            groups.push(GroupInfo { name, pending, lag, last_delivered_id });
        }
        groups.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(groups)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent even if a holder panicked.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Errors after which the connection is gone (as opposed to an error reply, or a timeout on a
/// live but busy server).
fn is_disconnect(e: &RedisError) -> bool {
    e.is_connection_dropped() || e.is_connection_refusal() || (e.is_io_error() && !e.is_timeout())
}

fn group_error(e: RedisError, stream: &str, group: &str) -> StreamError {
    if e.code() == Some("NOGROUP") {
        StreamError::NoGroup { stream: stream.to_owned(), group: group.to_owned() }
    } else {
        StreamError::Redis(e)
    }
}

/// `BLOCK 0` waits forever, so a sub-millisecond block rounds up to 1 ms.
fn block_millis(block: Duration) -> u64 {
    u64::try_from(block.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn protocol(what: impl Into<String>) -> StreamError {
    StreamError::Protocol(what.into())
}

fn into_string(value: Value) -> Result<String, StreamError> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).map_err(|_| protocol("a stream string is not UTF-8")),
        Value::SimpleString(text) => Ok(text),
        Value::VerbatimString { text, .. } => Ok(text),
        Value::Int(n) => Ok(n.to_string()),
        Value::Okay => Ok("OK".to_owned()),
        other => Err(protocol(format!("expected a string, got {other:?}"))),
    }
}

fn into_u64(value: Value) -> Result<Option<u64>, StreamError> {
    match value {
        Value::Nil => Ok(None),
        Value::Int(n) => u64::try_from(n).map(Some).map_err(|_| protocol(format!("negative count {n}"))),
        other => {
            let text = into_string(other)?;
            text.parse().map(Some).map_err(|_| protocol(format!("expected a count, got {text:?}")))
        }
    }
}

fn into_array(value: Value) -> Result<Vec<Value>, StreamError> {
    match value {
        Value::Nil => Ok(Vec::new()),
        Value::Array(items) | Value::Set(items) => Ok(items),
        other => Err(protocol(format!("expected an array, got {other:?}"))),
    }
}

/// A RESP2 flat key/value array or a RESP3 map, as pairs.
fn into_pairs(value: Value) -> Result<Vec<(String, Value)>, StreamError> {
    match value {
        Value::Map(pairs) => pairs.into_iter().map(|(k, v)| Ok((into_string(k)?, v))).collect(),
        Value::Array(items) => {
            if items.len() % 2 != 0 {
                return Err(protocol("a key/value array has an odd length"));
            }
            let mut pairs = Vec::with_capacity(items.len() / 2);
            let mut items = items.into_iter();
            while let (Some(k), Some(v)) = (items.next(), items.next()) {
                pairs.push((into_string(k)?, v));
            }
            Ok(pairs)
        }
        Value::Nil => Ok(Vec::new()),
        other => Err(protocol(format!("expected key/value pairs, got {other:?}"))),
    }
}

fn take(pairs: &mut [(String, Value)], key: &str) -> Value {
    pairs.iter_mut().find(|(k, _)| k == key).map(|(_, v)| std::mem::take(v)).unwrap_or(Value::Nil)
}

fn take_string(pairs: &mut [(String, Value)], key: &str) -> Result<String, StreamError> {
    match take(pairs, key) {
        Value::Nil => Err(protocol(format!("the reply has no {key:?}"))),
        value => into_string(value),
    }
}

fn take_u64(pairs: &mut [(String, Value)], key: &str) -> Result<Option<u64>, StreamError> {
    into_u64(take(pairs, key))
}

fn parse_fields(value: Value) -> Result<Fields, StreamError> {
    into_pairs(value)?.into_iter().map(|(k, v)| Ok((k, into_string(v)?))).collect()
}

/// `[id, [field, value, …]]`; `None` for an entry deleted from the stream (nil fields).
fn parse_entry(value: Value) -> Result<Option<Entry>, StreamError> {
    let mut parts = into_array(value)?.into_iter();
    let id = into_string(parts.next().ok_or_else(|| protocol("a stream entry without an id"))?)?;
    match parts.next() {
        None | Some(Value::Nil) => Ok(None),
        Some(fields) => Ok(Some(Entry { id, fields: parse_fields(fields)? })),
    }
}

fn parse_entries(value: Value) -> Result<Vec<Entry>, StreamError> {
    let mut entries = Vec::new();
    for raw in into_array(value)? {
        entries.extend(parse_entry(raw)?);
    }
    Ok(entries)
}

/// `XREAD`/`XREADGROUP` for one stream: nil, `[[key, entries]]` (RESP2) or `{key: entries}`.
fn parse_read_reply(value: Value) -> Result<Vec<Entry>, StreamError> {
    let per_stream = match value {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(pairs) => pairs.into_iter().map(|(_, entries)| entries).collect::<Vec<_>>(),
        other => {
            let mut per_stream = Vec::new();
            for row in into_array(other)? {
                let mut parts = into_array(row)?.into_iter();
                per_stream.push(parts.nth(1).unwrap_or(Value::Nil));
            }
            per_stream
        }
    };
    let mut entries = Vec::new();
    for raw in per_stream {
        entries.extend(parse_entries(raw)?);
    }
    Ok(entries)
}

/// The claim script's `{{id, fields, delivery count}, …}, deleted count`.
fn parse_claim_reply(value: Value) -> Result<(Vec<Delivery>, u64), StreamError> {
    let mut parts = into_array(value)?.into_iter();
    let claimed = parts.next().ok_or_else(|| protocol("the claim reply is empty"))?;
    let deleted = into_u64(parts.next().unwrap_or(Value::Nil))?.unwrap_or(0);
    let mut deliveries = Vec::new();
    for raw in into_array(claimed)? {
        let mut item = into_array(raw)?.into_iter();
        let (Some(id), Some(fields), Some(count)) = (item.next(), item.next(), item.next()) else {
            return Err(protocol("a claimed entry is incomplete"));
        };
        let entry = Entry { id: into_string(id)?, fields: parse_fields(fields)? };
        let delivery_count = into_u64(count)?.unwrap_or(0);
        deliveries.push(Delivery { entry, delivery_count });
    }
    Ok((deliveries, deleted))
}

/// `XPENDING key group`: `[count, oldest, newest, [[consumer, count], …]]`.
fn parse_pending_summary(value: Value) -> Result<PendingSummary, StreamError> {
    let mut parts = into_array(value)?.into_iter();
    let count = into_u64(parts.next().unwrap_or(Value::Nil))?.unwrap_or(0);
    let oldest_id = match parts.next() {
        None | Some(Value::Nil) => None,
        Some(id) => Some(into_string(id)?),
    };
    let mut consumers = std::collections::BTreeMap::new();
    if let Some(list) = parts.nth(1) {
        for raw in into_array(list)? {
            let mut item = into_array(raw)?.into_iter();
            let (Some(name), Some(pending)) = (item.next(), item.next()) else {
                return Err(protocol("a pending consumer entry is incomplete"));
            };
            consumers.insert(into_string(name)?, into_u64(pending)?.unwrap_or(0));
        }
    }
    Ok(PendingSummary { count, oldest_id, consumers })
}
