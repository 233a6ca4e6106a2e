//! A connection's outbound queue: publishers push shared frames, the connection's task
//! drains them. Bounded in frames; a push onto a full queue marks the connection as a slow
//! consumer and is dropped, so a client that does not read never makes the publisher wait
//! or other subscribers fall behind.

use std::collections::VecDeque;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

/// Result of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued.
    Queued,
    /// The queue was full: the connection is now a slow consumer; the frame was dropped.
    Overflowed,
    /// The connection already overflowed or is closed; the frame was dropped.
    Dead,
}

#[derive(Debug, Default)]
struct Inner {
    frames: VecDeque<Bytes>,
    dead: bool,
    overflowed: bool,
}

/// The queue; shared between the registry (pushers) and one connection task (drainer).
#[derive(Debug)]
pub struct ConnQueue {
    cap: usize,
    inner: Mutex<Inner>,
    notify: Notify,
}

impl ConnQueue {
    /// An empty queue holding at most `cap` frames.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
        }
    }

    /// Queues a frame.
    pub fn push(&self, frame: &Bytes) -> Push {
        let mut inner = self.inner.lock();
        if inner.dead {
            return Push::Dead;
        }
        if inner.frames.len() >= self.cap {
            inner.dead = true;
            inner.overflowed = true;
            inner.frames = VecDeque::new();
            drop(inner);
            self.notify.notify_one();
            return Push::Overflowed;
        }
        let was_empty = inner.frames.is_empty();
        inner.frames.push_back(frame.clone());
        drop(inner);
        if was_empty {
            self.notify.notify_one();
        }
        Push::Queued
    }

    /// Moves every queued frame to the end of `out`. Returns `true` if the queue overflowed
    /// (the connection must be closed as a slow consumer).
    pub fn drain_into(&self, out: &mut VecDeque<Bytes>) -> bool {
        let mut inner = self.inner.lock();
        if inner.overflowed {
            return true;
        }
        if out.is_empty() {
            std::mem::swap(out, &mut inner.frames);
        } else {
            out.extend(inner.frames.drain(..));
        }
        // A burst can leave a large ring behind; give it back rather than keeping the peak
        // for the connection's lifetime.
        if inner.frames.capacity() > 64 {
            inner.frames = VecDeque::new();
        }
        false
    }

    /// Whether a push found the queue full (the connection is a slow consumer).
    pub fn is_overflowed(&self) -> bool {
        self.inner.lock().overflowed
    }

    /// Frames waiting now.
    pub fn len(&self) -> usize {
        self.inner.lock().frames.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops accepting frames (the connection is closing) and frees what was queued.
    pub fn close(&self) {
        let mut inner = self.inner.lock();
        inner.dead = true;
        inner.frames = VecDeque::new();
    }

    /// Waits until a push or an overflow happened since the last wait.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_marks_dead_and_frees() {
        let q = ConnQueue::new(2);
        let f = Bytes::from_static(b"x");
        assert_eq!(q.push(&f), Push::Queued);
        assert_eq!(q.push(&f), Push::Queued);
        assert_eq!(q.push(&f), Push::Overflowed);
        assert_eq!(q.push(&f), Push::Dead);
        let mut out = VecDeque::new();
        assert!(q.drain_into(&mut out));
        assert!(out.is_empty());
    }

    #[test]
    fn drain_preserves_order() {
        let q = ConnQueue::new(10);
        for i in 0..5u8 {
            q.push(&Bytes::from(vec![i]));
        }
        let mut out = VecDeque::from([Bytes::from_static(b"head")]);
        assert!(!q.drain_into(&mut out));
        let got: Vec<_> = out.iter().map(|b| b.to_vec()).collect();
        assert_eq!(
            got,
            vec![
                b"head".to_vec(),
                vec![0],
                vec![1],
                vec![2],
                vec![3],
                vec![4]
            ]
        );
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn push_wakes_the_drainer_even_if_it_was_not_waiting_yet() {
        let q = std::sync::Arc::new(ConnQueue::new(4));
        q.push(&Bytes::from_static(b"a"));
        // The permit is stored: this returns at once.
        tokio::time::timeout(std::time::Duration::from_secs(1), q.notified())
            .await
            .unwrap();
    }
}
