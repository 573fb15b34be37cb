//! Writes the committed seed corpus: a few valid encodings per target, made with the crate's
//! own encoders, into `fuzz/corpus/<target>/<name>` (run from anywhere:
//! `cargo run --manifest-path fuzz/Cargo.toml --example seed`). Existing files are replaced;
//! inputs libFuzzer found are kept elsewhere (build/fuzz/corpus), not here.
//!
//! The engine and vhost targets read their input structurally (`arbitrary`), so any bytes are
//! a valid script; their seeds are fixed pseudo-random strings of a few lengths, with the first
//! bytes chosen where they pick the shape (a proper INIT first, a well-formed chain).

use std::path::Path;

use cusedev::fuse::abi::{ioctl_flags, IoctlIn, IoctlIovec};
use vmbus::channel_msg::ChannelMessage;
use vmbus::guest_memory::MemoryMessage;
use vmbus::guid::Guid;
use vmbus::ic::IcVersion;
use vmbus::kvp::{self, IpInfo, KvpMsg, KvpValue};
use vmbus::lguest::{Death, FromGuest, Start, ToGuest};
use vmbus::negotiate;
use vmbus::packet::{encode_completion, encode_inband, parse_packet};
use vmbus::stream::{encode_frame, kind, Hello};
use vmbus::xs_fastpath::xstore::{self, Op, Request, Status};
use vmbus::xs_fastpath::{encode_request_packet, VspRequest};
use vmbus::{fcopy, vss};
use zerocopy::{FromZeros, IntoBytes};

fn payload_of(packet: &[u8]) -> Vec<u8> {
    parse_packet(packet).expect("own packet").payload.to_vec()
}

/// `n` bytes of a fixed xorshift sequence (the same on every run).
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn with_prefix(prefix: &[u8], rest: Vec<u8>) -> Vec<u8> {
    let mut out = prefix.to_vec();
    out.extend(rest);
    out
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut seeds: Vec<(&str, &str, Vec<u8>)> = Vec::new();
    let mut add = |t, n, b| seeds.push((t, n, b));

    let hello = Hello::channel(7, 3).encode();
    add("stream", "hello_control", Hello::control().encode());
    add("stream", "frame_hello", encode_frame(kind::HELLO, &hello));
    let mut two = encode_frame(kind::CONTROL, &ChannelMessage::RequestOffers.encode());
    two.extend(encode_frame(kind::PACKET, &encode_inband(1, 0, b"abc")));
    add("stream", "frames_control_packet", two);
    add(
        "stream",
        "frame_memory_empty",
        encode_frame(kind::MEMORY, &[]),
    );

    let msgs = [
        (
            "initiate",
            ChannelMessage::InitiateContact { version: 0x5_0002 },
        ),
        (
            "version",
            ChannelMessage::VersionResponse {
                supported: true,
                conn_id: 1,
            },
        ),
        ("request_offers", ChannelMessage::RequestOffers),
        (
            "offer",
            ChannelMessage::Offer {
                if_type: Guid::FCOPY,
                if_instance: Guid::KVP,
                child_relid: 14,
                connection_id: 9,
            },
        ),
        ("all_offers", ChannelMessage::AllOffersDelivered),
        (
            "open",
            ChannelMessage::OpenChannel {
                child_relid: 14,
                open_id: 1,
            },
        ),
        (
            "open_result",
            ChannelMessage::OpenResult {
                child_relid: 14,
                open_id: 1,
                status: 0,
            },
        ),
        ("rescind", ChannelMessage::Rescind { child_relid: 14 }),
        ("close", ChannelMessage::CloseChannel { child_relid: 14 }),
        (
            "released",
            ChannelMessage::RelidReleased { child_relid: 14 },
        ),
    ];
    for (n, m) in msgs {
        add("channel_msg", n, m.encode());
    }

    add("packet", "inband", encode_inband(5, 1, b"hello, ring"));
    add("packet", "completion", encode_completion(6, &[]));
    let fcopy_neg = negotiate::build_request_packet(
        1,
        &[IcVersion::new(3, 0), IcVersion::new(1, 0)],
        &[IcVersion::new(1, 1)],
    );
    add("packet", "negotiate", fcopy_neg.clone());

    add("ic_negotiate", "fcopy_request", payload_of(&fcopy_neg));
    let kvp_neg =
        negotiate::build_request_packet(2, negotiate::KVP_FW_VERSIONS, negotiate::KVP_SRV_VERSIONS);
    let mut answered = payload_of(&kvp_neg);
    negotiate::prep_negotiate_resp(
        &mut answered,
        negotiate::KVP_FW_VERSIONS,
        negotiate::KVP_SRV_VERSIONS,
    );
    add("ic_negotiate", "kvp_request", payload_of(&kvp_neg));
    add("ic_negotiate", "kvp_answered", answered);

    add(
        "fcopy",
        "start",
        fcopy::encode_start("f€.txt", "/tmp/x", fcopy::OVER_WRITE, 4096).unwrap(),
    );
    add(
        "fcopy",
        "write",
        fcopy::encode_write(0, b"some file data\n").unwrap(),
    );
    add(
        "fcopy",
        "complete",
        fcopy::encode_op(fcopy::op::COMPLETE_FCOPY),
    );
    add(
        "fcopy",
        "utf16_surrogates",
        [0x3d, 0xd8, 0x00, 0xde, 0x41, 0x00, 0x00, 0xdc].to_vec(),
    );

    let kvp_body = kvp::encode_set(1, "key", &KvpValue::Sz("value".into())).unwrap();
    add("kvp", "daemon_set", kvp_body.clone());
    add(
        "kvp",
        "daemon_register",
        KvpMsg::register(kvp::op::REGISTER1, "3.1").to_vec(),
    );
    add(
        "kvp",
        "reply_set",
        payload_of(&kvp::build_request_packet(1, 0, &kvp_body)),
    );
    add(
        "kvp",
        "reply_enumerate",
        payload_of(&kvp::build_request_packet(
            2,
            1,
            &kvp::encode_enumerate(3, 0),
        )),
    );
    add(
        "kvp",
        "reply_delete",
        payload_of(&kvp::build_request_packet(
            3,
            2,
            &kvp::encode_delete(2, "k").unwrap(),
        )),
    );
    let ip = IpInfo {
        adapter_id: "00:15:5d:00:00:01".into(),
        addr_family: 1,
        ip_addr: "10.0.0.2".into(),
        ..IpInfo::default()
    };
    add(
        "kvp",
        "reply_set_ip",
        payload_of(&kvp::build_request_packet(
            4,
            3,
            &kvp::encode_set_ip_info(&ip).unwrap(),
        )),
    );

    let vss_body = vss::encode_request(vss::op::FREEZE, 0);
    add("vss", "daemon_freeze", vss_body.clone());
    add(
        "vss",
        "reply_freeze",
        payload_of(&vss::build_request_packet(1, 0, &vss_body)),
    );
    add(
        "vss",
        "reply_dm_info",
        payload_of(&vss::build_request_packet(
            2,
            1,
            &vss::encode_request(vss::op::GET_DM_INFO, 5),
        )),
    );

    let req = VspRequest::new_zeroed();
    add(
        "xs_fastpath",
        "gpa_direct_2_pages",
        encode_request_packet(9, &[0x1234, 0x1235], &req).unwrap(),
    );
    let get = Request {
        op: Op::GET,
        offset: 0,
        length: 10,
        name: "dir/blob".into(),
    };
    add("xs_fastpath", "xsa1_get", get.encode());
    let list = Request {
        op: Op::LIST,
        offset: 0,
        length: 0,
        name: "dir/".into(),
    };
    add("xs_fastpath", "xsa1_list", list.encode());
    add(
        "xs_fastpath",
        "xsa1_response",
        xstore::encode_response_header(Status::OK, 2, 2).to_vec(),
    );
    let (body, n) = xstore::encode_list(["a", "dir/b"], 4096);
    let mut counted = vec![n as u8];
    counted.extend(body);
    add("xs_fastpath", "xsa1_list_body", counted);

    add(
        "guest_memory",
        "read",
        MemoryMessage::Read {
            trans_id: 1,
            offset: 4096,
            len: 512,
        }
        .encode(),
    );
    add(
        "guest_memory",
        "data",
        MemoryMessage::Data {
            trans_id: 1,
            offset: 4096,
            status: 0,
            bytes: b"page bytes",
        }
        .encode(),
    );
    add(
        "guest_memory",
        "write",
        MemoryMessage::Write {
            trans_id: 2,
            offset: 0,
            bytes: b"x",
        }
        .encode(),
    );

    let start = Start {
        word: 1,
        launcher_pid: 100,
        base: 0x1000,
        pfn_limit: 256,
        start: 0x2000,
    };
    add("lguest", "start", ToGuest::Start(start).encode(1));
    add("lguest", "run", ToGuest::Run { cause: 1 }.encode(1));
    add(
        "lguest",
        "died",
        ToGuest::Died(Death::Reason("oops".into())).encode(1),
    );
    add("lguest", "stop", ToGuest::Stop.encode(1));
    add(
        "lguest",
        "notify",
        FromGuest::Notify { addr: 0x3000 }.encode(1),
    );
    add(
        "lguest",
        "shutdown",
        FromGuest::Shutdown { message: 0, how: 1 }.encode(1),
    );
    add(
        "lguest",
        "kill",
        FromGuest::Kill {
            reason: "bad".into(),
        }
        .encode(1),
    );

    // Engine scripts: `[0; 4]` picks InitChoice::Proper, then random requests.
    let names = ["short", "medium", "long"];
    for (i, (name, len)) in names.iter().zip([96usize, 512, 2048]).enumerate() {
        for target in ["fuse_engine", "cuse_engine"] {
            add(
                target,
                name,
                with_prefix(&[0; 4], noise(11 + i as u64, len)),
            );
        }
        add("vhost_chain", name, noise(23 + i as u64, len));
        add("vsock_device", name, noise(37 + i as u64, len));
    }
    for target in ["fuse_engine", "cuse_engine"] {
        add(target, "no_init", noise(5, 300));
    }
    // An odd first byte: bool true, a well-formed chain.
    add(
        "vhost_chain",
        "well_formed",
        with_prefix(&[1], noise(41, 600)),
    );

    // ioctl_retry, raw: a fuse_ioctl_in, then the split byte and iovecs.
    let ioctl_in = |flags: u32| {
        IoctlIn {
            fh: 1,
            flags,
            cmd: 0xc010_4d02,
            arg: 0x7fff_0000,
            in_size: 8,
            out_size: 64,
        }
        .as_bytes()
        .to_vec()
    };
    let mut iovecs = vec![1u8];
    for (base, len) in [(0x7fff_0000u64, 16u64), (0x5000, 4096), (u64::MAX - 1, 2)] {
        iovecs.extend(IoctlIovec { base, len }.as_bytes());
    }
    add(
        "ioctl_retry",
        "unrestricted",
        with_prefix(&ioctl_in(ioctl_flags::UNRESTRICTED), iovecs.clone()),
    );
    add(
        "ioctl_retry",
        "restricted",
        with_prefix(&ioctl_in(0), iovecs),
    );
    add("ioctl_retry", "structured", noise(53, 700));

    for (target, name, bytes) in seeds {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(name), bytes).expect("seed");
    }
}
