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
        let mut program = filters
            .get(thread)
            .unwrap_or_else(|| panic!("{json} has no \"{thread}\" filter"))
            .clone();
        skip_action_cache(&mut program, thread);
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

/// `BPF_LD | BPF_W | BPF_ABS`.
const LD_ABS: u16 = 0x20;

/// Makes the kernel skip its seccomp action cache for `program`: installing a filter, the
/// kernel runs it once for every system call number to find the ones it always allows (Linux
/// 5.11 and later), which costs time in proportion to the program's length: 350 us for the
/// `vcpu` filter, 650 us for `vmm` on the development host, on every thread. A load of an
/// argument before the load of the call number stops that at once for every call: the
/// install then takes about a tenth. The load changes nothing (the next instruction loads the
/// number over it); what is lost is only the cache's shortcut for calls allowed whatever
/// their arguments, which then run the filter (tens of nanoseconds, JIT-compiled).
/// seccompiler's programs start with the architecture check and the number's load; anything
/// else stops the build.
fn skip_action_cache(program: &mut Vec<seccompiler::sock_filter>, thread: &str) {
    let i = |p: &[seccompiler::sock_filter], n: usize| (p[n].code, p[n].jt, p[n].jf, p[n].k);
    let arch = i(program, 0) == (LD_ABS, 0, 0, 4)
        && (program[1].code, program[1].jt, program[1].jf) == (0x15, 1, 0)
        && program[2].code == 0x06;
    assert!(
        arch && i(program, 3) == (LD_ABS, 0, 0, 0),
        "the {thread} filter does not start as seccompiler's programs do"
    );
    program.insert(
        3,
        seccompiler::sock_filter {
            code: LD_ABS,
            jt: 0,
            jf: 0,
            // seccomp_data.args[0], low word.
            k: 16,
        },
    );
}
