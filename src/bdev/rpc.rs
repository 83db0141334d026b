//! Generic bdev RPCs: `bdev_get_bdevs`, `bdev_get_iostat`, `bdev_set_qos_limit`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Value};

use super::histogram::{self, HistogramOpts};
use super::qos::QosLimits;
use super::registry::RegistryError;
use super::stats::ResetMode;
use super::{Bdev, BdevRegistry};
use crate::rpc::{no_params, params, RpcError, RpcMethods, RpcResult};

/// What the bdev methods act on: the application's bdevs. The application implements it,
/// and so does every context of a module whose methods also need bdevs.
pub trait BdevContext: Send + Sync + 'static {
    fn bdevs(&self) -> &BdevRegistry;
}

impl From<RegistryError> for RpcError {
    /// -17 (`EEXIST`), -19 (`ENODEV`) and -16 (`EBUSY`), with messages naming the bdev.
    fn from(e: RegistryError) -> Self {
        crate::error::Error::from(e).into()
    }
}

/// `{name}` of the delete methods.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct NameParams {
    pub name: String,
}

/// `bdev_<module>_delete {name}` of the backends whose bdevs live only in the registry
/// (malloc, null, aio, local): removes bdev `name` if it is a `product` bdev (ENODEV when
/// there is none, EBUSY while it is claimed); answers true (SPDK jsonrpc.md).
pub fn delete_product<C: BdevContext>(app: &Arc<C>, p: Option<Value>, product: &str) -> RpcResult {
    let p: NameParams = params(p)?;
    app.bdevs().remove_product(&p.name, Some(product))?;
    Ok(Value::Bool(true))
}

/// `bdev_get_bdevs` params.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct GetBdevsParams {
    pub name: Option<String>,
    /// Milliseconds to wait for the bdev to appear; bdevs here appear synchronously, so an
    /// absent bdev is reported at once.
    pub timeout: Option<u64>,
}

/// `bdev_get_iostat` params (old `name`, and the newer rpc.py's `names`, `per_channel`,
/// `reset_mode`).
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct GetIostatParams {
    pub name: Option<String>,
    pub names: Option<Vec<String>>,
    pub per_channel: Option<bool>,
    pub reset_mode: Option<String>,
}

/// `bdev_set_qos_limit` params; an absent limit keeps its current value (as in SPDK).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct SetQosParams {
    pub name: String,
    pub rw_ios_per_sec: Option<u64>,
    pub rw_mbytes_per_sec: Option<u64>,
    pub r_mbytes_per_sec: Option<u64>,
    pub w_mbytes_per_sec: Option<u64>,
}

/// The bdev named, or every bdev without a name; unknown → -19 "No such device".
fn named_or_all(reg: &BdevRegistry, name: Option<&str>) -> Result<Vec<Arc<Bdev>>, RpcError> {
    match name {
        Some(n) => Ok(vec![reg
            .get(n)
            .ok_or_else(|| RpcError::errno(libc::ENODEV))?]),
        None => Ok(reg.list()),
    }
}

/// `bdev_get_bdevs`: every bdev, or the one named; unknown → -19 "No such device".
pub fn get_bdevs(reg: &BdevRegistry, p: &GetBdevsParams) -> RpcResult {
    let list = named_or_all(reg, p.name.as_deref())?;
    Ok(Value::Array(list.iter().map(|b| b.to_json()).collect()))
}

/// `bdev_get_iostat`: `{tick_rate, ticks, bdevs: [...]}`; ticks are ns since the epoch.
pub fn get_iostat(reg: &BdevRegistry, p: &GetIostatParams) -> RpcResult {
    if p.per_channel == Some(true) {
        return Err(RpcError::invalid_params(
            "per_channel statistics are not supported by blockd",
        ));
    }
    let reset = parse_reset_mode("reset_mode", p.reset_mode.as_deref(), None)?;
    let mut wanted: Vec<&str> = p.names.iter().flatten().map(String::as_str).collect();
    wanted.extend(p.name.as_deref());
    let list = if wanted.is_empty() {
        reg.list()
    } else {
        wanted
            .iter()
            .map(|n| reg.get(n).ok_or_else(|| RpcError::errno(libc::ENODEV)))
            .collect::<Result<Vec<_>, _>>()?
    };
    let ticks = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let bdevs: Vec<Value> = list.iter().map(|b| b.stats.to_json(b.name())).collect();
    if let Some(mode) = reset {
        // SPDK reads, then resets: the answer holds what was cleared.
        list.iter().for_each(|b| b.stats.reset(mode));
    }
    Ok(json!({
        "tick_rate": super::stats::TICK_RATE,
        "ticks": ticks,
        "bdevs": bdevs,
    }))
}

/// A reset mode parameter named `field` (`None`: `absent`; `none`: no reset); an unknown
/// mode is -32602 naming the field.
fn parse_reset_mode(
    field: &str,
    value: Option<&str>,
    absent: Option<ResetMode>,
) -> Result<Option<ResetMode>, RpcError> {
    value.map_or(Ok(absent), |m| {
        ResetMode::parse(m).map_err(|e| RpcError::invalid_params(format!("{field} {e}")))
    })
}

/// `bdev_reset_iostat` params: one bdev or all; mode `all` (default), `maxmin`, `error` or
/// `none`.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct ResetIostatParams {
    pub name: Option<String>,
    pub mode: Option<String>,
}

/// `bdev_reset_iostat` (SPDK v23.01+): clears the statistics of one bdev or of all;
/// an unknown bdev is -19, an unknown mode -32602, and neither changes anything.
pub fn reset_iostat(reg: &BdevRegistry, p: &ResetIostatParams) -> RpcResult {
    let mode = parse_reset_mode("mode", p.mode.as_deref(), Some(ResetMode::All))?;
    let list = named_or_all(reg, p.name.as_deref())?;
    if let Some(mode) = mode {
        list.iter().for_each(|b| b.stats.reset(mode));
    }
    Ok(json!(true))
}

fn rpc_reset_iostat<C: BdevContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    reset_iostat(app.bdevs(), &params(p)?)
}

/// `bdev_set_qos_limit`: merges the given limits into the bdev's; unknown bdev → -32602
/// "No such device"; no limit given or an invalid one → -32602 with the reason.
pub fn set_qos_limit(reg: &BdevRegistry, p: &SetQosParams) -> Result<(), RpcError> {
    let bdev = reg
        .get(&p.name)
        .ok_or_else(|| RpcError::invalid_params_errno(libc::ENODEV))?;
    if p.rw_ios_per_sec.is_none()
        && p.rw_mbytes_per_sec.is_none()
        && p.r_mbytes_per_sec.is_none()
        && p.w_mbytes_per_sec.is_none()
    {
        return Err(RpcError::invalid_params("No rate limits specified"));
    }
    let cur = bdev.qos.limits();
    let new = QosLimits {
        rw_ios_per_sec: p.rw_ios_per_sec.unwrap_or(cur.rw_ios_per_sec),
        rw_mbytes_per_sec: p.rw_mbytes_per_sec.unwrap_or(cur.rw_mbytes_per_sec),
        r_mbytes_per_sec: p.r_mbytes_per_sec.unwrap_or(cur.r_mbytes_per_sec),
        w_mbytes_per_sec: p.w_mbytes_per_sec.unwrap_or(cur.w_mbytes_per_sec),
    };
    bdev.qos.set_limits(new).map_err(|e| {
        RpcError::invalid_params(format!("Failed to configure rate limit on {}: {e}", p.name))
    })?;
    tracing::info!(bdev = %p.name, ?new, "QoS limits set");
    Ok(())
}

fn rpc_get_bdevs<C: BdevContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    get_bdevs(app.bdevs(), &params(p)?)
}

fn rpc_get_iostat<C: BdevContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    get_iostat(app.bdevs(), &params(p)?)
}

fn rpc_set_qos_limit<C: BdevContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    set_qos_limit(app.bdevs(), &params(p)?)?;
    Ok(Value::Bool(true))
}

/// Registers the generic bdev methods.
pub fn register<C: BdevContext>(m: &mut RpcMethods<C>) {
    m.add("bdev_get_bdevs", rpc_get_bdevs);
    m.add("bdev_get_iostat", rpc_get_iostat);
    m.add("bdev_reset_iostat", rpc_reset_iostat);
    m.add("bdev_set_qos_limit", rpc_set_qos_limit);
    m.add("bdev_wait_for_examine", rpc_wait_for_examine);
    m.add("bdev_enable_histogram", rpc_enable_histogram);
    m.add("bdev_get_histogram", rpc_get_histogram);
}

/// `bdev_enable_histogram` params (SPDK's `rpc_bdev_enable_histogram_request`).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct EnableHistogramParams {
    pub name: String,
    pub enable: bool,
    /// One operation type (`bdev_get_bdevs`' names); all without.
    pub opc: Option<String>,
    /// Accepted as SPDK does; blockd records at its own [`histogram::GRANULARITY`] and
    /// reports that one.
    pub granularity: Option<u8>,
    pub min_nsec: Option<u64>,
    pub max_nsec: Option<u64>,
}

/// `bdev_enable_histogram`: starts (again, from zero) or stops the histogram
/// `bdev_get_histogram` reports. Unknown bdev → -19; unknown `opc` → -32603 "Invalid Io
/// type"; `min_nsec` ≥ `max_nsec` → -22, as SPDK (`lib/bdev/bdev_rpc.c`).
fn rpc_enable_histogram<C: BdevContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: EnableHistogramParams = params(p)?;
    let bdev = app
        .bdevs()
        .get(&p.name)
        .ok_or_else(|| RpcError::errno(libc::ENODEV))?;
    let kind = match p.opc.as_deref() {
        None => None,
        Some(o) => Some(
            histogram::KINDS
                .iter()
                .position(|&k| histogram::io_type_name(k) == o)
                .ok_or_else(|| {
                    RpcError::new(crate::rpc::code::INTERNAL_ERROR, "Invalid Io type")
                })?,
        ),
    };
    let opts = HistogramOpts {
        kind,
        min_ns: p.min_nsec.unwrap_or(0),
        max_ns: p.max_nsec.unwrap_or(u64::MAX),
    };
    if opts.min_ns >= opts.max_ns {
        return Err(RpcError::errno(libc::EINVAL));
    }
    bdev.stats.histograms.enable(p.enable.then_some(opts));
    tracing::info!(bdev = %p.name, enable = p.enable, "latency histogram");
    Ok(json!(true))
}

/// `bdev_get_histogram {name}`: SPDK's result: `histogram` (base64 of the little-endian
/// u64 bucket array of `spdk_histogram_data`), `granularity`, `min_range`, `max_range`,
/// `tsc_rate` (ticks are ns), and the older `bucket_shift` (= granularity; the array
/// starts at range 0 unless `min_nsec` was given). Not enabled → -32603 "Bad address"
/// (SPDK's -EFAULT).
fn rpc_get_histogram<C: BdevContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: NameParams = params(p)?;
    let bdev = app
        .bdevs()
        .get(&p.name)
        .ok_or_else(|| RpcError::errno(libc::ENODEV))?;
    let Some((snap, opts)) = bdev.stats.histograms.since_enabled() else {
        return Err(RpcError::new(
            crate::rpc::code::INTERNAL_ERROR,
            "Bad address",
        ));
    };
    let kinds: Vec<usize> = match opts.kind {
        Some(k) => vec![k],
        None => (0..histogram::KINDS.len()).collect(),
    };
    let (buckets, min_range, max_range) = snap.spdk_buckets(&kinds, opts.min_ns, opts.max_ns);
    let bytes: Vec<u8> = buckets.iter().flat_map(|b| b.to_le_bytes()).collect();
    use base64::Engine as _;
    Ok(json!({
        "histogram": base64::engine::general_purpose::STANDARD.encode(bytes),
        "granularity": histogram::GRANULARITY,
        "bucket_shift": histogram::GRANULARITY,
        "min_range": min_range,
        "max_range": max_range,
        "tsc_rate": super::stats::TICK_RATE,
    }))
}

/// `bdev_wait_for_examine`: SPDK answers once every bdev module has examined every bdev
/// (partition tables, lvol stores), and ends each saved bdev configuration with it.
/// blockd has no examining modules and registers a bdev completely before its create call
/// returns, so there is never anything to wait for: `true` at once.
fn rpc_wait_for_examine<C: BdevContext>(_app: &Arc<C>, p: Option<Value>) -> RpcResult {
    no_params(p)?;
    Ok(json!(true))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::bdev::channel::test_support::iov;
    use crate::bdev::malloc::{self, MallocOpts};
    use crate::bdev::null::{self, NullOpts};
    use crate::bdev::{IoOp, IoVecs};

    fn reg() -> BdevRegistry {
        let r = BdevRegistry::default();
        malloc::create(
            &r,
            MallocOpts {
                name: None,
                uuid: None,
                num_blocks: 32,
                block_size: 512,
            },
        )
        .unwrap();
        null::create(
            &r,
            NullOpts {
                name: "Null0".into(),
                uuid: None,
                num_blocks: 1 << 20,
                block_size: 512,
            },
        )
        .unwrap();
        r
    }

    #[test]
    fn get_bdevs_and_iostat() {
        let r = reg();
        let all = get_bdevs(&r, &GetBdevsParams::default()).unwrap();
        let names: Vec<_> = all
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].clone())
            .collect();
        assert_eq!(names, vec![json!("Malloc0"), json!("Null0")]);
        let m = &all[0];
        assert_eq!(m["product_name"], "Malloc disk");
        assert_eq!(m["num_blocks"], 32);
        assert_eq!(m["aliases"][0], m["uuid"]);
        let by_uuid = GetBdevsParams {
            name: m["uuid"].as_str().map(String::from),
            timeout: None,
        };
        assert_eq!(get_bdevs(&r, &by_uuid).unwrap()[0]["name"], "Malloc0");
        let e = get_bdevs(
            &r,
            &GetBdevsParams {
                name: Some("nope".into()),
                timeout: None,
            },
        );
        assert_eq!(e.unwrap_err(), RpcError::new(-19, "No such device"));

        let p: GetIostatParams =
            params(Some(json!({"per_channel": false, "names": ["Null0"]}))).unwrap();
        let s = get_iostat(&r, &p).unwrap();
        assert_eq!(s["tick_rate"], 1_000_000_000u64);
        assert!(s["ticks"].as_u64().unwrap() > 0);
        assert_eq!(s["bdevs"].as_array().unwrap().len(), 1);
        assert_eq!(s["bdevs"][0]["name"], "Null0");
        assert_eq!(
            get_iostat(&r, &GetIostatParams::default()).unwrap()["bdevs"][1]["name"],
            "Null0"
        );
    }

    #[test]
    fn set_qos_limit_validates_and_merges() {
        let r = reg();
        let p = |v: Value| params::<SetQosParams>(Some(v)).unwrap();
        let e = set_qos_limit(&r, &p(json!({"name": "x", "rw_ios_per_sec": 1000}))).unwrap_err();
        assert_eq!(e, RpcError::new(-32602, "No such device"));
        let e = set_qos_limit(&r, &p(json!({"name": "Null0"}))).unwrap_err();
        assert_eq!(e.code, -32602);
        let e = set_qos_limit(&r, &p(json!({"name": "Null0", "rw_ios_per_sec": 1500})));
        assert!(e.unwrap_err().message.contains("multiple of 1000"));
        set_qos_limit(&r, &p(json!({"name": "Null0", "rw_ios_per_sec": 10000}))).unwrap();
        set_qos_limit(&r, &p(json!({"name": "Null0", "w_mbytes_per_sec": 7}))).unwrap();
        let b = r.get("Null0").unwrap();
        let l = &b.to_json()["assigned_rate_limits"];
        assert_eq!(
            (l["rw_ios_per_sec"].as_u64(), l["w_mbytes_per_sec"].as_u64()),
            (Some(10000), Some(7))
        );
    }

    /// A saturating load on a null bdev limited to 10000 IOPS, through a real channel.
    #[test]
    fn qos_holds_iops_limit_under_saturation() {
        let r = reg();
        set_qos_limit(
            &r,
            &params(Some(json!({"name": "Null0", "rw_ios_per_sec": 10000}))).unwrap(),
        )
        .unwrap();
        let b = r.get("Null0").unwrap();
        let mut ch = b.open_channel().unwrap();
        let mut buf = vec![0u8; 4096];
        let v = [iov(&mut buf)];
        let op = IoOp::Read {
            offset: 0,
            // SAFETY: `buf` and `v` outlive every submission (the channel is drained below).
            iovs: unsafe { IoVecs::from_slice(&v) },
        };
        let depth = 32;
        let start = Instant::now();
        let dur = Duration::from_millis(500);
        let mut completed = 0u64;
        let mut tag = 0u64;
        let mut outstanding = 0usize;
        while start.elapsed() < dur {
            while outstanding < depth {
                // SAFETY: see above.
                unsafe { ch.submit(tag, op) };
                tag += 1;
                outstanding += 1;
            }
            ch.kick();
            let n = ch.poll(&mut |_, res| assert!(res.is_ok()));
            completed += n as u64;
            outstanding -= n;
            if n == 0 {
                if let Some(d) = ch.next_deadline() {
                    let now = Instant::now();
                    std::thread::sleep(
                        d.saturating_duration_since(now)
                            .min(Duration::from_millis(1)),
                    );
                }
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let rate = completed as f64 / secs;
        assert!(
            (9500.0..=10500.0).contains(&rate),
            "{completed} in {secs} s = {rate}/s"
        );
        // Drain what is still throttled.
        let deadline = Instant::now() + Duration::from_secs(5);
        while ch.in_flight() > 0 {
            assert!(Instant::now() < deadline);
            ch.poll(&mut |_, _| {});
        }
        assert_eq!(b.stats.to_json("x")["num_read_ops"].as_u64(), Some(tag));
    }
}
