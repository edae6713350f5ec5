//! Compiles the `ember` binary's seccomp filters (`crates/ember-bin/seccomp/x86_64.json`) for
//! the fuzz targets, which run each input under the filter of the thread that parses it in
//! the VMM.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    let json = "../crates/ember-bin/seccomp/x86_64.json";
    println!("cargo:rerun-if-changed={json}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let file = std::fs::File::open(json).expect("the ember binary's filters");
    let filters = seccompiler::compile_from_json(file, seccompiler::TargetArch::x86_64)
        .unwrap_or_else(|e| panic!("{json}: {e}"));
    let mut src = String::new();
    for thread in ["vmm", "api", "vcpu"] {
        let program = filters
            .get(thread)
            .unwrap_or_else(|| panic!("{json} has no \"{thread}\" filter"));
        let _ = writeln!(
            src,
            "/// The `{thread}` filter: (code, jt, jf, k) per instruction.\npub const {}: &[(u16, u8, u8, u32)] = &[",
            thread.to_uppercase()
        );
        for i in program {
            let _ = writeln!(src, "    ({}, {}, {}, {}),", i.code, i.jt, i.jf, i.k);
        }
        src.push_str("];\n");
    }
    std::fs::write(out.join("filters.rs"), src).expect("write to OUT_DIR");
}
