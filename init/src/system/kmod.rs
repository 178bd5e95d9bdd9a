//! Loading kernel modules in dependency order from modules.dep, without kmod.

use std::collections::{BTreeMap, HashSet};
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// One module that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// modules.dep is missing or unreadable: nothing can be loaded
    #[error("{path}: {source}")]
    Deps {
        path: PathBuf,
        source: std::io::Error,
    },
    /// a wanted module is neither a file nor built into the kernel
    #[error("module {0}: not in modules.dep and not built in")]
    Unknown(String),
    /// the module file cannot be opened
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// the kernel refused the module
    #[error("{path}: {errno}")]
    Load {
        path: PathBuf,
        errno: nix::errno::Errno,
    },
}

/// Module name as the kernel knows it: file stem with '-' as '_'.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// name -> (path relative to the modules dir, dependency paths in modules.dep order).
pub type DepMap = BTreeMap<String, (String, Vec<String>)>;

pub fn parse_modules_dep(text: &str) -> DepMap {
    text.lines()
        .filter_map(|l| {
            let (m, deps) = l.split_once(':')?;
            let m = m.trim();
            if m.is_empty() {
                return None;
            }
            Some((
                module_name(m),
                (
                    m.to_owned(),
                    deps.split_whitespace().map(str::to_owned).collect(),
                ),
            ))
        })
        .collect()
}

/// The files to load for `wanted`, each after everything it depends on, no
/// file twice. Names not in the map are returned in the second list (built in,
/// or missing: the caller decides).
pub fn load_order(deps: &DepMap, wanted: &[String]) -> (Vec<String>, Vec<String>) {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    let mut unknown = Vec::new();
    fn visit(deps: &DepMap, name: &str, seen: &mut HashSet<String>, order: &mut Vec<String>) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        let Some((path, ds)) = deps.get(name) else {
            return;
        };
        // modules.dep lists a module's dependencies with the ones loaded last
        // first, as modprobe reads it: load them from the end.
        for d in ds.iter().rev() {
            visit(deps, &module_name(d), seen, order);
        }
        order.push(path.clone());
    }
    for w in wanted {
        let name = module_name(w);
        if deps.contains_key(&name) {
            visit(deps, &name, &mut seen, &mut order);
        } else {
            unknown.push(w.clone());
        }
    }
    (order, unknown)
}

/// Loads `wanted` (names) from `dir` (/lib/modules/<release>). Already-loaded
/// modules are fine. Returns what went wrong, one entry each; an empty list is success.
pub fn load(dir: &Path, wanted: &[String]) -> Vec<ModuleError> {
    let mut problems = Vec::new();
    let dep_path = dir.join("modules.dep");
    let dep_text = match std::fs::read_to_string(&dep_path) {
        Ok(t) => t,
        Err(source) => {
            return vec![ModuleError::Deps {
                path: dep_path,
                source,
            }]
        }
    };
    let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    let builtin: HashSet<String> = builtin.lines().map(module_name).collect();
    let deps = parse_modules_dep(&dep_text);
    let (order, unknown) = load_order(&deps, wanted);
    for u in unknown {
        if !builtin.contains(&module_name(&u)) {
            problems.push(ModuleError::Unknown(u));
        }
    }
    for rel in order {
        let path: PathBuf = dir.join(&rel);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(source) => {
                problems.push(ModuleError::Open { path, source });
                continue;
            }
        };
        let params = CString::default();
        match nix::kmod::finit_module(&file, &params, nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(errno) => problems.push(ModuleError::Load { path, errno }),
        }
    }
    problems
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/fs/nls/nls-cp437.ko:
";

    #[test]
    fn dependencies_load_first_and_once() {
        let deps = parse_modules_dep(DEP);
        let (order, unknown) = load_order(
            &deps,
            &["virtio_pci".into(), "virtio_blk".into(), "squashfs".into()],
        );
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            [
                "virtio",
                "virtio_ring",
                "virtio_pci_legacy_dev",
                "virtio_pci_modern_dev",
                "virtio_pci",
                "virtio_blk"
            ]
        );
        assert_eq!(unknown, ["squashfs"]);
    }

    #[test]
    fn dashes_and_underscores_are_the_same_module() {
        let deps = parse_modules_dep(DEP);
        assert_eq!(module_name("kernel/fs/nls/nls-cp437.ko"), "nls_cp437");
        let (order, _) = load_order(&deps, &["nls-cp437".into()]);
        assert_eq!(order, ["kernel/fs/nls/nls-cp437.ko"]);
        assert_eq!(module_name("a/b/x.ko.xz"), "x");
    }
}
