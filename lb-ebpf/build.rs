//! Links the kfunc shim into the balancer: `ksyms_wrap.ll` declares `bpf_xdp_ct_lookup` and
//! `bpf_ct_release` the way clang declares `__ksym` externs (rustc cannot emit those yet) and
//! defines always-inline wrappers that `balancer/conntrack.rs` calls as plain externs.
//! bpf-linker takes LLVM IR inputs; after linking the object holds direct kfunc calls, which
//! aya relocates against the kernel's BTF at load.

fn main() {
    println!("cargo::rerun-if-changed=ksyms_wrap.ll");
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".to_owned());
    // Only the balancer asks conntrack (the decapsulator and the traffic generator do not).
    println!("cargo::rustc-link-arg-bin=lb-ebpf={dir}/ksyms_wrap.ll");
}
