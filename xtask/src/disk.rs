//! `cargo xtask disk PATH --size 64M --pattern probe|zero`: a raw disk image for the examples
//! and the probe's `blk` check.

use std::io::Write;
use std::path::PathBuf;

/// `cargo xtask disk`.
#[derive(clap::Args)]
pub struct Args {
    /// The image to write (replaced if it exists).
    pub path: PathBuf,
    /// Size, with a K, M or G suffix (a whole number of 512-byte sectors).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub size: u64,
    /// Content: `zero` (sparse), or `probe`, the pattern the probe's `blk` check verifies.
    #[arg(long, default_value = "zero", value_parser = ["zero", "probe"])]
    pub pattern: String,
    /// Seed of the `probe` pattern (the probe's `probe.blk.seed`).
    #[arg(long, default_value_t = 0x5a)]
    pub seed: u8,
}

/// `64M` → 67108864; bare numbers are bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}`: expected a number with an optional K, M or G suffix"))?;
    let shift = match unit {
        "" => 0,
        "K" | "k" | "KiB" => 10,
        "M" | "m" | "MiB" => 20,
        "G" | "g" | "GiB" => 30,
        other => return Err(format!("`{s}`: unknown unit `{other}` (K, M or G)")),
    };
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))?;
    if bytes == 0 || bytes % 512 != 0 {
        return Err(format!(
            "`{s}`: the size must be a positive multiple of 512 bytes"
        ));
    }
    Ok(bytes)
}

/// The probe's disk pattern: byte `offset` of the image with `seed` (guest/probe/src/blk.rs,
/// `probe.blk.seed`).
pub fn pattern_byte(offset: u64, seed: u8) -> u8 {
    ((offset >> 9) as u8) ^ (offset as u8) ^ seed
}

/// Entry point of `cargo xtask disk`.
pub fn run(args: &Args) -> Result<(), String> {
    let err = |e: std::io::Error| format!("{}: {e}", args.path.display());
    let file = std::fs::File::create(&args.path).map_err(err)?;
    if args.pattern == "zero" {
        file.set_len(args.size).map_err(err)?;
    } else {
        let mut sector = [0u8; 512];
        let mut out = std::io::BufWriter::new(file);
        for s in 0..args.size / 512 {
            for (i, b) in sector.iter_mut().enumerate() {
                *b = pattern_byte(s * 512 + i as u64, args.seed);
            }
            out.write_all(&sector).map_err(err)?;
        }
        out.flush().map_err(err)?;
    }
    eprintln!(
        "xtask disk: wrote {} ({} bytes, {})",
        args.path.display(),
        args.size,
        args.pattern
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("100").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("5T").is_err());
        assert!(parse_size("M").is_err());
    }
}
