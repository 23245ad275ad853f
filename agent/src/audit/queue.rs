//! The hand-off between the threads that record and the writer thread.
//!
//! Waking a thread costs a system call and a context switch, which under
//! load cost more than writing the record. So plain records wake the writer
//! only when it is idle; while records keep coming it wakes itself on a short
//! tick and takes everything queued meanwhile in one batch. Records that a
//! caller waits for (durable ones, syncs) wake it at once.
use std::{
    sync::{Condvar, Mutex, MutexGuard},
    time::Duration,
};

/// How long a plain record may wait in memory while the writer is busy with
/// a steady flow: bounds the batching delay, not durability (records are
/// fsynced within the sync interval anyway).
pub const TICK: Duration = Duration::from_millis(2);

/// Why an item was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every sender is gone.
    Closed,
    /// The queue holds its limit: the consumer is behind (a stalled disk).
    Full,
}

struct State<T> {
    items: Vec<T>,
    /// The weight of `items` (bytes, for records).
    weight: usize,
    /// The writer waits with no plain record pending and must be woken by
    /// the next one.
    idle: bool,
    /// The writer waits (idle or ticking): an urgent item must wake it.
    waiting: bool,
    /// Something a caller waits for is queued.
    urgent: bool,
    /// Every sender is gone.
    closed: bool,
}

/// A queue with one consumer that is woken as little as possible.
pub struct Queue<T> {
    state: Mutex<State<T>>,
    wake: Condvar,
    /// Most weight queued at once.
    limit: usize,
}

/// What one wait of the consumer gave.
pub struct Taken<T> {
    pub items: Vec<T>,
    /// No sender is left: nothing more will come.
    pub closed: bool,
}

impl<T> Queue<T> {
    /// A queue that holds at most `limit` weight at a time.
    pub fn new(limit: usize) -> Queue<T> {
        let state = State { items: Vec::new(), weight: 0, idle: false, waiting: false, urgent: false, closed: false };
        Queue { state: Mutex::new(state), wake: Condvar::new(), limit }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding the lock leaves a plain Vec behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an item of `weight`; `urgent` when a caller waits for it.
    pub fn push(&self, item: T, weight: usize, urgent: bool) -> Result<(), Refused> {
        let mut s = self.lock();
        if s.closed {
            return Err(Refused::Closed);
        }
        if s.weight + weight > self.limit && !s.items.is_empty() {
            return Err(Refused::Full);
        }
        s.weight += weight;
        s.items.push(item);
        let wake = s.waiting && (urgent || s.idle);
        s.urgent |= urgent;
        if wake {
            // Only one wake-up per wait.
            s.waiting = false;
        }
        drop(s);
        if wake {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Marks the queue closed (the last sender is gone) and wakes the
    /// consumer to finish.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    /// Closes the queue for good and hands back what it holds (the
    /// consumer is gone).
    pub fn shut(&self) -> Vec<T> {
        let mut s = self.lock();
        s.closed = true;
        s.weight = 0;
        std::mem::take(&mut s.items)
    }

    /// Waits for items and takes all of them. `ticking`: the consumer had
    /// work last time, so it lingers up to `timeout` to batch plain items
    /// (an urgent item or closing ends the wait early); otherwise it waits
    /// up to `timeout` for the first item of any kind. Returns what is
    /// queued when the wait ends (possibly nothing, on a timeout).
    pub fn take(&self, timeout: Duration, ticking: bool) -> Taken<T> {
        let mut s = self.lock();
        let ready = |s: &State<T>| s.urgent || s.closed || (!ticking && !s.items.is_empty());
        if !ready(&s) && !timeout.is_zero() {
            s.waiting = true;
            s.idle = !ticking;
            let (g, _) = self.wake.wait_timeout_while(s, timeout, |s| !ready(s)).unwrap_or_else(|e| e.into_inner());
            s = g;
        }
        s.waiting = false;
        s.idle = false;
        s.urgent = false;
        s.weight = 0;
        Taken { items: std::mem::take(&mut s.items), closed: s.closed }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::Arc,
        thread,
        time::{Duration, Instant},
    };

    use super::*;

    #[test]
    fn an_idle_consumer_wakes_for_the_first_item() {
        let q = Arc::new(Queue::new(1 << 20));
        let q2 = q.clone();
        let t = thread::spawn(move || {
            let started = Instant::now();
            let got = q2.take(Duration::from_secs(30), false);
            (got.items, started.elapsed())
        });
        thread::sleep(Duration::from_millis(50));
        q.push(1, 1, false).unwrap();
        let (items, waited) = t.join().unwrap();
        assert_eq!(items, vec![1]);
        assert!(waited < Duration::from_secs(30), "woken by the item, not the timeout");
    }

    #[test]
    fn a_ticking_consumer_batches_plain_items_but_wakes_for_urgent_ones() {
        let q = Arc::new(Queue::new(1 << 20));
        // Plain items while ticking: taken only when the tick ends.
        q.push(1, 1, false).unwrap();
        let got = q.take(Duration::from_millis(20), true);
        assert_eq!(got.items, vec![1]);
        let q2 = q.clone();
        let t = thread::spawn(move || q2.take(Duration::from_secs(30), true).items);
        thread::sleep(Duration::from_millis(50));
        q.push(2, 1, false).unwrap();
        thread::sleep(Duration::from_millis(20));
        assert!(!t.is_finished(), "a plain item does not end a tick");
        q.push(3, 1, true).unwrap();
        assert_eq!(t.join().unwrap(), vec![2, 3]);
    }

    #[test]
    fn closing_wakes_the_consumer_and_refuses_more() {
        let q = Arc::new(Queue::new(1 << 20));
        q.push(1, 1, false).unwrap();
        let q2 = q.clone();
        let t = thread::spawn(move || q2.take(Duration::from_secs(30), true));
        thread::sleep(Duration::from_millis(20));
        q.close();
        let got = t.join().unwrap();
        assert!(got.closed);
        assert_eq!(got.items, vec![1]);
        assert_eq!(q.push(2, 1, true), Err(Refused::Closed));
    }

    #[test]
    fn shutting_hands_back_what_is_held_and_refuses_more() {
        // What a caller waits on (a reply channel) fails once the queue is
        // shut and its items dropped.
        let q = Queue::new(1 << 20);
        let (reply, wait) = std::sync::mpsc::channel::<u64>();
        q.push(reply, 1, true).unwrap();
        drop(q.shut());
        assert!(wait.recv().is_err(), "the waiter hears that nobody will answer");
        let (reply, _wait) = std::sync::mpsc::channel::<u64>();
        assert!(matches!(q.push(reply, 1, true), Err(Refused::Closed)));
    }

    #[test]
    fn a_full_queue_refuses_until_the_consumer_takes() {
        let q = Queue::new(10);
        q.push(1, 6, false).unwrap();
        q.push(2, 4, false).unwrap();
        assert_eq!(q.push(3, 1, true), Err(Refused::Full));
        assert_eq!(q.take(Duration::ZERO, true).items, vec![1, 2]);
        q.push(3, 1, true).unwrap();
        // One item heavier than the limit still goes into an empty queue.
        let q = Queue::new(10);
        q.push(1, 50, false).unwrap();
        assert_eq!(q.push(2, 1, false), Err(Refused::Full));
    }

    #[test]
    fn a_timeout_with_nothing_queued_gives_nothing() {
        let q: Queue<u32> = Queue::new(1 << 20);
        let got = q.take(Duration::from_millis(5), false);
        assert!(got.items.is_empty() && !got.closed);
    }
}
