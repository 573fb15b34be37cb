//! Drive the whole daemon over its vhost-user socket with the `vhost` crate's frontend, the
//! way QEMU does: feature and config negotiation, a shared memory table, vrings with kick and
//! call eventfds — then a vsock connection through it, a VMM disconnect and a reconnect.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use common::*;
use vhost_vsock::muxer::DeviceConfig;
use vhost_vsock::packet::{Op, HOST_CID};
use vhost_vsock::server::{bind_socket, Server, ServerConfig, ServerError, Shutdown};

/// Where the "VMM" pretends guest memory is mapped in its address space; vring addresses are
/// given in that space and the backend translates them through the memory table.
const VMM_VA: u64 = 0x7f00_0000_0000;

fn start_server(
    dir: &TempDir,
    once: bool,
) -> (PathBuf, Arc<Shutdown>, JoinHandle<Result<(), ServerError>>) {
    let socket = dir.path("run/vhost-vsock.sock");
    let cfg = ServerConfig {
        socket: socket.clone(),
        once,
        device: DeviceConfig::new(GUEST_CID, dir.path("bus.sock"), 5000, None),
    };
    // Bound before the thread starts, so connecting cannot race the listen.
    let server = Server::bind(cfg).unwrap();
    let shutdown = Shutdown::new().unwrap();
    let s = shutdown.clone();
    let handle = std::thread::spawn(move || server.run(&s));
    (socket, shutdown, handle)
}

fn negotiate(frontend: &mut Frontend) -> u64 {
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    for bit in [32, 29, 28, 30] {
        assert_ne!(features & (1 << bit), 0, "feature bit {bit}");
    }
    frontend.set_features(features).unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    assert!(protocol.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
    frontend
        .set_protocol_features(
            protocol & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ),
        )
        .unwrap();
    assert_eq!(frontend.get_queue_num().unwrap(), 3);
    let (_, config) = frontend
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .unwrap();
    u64::from_le_bytes(config.as_slice().try_into().unwrap())
}

struct Rings {
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
}

/// Memory table and the RX/TX vrings, as QEMU sets them up.
fn setup_rings(frontend: &mut Frontend, mem_file: &File, guest: &Guest) -> Rings {
    frontend
        .set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: VMM_VA,
            mmap_offset: 0,
            mmap_handle: mem_file.as_raw_fd(),
        }])
        .unwrap();
    let mut kicks = Vec::new();
    let mut calls = Vec::new();
    for (index, ring) in [&guest.rx, &guest.tx].into_iter().enumerate() {
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        frontend.set_vring_num(index, QSIZE).unwrap();
        frontend.set_vring_base(index, 0).unwrap();
        frontend
            .set_vring_addr(
                index,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: VMM_VA + ring.mock.desc_table_addr().0,
                    used_ring_addr: VMM_VA + ring.used_addr.0,
                    avail_ring_addr: VMM_VA + ring.mock.avail_addr().0,
                    log_addr: None,
                },
            )
            .unwrap();
        frontend.set_vring_kick(index, &kick).unwrap();
        frontend.set_vring_call(index, &call).unwrap();
        frontend.set_vring_enable(index, true).unwrap();
        kicks.push(kick);
        calls.push(call);
    }
    Rings { kicks, calls }
}

/// Wait until the device used a buffer of `ring`, sleeping on its call eventfd the way a
/// driver with EVENT_IDX does: arm `used_event`, re-check, then wait for the interrupt.
fn wait_used(ring: &Ring, call: &EventFd) {
    loop {
        ring.arm_used_event();
        if ring.has_new_used() {
            return;
        }
        assert!(
            wait_readable(call.as_raw_fd(), DEADLINE.as_millis() as i32),
            "no used-buffer notification within {DEADLINE:?}"
        );
        let _ = call.read();
    }
}

#[test]
fn vmm_session_carries_a_connection_and_reconnects() {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = TempDir::new("vu");
    let bus = UnixListener::bind(dir.path("bus.sock")).unwrap();
    let (socket, shutdown, server) = start_server(&dir, false);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let mem_path = dir.path("guest-ram");
    let mem_file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&mem_path)
        .unwrap();
    mem_file.set_len(MEM_SIZE as u64).unwrap();
    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(mem_file.try_clone().unwrap(), 0)),
    )])
    .unwrap();

    let mut frontend = Frontend::connect(&socket, 3).unwrap();
    assert_eq!(negotiate(&mut frontend), GUEST_CID);
    let mut guest = Guest::new(&mem);
    let rings = setup_rings(&mut frontend, &mem_file, &guest);

    guest.post_rx(8, 4096);
    rings.kicks[0].write(1).unwrap();
    guest.send(&Guest::hdr(Op::Request, 50000, 5000, 0), &[], Layout::One);
    rings.kicks[1].write(1).unwrap();
    wait_used(&guest.rx, &rings.calls[0]);
    let rx = guest.take_rx();
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].hdr.op(), Some(Op::Response));
    assert_eq!(
        (rx[0].hdr.src_cid, rx[0].hdr.dst_cid),
        (HOST_CID, GUEST_CID)
    );
    let mut peer = accept(&bus);
    wait_used(&guest.tx, &rings.calls[1]);
    assert_eq!(guest.tx.take_used(), vec![(0, 0)]);

    // Host → guest goes through the host-socket event of the worker.
    peer.write_all(b"from the host").unwrap();
    wait_used(&guest.rx, &rings.calls[0]);
    let rx = guest.take_rx();
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].data, b"from the host");

    // Guest → host.
    guest.send(
        &Guest::hdr(Op::Rw, 50000, 5000, 9),
        b"the guest",
        Layout::Two,
    );
    rings.kicks[1].write(1).unwrap();
    let mut buf = [0u8; 9];
    peer.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"the guest");
    wait_used(&guest.tx, &rings.calls[1]);
    assert_eq!(guest.tx.take_used().len(), 1);

    // The guest driver resets the device: QEMU stops the rings (GET_VRING_BASE) and starts
    // them again from index 0. The guest forgot its connections, so the device drops them.
    frontend.get_vring_base(0).unwrap();
    frontend.get_vring_base(1).unwrap();
    let mut guest = Guest::new(&mem);
    let rings = setup_rings(&mut frontend, &mem_file, &guest);
    let mut rest = Vec::new();
    peer.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // The new driver can connect again.
    guest.post_rx(8, 4096);
    rings.kicks[0].write(1).unwrap();
    guest.send(&Guest::hdr(Op::Request, 50001, 5000, 0), &[], Layout::One);
    rings.kicks[1].write(1).unwrap();
    wait_used(&guest.rx, &rings.calls[0]);
    assert_eq!(guest.take_rx()[0].hdr.op(), Some(Op::Response));
    let mut peer = accept(&bus);

    // The VMM goes away: the connection's host socket is closed.
    drop(frontend);
    let mut rest = Vec::new();
    peer.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // A new VMM is served by a fresh device.
    let mut frontend = Frontend::connect(&socket, 3).unwrap();
    assert_eq!(negotiate(&mut frontend), GUEST_CID);
    drop(frontend);

    shutdown.trigger();
    server.join().unwrap().unwrap();
    assert!(!socket.exists(), "the socket is removed on exit");
}

#[test]
fn once_exits_after_the_first_vmm() {
    let dir = TempDir::new("vu-once");
    let (socket, _shutdown, server) = start_server(&dir, true);
    let mut frontend = Frontend::connect(&socket, 3).unwrap();
    assert_eq!(negotiate(&mut frontend), GUEST_CID);
    drop(frontend);
    server.join().unwrap().unwrap();
    assert!(!socket.exists());
}

#[test]
fn shutdown_while_waiting_for_a_vmm() {
    let dir = TempDir::new("vu-idle");
    let (_socket, shutdown, server) = start_server(&dir, false);
    shutdown.trigger();
    server.join().unwrap().unwrap();
}

#[test]
fn shutdown_while_a_vmm_is_connected() {
    let dir = TempDir::new("vu-busy");
    let (socket, shutdown, server) = start_server(&dir, false);
    let mut frontend = Frontend::connect(&socket, 3).unwrap();
    assert_eq!(negotiate(&mut frontend), GUEST_CID);
    shutdown.trigger();
    server.join().unwrap().unwrap();
    drop(frontend);
}

#[test]
fn socket_preparation() {
    let dir = TempDir::new("bind");
    // Parent directories are created and the socket is 0600.
    let path = dir.path("a/b/c.sock");
    let first = bind_socket(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A stale socket is replaced.
    drop(first);
    assert!(path.exists());
    let _second = bind_socket(&path).unwrap();
    // Anything else is left alone.
    let file = dir.path("plain");
    std::fs::write(&file, b"keep").unwrap();
    assert!(matches!(
        bind_socket(&file),
        Err(ServerError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
}
