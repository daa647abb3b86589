//! systemd integration (`Type=notify`): READY once the node has joined a
//! cluster with a leader and finished its start-up reconcile, STATUS with
//! role, leader, term and lag, WATCHDOG pings only while the node task
//! answers, STOPPING when shutdown begins.
//!
//! Everything here is a no-op when the process is not run by systemd
//! (`NOTIFY_SOCKET` unset), so the same binary runs in a terminal or a test.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::raft::core::NodeView;
use crate::raft::handle::NodeHandle;
use crate::replication::shared::Shared;

/// How long start-up may wait for a leader before READY is sent anyway: a
/// node must not hold `systemctl start` hostage while the rest of the
/// cluster is still booting; STATUS then says it waits for a majority.
const READY_AT_THE_LATEST: Duration = Duration::from_secs(10);

/// How much longer READY may wait for the start-up reconcile of the sync
/// sets (well inside systemd's default 90 s start timeout); a node still
/// catching up after that says so in STATUS and `clusterctl status`.
const RECONCILED_AT_THE_LATEST: Duration = Duration::from_secs(60);

/// The one-line STATUS systemd shows in `systemctl status clusterd`.
pub fn status_line(view: &NodeView) -> String {
    let lag = view.commit_index.saturating_sub(view.applied_index);
    match view.leader {
        Some(l) if l == view.id => format!(
            "{} of term {}, commit {}",
            view.role.as_str(),
            view.term,
            view.commit_index
        ),
        Some(l) => format!(
            "{}, leader node {l}, term {}, {lag} entries behind",
            view.role.as_str(),
            view.term
        ),
        None => format!(
            "{}, no leader known (term {}): waiting for a majority",
            view.role.as_str(),
            view.term
        ),
    }
}

/// One notification, owned so that it can wait for the notifier thread.
enum Note {
    Ready,
    Status(String),
    Watchdog,
    Stopping,
}

/// Notifications waiting for the notifier thread before new ones are
/// dropped (a later STATUS or WATCHDOG supersedes them).
const NOTES_QUEUED: usize = 16;

/// Hands `notes` to the notifier thread, never waiting. `sd_notify` blocks
/// while the notification socket's queue is full (ten datagrams by default,
/// when whoever listens does not read), and a runtime thread blocked there
/// stops the node (seen in a test: three nodes frozen, their peer links
/// dropped by keepalive); a thread of its own can block instead.
fn notify(notes: Vec<Note>) {
    use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
    use std::sync::{Mutex, OnceLock};
    static NOTIFIER: OnceLock<Mutex<SyncSender<Vec<Note>>>> = OnceLock::new();
    let sender = NOTIFIER.get_or_init(|| {
        let (tx, rx) = sync_channel::<Vec<Note>>(NOTES_QUEUED);
        let spawned = std::thread::Builder::new()
            .name("sd-notify".into())
            .spawn(move || {
                for notes in rx {
                    let states: Vec<NotifyState> = notes
                        .iter()
                        .map(|n| match n {
                            Note::Ready => NotifyState::Ready,
                            Note::Status(s) => NotifyState::Status(s),
                            Note::Watchdog => NotifyState::Watchdog,
                            Note::Stopping => NotifyState::Stopping,
                        })
                        .collect();
                    if let Err(e) = sd_notify::notify(&states) {
                        debug!(error = %e, "cannot notify systemd");
                    }
                }
            });
        if let Err(e) = spawned {
            warn!("cannot start the systemd notifier thread: {e}; systemd is not told the node's state");
        }
        Mutex::new(tx)
    });
    match sender
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .try_send(notes)
    {
        Ok(()) | Err(TrySendError::Disconnected(_)) => {}
        Err(TrySendError::Full(_)) => {
            debug!("systemd is not reading notifications; dropping one")
        }
    }
}

/// Reports READY, then STATUS and watchdog pings until `stop` turns true.
pub async fn supervise(node: NodeHandle, files: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let watchdog = sd_notify::watchdog_enabled();
    let _ = node
        .wait_view(READY_AT_THE_LATEST, |v| v.leader.is_some())
        .await;
    // Then the start-up reconcile: a node is not ready to be a follower
    // (or the source) while its trees still differ from what was committed.
    let deadline = tokio::time::Instant::now() + RECONCILED_AT_THE_LATEST;
    let mut told = false;
    while !files
        .start_reconciled
        .load(std::sync::atomic::Ordering::SeqCst)
        && tokio::time::Instant::now() < deadline
        && !*stop.borrow()
    {
        if !told {
            notify(vec![Note::Status(
                "catching up: squaring the sync sets with what the cluster committed".into(),
            )]);
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    notify(vec![Note::Ready, Note::Status(status_line(&node.view()))]);
    // Ping at a third of the watchdog interval, so one slow round is not fatal.
    let every = watchdog.map_or(Duration::from_secs(1), |w| {
        (w / 3).min(Duration::from_secs(1))
    });
    let mut ticker = tokio::time::interval(every);
    let mut last_status = String::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let status = status_line(&node.view());
        if status != last_status {
            notify(vec![Note::Status(status.clone())]);
            last_status = status;
        }
        if watchdog.is_some() {
            if node.ping(every).await {
                notify(vec![Note::Watchdog]);
            } else {
                warn!("the node task did not answer within {every:?}; withholding the systemd watchdog ping");
            }
        }
    }
}

/// Tells systemd the node is stopping (it may still be handing leadership over).
pub fn stopping() {
    notify(vec![
        Note::Stopping,
        Note::Status("stopping: handing leadership over if leading".into()),
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::core::Role;

    fn view(id: u64, role: Role, leader: Option<u64>) -> NodeView {
        NodeView {
            id,
            role,
            term: 4,
            vote: 1,
            leader,
            commit_index: 10,
            applied_index: 7,
            first_index: 1,
            last_index: 10,
            progress: vec![],
            stale_term_messages: 0,
            members: Default::default(),
        }
    }

    #[test]
    fn status_lines_say_role_leader_and_lag() {
        assert_eq!(
            status_line(&view(1, Role::Leader, Some(1))),
            "leader of term 4, commit 10"
        );
        assert_eq!(
            status_line(&view(2, Role::Follower, Some(1))),
            "follower, leader node 1, term 4, 3 entries behind"
        );
        assert_eq!(
            status_line(&view(2, Role::Candidate, None)),
            "candidate, no leader known (term 4): waiting for a majority"
        );
    }
}
