//! The configuration of each device kind (plain data, serde), and its command-line form:
//! `FIRST[,key=value|flag]...` strings such as `--disk img,ro,id=root` or
//! `--net tap=tap0,mac=06:00:00:00:00:01`.

use std::path::PathBuf;
use std::time::Duration;

use ember_devices::rate_limiter::{RateLimiter, TokenBucketConfig};
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// A token bucket: `size` tokens, refilled over `refill_time` milliseconds, plus a
/// `one_time_burst` spent first (Firecracker's `TokenBucket`). On the command line:
/// `SIZE/REFILL_MS[/BURST]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Tokens the bucket holds when full (bytes or operations).
    pub size: u64,
    /// Extra tokens available once.
    #[serde(default)]
    pub one_time_burst: u64,
    /// Milliseconds to refill an empty bucket.
    pub refill_time: u64,
}

impl TokenBucket {
    fn config(self) -> TokenBucketConfig {
        TokenBucketConfig {
            size: self.size,
            one_time_burst: self.one_time_burst,
            refill_time: Duration::from_millis(self.refill_time),
        }
    }
}

impl std::str::FromStr for TokenBucket {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("`{s}`: expected SIZE/REFILL_MS[/BURST] with whole numbers"))
        };
        let parts: Vec<&str> = s.split('/').collect();
        match parts[..] {
            [size, ms] => Ok(TokenBucket {
                size: num(size)?,
                one_time_burst: 0,
                refill_time: num(ms)?,
            }),
            [size, ms, burst] => Ok(TokenBucket {
                size: num(size)?,
                one_time_burst: num(burst)?,
                refill_time: num(ms)?,
            }),
            _ => Err(format!("`{s}`: expected SIZE/REFILL_MS[/BURST]")),
        }
    }
}

/// A rate limiter: a bandwidth bucket (bytes) and an operations bucket, each optional
/// (Firecracker's `RateLimiter`). A bucket of size or refill time 0 does not limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Bytes.
    #[serde(default)]
    pub bandwidth: Option<TokenBucket>,
    /// Requests (a frame, a block request, an entropy request).
    #[serde(default)]
    pub ops: Option<TokenBucket>,
}

impl RateLimitConfig {
    /// The device-side limiter.
    pub fn limiter(&self) -> std::io::Result<RateLimiter> {
        RateLimiter::new(
            self.bandwidth.map(TokenBucket::config),
            self.ops.map(TokenBucket::config),
        )
    }
}

/// The limiter of an optional configuration (none: unlimited).
pub(crate) fn limiter(cfg: Option<&RateLimitConfig>) -> std::io::Result<RateLimiter> {
    cfg.map_or_else(RateLimiter::unlimited, RateLimitConfig::limiter)
}

/// `FIRST,opt,key=value,...` split into the first word and its options.
fn options(s: &str) -> (&str, Vec<(&str, Option<&str>)>) {
    let mut parts = s.split(',');
    let first = parts.next().unwrap_or("");
    let opts = parts
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (p, None),
        })
        .collect();
    (first, opts)
}

fn bucket(
    value: Option<&str>,
    key: &str,
    err: impl Fn(String) -> ConfigError,
) -> Result<TokenBucket, ConfigError> {
    let v = value.ok_or_else(|| err(format!("`{key}` needs SIZE/REFILL_MS[/BURST]")))?;
    v.parse::<TokenBucket>()
        .map_err(|e| err(format!("{key}: {e}")))
}

/// A virtio-blk disk backed by a raw image file.
///
/// On the command line: `path[,ro][,id=serial][,bw=SIZE/MS[/BURST]][,ops=SIZE/MS[/BURST]]`.
///
/// ```
/// let d: ember_vmm::DiskConfig = "/images/root.img,ro,id=root,bw=1048576/1000".parse().unwrap();
/// assert!(d.read_only);
/// assert_eq!(d.id.as_deref(), Some("root"));
/// assert_eq!(d.rate_limiter.unwrap().bandwidth.unwrap().size, 1 << 20);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The raw image file.
    pub path: PathBuf,
    /// Refuse guest writes (they complete with an I/O error; the file is opened read-only).
    #[serde(default)]
    pub read_only: bool,
    /// Serial number the guest reads with GET_ID (at most 20 bytes).
    #[serde(default)]
    pub id: Option<String>,
    /// Rate limit on the disk's requests.
    #[serde(default)]
    pub rate_limiter: Option<RateLimitConfig>,
}

impl DiskConfig {
    /// The virtio-blk device configuration for this disk.
    pub fn block_config(&self) -> ember_devices::virtio::block::BlockConfig {
        ember_devices::virtio::block::BlockConfig {
            path: self.path.clone(),
            read_only: self.read_only,
            serial: self.id.clone(),
        }
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: String| ConfigError::Disk(format!("`{s}`: {why}"));
        let (path, opts) = options(s);
        if path.is_empty() {
            return Err(err("no image path".into()));
        }
        let mut disk = DiskConfig {
            path: PathBuf::from(path),
            ..Default::default()
        };
        let mut rl = RateLimitConfig::default();
        for (k, v) in opts {
            match (k, v) {
                ("ro", None) => disk.read_only = true,
                ("rw", None) => disk.read_only = false,
                ("id", Some(id)) => disk.id = Some(id.to_string()),
                ("bw", v) => rl.bandwidth = Some(bucket(v, k, err)?),
                ("ops", v) => rl.ops = Some(bucket(v, k, err)?),
                _ => {
                    return Err(err(format!(
                        "unknown option `{k}` (expected ro, rw, id=SERIAL, bw=SIZE/MS, ops=SIZE/MS)"
                    )))
                }
            }
        }
        if rl != RateLimitConfig::default() {
            disk.rate_limiter = Some(rl);
        }
        Ok(disk)
    }
}

/// A MAC address, `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a MAC address (aa:bb:cc:dd:ee:ff)");
        let mut mac = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        for (b, p) in mac.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if mac[0] & 1 != 0 {
            return Err(format!(
                "`{s}` is a multicast address; a NIC needs a unicast one"
            ));
        }
        Ok(MacAddr(mac))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A virtio-net interface on a host TAP device.
///
/// On the command line: `tap=NAME[,mac=MAC][,id=ID][,mtu=N][,offload=on|off][,rx_bw=..][,rx_ops=..]
/// [,tx_bw=..][,tx_ops=..]` (buckets as `SIZE/MS[/BURST]`).
///
/// ```
/// let n: ember_vmm::NetConfig = "tap=tap0,mac=06:00:ac:10:00:02,id=eth0".parse().unwrap();
/// assert_eq!(n.tap, "tap0");
/// assert_eq!(n.mac.unwrap().to_string(), "06:00:ac:10:00:02");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The host TAP interface (created beforehand, in the VMM's network namespace).
    pub tap: String,
    /// The guest's MAC address (default: one derived from the TAP name, locally administered).
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// The interface's id (default `net<N>`).
    #[serde(default)]
    pub id: Option<String>,
    /// The MTU the guest is told (`VIRTIO_NET_F_MTU`; default: not offered).
    #[serde(default)]
    pub mtu: Option<u16>,
    /// Offer checksum and segmentation offloads to the guest (default: yes).
    #[serde(default = "yes")]
    pub offload: bool,
    /// Rate limit on frames to the guest.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimitConfig>,
    /// Rate limit on frames from the guest.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimitConfig>,
}

fn yes() -> bool {
    true
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            tap: String::new(),
            mac: None,
            id: None,
            mtu: None,
            offload: true,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }
    }
}

impl NetConfig {
    /// The MAC address the guest gets: the configured one, or one derived from the TAP name
    /// (locally administered, unicast: `06:..`), stable across runs.
    pub fn mac(&self) -> MacAddr {
        self.mac.unwrap_or_else(|| {
            // FNV-1a of the name: stable and spread out.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in self.tap.bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            let b = h.to_le_bytes();
            MacAddr([0x06, b[0], b[1], b[2], b[3], b[4]])
        })
    }
}

impl std::str::FromStr for NetConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: String| ConfigError::Net(format!("`{s}`: {why}"));
        let (first, mut opts) = options(s);
        // `tap=NAME` may come first or anywhere.
        if !first.is_empty() {
            opts.insert(
                0,
                first
                    .split_once('=')
                    .map_or((first, None), |(k, v)| (k, Some(v))),
            );
        }
        let mut net = NetConfig::default();
        let (mut rx, mut tx) = (RateLimitConfig::default(), RateLimitConfig::default());
        for (k, v) in opts {
            match (k, v) {
                ("tap", Some(t)) => net.tap = t.to_string(),
                ("mac", Some(m)) => net.mac = Some(m.parse().map_err(err)?),
                ("id", Some(id)) => net.id = Some(id.to_string()),
                ("mtu", Some(m)) => {
                    net.mtu = Some(m.parse().map_err(|_| err(format!("bad mtu `{m}`")))?)
                }
                ("offload", Some("on")) => net.offload = true,
                ("offload", Some("off")) => net.offload = false,
                ("rx_bw", v) => rx.bandwidth = Some(bucket(v, k, err)?),
                ("rx_ops", v) => rx.ops = Some(bucket(v, k, err)?),
                ("tx_bw", v) => tx.bandwidth = Some(bucket(v, k, err)?),
                ("tx_ops", v) => tx.ops = Some(bucket(v, k, err)?),
                _ => return Err(err(format!(
                    "unknown option `{k}` (expected tap=NAME, mac=MAC, id=ID, mtu=N, offload=on|off, rx_bw, rx_ops, tx_bw, tx_ops)"
                ))),
            }
        }
        if net.tap.is_empty() {
            return Err(err("no tap=NAME".into()));
        }
        net.rx_rate_limiter = (rx != RateLimitConfig::default()).then_some(rx);
        net.tx_rate_limiter = (tx != RateLimitConfig::default()).then_some(tx);
        Ok(net)
    }
}

/// A virtio-vsock device with Firecracker's host side: the guest is `cid`; host programs
/// connect to the Unix socket `uds_path` and write `CONNECT <port>\n` to reach a guest
/// listener; a guest connecting to host port P reaches the Unix socket `<uds_path>_<P>`.
///
/// On the command line: `cid=N,uds=PATH`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or above).
    pub cid: u64,
    /// The Unix socket host programs connect to (created by Ember; must not exist).
    pub uds_path: PathBuf,
}

impl std::str::FromStr for VsockConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: String| ConfigError::Vsock(format!("`{s}`: {why}"));
        let (first, mut opts) = options(s);
        if !first.is_empty() {
            opts.insert(
                0,
                first
                    .split_once('=')
                    .map_or((first, None), |(k, v)| (k, Some(v))),
            );
        }
        let mut v = VsockConfig::default();
        for (k, val) in opts {
            match (k, val) {
                ("cid", Some(c)) => v.cid = c.parse().map_err(|_| err(format!("bad cid `{c}`")))?,
                ("uds", Some(p)) => v.uds_path = PathBuf::from(p),
                _ => {
                    return Err(err(format!(
                        "unknown option `{k}` (expected cid=N, uds=PATH)"
                    )))
                }
            }
        }
        if v.uds_path.as_os_str().is_empty() {
            return Err(err("no uds=PATH".into()));
        }
        Ok(v)
    }
}

/// A virtio-rng entropy device.
///
/// On the command line: `--rng` or `--rng bw=SIZE/MS[/BURST],ops=SIZE/MS[/BURST]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    /// Rate limit on the entropy requests.
    #[serde(default)]
    pub rate_limiter: Option<RateLimitConfig>,
}

impl std::str::FromStr for RngConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: String| ConfigError::Rng(format!("`{s}`: {why}"));
        let (first, mut opts) = options(s);
        if !first.is_empty() {
            opts.insert(
                0,
                first
                    .split_once('=')
                    .map_or((first, None), |(k, v)| (k, Some(v))),
            );
        }
        let mut rl = RateLimitConfig::default();
        for (k, v) in opts {
            match k {
                "bw" => rl.bandwidth = Some(bucket(v, k, err)?),
                "ops" => rl.ops = Some(bucket(v, k, err)?),
                _ => {
                    return Err(err(format!(
                        "unknown option `{k}` (expected bw=.., ops=..)"
                    )))
                }
            }
        }
        Ok(RngConfig {
            rate_limiter: (rl != RateLimitConfig::default()).then_some(rl),
        })
    }
}

/// A virtio-balloon device.
///
/// On the command line: `mib=N[,stats=SECONDS][,deflate-on-oom][,free-page-reporting]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// The balloon's target size in MiB: memory the guest is asked to give back.
    pub amount_mib: u64,
    /// Seconds between statistics requests (0: no statistics queue).
    #[serde(default)]
    pub stats_polling_interval_s: u64,
    /// The guest may deflate the balloon when it runs out of memory.
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// Offer free page reporting (the guest reports free pages, which Ember discards).
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl std::str::FromStr for BalloonConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: String| ConfigError::Balloon(format!("`{s}`: {why}"));
        let (first, mut opts) = options(s);
        if !first.is_empty() {
            opts.insert(
                0,
                first
                    .split_once('=')
                    .map_or((first, None), |(k, v)| (k, Some(v))),
            );
        }
        let mut b = BalloonConfig::default();
        let mut have_size = false;
        for (k, v) in opts {
            let num = |v: Option<&str>| {
                v.and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| err(format!("`{k}` needs a whole number")))
            };
            match (k, v) {
                ("mib", v) => {
                    b.amount_mib = num(v)?;
                    have_size = true;
                }
                ("stats", v) => b.stats_polling_interval_s = num(v)?,
                ("deflate-on-oom", None) => b.deflate_on_oom = true,
                ("free-page-reporting", None) => b.free_page_reporting = true,
                _ => return Err(err(format!(
                    "unknown option `{k}` (expected mib=N, stats=SECONDS, deflate-on-oom, free-page-reporting)"
                ))),
            }
        }
        if !have_size {
            return Err(err("no mib=N".into()));
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_strings() {
        let d: DiskConfig = "/a.img".parse().unwrap();
        assert_eq!((d.read_only, d.id), (false, None));
        let d: DiskConfig = "/a.img,id=x,ro,ops=100/1000/50".parse().unwrap();
        assert_eq!((d.read_only, d.id.as_deref()), (true, Some("x")));
        assert_eq!(
            d.rate_limiter.unwrap().ops,
            Some(TokenBucket {
                size: 100,
                one_time_burst: 50,
                refill_time: 1000
            })
        );
        assert!("".parse::<DiskConfig>().is_err());
        assert!("/a.img,cache=none".parse::<DiskConfig>().is_err());
        assert!("/a.img,bw=fast".parse::<DiskConfig>().is_err());
        assert!("/a.img,bw".parse::<DiskConfig>().is_err());
    }

    #[test]
    fn net_strings() {
        let n: NetConfig = "tap=t0,mac=02:00:00:00:00:09,mtu=1400,rx_bw=1000/100"
            .parse()
            .unwrap();
        assert_eq!(n.tap, "t0");
        assert_eq!(n.mac, Some(MacAddr([2, 0, 0, 0, 0, 9])));
        assert_eq!(n.mtu, Some(1400));
        assert!(n.rx_rate_limiter.is_some() && n.tx_rate_limiter.is_none());
        assert!(
            "mac=02:00:00:00:00:01".parse::<NetConfig>().is_err(),
            "no tap"
        );
        assert!(
            "tap=t,mac=01:00:00:00:00:00".parse::<NetConfig>().is_err(),
            "multicast"
        );
        assert!("tap=t,mac=zz".parse::<NetConfig>().is_err());
        // The default MAC is unicast, locally administered and stable.
        let a = "tap=tap0".parse::<NetConfig>().unwrap().mac();
        assert_eq!(a, "tap=tap0".parse::<NetConfig>().unwrap().mac());
        assert_eq!(a.0[0], 0x06);
        assert_ne!(a, "tap=tap1".parse::<NetConfig>().unwrap().mac());
        let json = serde_json::to_string(&n).unwrap();
        assert!(json.contains(r#""mac":"02:00:00:00:00:09""#), "{json}");
        assert_eq!(serde_json::from_str::<NetConfig>(&json).unwrap(), n);
    }

    #[test]
    fn vsock_rng_balloon_strings() {
        let v: VsockConfig = "cid=3,uds=/tmp/v.sock".parse().unwrap();
        assert_eq!((v.cid, v.uds_path.to_str()), (3, Some("/tmp/v.sock")));
        assert!("cid=3".parse::<VsockConfig>().is_err());
        let r: RngConfig = "".parse().unwrap();
        assert_eq!(r, RngConfig::default());
        let r: RngConfig = "bw=4096/1000".parse().unwrap();
        assert!(r.rate_limiter.unwrap().bandwidth.is_some());
        let b: BalloonConfig = "mib=64,stats=1,deflate-on-oom".parse().unwrap();
        assert_eq!(
            (b.amount_mib, b.stats_polling_interval_s, b.deflate_on_oom),
            (64, 1, true)
        );
        assert!("stats=1".parse::<BalloonConfig>().is_err());
    }
}
