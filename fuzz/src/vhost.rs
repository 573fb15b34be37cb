//! `vhost-vsock`: guest descriptor chains (`chain::read_tx`, `chain::RxBuffer`) and the vsock
//! device's TX/RX processing, with chains built by virtio-queue's `MockSplitQueue` in mmap'ed
//! guest memory of two regions with a hole between them.
//!
//! `vhost_chain` writes arbitrary descriptors (addresses in either region, across an end, in
//! the hole or anywhere; zero and huge lengths; any mix of WRITE, NEXT and INDIRECT flags;
//! `next` loops; indirect tables anywhere), pops the chain and runs it through the TX reader
//! and the RX writer. The descriptors the chain really yields are taken from virtio-queue's
//! own iterator (the trusted part), and properties are checked against them: a TX read never
//! writes guest memory and returns exactly the header at the start of the chain's bytes and
//! `hdr.len` bytes after it; a refusal names the right reason; an RX write changes exactly
//! the bytes of the yielded descriptors that hold header + payload, in order, and nothing else,
//! and reports that many bytes. A well-formed chain (header and payload split over up to four
//! descriptors, directly or through an indirect table) round-trips the packet both ways.
//!
//! `vsock_device` drives `VsockDevice::process_tx`/`process_rx` with no backend running (the
//! bus socket does not exist, so every connection request is refused with an RST): TX packets
//! with arbitrary headers and some raw chains, RX buffers of arbitrary sizes. Every TX chain
//! comes back exactly once with used length 0, every RX chain at most once with a used length
//! within its buffer that is a header plus its `len` (checked where no other buffer overlaps
//! it), and nothing outside the RX buffers and
//! the used rings changes.

use arbitrary::{Arbitrary, Result as ArbResult, Unstructured};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use vhost_vsock::chain::{read_tx, ChainError, Mem, RxBuffer};
use vhost_vsock::device::VsockDevice;
use vhost_vsock::muxer::DeviceConfig;
use vhost_vsock::packet::{Header, Op, HDR_LEN, HOST_CID, MAX_PKT_DATA, TYPE_STREAM};

const R0_LEN: u64 = 0x4000;
const R1: u64 = 0x1_0000;
const R1_LEN: u64 = 0x4000;
const QSIZE: u16 = 16;
/// Where hand-placed descriptors point: past the rings in region 0, and all of region 1.
const SCRATCH0: u64 = 0x1000;
const GUEST_CID: u64 = 3;

/// Guest memory: two regions with a hole between them.
pub fn memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), R0_LEN as usize),
        (GuestAddress(R1), R1_LEN as usize),
    ])
    .expect("guest memory")
}

/// Offset of guest address `addr` in a snapshot of both regions, if `len` bytes from it are in
/// one region.
fn flat(addr: u64, len: u64) -> Option<usize> {
    let end = addr.checked_add(len)?;
    if end <= R0_LEN {
        Some(addr as usize)
    } else if addr >= R1 && end <= R1 + R1_LEN {
        Some((R0_LEN + addr - R1) as usize)
    } else {
        None
    }
}

/// [`flat`] for a descriptor: an empty one is nowhere and everywhere (virtio-queue maps it
/// without looking at its address).
fn flat_desc(addr: u64, len: u32) -> Option<usize> {
    if len == 0 {
        Some(0)
    } else {
        flat(addr, u64::from(len))
    }
}

fn snapshot(mem: &Mem) -> Vec<u8> {
    let mut out = vec![0u8; (R0_LEN + R1_LEN) as usize];
    let (a, b) = out.split_at_mut(R0_LEN as usize);
    mem.read_slice(a, GuestAddress(0)).expect("region 0");
    mem.read_slice(b, GuestAddress(R1)).expect("region 1");
    out
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Addr {
    Scratch0(u16),
    Region1(u16),
    NearEnd(bool, u8),
    Hole(u16),
    Any(u64),
}

impl Addr {
    fn get(self) -> u64 {
        match self {
            Addr::Scratch0(o) => SCRATCH0 + u64::from(o) % (R0_LEN - SCRATCH0),
            Addr::Region1(o) => R1 + u64::from(o) % R1_LEN,
            Addr::NearEnd(first, back) => {
                let end = if first { R0_LEN } else { R1 + R1_LEN };
                end - u64::from(back)
            }
            Addr::Hole(o) => R0_LEN + u64::from(o) % (R1 - R0_LEN),
            Addr::Any(a) => a,
        }
    }
}

#[derive(Debug, Clone, Copy, Arbitrary)]
struct RawDesc {
    addr: Addr,
    len: u16,
    huge: bool,
    flags: u8,
    next: u8,
}

impl RawDesc {
    fn raw(self) -> RawDescriptor {
        let len = if self.huge {
            u32::from(self.len) << 16
        } else {
            u32::from(self.len)
        };
        let flags = u16::from(self.flags)
            & (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT) as u16;
        RawDescriptor::from(SplitDescriptor::new(
            self.addr.get(),
            len,
            flags,
            u16::from(self.next),
        ))
    }
}

fn header(u: &mut Unstructured<'_>, len: u32) -> ArbResult<Header> {
    let op = *u.choose(&[
        Op::Request,
        Op::Response,
        Op::Rst,
        Op::Shutdown,
        Op::Rw,
        Op::CreditUpdate,
        Op::CreditRequest,
    ])?;
    let normal = u.ratio(3, 4)?;
    Ok(Header {
        src_cid: if normal {
            GUEST_CID
        } else {
            u64::arbitrary(u)?
        },
        dst_cid: if normal { HOST_CID } else { u64::arbitrary(u)? },
        src_port: u32::arbitrary(u)?,
        dst_port: if normal {
            *u.choose(&[5000, 1234])?
        } else {
            u32::arbitrary(u)?
        },
        len,
        type_: if normal {
            TYPE_STREAM
        } else {
            u16::arbitrary(u)?
        },
        op: if u.ratio(1, 16)? {
            u16::arbitrary(u)?
        } else {
            op.to_u16()
        },
        flags: u32::arbitrary(u)?,
        buf_alloc: u32::arbitrary(u)?,
        fwd_cnt: u32::arbitrary(u)?,
    })
}

/// A queue at `at` (descriptor table, then the mock's available ring) with its used ring at
/// `used`, placed by hand: the mock (0.18) computes the available ring's end in elements, not
/// bytes (see vhost/tests/common/mod.rs).
pub fn queue<'a>(mem: &'a Mem, at: u64, used: u64) -> (MockSplitQueue<'a, Mem>, Queue) {
    let mock = MockSplitQueue::create(mem, GuestAddress(at), QSIZE);
    let mut queue: Queue = mock.create_queue().expect("queue");
    queue
        .try_set_used_ring_address(GuestAddress(used))
        .expect("used ring");
    mem.write_obj(0u32, GuestAddress(used))
        .expect("used ring header");
    (mock, queue)
}

fn make_available(mock: &MockSplitQueue<'_, Mem>, slot: u16, head: u16) {
    mock.avail()
        .ring()
        .ref_at(usize::from(slot))
        .expect("avail slot")
        .store(head);
    mock.avail().idx().store(slot + 1);
}

/// Splits `total` bytes into up to four descriptors in region 1, apart from each other.
fn segments(u: &mut Unstructured<'_>, total: usize) -> ArbResult<Vec<(u64, u32)>> {
    let pieces = u.int_in_range(1..=4)?;
    let mut cuts: Vec<usize> = (1..pieces)
        .map(|_| u.int_in_range(0..=total))
        .collect::<ArbResult<_>>()?;
    cuts.push(0);
    cuts.push(total);
    cuts.sort_unstable();
    let mut at = R1 + u64::from(u.int_in_range(0..=64u8)?);
    let mut out = Vec::new();
    for w in cuts.windows(2) {
        let len = (w[1] - w[0]) as u32;
        out.push((at, len));
        at += u64::from(len) + u64::from(u.int_in_range(0..=32u8)?);
    }
    Ok(out)
}

/// Stores `segs` as one chain (directly from index 0, or through an indirect table in region
/// 0) with `flags` on every descriptor; returns the head.
fn store_chain(
    mock: &MockSplitQueue<'_, Mem>,
    mem: &Mem,
    segs: &[(u64, u32)],
    flags: u16,
    indirect: bool,
) {
    let descs: Vec<RawDescriptor> = segs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len))| {
            let last = i + 1 == segs.len();
            let f = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT as u16
            };
            RawDescriptor::from(SplitDescriptor::new(
                addr,
                len,
                f,
                if last { 0 } else { i as u16 + 1 },
            ))
        })
        .collect();
    if indirect {
        let table = SCRATCH0;
        for (i, d) in descs.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(table + 16 * i as u64))
                .expect("indirect table");
        }
        let len = 16 * descs.len() as u32;
        mock.desc_table()
            .store(
                0,
                RawDescriptor::from(SplitDescriptor::new(
                    table,
                    len,
                    VRING_DESC_F_INDIRECT as u16,
                    0,
                )),
            )
            .expect("descriptor");
    } else {
        for (i, d) in descs.iter().enumerate() {
            mock.desc_table().store(i as u16, *d).expect("descriptor");
        }
    }
    make_available(mock, 0, 0);
}

fn well_formed(u: &mut Unstructured<'_>) -> ArbResult<()> {
    let mut payload = Vec::<u8>::arbitrary(u)?;
    payload.truncate(0x2000);
    let hdr = header(u, payload.len() as u32)?;
    let mut bytes = hdr.encode().to_vec();
    bytes.extend_from_slice(&payload);
    let segs = segments(u, bytes.len())?;
    let indirect = bool::arbitrary(u)?;

    // TX: the driver's bytes come back as the packet.
    let mem = memory();
    let (mock, mut q) = queue(&mem, 0, 0x400);
    let mut at = 0;
    for &(addr, len) in &segs {
        mem.write_slice(&bytes[at..at + len as usize], GuestAddress(addr))
            .expect("segment");
        at += len as usize;
    }
    store_chain(&mock, &mem, &segs, 0, indirect);
    let chain = q.pop_descriptor_chain(&mem).expect("a chain");
    let pkt = read_tx(chain, &mem).expect("a well-formed TX chain");
    assert_eq!((pkt.hdr, &pkt.data[..]), (hdr, &payload[..]));

    // RX: the packet lands in the driver's buffers, in order.
    let mem = memory();
    let (mock, mut q) = queue(&mem, 0, 0x400);
    store_chain(&mock, &mem, &segs, VRING_DESC_F_WRITE as u16, indirect);
    let chain = q.pop_descriptor_chain(&mem).expect("a chain");
    let rx = RxBuffer::new(chain, &mem).expect("a well-formed RX chain");
    assert_eq!(rx.payload_room(), payload.len().min(MAX_PKT_DATA));
    let used = rx.write(&hdr, &payload).expect("fits");
    assert_eq!(used as usize, bytes.len());
    let mut back = Vec::new();
    for &(addr, len) in &segs {
        let mut part = vec![0u8; len as usize];
        mem.read_slice(&mut part, GuestAddress(addr))
            .expect("segment");
        back.extend_from_slice(&part);
    }
    assert_eq!(back, bytes);
    assert_eq!(Header::decode(&back), Ok(hdr));
    Ok(())
}

fn raw_chain(u: &mut Unstructured<'_>) -> ArbResult<()> {
    let mem = memory();
    // Arbitrary guest memory contents (the header, indirect tables, ...).
    let fill = Vec::<u8>::arbitrary(u)?;
    let fill_at = Addr::arbitrary(u)?.get();
    if flat(fill_at, fill.len() as u64).is_some() {
        mem.write_slice(&fill, GuestAddress(fill_at)).expect("fill");
    }
    let (mock, mut q) = queue(&mem, 0, 0x400);
    let n = u.int_in_range(1..=QSIZE)?;
    for i in 0..n {
        mock.desc_table()
            .store(i, RawDesc::arbitrary(u)?.raw())
            .expect("descriptor");
    }
    // Indirect tables written at the address a descriptor names.
    for _ in 0..u.int_in_range(0..=2)? {
        let at = Addr::arbitrary(u)?.get();
        let count = u.int_in_range(1..=8u64)?;
        if flat(at, 16 * count).is_some() {
            for i in 0..count {
                mem.write_obj(RawDesc::arbitrary(u)?.raw(), GuestAddress(at + 16 * i))
                    .expect("table");
            }
        }
    }
    let head = if u.ratio(1, 16)? {
        u16::arbitrary(u)?
    } else {
        u.int_in_range(0..=n - 1)?
    };
    make_available(&mock, 0, head);
    let tx = bool::arbitrary(u)?;
    let Some(chain) = q.pop_descriptor_chain(&mem) else {
        return Ok(());
    };
    let yielded: Vec<(u64, u32, bool)> = chain
        .clone()
        .map(|d| (d.addr().0, d.len(), d.is_write_only()))
        .collect();
    let before = snapshot(&mem);
    let in_memory = yielded.iter().all(|&(a, l, _)| flat_desc(a, l).is_some());
    let stream: Vec<u8> = if in_memory {
        yielded
            .iter()
            .flat_map(|&(a, l, _)| {
                let at = flat_desc(a, l).expect("in memory");
                before[at..at + l as usize].to_vec()
            })
            .collect()
    } else {
        Vec::new()
    };
    if tx {
        let result = read_tx(chain, &mem);
        assert!(snapshot(&mem) == before, "a TX read wrote guest memory");
        match result {
            Ok(pkt) => {
                assert!(in_memory && yielded.iter().all(|d| !d.2));
                assert_eq!(Header::decode(&stream), Ok(pkt.hdr));
                assert_eq!(pkt.data.len(), pkt.hdr.len as usize);
                assert_eq!(&stream[HDR_LEN..HDR_LEN + pkt.data.len()], &pkt.data[..]);
            }
            Err(ChainError::Empty) => assert!(yielded.is_empty()),
            Err(ChainError::WritableOnTx(i)) => {
                assert!(yielded[i].2 && yielded[..i].iter().all(|d| !d.2));
            }
            Err(ChainError::OutOfBounds) => assert!(!in_memory),
            Err(ChainError::ShortHeader(n)) => {
                assert!(in_memory && n == stream.len() && n < HDR_LEN)
            }
            Err(ChainError::LenOverCap(len)) => assert!(len as usize > MAX_PKT_DATA),
            Err(ChainError::LenBeyondChain { len, have }) => {
                assert_eq!(have, stream.len() - HDR_LEN);
                assert!(len as usize > have);
            }
            Err(other) => panic!("TX chain: {other}"),
        }
    } else {
        match RxBuffer::new(chain, &mem) {
            Ok(rx) => {
                assert!(in_memory && yielded.iter().all(|d| d.2));
                let room = rx.payload_room();
                assert_eq!(room, (stream.len() - HDR_LEN).min(MAX_PKT_DATA));
                let mut data = Vec::<u8>::arbitrary(u).unwrap_or_default();
                data.truncate(room);
                let hdr = header(u, data.len() as u32).unwrap_or(Header {
                    len: data.len() as u32,
                    ..Header::default()
                });
                let used = rx.write(&hdr, &data).expect("fits in room");
                assert_eq!(used as usize, HDR_LEN + data.len());
                // Exactly header + data over the yielded descriptors, in order; nothing else.
                let mut bytes = hdr.encode().to_vec();
                bytes.extend_from_slice(&data);
                let mut expected = before.clone();
                let mut pos = 0;
                for &(a, l, _) in &yielded {
                    let n = (l as usize).min(bytes.len() - pos);
                    let at = flat_desc(a, l).expect("in memory");
                    expected[at..at + n].copy_from_slice(&bytes[pos..pos + n]);
                    pos += n;
                }
                assert!(
                    snapshot(&mem) == expected,
                    "the RX write touched other bytes"
                );
            }
            Err(err) => {
                assert!(snapshot(&mem) == before, "a refused RX chain was written");
                match err {
                    ChainError::Empty => assert!(yielded.is_empty()),
                    ChainError::ReadOnlyOnRx(i) => {
                        assert!(!yielded[i].2 && yielded[..i].iter().all(|d| d.2));
                    }
                    ChainError::OutOfBounds => assert!(!in_memory),
                    ChainError::RxTooSmall(n) => {
                        assert!(in_memory && n == stream.len() && n < HDR_LEN)
                    }
                    other => panic!("RX chain: {other}"),
                }
            }
        }
    }
    Ok(())
}

/// The body of `vhost_chain`.
pub fn vhost_chain(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = if bool::arbitrary(&mut u).unwrap_or(false) {
        well_formed(&mut u)
    } else {
        raw_chain(&mut u)
    };
}

const RX_AT: u64 = 0;
const RX_USED: u64 = 0x400;
const TX_AT: u64 = 0x800;
const TX_USED: u64 = 0xc00;
/// Bytes of a used ring the device may write: flags, idx, the ring, avail_event.
const USED_LEN: u64 = 4 + 8 * QSIZE as u64 + 2;

fn read_used(mem: &Mem, used: u64) -> Vec<(u16, u32)> {
    let idx: u16 = mem.read_obj(GuestAddress(used + 2)).expect("used idx");
    (0..idx)
        .map(|i| {
            let at = GuestAddress(used + 4 + 8 * u64::from(i % QSIZE));
            let id: u32 = mem.read_obj(at).expect("used id");
            let len: u32 = mem.read_obj(GuestAddress(at.0 + 4)).expect("used len");
            (id as u16, len)
        })
        .collect()
}

/// The body of `vsock_device`.
pub fn vsock_device(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mem = memory();
    let (rx_mock, mut rx_q) = queue(&mem, RX_AT, RX_USED);
    let (tx_mock, mut tx_q) = queue(&mem, TX_AT, TX_USED);
    let mut dev = VsockDevice::new(
        DeviceConfig::new(GUEST_CID, "/nonexistent/fuzz-bus.sock".into(), 5000, None),
        None,
    )
    .expect("device");

    // TX: packets one descriptor each in region 1, or short raw chains.
    let mut tx_heads = Vec::new();
    let mut next_desc = 0u16;
    let mut at = R1;
    let _ = (|| -> ArbResult<()> {
        while next_desc < QSIZE && !u.is_empty() && u.ratio(7, 8)? {
            let head = next_desc;
            if u.ratio(3, 4)? {
                let mut payload = Vec::<u8>::arbitrary(&mut u)?;
                payload.truncate(512);
                let lie = if u.ratio(1, 8)? {
                    u32::arbitrary(&mut u)?
                } else {
                    payload.len() as u32
                };
                let hdr = header(&mut u, lie)?;
                let mut bytes = hdr.encode().to_vec();
                bytes.extend_from_slice(&payload);
                if at + bytes.len() as u64 > R1 + R1_LEN {
                    break;
                }
                mem.write_slice(&bytes, GuestAddress(at))
                    .expect("TX buffer");
                tx_mock
                    .desc_table()
                    .store(
                        head,
                        RawDescriptor::from(SplitDescriptor::new(at, bytes.len() as u32, 0, 0)),
                    )
                    .expect("descriptor");
                at += bytes.len() as u64;
                next_desc += 1;
            } else {
                let n = u.int_in_range(1..=3)?.min(QSIZE - next_desc);
                for i in 0..n {
                    let mut d = RawDesc::arbitrary(&mut u)?;
                    d.next %= QSIZE as u8;
                    tx_mock
                        .desc_table()
                        .store(head + i, d.raw())
                        .expect("descriptor");
                }
                next_desc += n;
            }
            make_available(&tx_mock, tx_heads.len() as u16, head);
            tx_heads.push(head);
        }
        Ok(())
    })();

    // RX: single writable buffers in region 0's scratch (apart from the TX bytes).
    let mut rx_bufs: Vec<(u16, u64, u32)> = Vec::new();
    let mut rx_at = SCRATCH0;
    let _ = (|| -> ArbResult<()> {
        while rx_bufs.len() < usize::from(QSIZE) && !u.is_empty() {
            let len = u32::from(u.int_in_range(0..=600u16)?);
            // Anywhere but over the rings: a driver that posts its own rings as a receive
            // buffer gets what it asked for, and no used ring left to check.
            let anywhere = Addr::arbitrary(&mut u)?.get();
            let over_rings = anywhere < SCRATCH0;
            let addr = if u.ratio(1, 8)? && !over_rings {
                anywhere
            } else {
                rx_at
            };
            let head = rx_bufs.len() as u16;
            rx_mock
                .desc_table()
                .store(
                    head,
                    RawDescriptor::from(SplitDescriptor::new(
                        addr,
                        len,
                        VRING_DESC_F_WRITE as u16,
                        0,
                    )),
                )
                .expect("descriptor");
            make_available(&rx_mock, head, head);
            rx_bufs.push((head, addr, len));
            rx_at = (rx_at + u64::from(len)).min(R0_LEN - 1);
        }
        Ok(())
    })();

    let before = snapshot(&mem);
    dev.process_tx(&mem, &mut tx_q);
    dev.process_rx(&mem, &mut rx_q);
    for _ in 0..4 {
        if dev.tx_can_resume() {
            dev.process_tx(&mem, &mut tx_q);
            dev.process_rx(&mem, &mut rx_q);
        }
    }

    let tx_used = read_used(&mem, TX_USED);
    let mut seen = std::collections::HashSet::new();
    for &(id, len) in &tx_used {
        assert_eq!(len, 0, "a TX chain used with a length");
        assert!(
            tx_heads.contains(&id) && seen.insert(id),
            "TX chain {id} used twice or unknown"
        );
    }
    if !dev.tx_deferred() {
        assert_eq!(tx_used.len(), tx_heads.len(), "every TX chain comes back");
    }
    let rx_used = read_used(&mem, RX_USED);
    let mut seen = std::collections::HashSet::new();
    let mut allowed: Vec<(u64, u64)> = vec![(RX_USED, USED_LEN), (TX_USED, USED_LEN)];
    for &(_, addr, len) in &rx_bufs {
        allowed.push((addr, u64::from(len)));
    }
    for &(id, used) in &rx_used {
        assert!(seen.insert(id), "RX chain {id} used twice");
        let &(_, addr, len) = rx_bufs.get(usize::from(id)).expect("a posted RX chain");
        assert!(used <= len, "RX used {used} of a {len}-byte buffer");
        // Only a buffer no other buffer overlaps still holds what the device wrote into it.
        let alone = rx_bufs.iter().all(|&(other, a, l)| {
            other == id
                || a >= addr.saturating_add(u64::from(len))
                || addr >= a.saturating_add(u64::from(l))
        });
        if used > 0 && alone {
            let mut bytes = vec![0u8; used as usize];
            mem.read_slice(&mut bytes, GuestAddress(addr))
                .expect("RX buffer");
            let hdr = Header::decode(&bytes).expect("an RX packet starts with a header");
            assert_eq!(HDR_LEN + hdr.len as usize, used as usize);
            assert!(hdr.op().is_some(), "RX op {}", hdr.op);
            assert_eq!(hdr.src_cid, HOST_CID);
        }
    }
    let after = snapshot(&mem);
    let mut untouched = before.clone();
    let mut now = after.clone();
    for (a, l) in allowed {
        if let Some(at) = flat(a, l) {
            untouched[at..at + l as usize].fill(0);
            now[at..at + l as usize].fill(0);
        }
    }
    assert!(
        untouched == now,
        "the device wrote guest memory outside RX buffers and used rings"
    );
}
