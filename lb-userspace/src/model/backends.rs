//! A VIP's backend list, shared. Under `externalTrafficPolicy: Cluster` every VIP of a family
//! has the same nodes: 10,000 VIP ports on 1,000 nodes are 10 million memberships but one list.
//! Each list is held once and reference-counted, so a model costs memory per distinct list, and
//! whoever works per list (the planner, the resolver, the change log, the health overlay) does
//! its work once per list ([`Backends::id`] keys the memo) instead of once per VIP.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::Arc;

use serde::{Serialize, Serializer};

use super::Backend;

/// A shared, immutable backend list (sorted by address, as [`super::Vip::backends`] says).
/// Equality is by content, with a pointer compare first.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Backends(Arc<[Backend]>);

/// Identifies a list's allocation while it is alive: the key of per-list memos.
pub type ListId = usize;

impl Backends {
    /// The allocation's identity: two lists with one id are the same list.
    pub fn id(&self) -> ListId {
        Arc::as_ptr(&self.0).cast::<Backend>() as usize
    }

    /// The same list (one allocation), not only equal contents.
    pub fn same(&self, other: &Backends) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The list to change in place: a copy of its own when it is shared (the other holders
    /// keep theirs).
    pub fn make_mut(&mut self) -> &mut [Backend] {
        Arc::make_mut(&mut self.0)
    }

    /// This list with `f` applied to each backend, sharing the allocation when `f` changed
    /// nothing.
    pub fn map(&self, f: impl FnMut(&Backend) -> Backend) -> Backends {
        self.replaced_by(self.0.iter().map(f).collect())
    }

    /// `new` as a list, or this one (its allocation shared) when `new` has the same backends.
    pub fn replaced_by(&self, new: Vec<Backend>) -> Backends {
        if new[..] == self.0[..] {
            self.clone()
        } else {
            new.into()
        }
    }
}

impl Default for Backends {
    fn default() -> Self {
        Vec::new().into()
    }
}

impl Deref for Backends {
    type Target = [Backend];
    fn deref(&self) -> &[Backend] {
        &self.0
    }
}

impl From<Vec<Backend>> for Backends {
    fn from(list: Vec<Backend>) -> Self {
        Self(list.into())
    }
}

impl FromIterator<Backend> for Backends {
    fn from_iter<I: IntoIterator<Item = Backend>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a Backends {
    type Item = &'a Backend;
    type IntoIter = std::slice::Iter<'a, Backend>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl Serialize for Backends {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// Maps equal lists to one allocation: each distinct list is hashed once.
#[derive(Default)]
pub(super) struct Interner {
    by_content: HashMap<Backends, Backends>,
    /// Lists already looked up, by allocation: a list shared by 10,000 VIPs is hashed once.
    by_id: HashMap<ListId, Backends>,
}

impl Interner {
    pub(super) fn learn(&mut self, list: &Backends) {
        if self.by_id.insert(list.id(), list.clone()).is_none() {
            self.by_content.entry(list.clone()).or_insert(list.clone());
        }
    }

    pub(super) fn intern(&mut self, list: &Backends) -> Backends {
        if let Some(known) = self.by_id.get(&list.id()) {
            return known.clone();
        }
        let shared = self
            .by_content
            .entry(list.clone())
            .or_insert_with(|| list.clone())
            .clone();
        self.by_id.insert(list.id(), shared.clone());
        shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn list(n: u8) -> Backends {
        (0..n)
            .map(|i| Backend {
                addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)),
                mac: None,
                weight: 1,
                drain: false,
            })
            .collect()
    }

    #[test]
    fn equal_lists_become_one_allocation_and_others_stay_apart() {
        let old = [list(3), list(2)];
        let mut interner = Interner::default();
        for l in &old {
            interner.learn(l);
        }
        let same_contents = list(3);
        assert!(!same_contents.same(&old[0]));
        assert!(interner.intern(&same_contents).same(&old[0]));
        let new = list(4);
        let first = interner.intern(&new);
        assert!(first.same(&new));
        // A second, equal new list joins the first.
        assert!(interner.intern(&list(4)).same(&first));
    }

    #[test]
    fn map_keeps_the_allocation_when_nothing_changes() {
        let l = list(3);
        assert!(l.map(Clone::clone).same(&l));
        let drained = l.map(|b| Backend {
            drain: true,
            ..b.clone()
        });
        assert!(!drained.same(&l));
        assert!(drained.iter().all(|b| b.drain));
    }
}
