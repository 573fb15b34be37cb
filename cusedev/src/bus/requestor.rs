//! Request ids for packets that expect a completion: the kernel's `struct vmbus_requestor`.
//!
//! A driver that keeps many requests in flight on one channel (storvsc, netvsc, xs_fastpath)
//! does not put its own pointers in the packet's transaction id: since 5.12 the channel hands
//! out small ids from a fixed array, and maps the host's completion back through it, so a host
//! can neither name a request that is not in flight nor make the guest follow a pointer
//! (drivers/hv/channel.c, `vmbus_next_request_id` / `vmbus_request_addr`, 5.13).
//!
//! The array is a free list threaded through itself: ids come out 1, 2, 3, ... at first, and a
//! released id is the next one handed out again (LIFO). Id 0 is never used: it means an
//! unsolicited message from the host. When every slot is taken the send fails with -EAGAIN.

/// A fixed set of request ids.
#[derive(Debug)]
pub struct Requestor {
    size: u64,
    /// Released ids, the most recent last.
    free: Vec<u64>,
    /// Ids above this have never been handed out.
    high_water: u64,
}

impl Requestor {
    /// `size` slots (the driver's `rqstor_size`).
    pub fn new(size: u64) -> Requestor {
        Requestor {
            size,
            free: Vec::new(),
            high_water: 0,
        }
    }

    /// The next id, or `None` when all `size` are in flight (the kernel's `VMBUS_RQST_ERROR`).
    pub fn take(&mut self) -> Option<u64> {
        if let Some(id) = self.free.pop() {
            return Some(id);
        }
        if self.high_water < self.size {
            self.high_water += 1;
            return Some(self.high_water);
        }
        None
    }

    /// Gives `id` back. An id that is not in flight is ignored (a host's duplicate
    /// completion must not free a slot twice); the caller checks that before calling.
    pub fn release(&mut self, id: u64) {
        if id >= 1 && id <= self.high_water && !self.free.contains(&id) {
            self.free.push(id);
        }
    }

    /// Ids in flight.
    pub fn in_flight(&self) -> u64 {
        self.high_water - self.free.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_at_one_and_reuse_the_last_released() {
        let mut r = Requestor::new(3);
        assert_eq!(r.take(), Some(1));
        assert_eq!(r.take(), Some(2));
        r.release(1);
        assert_eq!(r.take(), Some(1));
        assert_eq!(r.take(), Some(3));
        assert_eq!(r.take(), None, "all slots in flight: the send gets EAGAIN");
        assert_eq!(r.in_flight(), 3);
        r.release(2);
        r.release(2);
        assert_eq!(r.in_flight(), 2, "a double release frees one slot");
        r.release(0);
        r.release(99);
        assert_eq!(r.in_flight(), 2);
    }
}
