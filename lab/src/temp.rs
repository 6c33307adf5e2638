//! Temporary directories and files, removed on drop.

use std::{
    ops::Deref,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::name::unique_name;

/// A fresh directory in the temp directory, removed with its contents on
/// drop. Derefs to its path (`dir.join("x")`).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `.toml` file (the lab's files are policies) in the temp directory with
/// a unique name, removed on drop.
pub struct TempFile {
    pub path: PathBuf,
}

impl TempFile {
    pub fn new(tag: &str, contents: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("{}.toml", unique_name(tag)));
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn as_str(&self) -> Result<&str> {
        self.path.to_str().context("temp path is not UTF-8")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_on_drop_also_on_panic() -> Result<()> {
        let dir = TempDir::new("t")?;
        std::fs::write(dir.join("inside"), "x")?;
        let file = TempFile::new("t", "allow = []\n")?;
        assert_eq!(std::fs::read_to_string(&file.path)?, "allow = []\n");
        let (dir_path, file_path) = (dir.to_path_buf(), file.path.clone());
        let unwound = std::panic::catch_unwind(move || {
            let _held = (dir, file);
            panic!("a failing test");
        });
        assert!(unwound.is_err());
        assert!(!dir_path.exists() && !file_path.exists());
        Ok(())
    }
}
