//! Supervised background work. The proxy's long-running tasks (each
//! account's refresher, the admin listener) are spawned here, and the end
//! of any of them, by returning or by panicking, is an event the app
//! awaits: it is logged, `/healthz` turns 503, and the process drains and
//! exits non-zero so that a supervisor restarts it. A proxy never stays up
//! answering 503 forever while calling itself healthy.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::task::JoinSet;

/// Whether the process is whole: what `/healthz` reports.
#[derive(Debug, Default)]
pub struct Health {
    failed: Mutex<Option<String>>,
}

impl Health {
    /// A healthy process.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the process failed, saying why.
    pub fn fail(&self, why: impl Into<String>) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.get_or_insert_with(|| why.into());
    }

    /// Why the process failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// How a supervised task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// The task's name.
    pub task: String,
    /// Whether it panicked (else it returned).
    pub panicked: bool,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if self.panicked { "panicked" } else { "ended" };
        write!(f, "the background task {} {how}", self.task)
    }
}

/// Owns the background tasks; none of them is ever a dropped handle.
#[derive(Debug)]
pub struct Supervisor {
    tasks: JoinSet<()>,
    names: Vec<(tokio::task::Id, String)>,
    /// Tasks told to stop (an account removed by a reload): their end is no failure.
    retiring: Vec<String>,
    health: Arc<Health>,
}

impl Supervisor {
    /// A supervisor that marks `health` failed when a task ends unasked.
    pub fn new(health: Arc<Health>) -> Self {
        Self {
            tasks: JoinSet::new(),
            names: Vec::new(),
            retiring: Vec::new(),
            health,
        }
    }

    /// Runs `task` under supervision.
    pub fn spawn(
        &mut self,
        name: impl Into<String>,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let handle = self.tasks.spawn(task);
        self.names.push((handle.id(), name.into()));
    }

    /// Waits for the next task to end, before shutdown was asked for: logs
    /// it and marks the process failed. Pending forever while none ends.
    pub async fn failure(&mut self) -> Exit {
        let exit = loop {
            let exit = match self.tasks.join_next_with_id().await {
                Some(Ok((id, ()))) => Exit {
                    task: self.name_of(id),
                    panicked: false,
                },
                Some(Err(error)) => Exit {
                    task: self.name_of(error.id()),
                    panicked: error.is_panic(),
                },
                None => return std::future::pending().await,
            };
            match self.retiring.iter().position(|name| *name == exit.task) {
                Some(index) if !exit.panicked => {
                    self.retiring.swap_remove(index);
                    tracing::debug!(task = %exit.task, "a task told to stop has stopped");
                }
                _ => break exit,
            }
        };
        tracing::error!(
            task = %exit.task,
            panicked = exit.panicked,
            "{exit}; the proxy cannot go on without it and stops (a supervisor should restart it)"
        );
        self.health.fail(exit.to_string());
        exit
    }

    /// Waits for every task after shutdown was asked for.
    pub async fn join_all(mut self) {
        while let Some(result) = self.tasks.join_next_with_id().await {
            if let Err(error) = result {
                if error.is_panic() {
                    tracing::error!(
                        task = %self.name_of(error.id()),
                        "a background task panicked while stopping"
                    );
                }
            }
        }
    }

    /// Marks the task `name` as told to stop: its end is expected, not a
    /// failure (a panic still is).
    pub fn retire(&mut self, name: &str) {
        self.retiring.push(name.to_owned());
    }

    fn name_of(&self, id: tokio::task::Id) -> String {
        self.names
            .iter()
            .find(|(task, _)| *task == id)
            .map_or_else(|| "(unknown)".to_owned(), |(_, name)| name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_or_returns_is_reported_and_fails_health() {
        let health = Arc::new(Health::new());
        let mut supervisor = Supervisor::new(health.clone());
        supervisor.spawn("steady", std::future::pending());
        supervisor.spawn("refresher", async { panic!("refresher broke") });
        let exit = supervisor.failure().await;
        assert_eq!(
            exit,
            Exit {
                task: "refresher".into(),
                panicked: true
            }
        );
        assert_eq!(
            health.failure().as_deref(),
            Some("the background task refresher panicked")
        );
        supervisor.spawn("admin listener", async {});
        let exit = supervisor.failure().await;
        assert_eq!(exit.task, "admin listener");
        assert!(!exit.panicked);
        // The first failure is the one reported.
        assert!(health.failure().unwrap().contains("refresher"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_told_to_stop_ends_without_failing_health() {
        let health = Arc::new(Health::new());
        let mut supervisor = Supervisor::new(health.clone());
        let (stop, mut signal) = crate::shutdown::channel();
        supervisor.spawn(
            "refresher of account eu",
            async move { signal.wait().await },
        );
        // Ends well after the retired one (the paused clock makes it so).
        supervisor.spawn("admin listener", async {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        });
        supervisor.retire("refresher of account eu");
        stop.trigger();
        let exit = supervisor.failure().await;
        assert_eq!(exit.task, "admin listener");
    }
}
