//! The balancer's stack, measured: the verifier allows 512 bytes, the program's comment said
//! 496. This reads the depth the kernel reserves for the loaded program and fails past a budget
//! below the limit, so that the next feature knows where it stands (and moves per-packet state
//! into a per-CPU map, as lb-ebpf's main.rs says, instead of finding out from a verifier error).
//!
//! How: aya keeps the verifier's log only when a load fails, so the depth is read from what the
//! verifier left: the JIT sizes the program's frame with the verifier's stack depth (rounded up
//! to 8 bytes), in the prologue's `sub rsp, imm32` (x86-64). The program is a few JITed
//! functions (the entry point calls the one that holds the frame: frames [0, 496, 0, 0] when
//! this was written); the verifier adds the frames along a call chain, and this test adds
//! them all, an upper bound.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::programs::Xdp;
use lb_common::{BALANCER_PROGRAM, DEFAULT_FLOW_TABLE_SIZE};
use lb_userspace::dataplane;
use sluice_tests::require_root;

/// The verifier's limit.
const LIMIT: u32 = 512;
/// What the balancer may use. It was 504 (8 bytes kept for what a fix cannot avoid) until one
/// program held second chance and the 802.1Q link layer: its frame is now 504 bytes, 512 as the
/// JIT and the verifier round it, the whole stack. The next feature that needs stack moves
/// per-packet state into a per-CPU map first (docs/design.md, "VLANs and bonds").
const BUDGET: u32 = LIMIT;

/// bpf(2) command and the offsets of `struct bpf_prog_info` (linux/bpf.h) read here.
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const JITED_PROG_LEN: usize = 16;
const JITED_PROG_INSNS: usize = 24;
const NR_JITED_KSYMS: usize = 104;
const NR_JITED_FUNC_LENS: usize = 108;
const JITED_FUNC_LENS: usize = 120;

/// `bpf_prog_info` of `fd`, with the JITed code copied into `jited` when given.
fn prog_info(fd: i32, jited: Option<(&mut Vec<u8>, &mut Vec<u32>)>) -> [u8; 256] {
    let mut info = [0u8; 256];
    if let Some((buf, lens)) = jited {
        info[JITED_PROG_LEN..JITED_PROG_LEN + 4].copy_from_slice(&(buf.len() as u32).to_ne_bytes());
        info[JITED_PROG_INSNS..JITED_PROG_INSNS + 8]
            .copy_from_slice(&(buf.as_mut_ptr() as u64).to_ne_bytes());
        info[NR_JITED_FUNC_LENS..NR_JITED_FUNC_LENS + 4]
            .copy_from_slice(&(lens.len() as u32).to_ne_bytes());
        info[JITED_FUNC_LENS..JITED_FUNC_LENS + 8]
            .copy_from_slice(&(lens.as_mut_ptr() as u64).to_ne_bytes());
    }
    // union bpf_attr's info member: bpf_fd, info_len, info (pointer).
    let mut attr = [0u8; 16];
    attr[0..4].copy_from_slice(&fd.to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY: attr and info (and the JIT buffer, whose length is given) outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_mut_ptr(),
            attr.len() as u32,
        )
    };
    assert_eq!(
        ret,
        0,
        "BPF_OBJ_GET_INFO_BY_FD: {}",
        std::io::Error::last_os_error()
    );
    info
}

fn u32_at(info: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes(info[offset..offset + 4].try_into().unwrap())
}

/// The frame size in the x86-64 JIT prologue: `sub rsp, imm32` (48 81 ec) right after
/// `push rbp; mov rbp, rsp` (55 48 89 e5), maybe with an `endbr64` between; none: no stack.
fn x86_frame(code: &[u8]) -> Option<u32> {
    let head = &code[..code.len().min(64)];
    let frame = head
        .windows(4)
        .position(|w| w == [0x55, 0x48, 0x89, 0xe5])?
        + 4;
    let rest = &head[frame..];
    let rest = rest
        .strip_prefix(&[0xf3, 0x0f, 0x1e, 0xfa][..])
        .unwrap_or(rest);
    let imm = rest.strip_prefix(&[0x48, 0x81, 0xec][..])?;
    Some(u32::from_le_bytes(imm.get(..4)?.try_into().unwrap()))
}

#[test]
fn the_balancers_stack_stays_within_its_budget() {
    require_root();
    if !cfg!(target_arch = "x86_64") {
        panic!(
            "this test reads the x86-64 JIT's prologue; on {} teach it that JIT's (or the \
             verifier log's \"stack depth\" line) before trusting the stack budget",
            std::env::consts::ARCH
        );
    }
    let ebpf = dataplane::load(None, DEFAULT_FLOW_TABLE_SIZE).expect("load the XDP object");
    let program: &Xdp = ebpf
        .program(BALANCER_PROGRAM)
        .expect("the balancer program")
        .try_into()
        .expect("an XDP program");
    let fd = program.fd().expect("loaded").as_fd().as_raw_fd();
    let info = prog_info(fd, None);
    let len = u32_at(&info, JITED_PROG_LEN) as usize;
    assert!(
        len > 0,
        "the kernel shows no JITed code (JIT off, or kptr_restrict hides it from this user)"
    );
    let functions = u32_at(&info, NR_JITED_KSYMS).max(1) as usize;
    let mut code = vec![0u8; len];
    let mut lens = vec![0u32; functions];
    prog_info(fd, Some((&mut code, &mut lens)));
    // Each function's frame, in the order the JIT laid them out (the program first).
    let mut frames = Vec::new();
    let mut at = 0;
    for &l in &lens {
        let f = &code[at..at + l as usize];
        frames.push(x86_frame(f).unwrap_or(0));
        at += l as usize;
    }
    assert!(
        frames.iter().any(|&f| f > 0),
        "no frame found in the JIT prologues: {:02x?}",
        &code[..code.len().min(64)]
    );
    // The verifier adds the frames along each call chain (with the JIT, each rounded up to 16
    // bytes); the chains are not read here, so every function is counted: an upper bound.
    let depth: u32 = frames.iter().map(|f| f.div_ceil(16) * 16).sum();
    println!(
        "{BALANCER_PROGRAM}: frames {frames:?} (main first), at most {depth} bytes of stack \
         along any call chain (budget {BUDGET}, verifier limit {LIMIT})"
    );
    assert!(
        depth <= BUDGET,
        "{BALANCER_PROGRAM} uses {depth} bytes of stack, past its budget of {BUDGET} (the \
         verifier refuses past {LIMIT}): move per-packet state to a per-CPU map"
    );
}
