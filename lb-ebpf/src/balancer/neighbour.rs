//! Neighbour answers for the addresses this node announces (`ANNOUNCE`, the agent's
//! election): ARP requests here, IPv6 Neighbor Solicitations through `lb_ebpf::ndp`.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{FAMILY_V4, GlobalCounter, VipKey};
use lb_ebpf::{
    ndp,
    packet::{self, ARP_OP_REPLY, ArpHdr, EthHdr, L3},
};

use super::maps::ANNOUNCE;

/// A Neighbor Solicitation for an announced address becomes the Neighbor Advertisement
/// (ndp.rs); `None`: not one to answer, the packet goes on.
#[inline(always)]
pub(crate) fn neighbor_advert(ctx: &XdpContext, l3: &L3) -> Option<(u32, GlobalCounter)> {
    ndp::neighbor_advert(ctx, l3, announced_mac)
}

/// The MAC this node answers ARP and Neighbor Solicitations with for `key`'s address, if it
/// announces it.
#[inline(always)]
fn announced_mac(key: &VipKey) -> Option<[u8; 6]> {
    // SAFETY: a hash value pointer stays valid for this program run (RCU); read by value.
    ANNOUNCE.get_ptr(key).map(|a| unsafe { (*a).mac })
}

/// An ARP request for an announced address becomes, in place, the reply: "VIP is at our MAC",
/// sent back to the requester. Anything else ARP (other addresses, replies, other hardware or
/// protocol types, truncated) goes to the kernel untouched. `l2`: the link layer's length; a
/// tagged request is answered in place, so on its own VLAN.
#[inline(always)]
pub(crate) fn arp_reply(ctx: &XdpContext, l2: usize) -> (u32, GlobalCounter) {
    let pass = (xdp_action::XDP_PASS, GlobalCounter::Passed);
    let (Some(eth), Some(arp)) = (
        packet::ptr_at_mut::<EthHdr>(ctx, 0),
        packet::ptr_at_mut::<ArpHdr>(ctx, l2),
    ) else {
        return pass;
    };
    // SAFETY: bounds checked by ptr_at_mut; ArpHdr is 2-aligned and so is its offset.
    unsafe {
        if !(*arp).is_ipv4_ethernet_request() {
            return pass;
        }
        let (sender, target) = ((*arp).spa, (*arp).tpa);
        // Another host announcing the address itself (gratuitous ARP): nothing to answer.
        if sender == target {
            return pass;
        }
        let key = VipKey {
            addr: [u32::from_ne_bytes(target), 0, 0, 0],
            port: 0,
            proto: 0,
            family: FAMILY_V4,
        };
        let Some(ours) = ANNOUNCE.get_ptr(&key) else {
            return pass;
        };
        let mac = (*ours).mac;
        let requester = (*arp).sha;
        (*arp).op = ARP_OP_REPLY.to_be();
        (*arp).tha = requester;
        (*arp).tpa = sender;
        (*arp).sha = mac;
        (*arp).spa = target;
        (*eth).dst = requester;
        (*eth).src = mac;
    }
    (xdp_action::XDP_TX, GlobalCounter::ArpReply)
}
