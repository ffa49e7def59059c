//! Shutdown and reboot: the ACPI power button through the VMM protocol,
//! a wait for the VMM to exit (state `stopping`), a hard stop after the
//! timeout; a reboot then starts a fresh VMM. A requested shutdown never
//! triggers the restart policy (see `Manager::watch`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_api::{
    ApiError, ErrorCode, EventType, RestartCause, RestartRecord, ShutdownOutcome, VmInfo, VmState,
};
use kiln_vmm::protocol::Request;

use super::{call_vmm, stop_run, Manager, Run, RESTARTS_KEPT};
use crate::events::now_ms;
use crate::http::Failure;
use crate::rundir::RunDir;
use crate::state::{self, Action};

/// The wait for the guest when neither the request nor the daemon says.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest wait a request (or `--shutdown-timeout`) may ask for.
pub const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(600);

/// `?timeout_s=N`: 1..=600 seconds, or the daemon's default when absent.
pub fn shutdown_timeout(requested: Option<u64>, default: Duration) -> Result<Duration, Failure> {
    let Some(secs) = requested else {
        return Ok(default);
    };
    if !(1..=MAX_SHUTDOWN_TIMEOUT.as_secs()).contains(&secs) {
        return Err(Failure(
            ApiError::new(ErrorCode::InvalidQuery, "invalid query parameters").with_causes(vec![
                format!(
                    "timeout_s: {secs} is not between 1 and {}",
                    MAX_SHUTDOWN_TIMEOUT.as_secs()
                ),
            ]),
        ));
    }
    Ok(Duration::from_secs(secs))
}

impl Manager {
    /// The wait for the guest when a request names none.
    pub fn default_shutdown_timeout(&self) -> Duration {
        self.config.shutdown_timeout
    }

    /// Presses the power button, waits up to `timeout` for the VMM to
    /// exit, else kills it. `graceful`: the VMM ended by itself (the state
    /// says how: shutoff, or crashed if it crashed meanwhile); `forced`: it
    /// was killed (after the timeout, for a button that could not be
    /// pressed, or by a `stop` that came meanwhile).
    /// Runs in a task of its own: a client that goes away does not cut
    /// the wait short (the VM would stay `stopping`, never hard-stopped).
    pub async fn shutdown(
        self: &Arc<Self>,
        name: &str,
        timeout: Duration,
    ) -> Result<(VmInfo, ShutdownOutcome), Failure> {
        let me = Arc::clone(self);
        let name = name.to_owned();
        detached(async move {
            let (_, outcome) = me.shut_down(&name, Action::Shutdown, timeout).await?;
            Ok((me.get(&name).await?, outcome))
        })
        .await
    }

    /// Shuts the VM down (forced after `timeout`), then starts a fresh
    /// VMM; the restart history records it with cause `request`. In a
    /// task of its own, like `shutdown`.
    pub async fn reboot(
        self: &Arc<Self>,
        name: &str,
        timeout: Duration,
    ) -> Result<(VmInfo, ShutdownOutcome), Failure> {
        let me = Arc::clone(self);
        let name = name.to_owned();
        detached(async move { me.reboot_now(&name, timeout).await }).await
    }

    async fn reboot_now(
        self: &Arc<Self>,
        name: &str,
        timeout: Duration,
    ) -> Result<(VmInfo, ShutdownOutcome), Failure> {
        let (epoch, outcome) = self.shut_down(name, Action::Reboot, timeout).await?;
        let mut vms = self.vms.lock().await;
        let entry = vms
            .get_mut(name)
            .ok_or_else(|| ApiError::vm_not_found(name))?;
        if entry.epoch != epoch || entry.status.state.is_active() {
            return Err(Failure::new(
                ErrorCode::InvalidState,
                format!(
                    "VM {name:?} was shut down ({}), but another request came meanwhile \
                     (it is {} now): not started again",
                    outcome_str(outcome),
                    entry.status.state.as_str()
                ),
            ));
        }
        let after = entry
            .status
            .last_exit
            .unwrap_or(kiln_api::ExitKind::Stopped);
        entry.status.restarts.push(RestartRecord {
            time_ms: now_ms(),
            after,
            delay_ms: 0,
            cause: RestartCause::Request,
        });
        let excess = entry.status.restarts.len().saturating_sub(RESTARTS_KEPT);
        entry.status.restarts.drain(..excess);
        entry.epoch += 1;
        self.events.emit(
            EventType::Restarted,
            Some(name),
            Some(VmState::Starting),
            format!("rebooted on request (shutdown {})", outcome_str(outcome)),
        );
        self.launch(name, entry);
        Ok((entry.info(), outcome))
    }

    /// Goes on with the shutdown of a VMM re-adopted while its VM was
    /// `stopping` (the daemon died during a shutdown): the policy stays
    /// out of its end, and after the daemon's default timeout, counted
    /// from now, it is killed. (The power button was pressed already.)
    pub(super) fn resume_shutdown(self: &Arc<Self>, name: &str, run: Arc<Run>) {
        run.shutdown_requested.store(true, Ordering::SeqCst);
        let me = Arc::clone(self);
        let name = name.to_owned();
        let timeout = self.config.shutdown_timeout;
        tokio::spawn(async move {
            let ended_by_itself = wait_ended(&run, timeout).await;
            let stopped_by_another = run.stop_requested.load(Ordering::SeqCst);
            if !ended_by_itself {
                if let Err(e) = stop_run(&run).await {
                    tracing::warn!(
                        "VM {name}: hard stop of a resumed shutdown: {}",
                        e.0.chain()
                    );
                }
            }
            let message = if stopped_by_another {
                "forced: stopped by a request during the shutdown".to_owned()
            } else if ended_by_itself {
                "graceful: the VMM exited by itself".to_owned()
            } else {
                format!(
                    "forced: no power-off within {} s of the daemon's restart; the VMM was killed",
                    timeout.as_secs()
                )
            };
            let vms = me.vms.lock().await;
            me.events.emit(
                EventType::Shutdown,
                Some(&name),
                vms.get(&name).map(|e| e.status.state),
                format!("shutdown (resumed after a daemon restart): {message}"),
            );
        });
    }

    /// The shutdown both actions share. Returns the VM's epoch after it
    /// (a reboot starts the VM again only if nothing else happened since).
    async fn shut_down(
        self: &Arc<Self>,
        name: &str,
        action: Action,
        timeout: Duration,
    ) -> Result<(u64, ShutdownOutcome), Failure> {
        let (run, socket) = {
            let mut vms = self.vms.lock().await;
            let entry = vms
                .get_mut(name)
                .ok_or_else(|| ApiError::vm_not_found(name))?;
            state::check(entry.status.state, action)
                .map_err(|why| Failure::new(ErrorCode::InvalidState, why))?;
            let run = entry.run.clone().ok_or_else(|| {
                Failure::new(
                    ErrorCode::InvalidState,
                    format!("VM {name:?} has no VMM to shut down"),
                )
            })?;
            run.shutdown_requested.store(true, Ordering::SeqCst);
            entry.epoch += 1;
            self.set_state(
                name,
                entry,
                VmState::Stopping,
                &format!(
                    "{}: power button, hard stop after {} s",
                    action.as_str(),
                    timeout.as_secs()
                ),
            );
            (
                run,
                RunDir::new(&self.config.run_dir, name).control_socket(),
            )
        };
        let started = Instant::now();
        let pressed = call_vmm(name, socket, Request::PowerButton {}).await;
        let ended_by_itself = match &pressed {
            Ok(_) => wait_ended(&run, timeout).await,
            Err(e) => {
                tracing::warn!("VM {name}: power button: {}", e.0.chain());
                false
            }
        };
        // A `stop` (or a forced delete) that came during the wait.
        let stopped_by_another = run.stop_requested.load(Ordering::SeqCst);
        if !ended_by_itself {
            stop_run(&run).await?;
        }
        let outcome = if run.stop_requested.load(Ordering::SeqCst) {
            ShutdownOutcome::Forced
        } else {
            ShutdownOutcome::Graceful
        };
        let message = match (&pressed, outcome) {
            _ if stopped_by_another => {
                "forced: stopped by a request during the shutdown".to_owned()
            }
            (Err(e), _) => format!(
                "forced: the power button could not be pressed ({}); the VMM was killed",
                e.0.chain()
            ),
            (Ok(_), ShutdownOutcome::Graceful) => format!(
                "graceful: the VMM exited {:.1} s after the power button",
                started.elapsed().as_secs_f64()
            ),
            (Ok(_), ShutdownOutcome::Forced) => format!(
                "forced: no power-off within {} s of the power button; the VMM was killed",
                timeout.as_secs()
            ),
        };
        let vms = self.vms.lock().await;
        let entry = vms.get(name);
        self.events.emit(
            EventType::Shutdown,
            Some(name),
            entry.map(|e| e.status.state),
            format!("{}: {message}", action.as_str()),
        );
        Ok((entry.map_or(0, |e| e.epoch), outcome))
    }
}

/// Runs `work` to its end whether or not the caller still waits for it.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, Failure>> + Send + 'static,
) -> Result<T, Failure> {
    tokio::spawn(work)
        .await
        .map_err(|e| Failure::internal("the shutdown task failed", &e))?
}

/// Whether the run ended within `timeout`.
async fn wait_ended(run: &Run, timeout: Duration) -> bool {
    let mut ended = run.ended.subscribe();
    let waited = tokio::time::timeout(timeout, ended.wait_for(|done| *done))
        .await
        .map(|r| r.is_ok());
    waited == Ok(true)
}

fn outcome_str(outcome: ShutdownOutcome) -> &'static str {
    match outcome {
        ShutdownOutcome::Graceful => "graceful",
        ShutdownOutcome::Forced => "forced",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_is_1_to_600_seconds_or_the_default() {
        let d = Duration::from_secs(42);
        assert_eq!(shutdown_timeout(None, d).unwrap(), d);
        assert_eq!(
            shutdown_timeout(Some(1), d).unwrap(),
            Duration::from_secs(1)
        );
        assert_eq!(
            shutdown_timeout(Some(600), d).unwrap(),
            Duration::from_secs(600)
        );
        for bad in [0, 601, u64::MAX] {
            let e = shutdown_timeout(Some(bad), d).unwrap_err().0;
            assert_eq!(e.code, ErrorCode::InvalidQuery);
            assert!(e.causes[0].contains("between 1 and 600"), "{e:?}");
        }
    }
}
