//! Inputs the vhost fuzz targets found, as tests that fail (rather than hang) when the bug is
//! back: each runs on a thread of its own and must finish within a deadline.

use std::sync::mpsc;
use std::time::Duration;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use vhost_vsock::device::VsockDevice;
use vhost_vsock::muxer::DeviceConfig;
use vmbus_fuzz::vhost::{memory, queue};

const DEADLINE: Duration = Duration::from_secs(10);

fn finishes(name: &str, f: impl FnOnce() + Send + 'static) {
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = done.send(());
    });
    assert!(
        finished.recv_timeout(DEADLINE).is_ok(),
        "{name}: still running after {DEADLINE:?}"
    );
}

/// The driver's available index more than a queue ahead: virtio-queue refuses to pop from such
/// a ring while `enable_notification` keeps saying buffers arrived, and `process_tx` went round
/// for ever (found by `vsock_device`; fixed in vhost/src/device.rs, `spin_guard`).
#[test]
fn tx_with_an_avail_index_far_ahead_returns() {
    finishes("process_tx", || {
        let mem = memory();
        let (mock, mut tx) = queue(&mem, 0x800, 0xc00);
        mock.avail().idx().store(17);
        let mut dev = VsockDevice::new(
            DeviceConfig::new(3, "/nonexistent/fuzz-bus.sock".into(), 5000, None),
            None,
        )
        .expect("device");
        assert!(!dev.process_tx(&mem, &mut tx));
        assert!(tx.ready());
        let used_idx: u16 = mem.read_obj(GuestAddress(0xc02)).expect("used idx");
        assert_eq!(used_idx, 0);
    });
}

/// The same on RX, with a reply pending; the input `vsock_device` hung on (an RX packet
/// written over the rings moved the available index).
#[test]
fn rx_with_an_avail_index_far_ahead_returns() {
    let input = include_bytes!("../corpus/vsock_device/avail_index_far_ahead");
    finishes("vsock_device", || vmbus_fuzz::vsock_device(input));
}
