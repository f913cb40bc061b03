//! Configuration: a TOML file, environment variables and command-line flags, in that order of
//! increasing precedence (a flag overrides the environment, which overrides the file).
//!
//! | key (TOML)     | environment          | flag             | default                              |
//! |----------------|----------------------|------------------|--------------------------------------|
//! | `cache_dir`    | `KVFS_CACHE_DIR`     | `--cache-dir`    | `$XDG_CACHE_HOME/kvfs`, else `~/.cache/kvfs` |
//! | `capacity`     | `KVFS_CAPACITY`      | `--capacity`     | `80%` of the cache file system       |
//! | `memory`       | `KVFS_MEMORY`        | `--memory`       | `1GiB` (`0` disables the memory tier)|
//! | `min_free`     | `KVFS_MIN_FREE`      | `--min-free`     | `5%` of the cache file system        |
//! | `fsync`        | `KVFS_FSYNC`         | `--fsync`        | `always` (`always` or `never`)       |
//! | `verify_reads` | `KVFS_VERIFY_READS`  | `--verify-reads` | `false`                              |
//! | `group_access` | `KVFS_GROUP_ACCESS`  |                  | `false`: cache `0700`, chunks `0600` |
//! | `[s3]` `url`   | `KVFS_S3`            | `--s3`           | none (no remote tier); see docs/S3.md |
//!
//! The file itself is `--config FILE`, else `$KVFS_CONFIG`, else
//! `$XDG_CONFIG_HOME/kvfs/config.toml` (or `~/.config/kvfs/config.toml`) when that exists. A
//! file named explicitly must exist; the default one is optional.
//!
//! Sizes ([`crate::units`]) are a byte count (`1048576`, as a TOML integer or string) or a number with a unit:
//! `B`, binary `KiB MiB GiB TiB` (also `K M G T`) and decimal `KB MB GB TB`, for example
//! `64GiB`, `512MiB`, `1.5GB`. `capacity` and `min_free` also accept a percentage of the
//! cache file system's size (`10%`), resolved when the store opens.
//!
//! Unknown keys are rejected (`deny_unknown_fields`), so a typo fails loudly instead of being
//! ignored. Every field has a default (`#[serde(default)]`): another part of kvfs adds its own
//! settings (an `[s3]` table, say) by adding one field to [`Config`] with a default.
//!
//! The default cache directory needs no root. `/var/cache/kvfs` is used only when set
//! explicitly.

use crate::remote_tier::S3Settings;
use crate::store::{FsyncPolicy, StoreConfig};
pub use crate::units::{Limit, Size, human_bytes};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A configuration value or file is wrong; says which and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{origin}: invalid value `{value}`: {reason}")]
    Invalid {
        /// Where the value came from: an environment variable, a flag or a key.
        origin: String,
        value: String,
        reason: String,
    },
    #[error("no cache directory: set --cache-dir, KVFS_CACHE_DIR, or HOME")]
    NoCacheDir,
}

/// Settings of one kvfs process. See the module docs for keys, sources and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Root of the disk tier. `None`: the per-user default ([`default_cache_dir`]).
    pub cache_dir: Option<PathBuf>,
    /// Disk tier bound on chunk bytes.
    pub capacity: Limit,
    /// Memory tier bound in bytes; 0 disables the memory tier.
    pub memory: Size,
    /// Free space the disk tier leaves on its file system; 0 leaves it to the file system
    /// (a full disk then surfaces as `NoSpace` from the write itself).
    pub min_free: Limit,
    /// Whether a committed chunk is fsynced (file and directory) before `put` returns.
    pub fsync: FsyncPolicy,
    /// Check the payload digest on every read from disk, not only when bytes enter a tier.
    pub verify_reads: bool,
    /// Let the cache directory's group read (and store) chunks: root `2770`, chunks `0640`.
    /// Off: private to the owner (`0700`, `0600`), since chunk headers hold prompts' tokens.
    pub group_access: bool,
    /// The S3 remote tier (`[s3]` table); none: local tiers only.
    pub s3: Option<S3Settings>,
    /// Where `kvfs mount` serves Prometheus metrics (`HOST:PORT`, or a bare `PORT` on
    /// loopback) and where `kvfs status` reads them; none: no endpoint.
    pub metrics_addr: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cache_dir: None,
            capacity: StoreConfig::DEFAULT_CAPACITY,
            memory: Size(StoreConfig::DEFAULT_MEMORY_BYTES),
            min_free: StoreConfig::DEFAULT_MIN_FREE,
            fsync: FsyncPolicy::default(),
            verify_reads: false,
            group_access: false,
            s3: None,
            metrics_addr: None,
        }
    }
}

impl Config {
    /// Who may read the cache directory, as [`Config::group_access`] says.
    pub fn access(&self) -> kvfs_loader::dir::Access {
        if self.group_access {
            kvfs_loader::dir::Access::Group
        } else {
            kvfs_loader::dir::Access::Private
        }
    }
}

/// Values given on the command line or in the environment; `None` = not given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub cache_dir: Option<PathBuf>,
    pub capacity: Option<Limit>,
    pub memory: Option<Size>,
    pub min_free: Option<Limit>,
    pub fsync: Option<FsyncPolicy>,
    pub verify_reads: Option<bool>,
    pub group_access: Option<bool>,
    /// `s3://bucket/prefix` of the remote tier.
    pub s3: Option<String>,
    pub metrics_addr: Option<String>,
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        other => Err(format!("`{other}` is not a boolean (true/false, 1/0)")),
    }
}

impl Overrides {
    /// Reads `KVFS_*` variables through `get` (`std::env::var` in the CLI; a map in tests).
    pub fn from_env(get: &dyn Fn(&str) -> Option<String>) -> Result<Overrides, ConfigError> {
        fn field<T>(
            get: &dyn Fn(&str) -> Option<String>,
            var: &str,
            parse: impl Fn(&str) -> Result<T, String>,
        ) -> Result<Option<T>, ConfigError> {
            match get(var) {
                None => Ok(None),
                Some(v) => parse(&v).map(Some).map_err(|reason| ConfigError::Invalid {
                    origin: format!("environment variable {var}"),
                    value: v,
                    reason,
                }),
            }
        }
        Ok(Overrides {
            // Set but empty is a mistake (an unset shell variable, say), not "the default".
            cache_dir: field(get, "KVFS_CACHE_DIR", |v| {
                if v.is_empty() {
                    Err("the cache directory is empty; unset the variable for the default".into())
                } else {
                    Ok(PathBuf::from(v))
                }
            })?,
            capacity: field(get, "KVFS_CAPACITY", str::parse)?,
            memory: field(get, "KVFS_MEMORY", str::parse)?,
            min_free: field(get, "KVFS_MIN_FREE", str::parse)?,
            fsync: field(get, "KVFS_FSYNC", str::parse)?,
            verify_reads: field(get, "KVFS_VERIFY_READS", parse_bool)?,
            group_access: field(get, "KVFS_GROUP_ACCESS", parse_bool)?,
            s3: get("KVFS_S3").filter(|s| !s.is_empty()),
            metrics_addr: get("KVFS_METRICS_ADDR").filter(|s| !s.is_empty()),
        })
    }

    fn apply(&self, c: &mut Config) {
        if let Some(v) = &self.cache_dir {
            c.cache_dir = Some(v.clone());
        }
        if let Some(v) = self.capacity {
            c.capacity = v;
        }
        if let Some(v) = self.memory {
            c.memory = v;
        }
        if let Some(v) = self.min_free {
            c.min_free = v;
        }
        if let Some(v) = self.fsync {
            c.fsync = v;
        }
        if let Some(v) = self.verify_reads {
            c.verify_reads = v;
        }
        if let Some(v) = self.group_access {
            c.group_access = v;
        }
        if let Some(v) = &self.s3 {
            c.s3.get_or_insert_with(Default::default).url = v.clone();
        }
        if let Some(v) = &self.metrics_addr {
            c.metrics_addr = Some(v.clone());
        }
    }
}

impl Config {
    /// Parses a TOML document; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: match e.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!("line {line}, column {column}: {}", e.message())
                }
                None => e.message().to_string(),
            },
        })
    }

    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// The layered configuration: the file (`config_flag`, else `KVFS_CONFIG`, else the
    /// optional default file), then the environment, then `flags`.
    pub fn load(
        config_flag: Option<&Path>,
        flags: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let explicit = config_flag.map(Path::to_path_buf).or_else(|| {
            env("KVFS_CONFIG")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        });
        let mut cfg = match explicit {
            Some(p) => Config::from_file(&p)?,
            None => match default_config_file(env) {
                Some(p) if p.is_file() => Config::from_file(&p)?,
                _ => Config::default(),
            },
        };
        Overrides::from_env(env)?.apply(&mut cfg);
        flags.apply(&mut cfg);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that parse but make no sense together with what they control.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let zero = match self.capacity {
            Limit::Bytes(b) => b == 0,
            Limit::Percent(p) => p <= 0.0,
        };
        if zero {
            return Err(ConfigError::Invalid {
                origin: "capacity".into(),
                value: self.capacity.to_string(),
                reason: "a capacity of 0 would evict every chunk; give a size (64GiB) or a share of the file system (80%)".into(),
            });
        }
        Ok(())
    }

    /// The cache directory: the configured one or the per-user default.
    pub fn cache_dir(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf, ConfigError> {
        match &self.cache_dir {
            Some(p) => Ok(p.clone()),
            None => default_cache_dir(env).ok_or(ConfigError::NoCacheDir),
        }
    }

    /// The store settings this configuration describes, without a remote tier: building a
    /// configuration never opens S3 (whoever opens the store attaches it, see
    /// [`crate::remote_tier::attach`]).
    pub fn store_config(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<StoreConfig, ConfigError> {
        let mut sc = StoreConfig::new(self.cache_dir(env)?);
        sc.capacity = self.capacity;
        sc.memory_bytes = self.memory.0;
        sc.min_free = self.min_free;
        sc.fsync = self.fsync;
        sc.verify_reads = self.verify_reads;
        sc.access = self.access();
        Ok(sc)
    }
}

fn non_empty(env: &dyn Fn(&str) -> Option<String>, var: &str) -> Option<PathBuf> {
    env(var).filter(|s| !s.is_empty()).map(PathBuf::from)
}

/// `$XDG_CACHE_HOME/kvfs`, else `$HOME/.cache/kvfs`: writable without root.
pub fn default_cache_dir(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    non_empty(env, "XDG_CACHE_HOME")
        .or_else(|| non_empty(env, "HOME").map(|h| h.join(".cache")))
        .map(|d| d.join("kvfs"))
}

/// `$XDG_CONFIG_HOME/kvfs/config.toml`, else `$HOME/.config/kvfs/config.toml`.
pub fn default_config_file(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    non_empty(env, "XDG_CONFIG_HOME")
        .or_else(|| non_empty(env, "HOME").map(|h| h.join(".config")))
        .map(|d| d.join("kvfs").join("config.toml"))
}

/// The process environment, for [`Config::load`].
pub fn process_env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn toml_file_with_defaults_and_unknown_keys_rejected() {
        let c = Config::from_toml(
            "capacity = \"10%\"\nmemory = 1048576\nfsync = \"never\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.capacity, Limit::Percent(10.0));
        assert_eq!(c.memory, Size(1 << 20));
        assert_eq!(c.fsync, FsyncPolicy::Never);
        assert_eq!(c.min_free, Config::default().min_free);
        let e = Config::from_toml("capacty = \"1GiB\"\n", Path::new("t.toml")).unwrap_err();
        assert!(e.to_string().contains("capacty"), "{e}");
        let e = Config::from_toml("memory = \"10%\"\n", Path::new("t.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
    }

    #[test]
    fn flags_override_env_override_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.toml");
        std::fs::write(
            &f,
            "cache_dir = \"/from/file\"\ncapacity = \"1GiB\"\nmemory = \"1MiB\"\n",
        )
        .unwrap();
        let fs = f.to_str().unwrap();
        let env = env_of(&[
            ("KVFS_CONFIG", fs),
            ("KVFS_CAPACITY", "2GiB"),
            ("KVFS_CACHE_DIR", "/from/env"),
        ]);
        let flags = Overrides {
            cache_dir: Some("/from/flag".into()),
            ..Default::default()
        };
        let c = Config::load(None, &flags, &env).unwrap();
        assert_eq!(c.cache_dir, Some(PathBuf::from("/from/flag")));
        assert_eq!(c.capacity, Limit::Bytes(2 << 30));
        assert_eq!(c.memory, Size(1 << 20));
        let e = Config::load(
            None,
            &Overrides::default(),
            &env_of(&[("KVFS_MEMORY", "lots")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("KVFS_MEMORY"), "{e}");
        let e = Config::load(
            Some(Path::new("/nonexistent/kvfs.toml")),
            &Overrides::default(),
            &env_of(&[]),
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
    }

    #[test]
    fn building_a_store_config_never_opens_s3() {
        let c = Config {
            cache_dir: Some("/nonexistent/kvfs-cache".into()),
            s3: Some(S3Settings {
                url: "s3://Not_A_Bucket".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sc = c.store_config(&env_of(&[])).unwrap();
        assert!(sc.remote.is_none(), "a config builds no remote tier");
        assert_eq!(sc.capacity, StoreConfig::DEFAULT_CAPACITY);
        assert_eq!(sc.memory_bytes, StoreConfig::DEFAULT_MEMORY_BYTES);
        // The tier is opened, and a bad URL reported, only by whoever attaches it.
        let e = crate::remote_tier::attach(c.s3.as_ref(), &sc.root).unwrap_err();
        assert!(matches!(e, kvfs_remote::RemoteError::BadUrl { .. }), "{e}");
        assert!(
            crate::remote_tier::attach(None, &sc.root)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn default_cache_dir_needs_no_root() {
        assert_eq!(
            default_cache_dir(&env_of(&[("HOME", "/home/u")])),
            Some(PathBuf::from("/home/u/.cache/kvfs"))
        );
        assert_eq!(
            default_cache_dir(&env_of(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/x")])),
            Some(PathBuf::from("/x/kvfs"))
        );
        assert_eq!(default_cache_dir(&env_of(&[])), None);
    }

    #[test]
    fn a_zero_capacity_is_refused_from_every_source() {
        for v in ["0", "0B", "0%", "0.0%"] {
            let e = Config::load(
                None,
                &Overrides::default(),
                &env_of(&[("KVFS_CAPACITY", v)]),
            )
            .unwrap_err();
            assert!(e.to_string().contains("capacity of 0"), "{v}: {e}");
            let flags = Overrides {
                capacity: Some(v.parse().unwrap()),
                ..Overrides::default()
            };
            assert!(Config::load(None, &flags, &env_of(&[])).is_err(), "{v}");
        }
        let e = Config::from_toml("capacity = 0", Path::new("c.toml"))
            .and_then(|c| c.validate().map(|()| c))
            .unwrap_err();
        assert!(e.to_string().contains("capacity of 0"), "{e}");
        // min_free may be 0: it means "leave no free space".
        let c = Config::load(
            None,
            &Overrides::default(),
            &env_of(&[("KVFS_MIN_FREE", "0")]),
        );
        assert!(c.is_ok());
    }

    #[test]
    fn bad_sizes_in_toml_say_what_was_expected() {
        let e = Config::from_toml("capacity = -5", Path::new("c.toml")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("cannot be negative"), "{msg}");
        assert!(!msg.contains("untagged"), "{msg}");
        let e = Config::from_toml("memory = 1.5", Path::new("c.toml")).unwrap_err();
        assert!(e.to_string().contains("whole number"), "{e}");
        let e = Config::from_toml("memory = \"12 parsecs\"", Path::new("c.toml")).unwrap_err();
        assert!(e.to_string().contains("unknown unit"), "{e}");
        let c =
            Config::from_toml("memory = 1024\ncapacity = \"10%\"", Path::new("c.toml")).unwrap();
        assert_eq!(c.memory, Size(1024));
        assert_eq!(c.capacity, Limit::Percent(10.0));
    }

    #[test]
    fn toml_errors_name_the_line() {
        let text = "fsync = \"always\"\n\nfoo\n";
        let e = Config::from_toml(text, Path::new("c.toml")).unwrap_err();
        assert!(e.to_string().contains("line 3, column 4"), "{e}");
        let e = Config::from_toml("memory = 1\nbogus = 2", Path::new("c.toml")).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn an_empty_cache_dir_variable_is_an_error_not_the_default() {
        let e = Config::load(
            None,
            &Overrides::default(),
            &env_of(&[("KVFS_CACHE_DIR", "")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("KVFS_CACHE_DIR"), "{e}");
    }
}
