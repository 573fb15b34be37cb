//! Worker threads for requests that may sleep inside a device.
//!
//! A daemon's read(2) on a device can sleep for hours waiting for the host; while it does, the
//! same daemon (or another) must still be able to write(2). So every READ, WRITE and IOCTL runs
//! on a worker thread, and the pool grows by one thread whenever a job arrives and no worker is
//! free to take it, up to a cap. Idle workers stay for the next burst: thread creation is cheap
//! but not free, and a device session typically has a handful of long sleepers.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

type Job = Box<dyn FnOnce() + Send + 'static>;

struct State {
    jobs: VecDeque<Job>,
    /// Workers waiting for a job right now.
    idle: usize,
    workers: Vec<JoinHandle<()>>,
    shutting_down: bool,
    warned_at_cap: bool,
}

struct Inner {
    state: Mutex<State>,
    wake: Condvar,
    max_workers: usize,
    name: String,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A growing pool of worker threads.
pub struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    /// `name` prefixes the worker thread names (visible in `ps -L`, `/proc/*/task/*/comm`).
    pub fn new(name: &str, max_workers: usize) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    jobs: VecDeque::new(),
                    idle: 0,
                    workers: Vec::new(),
                    shutting_down: false,
                    warned_at_cap: false,
                }),
                wake: Condvar::new(),
                max_workers: max_workers.max(1),
                name: name.to_owned(),
            }),
        }
    }

    /// Runs `job` on a worker, starting a new one if every existing worker is busy.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let mut state = self.inner.lock();
        state.jobs.push_back(Box::new(job));
        // A worker counted idle may already have been promised an earlier job that it has not
        // picked up yet, so compare with the queue length, not with zero.
        if state.jobs.len() > state.idle {
            if state.workers.len() < self.inner.max_workers {
                let inner = self.inner.clone();
                let index = state.workers.len();
                let spawned = thread::Builder::new()
                    .name(format!("{}-w{}", self.inner.name, index))
                    .spawn(move || worker(inner));
                match spawned {
                    Ok(handle) => state.workers.push(handle),
                    Err(err) => log::error!(
                        "{}: cannot start a worker thread ({err}); the request waits for a busy one",
                        self.inner.name
                    ),
                }
            } else if !state.warned_at_cap {
                state.warned_at_cap = true;
                log::warn!(
                    "{}: all {} worker threads are busy (requests sleeping in devices); \
                     new requests wait until one returns",
                    self.inner.name,
                    self.inner.max_workers
                );
            }
        }
        drop(state);
        self.inner.wake.notify_one();
    }

    /// Lets the workers finish every queued job, then joins them.
    pub fn shutdown(&self) {
        let workers = {
            let mut state = self.inner.lock();
            state.shutting_down = true;
            std::mem::take(&mut state.workers)
        };
        self.inner.wake.notify_all();
        for handle in workers {
            if handle.join().is_err() {
                log::error!("{}: a worker thread panicked", self.inner.name);
            }
        }
    }

    #[cfg(test)]
    fn worker_count(&self) -> usize {
        self.inner.lock().workers.len()
    }

    /// Waits until every worker sits idle (tests only).
    #[cfg(test)]
    fn wait_all_idle(&self) {
        loop {
            let state = self.inner.lock();
            if state.idle == state.workers.len() && state.jobs.is_empty() {
                return;
            }
            drop(state);
            thread::yield_now();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn worker(inner: Arc<Inner>) {
    let mut state = inner.lock();
    loop {
        if let Some(job) = state.jobs.pop_front() {
            drop(state);
            job();
            state = inner.lock();
            continue;
        }
        if state.shutting_down {
            return;
        }
        state.idle += 1;
        state = inner.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        state.idle -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_blocked_job_does_not_stop_the_next_one() {
        let pool = Pool::new("test", 8);
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        let first_done = done_tx.clone();
        pool.submit(move || {
            release_rx.recv().unwrap();
            first_done.send("first").unwrap();
        });
        pool.submit(move || done_tx.send("second").unwrap());
        assert_eq!(done_rx.recv().unwrap(), "second");
        release_tx.send(()).unwrap();
        assert_eq!(done_rx.recv().unwrap(), "first");
        pool.shutdown();
    }

    #[test]
    fn idle_workers_are_reused() {
        let pool = Pool::new("test", 8);
        for _ in 0..20 {
            let (tx, rx) = mpsc::channel();
            pool.submit(move || tx.send(()).unwrap());
            rx.recv().unwrap();
            pool.wait_all_idle();
        }
        assert_eq!(pool.worker_count(), 1);
    }

    #[test]
    fn jobs_queued_beyond_the_cap_still_run() {
        let pool = Pool::new("test", 2);
        let (tx, rx) = mpsc::channel();
        for i in 0..10 {
            let tx = tx.clone();
            pool.submit(move || tx.send(i).unwrap());
        }
        let mut got: Vec<i32> = (0..10).map(|_| rx.recv().unwrap()).collect();
        got.sort();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        assert!(pool.worker_count() <= 2);
    }
}
