//! The link to the peer as the volume task sees it: a new connection (the
//! old one's replica writes land first, see `replica`), a lost one, the
//! peer's state messages, and this node's announcements.

use std::sync::Arc;

use super::Shell;
use crate::link::{PeerConnection, VolumeStateMsg};
use crate::volume::Input;

/// Most dirty-chunk runs sent with a state message (fits the 64 KiB control
/// payload); beyond that the peer falls back to a full resync.
const DIRTY_RUNS_MAX: usize = 2000;

impl Shell {
    /// A new connection to the peer (replacing any old one).
    pub(super) fn connected(&mut self, conn: Arc<PeerConnection>) {
        self.engine.peer_disconnected();
        self.conn = None;
        self.stash.clear();
        if !self.engine.new_link_waits_for_replicas() {
            self.connection_ready(conn);
        } else {
            // Let the old connection's replica writes land first.
            self.readying = Some(conn);
        }
    }

    /// The connection to the peer is gone.
    pub(super) fn disconnected(&mut self) {
        self.conn = None;
        self.readying = None;
        self.stash.clear();
        self.engine.peer_disconnected();
    }

    /// The peer's state message on connection `conn_id` (kept for later
    /// while that connection waits for the old one's replica writes).
    pub(super) fn peer_state(&mut self, conn_id: u64, msg: VolumeStateMsg) {
        if self.readying.as_ref().is_some_and(|c| c.id == conn_id) {
            self.stash.push(Input::PeerState(conn_id, msg));
            return;
        }
        if self.current_conn_id() != Some(conn_id) {
            return;
        }
        self.peer_detached = msg.view.is_none();
        match msg.view {
            None => self.engine.peer_disconnected(),
            Some(view) => {
                self.engine.peer_dirty_runs(msg.dirty_runs);
                self.engine.peer_state(view);
                if let Some(g) = msg.sync_done {
                    self.engine.peer_sync_done(g);
                }
            }
        }
    }

    pub(super) fn connection_ready(&mut self, conn: Arc<PeerConnection>) {
        self.conn = Some(conn.clone());
        self.peer_detached = false;
        self.announce(None);
        for input in std::mem::take(&mut self.stash) {
            self.handle_input(input);
        }
    }

    pub(super) fn announce(&mut self, sync_done: Option<crate::meta::Generations>) {
        if let Some(conn) = &self.conn {
            let msg = VolumeStateMsg {
                volume: self.name.clone(),
                index: self.index,
                view: Some(self.engine.announced_view()),
                sync_done,
                dirty_runs: self.engine.dirty_runs(DIRTY_RUNS_MAX),
            };
            let _ = self.ctl_tx.send((conn.clone(), msg));
        }
    }
}
