//! Firecracker's custom CPU templates (`PUT /cpu-config`, `cpu-config` in a config file) as
//! Ember CPU templates: each `0b...` bitmap becomes a clear mask (its `0`s) and a set mask (its
//! `1`s); an `x` leaves the bit as the host has it.

use ember_api::model::CpuConfig;
use ember_vcpu::template::{CpuTemplate, CpuidModifier, MsrModifier, Register};

/// A number as Firecracker writes them: `0x` hex, `0b` binary, or decimal.
fn number(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let parsed = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else if let Some(b) = t.strip_prefix("0b").or_else(|| t.strip_prefix("0B")) {
        u64::from_str_radix(b, 2)
    } else {
        t.parse()
    };
    parsed.map_err(|_| format!("`{text}` is not a number (hex 0x.., binary 0b.. or decimal)"))
}

/// A `0b` bitmap of `width` characters of `0`, `1` or `x` (most significant first): (clear,
/// set).
fn bitmap(text: &str, width: usize) -> Result<(u64, u64), String> {
    let bits = text
        .strip_prefix("0b")
        .ok_or_else(|| format!("bitmap `{text}` must start with 0b"))?;
    if bits.len() != width {
        return Err(format!(
            "bitmap `{text}` has {} characters after 0b; it needs {width}",
            bits.len()
        ));
    }
    let (mut clear, mut set) = (0u64, 0u64);
    for (i, c) in bits.chars().enumerate() {
        let bit = 1u64 << (width - 1 - i);
        match c {
            '0' => clear |= bit,
            '1' => set |= bit,
            'x' | 'X' => {}
            _ => return Err(format!("bitmap `{text}`: `{c}` is not 0, 1 or x")),
        }
    }
    Ok((clear, set))
}

fn u32_of(v: u64, what: &str) -> Result<u32, String> {
    u32::try_from(v).map_err(|_| format!("{what} {v:#x} does not fit 32 bits"))
}

/// Converts a Firecracker CPU configuration; errors are the 400 message.
pub fn to_template(cfg: &CpuConfig) -> Result<CpuTemplate, String> {
    if !cfg.kvm_capabilities.is_empty() {
        return Err("cpu-config: kvm_capabilities are not supported by Ember".into());
    }
    if !cfg.reg_modifiers.is_empty() || !cfg.vcpu_features.is_empty() {
        return Err("cpu-config: reg_modifiers and vcpu_features are for aarch64 hosts".into());
    }
    let mut t = CpuTemplate {
        name: "cpu-config".into(),
        ..CpuTemplate::default()
    };
    for leaf in &cfg.cpuid_modifiers {
        let l = u32_of(number(&leaf.leaf)?, "leaf")?;
        let sub = u32_of(number(&leaf.subleaf)?, "subleaf")?;
        for m in &leaf.modifiers {
            let register = match m.register.to_ascii_lowercase().as_str() {
                "eax" => Register::Eax,
                "ebx" => Register::Ebx,
                "ecx" => Register::Ecx,
                "edx" => Register::Edx,
                other => return Err(format!("cpu-config: unknown register `{other}`")),
            };
            let (clear, set) = bitmap(&m.bitmap, 32)?;
            t.cpuid.push(CpuidModifier {
                leaf: l,
                subleaf: Some(sub),
                register,
                clear: u32_of(clear, "bitmap")?,
                set: u32_of(set, "bitmap")?,
            });
        }
    }
    for m in &cfg.msr_modifiers {
        let (clear, set) = bitmap(&m.bitmap, 64)?;
        t.msrs.push(MsrModifier {
            index: u32_of(number(&m.addr)?, "MSR address")?,
            clear,
            set,
        });
    }
    t.validate().map_err(|e| format!("cpu-config: {e}"))?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_api::model::{CpuidLeafModifier, CpuidRegisterModifier};

    #[test]
    fn bitmaps_and_numbers() {
        assert_eq!(number("0x10").unwrap(), 16);
        assert_eq!(number("0b101").unwrap(), 5);
        assert_eq!(number("12").unwrap(), 12);
        assert!(number("z").is_err());
        let (clear, set) = bitmap(&format!("0b{}01x", "x".repeat(29)), 32).unwrap();
        assert_eq!((clear, set), (0b100, 0b010));
        assert!(bitmap("0b01", 32).is_err());
        assert!(bitmap("01", 2).is_err());
    }

    #[test]
    fn a_firecracker_template_converts() {
        // Clear CPUID.1:ECX bit 31 (the hypervisor bit is free to clear).
        let cfg = CpuConfig {
            cpuid_modifiers: vec![CpuidLeafModifier {
                leaf: "0x1".into(),
                subleaf: "0x0".into(),
                flags: 0,
                modifiers: vec![CpuidRegisterModifier {
                    register: "ecx".into(),
                    bitmap: format!("0b0{}", "x".repeat(31)),
                }],
            }],
            ..CpuConfig::default()
        };
        let t = to_template(&cfg).unwrap();
        assert_eq!(t.cpuid.len(), 1);
        assert_eq!(t.cpuid[0].clear, 1 << 31);
        let bad = CpuConfig {
            kvm_capabilities: vec!["121".into()],
            ..CpuConfig::default()
        };
        assert!(to_template(&bad).is_err());
    }
}
