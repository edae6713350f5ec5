//! Compiles the default seccomp filters (`seccomp/x86_64.json`, in seccompiler's JSON format,
//! the same as Firecracker's) into BPF at build time, so that start-up only copies them.

use std::io::Write;
use std::path::PathBuf;

fn main() {
    let json = "seccomp/x86_64.json";
    println!("cargo:rerun-if-changed={json}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let file = std::fs::File::open(json).expect("seccomp/x86_64.json is in the package");
    let filters = seccompiler::compile_from_json(file, seccompiler::TargetArch::x86_64)
        .unwrap_or_else(|e| panic!("{json}: {e}"));
    for thread in ["vmm", "api", "vcpu"] {
        let program = filters
            .get(thread)
            .unwrap_or_else(|| panic!("{json} has no \"{thread}\" filter"));
        // Each instruction as Firecracker's compiled files hold it: one little-endian u64
        // (code, jt, jf, k).
        let mut bytes = Vec::with_capacity(program.len() * 8);
        for i in program {
            bytes.extend_from_slice(&i.code.to_le_bytes());
            bytes.push(i.jt);
            bytes.push(i.jf);
            bytes.extend_from_slice(&i.k.to_le_bytes());
        }
        std::fs::File::create(out.join(format!("seccomp_{thread}.bpf")))
            .and_then(|mut f| f.write_all(&bytes))
            .expect("write to OUT_DIR");
    }
}
