//! Connection workers: one thread per core, each running its own
//! single-threaded runtime. A connection stays on the worker it was handed to
//! from accept to close, with everything it starts (upstream connections,
//! pooled HTTP clients, timers).
//!
//! Why not one work-stealing runtime: every request through the enforcer is
//! a few small reads and writes, and a work-stealing scheduler wakes idle
//! threads to look for work on almost every socket event. Those wake-ups
//! (futex calls, context switches, cross-CPU interrupts) cost more than the
//! request itself. Workers that never share tasks wake only for their own
//! sockets, as nginx's and haproxy's do.
use std::{
    future::Future,
    io,
    sync::atomic::{AtomicUsize, Ordering},
};

use tokio::runtime::{Builder, Handle};

pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `n` workers (0: one per CPU this process may run on).
    pub fn start(n: usize) -> io::Result<Workers> {
        let n = if n == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { n };
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let rt = Builder::new_current_thread().enable_all().build()?;
            handles.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(format!("worker-{i}"))
                // Runs until the process exits.
                .spawn(move || rt.block_on(std::future::pending::<()>()))?;
        }
        Ok(Workers { handles, next: AtomicUsize::new(0) })
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Runs `task` on the next worker in turn.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].spawn(task);
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, sync::mpsc};

    use super::*;

    #[test]
    fn tasks_go_round_robin_and_each_worker_keeps_its_thread() {
        let w = Workers::start(2).unwrap();
        assert_eq!(w.len(), 2);
        let (tx, rx) = mpsc::channel();
        for _ in 0..4 {
            let tx = tx.clone();
            w.spawn(async move {
                let before = std::thread::current().id();
                // Timers and spawned tasks work and stay on the worker.
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                let inner = tokio::spawn(async { std::thread::current().id() }).await.unwrap();
                tx.send((before, std::thread::current().id(), inner)).unwrap();
            });
        }
        let got: Vec<_> = (0..4).map(|_| rx.recv().unwrap()).collect();
        for (a, b, c) in &got {
            assert!(a == b && b == c, "a task and what it spawns stay on one thread");
        }
        let threads: HashSet<_> = got.iter().map(|g| g.0).collect();
        assert_eq!(threads.len(), 2, "both workers took tasks");
    }
}
