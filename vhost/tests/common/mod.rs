//! A guest driver for tests: split virtqueues in guest memory, packets in and out, and
//! helpers around real Unix sockets. Shared by the queue-level and vhost-user-level tests.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use vhost_vsock::chain::Mem;
use vhost_vsock::device::VsockDevice;
use vhost_vsock::muxer::DeviceConfig;
use vhost_vsock::packet::{Header, Op, HDR_LEN, HOST_CID, TYPE_STREAM};

pub const GUEST_CID: u64 = 3;
pub const QSIZE: u16 = 256;
pub const MEM_SIZE: usize = 0x400_0000;
/// Guest memory for hand-made chains, past both rings' buffer slots.
pub const SCRATCH: u64 = 0x380_0000;
pub const RX_RING: u64 = 0x0;
pub const TX_RING: u64 = 0x1_0000;
/// Where each ring's used ring starts, relative to its descriptor table.
pub const USED_OFFSET: u64 = 0x2000;
pub const BUF_BASE: u64 = 0x10_0000;
pub const BUF_SLOT: u64 = 0x1_2000;
pub const DEADLINE: Duration = Duration::from_secs(10);

// ---- a scratch directory per test ------------------------------------------------------

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vhost-vsock-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- the guest driver ------------------------------------------------------------------

/// How a TX packet is laid out in descriptors.
#[derive(Clone, Copy, Debug)]
pub enum Layout {
    /// Header and payload in one descriptor.
    One,
    /// Header, then payload (older Linux).
    Two,
    /// The header split 20 + 24 bytes, then payload.
    SplitHeader,
    /// Header and payload behind an indirect descriptor table.
    Indirect,
}

/// One split virtqueue seen from the driver. `MockSplitQueue` writes the descriptor table and
/// the available ring; the used ring is placed by hand because the mock (virtio-queue 0.18)
/// computes the end of the available ring in elements rather than bytes, which puts its used
/// ring on top of available-ring entries past `len / 2`.
pub struct Ring<'a> {
    pub mem: &'a Mem,
    pub mock: MockSplitQueue<'a, Mem>,
    pub used_addr: GuestAddress,
    pub queue: Queue,
    pub next_desc: u16,
    pub avail_idx: u16,
    pub used_seen: u16,
    /// head → the (addr, len) of each descriptor, to read back what the device wrote.
    pub chains: HashMap<u16, Vec<(u64, u32)>>,
    pub slot_base: u64,
}

impl<'a> Ring<'a> {
    pub fn new(mem: &'a Mem, at: u64, slot_base: u64) -> Ring<'a> {
        let mock = MockSplitQueue::create(mem, GuestAddress(at), QSIZE);
        let mut queue: Queue = mock.create_queue().unwrap();
        let used_addr = GuestAddress(at + USED_OFFSET);
        queue.try_set_used_ring_address(used_addr).unwrap();
        // A fresh ring (also after a simulated driver reset): used flags and idx are 0.
        mem.write_obj(0u32, used_addr).unwrap();
        Ring {
            mem,
            mock,
            used_addr,
            queue,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            chains: HashMap::new(),
            slot_base,
        }
    }

    /// A scratch buffer address for descriptor `index` (each has its own slot).
    pub fn slot(&self, index: u16) -> u64 {
        self.slot_base + u64::from(index) * BUF_SLOT
    }

    /// Write a chain of descriptors (addr, len, flags w/o NEXT) and make it available.
    pub fn add_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let n = descs.len() as u16;
        if self.next_desc + n > QSIZE {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        let mut record = Vec::new();
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = head + i as u16;
            let last = i + 1 == descs.len();
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT as u16
            };
            let next = if last { 0 } else { index + 1 };
            self.mock
                .desc_table()
                .store(
                    index,
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next)),
                )
                .unwrap();
            record.push((addr, len));
        }
        self.next_desc += n;
        self.chains.insert(head, record);
        self.mock
            .avail()
            .ring()
            .ref_at(usize::from(self.avail_idx % QSIZE))
            .unwrap()
            .store(head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mock.avail().idx().store(self.avail_idx);
        head
    }

    /// New used entries: (head, len).
    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        let idx: u16 = self.mem.read_obj(self.used_addr.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self
                .used_addr
                .unchecked_add(4 + 8 * u64::from(self.used_seen % QSIZE));
            let id: u32 = self.mem.read_obj(at).unwrap();
            let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Whether the device used buffers we have not taken yet.
    pub fn has_new_used(&self) -> bool {
        let idx: u16 = self.mem.read_obj(self.used_addr.unchecked_add(2)).unwrap();
        idx != self.used_seen
    }

    /// Ask for a notification once the device uses the next buffer (`used_event`, right
    /// after the available ring; what Linux `virtqueue_enable_cb` does with EVENT_IDX).
    pub fn arm_used_event(&self) {
        let at = self
            .mock
            .avail_addr()
            .unchecked_add(4 + 2 * u64::from(QSIZE));
        self.mem.write_obj(self.used_seen, at).unwrap();
    }

    /// `avail_event` (spec §2.7.10), right after the used ring.
    pub fn avail_event(&self) -> u16 {
        self.mem
            .read_obj(self.used_addr.unchecked_add(4 + 8 * u64::from(QSIZE)))
            .unwrap()
    }
}

pub struct Guest<'a> {
    pub mem: &'a Mem,
    pub rx: Ring<'a>,
    pub tx: Ring<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxPacket {
    pub hdr: Header,
    pub data: Vec<u8>,
}

impl<'a> Guest<'a> {
    pub fn new(mem: &'a Mem) -> Guest<'a> {
        Guest {
            mem,
            rx: Ring::new(mem, RX_RING, BUF_BASE),
            tx: Ring::new(mem, TX_RING, BUF_BASE + u64::from(QSIZE) * BUF_SLOT),
        }
    }

    /// Post `n` single-descriptor RX buffers of `size` bytes.
    pub fn post_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let head = if self.rx.next_desc + 1 > QSIZE {
                0
            } else {
                self.rx.next_desc
            };
            let addr = self.rx.slot(head);
            self.rx
                .add_chain(&[(addr, size, VRING_DESC_F_WRITE as u16)]);
        }
    }

    /// Post one RX buffer split into a 44-byte header descriptor and a payload descriptor.
    pub fn post_rx_split(&mut self, payload: u32) {
        let head = if self.rx.next_desc + 2 > QSIZE {
            0
        } else {
            self.rx.next_desc
        };
        let a = self.rx.slot(head);
        let b = self.rx.slot(head + 1);
        self.rx.add_chain(&[
            (a, HDR_LEN as u32, VRING_DESC_F_WRITE as u16),
            (b, payload, VRING_DESC_F_WRITE as u16),
        ]);
    }

    pub fn hdr(op: Op, src_port: u32, dst_port: u32, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op: op.to_u16(),
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    /// Put a packet on TX with the given layout.
    pub fn send(&mut self, hdr: &Header, data: &[u8], layout: Layout) {
        let mut bytes = hdr.encode().to_vec();
        bytes.extend_from_slice(data);
        let head = if self.tx.next_desc + 3 > QSIZE {
            0
        } else {
            self.tx.next_desc
        };
        let slot = |i: u16| self.tx.slot(head + i);
        let mem = self.mem;
        let put = |addr: u64, b: &[u8]| mem.write_slice(b, GuestAddress(addr)).unwrap();
        let descs: Vec<(u64, u32, u16)> = match layout {
            Layout::One => {
                put(slot(0), &bytes);
                vec![(slot(0), bytes.len() as u32, 0)]
            }
            Layout::Two => {
                put(slot(0), &bytes[..HDR_LEN]);
                put(slot(1), data);
                if data.is_empty() {
                    vec![(slot(0), HDR_LEN as u32, 0)]
                } else {
                    vec![
                        (slot(0), HDR_LEN as u32, 0),
                        (slot(1), data.len() as u32, 0),
                    ]
                }
            }
            Layout::SplitHeader => {
                put(slot(0), &bytes[..20]);
                put(slot(1), &bytes[20..]);
                vec![(slot(0), 20, 0), (slot(1), (bytes.len() - 20) as u32, 0)]
            }
            Layout::Indirect => {
                // An indirect table of two descriptors in slot 2, pointing at slots 0 and 1.
                put(slot(0), &bytes[..HDR_LEN]);
                put(slot(1), data);
                let table = [
                    RawDescriptor::from(SplitDescriptor::new(
                        slot(0),
                        HDR_LEN as u32,
                        VRING_DESC_F_NEXT as u16,
                        1,
                    )),
                    RawDescriptor::from(SplitDescriptor::new(slot(1), data.len() as u32, 0, 0)),
                ];
                for (i, d) in table.iter().enumerate() {
                    mem.write_obj(*d, GuestAddress(slot(2) + 16 * i as u64))
                        .unwrap();
                }
                vec![(slot(2), 32, VRING_DESC_F_INDIRECT as u16)]
            }
        };
        self.tx.add_chain(&descs);
    }

    /// A raw TX chain (for malformed ones).
    pub fn send_raw(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        self.tx.add_chain(descs)
    }

    /// What the backend does on a TX kick: drain TX, then fill RX.
    pub fn kick_tx(&mut self, dev: &mut VsockDevice) {
        dev.process_tx(self.mem, &mut self.tx.queue);
        dev.process_rx(self.mem, &mut self.rx.queue);
    }

    /// What the backend does on an RX kick.
    pub fn kick_rx(&mut self, dev: &mut VsockDevice) {
        dev.process_rx(self.mem, &mut self.rx.queue);
    }

    /// Read the packets the device put on RX since the last call.
    pub fn take_rx(&mut self) -> Vec<RxPacket> {
        let used = self.rx.take_used();
        used.into_iter()
            .map(|(head, len)| {
                let mut bytes = Vec::new();
                let mut left = len as usize;
                for &(addr, dlen) in &self.rx.chains[&head] {
                    let n = left.min(dlen as usize);
                    let mut part = vec![0u8; n];
                    self.mem.read_slice(&mut part, GuestAddress(addr)).unwrap();
                    bytes.extend_from_slice(&part);
                    left -= n;
                }
                assert!(bytes.len() >= HDR_LEN, "RX packet of {len} bytes");
                let hdr = Header::decode(&bytes).unwrap();
                let data = bytes[HDR_LEN..].to_vec();
                assert_eq!(hdr.len as usize, data.len(), "header len matches used len");
                RxPacket { hdr, data }
            })
            .collect()
    }
}

pub fn memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

pub fn device(bus: &Path, uds: Option<PathBuf>, listener: Option<UnixListener>) -> VsockDevice {
    VsockDevice::new(
        DeviceConfig::new(GUEST_CID, bus.to_owned(), 5000, uds),
        listener,
    )
    .unwrap()
}

/// The start of most queue tests: a bus listener in a fresh directory, a device routed to it,
/// and a guest driver on fresh memory (leaked: it must outlive the `Guest` that borrows it,
/// and a test process ends soon anyway). Bind `dir` when destructuring (`dir: _dir`): a field
/// left to `..` is dropped at once, and the directory with the bus socket with it.
pub struct BusRig {
    pub dir: TempDir,
    pub bus_path: PathBuf,
    pub bus: UnixListener,
    pub mem: &'static Mem,
    pub guest: Guest<'static>,
    pub dev: VsockDevice,
}

impl BusRig {
    pub fn new(name: &str) -> BusRig {
        let dir = TempDir::new(name);
        let bus_path = dir.path("bus.sock");
        let bus = UnixListener::bind(&bus_path).unwrap();
        let mem: &'static Mem = Box::leak(Box::new(memory()));
        let dev = device(&bus_path, None, None);
        BusRig {
            dir,
            bus_path,
            bus,
            mem,
            guest: Guest::new(mem),
            dev,
        }
    }
}

/// Wait (with a deadline) until the device's host epoll has something, then service it and
/// fill RX — what the backend does on its host event.
pub fn host_event(dev: &mut VsockDevice, guest: &mut Guest) {
    assert!(
        wait_readable(dev.host_epoll_fd(), DEADLINE.as_millis() as i32),
        "no host-side event within {DEADLINE:?}"
    );
    dev.handle_host_events();
    guest.kick_rx(dev);
}

/// Whether the device's host epoll reports anything right now.
pub fn host_pending(dev: &VsockDevice) -> bool {
    wait_readable(dev.host_epoll_fd(), 0)
}

/// Whether `fd` becomes readable within `timeout_ms` (an epoll of our own watching it, the way
/// vhost-user-backend's worker watches the device's epoll fd).
pub fn wait_readable(fd: i32, timeout_ms: i32) -> bool {
    let epoll = Epoll::new().unwrap();
    epoll
        .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 1))
        .unwrap();
    let mut events = [EpollEvent::default(); 1];
    epoll.wait(timeout_ms, &mut events).unwrap() == 1
}

/// Service host events until `done` says so.
pub fn until(
    dev: &mut VsockDevice,
    guest: &mut Guest,
    got: &mut Vec<RxPacket>,
    done: impl Fn(&[RxPacket]) -> bool,
) {
    loop {
        got.extend(guest.take_rx());
        if done(got) {
            return;
        }
        host_event(dev, guest);
    }
}

pub fn accept(listener: &UnixListener) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let (stream, _) = listener
        .accept()
        .expect("the device connected synchronously");
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
}

pub fn read_exactly(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf).unwrap();
    buf
}

pub fn assert_eof(stream: &mut UnixStream) {
    let mut buf = [0u8; 16];
    assert_eq!(stream.read(&mut buf).unwrap(), 0, "expected EOF");
}

pub fn ops(packets: &[RxPacket]) -> Vec<Op> {
    packets.iter().map(|p| p.hdr.op().unwrap()).collect()
}

/// REQUEST to the bus port, accept the host side, check the RESPONSE.
pub fn open_bus_connection(
    dev: &mut VsockDevice,
    guest: &mut Guest,
    bus: &UnixListener,
    guest_port: u32,
    guest_buf_alloc: u32,
) -> UnixStream {
    let mut req = Guest::hdr(Op::Request, guest_port, 5000, 0);
    req.buf_alloc = guest_buf_alloc;
    guest.send(&req, &[], Layout::One);
    guest.kick_tx(dev);
    let peer = accept(bus);
    let rx = guest.take_rx();
    assert_eq!(ops(&rx), vec![Op::Response]);
    let resp = rx[0].hdr;
    assert_eq!((resp.src_cid, resp.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!((resp.src_port, resp.dst_port), (5000, guest_port));
    assert_eq!(resp.type_, TYPE_STREAM);
    assert_eq!(resp.buf_alloc, 256 * 1024);
    peer
}
