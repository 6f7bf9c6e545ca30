//! Run directories: append-only logs plus atomically written checkpoints, so that a cancelled, diverged or crashed
//! run keeps everything up to its last logged step and can resume.
//!
//! ```text
//! runs/<name>/
//!   config.toml                  the run's configuration (written once, atomically)
//!   metrics.jsonl                one JSON object per line, appended and flushed every step
//!   checkpoints/step-<N>/…       one folder per checkpoint, made complete in a temp folder and renamed into place
//! ```
//!
//! **Resume.** A checkpoint folder exists only once all its files are written and synced (the rename is the commit
//! point), so [`RunStore::latest_checkpoint`] never sees a half-written checkpoint. A checkpoint damaged later (a
//! disk error, a file truncated by hand) is skipped by [`restore_newest_intact`], which falls back to the newest
//! one that restores and says which it skipped and why. Metrics logged after the last checkpoint are kept
//! (append-only); on resume a `{"event":"resume","from_step":K}` line is appended and the steps after `K` are
//! logged again. A torn final line left by a crash mid-write is left as it is, and the next record starts on a
//! line of its own. Readers ([`read_metrics`]) keep the **last** record of each step, and skip torn lines.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::store::write_atomic;

/// Configuration file of a run.
pub const CONFIG_FILE: &str = "config.toml";
/// Metrics log of a run.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Folder of checkpoints.
pub const CHECKPOINT_DIR: &str = "checkpoints";

/// Errors of the run store; each names the file (and line, for logs).
#[derive(Debug, thiserror::Error)]
pub enum RunStoreError {
    /// A file or folder could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `config.toml` cannot be parsed or does not match the expected structure.
    #[error("{}: {message}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What the parser said (with line and column).
        message: String,
    },
    /// A metrics line that is not the torn last line cannot be parsed.
    #[error("{}:{line}: malformed metrics record: {message}", path.display())]
    Metrics {
        /// The metrics file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What the parser said.
        message: String,
    },
    /// A new run would overwrite an existing one.
    #[error("{}: a run already exists here (use resume, or choose another name)", dir.display())]
    AlreadyExists {
        /// The run folder.
        dir: PathBuf,
    },
    /// Resume was asked for a folder that holds no run.
    #[error("{}: no run to resume (no {CONFIG_FILE})", dir.display())]
    NoRun {
        /// The run folder.
        dir: PathBuf,
    },
    /// A checkpoint file name that is not a plain file name.
    #[error("checkpoint file name \"{0}\" must be a plain file name")]
    BadFileName(String),
    /// Every checkpoint of the run failed to restore.
    #[error(
        "{}: no intact checkpoint to resume from ({}); delete the damaged checkpoint folders to resume from an \
         older one, or start a new run",
        dir.display(),
        failures.join("; ")
    )]
    NoIntactCheckpoint {
        /// The run folder.
        dir: PathBuf,
        /// `step-N: why` for each checkpoint tried, newest first.
        failures: Vec<String>,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RunStoreError + '_ {
    move |source| RunStoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An open run directory with its metrics log.
#[derive(Debug)]
pub struct RunStore {
    dir: PathBuf,
    metrics: BufWriter<File>,
}

/// A complete checkpoint on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Training step it was taken after.
    pub step: u64,
    /// Its folder.
    pub dir: PathBuf,
}

/// Writes `config.toml` of the run in `dir` atomically.
fn write_config<C: Serialize>(dir: &Path, config: &C) -> Result<(), RunStoreError> {
    let path = dir.join(CONFIG_FILE);
    let text = toml::to_string_pretty(config).map_err(|e| RunStoreError::Config {
        path: path.clone(),
        message: e.to_string(),
    })?;
    write_atomic(&path, text.as_bytes()).map_err(io_err(&path))
}

impl RunStore {
    /// Creates a new run: the folder, `config.toml` (atomically) and an empty metrics log. Refuses to reuse a folder
    /// that already holds a run.
    pub fn create<C: Serialize>(dir: impl AsRef<Path>, config: &C) -> Result<Self, RunStoreError> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join(CONFIG_FILE);
        if config_path.exists() {
            return Err(RunStoreError::AlreadyExists { dir });
        }
        fs::create_dir_all(dir.join(CHECKPOINT_DIR)).map_err(io_err(&dir))?;
        write_config(&dir, config)?;
        Self::open_log(dir)
    }

    /// Opens an existing run for resuming and reads its config. The caller restores a checkpoint
    /// ([`restore_newest_intact`]) and then records where it resumed with [`RunStore::mark_resume`].
    pub fn resume<C: DeserializeOwned>(dir: impl AsRef<Path>) -> Result<(Self, C), RunStoreError> {
        let config = Self::run_config(dir.as_ref())?;
        Ok((Self::reopen(dir)?, config))
    }

    /// The config of the run in `dir` (an error naming the folder when it holds no run), without opening it:
    /// what data-parallel ranks other than 0, which never write, read to resume.
    pub fn run_config<C: DeserializeOwned>(dir: &Path) -> Result<C, RunStoreError> {
        if !dir.join(CONFIG_FILE).is_file() {
            return Err(RunStoreError::NoRun { dir: dir.to_path_buf() });
        }
        read_config(dir)
    }

    /// Opens the run in `dir` for appending, its config already read ([`RunStore::run_config`]).
    pub fn reopen(dir: impl AsRef<Path>) -> Result<Self, RunStoreError> {
        Self::open_log(dir.as_ref().to_path_buf())
    }

    /// Rewrites the run's `config.toml` (atomically) when a resumed or forked run changes its settings; the
    /// caller records the change in the metrics log ([`RunStore::append`]), so the history is not lost.
    pub fn update_config<C: Serialize>(&self, config: &C) -> Result<(), RunStoreError> {
        write_config(&self.dir, config)
    }

    /// Copies checkpoint `from` (of another run) into this run as its own `step-N` (atomically, as
    /// [`RunStore::write_checkpoint`] writes): the start of a fork.
    pub fn copy_checkpoint(&self, from: &Checkpoint) -> Result<Checkpoint, RunStoreError> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&from.dir).map_err(io_err(&from.dir))? {
            let entry = entry.map_err(io_err(&from.dir))?;
            let path = entry.path();
            if path.is_file() {
                let bytes = fs::read(&path).map_err(io_err(&path))?;
                files.push((entry.file_name().to_string_lossy().into_owned(), bytes));
            }
        }
        let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
        self.write_checkpoint(from.step, &refs)
    }

    /// Appends the resume marker `{"event":"resume","from_step":K}` (with the checkpoints skipped on the way, if
    /// any): the steps after `K` are logged again after it.
    pub fn mark_resume(&mut self, resumed: &Resumed) -> Result<(), RunStoreError> {
        let from_step = resumed.checkpoint.as_ref().map_or(0, |c| c.step);
        let mut marker = serde_json::json!({"event": "resume", "from_step": from_step});
        if !resumed.skipped.is_empty() {
            marker["skipped"] = resumed
                .skipped
                .iter()
                .map(|s| serde_json::json!({"step": s.checkpoint.step, "error": s.error}))
                .collect();
        }
        self.append(&marker)
    }

    /// Opens the metrics log for appending. A log whose last line was torn by a crash (no final newline) is left
    /// as it is, and gets the newline, so that the next record starts on a line of its own.
    fn open_log(dir: PathBuf) -> Result<Self, RunStoreError> {
        let path = dir.join(METRICS_FILE);
        let torn = ends_without_newline(&path).map_err(io_err(&path))?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut metrics = BufWriter::new(file);
        if torn {
            metrics
                .write_all(b"\n")
                .and_then(|()| metrics.flush())
                .map_err(io_err(&path))?;
        }
        Ok(Self { dir, metrics })
    }

    /// The run folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one record to `metrics.jsonl` and flushes it to the OS, so a crash of this process loses nothing
    /// that was logged.
    pub fn append<R: Serialize>(&mut self, record: &R) -> Result<(), RunStoreError> {
        let path = self.dir.join(METRICS_FILE);
        let line = serde_json::to_string(record).map_err(|e| RunStoreError::Metrics {
            path: path.clone(),
            line: 0,
            message: e.to_string(),
        })?;
        writeln!(self.metrics, "{line}")
            .and_then(|()| self.metrics.flush())
            .map_err(io_err(&path))
    }

    /// Writes a checkpoint for `step`: every `(file name, bytes)` into a temporary folder, each file synced, then
    /// the folder renamed to `checkpoints/step-<step>` (replacing an older checkpoint of the same step).
    pub fn write_checkpoint(&self, step: u64, files: &[(&str, &[u8])]) -> Result<Checkpoint, RunStoreError> {
        let root = self.dir.join(CHECKPOINT_DIR);
        let tmp = root.join(format!(".tmp-step-{step}-{}", std::process::id()));
        let final_dir = root.join(format!("step-{step}"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        for (name, bytes) in files {
            if name.is_empty() || name.contains(['/', '\\']) || *name == "." || *name == ".." {
                let _ = fs::remove_dir_all(&tmp);
                return Err(RunStoreError::BadFileName((*name).to_string()));
            }
            let path = tmp.join(name);
            let written = File::create(&path).and_then(|mut f| {
                f.write_all(bytes)?;
                f.sync_all()
            });
            if let Err(e) = written {
                let _ = fs::remove_dir_all(&tmp);
                return Err(io_err(&path)(e));
            }
        }
        if final_dir.exists() {
            fs::remove_dir_all(&final_dir).map_err(io_err(&final_dir))?;
        }
        fs::rename(&tmp, &final_dir).map_err(io_err(&final_dir))?;
        if let Ok(d) = File::open(&root) {
            let _ = d.sync_all();
        }
        Ok(Checkpoint { step, dir: final_dir })
    }

    /// Removes checkpoints beyond the newest `keep_last` (0 = keep all) whose step is not a multiple of
    /// `keep_every` (0 = no such milestones); returns the removed ones. The newest is never removed.
    pub fn prune_checkpoints(&self, keep_last: usize, keep_every: u64) -> Result<Vec<Checkpoint>, RunStoreError> {
        if keep_last == 0 {
            return Ok(Vec::new());
        }
        let mut removed = Vec::new();
        for ckpt in checkpoints(&self.dir)?.into_iter().skip(keep_last) {
            if keep_every > 0 && ckpt.step.is_multiple_of(keep_every) {
                continue;
            }
            fs::remove_dir_all(&ckpt.dir).map_err(io_err(&ckpt.dir))?;
            removed.push(ckpt);
        }
        Ok(removed)
    }

    /// The newest complete checkpoint of this run.
    pub fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, RunStoreError> {
        latest_checkpoint(&self.dir)
    }
}

/// Whether `path` exists, is not empty and does not end with a newline.
fn ends_without_newline(path: &Path) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if file.metadata()?.len() == 0 {
        return Ok(false);
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

/// A checkpoint that could not be restored, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedCheckpoint {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// What restoring it said.
    pub error: String,
}

/// Where a resumed run continues from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resumed {
    /// The checkpoint restored (None: the run had none, it starts again from step 0).
    pub checkpoint: Option<Checkpoint>,
    /// Newer checkpoints that failed to restore, newest first.
    pub skipped: Vec<SkippedCheckpoint>,
}

impl Resumed {
    /// A sentence for the user when checkpoints were skipped (None when the newest one restored).
    pub fn fallback_note(&self) -> Option<String> {
        if self.skipped.is_empty() {
            return None;
        }
        let skipped: Vec<String> = self
            .skipped
            .iter()
            .map(|s| format!("{}: {}", s.checkpoint.dir.display(), s.error))
            .collect();
        let to = self
            .checkpoint
            .as_ref()
            .map_or_else(|| "step 0".to_string(), |c| format!("step {}", c.step));
        Some(format!(
            "resuming from {to}: skipped damaged checkpoint(s) {}",
            skipped.join("; ")
        ))
    }
}

/// Restores the newest checkpoint of the run in `dir` that `restore` accepts, trying older ones when a newer one
/// is damaged. A run without checkpoints resumes from step 0; a run whose checkpoints all fail is an error that
/// lists each failure. `restore` must leave its target fully restored or fail (a failed attempt may leave it
/// half-written: the next attempt overwrites everything).
pub fn restore_newest_intact<E: std::fmt::Display>(
    dir: &Path,
    mut restore: impl FnMut(&Checkpoint) -> Result<(), E>,
) -> Result<Resumed, RunStoreError> {
    let all = checkpoints(dir)?;
    if all.is_empty() {
        return Ok(Resumed::default());
    }
    let mut skipped = Vec::new();
    for checkpoint in all {
        match restore(&checkpoint) {
            Ok(()) => {
                return Ok(Resumed {
                    checkpoint: Some(checkpoint),
                    skipped,
                });
            }
            Err(e) => skipped.push(SkippedCheckpoint {
                checkpoint,
                error: e.to_string(),
            }),
        }
    }
    Err(RunStoreError::NoIntactCheckpoint {
        dir: dir.to_path_buf(),
        failures: skipped
            .iter()
            .map(|s| format!("step-{}: {}", s.checkpoint.step, s.error))
            .collect(),
    })
}

/// Reads and parses a run's `config.toml`.
pub fn read_config<C: DeserializeOwned>(dir: &Path) -> Result<C, RunStoreError> {
    let path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    toml::from_str(&text).map_err(|e| RunStoreError::Config {
        path,
        message: e.to_string(),
    })
}

/// The newest complete checkpoint under `dir/checkpoints` (folders named `step-<N>`; temporary folders ignored).
pub fn latest_checkpoint(dir: &Path) -> Result<Option<Checkpoint>, RunStoreError> {
    Ok(checkpoints(dir)?.into_iter().next())
}

/// Every complete checkpoint under `dir/checkpoints`, newest first (temporary folders ignored).
pub fn checkpoints(dir: &Path) -> Result<Vec<Checkpoint>, RunStoreError> {
    let root = dir.join(CHECKPOINT_DIR);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut all = Vec::new();
    for entry in fs::read_dir(&root).map_err(io_err(&root))? {
        let entry = entry.map_err(io_err(&root))?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().is_dir() {
            all.push(Checkpoint {
                step,
                dir: entry.path(),
            });
        }
    }
    all.sort_by_key(|c| std::cmp::Reverse(c.step));
    Ok(all)
}

/// Reads `metrics.jsonl`: step records (objects with a numeric `step`), the last record of each step kept, in step
/// order, plus event records in file order. A torn line (a record cut short by a crash mid-write) is skipped,
/// wherever it is (a resumed run goes on after it on a new line); any other malformed line is an error naming its
/// line.
pub fn read_metrics(dir: &Path) -> Result<(Vec<Value>, Vec<Value>), RunStoreError> {
    let path = dir.join(METRICS_FILE);
    let bytes = fs::read(&path).map_err(io_err(&path))?;
    let text = String::from_utf8_lossy(&bytes);
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut by_step = std::collections::BTreeMap::new();
    let mut events = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if i + 1 == lines.len() && !complete => break,
            // A record cut short by a crash (the next run went on after it on a new line).
            Err(e) if e.is_eof() => continue,
            Err(e) => {
                return Err(RunStoreError::Metrics {
                    path,
                    line: i + 1,
                    message: e.to_string(),
                });
            }
        };
        match value.get("step").and_then(Value::as_u64) {
            Some(step) => {
                by_step.insert(step, value);
            }
            None => events.push(value),
        }
    }
    Ok((by_step.into_values().collect(), events))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Cfg {
        steps: u64,
        beta: f32,
        name: String,
    }

    fn cfg() -> Cfg {
        Cfg {
            steps: 10,
            beta: 2500.0,
            name: "t".into(),
        }
    }

    #[test]
    fn pruning_keeps_the_newest_and_the_milestones() {
        let tmp = tempfile::tempdir().unwrap();
        let store = RunStore::create(tmp.path().join("run"), &cfg()).unwrap();
        for step in [50, 100, 150, 200, 250, 300, 350] {
            store.write_checkpoint(step, &[("a", b"x")]).unwrap();
        }
        assert!(store.prune_checkpoints(0, 0).unwrap().is_empty(), "0 keeps all");
        let removed: Vec<u64> = store
            .prune_checkpoints(2, 200)
            .unwrap()
            .iter()
            .map(|c| c.step)
            .collect();
        assert_eq!(removed, [250, 150, 100, 50]);
        let left: Vec<u64> = checkpoints(store.dir()).unwrap().iter().map(|c| c.step).collect();
        assert_eq!(left, [350, 300, 200]);
        let removed: Vec<u64> = store.prune_checkpoints(1, 0).unwrap().iter().map(|c| c.step).collect();
        assert_eq!(removed, [300, 200]);
    }

    #[test]
    fn create_log_checkpoint_resume() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let mut store = RunStore::create(&dir, &cfg()).unwrap();
        for step in 1..=3u64 {
            store
                .append(&serde_json::json!({"step": step, "loss": 1.0 / step as f64}))
                .unwrap();
        }
        store.write_checkpoint(2, &[("lora.safetensors", b"two")]).unwrap();
        store
            .write_checkpoint(3, &[("lora.safetensors", b"three"), ("state.json", b"{}")])
            .unwrap();
        drop(store);
        assert!(matches!(
            RunStore::create(&dir, &cfg()),
            Err(RunStoreError::AlreadyExists { .. })
        ));

        let (mut store, config): (RunStore, Cfg) = RunStore::resume(&dir).unwrap();
        assert_eq!(config, cfg());
        let resumed = restore_newest_intact(&dir, |_| Ok::<(), String>(())).unwrap();
        let ckpt = resumed.checkpoint.clone().unwrap();
        assert_eq!(ckpt.step, 3);
        assert_eq!(resumed.fallback_note(), None);
        assert_eq!(fs::read(ckpt.dir.join("lora.safetensors")).unwrap(), b"three");
        store.mark_resume(&resumed).unwrap();
        store.append(&serde_json::json!({"step": 3, "loss": 0.25})).unwrap();
        let (steps, events) = read_metrics(&dir).unwrap();
        assert_eq!(steps.len(), 3);
        assert_eq!(steps[2]["loss"], 0.25, "the last record of a step wins");
        assert_eq!(events, [serde_json::json!({"event": "resume", "from_step": 3})]);
    }

    #[test]
    fn torn_last_line_is_ignored_but_other_garbage_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join(METRICS_FILE), "{\"step\":1,\"loss\":0.5}\n{\"step\":2,\"lo").unwrap();
        let (steps, _) = read_metrics(dir).unwrap();
        assert_eq!(steps.len(), 1);
        fs::write(dir.join(METRICS_FILE), "{\"step\":1}\nnot json\n{\"step\":2}\n").unwrap();
        let e = read_metrics(dir).unwrap_err();
        assert!(matches!(e, RunStoreError::Metrics { line: 2, .. }), "{e}");
    }

    #[test]
    fn a_torn_last_line_stays_and_the_next_record_starts_on_its_own_line() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let mut store = RunStore::create(&dir, &cfg()).unwrap();
        store.append(&serde_json::json!({"step": 1, "loss": 0.5})).unwrap();
        drop(store);
        let torn = "{\"step\":1,\"loss\":0.5}\n{\"step\":2,\"lo";
        fs::write(dir.join(METRICS_FILE), torn).unwrap();
        let (mut store, _): (RunStore, Cfg) = RunStore::resume(&dir).unwrap();
        store.mark_resume(&Resumed::default()).unwrap();
        store.append(&serde_json::json!({"step": 1, "loss": 0.25})).unwrap();
        let text = fs::read_to_string(dir.join(METRICS_FILE)).unwrap();
        assert_eq!(
            text,
            format!("{torn}\n{{\"event\":\"resume\",\"from_step\":0}}\n{{\"loss\":0.25,\"step\":1}}\n"),
            "the torn line is kept byte for byte, the marker is on a line of its own"
        );
        let (steps, events) = read_metrics(&dir).unwrap();
        assert_eq!(steps, [serde_json::json!({"step": 1, "loss": 0.25})]);
        assert_eq!(events.len(), 1);
        // A second resume of a log that ends cleanly adds no blank line.
        let (mut store, _): (RunStore, Cfg) = RunStore::resume(&dir).unwrap();
        store.mark_resume(&Resumed::default()).unwrap();
        let again = fs::read_to_string(dir.join(METRICS_FILE)).unwrap();
        assert!(!again.contains("\n\n"), "{again}");
    }

    #[test]
    fn a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let store = RunStore::create(&dir, &cfg()).unwrap();
        for (step, bytes) in [(10, b"good".as_slice()), (20, b"good"), (30, b"torn")] {
            store.write_checkpoint(step, &[("lora.safetensors", bytes)]).unwrap();
        }
        let restore = |c: &Checkpoint| match fs::read(c.dir.join("lora.safetensors")).unwrap().as_slice() {
            b"good" => Ok(()),
            _ => Err(format!("{}: truncated", c.dir.join("lora.safetensors").display())),
        };
        let resumed = restore_newest_intact(&dir, restore).unwrap();
        assert_eq!(resumed.checkpoint.as_ref().map(|c| c.step), Some(20));
        assert_eq!(resumed.skipped.len(), 1);
        assert_eq!(resumed.skipped[0].checkpoint.step, 30);
        let note = resumed.fallback_note().unwrap();
        assert!(
            note.contains("step 20") && note.contains("step-30") && note.contains("truncated"),
            "{note}"
        );
        let (mut store, _): (RunStore, Cfg) = RunStore::resume(&dir).unwrap();
        store.mark_resume(&resumed).unwrap();
        let (_, events) = read_metrics(&dir).unwrap();
        assert_eq!(events[0]["from_step"], 20);
        assert_eq!(events[0]["skipped"][0]["step"], 30);

        let none = restore_newest_intact(&dir, |c: &Checkpoint| Err::<(), _>(format!("bad {}", c.step)));
        let e = none.unwrap_err().to_string();
        assert!(
            e.contains("no intact checkpoint") && e.contains("step-30: bad 30") && e.contains("step-10: bad 10"),
            "{e}"
        );
        let fresh = tmp.path().join("fresh");
        RunStore::create(&fresh, &cfg()).unwrap();
        assert_eq!(
            restore_newest_intact(&fresh, |_| Err::<(), _>("never called")).unwrap(),
            Resumed::default()
        );
    }

    #[test]
    fn temp_checkpoint_folders_are_never_resumed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::create_dir_all(dir.join("checkpoints/.tmp-step-9-1")).unwrap();
        fs::create_dir_all(dir.join("checkpoints/step-4")).unwrap();
        fs::create_dir_all(dir.join("checkpoints/step-x")).unwrap();
        assert_eq!(latest_checkpoint(dir).unwrap().map(|c| c.step), Some(4));
    }

    #[test]
    fn bad_config_and_file_names_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r");
        let store = RunStore::create(&dir, &cfg()).unwrap();
        assert!(matches!(
            store.write_checkpoint(1, &[("../evil", b"x")]),
            Err(RunStoreError::BadFileName(_))
        ));
        fs::write(dir.join(CONFIG_FILE), "steps = \"ten\"\n").unwrap();
        let e = read_config::<Cfg>(&dir).unwrap_err();
        assert!(e.to_string().contains("config.toml"), "{e}");
        assert!(matches!(
            RunStore::resume::<Cfg>(tmp.path().join("nope")),
            Err(RunStoreError::NoRun { .. })
        ));
    }
}
