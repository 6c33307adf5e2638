//! Link options for the eBPF objects. aya-build sets rustc's flags for this
//! target, and bpf-linker generates the code, so its options go here.

fn main() {
    // Header fields sit at offsets the frame's alignment does not promise
    // (an IPv4 address 26 bytes into a frame). Without this feature LLVM
    // reads every multi-byte field a byte at a time and reassembles it
    // (the guard was 1,463 instructions, 1,001 with it). The kernel accepts
    // misaligned packet and context reads on every architecture with
    // efficient unaligned access (x86-64, arm64, ppc64le, s390x), but
    // never a misaligned stack access: what the programs copy to the stack
    // is kept 8-aligned (`headers::Chunk`, the field order of `Headers`).
    // The setting is per object, not per function: LLVM's BPF backend has
    // one subtarget for the whole module.
    println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
}
