//! Drive the device from the driver side: guest memory, split virtqueues written the way a
//! driver writes them (`virtio_queue::mock::MockSplitQueue`), and real Unix sockets on the
//! host side. No sleeps: host-side progress is awaited with poll(2) on the device's epoll fd
//! (with a generous deadline that only matters when a test is failing).

mod common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use common::*;
use vhost_vsock::device::VsockDevice;
use vhost_vsock::muxer::DeviceConfig;
use vhost_vsock::packet::{
    Header, Op, HDR_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

// ---- tests -----------------------------------------------------------------------------

#[test]
fn guest_connects_to_the_bus_and_bytes_flow_both_ways() {
    let BusRig {
        dir: _dir,
        bus,
        mut guest,
        mut dev,
        ..
    } = BusRig::new("flow");
    guest.post_rx(16, 4096);

    let mut peer = open_bus_connection(&mut dev, &mut guest, &bus, 40000, 64 * 1024);
    assert_eq!(dev.connection_count(), 1);

    // Guest → host, in each descriptor layout.
    for (i, layout) in [
        Layout::One,
        Layout::Two,
        Layout::SplitHeader,
        Layout::Indirect,
    ]
    .into_iter()
    .enumerate()
    {
        let msg = format!("hello {i} {layout:?}");
        guest.send(
            &Guest::hdr(Op::Rw, 40000, 5000, msg.len() as u32),
            msg.as_bytes(),
            layout,
        );
        guest.kick_tx(&mut dev);
        assert_eq!(
            read_exactly(&mut peer, msg.len()),
            msg.as_bytes(),
            "{layout:?}"
        );
    }
    assert_eq!(
        guest
            .tx
            .take_used()
            .iter()
            .filter(|(_, len)| *len != 0)
            .count(),
        0
    );

    // Host → guest.
    peer.write_all(b"world").unwrap();
    let mut got = Vec::new();
    until(&mut dev, &mut guest, &mut got, |p| !p.is_empty());
    assert_eq!(ops(&got), vec![Op::Rw]);
    assert_eq!(got[0].data, b"world");
    assert_eq!((got[0].hdr.src_port, got[0].hdr.dst_port), (5000, 40000));
    assert_eq!(dev.stats().malformed_tx, 0);
}

#[test]
fn rx_payload_is_split_into_small_and_two_descriptor_buffers() {
    let BusRig {
        dir: _dir,
        bus,
        mut guest,
        mut dev,
        ..
    } = BusRig::new("rxsplit");
    guest.post_rx(1, 4096);
    let mut peer = open_bus_connection(&mut dev, &mut guest, &bus, 40001, 64 * 1024);

    // One 44+100 buffer and one header/payload pair with 50 bytes of payload room.
    guest.post_rx(1, HDR_LEN as u32 + 100);
    guest.post_rx_split(50);
    guest.post_rx(4, 4096);
    let payload: Vec<u8> = (0..400u32).map(|i| i as u8).collect();
    peer.write_all(&payload).unwrap();
    let mut got = Vec::new();
    until(&mut dev, &mut guest, &mut got, |p| {
        p.iter().map(|x| x.data.len()).sum::<usize>() >= 400
    });
    let sizes: Vec<usize> = got.iter().map(|p| p.data.len()).collect();
    assert_eq!(&sizes[..2], &[100, 50]);
    let all: Vec<u8> = got.iter().flat_map(|p| p.data.clone()).collect();
    assert_eq!(all, payload);
}

#[test]
fn host_data_respects_guest_credit_and_back_pressures_the_socket() {
    let BusRig {
        dir: _dir,
        bus,
        mut guest,
        mut dev,
        ..
    } = BusRig::new("credit");
    guest.post_rx(64, 4096);
    let mut peer = open_bus_connection(&mut dev, &mut guest, &bus, 40002, 1000);

    // The host writes until its socket is full. The device must not drain it beyond the
    // guest's 1000-byte window, so the writer eventually gets EWOULDBLOCK.
    peer.set_nonblocking(true).unwrap();
    let mut written = 0usize;
    let chunk = vec![0x5au8; 64 * 1024];
    let mut got = Vec::new();
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(
            rounds < 10_000,
            "the device keeps reading a socket it has no credit for"
        );
        match peer.write(&chunk) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // Let the device react to what is there; if it read everything it would
                // have room again.
                if host_pending(&dev) {
                    host_event(&mut dev, &mut guest);
                    got.extend(guest.take_rx());
                    continue;
                }
                break;
            }
            Err(e) => panic!("{e}"),
        }
        assert!(
            written < 64 * 1024 * 1024,
            "the device drained the host socket without credit"
        );
        if host_pending(&dev) {
            host_event(&mut dev, &mut guest);
            got.extend(guest.take_rx());
        }
    }
    got.extend(guest.take_rx());
    let delivered: usize = got
        .iter()
        .filter(|p| p.hdr.op() == Some(Op::Rw))
        .map(|p| p.data.len())
        .sum();
    assert_eq!(delivered, 1000, "exactly the window");
    assert_eq!(
        ops(&got).last(),
        Some(&Op::CreditRequest),
        "asks for credit when stalled"
    );
    assert_eq!(
        ops(&got)
            .iter()
            .filter(|o| **o == Op::CreditRequest)
            .count(),
        1
    );
    assert!(!host_pending(&dev), "a stalled connection is not polled");

    // The guest consumed 600 bytes: exactly 600 more arrive.
    let mut upd = Guest::hdr(Op::CreditUpdate, 40002, 5000, 0);
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 600;
    guest.send(&upd, &[], Layout::One);
    guest.kick_tx(&mut dev);
    let mut more = Vec::new();
    until(&mut dev, &mut guest, &mut more, |p| {
        p.iter()
            .filter(|x| x.hdr.op() == Some(Op::Rw))
            .map(|x| x.data.len())
            .sum::<usize>()
            >= 600
    });
    for _ in 0..100 {
        if !host_pending(&dev) {
            break;
        }
        host_event(&mut dev, &mut guest);
        more.extend(guest.take_rx());
    }
    assert!(!host_pending(&dev), "stalled again, not polled");
    let delivered: usize = more
        .iter()
        .filter(|p| p.hdr.op() == Some(Op::Rw))
        .map(|p| p.data.len())
        .sum();
    assert_eq!(delivered, 600);
}

#[test]
fn guest_credit_request_gets_a_credit_update() {
    let BusRig {
        dir: _dir,
        bus,
        mut guest,
        mut dev,
        ..
    } = BusRig::new("creditreq");
    guest.post_rx(4, 4096);
    let mut peer = open_bus_connection(&mut dev, &mut guest, &bus, 40003, 64 * 1024);
    guest.send(&Guest::hdr(Op::Rw, 40003, 5000, 3), b"abc", Layout::Two);
    guest.send(
        &Guest::hdr(Op::CreditRequest, 40003, 5000, 0),
        &[],
        Layout::One,
    );
    guest.kick_tx(&mut dev);
    assert_eq!(read_exactly(&mut peer, 3), b"abc");
    let rx = guest.take_rx();
    assert_eq!(ops(&rx), vec![Op::CreditUpdate]);
    assert_eq!((rx[0].hdr.buf_alloc, rx[0].hdr.fwd_cnt), (256 * 1024, 3));
}

#[test]
fn guest_overrunning_our_buffer_is_reset() {
    let dir = TempDir::new("overrun");
    let bus_path = dir.path("bus.sock");
    let bus = UnixListener::bind(&bus_path).unwrap();
    let mem = memory();
    let mut guest = Guest::new(&mem);
    let mut cfg = DeviceConfig::new(GUEST_CID, bus_path.clone(), 5000, None);
    cfg.buf_alloc = 8192;
    let mut dev = VsockDevice::new(cfg, None).unwrap();
    guest.post_rx(8, 4096);
    let mut req = Guest::hdr(Op::Request, 40004, 5000, 0);
    req.buf_alloc = 4096;
    guest.send(&req, &[], Layout::One);
    guest.kick_tx(&mut dev);
    let peer = accept(&bus);
    assert_eq!(ops(&guest.take_rx()), vec![Op::Response]);

    // The host never reads, so once its socket is full our buffer fills; a guest that keeps
    // sending regardless of credit must be reset, not buffered without bound.
    let data = vec![1u8; 4096];
    let mut rst = None;
    for _ in 0..10_000 {
        guest.send(&Guest::hdr(Op::Rw, 40004, 5000, 4096), &data, Layout::One);
        guest.kick_tx(&mut dev);
        guest.tx.take_used();
        let got = guest.take_rx();
        guest.post_rx(got.len(), 4096);
        if let Some(p) = got.into_iter().find(|p| p.hdr.op() == Some(Op::Rst)) {
            rst = Some(p);
            break;
        }
    }
    let rst = rst.expect("no RST for an overrunning guest");
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (5000, 40004));
    assert_eq!(dev.stats().overruns, 1);
    assert_eq!(dev.connection_count(), 0);
    // The host side was closed: after what was buffered, EOF.
    let mut peer = peer;
    peer.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut sink = Vec::new();
    peer.read_to_end(&mut sink).unwrap();
    assert!(sink.iter().all(|&b| b == 1));
}

#[test]
fn shutdown_from_the_guest_then_host_close_ends_with_rst() {
    let BusRig {
        dir: _dir,
        bus,
        mut guest,
        mut dev,
        ..
    } = BusRig::new("shut1");
    guest.post_rx(8, 4096);
    let mut peer = open_bus_connection(&mut dev, &mut guest, &bus, 40005, 64 * 1024);

    guest.send(&Guest::hdr(Op::Rw, 40005, 5000, 4), b"last", Layout::One);
    let mut shut = Guest::hdr(Op::Shutdown, 40005, 5000, 0);
    shut.flags = SHUTDOWN_SEND;
    guest.send(&shut, &[], Layout::One);
    guest.kick_tx(&mut dev);
    // The data, then EOF: shutdown(Write) on the host socket.
    assert_eq!(read_exactly(&mut peer, 4), b"last");
    assert_eof(&mut peer);
    assert_eq!(dev.connection_count(), 1, "host → guest still open");

    // The host answers and closes.
    peer.write_all(b"reply").unwrap();
    drop(peer);
    let mut got = Vec::new();
    until(&mut dev, &mut guest, &mut got, |p| {
        p.iter().any(|x| x.hdr.op() == Some(Op::Rst))
    });
    assert_eq!(ops(&got), vec![Op::Rw, Op::Shutdown, Op::Rst]);
    assert_eq!(got[0].data, b"reply");
    assert_eq!(got[1].hdr.flags, SHUTDOWN_SEND);
    assert_eq!(dev.connection_count(), 0);
}

#[test]
fn host_eof_then_guest_full_shutdown_ends_with_rst() {
    let BusRig {
        dir: _dir,
        bus,
        mut guest,
        mut dev,
        ..
    } = BusRig::new("shut2");
    guest.post_rx(8, 4096);
    let mut peer = open_bus_connection(&mut dev, &mut guest, &bus, 40006, 64 * 1024);

    peer.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    until(&mut dev, &mut guest, &mut got, |p| !p.is_empty());
    assert_eq!(ops(&got), vec![Op::Shutdown]);
    assert_eq!(got[0].hdr.flags, SHUTDOWN_SEND);
    assert_eq!(dev.connection_count(), 1);

    guest.send(&Guest::hdr(Op::Rw, 40006, 5000, 3), b"bye", Layout::One);
    let mut shut = Guest::hdr(Op::Shutdown, 40006, 5000, 0);
    shut.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    guest.send(&shut, &[], Layout::One);
    guest.kick_tx(&mut dev);
    assert_eq!(ops(&guest.take_rx()), vec![Op::Rst]);
    assert_eq!(dev.connection_count(), 0);
    assert_eq!(read_exactly(&mut peer, 3), b"bye");
    assert_eof(&mut peer);
}

#[test]
fn guest_rst_closes_the_host_socket_at_once() {
    let BusRig {
        dir: _dir,
        bus,
        mut guest,
        mut dev,
        ..
    } = BusRig::new("rst");
    guest.post_rx(4, 4096);
    let mut peer = open_bus_connection(&mut dev, &mut guest, &bus, 40007, 64 * 1024);
    guest.send(&Guest::hdr(Op::Rst, 40007, 5000, 0), &[], Layout::One);
    guest.kick_tx(&mut dev);
    assert_eof(&mut peer);
    assert_eq!(dev.connection_count(), 0);
    assert!(guest.take_rx().is_empty(), "no answer to an RST");
    assert_eq!(dev.stats().resets_received, 1);
    // A late packet for it is now unknown: RST.
    guest.send(
        &Guest::hdr(Op::CreditUpdate, 40007, 5000, 0),
        &[],
        Layout::One,
    );
    guest.send(&Guest::hdr(Op::Rst, 40007, 5000, 0), &[], Layout::One);
    guest.kick_tx(&mut dev);
    assert_eq!(ops(&guest.take_rx()), vec![Op::Rst]);
}

#[test]
fn requests_without_a_route_or_listener_are_refused() {
    let dir = TempDir::new("refuse");
    let bus_path = dir.path("bus.sock"); // nobody listens
    let mem = memory();
    let mut guest = Guest::new(&mem);
    let mut dev = device(&bus_path, None, None);
    guest.post_rx(4, 4096);
    guest.send(&Guest::hdr(Op::Request, 41000, 5000, 0), &[], Layout::One);
    guest.send(&Guest::hdr(Op::Request, 41001, 6000, 0), &[], Layout::One);
    guest.kick_tx(&mut dev);
    let rx = guest.take_rx();
    assert_eq!(ops(&rx), vec![Op::Rst, Op::Rst]);
    assert_eq!((rx[0].hdr.src_port, rx[0].hdr.dst_port), (5000, 41000));
    assert_eq!((rx[1].hdr.src_port, rx[1].hdr.dst_port), (6000, 41001));
    assert_eq!(dev.stats().refused, 2);
    assert_eq!(dev.connection_count(), 0);
}

#[test]
fn other_ports_use_the_hybrid_uds_convention() {
    let dir = TempDir::new("hybrid");
    let base = dir.path("v.sock");
    let svc = UnixListener::bind(dir.path("v.sock_6000")).unwrap();
    let mem = memory();
    let mut guest = Guest::new(&mem);
    let mut dev = device(&dir.path("bus.sock"), Some(base), None);
    guest.post_rx(4, 4096);
    guest.send(&Guest::hdr(Op::Request, 41002, 6000, 0), &[], Layout::One);
    guest.send(&Guest::hdr(Op::Request, 41003, 6001, 0), &[], Layout::One);
    guest.kick_tx(&mut dev);
    let mut peer = accept(&svc);
    let rx = guest.take_rx();
    let by_port: HashMap<u32, Op> = rx
        .iter()
        .map(|p| (p.hdr.dst_port, p.hdr.op().unwrap()))
        .collect();
    assert_eq!(
        by_port,
        HashMap::from([(41002, Op::Response), (41003, Op::Rst)])
    );
    guest.send(&Guest::hdr(Op::Rw, 41002, 6000, 2), b"hi", Layout::One);
    guest.kick_tx(&mut dev);
    assert_eq!(read_exactly(&mut peer, 2), b"hi");
}

#[test]
fn host_clients_connect_to_guest_ports() {
    let dir = TempDir::new("hostinit");
    let base = dir.path("v.sock");
    let listener = UnixListener::bind(&base).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mem = memory();
    let mut guest = Guest::new(&mem);
    let mut dev = device(&dir.path("bus.sock"), Some(base.clone()), Some(listener));
    guest.post_rx(8, 4096);

    // Accepted by the guest.
    let mut client = UnixStream::connect(&base).unwrap();
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    client.write_all(b"CONNECT 7000\nearly").unwrap();
    let mut got = Vec::new();
    until(&mut dev, &mut guest, &mut got, |p| !p.is_empty());
    assert_eq!(ops(&got), vec![Op::Request]);
    let req = got[0].hdr;
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port),
        (HOST_CID, GUEST_CID, 7000)
    );
    assert!(req.src_port >= 49152);
    let local = req.src_port;
    let mut resp = Guest::hdr(Op::Response, 7000, local, 0);
    resp.buf_alloc = 4096;
    guest.send(&resp, &[], Layout::One);
    guest.kick_tx(&mut dev);
    let mut line = Vec::new();
    while !line.ends_with(b"\n") {
        line.extend(read_exactly(&mut client, 1));
    }
    assert_eq!(line, format!("OK {local}\n").into_bytes());
    // The bytes after the command line are the first payload.
    let rx = guest.take_rx();
    assert_eq!(ops(&rx), vec![Op::Rw]);
    assert_eq!(rx[0].data, b"early");
    guest.send(&Guest::hdr(Op::Rw, 7000, local, 4), b"pong", Layout::One);
    guest.kick_tx(&mut dev);
    assert_eq!(read_exactly(&mut client, 4), b"pong");

    // Refused by the guest: the client is closed.
    let mut refused = UnixStream::connect(&base).unwrap();
    refused.set_read_timeout(Some(DEADLINE)).unwrap();
    refused.write_all(b"CONNECT 7001\n").unwrap();
    let mut got = Vec::new();
    until(&mut dev, &mut guest, &mut got, |p| !p.is_empty());
    assert_eq!(ops(&got), vec![Op::Request]);
    let port2 = got[0].hdr.src_port;
    assert_ne!(port2, local);
    guest.send(&Guest::hdr(Op::Rst, 7001, port2, 0), &[], Layout::One);
    guest.kick_tx(&mut dev);
    assert_eof(&mut refused);

    // A bad command: closed and counted.
    let mut bad = UnixStream::connect(&base).unwrap();
    bad.set_read_timeout(Some(DEADLINE)).unwrap();
    bad.write_all(b"HELLO\n").unwrap();
    host_event(&mut dev, &mut guest);
    assert_eof(&mut bad);
    assert_eq!(dev.stats().bad_host_commands, 1);
    assert_eq!(dev.connection_count(), 1);
}

#[test]
fn malformed_tx_chains_are_counted_returned_and_harmless() {
    let BusRig {
        dir: _dir,
        bus,
        mem,
        mut guest,
        mut dev,
        ..
    } = BusRig::new("badtx");
    guest.post_rx(4, 4096);

    let scratch = SCRATCH;
    let good = Guest::hdr(Op::Rw, 1, 5000, 100).encode();
    mem.write_slice(&good, GuestAddress(scratch)).unwrap();
    let mut big = Guest::hdr(Op::Rw, 1, 5000, 0);
    big.len = 70_000;
    mem.write_slice(&big.encode(), GuestAddress(scratch + 0x1000))
        .unwrap();
    let cases: Vec<Vec<(u64, u32, u16)>> = vec![
        // Header shorter than 44 bytes.
        vec![(scratch, 20, 0)],
        // Outside guest memory.
        vec![(0xffff_0000_0000, 64, 0)],
        // Straddling the end of guest memory.
        vec![(MEM_SIZE as u64 - 10, 64, 0)],
        // Device-writable descriptor on TX.
        vec![(scratch, 44, VRING_DESC_F_WRITE as u16)],
        vec![
            (scratch, 44, 0),
            (scratch + 44, 100, VRING_DESC_F_WRITE as u16),
        ],
        // len 100 but no payload in the chain.
        vec![(scratch, 44, 0)],
        // len beyond the 64 KiB cap.
        vec![
            (scratch + 0x1000, 44, 0),
            (scratch + 0x2000, 0x1_2000 - 0x2000, 0),
        ],
    ];
    let mut heads = Vec::new();
    for case in &cases {
        heads.push(guest.send_raw(case));
    }
    guest.kick_tx(&mut dev);
    let used = guest.tx.take_used();
    assert_eq!(
        used,
        heads.iter().map(|&h| (h, 0)).collect::<Vec<_>>(),
        "all returned, len 0"
    );
    assert_eq!(dev.stats().malformed_tx, cases.len() as u64);
    assert!(guest.take_rx().is_empty());

    // The device still works.
    let _peer = open_bus_connection(&mut dev, &mut guest, &bus, 42000, 64 * 1024);
}

#[test]
fn malformed_rx_chains_are_counted_returned_and_skipped() {
    let dir = TempDir::new("badrx");
    let bus_path = dir.path("bus.sock");
    let mem = memory();
    let mut guest = Guest::new(&mem);
    let mut dev = device(&bus_path, None, None);
    let scratch = SCRATCH;
    let bad = [
        guest.rx.add_chain(&[(scratch, 4096, 0)]),
        guest
            .rx
            .add_chain(&[(0xffff_0000_0000, 4096, VRING_DESC_F_WRITE as u16)]),
        guest
            .rx
            .add_chain(&[(scratch, 10, VRING_DESC_F_WRITE as u16)]),
        guest.rx.add_chain(&[
            (scratch, 44, VRING_DESC_F_WRITE as u16),
            (scratch + 0x1000, 100, 0),
        ]),
    ];
    guest.post_rx(1, 4096);
    // A refused request produces an RST, which must land in the good buffer.
    guest.send(&Guest::hdr(Op::Request, 43000, 5000, 0), &[], Layout::One);
    guest.kick_tx(&mut dev);
    let used = guest.rx.take_used();
    assert_eq!(used.len(), 5);
    for (i, head) in bad.iter().enumerate() {
        assert_eq!(used[i], (*head, 0));
    }
    assert_eq!(used[4].1, HDR_LEN as u32);
    assert_eq!(dev.stats().malformed_rx, 4);
    // Re-read the good packet through the ring bookkeeping.
    let good_head = used[4].0;
    let (addr, _) = guest.rx.chains[&good_head][0];
    let mut raw = [0u8; HDR_LEN];
    mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
    assert_eq!(Header::decode(&raw).unwrap().op(), Some(Op::Rst));
}

#[test]
fn bad_addresses_and_types_are_dropped_or_reset() {
    let BusRig {
        dir: _dir,
        bus,
        mut guest,
        mut dev,
        ..
    } = BusRig::new("badaddr");
    guest.post_rx(4, 4096);
    let mut spoofed = Guest::hdr(Op::Request, 44000, 5000, 0);
    spoofed.src_cid = 4;
    let mut elsewhere = Guest::hdr(Op::Request, 44001, 5000, 0);
    elsewhere.dst_cid = 5;
    let mut seqpacket = Guest::hdr(Op::Request, 44002, 5000, 0);
    seqpacket.type_ = 2;
    let mut seq_rw = Guest::hdr(Op::Rw, 44003, 5000, 0);
    seq_rw.type_ = 2;
    for h in [spoofed, elsewhere, seqpacket, seq_rw] {
        guest.send(&h, &[], Layout::One);
    }
    guest.kick_tx(&mut dev);
    let rx = guest.take_rx();
    assert_eq!(
        ops(&rx),
        vec![Op::Rst],
        "only the unsupported-type REQUEST is answered"
    );
    assert_eq!((rx[0].hdr.dst_port, rx[0].hdr.type_), (44002, 2));
    assert_eq!(dev.stats().bad_cid, 2);
    assert_eq!(dev.stats().bad_type, 2);
    assert_eq!(dev.connection_count(), 0);
    listener_has_no_connection(&bus);
}

fn listener_has_no_connection(listener: &UnixListener) {
    listener.set_nonblocking(true).unwrap();
    assert!(matches!(listener.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock));
}

#[test]
fn replies_wait_for_rx_buffers_and_go_out_on_the_next_rx_kick() {
    let dir = TempDir::new("starve");
    let bus_path = dir.path("bus.sock");
    let bus = UnixListener::bind(&bus_path).unwrap();
    let mem = memory();
    let mut guest = Guest::new(&mem);
    guest.rx.queue.set_event_idx(true);
    guest.tx.queue.set_event_idx(true);
    let mut dev = device(&bus_path, None, None);
    guest.send(&Guest::hdr(Op::Request, 45000, 5000, 0), &[], Layout::One);
    guest.kick_tx(&mut dev);
    let _peer = accept(&bus);
    assert!(guest.take_rx().is_empty());
    // Starved with work pending: the device asked to be kicked on the next RX buffer
    // (avail_event, stored after the used ring, equals the next avail index).
    assert_eq!(guest.rx.avail_event(), 0);
    // TX re-enabled its notifications up to the packets it consumed.
    assert_eq!(guest.tx.avail_event(), 1);
    guest.post_rx(1, 4096);
    guest.kick_rx(&mut dev);
    assert_eq!(ops(&guest.take_rx()), vec![Op::Response]);
}

#[test]
fn device_reset_drops_every_connection() {
    let BusRig {
        dir: _dir,
        bus,
        mut guest,
        mut dev,
        ..
    } = BusRig::new("reset");
    guest.post_rx(4, 4096);
    let mut a = open_bus_connection(&mut dev, &mut guest, &bus, 46000, 4096);
    let mut b = open_bus_connection(&mut dev, &mut guest, &bus, 46001, 4096);
    assert_eq!(dev.reset(), 2);
    assert_eof(&mut a);
    assert_eof(&mut b);
    assert_eq!(dev.connection_count(), 0);
}

#[test]
fn garbage_tx_stream_never_panics() {
    let dir = TempDir::new("fuzz");
    let bus_path = dir.path("bus.sock");
    let _bus = UnixListener::bind(&bus_path).unwrap();
    let mem = memory();
    let mut guest = Guest::new(&mem);
    let mut dev = device(&bus_path, None, None);
    guest.post_rx(200, 4096);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let scratch = SCRATCH;
    for round in 0..2000u64 {
        let r = next();
        let mut bytes = [0u8; 128];
        for b in bytes.iter_mut() {
            *b = next() as u8;
        }
        // Keep many headers plausible so they get past the address checks.
        if r % 3 != 0 {
            let mut h = Header::decode(&bytes).unwrap();
            h.src_cid = GUEST_CID;
            h.dst_cid = HOST_CID;
            h.type_ = if r % 7 == 0 { 2 } else { TYPE_STREAM };
            h.dst_port = 5000 + (r as u32 % 3);
            h.src_port = r as u32 % 5;
            h.len = (next() % 200) as u32;
            bytes[..HDR_LEN].copy_from_slice(&h.encode());
        }
        let addr = scratch + (round % 16) * 0x100;
        mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        let len = (next() % 140) as u32;
        let flags = if r % 11 == 0 {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        guest.send_raw(&[(addr, len, flags)]);
        guest.kick_tx(&mut dev);
        guest.tx.take_used();
        let got = guest.take_rx().len();
        guest.post_rx(got, 4096);
    }
}
