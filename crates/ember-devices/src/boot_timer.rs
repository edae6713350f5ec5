//! The boot timer: port 0x510. The first guest write records how long after the VMM process
//! started the guest got there; the VMM reads it through [`BootTimer::handle`].

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::BusDevice;

/// Port of the boot timer.
pub const BOOT_TIMER_PORT: u64 = 0x510;
/// Length of the boot timer bus range.
pub const BOOT_TIMER_LEN: u64 = 1;

/// What [`BootTimer`] keeps across a snapshot: whether the guest already wrote (its boot
/// time belongs to the process that booted it and is not carried over).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BootTimerState {
    /// The guest wrote the port.
    pub written: bool,
}

/// The boot timer as a [`BusDevice`]. Reads return 0; the first write (any value, any width)
/// records `process_start.elapsed()`; later writes are ignored and counted.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    recorded: Arc<OnceLock<Duration>>,
    ignored_writes: u64,
}

impl BootTimer {
    /// A boot timer measuring from `process_start` (the VMM process's start instant).
    pub fn new(process_start: Instant) -> Self {
        BootTimer {
            start: process_start,
            recorded: Arc::new(OnceLock::new()),
            ignored_writes: 0,
        }
    }

    /// The recorded boot time, once the guest wrote the port.
    pub fn recorded(&self) -> Option<Duration> {
        self.recorded.get().copied()
    }

    /// A shared handle on the recorded time, readable without locking the device.
    pub fn handle(&self) -> Arc<OnceLock<Duration>> {
        self.recorded.clone()
    }

    /// Writes after the first one (ignored).
    pub fn ignored_writes(&self) -> u64 {
        self.ignored_writes
    }

    /// The timer's state.
    pub fn state(&self) -> BootTimerState {
        BootTimerState {
            written: self.recorded.get().is_some(),
        }
    }

    /// Applies a saved state: a timer the guest already wrote records nothing more.
    pub fn restore(&mut self, state: &BootTimerState) {
        if state.written {
            let _ = self.recorded.set(Duration::ZERO);
        }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {
        if self.recorded.set(self.start.elapsed()).is_err() {
            self.ignored_writes += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Bus;
    use std::sync::Mutex;

    #[test]
    fn records_once() {
        let start = Instant::now() - Duration::from_millis(50);
        let timer = Arc::new(Mutex::new(BootTimer::new(start)));
        let handle = timer.lock().unwrap().handle();
        let mut bus = Bus::new();
        bus.insert(timer.clone(), BOOT_TIMER_PORT, BOOT_TIMER_LEN)
            .unwrap();

        let mut d = [0xaau8];
        assert!(bus.read(BOOT_TIMER_PORT, &mut d));
        assert_eq!(d, [0]);
        assert!(handle.get().is_none());

        assert!(bus.write(BOOT_TIMER_PORT, &[1]));
        let first = *handle.get().unwrap();
        assert!(first >= Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(2));
        bus.write(BOOT_TIMER_PORT, &[2]);
        bus.write(BOOT_TIMER_PORT, &[3]);
        let t = timer.lock().unwrap();
        assert_eq!(t.recorded(), Some(first));
        assert_eq!(t.ignored_writes(), 2);
    }
}
