//! Signalling the guest, counted.

use crate::datapath::GuestMemory;

use super::VringState;
use crate::datapath::notify::wants_notification;
use crate::stats::QueueStats;

/// Notifies the guest behind `state` if it asked to be for the used entries published since
/// the used index was `old` (see [`wants_notification`]), counting notifications sent and
/// suppressed.
pub fn notify_guest_since(
    state: &mut VringState,
    mem: &GuestMemory,
    stats: &QueueStats,
    old: Option<u16>,
) {
    if !wants_notification(state.get_queue(), mem, old) {
        stats.add(&stats.notifications_suppressed, 1);
    } else if state.signal_used_queue().is_ok() {
        stats.add(&stats.notifications_sent, 1);
    }
}
