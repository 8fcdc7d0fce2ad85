//! `aya::Pod` for the map types (the `user` feature): user space reads and writes them whole.

// SAFETY: all are #[repr(C)] plain integers and byte arrays with explicit padding fields.
unsafe impl aya::Pod for crate::VipKey {}
unsafe impl aya::Pod for crate::VipInfo {}
unsafe impl aya::Pod for crate::Backend {}
unsafe impl aya::Pod for crate::VipRef {}
unsafe impl aya::Pod for crate::TableInfo {}
unsafe impl aya::Pod for crate::MemberKey {}
unsafe impl aya::Pod for crate::FlowKey {}
unsafe impl aya::Pod for crate::FlowKey4 {}
unsafe impl aya::Pod for crate::FlowValue {}
unsafe impl aya::Pod for crate::Counters {}
unsafe impl aya::Pod for crate::VipFilter {}
unsafe impl aya::Pod for crate::ScopedAddr {}
unsafe impl aya::Pod for crate::Announce {}
unsafe impl aya::Pod for crate::TraceFilter {}
unsafe impl aya::Pod for crate::TraceEvent {}
unsafe impl aya::Pod for crate::PeerKey {}
unsafe impl aya::Pod for crate::PeerFilter {}
unsafe impl aya::Pod for crate::Settings {}
unsafe impl aya::Pod for crate::RateWindow {}
