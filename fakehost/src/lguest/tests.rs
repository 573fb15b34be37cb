//! The lguest service against a scripted cusedev: the test plays the bus (it hands the
//! service packets and DATA frames as the channel reader would) and cusedev's `/dev/lguest`
//! (a reader thread answers READs from each Guest's memory, applies WRITEs, checks every
//! access with the 3.x `lguest_address_ok` and kills the Guest with the kernel's reason when
//! it fails, turns SHUTDOWN and KILL into DIED, and lets eventfds take notifications). The
//! test's own thread is the Launcher: `read` sends RUN and waits for what the read returns.
//! The host end of a `UnixStream::pair()` is the service's real `ChannelLink`.
//!
//! Synchronisation is by protocol order only; timeouts only turn a hang into a failure.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use vmbus::guest_memory::{MemoryMessage, MAX_CHUNK};
use vmbus::lguest::{
    address_ok, run_cause, Death, FromGuest, Start, ToGuest, PAGE_SIZE, SHUTDOWN_MESSAGE_LEN,
    SHUTDOWN_RESTART,
};
use vmbus::packet::{encode_inband, encode_packet, packet_type, parse_packet};
use vmbus::stream::kind;

use super::report::{AddressCount, GuestState, GuestStatus, Taken};
use super::script::Script;
use super::LguestHost;
use crate::bus::frames::read_frame;
use crate::bus::ChannelLink;
use crate::service::{CommandContext, CommandError, HostService, ServiceClass, ServiceConfig};
use crate::test_support::{NullProgress, TempDir};

const LINK: u64 = 7;
const SAFETY: Duration = Duration::from_secs(30);
/// M of `lguest 16 vmlinux`: 16 MiB.
const MEM: u64 = 0x100_0000;
/// Its pfn limit: RAM, the device page and two console vrings.
const PFN_LIMIT: u64 = 0x1007;

/// What a Launcher's read returns.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Notify(u64),
    Died(Death),
}

/// cusedev's record of one Guest.
struct Side {
    pfn_limit: u64,
    pages: BTreeMap<u64, Box<[u8; 4096]>>,
    eventfds: HashSet<u64>,
    dead: bool,
    launcher: Sender<Seen>,
    eventfd: Sender<u64>,
    /// Hypercalls in order.
    calls: Vec<FromGuest>,
    /// READs handed to the test instead of answered.
    held_reads: Option<Sender<(u64, u32)>>,
}

impl Side {
    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| {
                let a = addr + i;
                self.pages
                    .get(&(a / PAGE_SIZE))
                    .map_or(0, |p| p[(a % PAGE_SIZE) as usize])
            })
            .collect()
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            let a = addr + i as u64;
            let page = self
                .pages
                .entry(a / PAGE_SIZE)
                .or_insert_with(|| Box::new([0; 4096]));
            page[(a % PAGE_SIZE) as usize] = b;
        }
    }
}

struct Inner {
    host: LguestHost,
    /// One caller into the service at a time, as the bus's reader thread is.
    bus: Mutex<()>,
    sides: Mutex<HashMap<u32, Side>>,
}

impl Inner {
    fn to_host(&self, guest: u32, message: &ToGuest) {
        let bytes = encode_inband(0, 0, &message.encode(guest));
        let _bus = self.bus.lock().unwrap();
        self.host.packet(LINK, &parse_packet(&bytes).unwrap());
    }

    fn data(&self, guest: u32, offset: u64, status: u32, bytes: &[u8]) {
        let _bus = self.bus.lock().unwrap();
        self.host.memory(
            LINK,
            &MemoryMessage::Data {
                trans_id: u64::from(guest),
                offset,
                status,
                bytes,
            },
        );
    }

    /// `kill_guest`: the first reason wins; DIED to the Guest, the death to the Launcher.
    fn kill(&self, guest: u32, death: Death) {
        let launcher = {
            let mut sides = self.sides.lock().unwrap();
            let Some(side) = sides.get_mut(&guest) else {
                return;
            };
            if side.dead {
                return;
            }
            side.dead = true;
            side.launcher.clone()
        };
        self.to_host(guest, &ToGuest::Died(death.clone()));
        let _ = launcher.send(Seen::Died(death));
    }

    /// cusedev's channel reader: everything the Guests send.
    fn serve(&self, stream: &UnixStream) {
        while let Ok(Some(frame)) = read_frame(stream) {
            if frame.kind == kind::MEMORY {
                match MemoryMessage::parse(&frame.body).unwrap() {
                    MemoryMessage::Read {
                        trans_id,
                        offset,
                        len,
                    } => self.answer_read(trans_id as u32, offset, len),
                    MemoryMessage::Write {
                        trans_id,
                        offset,
                        bytes,
                    } => {
                        assert!(bytes.len() <= MAX_CHUNK);
                        let guest = trans_id as u32;
                        let ok = {
                            let mut sides = self.sides.lock().unwrap();
                            let side = sides.get_mut(&guest).expect("WRITE for a known Guest");
                            let ok = address_ok(side.pfn_limit, offset, bytes.len() as u64);
                            if ok && !side.dead {
                                side.write(offset, bytes);
                            }
                            ok
                        };
                        if !ok {
                            self.kill(
                                guest,
                                Death::Reason(format!(
                                    "bad write address {offset:#x} len {}",
                                    bytes.len()
                                )),
                            );
                        }
                    }
                    other => panic!("the Guest sent {other:?}"),
                }
                continue;
            }
            assert_eq!(frame.kind, kind::PACKET);
            let packet = parse_packet(&frame.body).unwrap();
            assert_eq!(packet.ty, packet_type::DATA_INBAND);
            assert_eq!(packet.trans_id, 0);
            let (guest, call) = FromGuest::parse(packet.payload).unwrap();
            self.hypercall(guest, call);
        }
    }

    fn answer_read(&self, guest: u32, offset: u64, len: u32) {
        let answer = {
            let sides = self.sides.lock().unwrap();
            match sides.get(&guest) {
                None => Err(Errno::ENOENT),
                Some(side) => {
                    if let Some(held) = &side.held_reads {
                        let _ = held.send((offset, len));
                        return;
                    }
                    if side.dead {
                        Err(Errno::ENOENT)
                    } else if !address_ok(side.pfn_limit, offset, len.into()) {
                        Err(Errno::EFAULT)
                    } else {
                        Ok(side.read(offset, len as usize))
                    }
                }
            }
        };
        match answer {
            Ok(bytes) => {
                for (i, chunk) in bytes.chunks(MAX_CHUNK).enumerate() {
                    self.data(guest, offset + (i * MAX_CHUNK) as u64, 0, chunk);
                }
            }
            Err(errno) => {
                self.data(guest, offset, errno as u32, &[]);
                if errno == Errno::EFAULT {
                    self.kill(
                        guest,
                        Death::Reason(format!("bad read address {offset:#x} len {len}")),
                    );
                }
            }
        }
    }

    fn hypercall(&self, guest: u32, call: FromGuest) {
        let mut sides = self.sides.lock().unwrap();
        let Some(side) = sides.get_mut(&guest) else {
            panic!("a hypercall of unknown guest {guest}: {call:?}");
        };
        side.calls.push(call.clone());
        if side.dead {
            return;
        }
        match call {
            FromGuest::Notify { addr } => {
                if side.eventfds.contains(&addr) {
                    let _ = side.eventfd.send(addr);
                    drop(sides);
                    self.to_host(
                        guest,
                        &ToGuest::Run {
                            cause: run_cause::EVENTFD,
                        },
                    );
                } else {
                    let _ = side.launcher.send(Seen::Notify(addr));
                }
            }
            FromGuest::Shutdown { message, how } => {
                let len = SHUTDOWN_MESSAGE_LEN as u64;
                let death = if !address_ok(side.pfn_limit, message, len) {
                    Death::Reason(format!("bad read address {message:#x} len {len}"))
                } else if how == SHUTDOWN_RESTART {
                    Death::Restart
                } else {
                    let mut text = side.read(message, SHUTDOWN_MESSAGE_LEN);
                    text[SHUTDOWN_MESSAGE_LEN - 1] = 0;
                    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
                    Death::Reason(format!("CRASH: {}", String::from_utf8_lossy(&text[..end])))
                };
                drop(sides);
                self.kill(guest, death);
            }
            FromGuest::Kill { reason } => {
                drop(sides);
                self.kill(guest, Death::Reason(reason));
            }
        }
    }
}

/// How a Guest's memory starts.
struct Setup {
    pfn_limit: u64,
    /// The e820 RAM entry's size (None: an empty e820 map).
    ram: Option<u64>,
    /// The device page at gpa `ram`.
    device_page: Option<Vec<u8>>,
}

impl Setup {
    /// `lguest 16 vmlinux`: 16 MiB, the console's device page (spec §7).
    fn console() -> Setup {
        Setup {
            pfn_limit: PFN_LIMIT,
            ram: Some(MEM),
            device_page: Some(console_page()),
        }
    }
}

/// The device page of spec §7: the console, type 3, 2 vqs (input pfn 0x1001 irq 1, output
/// pfn 0x1004 irq 2, 256 entries each), no features, no config; then type 0.
fn console_page() -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    page[..5].copy_from_slice(&[3, 2, 0, 0, 0]);
    page[5..13].copy_from_slice(&[0, 1, 1, 0, 0x01, 0x10, 0, 0]);
    page[13..21].copy_from_slice(&[0, 1, 2, 0, 0x04, 0x10, 0, 0]);
    page
}

struct Cusedev {
    inner: Arc<Inner>,
    host_end: Arc<UnixStream>,
    launchers: Mutex<HashMap<u32, Arc<Mutex<Receiver<Seen>>>>>,
    eventfds: Mutex<HashMap<u32, Arc<Mutex<Receiver<u64>>>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Cusedev {
    fn drop(&mut self) {
        let _ = self.host_end.shutdown(std::net::Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Cusedev {
    fn new(script: &str) -> Cusedev {
        let script = Script::parse("test.guest", script).unwrap();
        Cusedev::with_host(LguestHost::with_script(script, Duration::from_secs(5)))
    }

    fn with_host(host: LguestHost) -> Cusedev {
        let _ = env_logger::builder().is_test(true).try_init();
        let (ours, host_end) = UnixStream::pair().unwrap();
        let host_end = Arc::new(host_end);
        host.attached(ChannelLink::new(LINK, 1, Arc::clone(&host_end)));
        let inner = Arc::new(Inner {
            host,
            bus: Mutex::new(()),
            sides: Mutex::new(HashMap::new()),
        });
        let serving = Arc::clone(&inner);
        let reader = std::thread::spawn(move || serving.serve(&ours));
        Cusedev {
            inner,
            host_end,
            launchers: Mutex::new(HashMap::new()),
            eventfds: Mutex::new(HashMap::new()),
            reader: Some(reader),
        }
    }

    fn host(&self) -> &LguestHost {
        &self.inner.host
    }

    /// LHREQ_INITIALIZE of guest `n`: its memory as the Launcher lays it out, then START.
    fn start(&self, n: u32, setup: Setup) {
        let (launcher, seen) = mpsc::channel();
        let (eventfd, signalled) = mpsc::channel();
        let mut side = Side {
            pfn_limit: setup.pfn_limit,
            pages: BTreeMap::new(),
            eventfds: HashSet::new(),
            dead: false,
            launcher,
            eventfd,
            calls: Vec::new(),
            held_reads: None,
        };
        if let Some(ram) = setup.ram {
            side.write(0x1e8, &[1]);
            let mut entry = Vec::new();
            entry.extend_from_slice(&0u64.to_le_bytes());
            entry.extend_from_slice(&ram.to_le_bytes());
            entry.extend_from_slice(&1u32.to_le_bytes());
            side.write(0x2d0, &entry);
            if let Some(page) = &setup.device_page {
                side.write(ram, page);
            }
        }
        self.inner.sides.lock().unwrap().insert(n, side);
        self.launchers
            .lock()
            .unwrap()
            .insert(n, Arc::new(Mutex::new(seen)));
        self.eventfds
            .lock()
            .unwrap()
            .insert(n, Arc::new(Mutex::new(signalled)));
        self.inner.to_host(
            n,
            &ToGuest::Start(Start {
                word: 4,
                launcher_pid: 1000 + n,
                base: 0xb700_0000,
                pfn_limit: setup.pfn_limit,
                start: 0x10_0000,
            }),
        );
    }

    /// The Launcher calls read: RUN.
    fn run(&self, n: u32) {
        self.inner.to_host(
            n,
            &ToGuest::Run {
                cause: run_cause::READ,
            },
        );
    }

    /// What the Launcher's read (already running) returns.
    fn next(&self, n: u32) -> Seen {
        let launcher = Arc::clone(&self.launchers.lock().unwrap()[&n]);
        let seen = launcher.lock().unwrap().recv_timeout(SAFETY);
        seen.unwrap_or_else(|_| {
            panic!(
                "guest {n}: the read returned nothing: {:#?}",
                self.status(n)
            )
        })
    }

    /// A whole read: RUN, then what it returns.
    fn read(&self, n: u32) -> Seen {
        self.run(n);
        self.next(n)
    }

    fn irq(&self, n: u32, irq: u32) {
        self.inner.to_host(n, &ToGuest::Irq { irq });
    }

    fn close(&self, n: u32) {
        self.inner.to_host(n, &ToGuest::Stop);
    }

    fn attach_eventfd(&self, n: u32, addr: u64) {
        self.inner
            .sides
            .lock()
            .unwrap()
            .get_mut(&n)
            .unwrap()
            .eventfds
            .insert(addr);
    }

    fn signalled(&self, n: u32) -> u64 {
        let eventfd = Arc::clone(&self.eventfds.lock().unwrap()[&n]);
        let signalled = eventfd.lock().unwrap().recv_timeout(SAFETY);
        signalled.expect("no eventfd was signalled")
    }

    fn peek(&self, n: u32, addr: u64, len: usize) -> Vec<u8> {
        self.inner.sides.lock().unwrap()[&n].read(addr, len)
    }

    fn poke(&self, n: u32, addr: u64, bytes: &[u8]) {
        self.inner
            .sides
            .lock()
            .unwrap()
            .get_mut(&n)
            .unwrap()
            .write(addr, bytes);
    }

    fn calls(&self, n: u32) -> Vec<FromGuest> {
        self.inner.sides.lock().unwrap()[&n].calls.clone()
    }

    fn notified(&self, n: u32) -> Vec<u64> {
        self.calls(n)
            .into_iter()
            .filter_map(|c| match c {
                FromGuest::Notify { addr } => Some(addr),
                _ => None,
            })
            .collect()
    }

    fn hold_reads(&self, n: u32) -> Receiver<(u64, u32)> {
        let (tx, rx) = mpsc::channel();
        self.inner
            .sides
            .lock()
            .unwrap()
            .get_mut(&n)
            .unwrap()
            .held_reads = Some(tx);
        rx
    }

    fn status(&self, n: u32) -> Option<GuestStatus> {
        self.host()
            .lguest_status()
            .guests
            .into_iter()
            .rev()
            .find(|g| g.guest == n)
    }

    /// Waits until guest `n`'s state is `want`.
    fn wait_state(&self, n: u32, want: &GuestState) {
        let deadline = Instant::now() + SAFETY;
        loop {
            let now = self.status(n).map(|s| s.state);
            if now.as_ref() == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "guest {n}: state {now:?}, wanted {want:?}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn died(reason: &str) -> Seen {
    Seen::Died(Death::Reason(reason.to_owned()))
}

fn dead(reason: &str) -> GuestState {
    GuestState::Dead {
        reason: reason.to_owned(),
    }
}

fn command(host: &LguestHost, json: serde_json::Value) -> Result<serde_json::Value, CommandError> {
    let mut progress = NullProgress;
    host.command(
        json,
        CommandContext {
            offered: true,
            fds: Vec::new(),
            progress: &mut progress,
        },
    )
}

#[test]
fn console_hello_on_the_section_7_launcher_writes_one_line_then_powers_down() {
    let c = Cusedev::with_host(LguestHost::with_script(
        Script::default_script(),
        Duration::from_secs(5),
    ));
    c.start(1, Setup::console());
    c.wait_state(1, &GuestState::WaitingForFirstRead);

    // The first read: the status notify of the console's descriptor (at M, offset 0).
    assert_eq!(c.read(1), Seen::Notify(MEM));
    assert_eq!(
        c.peek(1, MEM + 4, 1),
        [0x03],
        "ACKNOWLEDGE|DRIVER before the notify"
    );
    // The Launcher starts the console: an eventfd on each vq. Then it reads again.
    c.attach_eventfd(1, 0x100_1000);
    c.attach_eventfd(1, 0x100_4000);
    c.run(1);
    // The kick of the output vq went to its eventfd; the read goes on.
    assert_eq!(c.signalled(1), 0x100_4000);
    assert_eq!(c.peek(1, MEM + 4, 1), [0x07], "DRIVER_OK, without a notify");
    let text = b"hello from the fake guest\n";
    let mut desc = Vec::new();
    desc.extend_from_slice(&0x8_0000u64.to_le_bytes());
    desc.extend_from_slice(&(text.len() as u32).to_le_bytes());
    desc.extend_from_slice(&[0, 0, 0, 0]);
    assert_eq!(c.peek(1, 0x100_4000, 16), desc, "descriptor 0");
    assert_eq!(
        c.peek(1, 0x100_5000, 6),
        [0, 0, 1, 0, 0, 0],
        "avail: flags, idx 1, ring[0] 0"
    );
    assert_eq!(c.peek(1, 0x8_0000, text.len()), text);
    c.wait_state(1, &GuestState::WaitingForIrq { irq: 2, line: 14 });
    // The output process: writev the bytes, used.ring[0] = {0, len}, used.idx = 1, IRQ 2.
    let mut used = vec![0, 0, 1, 0, 0, 0, 0, 0];
    used.extend_from_slice(&(text.len() as u32).to_le_bytes());
    c.poke(1, 0x100_6000, &used);
    c.irq(1, 2);
    // Then `crash "Power down"`: the launcher's read ends with the reason.
    assert_eq!(c.next(1), died("CRASH: Power down"));
    assert_eq!(c.peek(1, 0x8_0000, 11), b"Power down\0");
    assert_eq!(c.notified(1), [MEM, 0x100_4000]);
    assert_eq!(
        c.calls(1).last(),
        Some(&FromGuest::Shutdown {
            message: 0x8_0000,
            how: vmbus::lguest::SHUTDOWN_POWEROFF
        })
    );
    c.wait_state(1, &dead("CRASH: Power down"));
    let notifies = c.host().notifies(Some(1)).guests.remove(0);
    assert_eq!(
        notifies.by_address,
        vec![
            AddressCount {
                addr: MEM,
                count: 1,
                read: 1,
                eventfd: 0,
                waiting: 0
            },
            AddressCount {
                addr: 0x100_4000,
                count: 1,
                read: 0,
                eventfd: 1,
                waiting: 0
            }
        ]
    );
    let irqs = c.host().irqs().guests.remove(0);
    assert_eq!(irqs.pending, Vec::<u32>::new(), "IRQ 2 was taken");
    // The launcher exits: its file is closed.
    c.close(1);
    let status = c.status(1).unwrap();
    assert_eq!(status.ended.as_deref(), Some("closed"));
    assert_eq!(status.state_text, "dead: CRASH: Power down");
    assert_eq!(status.script, "builtin:console-hello");
    assert_eq!(
        (status.pfn_limit, status.word, status.launcher_pid),
        (PFN_LIMIT, 4, 1001)
    );
}

#[test]
fn a_second_console_line_reuses_the_started_console() {
    let c = Cusedev::new("console \"one\"\nconsole \"two\"\nnotify 0x10");
    c.start(1, Setup::console());
    assert_eq!(c.read(1), Seen::Notify(MEM));
    c.attach_eventfd(1, 0x100_4000);
    c.run(1);
    for i in 1..=2u16 {
        assert_eq!(c.signalled(1), 0x100_4000);
        let avail = c.peek(1, 0x100_5000, 8);
        assert_eq!(u16::from_le_bytes([avail[2], avail[3]]), i, "avail.idx");
        let slot = usize::from(i - 1);
        assert_eq!(
            u16::from_le_bytes([avail[4 + 2 * slot], avail[5 + 2 * slot]]),
            i - 1
        );
        // Used before the interrupt is even raised: the Guest sees it on its next look.
        c.poke(1, 0x100_6002, &i.to_le_bytes());
        c.irq(1, 2);
    }
    assert_eq!(c.next(1), Seen::Notify(0x10));
    assert_eq!(
        c.notified(1),
        [MEM, 0x100_4000, 0x100_4000, 0x10],
        "one status notify"
    );
    assert_eq!(c.peek(1, 0x100_4010, 8), 0x8_0000u64.to_le_bytes());
}

#[test]
fn console_without_a_console_or_ram_kills_with_the_reason() {
    let c = Cusedev::new("console \"x\"");
    let mut rng_only = vec![0u8; 4096];
    rng_only[..13].copy_from_slice(&[4, 1, 0, 0, 0, 0, 1, 1, 0, 1, 0x10, 0, 0]);
    c.start(
        1,
        Setup {
            pfn_limit: PFN_LIMIT,
            ram: Some(MEM),
            device_page: Some(rng_only),
        },
    );
    assert_eq!(
        c.read(1),
        died("fake guest: no console in the device page at 0x1000000")
    );
    c.start(
        2,
        Setup {
            pfn_limit: PFN_LIMIT,
            ram: None,
            device_page: None,
        },
    );
    assert_eq!(
        c.read(2),
        died("fake guest: no RAM in the e820 map at gpa 0")
    );
}

#[test]
fn pingpong_thousand_round_trips_lose_nothing() {
    let c = Cusedev::with_host(LguestHost::with_script(
        Script::builtin("pingpong").unwrap(),
        Duration::from_secs(5),
    ));
    c.start(3, Setup::console());
    for round in 0..1000 {
        assert_eq!(c.read(3), Seen::Notify(0x1000), "round {round}");
        c.irq(3, 3);
    }
    assert_eq!(c.read(3), died("CRASH: pingpong done"));
    let n = c.host().notifies(Some(3)).guests.remove(0);
    assert_eq!(n.total, 1000);
    assert_eq!(
        n.by_address,
        vec![AddressCount {
            addr: 0x1000,
            count: 1000,
            read: 1000,
            eventfd: 0,
            waiting: 0
        }]
    );
    assert_eq!(n.recent.len(), super::report::RECENT_NOTIFIES);
    assert!(n.recent.iter().all(|r| r.taken == Some(Taken::Read)));
    assert_eq!(n.recent.last().unwrap().seq, 1000);
    let irqs = c.host().irqs().guests.remove(0);
    assert_eq!((irqs.total, irqs.pending.len()), (1000, 0));
    assert_eq!(c.status(3).unwrap().runs, 1001);
}

#[test]
fn eventfd_round_trips_keep_the_read_running() {
    let c = Cusedev::new("repeat 500\nnotify 0x2000\nend\nnotify 0x1000");
    c.start(1, Setup::console());
    c.attach_eventfd(1, 0x2000);
    assert_eq!(c.read(1), Seen::Notify(0x1000));
    for _ in 0..500 {
        assert_eq!(c.signalled(1), 0x2000);
    }
    let n = c.host().notifies(Some(1)).guests.remove(0);
    assert_eq!(
        n.by_address[1],
        AddressCount {
            addr: 0x2000,
            count: 500,
            read: 0,
            eventfd: 500,
            waiting: 0
        }
    );
    assert_eq!(n.by_address[0].waiting, 1, "0x1000 waits for the next read");
}

#[test]
fn irqs_coalesce_and_a_missing_one_kills_with_its_line() {
    let c = Cusedev::new("wait-irq 3 5s\nnotify 0x1000\nwait-irq 3 200ms\n");
    c.start(1, Setup::console());
    c.irq(1, 3);
    c.irq(1, 3);
    let irqs = c.host().irqs().guests.remove(0);
    assert_eq!((irqs.pending, irqs.total), (vec![3], 2));
    assert_eq!(c.read(1), Seen::Notify(0x1000));
    let started = Instant::now();
    assert_eq!(
        c.read(1),
        died("fake guest: line 3: no interrupt 3 within 200ms")
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    let irqs = c.host().irqs().guests.remove(0);
    assert_eq!(irqs.raised.len(), 1);
    assert_eq!((irqs.raised[0].irq, irqs.raised[0].count), (3, 2));
    assert!(irqs.pending.is_empty());
}

#[test]
fn halt_takes_the_lowest_pending_interrupt() {
    let c = Cusedev::new("halt\nnotify 0x10\nhalt\nnotify 0x20\nhalt 100ms");
    c.start(1, Setup::console());
    c.irq(1, 7);
    c.irq(1, 4);
    assert_eq!(c.read(1), Seen::Notify(0x10));
    assert_eq!(c.host().irqs().guests[0].pending, [7]);
    assert_eq!(c.read(1), Seen::Notify(0x20));
    assert_eq!(
        c.read(1),
        died("fake guest: line 5: no interrupt within 100ms")
    );
}

#[test]
fn a_waiting_guest_is_resumed_by_an_irq_without_a_new_run() {
    let c = Cusedev::with_host(LguestHost::with_script(
        Script::builtin("attach").unwrap(),
        Duration::from_secs(5),
    ));
    c.start(1, Setup::console());
    c.run(1);
    c.wait_state(1, &GuestState::WaitingForIrq { irq: 5, line: 4 });
    c.irq(1, 9); // not the one it waits for
    c.irq(1, 5);
    assert_eq!(c.next(1), Seen::Notify(0x2000));
    assert_eq!(c.read(1), died("CRASH: attached"));
    assert_eq!(c.host().irqs().guests[0].pending, [9]);
}

#[test]
fn halt_blocks_until_an_irq_then_idles_counting_interrupts() {
    let c = Cusedev::with_host(LguestHost::with_script(
        Script::builtin("halt").unwrap(),
        Duration::from_secs(5),
    ));
    c.start(1, Setup::console());
    c.run(1);
    c.wait_state(1, &GuestState::Halted { line: 3 });
    c.irq(1, 0);
    c.wait_state(1, &GuestState::Idle);
    c.irq(1, 6);
    c.irq(1, 6);
    let irqs = c.host().irqs().guests.remove(0);
    assert_eq!((irqs.pending, irqs.total), (vec![6], 3));
    assert_eq!(c.status(1).unwrap().state_text, "idle: end of script");
}

#[test]
fn sixty_four_guests_run_at_once() {
    let c = Cusedev::new(
        "repeat 10\nnotify 0x1000\nwait-irq 1 10s\nend\nprint \"bye\"\ncrash \"done\"",
    );
    for n in 1..=64 {
        c.start(n, Setup::console());
    }
    // Each launcher in its own thread, all at once.
    std::thread::scope(|s| {
        for n in 1..=64 {
            let c = &c;
            s.spawn(move || {
                for _ in 0..10 {
                    assert_eq!(c.read(n), Seen::Notify(0x1000));
                    c.irq(n, 1);
                }
                assert_eq!(c.read(n), Seen::Notify(0x8_0000));
                assert_eq!(c.peek(n, 0x8_0000, 4), b"bye\0");
                assert_eq!(c.read(n), died("CRASH: done"));
            });
        }
    });
    for n in 1..=64 {
        c.wait_state(n, &dead("CRASH: done"));
    }
    let status = c.host().lguest_status();
    assert_eq!((status.guests.len(), status.started), (64, 64));
}

#[test]
fn write_expect_read_and_print_use_guest_memory() {
    let c = Cusedev::new(concat!(
        "write 0x3000 \"abc\" u8:1 u16:0x0203 u32:4 u64:5 hex:dead\n",
        "expect 0x3000 \"abc\" u8:1\n",
        "read 0x3000 4\n",
        "scratch 0x4000\n",
        "print \"hi\"\n",
        "expect 0x3000 u8:0x61 u8:0x62 u8:0x00\n",
    ));
    c.start(1, Setup::console());
    assert_eq!(c.read(1), Seen::Notify(0x4000));
    assert_eq!(
        c.peek(1, 0x3000, 20),
        [b'a', b'b', b'c', 1, 3, 2, 4, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0xde, 0xad]
    );
    assert_eq!(c.peek(1, 0x4000, 3), b"hi\0");
    let last = c.status(1).unwrap().last_read.unwrap();
    assert_eq!(
        (last.addr, last.len, last.hex.as_str()),
        (0x3000, 4, "61626301")
    );
    assert_eq!(
        c.read(1),
        died("fake guest: line 6: expect at 0x3002: wanted u8:0x0 got u8:0x63")
    );
}

#[test]
fn expressions_see_mem_limit_start_and_scratch() {
    let c = Cusedev::new("notify mem+4\nnotify limit - 16\nnotify start\nnotify scratch+1");
    c.start(1, Setup::console());
    for want in [MEM + 4, PFN_LIMIT * 4096 - 16, 0x10_0000, 0x8_0001] {
        assert_eq!(c.read(1), Seen::Notify(want));
    }
}

#[test]
fn a_spinning_guest_starves_nobody_and_dies_when_told() {
    let c = Cusedev::new("loop:\ngoto loop");
    c.start(1, Setup::console());
    c.run(1);
    c.wait_state(1, &GuestState::Running { line: 2 });
    // Meanwhile another Guest (same script switched) gets its round trips.
    c.host().set_script(Script::builtin("pingpong").unwrap());
    c.start(2, Setup::console());
    for _ in 0..50 {
        assert_eq!(c.read(2), Seen::Notify(0x1000));
        c.irq(2, 3);
    }
    // cusedev kills the spinner (a signal, a bad access elsewhere: any reason).
    c.inner.kill(1, Death::Reason("killed by the test".into()));
    assert_eq!(c.next(1), died("killed by the test"));
    c.wait_state(1, &dead("killed by the test"));
    assert_eq!(c.status(1).unwrap().script, "test.guest");
    assert_eq!(c.status(2).unwrap().script, "builtin:pingpong");
}

#[test]
fn a_read_past_the_limit_is_refused_and_the_guest_dies_with_the_hosts_reason() {
    let c = Cusedev::with_host(LguestHost::with_script(
        Script::builtin("badread").unwrap(),
        Duration::from_secs(5),
    ));
    c.start(1, Setup::console());
    assert_eq!(c.read(1), died("bad read address 0x1007000 len 16"));
    c.wait_state(1, &dead("bad read address 0x1007000 len 16"));
    // A write there too.
    let c = Cusedev::new("write limit-4 u64:1\nnotify 0x10");
    c.start(1, Setup::console());
    assert_eq!(c.read(1), died("bad write address 0x1006ffc len 8"));
}

#[test]
fn restart_kill_and_crash_are_the_three_deaths() {
    let c = Cusedev::with_host(LguestHost::with_script(
        Script::builtin("restart").unwrap(),
        Duration::from_secs(5),
    ));
    c.start(1, Setup::console());
    assert_eq!(c.read(1), Seen::Died(Death::Restart));
    c.wait_state(1, &dead("restart requested"));
    c.host()
        .set_script(Script::parse("k", "kill \"Bad hypercall 99\"").unwrap());
    c.start(2, Setup::console());
    assert_eq!(c.read(2), died("Bad hypercall 99"));
    assert_eq!(
        c.calls(2),
        [FromGuest::Kill {
            reason: "Bad hypercall 99".into()
        }]
    );
    c.host().set_script(Script::builtin("errno").unwrap());
    c.start(3, Setup::console());
    assert_eq!(c.read(3), died("CRASH: errno list"));
}

#[test]
fn a_sleeping_guest_runs_without_notifying() {
    let c = Cusedev::new("sleep 200ms\nnotify 0x1");
    c.start(1, Setup::console());
    let started = Instant::now();
    assert_eq!(c.read(1), Seen::Notify(1));
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[test]
fn close_and_detach_end_guests_and_keep_the_last_32() {
    let c = Cusedev::new("notify 0x1");
    for n in 1..=3 {
        c.start(n, Setup::console());
    }
    assert_eq!(c.read(2), Seen::Notify(1));
    c.close(1);
    assert_eq!(c.status(1).unwrap().ended.as_deref(), Some("closed"));
    {
        let _bus = c.inner.bus.lock().unwrap();
        c.host().detached(LINK);
    }
    let status = c.host().lguest_status();
    assert_eq!(status.channels_attached, 0);
    let ended: Vec<(u32, Option<&str>)> = status
        .guests
        .iter()
        .map(|g| (g.guest, g.ended.as_deref()))
        .collect();
    assert_eq!(
        ended,
        [
            (1, Some("closed")),
            (2, Some("the channel went away")),
            (3, Some("the channel went away"))
        ]
    );
    assert_eq!(
        status.guests[1].state_text,
        "stopped at notify 0x1 (line 1)"
    );
    // After the detach, messages for those Guests are ignored.
    let before = c.host().lguest_status().ignored;
    c.run(2);
    assert_eq!(c.host().lguest_status().ignored, before + 1);

    let c = Cusedev::new("notify 0x1");
    for n in 1..=40 {
        c.start(n, Setup::console());
        c.close(n);
    }
    let status = c.host().lguest_status();
    assert_eq!(status.guests.len(), super::ENDED_KEPT);
    assert_eq!(status.guests[0].guest, 9, "the oldest kept");
}

#[test]
fn malformed_and_misdirected_bus_input_is_dropped_and_the_service_keeps_serving() {
    let c = Cusedev::new("notify 0x1000\nread 0x3000 4\nnotify 0x2000");
    let host = c.host();
    let inband = |payload: &[u8]| encode_inband(0, 0, payload);
    let hostile: Vec<Vec<u8>> = vec![
        encode_packet(
            packet_type::COMP,
            0,
            0,
            &ToGuest::Run { cause: 1 }.encode(1),
        ),
        inband(&[1, 0, 0]),
        inband(&[99, 0, 0, 0, 1, 0, 0, 0]),
        inband(&[1, 0, 0, 0, 1, 0, 0, 0, 4]), // a START cut short
        inband(&ToGuest::Run { cause: 1 }.encode(77)),
        inband(&ToGuest::Irq { irq: 0 }.encode(77)),
        inband(&ToGuest::Died(Death::Restart).encode(77)),
        inband(&ToGuest::Stop.encode(77)),
    ];
    {
        let _bus = c.inner.bus.lock().unwrap();
        for bytes in &hostile {
            host.packet(LINK, &parse_packet(bytes).unwrap());
        }
        host.memory(
            LINK,
            &MemoryMessage::Data {
                trans_id: 77,
                offset: 0,
                status: 0,
                bytes: b"x",
            },
        );
        host.memory(
            LINK,
            &MemoryMessage::Data {
                trans_id: u64::MAX,
                offset: 0,
                status: 0,
                bytes: b"x",
            },
        );
        host.memory(
            LINK,
            &MemoryMessage::Read {
                trans_id: 1,
                offset: 0,
                len: 4,
            },
        );
    }
    assert_eq!(host.lguest_status().ignored, hostile.len() as u64 + 3);

    c.start(1, Setup::console());
    c.irq(1, 32); // beyond LGUEST_IRQS
    let start = ToGuest::Start(Start {
        word: 8,
        launcher_pid: 1,
        base: 0,
        pfn_limit: 1,
        start: 0,
    });
    c.inner.to_host(1, &start); // a second START for a started number
    {
        // START on a link that is not attached.
        let _bus = c.inner.bus.lock().unwrap();
        host.packet(LINK + 1, &parse_packet(&inband(&start.encode(5))).unwrap());
    }
    assert_eq!(host.lguest_status().ignored, hostile.len() as u64 + 6);
    assert_eq!(host.lguest_status().guests.len(), 1);

    assert_eq!(c.read(1), Seen::Notify(0x1000));
    // DATA nobody asked for, to a Guest stopped at a notify: dropped.
    c.inner.data(1, 0x3000, 0, b"junk");
    // Its read: held, answered with bytes for the wrong place.
    let reads = c.hold_reads(1);
    c.run(1);
    assert_eq!(reads.recv_timeout(SAFETY).unwrap(), (0x3000, 4));
    c.inner.data(1, 0x3001, 0, b"abcd");
    assert_eq!(
        c.next(1),
        died(
            "fake guest: line 2: the host answered a read of 4 bytes at 0x3000 with bytes at \
             0x3001 where 0x3000 was next"
        )
    );

    // Another Guest: too many bytes, then an unknown errno.
    c.start(2, Setup::console());
    assert_eq!(c.read(2), Seen::Notify(0x1000));
    let reads = c.hold_reads(2);
    c.run(2);
    assert_eq!(reads.recv_timeout(SAFETY).unwrap(), (0x3000, 4));
    c.inner.data(2, 0x3000, 0, b"abcdef");
    assert!(
        matches!(c.next(2), Seen::Died(Death::Reason(r)) if r.contains("with 6 bytes at 0x3000 where 4 were left"))
    );
    c.start(3, Setup::console());
    assert_eq!(c.read(3), Seen::Notify(0x1000));
    let reads = c.hold_reads(3);
    c.run(3);
    reads.recv_timeout(SAFETY).unwrap();
    c.inner.data(3, 0x3000, Errno::EIO as u32, &[]);
    assert!(matches!(c.next(3), Seen::Died(Death::Reason(r)) if r.contains("with errno 5")));
    // ENOENT: cusedev knows no such Guest.
    c.start(4, Setup::console());
    assert_eq!(c.read(4), Seen::Notify(0x1000));
    let reads = c.hold_reads(4);
    c.run(4);
    reads.recv_timeout(SAFETY).unwrap();
    c.inner.data(4, 0x3000, Errno::ENOENT as u32, &[]);
    c.wait_state(
        4,
        &dead("cusedev knows no Guest 4 (a read was answered ENOENT)"),
    );

    // And a fresh Guest still runs the whole script.
    c.start(9, Setup::console());
    assert_eq!(c.read(9), Seen::Notify(0x1000));
    assert_eq!(c.read(9), Seen::Notify(0x2000));
    assert_eq!(c.status(9).unwrap().last_read.unwrap().hex, "00000000");
}

#[test]
fn a_read_the_host_never_answers_kills_after_the_step_timeout() {
    let c = Cusedev::with_host(LguestHost::with_script(
        Script::parse("t", "read 0x10 1").unwrap(),
        Duration::from_millis(200),
    ));
    c.start(1, Setup::console());
    let _reads = c.hold_reads(1);
    assert_eq!(
        c.read(1),
        died("fake guest: line 1: no answer to a read of 1 bytes at 0x10 within 200ms")
    );
}

#[test]
fn script_command_changes_the_script_of_new_guests_only() {
    let c = Cusedev::new("notify 0x1");
    c.start(1, Setup::console());
    let answer = command(
        c.host(),
        serde_json::json!({"op": "script", "name": "two.guest", "text": "notify 0x2"}),
    )
    .unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"script": "two.guest", "instructions": 1, "previous": "test.guest"})
    );
    c.start(2, Setup::console());
    assert_eq!(c.read(1), Seen::Notify(1));
    assert_eq!(c.read(2), Seen::Notify(2));
    let refused = command(
        c.host(),
        serde_json::json!({"op": "script", "name": "bad.guest", "text": "notify 1\ngoto x"}),
    )
    .unwrap_err();
    assert_eq!(
        refused,
        CommandError::Refused("bad.guest:2: unknown label \"x\"".into())
    );
    assert_eq!(c.host().script().name, "two.guest");

    let status = command(c.host(), serde_json::json!({"op": "status"})).unwrap();
    assert_eq!(status["script"], "two.guest");
    assert_eq!(status["guests"][1]["guest"], 2);
    assert_eq!(status["guests"][1]["pfn_limit"], PFN_LIMIT);
    assert_eq!(status["guests"][1]["state"]["kind"], "stopped_at_notify");
    assert_eq!(
        status["guests"][1]["state_text"],
        "stopped at notify 0x2 (line 1)"
    );
    let irqs = command(c.host(), serde_json::json!({"op": "irqs"})).unwrap();
    assert_eq!(irqs["guests"].as_array().unwrap().len(), 2);
    let notifies = command(c.host(), serde_json::json!({"op": "notifies", "guest": 2})).unwrap();
    assert_eq!(notifies["guests"][0]["by_address"][0]["addr"], 2);
    assert_eq!(
        notifies["guests"][0]["recent"][0]["taken"],
        serde_json::Value::Null
    );
    assert!(matches!(
        command(c.host(), serde_json::json!({"op": "frob"})),
        Err(CommandError::Malformed(_))
    ));
    let summary = c.host().status().summary;
    assert!(
        summary.contains("2 Guests (2 stopped at notify)") && summary.contains("two.guest"),
        "{summary}"
    );
}

#[test]
fn serve_option_names_the_script_and_a_bad_one_refuses_to_start() {
    let dir = TempDir::new("lguest-serve");
    let config = |path: &std::path::Path| ServiceConfig {
        step_timeout: Duration::from_secs(1),
        serve_args: crate::serve::parse_serve_options(&["--lguest-guest", path.to_str().unwrap()])
            .unwrap(),
    };
    let good = dir.path().join("good.guest");
    std::fs::write(&good, "# fine\nnotify 0x1\n").unwrap();
    let host = LguestHost::new(&config(&good)).unwrap();
    assert_eq!(host.script().name, good.display().to_string());

    let bad = dir.path().join("bad.guest");
    std::fs::write(&bad, "notify 0x1\nwait-irq 40\n").unwrap();
    let err = LguestHost::new(&config(&bad)).err().unwrap();
    assert_eq!(
        err,
        format!(
            "{}:2: interrupt 40 is out of range: LHREQ_IRQ takes 0..31",
            bad.display()
        )
    );
    let missing = dir.path().join("missing.guest");
    let err = LguestHost::new(&config(&missing)).err().unwrap();
    assert!(err.contains("cannot read it"), "{err}");

    // Without the option: the built-in console-hello.
    let host = LguestHost::new(&ServiceConfig {
        step_timeout: Duration::from_secs(1),
        serve_args: clap::ArgMatches::default(),
    })
    .unwrap();
    assert_eq!(host.script().name, "builtin:console-hello");
}
