//! Links the probe with `link.ld` (load address 0x100000, PVH note segment).

use std::env;

fn main() {
    let dir = env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let target = env::var("TARGET").unwrap_or_default();
    let script = format!("{dir}/link.ld");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
    if target == "x86_64-unknown-none" {
        // rust-lld is invoked directly (ld.lld flavour).
        println!("cargo:rustc-link-arg-bins=-T{script}");
        println!("cargo:rustc-link-arg-bins=--no-pie");
        println!("cargo:rustc-link-arg-bins=--build-id=none");
    } else {
        // Fallback: the host (Linux) target, linked through `cc` without the C runtime.
        for arg in [
            "-nostartfiles",
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--build-id=none",
            "-Wl,--no-dynamic-linker",
        ] {
            println!("cargo:rustc-link-arg-bins={arg}");
        }
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{script}");
    }
}
