//! [`KernelCmdline`]: the kernel command line Ember writes, the configured one plus the words
//! the VMM appends (virtio-mmio devices without ACPI, host-compatibility parameters).

use ember_memory::addresses::CMDLINE_MAX_SIZE;

/// Why a kernel command line cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CmdlineError {
    /// The command line with its terminating NUL is longer than the boot protocol allows.
    #[error(
        "the kernel command line is {len} bytes with its terminating NUL, over the {max}-byte \
         limit: {configured} bytes configured{}",
        appended_note(*appended_len, appended)
    )]
    TooLong {
        /// Bytes needed, including the NUL.
        len: usize,
        /// The limit, including the NUL.
        max: usize,
        /// Bytes of the configured command line.
        configured: usize,
        /// Bytes Ember appended (with their separating spaces).
        appended_len: usize,
        /// The words Ember appended, space-separated.
        appended: String,
    },
    /// The configured command line contains a NUL byte.
    #[error("the kernel command line contains a NUL byte")]
    Nul,
}

fn appended_note(len: usize, words: &str) -> String {
    if len == 0 {
        String::new()
    } else {
        format!(" + {len} bytes Ember appended (`{words}`)")
    }
}

/// A kernel command line under construction: the configured text, then appended words.
///
/// ```
/// use ember_vmm::KernelCmdline;
///
/// let mut c = KernelCmdline::new("console=ttyS0");
/// c.append("virtio_mmio.device=4K@0xd0000000:5");
/// assert_eq!(c.build().unwrap(), "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5");
/// let err = KernelCmdline::new(&"x".repeat(3000)).build().unwrap_err();
/// assert!(err.to_string().contains("3001 bytes"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelCmdline {
    configured: String,
    appended: Vec<String>,
    max: usize,
}

impl KernelCmdline {
    /// Starts from the configured command line; the limit is the boot protocols' 2048 bytes
    /// including the NUL ([`CMDLINE_MAX_SIZE`]).
    pub fn new(configured: &str) -> Self {
        Self::with_limit(
            configured,
            usize::try_from(CMDLINE_MAX_SIZE).unwrap_or(usize::MAX),
        )
    }

    /// Like [`new`](Self::new) with another limit (bytes, including the NUL).
    pub fn with_limit(configured: &str, max: usize) -> Self {
        KernelCmdline {
            configured: configured.to_string(),
            appended: Vec::new(),
            max,
        }
    }

    /// Appends a word (or several, space-separated) after what is there.
    pub fn append(&mut self, words: &str) {
        if !words.is_empty() {
            self.appended.push(words.to_string());
        }
    }

    /// The words appended so far.
    pub fn appended(&self) -> &[String] {
        &self.appended
    }

    /// The whole command line, or why it cannot be written.
    pub fn build(&self) -> Result<String, CmdlineError> {
        if self.configured.as_bytes().contains(&0) {
            return Err(CmdlineError::Nul);
        }
        let appended = self.appended.join(" ");
        let mut line = self.configured.clone();
        if !appended.is_empty() {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(&appended);
        }
        let len = line.len() + 1;
        if len > self.max {
            return Err(CmdlineError::TooLong {
                len,
                max: self.max,
                configured: self.configured.len(),
                appended_len: line.len() - self.configured.len(),
                appended,
            });
        }
        Ok(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_words_are_counted_in_the_error() {
        let mut c = KernelCmdline::with_limit(&"a".repeat(30), 40);
        c.append("noxsave");
        c.append("clearcpuid=popcnt");
        let err = c.build().unwrap_err();
        assert_eq!(
            err.to_string(),
            "the kernel command line is 57 bytes with its terminating NUL, over the 40-byte \
             limit: 30 bytes configured + 26 bytes Ember appended (`noxsave clearcpuid=popcnt`)"
        );
        let err = KernelCmdline::with_limit("abc", 3).build().unwrap_err();
        assert!(err.to_string().ends_with("3 bytes configured"), "{err}");
    }

    #[test]
    fn joins_with_single_spaces() {
        let mut c = KernelCmdline::new("");
        assert_eq!(c.build().unwrap(), "");
        c.append("");
        c.append("a b");
        c.append("c");
        assert_eq!(c.build().unwrap(), "a b c");
        assert_eq!(KernelCmdline::new("x\0").build(), Err(CmdlineError::Nul));
    }
}
