//! Rebuild when bpf-linker changes: it is an undeclared build tool of this
//! crate (as in aya-template).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
