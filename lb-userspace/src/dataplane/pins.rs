//! Where an attachment's state lives in bpffs: the link and the maps, per interface, with the
//! mark of the map layout that wrote them.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use super::{BPF_FS_MAGIC, ObjectKind};

/// The bpffs layout of one attachment: `<root>/<iface>/{link, maps/<NAME>}` for the balancer,
/// `<root>/decap/<iface>/...` for the decapsulator.
#[derive(Clone, Debug)]
pub struct PinLayout {
    dir: PathBuf,
    kind: ObjectKind,
}

impl PinLayout {
    pub fn new(root: &Path, iface: &str) -> Self {
        Self {
            dir: root.join(iface),
            kind: ObjectKind::Balancer,
        }
    }
    pub fn decap(root: &Path, iface: &str) -> Self {
        Self {
            dir: root.join("decap").join(iface),
            kind: ObjectKind::Decap,
        }
    }
    pub fn kind(&self) -> ObjectKind {
        self.kind
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn maps_dir(&self) -> PathBuf {
        self.dir.join("maps")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }
    pub fn link(&self) -> PathBuf {
        self.dir.join("link")
    }
    /// True when a persistent attachment (`sluice attach`, or a `sluice run` that was killed)
    /// lives here.
    pub fn has_link(&self) -> bool {
        self.link().exists()
    }

    /// The layout mark: an empty directory named after [`lb_common::MAP_LAYOUT`] (bpffs holds
    /// no regular files), written when maps are first pinned.
    fn layout_mark(layout: u32) -> String {
        format!("layout-{layout:08x}")
    }

    /// Refuses pinned maps written by a program of another map layout (nothing is changed).
    pub fn check_layout(&self) -> anyhow::Result<()> {
        if self.kind != ObjectKind::Balancer || !self.has_maps() {
            return Ok(());
        }
        let ours = Self::layout_mark(lb_common::MAP_LAYOUT);
        if self.dir.join(&ours).is_dir() {
            return Ok(());
        }
        let theirs = fs::read_dir(&self.dir)
            .ok()
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("layout-"))
            .unwrap_or_else(|| "no layout mark".into());
        bail!(
            "the maps pinned in {} were written by a sluice with another map layout ({theirs}, this one has {ours}): adopting them would misread them; nothing was changed. Run `sluice detach --iface {}` first (established flows are then re-hashed), or use the sluice that pinned them",
            self.dir.display(),
            self.dir
                .file_name()
                .map_or_else(|| "IFACE".into(), |n| n.to_string_lossy().into_owned())
        )
    }

    pub(super) fn mark_layout(&self) -> anyhow::Result<()> {
        if self.kind != ObjectKind::Balancer {
            return Ok(());
        }
        let mark = self.dir.join(Self::layout_mark(lb_common::MAP_LAYOUT));
        fs::create_dir_all(&mark).with_context(|| format!("creating {}", mark.display()))
    }
    pub fn has_maps(&self) -> bool {
        self.map(self.kind.map_names()[0]).exists()
    }
    fn has_any_map(&self) -> bool {
        self.kind.map_names().iter().any(|n| self.map(n).exists())
    }
    fn staging_dir(&self) -> PathBuf {
        // bpffs refuses names with a dot.
        self.dir.join("maps-staging")
    }

    /// Where a load pins the maps: in place when some are pinned already (they are adopted),
    /// else in a staging directory that [`Self::publish`] renames to `maps/` once every map is
    /// pinned, so a reader (`inspect`, a `/metrics` scrape) sees no maps or all of them.
    pub(super) fn load_dir(&self) -> anyhow::Result<PathBuf> {
        if self.has_any_map() {
            return Ok(self.maps_dir());
        }
        let staging = self.staging_dir();
        // Left by a load that died before publishing: no program uses those maps.
        remove_pins_in(&staging)?;
        fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
        Ok(staging)
    }

    /// Makes the maps a load pinned in `loaded_in` visible at `maps/` with one rename.
    pub(super) fn publish(&self, loaded_in: &Path) -> anyhow::Result<()> {
        if loaded_in == self.maps_dir() {
            return Ok(());
        }
        // `prepare` made an empty `maps/`: rename replaces an empty directory.
        fs::rename(loaded_in, self.maps_dir()).with_context(|| {
            format!(
                "publishing the maps pinned in {} at {}",
                loaded_in.display(),
                self.maps_dir().display()
            )
        })
    }

    /// Checks that the root is on a bpffs and creates the directories.
    pub fn prepare(&self) -> anyhow::Result<()> {
        // The nearest existing ancestor must be on a bpffs.
        let probe = self
            .dir
            .ancestors()
            .skip(1)
            .find(|dir| dir.exists())
            .unwrap_or(&self.dir);
        if !is_bpffs(probe) {
            bail!(
                "{} is not on a BPF filesystem: mount one with `mount -t bpf bpf /sys/fs/bpf` \
                 (or pass --pin-dir DIR on a bpffs)",
                probe.display()
            );
        }
        fs::create_dir_all(self.maps_dir())
            .with_context(|| format!("creating {}", self.maps_dir().display()))
    }

    /// Removes the map pins and the directories (the link pin must already be gone).
    pub fn remove(&self) -> anyhow::Result<()> {
        for name in self.kind.map_names() {
            let path = self.map(name);
            if path.exists() {
                fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
            }
        }
        remove_pins_in(&self.staging_dir())?;
        let mark = self.dir.join(Self::layout_mark(lb_common::MAP_LAYOUT));
        for dir in [self.maps_dir(), mark, self.dir.clone()] {
            if dir.exists() {
                fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
            }
        }
        Ok(())
    }
}

/// Unpins everything in `dir` and removes it (nothing when it does not exist).
fn remove_pins_in(dir: &Path) -> anyhow::Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
    }
    fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

pub(super) fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}
