//! Acknowledging deliveries in as few frames as RabbitMQ allows.
//!
//! A `basic.ack` with `multiple` settles every delivery of its channel up to its tag in one
//! frame, and RabbitMQ handles it at a fraction of the cost of one ack per message (measured
//! with a plain client on this machine: 51,000–62,000 messages/s consumed against 17,000–18,000
//! with one ack each). But it settles *every* outstanding tag up to it, and an ack naming a tag
//! the broker no longer holds closes the channel. So each consuming channel keeps the tags it
//! knows are delivered and not yet settled (`open`); a call acknowledges with one `multiple`
//! its deliveries below the lowest open tag, and the rest one by one.
//!
//! Why every tag below the lowest open one is known here: the broker numbers a channel's
//! deliveries in the order it sends them, the consumer's deliveries reach the buffer in that
//! order, and the answer of a `basic.get` on the channel (the reserve's barrier) is recorded
//! only after the consumer was drained of what came before it. The one gap is a `basic.get`
//! whose answer is on its way: its tag is above every tag seen before it was sent, so while it
//! is, a `multiple` covers only those ([`Settle::get_begins`]); a channel whose reserve was
//! cancelled before recording an answer sends single acks from then on. lapin sends each ack
//! from a task of its own, in no set order, so a delivery being acknowledged counts as open
//! until its frame is sent: a `multiple` never overtakes a single ack (or another `multiple`)
//! of a tag it covers. So does a delivery settled by another frame (requeued, dead-lettered).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use futures_util::future::join_all;
use lapin::options::BasicAckOptions;

use super::link::{Msg, BROKER_CALL};

/// The unsettled deliveries of one consuming channel.
#[derive(Default)]
pub(super) struct Settle {
    tags: Mutex<Tags>,
}

#[derive(Default)]
struct Tags {
    /// Delivered, not settled.
    open: BTreeSet<u64>,
    /// Being acknowledged: their frames are not known to be sent yet.
    sending: BTreeSet<u64>,
    /// The highest tag delivered so far.
    seen: u64,
    /// Per `basic.get` on the channel whose answer is not recorded yet: the highest tag
    /// delivered before it was sent. Its answer's tag is above that.
    gets: Vec<u64>,
    /// A `basic.get`'s answer was lost: some tag may be unknown here.
    unknown: bool,
}

impl Tags {
    /// Tags below this one may be acknowledged with a `multiple`: every delivery below is
    /// known here and settled or being settled.
    fn cap(&self) -> u64 {
        if self.unknown {
            return 0;
        }
        let lowest = |set: &BTreeSet<u64>| set.first().copied().unwrap_or(u64::MAX);
        let floor = lowest(&self.open).min(lowest(&self.sending));
        let answers = self.gets.iter().min().map_or(u64::MAX, |seen| seen + 1);
        floor.min(answers)
    }
}

pub(super) struct GetGuard<'a> {
    settle: &'a Settle,
    seen: u64,
    recorded: bool,
}

impl GetGuard<'_> {
    pub(super) fn recorded(mut self) {
        self.recorded = true;
    }
}

impl Drop for GetGuard<'_> {
    fn drop(&mut self) {
        let mut t = self.settle.tags();
        if let Some(i) = t.gets.iter().position(|s| *s == self.seen) {
            t.gets.swap_remove(i);
        }
        t.unknown |= !self.recorded;
    }
}

/// The tag of the one `multiple` ack that settles those of `acking` below `cap` ([`Tags::cap`]),
/// when at least two are; the others are acknowledged one by one (those above it).
pub(super) fn multiple_upto(acking: &[u64], cap: u64) -> Option<u64> {
    let mut below = acking.iter().copied().filter(|t| *t < cap);
    let first = below.next()?;
    below.max().map(|m| m.max(first))
}

impl Settle {
    /// A delivery reached this process.
    pub(super) fn delivered(&self, tag: u64) {
        let mut t = self.tags();
        t.open.insert(tag);
        t.seen = t.seen.max(tag);
    }

    /// A delivery was settled by another frame (requeued or dead-lettered), now sent.
    pub(super) fn settled_otherwise(&self, tag: u64) {
        self.tags().open.remove(&tag);
    }

    /// A `basic.get` is about to be sent on the channel: until the guard is dropped, a
    /// `multiple` covers only tags seen by now. Call [`GetGuard::recorded`] once its answer is
    /// in the buffer (or there was none); a guard dropped without (the reserve was cancelled
    /// while the answer was on its way) leaves a tag this channel may never hear of, so it
    /// sends single acks from then on.
    pub(super) fn get_begins(&self) -> GetGuard<'_> {
        let mut t = self.tags();
        let seen = t.seen;
        t.gets.push(seen);
        GetGuard { settle: self, seen, recorded: false }
    }

    fn tags(&self) -> std::sync::MutexGuard<'_, Tags> {
        self.tags.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Acknowledges `msgs` (all delivered on this channel).
    async fn ack(&self, msgs: Vec<Msg>) {
        let acking: Vec<u64> = msgs.iter().map(|m| m.tag).collect();
        let upto = {
            let mut t = self.tags();
            for tag in &acking {
                t.open.remove(tag);
            }
            let upto = multiple_upto(&acking, t.cap());
            t.sending.extend(&acking);
            upto
        };
        let multiple = upto.and_then(|upto| msgs.iter().find(|m| m.tag == upto));
        let singles = msgs.iter().filter(|m| upto.is_none_or(|upto| m.tag > upto));
        let sends = multiple
            .map(|m| m.acker.ack(BasicAckOptions { multiple: true }))
            .into_iter()
            .chain(singles.map(|m| m.acker.ack(BasicAckOptions::default())));
        // Bounded like every broker call: an ack that cannot be written is as moot as a failed one.
        let _ = tokio::time::timeout(BROKER_CALL, join_all(sends)).await;
        // Sent (or the channel is gone): a later `multiple` may cover them. Not reached when
        // the caller gives up first: they then stay in `sending`, which only costs multiples.
        let mut t = self.tags();
        for tag in &acking {
            t.sending.remove(tag);
        }
    }
}

/// Acknowledges deliveries, each channel's in as few frames as its open tags allow (an ack on
/// a lost channel is moot: the broker requeued the message, and its claim will find the job
/// settled).
pub(super) async fn ack_all(msgs: Vec<Msg>) {
    let mut by_channel: Vec<(Arc<Settle>, Vec<Msg>)> = Vec::new();
    for m in msgs {
        match by_channel.iter_mut().find(|(s, _)| Arc::ptr_eq(s, &m.settle)) {
            Some((_, group)) => group.push(m),
            None => by_channel.push((m.settle.clone(), vec![m])),
        }
    }
    join_all(by_channel.into_iter().map(|(settle, group)| async move { settle.ack(group).await })).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(open: &[u64], seen: u64, gets: &[u64], unknown: bool) -> Tags {
        Tags { open: open.iter().copied().collect(), sending: BTreeSet::new(), seen, gets: gets.to_vec(), unknown }
    }

    #[test]
    fn what_lies_below_every_open_tag_goes_in_one_multiple() {
        // 1..=5 done, 6 still running, 7 and 9 done, 8 buffered: 5 covers 1..=5, 7 and 9 alone.
        assert_eq!(multiple_upto(&[3, 1, 5, 2, 4, 7, 9], tags(&[6, 8], 9, &[], false).cap()), Some(5));
        // Nothing open: one multiple covers all.
        assert_eq!(multiple_upto(&[10, 12, 11], tags(&[], 12, &[], false).cap()), Some(12));
    }

    #[test]
    fn deliveries_being_acknowledged_count_as_open_until_sent() {
        let t = Tags { sending: [3, 4].into(), ..tags(&[8], 9, &[], false) };
        assert_eq!(t.cap(), 3, "a multiple must not overtake the acks of 3 and 4");
        assert_eq!(multiple_upto(&[1, 2, 5, 6], t.cap()), Some(2));
    }

    #[test]
    fn a_get_on_its_way_caps_the_multiple_at_what_was_seen_before_it() {
        // A get sent after tag 4 was seen: its answer is 5 or more, and 6, 7 may come before
        // the answer is recorded.
        assert_eq!(multiple_upto(&[1, 2, 3, 4, 6, 7], tags(&[], 7, &[4], false).cap()), Some(4));
        // Two in flight: the lower bound holds.
        assert_eq!(tags(&[9], 9, &[6, 4], false).cap(), 5);
    }

    #[test]
    fn a_lost_answer_or_a_lone_tag_means_single_acks() {
        assert_eq!(multiple_upto(&[1, 2, 3], tags(&[], 3, &[], true).cap()), None);
        assert_eq!(multiple_upto(&[4, 9], tags(&[5], 9, &[], false).cap()), None);
    }

    #[test]
    fn a_guard_dropped_before_its_answer_was_recorded_stops_multiples() {
        let s = Settle::default();
        s.delivered(1);
        s.get_begins().recorded();
        assert_eq!(s.tags().cap(), 1, "tag 1 is open");
        s.settled_otherwise(1);
        assert_eq!(s.tags().cap(), u64::MAX);
        drop(s.get_begins());
        assert_eq!(s.tags().cap(), 0, "the lost answer's tag is unknown");
    }
}
