//! The VM's cgroup: `<mount>/<parent>/<id>` in each hierarchy a setting names (v1) or in the
//! unified one (v2, with the controllers enabled down to it), the settings written, the
//! process moved in.

use std::path::{Path, PathBuf};

use crate::JailError;

/// One `--cgroup FILE=VALUE`, with its controller (FILE's part before the first dot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// `memory`, `cpu`, `pids`, ...
    pub controller: String,
    /// `memory.max`.
    pub file: String,
    /// What is written.
    pub value: String,
}

/// Parses `FILE=VALUE`.
pub fn parse(spec: &str) -> Result<Setting, JailError> {
    let bad = || {
        JailError::Usage(format!(
            "--cgroup {spec:?}: use FILE=VALUE, e.g. memory.max=256M"
        ))
    };
    let (file, value) = spec.split_once('=').ok_or_else(bad)?;
    let controller = file.split('.').next().unwrap_or_default();
    if controller.is_empty()
        || !file.contains('.')
        || file.contains('/')
        || file.starts_with("cgroup.")
    {
        return Err(bad());
    }
    Ok(Setting {
        controller: controller.to_string(),
        file: file.to_string(),
        value: value.to_string(),
    })
}

/// The mount point of cgroup v1 `controller`, or of the v2 hierarchy (`controller` None).
fn mount_point(controller: Option<&str>) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (dir, fstype, opts) = (f.get(1)?, f.get(2)?, f.get(3)?);
        let hit = match controller {
            None => *fstype == "cgroup2",
            Some(c) => *fstype == "cgroup" && opts.split(',').any(|o| o == c),
        };
        hit.then(|| PathBuf::from(dir))
    })
}

fn write(path: &Path, value: &str) -> Result<(), JailError> {
    std::fs::write(path, value)
        .map_err(|e| JailError::io(format!("write {value:?} to {}", path.display()), e))
}

/// Makes the cgroup, applies `specs` and moves this process in (nothing without settings).
pub fn join(version: u8, parent: &str, id: &str, specs: &[String]) -> Result<(), JailError> {
    let settings = specs
        .iter()
        .map(|s| parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    if settings.is_empty() {
        return Ok(());
    }
    let parent = parent.trim_matches('/');
    if parent.split('/').any(|p| p == ".." || p.is_empty()) {
        return Err(JailError::Usage(format!("--parent-cgroup {parent:?}")));
    }
    let pid = std::process::id().to_string();
    if version == 2 {
        let mnt = mount_point(None).ok_or_else(|| {
            JailError::Usage("--cgroup-version 2: no cgroup2 file system is mounted".into())
        })?;
        let available = std::fs::read_to_string(mnt.join("cgroup.controllers")).unwrap_or_default();
        let mut enable = String::new();
        for s in &settings {
            if !available.split_whitespace().any(|c| c == s.controller) {
                return Err(JailError::Usage(format!(
                    "--cgroup {}: the {} controller is not available in cgroup v2 here \
                     (available: {})",
                    s.file,
                    s.controller,
                    available.trim()
                )));
            }
            if !enable.contains(&format!("+{} ", s.controller)) {
                enable.push_str(&format!("+{} ", s.controller));
            }
        }
        // Controllers enabled from the root down to the VM's parent.
        let mut dir = mnt.clone();
        for part in parent.split('/') {
            write(&dir.join("cgroup.subtree_control"), enable.trim())?;
            dir = dir.join(part);
            std::fs::create_dir_all(&dir)
                .map_err(|e| JailError::io(dir.display().to_string(), e))?;
        }
        write(&dir.join("cgroup.subtree_control"), enable.trim())?;
        let vm = dir.join(id);
        std::fs::create_dir_all(&vm).map_err(|e| JailError::io(vm.display().to_string(), e))?;
        for s in &settings {
            write(&vm.join(&s.file), &s.value)?;
        }
        return write(&vm.join("cgroup.procs"), &pid);
    }
    let mut joined: Vec<String> = Vec::new();
    for s in &settings {
        let mnt = mount_point(Some(&s.controller)).ok_or_else(|| {
            JailError::Usage(format!(
                "--cgroup {}: no cgroup v1 hierarchy has the {} controller",
                s.file, s.controller
            ))
        })?;
        let vm = mnt.join(parent).join(id);
        std::fs::create_dir_all(&vm).map_err(|e| JailError::io(vm.display().to_string(), e))?;
        write(&vm.join(&s.file), &s.value)?;
        if !joined.contains(&s.controller) {
            write(&vm.join("cgroup.procs"), &pid)?;
            joined.push(s.controller.clone());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_parsed_and_odd_ones_refused() {
        let s = parse("memory.max=256M").unwrap();
        assert_eq!(
            (s.controller.as_str(), s.value.as_str()),
            ("memory", "256M")
        );
        assert_eq!(parse("cpu.max=50000 100000").unwrap().value, "50000 100000");
        for bad in ["memory", "=1", "memory.max", "../x.y=1", "cgroup.procs=1"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
