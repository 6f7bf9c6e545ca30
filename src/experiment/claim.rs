//! Cells shared by several workers (Slurm array tasks, or local processes) over one results folder on a shared
//! filesystem: a worker runs a cell only while it holds the cell's claim, `OUT/claims/<id>.json`.
//!
//! * **Claiming** writes the claim to a file of the worker's own and hard-links it to the claim's name, which
//!   fails when the name exists: of workers racing for a free cell exactly one succeeds, and a claim file is never
//!   seen half-written.
//! * **The lease**: the claim says until when it holds (`expires_ms`, wall clock); its worker renews it every
//!   third of the lease ([`Lease`], a thread) by writing a new claim atomically (temp file, rename) after checking
//!   that the file still names it. A worker that finds the file gone or naming another worker has lost the cell
//!   and stops it.
//! * **Taking over** a claim whose lease expired (its worker died): the expired file is first renamed to a name of
//!   the taker's own — a rename of which exactly one racer succeeds — and the taker then claims as above. A
//!   renewal that lands in between recreates the file, and the taker's `create_new` fails.
//! * **Never twice**: a worker checks the cell's `finished.json` after claiming, so a cell finished by another
//!   worker meanwhile is not trained again. Every claim appends a line to the cell's `attempts.jsonl`.
//!
//! Workers' clocks must agree to well within a lease (minutes by default; NTP gives milliseconds).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::store::StoreError;
use crate::store::write_atomic;

/// Folder of the claims under the store root.
pub const CLAIMS_DIR: &str = "claims";
/// A cell's log of claims (one JSON line each), in its run folder.
pub const ATTEMPTS_FILE: &str = "attempts.jsonl";
/// The default lease: a worker silent this long is taken for dead.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(300);

/// The content of a claim file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The worker (`host:pid`, or the Slurm job and task).
    pub worker: String,
    /// When the lease ends, milliseconds since the Unix epoch.
    pub expires_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// This process's worker name: `SLURM_JOB_ID`/`SLURM_ARRAY_TASK_ID` when set, then host and pid.
pub fn worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let slurm = match (
        std::env::var("SLURM_ARRAY_JOB_ID"),
        std::env::var("SLURM_ARRAY_TASK_ID"),
    ) {
        (Ok(job), Ok(task)) => format!("slurm-{job}_{task}@"),
        _ => String::new(),
    };
    format!("{slurm}{host}:{}", std::process::id())
}

/// What [`try_claim`] found.
#[derive(Debug)]
pub enum ClaimOutcome {
    /// The cell is this worker's until it releases it; renew it with [`Lease::start`].
    Claimed(ClaimHandle),
    /// Another worker holds a live lease.
    Held(Claim),
}

/// A held claim.
#[derive(Clone, Debug)]
pub struct ClaimHandle {
    path: PathBuf,
    worker: String,
    lease: Duration,
    /// Whether the claim was taken over from a worker whose lease expired.
    pub took_over: Option<Claim>,
}

fn claim_path(root: &Path, id: &str) -> PathBuf {
    root.join(CLAIMS_DIR).join(format!("{id}.json"))
}

/// Whether cell `id` of the store at `root` is claimed by a worker (live or not yet taken over).
pub fn is_claimed(root: &Path, id: &str) -> bool {
    claim_path(root, id).is_file()
}

/// The claim on cell `id` of the store at `root`, if any (live, or expired and not yet taken over).
pub fn holder(root: &Path, id: &str) -> Result<Option<Claim>, StoreError> {
    read_claim(&claim_path(root, id))
}

impl Claim {
    /// Whether its lease has run out (its worker is taken for dead; the next worker takes the cell over).
    pub fn expired(&self) -> bool {
        self.expires_ms <= now_ms()
    }
}

fn read_claim(path: &Path) -> Result<Option<Claim>, StoreError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| StoreError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

fn claim_bytes(worker: &str, lease: Duration) -> Vec<u8> {
    let claim = Claim {
        worker: worker.to_string(),
        expires_ms: now_ms() + lease.as_millis() as u64,
    };
    serde_json::to_vec(&claim).unwrap_or_default()
}

/// Tries to claim cell `id` of the store at `root` for `worker` with a lease of `lease`.
pub fn try_claim(root: &Path, id: &str, worker: &str, lease: Duration) -> Result<ClaimOutcome, StoreError> {
    let dir = root.join(CLAIMS_DIR);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let path = claim_path(root, id);
    let mut took_over = None;
    // A claim file that does not parse (damaged by hand, or a filesystem that lost a write) counts as expired
    // once it is older than a lease.
    let current = read_claim(&path).or_else(|e| match e {
        StoreError::Json { .. } => {
            let age = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            Ok(Some(Claim {
                worker: "(unreadable claim)".into(),
                expires_ms: if age > lease { 0 } else { u64::MAX },
            }))
        }
        other => Err(other),
    })?;
    if let Some(existing) = current {
        if existing.expires_ms > now_ms() {
            return Ok(ClaimOutcome::Held(existing));
        }
        // Expired: move it aside under a name of ours; only one racer's rename succeeds.
        let aside = dir.join(format!(".{id}.expired-{}", sanitize(worker)));
        match std::fs::rename(&path, &aside) {
            Ok(()) => {
                // What was moved may be a fresh claim that replaced the expired one since it was read: put it
                // back (a hard link fails rather than overwrite a claim made meanwhile) and leave the cell.
                let moved = read_claim(&aside).ok().flatten();
                if let Some(live) = moved.filter(|m| *m != existing) {
                    let _ = std::fs::hard_link(&aside, &path);
                    let _ = std::fs::remove_file(&aside);
                    return Ok(ClaimOutcome::Held(live));
                }
                let _ = std::fs::remove_file(&aside);
                took_over = Some(existing);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
    }
    // Written in full under a name of our own, then linked to the claim's name (which fails if it exists).
    let mine = dir.join(format!(".{id}.claim-{}", sanitize(worker)));
    let written = std::fs::File::create(&mine).and_then(|mut f| {
        f.write_all(&claim_bytes(worker, lease))?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&mine);
        return Err(io(&mine)(e));
    }
    let linked = std::fs::hard_link(&mine, &path);
    let _ = std::fs::remove_file(&mine);
    match linked {
        Ok(()) => Ok(ClaimOutcome::Claimed(ClaimHandle {
            path,
            worker: worker.to_string(),
            lease,
            took_over,
        })),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match read_claim(&path) {
            Ok(Some(other)) => Ok(ClaimOutcome::Held(other)),
            // Created and not yet written by the winner, or released meanwhile: someone else's either way.
            _ => Ok(ClaimOutcome::Held(Claim {
                worker: "(being claimed)".into(),
                expires_ms: now_ms() + lease.as_millis() as u64,
            })),
        },
        Err(e) => Err(io(&path)(e)),
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl ClaimHandle {
    /// Extends the lease, after checking that the claim is still this worker's. `Ok(false)`: the claim was lost
    /// (taken over after it expired) — stop working on the cell.
    pub fn renew(&self) -> Result<bool, StoreError> {
        match read_claim(&self.path) {
            Ok(Some(c)) if c.worker == self.worker => {}
            Ok(_) | Err(StoreError::Json { .. }) => return Ok(false),
            Err(e) => return Err(e),
        }
        write_atomic(&self.path, &claim_bytes(&self.worker, self.lease)).map_err(io(&self.path))?;
        Ok(true)
    }

    /// Gives the cell up (finished, failed or stopped): removes the claim if it is still this worker's.
    pub fn release(&self) -> Result<(), StoreError> {
        if let Ok(Some(c)) = read_claim(&self.path)
            && c.worker == self.worker
        {
            match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&self.path)(e)),
                _ => {}
            }
        }
        Ok(())
    }

    /// The worker holding it.
    pub fn worker(&self) -> &str {
        &self.worker
    }
}

/// Appends a line to a cell's `attempts.jsonl`: who claimed it when, fresh or resumed, taken over from whom.
pub fn log_attempt(cell_dir: &Path, handle: &ClaimHandle, resume: bool) -> Result<(), StoreError> {
    std::fs::create_dir_all(cell_dir).map_err(io(cell_dir))?;
    let path = cell_dir.join(ATTEMPTS_FILE);
    let line = serde_json::json!({
        "worker": handle.worker,
        "claimed_ms": now_ms(),
        "resume": resume,
        "took_over_from": handle.took_over.as_ref().map(|c| c.worker.clone()),
    });
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io(&path))?;
    writeln!(f, "{line}").and_then(|()| f.sync_all()).map_err(io(&path))
}

/// Renews a claim from a thread every third of its lease until dropped; sets `lost` (which the cell's run
/// watches as a stop request) when the claim is found lost or cannot be renewed.
pub struct Lease {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Lease {
    /// Starts renewing `handle`.
    pub fn start(handle: ClaimHandle, lost: Arc<AtomicBool>) -> Lease {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let period = (handle.lease / 3).max(Duration::from_millis(50));
        let thread = std::thread::spawn(move || {
            let tick = Duration::from_millis(50).min(period);
            let mut waited = Duration::ZERO;
            while !flag.load(Ordering::SeqCst) {
                std::thread::sleep(tick);
                waited += tick;
                if waited < period {
                    continue;
                }
                waited = Duration::ZERO;
                if !matches!(handle.renew(), Ok(true)) {
                    lost.store(true, Ordering::SeqCst);
                    return;
                }
            }
        });
        Lease {
            done,
            thread: Some(thread),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimed(o: ClaimOutcome) -> ClaimHandle {
        match o {
            ClaimOutcome::Claimed(h) => h,
            ClaimOutcome::Held(c) => panic!("held by {c:?}"),
        }
    }

    #[test]
    fn one_worker_holds_a_cell_until_it_releases_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lease = Duration::from_secs(60);
        let a = claimed(try_claim(dir.path(), "c1", "a", lease).expect("claim"));
        match try_claim(dir.path(), "c1", "b", lease).expect("claim") {
            ClaimOutcome::Held(c) => assert_eq!(c.worker, "a"),
            ClaimOutcome::Claimed(_) => panic!("two holders"),
        }
        assert!(a.renew().expect("renew"));
        a.release().expect("release");
        let b = claimed(try_claim(dir.path(), "c1", "b", lease).expect("claim"));
        assert!(b.took_over.is_none());
        // Releasing someone else's claim does nothing.
        a.release().expect("release");
        assert!(b.renew().expect("still b's"));
    }

    #[test]
    fn an_expired_claim_is_taken_over_once_and_its_worker_learns_it_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = claimed(try_claim(dir.path(), "c1", "a", Duration::from_millis(1)).expect("claim"));
        std::thread::sleep(Duration::from_millis(5));
        // Many takers race for the expired claim: exactly one wins.
        let winners: Vec<bool> = std::thread::scope(|s| {
            let joins: Vec<_> = (0..8)
                .map(|i| {
                    let root = dir.path();
                    s.spawn(move || {
                        matches!(
                            try_claim(root, "c1", &format!("t{i}"), Duration::from_secs(60)),
                            Ok(ClaimOutcome::Claimed(_))
                        )
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().expect("thread")).collect()
        });
        assert_eq!(winners.iter().filter(|w| **w).count(), 1, "{winners:?}");
        assert!(!a.renew().expect("renew"), "the dead worker's lease is gone");
    }

    #[test]
    fn a_lease_thread_keeps_the_claim_alive_and_reports_a_loss() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lease = Duration::from_millis(300);
        let a = claimed(try_claim(dir.path(), "c1", "a", lease).expect("claim"));
        let lost = Arc::new(AtomicBool::new(false));
        let renewing = Lease::start(a.clone(), lost.clone());
        std::thread::sleep(Duration::from_millis(900));
        assert!(
            matches!(try_claim(dir.path(), "c1", "b", lease), Ok(ClaimOutcome::Held(_))),
            "renewed past three leases"
        );
        // Someone removes the claim: the next renewal notices.
        std::fs::remove_file(claim_path(dir.path(), "c1")).expect("remove");
        std::thread::sleep(Duration::from_millis(400));
        assert!(lost.load(Ordering::SeqCst));
        drop(renewing);
    }

    #[test]
    fn a_garbled_claim_counts_as_expired_once_older_than_a_lease() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join(CLAIMS_DIR)).expect("dir");
        std::fs::write(claim_path(dir.path(), "c1"), b"{not json").expect("write");
        assert!(
            matches!(
                try_claim(dir.path(), "c1", "b", Duration::from_secs(60)),
                Ok(ClaimOutcome::Held(_))
            ),
            "a fresh garbled claim may be one being written"
        );
        std::thread::sleep(Duration::from_millis(30));
        let h = claimed(try_claim(dir.path(), "c1", "b", Duration::from_millis(10)).expect("claim"));
        assert_eq!(h.took_over.map(|c| c.worker), Some("(unreadable claim)".into()));
    }

    #[test]
    fn many_workers_racing_for_a_free_cell_give_one_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        for round in 0..20 {
            let id = format!("c{round}");
            let winners: usize = std::thread::scope(|s| {
                let joins: Vec<_> = (0..6)
                    .map(|i| {
                        let (root, id) = (dir.path(), id.clone());
                        s.spawn(move || {
                            matches!(
                                try_claim(root, &id, &format!("w{i}"), Duration::from_secs(60)),
                                Ok(ClaimOutcome::Claimed(_))
                            )
                        })
                    })
                    .collect();
                joins.into_iter().map(|j| usize::from(j.join().expect("thread"))).sum()
            });
            assert_eq!(winners, 1, "round {round}");
        }
    }
}
