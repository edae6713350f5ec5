//! Token-bucket rate limiting for device I/O, with Firecracker's semantics: a bucket has a
//! `size` (tokens it holds when full, refilled linearly over `refill_time`), and an optional
//! `one_time_burst` of extra tokens spent first and never refilled. A [`RateLimiter`] has a
//! bandwidth bucket (bytes) and an operations bucket (requests); a device asks it before each
//! request and, when refused, waits for its [`Timer`] (a non-blocking timerfd the VMM watches
//! like any other host descriptor) before trying again.
//!
//! ```
//! use std::time::Duration;
//! use ember_devices::rate_limiter::{RateLimiter, TokenBucketConfig, TokenType};
//!
//! // 1 MiB per second, no burst; at most 100 operations per second.
//! let mut rl = RateLimiter::new(
//!     Some(TokenBucketConfig { size: 1 << 20, one_time_burst: 0, refill_time: Duration::from_secs(1) }),
//!     Some(TokenBucketConfig { size: 100, one_time_burst: 0, refill_time: Duration::from_secs(1) }),
//! )?;
//! assert!(rl.consume(4096, TokenType::Bytes));
//! assert!(rl.consume(1, TokenType::Ops));
//! // More than the bucket holds: refused, and the timer is armed.
//! assert!(!rl.consume(1 << 20, TokenType::Bytes));
//! assert!(rl.is_blocked());
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// The longest a refused device waits before it asks again (Firecracker's
/// `REFILL_TIMER_INTERVAL_MS`, which Firecracker always waits).
pub const REFILL_TIMER_INTERVAL: Duration = Duration::from_millis(100);

/// The shortest a refused device waits (timer wake-ups are not free).
pub const MIN_REFILL_WAIT: Duration = Duration::from_millis(1);

/// A token bucket's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds when full, and how many it regains per `refill_time`.
    pub size: u64,
    /// Extra tokens available once, spent before the bucket's own.
    pub one_time_burst: u64,
    /// Time to refill an empty bucket completely.
    pub refill_time: Duration,
}

/// What a bucket made of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// The tokens were taken.
    Taken,
    /// Not enough tokens now; try again later.
    Refused,
    /// More than the whole bucket holds: everything was taken, and the bucket is `ratio`
    /// buckets in debt (the caller should wait `ratio` refill times).
    Overconsumed {
        /// Requested tokens over the bucket size, rounded up.
        ratio: u64,
    },
}

/// One token bucket (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct TokenBucket {
    config: TokenBucketConfig,
    budget: u64,
    burst: u64,
    last_update: Instant,
}

impl TokenBucket {
    /// A full bucket. `None` for a bucket that could never refill (size or refill time zero):
    /// such a limit means "unlimited", as in Firecracker.
    pub fn new(config: TokenBucketConfig) -> Option<Self> {
        if config.size == 0 || config.refill_time.is_zero() {
            return None;
        }
        Some(TokenBucket {
            config,
            budget: config.size,
            burst: config.one_time_burst,
            last_update: Instant::now(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> TokenBucketConfig {
        self.config
    }

    /// Tokens available now (the burst included).
    pub fn available(&mut self) -> u64 {
        self.refill();
        self.budget.saturating_add(self.burst)
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last_update);
        let refill_ns = self.config.refill_time.as_nanos();
        let new = elapsed
            .as_nanos()
            .saturating_mul(u128::from(self.config.size))
            / refill_ns;
        if new == 0 {
            return;
        }
        let new = u64::try_from(new).unwrap_or(u64::MAX);
        self.budget = self.budget.saturating_add(new).min(self.config.size);
        // Keep the remainder of the elapsed time for the next refill, so that many small
        // refills add up to the rate.
        let used_ns = u128::from(new) * refill_ns / u128::from(self.config.size);
        self.last_update += Duration::from_nanos(u64::try_from(used_ns).unwrap_or(u64::MAX));
        if self.budget == self.config.size {
            self.last_update = now;
        }
    }

    /// Takes `tokens`: from the one-time burst first, then from the bucket.
    pub fn reduce(&mut self, mut tokens: u64) -> Reduction {
        if self.burst > 0 {
            let from_burst = self.burst.min(tokens);
            self.burst -= from_burst;
            tokens -= from_burst;
            if tokens == 0 {
                return Reduction::Taken;
            }
        }
        self.refill();
        if tokens > self.config.size {
            // More than a full bucket: take it all and owe the rest, as Firecracker does, so
            // that one large request is not refused for ever.
            let ratio = tokens.div_ceil(self.config.size);
            self.budget = 0;
            self.last_update = Instant::now();
            return Reduction::Overconsumed { ratio };
        }
        if tokens > self.budget {
            return Reduction::Refused;
        }
        self.budget -= tokens;
        Reduction::Taken
    }

    /// How long until the bucket holds `tokens` (at most a full bucket's refill time).
    pub fn time_until(&self, tokens: u64) -> Duration {
        let missing = tokens.min(self.config.size).saturating_sub(self.budget);
        let ns =
            u128::from(missing) * self.config.refill_time.as_nanos() / u128::from(self.config.size);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Gives back `tokens` (a request that was taken and then not carried out).
    pub fn replenish(&mut self, tokens: u64) {
        self.budget = self.budget.saturating_add(tokens).min(self.config.size);
    }
}

/// How [`RateLimiter::update`] changes one bucket (Firecracker's `BucketUpdate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketUpdate {
    /// Leave it as it is.
    Keep,
    /// Remove it: no limit on that kind of token.
    Disable,
    /// Replace it by a full bucket of this configuration (size or refill time 0 disables).
    Set(TokenBucketConfig),
}

/// What [`RateLimiter::consume`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    /// Bytes, against the bandwidth bucket.
    Bytes,
    /// Operations (requests), against the operations bucket.
    Ops,
}

/// A non-blocking, close-on-exec one-shot timer (a `timerfd` on the monotonic clock): readable
/// once it expired.
#[derive(Debug)]
pub struct Timer {
    fd: OwnedFd,
    armed: bool,
}

impl Timer {
    /// A disarmed timer.
    pub fn new() -> io::Result<Self> {
        // SAFETY: timerfd_create takes no pointers; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: timerfd_create just returned this descriptor, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Timer { fd, armed: false })
    }

    /// Expires once, `after` from now (at least 1 ns: a zero `it_value` would disarm it).
    pub fn arm(&mut self, after: Duration) -> io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                // Capped at i32::MAX seconds (68 years), so that it fits `time_t` as every
                // libc defines it (musl's alias is deprecated, so its name is not used).
                tv_sec: i32::try_from(after.as_secs()).unwrap_or(i32::MAX).into(),
                tv_nsec: libc::c_long::from(
                    i32::try_from(after.subsec_nanos()).unwrap_or(999_999_999),
                ),
            },
        };
        // SAFETY: `spec` is a valid itimerspec; the old value is not wanted (null).
        let ret =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed = true;
        Ok(())
    }

    /// Stops the timer (it will not expire, and an expiry not yet read is dropped).
    pub fn disarm(&mut self) -> io::Result<()> {
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let spec = libc::itimerspec {
            it_interval: zero,
            it_value: zero,
        };
        // SAFETY: `spec` is a valid itimerspec; the old value is not wanted (null).
        let ret =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed = false;
        Ok(())
    }

    /// Reads the expiration count if the timer expired (without blocking): whether it did.
    pub fn expired(&mut self) -> bool {
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into `count`; the descriptor is non-blocking.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut count as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        let fired = n == 8 && count > 0;
        if fired {
            self.armed = false;
        }
        fired
    }

    /// Whether the timer is set and has not been seen to expire.
    pub fn is_armed(&self) -> bool {
        self.armed
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A bandwidth and an operations bucket, either optional, and the timer a refused caller
/// waits for.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: Timer,
}

impl RateLimiter {
    /// A limiter with the given buckets (a `None`, or a bucket of size or refill time zero,
    /// does not limit).
    pub fn new(
        bandwidth: Option<TokenBucketConfig>,
        ops: Option<TokenBucketConfig>,
    ) -> io::Result<Self> {
        Ok(RateLimiter {
            bandwidth: bandwidth.and_then(TokenBucket::new),
            ops: ops.and_then(TokenBucket::new),
            timer: Timer::new()?,
        })
    }

    /// A limiter that never refuses.
    pub fn unlimited() -> io::Result<Self> {
        Self::new(None, None)
    }

    /// Whether either bucket limits anything.
    pub fn is_limited(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }

    /// Whether the limiter refused a request and its timer has not fired yet: the device
    /// should not try again until then.
    pub fn is_blocked(&self) -> bool {
        self.timer.is_armed()
    }

    /// Takes `tokens` of `kind` if the bucket has them. On refusal the timer is armed for
    /// when to try again, and the caller keeps the request for then.
    pub fn consume(&mut self, tokens: u64, kind: TokenType) -> bool {
        if self.is_blocked() {
            return false;
        }
        let bucket = match kind {
            TokenType::Bytes => &mut self.bandwidth,
            TokenType::Ops => &mut self.ops,
        };
        let Some(bucket) = bucket.as_mut() else {
            return true;
        };
        match bucket.reduce(tokens) {
            Reduction::Taken => true,
            Reduction::Refused => {
                // Wake when the bucket will hold the request (Firecracker always waits 100 ms,
                // which caps a bucket refilled faster than that at one bucket per 100 ms), but
                // at least 1 ms apart. A failing timer leaves the limiter unblocked: the device
                // retries on its next event instead of stalling.
                let wait = bucket
                    .time_until(tokens)
                    .clamp(MIN_REFILL_WAIT, REFILL_TIMER_INTERVAL);
                let _ = self.timer.arm(wait);
                false
            }
            Reduction::Overconsumed { ratio } => {
                // The request goes ahead; the next one waits for the debt to be paid.
                let wait = bucket
                    .config
                    .refill_time
                    .saturating_mul(u32::try_from(ratio.saturating_sub(1)).unwrap_or(u32::MAX));
                if !wait.is_zero() {
                    let _ = self.timer.arm(wait);
                }
                true
            }
        }
    }

    /// Changes the buckets of a running limiter (its timer stays the same descriptor). A
    /// limiter waiting for its timer stops waiting: the device should try again at once.
    pub fn update(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        let apply = |bucket: &mut Option<TokenBucket>, u: BucketUpdate| match u {
            BucketUpdate::Keep => {}
            BucketUpdate::Disable => *bucket = None,
            BucketUpdate::Set(cfg) => *bucket = TokenBucket::new(cfg),
        };
        apply(&mut self.bandwidth, bandwidth);
        apply(&mut self.ops, ops);
        if self.timer.is_armed() {
            let _ = self.timer.disarm();
        }
    }

    /// The current bucket configurations (bandwidth, operations).
    pub fn config(&self) -> (Option<TokenBucketConfig>, Option<TokenBucketConfig>) {
        (
            self.bandwidth.as_ref().map(TokenBucket::config),
            self.ops.as_ref().map(TokenBucket::config),
        )
    }

    /// Gives back tokens taken for a request that did not happen.
    pub fn replenish(&mut self, tokens: u64, kind: TokenType) {
        let bucket = match kind {
            TokenType::Bytes => &mut self.bandwidth,
            TokenType::Ops => &mut self.ops,
        };
        if let Some(b) = bucket.as_mut() {
            b.replenish(tokens);
        }
    }

    /// The VMM saw the timer's descriptor readable: clears it. Returns whether the limiter is
    /// unblocked now (the device may go on).
    pub fn timer_fired(&mut self) -> bool {
        self.timer.expired();
        !self.is_blocked()
    }

    /// The timer's descriptor, for the VMM to watch (readable when the limiter unblocks).
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(size: u64, burst: u64, ms: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time: Duration::from_millis(ms),
        }
    }

    #[test]
    fn bucket_spends_burst_first_then_refills_at_its_rate() {
        let mut b = TokenBucket::new(cfg(1000, 500, 100)).unwrap();
        assert_eq!(b.reduce(400), Reduction::Taken); // burst 500 -> 100
        assert_eq!(b.reduce(1100), Reduction::Taken); // the last 100 of the burst + 1000
        assert_eq!(b.reduce(1), Reduction::Refused);
        std::thread::sleep(Duration::from_millis(30));
        // About 300 tokens back after 30 ms of a 100 ms refill.
        let got = b.available();
        assert!((250..=450).contains(&got), "{got}");
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(b.available(), 1000, "never more than full");
        assert_eq!(b.reduce(5000), Reduction::Overconsumed { ratio: 5 });
        assert!(TokenBucket::new(cfg(0, 0, 100)).is_none());
        assert!(TokenBucket::new(cfg(10, 0, 0)).is_none());
    }

    #[test]
    fn a_refused_limiter_blocks_until_its_timer_fires() {
        let mut rl = RateLimiter::new(Some(cfg(1000, 0, 50)), None).unwrap();
        assert!(rl.is_limited());
        assert!(rl.consume(1000, TokenType::Bytes));
        assert!(
            rl.consume(u64::MAX, TokenType::Ops),
            "no ops bucket: unlimited"
        );
        assert!(!rl.consume(1, TokenType::Bytes));
        assert!(rl.is_blocked());
        assert!(!rl.timer_fired(), "not expired yet");
        std::thread::sleep(REFILL_TIMER_INTERVAL + Duration::from_millis(10));
        assert!(rl.timer_fired());
        assert!(rl.consume(500, TokenType::Bytes));
        rl.replenish(500, TokenType::Bytes);
        assert!(rl.consume(1000, TokenType::Bytes));
        assert!(!RateLimiter::unlimited().unwrap().is_limited());
    }

    #[test]
    fn measured_rate_stays_near_the_limit() {
        // 100 KiB per 100 ms = 1 MiB/s; take 4 KiB requests as fast as allowed for 300 ms.
        let mut rl = RateLimiter::new(Some(cfg(100 << 10, 0, 100)), None).unwrap();
        let start = Instant::now();
        let mut taken = 0u64;
        while start.elapsed() < Duration::from_millis(300) {
            if rl.consume(4096, TokenType::Bytes) {
                taken += 4096;
            } else {
                while !rl.timer_fired() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        // At most the initial full bucket (100 KiB) plus 300 ms of refill (300 KiB); the lower
        // bound is loose, as a busy host may not run this thread all the time.
        let most = (100 << 10) + 300 * 1024 + 4096;
        assert!(taken <= most, "{taken} bytes in 300 ms, more than {most}");
        assert!(taken > most / 3, "{taken} bytes in 300 ms");
    }
}
