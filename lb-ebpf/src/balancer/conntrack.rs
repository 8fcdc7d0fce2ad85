//! Does this node's own stack know a flow? `bpf_xdp_ct_lookup` on the kernel's conntrack,
//! through the shim `ksyms_wrap.ll` (see lb-ebpf/build.rs). +35-50 ns a call: asked only on
//! second chance's rare path, never per packet.

use core::ffi::c_void;

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, FlowKey, FlowValue};

/// `struct bpf_ct_opts` in its 12-byte form (the kernel takes 12 or 16; at 12 the zone is
/// the default one). Every field is written: the verifier wants initialised memory, and a
/// `[u8; N]` reserved field compiles into a memset call.
#[repr(C)]
struct CtOpts {
    netns_id: i32,
    error: i32,
    l4proto: u8,
    dir: u8,
    reserved: u16,
}
const CT_OPTS_SIZE: u32 = 12;
const _: () = assert!(size_of::<CtOpts>() == CT_OPTS_SIZE as usize);
/// `BPF_F_CURRENT_NETNS`: the receiving device's namespace.
const CURRENT_NETNS: i32 = -1;

/// `struct bpf_sock_tuple`'s IPv4 and IPv6 forms (network order, as in the packet).
#[repr(C)]
struct Tuple4 {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}
#[repr(C)]
struct Tuple6 {
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport: u16,
    dport: u16,
}
const _: () = assert!(size_of::<Tuple4>() == 12 && size_of::<Tuple6>() == 36);

unsafe extern "C" {
    /// `bpf_xdp_ct_lookup`: a referenced `struct nf_conn *`, or null.
    fn sluice_ct_lookup(
        ctx: *mut c_void,
        tuple: *mut c_void,
        tuple_size: u32,
        opts: *mut CtOpts,
        opts_size: u32,
    ) -> *mut c_void;
    /// `bpf_ct_release`: every non-null lookup result must be released on every path.
    fn sluice_ct_release(ct: *mut c_void);
}

/// The lookup's arguments, in a per-CPU map value instead of on the stack: the balancer's
/// stack is at the verifier's limit (tests/tests/stack.rs), and the kfunc takes any memory of
/// the sizes passed. Also the value of a record of a handed-on flow (`handed.rs`), for the
/// same reason.
#[repr(C)]
pub(crate) struct CtScratch {
    tuple: Tuple6,
    opts: CtOpts,
    pub(crate) record: FlowValue,
}

/// Does this node's conntrack hold the flow (client -> VIP, either direction of an entry)?
/// A SYN never is (conntrack sees it only after XDP passed it); a connection this node's
/// stack serves is (kube-proxy's DNAT or a local listener recorded it).
#[inline(always)]
pub(crate) fn knows(ctx: &XdpContext, key: &FlowKey) -> bool {
    let Some(scratch) = super::maps::CT_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's element, used only for the duration of this call (no other program
    // run on this CPU meanwhile); every byte the kfunc reads is written first.
    let ct = unsafe {
        (*scratch).opts = CtOpts {
            netns_id: CURRENT_NETNS,
            error: 0,
            l4proto: key.proto,
            dir: 0,
            reserved: 0,
        };
        let size = if key.family == FAMILY_V4 {
            let tuple = scratch.cast::<Tuple4>();
            (*tuple).saddr = key.src[0];
            (*tuple).daddr = key.dst[0];
            (*tuple).sport = key.sport;
            (*tuple).dport = key.dport;
            size_of::<Tuple4>() as u32
        } else {
            (*scratch).tuple = Tuple6 {
                saddr: key.src,
                daddr: key.dst,
                sport: key.sport,
                dport: key.dport,
            };
            size_of::<Tuple6>() as u32
        };
        sluice_ct_lookup(
            ctx.ctx.cast::<c_void>(),
            (&raw mut (*scratch).tuple).cast(),
            size,
            &raw mut (*scratch).opts,
            CT_OPTS_SIZE,
        )
    };
    if ct.is_null() {
        return false;
    }
    // SAFETY: a non-null result of the lookup, released once.
    unsafe { sluice_ct_release(ct) };
    true
}
