//! A grid as a Slurm job array: one array task per distinct cell, each running `focusdpo ablate … --cell ID` on
//! the shared results folder, then assembling whatever has finished (`focusdpo report OUT`). Written by
//! `focusdpo ablate --slurm` and by the Studio's Experiments tab; pure text, the caller writes the file
//! ([`super::store::ResultStore::write_sbatch`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What each array task asks Slurm for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SlurmResources {
    /// `--partition` (none: the cluster's default).
    pub partition: Option<String>,
    /// GPUs per task (`--gres=gpu:N`; 0: none).
    pub gpus: u32,
    /// CPU cores per task (`--cpus-per-task`, and `OMP_NUM_THREADS`).
    pub cpus: u32,
    /// Memory per task (`--mem`, Slurm's syntax: `64G`).
    pub mem: String,
    /// Time limit per task (`--time`); a task that hits it leaves a checkpoint the next worker resumes.
    pub time: String,
    /// Tasks running at once (`--array=…%N`; 0: no limit).
    pub max_parallel: u32,
}

impl Default for SlurmResources {
    fn default() -> Self {
        Self {
            partition: None,
            gpus: 1,
            cpus: 8,
            mem: "64G".into(),
            time: "04:00:00".into(),
            max_parallel: 0,
        }
    }
}

/// One job array: its cells, the command every task runs, and where.
#[derive(Clone, Debug)]
pub struct SlurmJob {
    /// The job's name after `focusdpo-` (the plan's file stem; characters Slurm dislikes become `-`).
    pub name: String,
    /// The plan, as the script's comment names it.
    pub plan: PathBuf,
    /// The focusdpo binary the tasks run.
    pub exe: PathBuf,
    /// The folder tasks start in (`--chdir`; relative paths of the command are relative to it).
    pub workdir: PathBuf,
    /// The arguments after the binary, `ablate PLAN --out OUT …`, without `--cell`/`--shard`.
    pub task_args: Vec<String>,
    /// The shared results folder.
    pub out: PathBuf,
    /// The distinct cell ids, one array task each, in this order.
    pub cells: Vec<String>,
    /// Resources per task.
    pub resources: SlurmResources,
}

/// The file name of the script in the results folder.
pub const SBATCH_FILE: &str = "ablate.sbatch";
/// The folder of the tasks' logs in the results folder.
pub const SLURM_LOG_DIR: &str = "slurm";

/// Quotes `s` for a POSIX shell (as it is when nothing needs quoting).
pub fn shell_quote(s: &str) -> String {
    shlex::try_quote(s)
        .map(|q| q.into_owned())
        .unwrap_or_else(|_| format!("'{}'", s.replace('\0', "")))
}

/// A value of an `#SBATCH` line: as it is unless it holds spaces or quotes (sbatch splits those lines itself and
/// keeps `%A`-style patterns), else double-quoted.
pub fn sbatch_value(s: &str) -> String {
    if s.chars().any(|c| c.is_whitespace() || c == '"' || c == '\'') {
        format!("\"{}\"", s.replace('"', "\\\""))
    } else {
        s.to_string()
    }
}

/// The job name: letters, digits, `-` and `_` kept, anything else `-`.
fn job_name(name: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.is_empty() { "ablate".into() } else { name }
}

/// The `sbatch` script of `job`.
pub fn sbatch_script(job: &SlurmJob) -> String {
    let r = &job.resources;
    let limit = if r.max_parallel > 0 {
        format!("%{}", r.max_parallel)
    } else {
        String::new()
    };
    let mut lines = vec![
        "#!/bin/bash".to_string(),
        format!("#SBATCH --job-name=focusdpo-{}", job_name(&job.name)),
        format!("#SBATCH --array=0-{}{limit}", job.cells.len().saturating_sub(1)),
        "#SBATCH --ntasks=1".into(),
        format!("#SBATCH --cpus-per-task={}", r.cpus.max(1)),
        format!("#SBATCH --mem={}", sbatch_value(&r.mem)),
        format!("#SBATCH --time={}", sbatch_value(&r.time)),
        format!("#SBATCH --chdir={}", sbatch_value(&job.workdir.to_string_lossy())),
        format!(
            "#SBATCH --output={}",
            sbatch_value(&job.out.join(SLURM_LOG_DIR).join("%A_%a.log").to_string_lossy())
        ),
    ];
    if r.gpus > 0 {
        lines.push(format!("#SBATCH --gres=gpu:{}", r.gpus));
    }
    if let Some(p) = r.partition.as_deref().map(str::trim).filter(|p| !p.is_empty()) {
        lines.push(format!("#SBATCH --partition={}", sbatch_value(p)));
    }
    lines.push(String::new());
    lines.push(format!(
        "# {} cells of `{}`; written by focusdpo. Submit: sbatch {}",
        job.cells.len(),
        job.plan.display(),
        shell_quote(&job.out.join(SBATCH_FILE).to_string_lossy())
    ));
    lines.push("# A task that dies or runs out of time leaves a checkpoint: resubmit the array (finished cells".into());
    lines.push("# are skipped, interrupted ones resume once their claim's lease has expired).".into());
    lines.push("set -euo pipefail".into());
    lines.push(format!("CELLS=({})", job.cells.join(" ")));
    lines.push(format!("export OMP_NUM_THREADS={}", r.cpus.max(1)));
    let exe = shell_quote(&job.exe.to_string_lossy());
    let command: Vec<String> = std::iter::once(exe.clone())
        .chain(job.task_args.iter().map(|a| shell_quote(a)))
        .collect();
    lines.push(format!(
        "{} --cell \"${{CELLS[$SLURM_ARRAY_TASK_ID]}}\"",
        command.join(" ")
    ));
    lines.push(format!("{exe} report {}", shell_quote(&job.out.to_string_lossy())));
    lines.join("\n") + "\n"
}

/// Checks resources a user typed (the Studio's form): memory and time in Slurm's syntax.
pub fn check_resources(r: &SlurmResources) -> Result<(), String> {
    let mem = r.mem.trim();
    let digits = mem.trim_end_matches(|c: char| "KMGTkmgt".contains(c));
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) || mem.len() > digits.len() + 1 {
        return Err(format!(
            "memory `{}`: expected a number with an optional K, M, G or T (e.g. 64G)",
            r.mem
        ));
    }
    let time = r.time.trim();
    let (days, clock) = match time.split_once('-') {
        Some((d, rest)) => (Some(d), rest),
        None => (None, time),
    };
    let parts: Vec<&str> = clock.split(':').collect();
    let numeric = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    if days.is_some_and(|d| !numeric(d)) || parts.is_empty() || parts.len() > 3 || !parts.iter().all(|p| numeric(p)) {
        return Err(format!(
            "time `{}`: expected Slurm's [D-]HH:MM:SS, MM:SS or minutes (e.g. 04:00:00)",
            r.time
        ));
    }
    if r.cpus == 0 {
        return Err("CPU cores per task: at least 1".into());
    }
    Ok(())
}

/// `path` made absolute against `cwd` (array tasks start in `--chdir`, but their logs and the results folder
/// are best named in full).
pub fn absolute(path: &Path, cwd: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        cwd.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> SlurmJob {
        SlurmJob {
            name: "my plan".into(),
            plan: "plans/my plan.md".into(),
            exe: "/opt/focusdpo".into(),
            workdir: "/home/me/work dir".into(),
            task_args: vec![
                "ablate".into(),
                "plans/my plan.md".into(),
                "--out".into(),
                "runs/x".into(),
                "--set".into(),
                "model.base=\"random:0\"".into(),
            ],
            out: "runs/x".into(),
            cells: vec!["a1".into(), "b2".into(), "c3".into()],
            resources: SlurmResources {
                partition: Some("gpu".into()),
                max_parallel: 2,
                ..SlurmResources::default()
            },
        }
    }

    #[test]
    fn the_script_is_one_array_task_per_cell_running_the_command_on_its_cell() {
        let s = sbatch_script(&job());
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "#!/bin/bash");
        for want in [
            "#SBATCH --job-name=focusdpo-my-plan",
            "#SBATCH --array=0-2%2",
            "#SBATCH --cpus-per-task=8",
            "#SBATCH --mem=64G",
            "#SBATCH --time=04:00:00",
            "#SBATCH --chdir=\"/home/me/work dir\"",
            "#SBATCH --output=runs/x/slurm/%A_%a.log",
            "#SBATCH --gres=gpu:1",
            "#SBATCH --partition=gpu",
            "CELLS=(a1 b2 c3)",
            "export OMP_NUM_THREADS=8",
            "/opt/focusdpo ablate 'plans/my plan.md' --out runs/x --set 'model.base=\"random:0\"' --cell \
             \"${CELLS[$SLURM_ARRAY_TASK_ID]}\"",
            "/opt/focusdpo report runs/x",
        ] {
            assert!(lines.contains(&want), "missing `{want}` in\n{s}");
        }
        // The task line splits back into the arguments it was made of.
        let task = lines.iter().find(|l| l.contains("--cell")).unwrap();
        let words = shlex::split(task).unwrap();
        assert_eq!(words[1..7], job().task_args[..]);
    }

    #[test]
    fn no_gpus_and_no_partition_leave_their_lines_out() {
        let mut j = job();
        j.resources = SlurmResources {
            gpus: 0,
            partition: Some("  ".into()),
            ..SlurmResources::default()
        };
        let s = sbatch_script(&j);
        assert!(
            !s.contains("--gres") && !s.contains("--partition") && s.contains("--array=0-2\n"),
            "{s}"
        );
    }

    #[test]
    fn resources_are_checked() {
        assert!(check_resources(&SlurmResources::default()).is_ok());
        for (mem, time) in [("64G", "1-12:00:00"), ("4000", "90"), ("2t", "30:00")] {
            let r = SlurmResources {
                mem: mem.into(),
                time: time.into(),
                ..SlurmResources::default()
            };
            assert!(check_resources(&r).is_ok(), "{mem} {time}");
        }
        for (mem, time) in [
            ("64GB", "04:00:00"),
            ("G", "04:00:00"),
            ("64G", "4h"),
            ("64G", "1:2:3:4"),
            ("64G", ""),
        ] {
            let r = SlurmResources {
                mem: mem.into(),
                time: time.into(),
                ..SlurmResources::default()
            };
            let e = check_resources(&r).unwrap_err();
            assert!(e.contains('`'), "{e}");
        }
    }
}
