//! Empty: the programs are the `lb-ebpf` binary target (see main.rs). This target only lets
//! lb-userspace declare a build-dependency so cargo rebuilds it when the eBPF code changes.
#![no_std]
