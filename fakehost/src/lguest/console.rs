//! The `console` instruction: what an era Guest kernel's virtio console does over lguest's
//! device page (drivers/lguest/lguest_device.c and drivers/virtio/virtio_ring.c of 3.x;
//! spec lguest.md §2, §5, §7).
//!
//! The first `console` probes: it finds the console (virtio id 3) among the descriptors of
//! the device page at gpa `mem`, accepts no features, writes status ACKNOWLEDGE|DRIVER and
//! NOTIFYs the descriptor's address (the status notify that makes the v3.10 Launcher start the
//! device and attach an eventfd to each virtqueue), then writes DRIVER_OK without a notify,
//! as lguest_device.c does. Every `console` then queues its text as one buffer on the output
//! virtqueue (vq 1), kicks it (NOTIFY of the vring's address, which the eventfd takes) and
//! waits until the Launcher's output process has used it: used.idx moves, and the vq's
//! interrupt comes.
//!
//! The layouts are plain functions ([`scan`], [`VringLayout`]) so they can be checked against
//! a device page built as §7 describes.

use std::time::{Duration, Instant};

use vmbus::lguest::PAGE_SIZE;

use super::guest::{Guest, Stop};
use super::report::GuestState;

/// virtio device id of the console.
pub const VIRTIO_ID_CONSOLE: u8 = 3;
/// VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER.
pub const STATUS_DRIVER: u8 = 0x03;
/// ... | VIRTIO_CONFIG_S_DRIVER_OK.
pub const STATUS_DRIVER_OK: u8 = 0x07;
/// How long the Launcher has to consume one console buffer.
pub const CONSUME_TIMEOUT: Duration = Duration::from_secs(10);
/// `LGUEST_VRING_ALIGN`.
pub const VRING_ALIGN: u64 = 4096;
/// How often a console whose interrupt cannot be raised (irq ≥ 32) looks at used.idx.
const POLL: Duration = Duration::from_millis(10);

/// `struct lguest_vqconfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VqConfig {
    /// Ring entries.
    pub num: u16,
    /// Its interrupt.
    pub irq: u16,
    /// Guest-physical page of the vring.
    pub pfn: u32,
}

/// One `struct lguest_device_desc` of the device page, with its offset in the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDesc {
    /// Offset in the page.
    pub offset: usize,
    /// virtio device id.
    pub ty: u8,
    /// Bytes per feature bitmap.
    pub feature_len: u8,
    /// Bytes of config.
    pub config_len: u8,
    /// Its status byte.
    pub status: u8,
    /// Its virtqueues.
    pub vqs: Vec<VqConfig>,
}

impl DeviceDesc {
    /// 5 + 8·num_vq + 2·feature_len + config_len.
    pub fn size(&self) -> usize {
        5 + 8 * self.vqs.len() + 2 * usize::from(self.feature_len) + usize::from(self.config_len)
    }

    /// Offset (in the descriptor) of the Guest-accepted feature bitmap.
    pub fn accepted_features(&self) -> usize {
        5 + 8 * self.vqs.len() + usize::from(self.feature_len)
    }
}

/// The descriptors of a device page, from offset 0 until type 0, the end of the page or a
/// descriptor that does not fit in it (as lguest_device.c's scan, which trusts the
/// Launcher; we stop instead of reading past the page).
pub fn scan(page: &[u8]) -> Vec<DeviceDesc> {
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(head) = page.get(at..at + 5) {
        let (ty, num_vq, feature_len, config_len, status) =
            (head[0], head[1], head[2], head[3], head[4]);
        if ty == 0 {
            break;
        }
        let vqs_bytes = usize::from(num_vq) * 8;
        let Some(vq_page) = page.get(at + 5..at + 5 + vqs_bytes) else {
            log::warn!("lguest: the device descriptor at offset {at} runs past the device page");
            break;
        };
        let vqs = vq_page
            .chunks_exact(8)
            .map(|v| VqConfig {
                num: u16::from_le_bytes([v[0], v[1]]),
                irq: u16::from_le_bytes([v[2], v[3]]),
                pfn: u32::from_le_bytes([v[4], v[5], v[6], v[7]]),
            })
            .collect();
        let desc = DeviceDesc {
            offset: at,
            ty,
            feature_len,
            config_len,
            status,
            vqs,
        };
        let size = desc.size();
        if at + size > page.len() {
            log::warn!("lguest: the device descriptor at offset {at} runs past the device page");
            break;
        }
        found.push(desc);
        at += size;
    }
    found
}

/// Where a split vring's parts are, `vring_init(num, pfn × 4096, 4096)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringLayout {
    /// The descriptor table: 16 bytes each {addr u64, len u32, flags u16, next u16}.
    pub desc: u64,
    /// The avail ring: flags u16, idx u16, ring[num] u16, used_event u16.
    pub avail: u64,
    /// The used ring, at the next alignment boundary: flags u16, idx u16,
    /// ring[num] {id u32, len u32}.
    pub used: u64,
}

impl VringLayout {
    /// The layout of a `num`-entry vring at page `pfn`.
    pub fn new(pfn: u32, num: u16) -> VringLayout {
        let num = u64::from(num);
        let desc = u64::from(pfn) * PAGE_SIZE;
        let avail = desc + 16 * num;
        let avail_end = avail + 2 * (3 + num);
        let used = avail_end.div_ceil(VRING_ALIGN) * VRING_ALIGN;
        VringLayout { desc, avail, used }
    }
}

/// The console as the Guest's driver knows it after the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Console {
    /// Guest-physical address of its descriptor.
    pub desc: u64,
    /// The output virtqueue.
    pub out: VqConfig,
    /// Our next avail index on it.
    pub avail_idx: u16,
    /// The used index we last saw.
    pub used_idx: u16,
}

/// Finds and starts the console (the first `console`).
fn probe(g: &mut Guest) -> Result<Console, Stop> {
    let mem = g.mem()?;
    let page = g.read(mem, PAGE_SIZE as u32)?;
    let descs = scan(&page);
    let Some(desc) = descs.iter().find(|d| d.ty == VIRTIO_ID_CONSOLE) else {
        return Err(g.kill(format!(
            "fake guest: no console in the device page at {mem:#x}"
        )));
    };
    let at = mem + desc.offset as u64;
    if desc.vqs.len() < 2 {
        return Err(g.kill(format!(
            "fake guest: the console at {at:#x} has {} virtqueues; it needs 2 (input, output)",
            desc.vqs.len()
        )));
    }
    let out = desc.vqs[1];
    if out.num == 0 {
        return Err(g.kill(format!(
            "fake guest: the console at {at:#x} has an output virtqueue of 0 entries"
        )));
    }
    if desc.feature_len > 0 {
        let accepted = vec![0u8; usize::from(desc.feature_len)];
        g.write(at + desc.accepted_features() as u64, &accepted)?;
    }
    g.write(at + 4, &[STATUS_DRIVER])?;
    g.notify(at)?;
    g.write(at + 4, &[STATUS_DRIVER_OK])?;
    log::info!(
        "lguest: console at {at:#x}: output vq of {} entries at pfn {:#x}, irq {}",
        out.num,
        out.pfn,
        out.irq
    );
    Ok(Console {
        desc: at,
        out,
        avail_idx: 0,
        used_idx: 0,
    })
}

/// `console "TEXT"`: TEXT at scratch, one buffer on the output vq, kick, wait until used.
pub(super) fn write(g: &mut Guest, text: &[u8]) -> Result<(), Stop> {
    let mut console = match g.console {
        Some(console) => console,
        None => {
            let console = probe(g)?;
            g.console = Some(console);
            console
        }
    };
    let vq = console.out;
    let ring = VringLayout::new(vq.pfn, vq.num);
    let at = g.scratch;
    g.write(at, text)?;
    let slot = console.avail_idx % vq.num;
    let mut desc = [0u8; 16];
    desc[..8].copy_from_slice(&at.to_le_bytes());
    // The parser caps strings far below 4 GiB (MAX_SCRIPT_LEN).
    desc[8..12].copy_from_slice(&(text.len() as u32).to_le_bytes());
    g.write(ring.desc + 16 * u64::from(slot), &desc)?;
    g.write(ring.avail + 4 + 2 * u64::from(slot), &slot.to_le_bytes())?;
    console.avail_idx = console.avail_idx.wrapping_add(1);
    g.write(ring.avail + 2, &console.avail_idx.to_le_bytes())?;
    g.console = Some(console);
    g.notify(u64::from(vq.pfn) * PAGE_SIZE)?;

    // Wait until the Launcher's output process has used the buffer: used.idx moves, and
    // the vq's interrupt says so.
    let mask = 1u32.checked_shl(u32::from(vq.irq)).unwrap_or(0);
    let deadline = Instant::now() + CONSUME_TIMEOUT;
    loop {
        let idx = g.read(ring.used + 2, 2)?;
        let used = u16::from_le_bytes([idx[0], idx[1]]);
        if used != console.used_idx {
            console.used_idx = used;
            g.console = Some(console);
            // The interrupt that said so, if it came already.
            if mask != 0 {
                g.take_pending(mask);
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(
                g.kill("fake guest: console output was not consumed within 10 s".to_owned())
            );
        }
        g.set_state(GuestState::WaitingForIrq {
            irq: u32::from(vq.irq),
            line: g.line(),
        });
        let wait_until = if mask == 0 {
            deadline.min(Instant::now() + POLL)
        } else {
            deadline
        };
        g.wait_irq(mask, Some(wait_until))?;
        g.set_state(GuestState::Running { line: g.line() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device page of `lguest 16 vmlinux console=hvc0` (spec §7): the console, type 3,
    /// 2 vqs (input pfn 0x1001 irq 1, output pfn 0x1004 irq 2), no features, no config.
    fn console_page() -> Vec<u8> {
        let mut page = vec![0u8; 4096];
        page[..5].copy_from_slice(&[3, 2, 0, 0, 0]);
        page[5..13].copy_from_slice(&[0, 1, 1, 0, 0x01, 0x10, 0, 0]);
        page[13..21].copy_from_slice(&[0, 1, 2, 0, 0x04, 0x10, 0, 0]);
        page
    }

    #[test]
    fn scan_finds_the_console_of_section_7() {
        let descs = scan(&console_page());
        assert_eq!(
            descs,
            vec![DeviceDesc {
                offset: 0,
                ty: 3,
                feature_len: 0,
                config_len: 0,
                status: 0,
                vqs: vec![
                    VqConfig {
                        num: 256,
                        irq: 1,
                        pfn: 0x1001
                    },
                    VqConfig {
                        num: 256,
                        irq: 2,
                        pfn: 0x1004
                    }
                ]
            }]
        );
        assert_eq!(descs[0].size(), 21);
    }

    #[test]
    fn scan_walks_unaligned_descriptors_and_stops_at_the_page_end() {
        // An rng (1 vq, 1 feature byte, 2 config bytes) before the console.
        let mut page = vec![0u8; 4096];
        page[..5].copy_from_slice(&[4, 1, 1, 2, 0]);
        page[5..13].copy_from_slice(&[0, 1, 1, 0, 0x01, 0x10, 0, 0]);
        let console = console_page();
        page[17..17 + 21].copy_from_slice(&console[..21]);
        let descs = scan(&page);
        assert_eq!(descs.len(), 2);
        assert_eq!((descs[1].offset, descs[1].ty), (17, 3));
        assert_eq!(descs[0].accepted_features(), 14);
        // A descriptor claiming more vqs than the page holds ends the scan, no panic.
        let mut page = vec![0u8; 4096];
        page[4090..4095].copy_from_slice(&[3, 200, 0, 0, 0]);
        page[..5].copy_from_slice(&[1, 0, 255, 255, 0]);
        assert!(scan(&page).len() <= 1);
        let mut full = vec![0xffu8; 4096];
        full[1] = 0;
        full[2] = 0;
        full[3] = 0;
        assert!(scan(&full).len() <= 4096 / 5);
        assert!(scan(&[3, 2]).is_empty());
    }

    #[test]
    fn vring_of_256_has_avail_at_one_page_and_used_at_two() {
        assert_eq!(
            VringLayout::new(0x1004, 256),
            VringLayout {
                desc: 0x100_4000,
                avail: 0x100_5000,
                used: 0x100_6000
            }
        );
        // A small ring: avail right after 4 descriptors, used at the next page.
        assert_eq!(
            VringLayout::new(1, 4),
            VringLayout {
                desc: 0x1000,
                avail: 0x1040,
                used: 0x2000
            }
        );
    }
}
